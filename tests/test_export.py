"""effivit.deploy.export.export and `effivit export --target/--precision`: every target x precision writes an
artifact that is verified against the fused fp32 model with the precision's declared tolerance."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from effivit import create_model
from effivit.cli import main
from effivit.deploy import fuse

# The module (effivit.deploy.export is also the name of its main function in effivit.deploy).
E = importlib.import_module("effivit.deploy.export")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fuse(create_model("efficientvit_b0", num_classes=10).eval())


def test_onnx_fp32_and_int8(model, tmp_path):
    pytest.importorskip("onnxruntime")
    r = E.export(model, tmp_path / "m.onnx", "onnx", "fp32", img_size=64)
    assert r["max_rel_err"] < 1e-4 and r["form"] == "dynamic batch"
    assert "verified against the fused PyTorch fp32 model" in r.summary()
    q = E.export(model, tmp_path / "q.onnx", "onnx", "int8", img_size=64)
    assert 0 < q["max_rel_err"] <= E.TOLERANCE["int8"]
    assert "int8 layers" in q["form"] and q["calibration"].startswith("synthetic")
    import onnx

    ops = {n.op_type for n in onnx.load(str(q["path"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_openvino_ir_with_its_precision(model, tmp_path):
    pytest.importorskip("openvino")
    from effivit.bench.backends.openvino import cpu_capabilities

    r = E.export(model, tmp_path / "m.xml", "openvino", "fp32", img_size=64)
    cfg = json.loads((tmp_path / "m.config.json").read_text())
    assert cfg["INFERENCE_PRECISION_HINT"] == "f32" and r["max_rel_err"] < 1e-4
    assert (tmp_path / "m.bin").exists() and not list(tmp_path.glob("*.onnx"))
    if "BF16" in cpu_capabilities():
        b = E.export(model, tmp_path / "b.xml", "openvino", "bf16", img_size=64)
        assert 0 < b["max_rel_err"] <= E.TOLERANCE["bf16"]
        assert json.loads((tmp_path / "b.config.json").read_text())["INFERENCE_PRECISION_HINT"] == "bf16"


def test_torchscript_half_and_a_failed_check(model, tmp_path, monkeypatch):
    r = E.export(model, tmp_path / "m.pt", "torchscript", "bf16", img_size=64)
    loaded = torch.jit.load(str(r["path"]))
    y = loaded(torch.randn(1, 3, 64, 64))
    assert y.dtype == torch.float32 and y.shape == (1, 10)
    # The tolerance is enforced: bf16 rounding cannot pass an fp32-tight check.
    monkeypatch.setitem(E.TOLERANCE, "bf16", 1e-7)
    with pytest.raises(E.ExportError, match="does not reproduce the fp32 model"):
        E.export(model, tmp_path / "m2.pt", "torchscript", "bf16", img_size=64)


def test_unknown_target_or_precision(model, tmp_path):
    with pytest.raises(ValueError, match="target='tflite'"):
        E.export(model, tmp_path / "x", "tflite")
    with pytest.raises(ValueError, match="onnx export offers precisions"):
        E.export(model, tmp_path / "x.onnx", "onnx", "bf16")


def test_cli_export_int8_with_a_calibration_folder(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from PIL import Image

    for i in range(4):
        d = tmp_path / "cal" / str(i % 2)
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (30 * i, 60, 90)).save(d / f"{i}.png")
    out = tmp_path / "q.onnx"
    rc = main(["export", "efficientvit_b0", str(out), "--target", "onnx", "--precision", "int8", "--img-size", "64",
               "--calibration", str(tmp_path / "cal"), "--model-arg", "num_classes=10"])
    assert rc == 0 and out.exists()
    text = capsys.readouterr().out
    assert "int8 calibrated on 4 images from" in text and "4 calibration images" in text
    (tmp_path / "empty").mkdir()
    assert main(["export", "efficientvit_b0", str(out), "--precision", "int8", "--img-size", "64",
                 "--calibration", str(tmp_path / "empty")]) == 2
    assert "holds no images" in capsys.readouterr().err
