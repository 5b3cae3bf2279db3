"""Checkpoint loading: formats, hub ids (offline, from the cache), and clear errors for bad input."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import effivit
from effivit.checkpoint import CheckpointError, load_state_dict, save_safetensors

NAME = "nextvit_small"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return effivit.create_model(NAME).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _fresh(seed=1):
    torch.manual_seed(seed)
    return effivit.create_model(NAME).eval()


def test_safetensors_round_trip(model, x, tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(model, path)
    loaded = effivit.create_model(NAME, pretrained=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_torch_file_with_training_wrapper(model, x, tmp_path, suffix):
    path = tmp_path / f"ckpt{suffix}"
    # Training checkpoints nest the weights and may carry DDP's "module." prefix.
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    other = _fresh()
    effivit.load_checkpoint(other, path)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_state_dict_source(model, x):
    other = _fresh()
    assert effivit.load_checkpoint(other, model.state_dict()) is other
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_code_execution_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": exploit}, f)
    with pytest.raises(CheckpointError, match="pickle"):
        load_state_dict(path)
    assert not marker.exists(), "the malicious payload ran"


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("seed", range(8))
def test_corrupt_file(tmp_path, suffix, seed):
    # Random bytes break the readers in many different ways; every one must become a CheckpointError.
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError):
        load_state_dict(path)


def test_truncated_torch_file(model, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_state_dict(path)


def test_truncated_safetensors(model, tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_state_dict(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.safetensors")
    odd = tmp_path / "w.npz"
    odd.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="allowed"):
        load_state_dict(odd)
    with pytest.raises(CheckpointError, match="state dict"):
        load_state_dict(12)


def test_checkpoint_for_another_model_is_named(model):
    base = effivit.create_model("nextvit_base")
    with pytest.raises(CheckpointError, match="missing keys") as err:
        effivit.load_checkpoint(base, model.state_dict())
    assert "nextvit_base" in str(err.value)


def test_shape_mismatch_is_listed(model):
    state = dict(model.state_dict())
    state["head.fc.weight"] = torch.zeros(10, 1024)
    with pytest.raises(CheckpointError, match="head.fc.weight"):
        effivit.load_checkpoint(_fresh(), state)


def test_unexpected_keys_are_listed(model):
    state = dict(model.state_dict(), **{"extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="extra.weight"):
        effivit.load_checkpoint(_fresh(), state)
    effivit.load_checkpoint(_fresh(), state, strict=False)  # non-strict skips what does not fit


def test_new_head_keeps_backbone(model, x):
    ft = effivit.create_model(NAME, pretrained=model.state_dict(), num_classes=10).eval()
    assert ft.get_classifier().out_features == 10
    with torch.no_grad():
        assert torch.equal(ft.forward_features(x), model.forward_features(x))


def test_features_only_with_weights(model, x):
    backbone = effivit.create_model(NAME, pretrained=model.state_dict(), features_only=True).eval()
    with torch.no_grad():
        feats = backbone(x)
        _, expected = model.forward_intermediates(x)
    assert all(torch.equal(a, b) for a, b in zip(feats, expected))


def _run_offline(code: str, cache: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=cache, HF_HOME=cache)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_hf_hub_id_resolves_offline_from_cache(model, tmp_path):
    # Lay out the huggingface_hub cache exactly as a previous download would have left it.
    hub_id = model.pretrained_cfg["hf_hub_id"]
    assert hub_id == "timm/nextvit_small.bd_in1k"
    repo = tmp_path / ("models--" + hub_id.replace("/", "--"))
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(snap / "model.safetensors"))
    ref = tmp_path / "ref.pt"
    torch.save(model.head.fc.weight.detach().clone(), ref)
    result = _run_offline(
        f"""
        import torch, effivit
        m = effivit.create_model("{NAME}", pretrained=True)
        assert torch.equal(m.head.fc.weight, torch.load("{ref}", weights_only=True))
        m2 = effivit.load_checkpoint(effivit.create_model("{NAME}"), "hf-hub:{hub_id}")
        assert torch.equal(m2.head.fc.weight, m.head.fc.weight)
        print("OK")
        """,
        str(tmp_path),
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_hf_hub_offline_without_cache_is_a_clear_error(tmp_path):
    result = _run_offline(
        f"""
        import effivit
        from effivit.checkpoint import CheckpointError
        try:
            effivit.create_model("{NAME}", pretrained=True)
        except CheckpointError as e:
            print("ERR", e)
        """,
        str(tmp_path),
    )
    assert "ERR" in result.stdout, result.stderr[-2000:]
    assert "timm/nextvit_small.bd_in1k" in result.stdout and "cache" in result.stdout


def test_pretrained_true_without_released_weights_is_rejected(monkeypatch):
    from effivit import registry

    entry = registry.get_entry(NAME)
    monkeypatch.setitem(registry._REGISTRY, NAME, registry.replace(entry, tags=()))
    with pytest.raises(ValueError, match="no released weights"):
        effivit.create_model(NAME, pretrained=True)
