"""effivit.bench: timing statistics, MAC counting, the Pareto front, budgets, reports and the CLI.

Runs use two toy models registered for the duration of a test only (monkeypatched registry) at tiny
sizes with a few iterations, so the whole file stays within a few tens of seconds.
"""

from __future__ import annotations

import csv
import json
import math
import random
import shlex

import pytest
import torch
from torch import nn

from effivit import registry
from effivit.bench import report, runner, specs
from effivit.bench.command import PRESETS, _settings_from_args, budget_lines, published_lines
from effivit.bench.flops import achieved_gflops, count_macs, count_params
from effivit.bench.pareto import best_under_budget, pareto_front
from effivit.bench.runner import RESULT_FIELDS, Settings, run_benchmark
from effivit.bench.specs import ModelSpec
from effivit.bench.timing import Timing, gemm_rate, measure, paired, paired_ratio, percentile
from effivit.cli import build_parser, main

# --- report sections ----------------------------------------------------------------------------------------


def test_update_section_appends_then_replaces_and_keeps_the_rest(tmp_path):
    path = tmp_path / "b.md"
    path.write_text("# Title\n\nintro text\n", encoding="utf-8")
    report.update_section(path, "a", "first A")
    report.update_section(path, "b", "first B\n")
    report.update_section(path, "a", "second A\nline 2")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\nintro text\n")
    assert text.count("<!-- BEGIN a -->") == 1 and text.count("<!-- END a -->") == 1
    assert "first A" not in text
    assert report.read_section(path, "a") == "second A\nline 2"
    assert report.read_section(path, "b") == "first B"
    # A replaced section stays where it was (before b).
    assert text.index("BEGIN a") < text.index("BEGIN b")


def test_update_section_creates_the_file_and_rejects_bad_input(tmp_path):
    path = tmp_path / "sub" / "new.md"
    report.update_section(path, "x", "body")
    assert report.read_section(path, "x") == "body"
    with pytest.raises(ValueError, match="section name"):
        report.update_section(path, "bad name", "body")
    path.write_text("<!-- BEGIN y -->\nno end\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no END marker"):
        report.update_section(path, "y", "body")


def test_format_table_aligns_numbers_and_writes_markdown():
    rows = [{"m": "a", "v": 1.23456}, {"m": "bb", "v": None}]
    text = report.format_table(rows, [("m", "model"), ("v", "value", ".2f")])
    lines = text.splitlines()
    assert lines[0].split() == ["model", "value"]
    assert lines[2].endswith("1.23") and lines[3].endswith("-")
    md = report.format_table(rows, [("m", "model"), ("v", "value", ".2f")], style="markdown")
    assert md.splitlines()[1] == "|---|---:|"


# --- timing -------------------------------------------------------------------------------------------------


def test_percentile_matches_numpy_linear_interpolation():
    np = pytest.importorskip("numpy")
    vals = [random.Random(1).random() for _ in range(37)]
    for q in (0, 10, 25, 50, 75, 90, 100):
        assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)))


def test_timing_summary_statistics():
    t = Timing(tuple(float(v) for v in range(1, 11)))  # 1..10 ms
    assert t.median_ms == 5.5
    assert t.q1_ms == pytest.approx(3.25) and t.q3_ms == pytest.approx(7.75)
    assert t.iqr_ms == pytest.approx(4.5)
    assert t.spread_pct == pytest.approx(100 * 4.5 / 5.5)
    assert t.throughput(8) == pytest.approx(8000 / 5.5)
    with pytest.raises(ValueError):
        Timing(())


def test_measure_counts_calls_and_rejects_bad_counts():
    calls = []
    t = measure(lambda: calls.append(1), warmup=3, iters=7)
    assert len(calls) == 10 and len(t.samples_ms) == 7
    with pytest.raises(ValueError, match="iters"):
        measure(lambda: None, warmup=0, iters=0)


def test_paired_alternates_and_rotates_the_order():
    order = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    res = paired(fns, rounds=3, iters_per_round=2, warmup=1)
    timed = order[3:]  # after one warm-up call each
    assert timed == list("aabbcc" + "bbccaa" + "ccaabb")
    assert all(len(res[k].samples_ms) == 6 and len(res[k].round_medians) == 3 for k in "abc")


def test_paired_ratio_uses_per_round_ratios():
    # The machine slows down 3x in round 2 for both: per-round ratios are all 2.
    slow = Timing((2.0, 6.0, 2.0), (2.0, 6.0, 2.0))
    fast = Timing((1.0, 3.0, 1.0), (1.0, 3.0, 1.0))
    assert paired_ratio(slow, fast) == pytest.approx(2.0)
    # Unpaired timings fall back to the ratio of medians.
    assert paired_ratio(Timing((4.0,)), Timing((2.0,))) == pytest.approx(2.0)


def test_gemm_rate_measures_torch_and_onnxruntime():
    pytest.importorskip("onnxruntime")
    g = gemm_rate(n=128, rounds=1, iters_per_round=2, warmup=1, threads=1)
    assert g.torch_gflops > 0 and g.ort_gflops is not None and g.ort_gflops > 0
    assert g.best_gflops == max(g.torch_gflops, g.ort_gflops)


# --- counting -----------------------------------------------------------------------------------------------


def test_count_macs_on_known_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    x = torch.randn(2, 3, 6, 6)
    conv = 2 * 8 * 6 * 6 * 3 * 3 * 3  # batch x out positions x (in x k x k)
    linear = 2 * 8 * 6 * 6 * 5
    assert count_macs(model, x) == conv + linear
    assert count_params(model) == 8 * 3 * 9 + 8 * 36 * 5 + 5
    assert achieved_gflops(10**9, 1000.0) == pytest.approx(2.0)


def test_count_macs_counts_attention_at_the_actual_token_count():
    from effivit.layers.attention import attend

    class Attn(nn.Module):
        def forward(self, x):  # B, heads, N, dim
            return attend(x, x, x)

    m1 = count_macs(Attn(), torch.randn(1, 2, 16, 8))
    m2 = count_macs(Attn(), torch.randn(1, 2, 32, 8))
    assert m1 > 0 and m2 == 4 * m1  # quadratic in tokens


# --- Pareto front and budgets -------------------------------------------------------------------------------


def test_pareto_front_on_hand_made_points():
    lat = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0, None, 1.5]
    acc = [70.0, 75.0, 74.0, 75.0, 80.0, 79.0, 90.0, None]
    # 0: fastest. 1: better than 0. 2: dominated by 1. 3: same acc as 1 but slower. 4: best acc.
    # 5: slower and worse than 4. 6 and 7: a value missing, never on the front.
    assert pareto_front(lat, acc) == [True, True, False, False, True, False, False, False]
    assert pareto_front([1.0, 1.0], [70.0, 70.0]) == [True, True]  # exact ties are both kept
    with pytest.raises(ValueError):
        pareto_front([1.0], [])


def test_best_under_budget():
    rows = [
        {"label": "a", "median_ms": 1.0, "top1": 70.0},
        {"label": "b", "median_ms": 3.0, "top1": 78.0},
        {"label": "c", "median_ms": 2.5, "top1": 78.0},
        {"label": "d", "median_ms": 9.0, "top1": 85.0},
        {"label": "e", "median_ms": 0.5, "top1": None},
    ]
    assert best_under_budget(rows, 3.0)["label"] == "c"  # same top-1 as b, faster
    assert best_under_budget(rows, 2.0)["label"] == "a"
    assert best_under_budget(rows, 100.0)["label"] == "d"
    assert best_under_budget(rows, 0.9) is None
    with pytest.raises(ValueError):
        best_under_budget(rows, -1)


def test_budget_lines_answer_with_the_best_held_path():
    base = {"status": "ok", "impl": "effivit", "img_size": 224, "batch_size": 1, "dtype": "fp32"}
    rows = [dict(base, backend="eager", label="a", median_ms=1.0, top1=70.0),
            dict(base, backend="eager", label="b", median_ms=5.0, top1=80.0),
            dict(base, backend="onnxruntime", label="a", median_ms=0.5, top1=70.0),
            # b in int8 fits 2 ms, but its accuracy is unknown: not an answer.
            dict(base, backend="onnxruntime", dtype="int8", label="b", median_ms=1.5, top1=80.0, accuracy_held=None),
            dict(base, backend="openvino", dtype="bf16", label="b", median_ms=2.5, top1=80.0, accuracy_held=True),
            dict(base, batch_size=8, backend="eager", label="a", median_ms=9.0, top1=70.0)]
    lines = budget_lines(rows, 2.0)
    assert len(lines) == 2
    assert lines[0] == "budget 2 ms (224px batch 1): best top-1 70.0% with a in onnxruntime fp32 (0.50 ms)"
    assert "no model with a published top-1 fits; fastest is a (eager fp32) at 9.00 ms" in lines[1]
    assert "best top-1 80.0% with b in openvino bf16 (2.50 ms)" in budget_lines(rows, 3.0)[0]


def test_nextvit_attn_preset_measures_the_published_setting_and_prints_the_published_figures():
    args = build_parser().parse_args(["bench", "--preset", "nextvit-attn", "--device", "cpu"])
    s = _settings_from_args(args)
    assert (s.img_sizes, s.batch_sizes, s.dtypes) == ((224, 384), (8,), ("fp16",))
    assert {"eager", "tensorrt"} <= set(s.backends)
    if not torch.cuda.is_available():  # the preset's own device: a clear error where there is none
        with pytest.raises(ValueError, match="CUDA is not available"):
            _settings_from_args(build_parser().parse_args(["bench", "--preset", "nextvit-attn"]))
    published = PRESETS["nextvit-attn"]["published"]
    base = {"status": "ok", "batch_size": 8, "dtype": "fp16"}
    rows = [dict(base, label="nextvit_small:attn=original", backend="tensorrt", img_size=224, median_ms=2.0),
            dict(base, label="nextvit_small:attn=original", backend="eager", img_size=224, median_ms=1.0),
            dict(base, label="nextvit_small:attn=xca", backend="tensorrt", img_size=384, median_ms=8.0)]
    lines = published_lines(rows, published)
    assert lines[0] == "published (V100, TensorRT fp16, batch 8) beside this run:"
    assert lines[1] == ("  attn=original 224px: 2.00 ms here (fp16, batch 8), 3.45 ms published, "
                        "published / here 1.73")  # the TensorRT row, not the faster eager one
    assert lines[2] == "  attn=original 384px: 7.75 ms published; TensorRT not measured here"
    assert lines[3].startswith("  attn=xca 384px: 8.00 ms here") and lines[3].endswith("published / here 0.76")
    assert published_lines(rows, None) == []


def test_pareto_and_best_path_only_count_held_precisions():
    base = {"status": "ok", "impl": "effivit", "img_size": 224, "batch_size": 1, "device": "cpu"}
    rows = [dict(base, label="a", backend="eager", dtype="fp32", median_ms=4.0, top1=70.0),
            dict(base, label="a", backend="openvino", dtype="bf16", median_ms=2.0, top1=70.0, accuracy_held=True),
            dict(base, label="a", backend="onnxruntime", dtype="int8", median_ms=1.0, top1=70.0, accuracy_held=None),
            dict(base, label="b", backend="eager", dtype="fp32", median_ms=3.0, top1=75.0),
            dict(base, label="b", backend="openvino", dtype="int8", median_ms=1.5, top1=75.0, accuracy_held=False)]
    runner.mark_pareto(rows)
    assert [r["best_path"] for r in rows] == [False, True, False, True, False]
    assert [r["pareto"] for r in rows] == [False, True, False, True, False]


# --- runs on toy models -------------------------------------------------------------------------------------


class _Toy(nn.Module):
    def __init__(self, width: int, num_classes: int = 1000) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


def _toy_builder(cfg, num_classes: int = 1000, in_chans: int = 3, broken: bool = False):
    if broken:
        raise RuntimeError("toy build failure")
    return _Toy(cfg, num_classes)


def _entry(name: str, width: int, top1: float | None) -> registry.ModelEntry:
    defaults = registry.FamilyDefaults(family="toyfam_" + name)
    pub = registry.Published(top1=top1, params_m=None, gmacs=None)
    tags = (registry.PretrainedTag("t", "", (3, 224, 224), 0.9, "bicubic", pub),) if top1 is not None else ()
    return registry.ModelEntry(name, _toy_builder, width, defaults, tags)


@pytest.fixture
def toys(monkeypatch):
    registry._ensure_models_imported()
    monkeypatch.setitem(registry._REGISTRY, "toy_small", _entry("toy_small", 4, 60.0))
    monkeypatch.setitem(registry._REGISTRY, "toy_big", _entry("toy_big", 16, 70.0))
    return ["toy_small", "toy_big"]


def _settings(**kw) -> Settings:
    base = dict(img_sizes=(32,), batch_sizes=(1,), warmup=1, iters=4, rounds=2, memory=False, threads=1)
    base.update(kw)
    return Settings(**base)


def test_run_two_models_with_a_failing_backend(toys, monkeypatch):
    real = runner.prepare_backend

    def flaky(backend, dtype, *args, **kwargs):
        if backend == "compile":
            raise RuntimeError("compiler exploded")
        return real(backend, dtype, *args, **kwargs)

    monkeypatch.setattr(runner, "prepare_backend", flaky)
    specs = [ModelSpec(n) for n in toys] + [ModelSpec("toy_small", (("broken", True),))]
    rows = run_benchmark(specs, _settings(backends=("eager", "compile"), batch_sizes=(1, 2)), progress=False,
                         log=lambda msg: None)
    assert len(rows) == 3 * 2 * 2
    assert all(set(RESULT_FIELDS) <= set(r) for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert {(r["label"], r["backend"]) for r in ok} == {("toy_small", "eager"), ("toy_big", "eager")}
    assert all("compiler exploded" in r["error"] for r in failed if r["backend"] == "compile"
               and r["label"] in toys)
    assert all("toy build failure" in r["error"] for r in failed if r["label"] == "toy_small:broken=True")
    for r in ok:
        assert r["median_ms"] > 0 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] and r["n"] == 4
        assert r["throughput_ips"] == pytest.approx(1000 * r["batch_size"] / r["median_ms"])
        width = 4 if r["label"] == "toy_small" else 16
        assert r["gmacs"] * 1e9 == 16 * 16 * width * 27 + width * 1000  # per image, counted
        assert r["params_m"] * 1e6 == pytest.approx(width * 27 + width * 3 + width * 1000 + 1000)
    # A constructor argument that changes the architecture has no published top-1.
    assert all(r["top1"] is None for r in rows if r["label"] == "toy_small:broken=True")


def test_a_backend_failing_while_timed_does_not_stop_the_others(toys, monkeypatch):
    real = runner.prepare_backend

    def dies_later(backend, dtype, *args, **kwargs):
        fn = real("eager", dtype, *args, **kwargs)
        if backend != "compile":
            return fn
        calls = []

        def bad():
            calls.append(1)
            if len(calls) > 2:
                raise RuntimeError("died mid-run")
            return fn()

        return bad

    monkeypatch.setattr(runner, "prepare_backend", dies_later)
    rows = run_benchmark([ModelSpec("toy_small")], _settings(backends=("eager", "compile")), progress=False,
                         log=lambda msg: None)
    by = {r["backend"]: r for r in rows}
    assert by["eager"]["status"] == "ok"
    assert by["compile"]["status"] == "failed" and "died mid-run" in by["compile"]["error"]


def test_cli_writes_table_csv_json_and_chart(toys, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["bench", "--models", "toy_*", "--img-size", "32", "--batch-size", "1", "2", "--iters", "3", "--warmup", "1",
               "--rounds", "1", "--threads", "1", "--device", "cpu", "--backend", "eager", "onnxruntime",
               "--no-memory", "--no-gemm", "--no-progress", "--out", str(out), "--budget-ms", "1000"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "toy_small" in text and "toy_big" in text and "median ms" in text
    assert "budget 1000 ms (32px batch 1): best top-1 70.0% with toy_big in " in text
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == RESULT_FIELDS
        rows = list(reader)
    assert len(rows) == 2 * 2 * 2
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    data = json.loads((out / "results.json").read_text())
    assert {"command", "machine", "settings", "results"} <= set(data)
    assert data["settings"]["backends"] == ["eager", "onnxruntime"] and data["settings"]["threads"] == 1
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["onnxruntime"]
    # The recorded command reproduces the run.
    again = build_parser().parse_args(shlex.split(data["command"])[1:])
    assert again.models == ["toy_*"] and again.batch_size == [1, 2] and again.budget_ms == 1000
    assert again.backend == ["eager", "onnxruntime"] and again.no_memory and again.out == str(out)
    for batch in (1, 2):
        png = out / f"front_32px_b{batch}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Pareto marking in the output agrees with the front computed from the output's own numbers: one front
    # over every (model, runtime, precision) of a batch (all fp32 here, so all held).
    for r in data["results"]:
        grp = [g for g in data["results"] if g["batch_size"] == r["batch_size"]]
        on = pareto_front([g["median_ms"] for g in grp], [g["top1"] for g in grp])
        assert r["pareto"] == on[grp.index(r)]
    # The fastest path of each model is named, with its ratio to eager fp32 from the same paired rounds.
    for (label, batch) in {(r["label"], r["batch_size"]) for r in data["results"]}:
        grp = [g for g in data["results"] if (g["label"], g["batch_size"]) == (label, batch)]
        best = [g for g in grp if g["best_path"]]
        assert len(best) == 1 and best[0]["median_ms"] == min(g["median_ms"] for g in grp)
        assert [g["speedup_vs_eager"] for g in grp if g["backend"] == "eager"] == [1.0]
    assert "fastest held path" in text


def test_cli_rejects_unknown_models(capsys):
    assert main(["bench", "--models", "no_such_model_xyz", "--no-progress", "--no-gemm"]) == 2
    assert "Unknown model" in capsys.readouterr().err


def test_model_spec_parsing():
    s = ModelSpec.parse("nextvit_small:attn=xca,drop_rate=0.1,flag=true")
    assert s.name == "nextvit_small"
    assert s.kwargs == (("attn", "xca"), ("drop_rate", 0.1), ("flag", True))
    assert ModelSpec.parse(s.label) == s
    with pytest.raises(ValueError, match="key=value"):
        ModelSpec.parse("nextvit_small:attn")


def test_default_models_take_the_smallest_of_every_family():
    chosen = specs.default_models()
    fams = registry.list_families()
    names = {s.name for s in chosen}
    assert {registry.get_entry(n).family for n in names} == set(fams)
    for s in chosen:
        if s.kwargs:
            continue
        fam = registry.get_entry(s.name).family
        mine = specs.param_count(s.name)
        assert all(mine <= specs.param_count(n) for n in registry.list_models(family=fam))
    if "nextvit" in fams:
        assert {dict(s.kwargs).get("attn") for s in chosen if s.name == "nextvit_small"} == {"original", "bchw", "xca"}


def test_cpu_peak_memory_includes_the_weights():
    from effivit.bench.memory import measure_cpu_peak

    job = {"spec": "nextvit_small", "img_size": 64, "batch_size": 1, "backend": "eager", "dtype": "fp32",
           "channels_last": False, "fused": True, "threads": 1, "onnx_path": ""}
    peak, note = measure_cpu_peak(job, timeout_s=120)
    assert peak is not None, note
    m = specs.build_model(ModelSpec("nextvit_small"))
    weights_mb = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20
    assert weights_mb <= peak < weights_mb + 1024
    assert not math.isnan(peak)


def test_time_budget_caps_the_timed_calls(toys):
    rows = run_benchmark([ModelSpec("toy_small")], _settings(iters=40, rounds=2, max_time_s=1e-6, min_iters=3),
                         progress=False, log=lambda msg: None)
    assert rows[0]["status"] == "ok" and rows[0]["n"] == 4  # min_iters=3 split over 2 rounds -> 2 x 2
    rows = run_benchmark([ModelSpec("toy_small")], _settings(iters=6, rounds=2, max_time_s=None),
                         progress=False, log=lambda msg: None)
    assert rows[0]["n"] == 6


def test_resolution_sweep_writes_the_latency_vs_size_chart(toys, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["bench", "--resolution-sweep", "--models", "toy_small", "--img-size", "32", "64", "96",
               "--iters", "2", "--warmup", "1", "--rounds", "1", "--threads", "1", "--device", "cpu",
               "--no-memory", "--no-gemm", "--no-progress", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert sorted(r["img_size"] for r in data["results"]) == [32, 64, 96]
    gm = {r["img_size"]: r["gmacs"] for r in data["results"]}
    assert gm[64] == pytest.approx(4 * gm[32] - 3 * 4 * 1000 / 1e9)  # conv scales with pixels, fc does not
    assert (out / "resolution_b1.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("front_*.png"))


def test_paired_gives_fast_callables_longer_rounds():
    import time as _time

    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        _time.sleep(0.004)

    res = paired({"fast": fast, "slow": slow}, rounds=2, iters_per_round=2, warmup=0, min_round_ms=20)
    assert len(res["slow"].samples_ms) >= 4 and len(res["slow"].samples_ms) <= 2 * 6
    assert len(res["fast"].samples_ms) > 100  # microsecond calls: many per 20 ms round
    assert len(res["fast"].round_medians) == 2


@pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not torch.backends.mkldnn.is_available(),
                    reason="this torch build has no oneDNN fused linear kernel")
def test_count_macs_sees_fused_onednn_linear_kernels():
    lin = nn.Linear(16, 24)

    class Fused(nn.Module):
        def forward(self, x):
            y = torch.ops.mkldnn._linear_pointwise(x, lin.weight, lin.bias, "relu", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(y[..., :16], y[..., :24], lin.weight, lin.bias, "add")

    x = torch.randn(2, 5, 16)
    assert count_macs(Fused(), x) == 2 * count_macs(lin, x) == 2 * 2 * 5 * 16 * 24


def test_cli_every_backend_and_dtype_with_skips_and_int8(toys, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "all"
    rc = main(["bench", "--models", "toy_small", "--img-size", "32", "--iters", "2", "--warmup", "1", "--rounds", "1",
               "--threads", "1", "--device", "cpu", "--backend", "all", "--dtype", "all", "--no-memory",
               "--no-gemm", "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    rows = data["results"]
    from effivit.bench.backends import DTYPES, list_backends

    assert data["settings"]["backends"] == list_backends() and data["settings"]["dtypes"] == list(DTYPES)
    assert len(rows) == len(list_backends()) * len(DTYPES)
    assert all({"model", "backend", "dtype", "median_ms"} <= set(r) for r in rows)
    by = {(r["backend"], r["dtype"]): r for r in rows}
    assert by[("eager", "fp32")]["status"] == "ok" and by[("onnxruntime", "int8")]["status"] == "ok"
    assert by[("eager", "int8")]["status"] == "skipped" and "has no int8 path" in by[("eager", "int8")]["error"]
    if not torch.cuda.is_available():
        assert by[("tensorrt", "fp16")]["status"] == "skipped" and "does not run on cpu" in by[("tensorrt", "fp16")]["error"]
    # int8 without --calibration: measured, accuracy unknown, so never the answer.
    int8 = by[("onnxruntime", "int8")]
    assert int8["accuracy"] == "unknown (synthetic calibration)" and not int8["pareto"] and not int8["best_path"]
    assert int8["logit_err"] is not None and int8["logit_err"] < 0.5
    assert by[("onnxruntime", "fp32")]["logit_err"] < 1e-4
    assert "measurement(s) skipped" in text and "fastest held path" in text
    # A calibration folder without images is a clear error.
    (tmp_path / "empty").mkdir()
    rc = main(["bench", "--models", "toy_small", "--img-size", "32", "--iters", "1", "--warmup", "0", "--rounds", "1",
               "--backend", "onnxruntime", "--dtype", "int8", "--calibration", str(tmp_path / "empty"), "--no-memory",
               "--no-gemm", "--no-progress", "--device", "cpu"])
    assert rc == 1
    assert "holds no images" in capsys.readouterr().out
