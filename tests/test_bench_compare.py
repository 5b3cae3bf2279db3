"""effivit-vs-timm comparison: the paired pipeline (on toy models) and the verdicts written to the docs."""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from effivit.bench import compare

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("compare_timm_script", ROOT / "benchmarks" / "compare_timm.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def script():
    return _load_script()


def _toy(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 10)).eval()


def test_compare_models_pairs_runtimes_and_reports_ratios(monkeypatch):
    pytest.importorskip("onnxruntime")
    ours, theirs = _toy(4), _toy(4)
    monkeypatch.setattr(compare, "build_pair", lambda name: (ours, theirs, 0.0))
    rows = compare.compare_models(["toy"], runtimes=("eager-fp32", "onnxruntime-fp32"), batch_sizes=(1, 2),
                                  img_size=32, rounds=3, iters_per_round=2, warmup=1, threads=1,
                                  log=lambda m: None)
    assert [(r["runtime"], r["batch_size"]) for r in rows] == [
        ("eager-fp32", 1), ("onnxruntime-fp32", 1), ("eager-fp32", 2), ("onnxruntime-fp32", 2)]
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["ours_ms"] > 0 and r["timm_ms"] > 0
        assert r["speedup_q1"] <= r["speedup"] <= r["speedup_q3"]
        macs = 16 * 16 * 4 * 27 + 4 * 10
        assert r["gmacs"] * 1e9 == macs
        assert r["ours_gflops"] == pytest.approx(2 * macs * r["batch_size"] / (r["ours_ms"] * 1e-3) / 1e9)


def test_compare_models_reports_a_failing_runtime_and_goes_on(monkeypatch):
    class Bf16Hater(nn.Module):
        def forward(self, x):
            if torch.is_autocast_enabled("cpu"):
                raise RuntimeError("no bf16 here")
            return x.mean((2, 3))

    monkeypatch.setattr(compare, "build_pair", lambda name: (_toy(4), Bf16Hater(), 0.0))
    rows = compare.compare_models(["toy"], runtimes=("eager-fp32", "eager-bf16"), batch_sizes=(1,), img_size=32,
                                  rounds=2, iters_per_round=2, warmup=1, threads=1, log=lambda m: None)
    by = {r["runtime"]: r for r in rows}
    assert by["eager-fp32"]["status"] == "ok"
    assert by["eager-bf16"]["status"] == "failed" and "no bf16 here" in by["eager-bf16"]["error"]


def test_verdicts_follow_the_targets(script):
    g3, g4 = script.GROUPS["issue3"], script.GROUPS["issue4"]
    assert script._target(g3, "eager-fp32") == 1.3 and script._target(g3, "eager-bf16") == 1.3
    assert script._target(g3, "onnxruntime-fp32") == 1.0
    assert script._target(g4, "eager-bf16") == 1.0 and g4.geomean == 1.2
    assert script.verdict(1.31, 1.4, 1.3).startswith("PASS")
    assert script.verdict(1.29, 1.28, 1.3) == "FAIL (< 1.3x)"
    assert script.verdict(1.29, 1.35, 1.3) == "FAIL (< 1.3x, within run noise)"
    assert script.verdict(None, None, 1.0) == "not measured"


def test_render_computes_verdicts_and_geomean_from_the_rows(script):
    g4 = script.GROUPS["issue4"]

    def row(model, rt, speedup):
        return {"model": model, "runtime": rt, "batch_size": 1, "status": "ok", "error": "", "ours_ms": 1.0,
                "timm_ms": speedup, "speedup": speedup, "speedup_q1": speedup, "speedup_q3": speedup,
                "gmacs": 0.1, "ours_gflops": 10.0, "timm_gflops": 10.0 / speedup, "max_logit_diff": 0.0}

    speeds = [1.5, 1.4, 0.95, 1.3]
    rows = [row("a", "eager-fp32", 1.5), row("a", "onnxruntime-fp32", 1.4), row("b", "eager-fp32", 0.95),
            row("b", "onnxruntime-fp32", 1.3)]
    lines = script.render("issue4", g4, rows, ["c: not registered in effivit yet"], "python x", None, {})
    text = "\n".join(lines)
    gm = statistics.geometric_mean(speeds)
    assert f"all runtimes and batches: **{gm:.2f}x** — {'PASS' if gm >= 1.2 else 'FAIL'}" in text
    assert "3 of 4 measurements pass: b eager-fp32 b1 0.95x" in text
    assert "- skipped: c: not registered in effivit yet" in text
    assert "Command: `python x`" in text
    assert math.isclose(compare.geomean_speedup(rows), gm)


def test_registered_skips_unknown_models(script):
    pytest.importorskip("timm")
    ok, skipped = script.registered(["nextvit_small", "not_a_model_xyz"])
    assert ok == ["nextvit_small"]
    assert skipped == ["not_a_model_xyz: not registered in effivit yet"]
