"""``effivit eval``: top-1/top-5/loss per resolution, fused and unfused, against a direct computation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

import effivit  # noqa: E402
from effivit.cli import main  # noqa: E402
from effivit.train.data import ImageFolderDataset, eval_transform, resolve_data_config  # noqa: E402
from effivit.train.digits import write_digits  # noqa: E402

MODELS = ("efficientvit_b0", "convnextv2_atto", "efficientvit_m0", "repvit_m0_9", "levit_128s", "nextvit_small")


def _model_with_bn() -> str:
    names = set(effivit.list_models())
    return next(n for n in MODELS if n in names)


def _direct(model, folder, size, crop_pct):
    """top-1, top-5 and mean loss computed image by image, without the evaluation code under test."""
    cfg = resolve_data_config(model.pretrained_cfg, size, crop_pct)
    ds = ImageFolderDataset(folder, eval_transform(cfg))
    hit1 = hit5 = 0
    loss = 0.0
    with torch.no_grad():
        for x, y in (ds[i] for i in range(len(ds))):
            logits = model(x[None])[0]
            order = logits.argsort(descending=True).tolist()
            hit1 += order[0] == y
            hit5 += y in order[:5]
            loss += float(F.cross_entropy(logits[None], torch.tensor([y])))
    n = len(ds)
    return 100 * hit1 / n, 100 * hit5 / n, loss / n


def test_eval_table_per_resolution_fused_and_unfused(tmp_path, capsys):
    from conftest import randomize_norm_stats

    data = tmp_path / "digits"
    write_digits(data, size=32, max_per_class=3)
    name = _model_with_bn()
    torch.manual_seed(0)
    model = randomize_norm_stats(effivit.create_model(name, num_classes=10)).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "rows.json"
    rc = main(["eval", "--model", name, "--checkpoint", str(tmp_path / "w.pth"), "--data", str(data),
               "--img-size", "32", "64", "--crop-pct", "1.0", "--both", "--workers", "0", "--batch-size", "7",
               "--device", "cpu", "--output-json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "top-1 %" in printed and "fused" in printed
    rows = json.loads(out.read_text())
    assert [(r["weights"], r["img_size"]) for r in rows] == [("unfused", 32), ("unfused", 64), ("fused", 32),
                                                             ("fused", 64)]
    for r in rows:
        assert r["images"] == 30 and r["skipped"] == 0
        top1, top5, loss = _direct(model, data / "val", r["img_size"], 1.0)
        assert r["top1"] == pytest.approx(top1) and r["top5"] == pytest.approx(top5)
        assert r["loss"] == pytest.approx(loss, abs=1e-4)
    assert rows[0]["loss"] != pytest.approx(rows[1]["loss"])  # the resolution really changed


def test_eval_rejects_a_size_the_model_cannot_take(tmp_path, capsys):
    data = tmp_path / "digits"
    write_digits(data, size=16, max_per_class=1)
    # A model with a size rule (fully convolutional ones take any size).
    name = next(n for n in MODELS if effivit.create_model(n, num_classes=10).pretrained_cfg["size_divisor"] > 1)
    divisor = effivit.create_model(name, num_classes=10).pretrained_cfg["size_divisor"]
    rc = main(["eval", "--model", name, "--data", str(data), "--img-size", str(divisor + 1), "--device", "cpu",
               "--workers", "0"])
    assert rc == 2
    assert f"multiple of {divisor}" in capsys.readouterr().err
