"""Registry, model configs and the published reference data shipped with the package."""

from __future__ import annotations

import pytest

import effivit
from effivit.registry import get_entry, reference_tables


def test_list_models_patterns_and_tags():
    assert effivit.list_models("nextvit_*") == ["nextvit_base", "nextvit_large", "nextvit_small"]
    assert "nextvit_small.bd_in1k_384" in effivit.list_models("nextvit_small*", pretrained=True)
    assert effivit.list_models(["nextvit_s*", "nextvit_l*"]) == ["nextvit_large", "nextvit_small"]
    assert effivit.list_models("no_such_model*") == []


def test_every_family_in_the_registry_has_published_figures():
    published, _ = reference_tables()
    csv_families = {row["family"] for row in published}
    from effivit.registry import timm_tag_table

    released = {get_entry(n).family for n in effivit.list_models() if n in timm_tag_table()}
    assert len(released) >= 9
    for family in released:  # a family with released weights (not e.g. the searched efficientformer_custom)
        assert family in csv_families, f"family {family!r} has no rows in published.csv (name mismatch?)"


def test_tag_config_comes_from_the_reference_tables():
    m = effivit.create_model("nextvit_small.bd_in1k_384")
    cfg = m.pretrained_cfg
    assert cfg["input_size"] == (3, 384, 384)
    assert cfg["hf_hub_id"] == "timm/nextvit_small.bd_in1k_384"
    assert cfg["published"]["top1"] == pytest.approx(83.6)
    assert cfg["published"]["timm_top1"] == pytest.approx(84.036)
    assert cfg["crop_pct"] == pytest.approx(1.0)
    default = effivit.create_model("nextvit_small").pretrained_cfg
    assert default["tag"] == "bd_in1k" and default["input_size"] == (3, 224, 224)


def test_unknown_names_and_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="Did you mean: nextvit_small"):
        effivit.create_model("nextvit_smal")
    with pytest.raises(ValueError, match="known tags"):
        effivit.create_model("nextvit_small.no_such_tag")
    with pytest.raises(ValueError, match="allowed"):
        effivit.create_model("nextvit_small", not_an_argument=1)
    with pytest.raises(ValueError, match="out_indices"):
        effivit.create_model("nextvit_small", out_indices=(1,))
    with pytest.raises(ValueError, match="in_chans"):
        effivit.create_model("nextvit_small", in_chans=0)


def test_timm_parameter_counts_match_for_every_registered_model_with_a_timm_row():
    # Parameter counts of timm's evaluation (timm_results.csv) are the same models' counts.
    checked = 0
    for name in effivit.list_models():
        tag = get_entry(name).default_tag
        if tag is None or tag.published.timm_params_m is None:
            continue
        n = sum(p.numel() for p in effivit.create_model(name).parameters()) / 1e6
        assert n == pytest.approx(tag.published.timm_params_m, abs=0.006), name
        checked += 1
    assert checked >= 3
