"""efficientformer_custom: the network ``effivit search`` designs, built from an architecture file.

The default architecture is EfficientFormer-L1's layout and reproduces timm's efficientformer_l1; any
other layout (MB3D blocks in stage 3, which then hands maps to stage 4) fuses, scripts, traces and exports;
architecture files round-trip and malformed ones fail with errors naming the field.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_close, randomize_norm_stats, scale_classifier

import effivit
from effivit.deploy import count_batchnorms, export_onnx, fuse
from effivit.models.efficientformer_custom import (
    ARCH_FORMAT,
    DEFAULT_ARCH,
    ArchError,
    EfficientFormerArch,
    StageArch,
    ToMaps,
)

# MB3D blocks in stages 3 and 4 (stage 3 converts its tokens back to maps for stage 4's convolution).
ARCH = EfficientFormerArch(
    stages=(StageArch(16, ("4d",)), StageArch(32, ("4d", "4d")), StageArch(48, ("4d", "3d", "3d")),
            StageArch(64, ("3d",))),
    img_size=64, key_dim=8, num_heads=2, attn_ratio=2.0,
)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    randomize_norm_stats(model)
    scale_classifier(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "attention_biases")):  # layer scales start at 1e-5, biases at 0
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def test_default_is_efficientformer_l1_and_matches_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = _randomize(timm.create_model("efficientformer_l1", pretrained=False).eval())
    ours = effivit.create_model("efficientformer_custom").eval()
    assert ours.arch == DEFAULT_ARCH
    effivit.load_checkpoint(ours, ref.state_dict())  # same names (timm's derived index buffer is dropped)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(x)
        assert_close(ours(x), expected, 1e-4, "efficientformer_custom (default) vs timm efficientformer_l1")
        assert_close(ours.forward_features(x), ref.forward_features(x), 1e-4, "forward_features")
    assert expected.abs().max() > 1e-2
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_free_layout_forward_deploy_and_exports(tmp_path):
    torch.manual_seed(0)
    model = _randomize(effivit.create_model("efficientformer_custom", arch=ARCH, num_classes=7)).eval()
    blocks = model.stages[2].blocks
    assert isinstance(blocks[-1], ToMaps) and model.tokens_out
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 7)
        feats = model.forward_intermediates(x, intermediates_only=True)
        assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 16), (32, 8, 8), (48, 4, 4), (64, 2, 2)]
        assert model.forward_features(x).shape == (2, 4, 64)  # tokens after the last stage, as timm's V1
        fused = fuse(model)
        assert count_batchnorms(fused) == 0
        tol = 1e-4 * max(1.0, float(y.abs().max()))
        assert_close(fused(x), y, tol, "fused vs unfused")
        assert_close(torch.jit.script(fused)(x), y, tol, "TorchScript")
        traced = torch.fx.symbolic_trace(model)
        assert_close(traced(x), y, tol, "torch.fx")
        # The tracing ONNX exporter (what the latency table uses) and ONNX Runtime agree with PyTorch.
        path = export_onnx(fused, tmp_path / "custom.onnx", img_size=64, exporter="torchscript")
    assert path.stat().st_size > 0
    # Training mode returns one tensor; other sizes (multiples of 32) work, with resampled attention biases.
    model.train()
    assert model(torch.randn(2, 3, 96, 64)).shape == (2, 7)


def test_arch_file_round_trip(tmp_path):
    path = ARCH.save(tmp_path / "arch.json")
    loaded = EfficientFormerArch.load(path)
    assert loaded == ARCH and loaded.describe() == ARCH.describe() == "16:4d*1 | 32:4d*2 | 48:4d*1,3d*2 | 64:3d*1"
    d = json.loads(path.read_text())
    assert d["format"] == ARCH_FORMAT and d["version"] == 1 and d["stages"][2]["blocks"] == ["4d", "3d", "3d"]
    torch.manual_seed(0)
    a = effivit.create_model("efficientformer_custom", arch=str(path), num_classes=3)
    torch.manual_seed(0)
    b = effivit.create_model("efficientformer_custom", arch=d, num_classes=3)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    # A state dict of one layout loads into a model built from its file (what `effivit train --pretrained` does).
    effivit.load_checkpoint(effivit.create_model("efficientformer_custom", arch=path, num_classes=3), a.state_dict())


def _good() -> dict:
    return copy.deepcopy(ARCH.to_dict())


def _bad(change):
    d = _good()
    change(d)
    return d


MALFORMED = [
    (lambda d: d.update(format="something"), "'format' must be"),
    (lambda d: d.update(version=99), "'version' must be"),
    (lambda d: d.pop("stages"), "'stages' field is missing"),
    (lambda d: d.update(stages=d["stages"][:3]), "4 stages, got 3"),
    (lambda d: d["stages"][2].update(blocks=["3d", "4d"]), r"stages\[2\]: MB3D blocks must form the end"),
    (lambda d: d["stages"][1].update(blocks=[]), r"stages\[1\]: a stage needs at least one block"),
    (lambda d: d["stages"][1].update(blocks=["5d"]), r"stages\[1\]: block kinds must be one of"),
    (lambda d: d["stages"][0].update(width=30.5), r"stages\[0\]: stage width must be an int"),
    (lambda d: d["stages"][0].update(width=18, extra=1), r"stages\[0\] must be an object with exactly"),
    (lambda d: d["stages"][0].update(width=17), "first stage's width must be even"),
    (lambda d: d.update(img_size=100), "img_size must be a positive multiple of 32"),
    (lambda d: d.update(num_heads=0), "num_heads must be an int >= 1"),
    (lambda d: d.update(depth=3), r"unknown field\(s\) \['depth'\]"),
]


@pytest.mark.parametrize("change,message", MALFORMED)
def test_malformed_arch_is_a_clear_error(tmp_path, change, message):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(_bad(change)))
    with pytest.raises(ArchError, match=message) as info:
        effivit.create_model("efficientformer_custom", arch=path)
    assert str(path) in str(info.value)  # names the file
    assert isinstance(info.value, ValueError)


def test_unreadable_arch_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="architecture file not found"):
        effivit.create_model("efficientformer_custom", arch=tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ArchError, match="not a JSON architecture file"):
        effivit.create_model("efficientformer_custom", arch=tmp_path / "x.json")
    with pytest.raises(ArchError, match="arch must be a path"):
        effivit.create_model("efficientformer_custom", arch=42)
