"""effivit.deploy.precision: half-precision models, calibration data, the int8 policy and the accuracy table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effivit import create_model
from effivit.deploy import fuse
from effivit.deploy import precision as P
from effivit.layers.norm import GlobalResponseNorm


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_to_dtype_casts_weights_once_keeps_statistics_in_fp32():
    torch.manual_seed(0)
    model = fuse(create_model("convnextv2_atto", num_classes=10).eval())
    half = P.to_dtype(model, torch.bfloat16)
    convs = [m for m in half.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    norms = [m for m in half.modules() if isinstance(m, P.MIXED_NORMS)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    islands = [m for m in half.modules() if isinstance(m, P.Float32Island)]
    assert islands and all(isinstance(m.module, GlobalResponseNorm) for m in islands)
    assert all(p.dtype == torch.float32 for m in islands for p in m.parameters())
    # The original is untouched; the half model takes and returns fp32.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(x), half(x)
    assert out.dtype == torch.float32 and 0 < _rel(out, ref) < 3e-2
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        P.to_dtype(model, torch.int8)


def test_half_model_scripts():
    half = P.to_dtype(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), torch.bfloat16)
    scripted = torch.jit.script(half)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(scripted(x), half(x))


def _write_png(path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), (value, value, value)).save(path)


def test_calibration_folder_loads_images_and_rejects_empty_folders(tmp_path):
    with pytest.raises(ValueError, match="does not exist or is not a folder"):
        P.list_images(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="holds no images"):
        P.list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no images"):
        P.quantize(nn.Conv2d(3, 4, 1), str(tmp_path / "empty"), example=torch.zeros(1, 3, 8, 8))
    for i in range(6):
        _write_png(tmp_path / "cal" / f"c{i % 2}" / f"{i}.png", 40 * i)
    batches = P.calibration_from_folder(tmp_path / "cal", "levit_128s", 16, max_images=4)
    assert len(batches) == 4 and all(b.shape == (1, 3, 16, 16) for b in batches)
    # Normalised with the model's mean/std: a uniform grey image maps to (v/255 - mean) / std per channel.
    cfg = P._transform_cfg("levit_128s")
    first = batches[0][0, :, 0, 0]
    expect = (torch.tensor([0.0] * 3) - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    assert torch.allclose(first, expect, atol=1e-6)


class _TinyViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.norm = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)  # B, N, C
        q, k, v = self.qkv(self.norm(t)).chunk(3, dim=-1)
        t = t + (q @ k.transpose(1, 2)).softmax(-1) @ v
        t = t + self.fc(t)
        return self.head(t.mean(1))


def test_policy_keeps_fragile_layers_in_float(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from effivit.deploy.formats import export_onnx

    model = _TinyViT().eval()
    path = export_onnx(model, tmp_path / "t.onnx", example=torch.randn(1, 3, 16, 16))
    proto = onnx.load(str(path))
    P._ensure_node_names(proto)
    quant, keep = P._onnx_roles(proto.graph, P.DEFAULT_POLICY)
    # stem (first conv), two attention matmuls, head (classifier) stay float; qkv and fc are int8.
    assert len(quant) == 2 and len(keep) == 4
    quant2, keep2 = P._onnx_roles(proto.graph, P.QuantPolicy(keep_after=("LayerNormalization",)))
    assert len(quant2) == 1 and len(keep2) == 5  # qkv reads the LayerNorm's output
    q = P.quantize(model, [torch.randn(1, 3, 16, 16) for _ in range(4)], example=torch.randn(1, 3, 16, 16),
                   path=tmp_path / "t.int8.onnx", fp32_onnx=path)
    assert q.quantized_layers == 2 and len(q.kept_float) == 4 and q.calibration == "4 given inputs"
    with pytest.raises(ValueError, match="calibrate="):
        P.QuantPolicy(calibrate="kl")
    with pytest.raises(ValueError, match="target="):
        P.quantize(model, None, target="tflite")


def test_accuracy_record_reads_the_study_table(tmp_path, monkeypatch):
    table = tmp_path / "acc.csv"
    table.write_text("family,backend,dtype,drop_pts,top1_fp32,top1\n"
                     "levit,openvino,bf16,0.00,95.0,95.0\nlevit,onnxruntime,int8,1.39,95.0,93.6\n"
                     "levit,openvino,int8,0.28,95.0,94.7\n", encoding="utf-8")
    monkeypatch.setattr(P, "ACCURACY_TABLE", table)
    P._accuracy_rows.cache_clear()
    try:
        assert P.accuracy_record("levit", "openvino", "bf16")["held"] is True
        assert P.accuracy_record("levit", "eager", "bf16")["held"] is True  # half precision: same maths
        assert P.accuracy_record("levit", "onnxruntime", "int8") == {"drop_pts": 1.39, "held": False,
                                                                    "backend": "onnxruntime"}
        assert P.accuracy_record("levit", "openvino", "int8")["held"] is True
        assert P.accuracy_record("levit", "tensorrt", "int8") is None  # int8 differs per runtime
        assert P.accuracy_record("nextvit", "openvino", "bf16") is None
    finally:
        P._accuracy_rows.cache_clear()
