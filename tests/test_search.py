"""effivit.search: the latency table on a tiny space, the supernet (its paths are exactly the extracted
networks), Gumbel-Softmax sampling and annealing, slimming on synthetic alphas, and the command end to end.

No timing thresholds: latencies are only checked to be measured, stored and summed as documented.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import replace

import pytest
import torch
from conftest import assert_close

from effivit.models.efficientformer_custom import EfficientFormerArch, StageArch
from effivit.search.latency import (
    LatencyTable,
    TableError,
    arch_keys,
    build_table,
    smallest_latency,
    space_keys,
)
from effivit.search.measure import MeasureSettings
from effivit.search.slimming import (
    BudgetError,
    actions,
    importance,
    initial_subnet,
    mes,
    slim,
)
from effivit.search.space import SPACES, Subnet, random_subnet
from effivit.search.supernet import Supernet, extract_subnet, holdout_split, temperature

TINY = SPACES["tiny"]  # widths 16/32/32/32 (step 16), depths 1/1/2/2, 32 px, MB3D in stages 3-4
FAST = MeasureSettings(runtime="eager", threads=1, rounds=1, iters=1, warmup=0, sample_ms=0.0)


# ---- the space ----------------------------------------------------------------------------------------
def test_space_points_and_errors():
    sub = Subnet((16, 32, 16, 32), (("4d",), ("4d",), ("id", "3d"), ("4d", "3d")))
    arch = TINY.arch_of(sub)
    assert arch.describe() == "16:4d*1 | 32:4d*1 | 16:3d*1 | 32:4d*1,3d*1"
    with pytest.raises(ValueError, match="MB3D blocks must end the stage"):
        TINY.arch_of(Subnet((16, 32, 16, 32), (("4d",), ("4d",), ("3d", "4d"), ("4d", "4d"))))
    with pytest.raises(ValueError, match="every MetaPath is an identity"):
        TINY.arch_of(Subnet((16, 32, 16, 32), (("4d",), ("4d",), ("id", "id"), ("4d", "4d"))))
    with pytest.raises(ValueError, match=r"choices \['3d'\] not allowed here"):
        TINY.arch_of(Subnet((16, 32, 16, 32), (("3d",), ("4d",), ("4d", "4d"), ("4d", "4d"))))
    with pytest.raises(ValueError, match="width 48 is not in the space"):
        TINY.arch_of(Subnet((16, 48, 16, 32), (("4d",), ("4d",), ("4d", "4d"), ("4d", "4d"))))
    rng = random.Random(0)
    for _ in range(20):
        TINY.check(random_subnet(TINY, rng))  # random points are valid points


# ---- the latency table --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def table(tmp_path_factory) -> LatencyTable:
    path = tmp_path_factory.mktemp("table") / "table.json"
    return build_table(TINY, FAST, num_classes=10, path=path)


def test_table_builder_on_a_tiny_space(table, tmp_path):
    assert table.complete and set(table.entries) == set(space_keys(TINY))
    assert all(e["ms"] > 0 for e in table.entries.values()) and table.overhead_ms > 0
    # Every kind of op is in the table: stem, downsamplings, both blocks, the layout switches, both heads.
    kinds = {k.split("/")[0] for k in table.entries}
    assert kinds == {"stem", "down", "mb4d", "mb3d", "flat", "tomaps", "head4d", "head3d"}
    assert len([k for k in table.entries if k.startswith("down/")]) == 1 * 2 + 2 * 2 + 2 * 2
    # The file records the machine, runtime, precision and the space, and reads back to the same predictor.
    path = table.save(tmp_path / "t.json")
    d = json.loads(path.read_text())
    assert d["format"] == "effivit-latency-table" and d["version"] == 1 and d["complete"]
    assert d["settings"]["runtime"] == "eager" and d["settings"]["precision"] == "fp32"
    assert d["machine"]["cpu"] and d["space"]["max_widths"] == [16, 32, 32, 32]
    assert len(d["calibration"]["networks"]) == 4 and d["calibration"]["scale"] > 0
    back = LatencyTable.load(path)
    arch = TINY.arch_of(random_subnet(TINY, random.Random(3)))
    assert back.predict(arch) == pytest.approx(table.predict(arch))
    # prediction = overhead + scale * sum over the network's ops (each less the per-call overhead)
    keys = arch_keys(arch)
    expected = table.overhead_ms + table.scale * sum(max(0.0, table.entries[k]["ms"] - table.overhead_ms)
                                                     for k in keys)
    assert table.predict(arch) == pytest.approx(expected)
    assert keys[0] == "stem/16@32" and keys[-1].startswith("head")


def test_table_refuses_what_it_cannot_predict(table, tmp_path):
    other = replace(TINY, img_size=64)
    assert "image size" in table.mismatch(other, FAST, 10)
    assert "runtime" in table.mismatch(TINY, replace(FAST, runtime="onnxruntime"), 10)
    assert "classes" in table.mismatch(TINY, FAST, 5)
    assert table.mismatch(TINY, FAST, 10) == ""
    wide = EfficientFormerArch(stages=tuple(StageArch(w, ("4d",)) for w in (16, 32, 32, 64)), img_size=32,
                               **TINY.hparams())
    with pytest.raises(TableError, match="stage 3: width 64 is not in the space"):
        table.predict(wide)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(TableError, match="not a latency table"):
        LatencyTable.load(tmp_path / "bad.json")


def test_table_resumes_and_onnxruntime_entries(tmp_path):
    pytest.importorskip("onnxruntime")
    ort = replace(FAST, runtime="onnxruntime")
    keys = ["mb4d/32@4", "mb3d/32@2", "head3d/32@1"]
    path = tmp_path / "ort.json"
    part = build_table(TINY, ort, 10, path, keys=keys[:2])
    assert set(part.entries) == set(keys[:2]) and not part.complete
    first = dict(part.entries)
    more = build_table(TINY, ort, 10, path, keys=keys)  # resumes: measures only the missing key
    assert set(more.entries) == set(keys) and all(more.entries[k] == first[k] for k in keys[:2])


def test_runtimes_come_from_the_bench_backends(tmp_path):
    with pytest.raises(ValueError, match="eager at int8 cannot run here"):
        MeasureSettings(runtime="eager", precision="int8")
    with pytest.raises(ValueError, match="unknown backend 'coreml'"):
        MeasureSettings(runtime="coreml")
    with pytest.raises(ValueError, match="clock='cpu' .* needs threads=1"):
        MeasureSettings(clock="cpu", threads=2)
    pytest.importorskip("openvino")
    ov = replace(FAST, runtime="openvino")
    t = build_table(TINY, ov, 10, tmp_path / "ov.json", keys=["mb3d/32@1"])
    assert t.entries["mb3d/32@1"]["ms"] > 0 and t.settings.runtime == "openvino"


def test_smallest_latency_is_one_block_per_stage_at_min_width(table):
    ms, arch = smallest_latency(table, mb3d_stages=())
    assert arch.widths == (16, 16, 16, 16) and arch.depths == (1, 1, 1, 1)
    assert ms == pytest.approx(table.predict(arch))
    floor, _ = smallest_latency(table)
    assert floor <= ms


# ---- the supernet -------------------------------------------------------------------------------------
def _lively(net: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial norms, layer scales and biases, and O(1) logits, so exactness checks mean something."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
        for name, p in net.named_parameters():
            if name.endswith(("gamma", "attention_biases")) or (p.dim() == 1 and "norm" in name):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.startswith("head") and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return net


def test_every_supernet_path_is_exactly_the_extracted_network():
    torch.manual_seed(0)
    net = _lively(Supernet(TINY, num_classes=5))
    rng = random.Random(0)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    subnets = [random_subnet(TINY, rng) for _ in range(8)] + [TINY.largest()]
    assert any(s.widths != TINY.max_widths for s in subnets)  # narrower stages: masks vs sliced tensors
    for sub in subnets:
        model = extract_subnet(net, sub)
        net.set_subnet(sub)
        for train in (False, True):  # running statistics, and batch statistics of the active channels
            net.train(train)
            model.train(train)
            with torch.no_grad():
                a, b = net(x), model(x)
            assert a.abs().max() > 0.1
            assert_close(a, b, 1e-5 * float(a.abs().max()), f"{sub.key()} train={train}")


def test_gumbel_sampling_follows_alpha_and_gates_are_straight_through():
    net = Supernet(TINY, num_classes=5)
    mp = net.stages[2].paths[0]  # choices (4d, 3d, id)
    target = torch.tensor([0.6, 0.3, 0.1])
    with torch.no_grad():
        mp.alpha.copy_(target.log())
    gen = torch.Generator().manual_seed(0)
    counts = dict.fromkeys(mp.kinds, 0)
    n = 3000
    for _ in range(n):
        sub, _ = net.sample(gen, tau=1.0)
        counts[sub.choices[2][0]] += 1
    # Gumbel-max: argmax(alpha + g) picks choice k with probability softmax(alpha)_k.
    for k, p in zip(mp.kinds, target.tolist()):
        assert abs(counts[k] / n - p) < 4 * math.sqrt(p * (1 - p) / n), counts
    # The same generator seed draws the same path and widths (every process of a torchrun draws alike).
    a = net.sample(torch.Generator().manual_seed(7), 2.0)
    b = net.sample(torch.Generator().manual_seed(7), 2.0)
    assert a[0] == b[0] and all(torch.equal(x, y) for sx, sy in zip(a[1], b[1]) for x, y in zip(sx, sy))
    # Widths are sampled too, full width with the given probability.
    fulls = sum(net.sample(gen, 1.0, full_width_prob=1.0)[0].widths == TINY.max_widths for _ in range(20))
    assert fulls == 20
    # The gate is 1 in value (outputs equal the fixed path's) and carries the gradient of p(choice) to alpha.
    sub, noise = net.sample(torch.Generator().manual_seed(1), 0.7)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    net.set_subnet(sub)
    with torch.no_grad():
        fixed = net(x)
    net.set_subnet(sub, noise, tau=0.7)
    out = net(x)
    assert_close(out.detach(), fixed, 1e-6, "gated vs fixed path")
    out.square().sum().backward()
    grads = [p.grad for p in net.arch_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) > 0 for g in grads) == len(grads)  # every MetaPath's alpha learns


def test_temperature_annealing():
    assert temperature(0.0, 5.0, 0.5) == pytest.approx(5.0)
    assert temperature(1.0, 5.0, 0.5) == pytest.approx(0.5)
    assert temperature(0.5, 5.0, 0.5) == pytest.approx(math.sqrt(5.0 * 0.5))  # exponential: geometric mean
    taus = [temperature(t / 10, 5.0, 0.5) for t in range(11)]
    assert all(a > b for a, b in zip(taus, taus[1:]))
    assert temperature(2.0, 5.0, 0.5) == pytest.approx(0.5)  # clamped


def test_holdout_split_is_stratified_and_disjoint():
    targets = [c for c in range(5) for _ in range(10)] + [5]  # class 5 has a single image
    train, held = holdout_split(targets, 0.2, seed=0)
    assert not set(train) & set(held) and sorted(train + held) == list(range(len(targets)))
    assert [sum(targets[i] == c for i in held) for c in range(6)] == [2, 2, 2, 2, 2, 0]
    assert holdout_split(targets, 0.2, seed=0) == (train, held)


# ---- slimming on synthetic alphas -----------------------------------------------------------------------
def _probs(*stages):
    keys3 = ("4d", "3d", "id")
    return [[dict(zip(keys3 if len(p) == 3 else ("4d", "id"), p)) for p in stage] for stage in stages]


# stage 1: one MP; stage 2: one MP; stages 3-4: two MPs each (tiny space)
PROBS = _probs(
    [(0.9, 0.1)],                        # importance 9
    [(0.8, 0.2)],                        # 4
    [(0.6, 0.1, 0.3), (0.2, 0.7, 0.1)],  # 7/3 = 2.33, 9
    [(0.5, 0.1, 0.4), (0.1, 0.6, 0.3)],  # 1.5, 2.33
)


def test_importance_and_start():
    imp = importance(PROBS)
    assert imp[0] == [pytest.approx(9.0)] and imp[1] == [pytest.approx(4.0)]
    assert imp[2] == [pytest.approx(0.7 / 0.3), pytest.approx(9.0)]
    assert imp[3] == [pytest.approx(0.6 / 0.4), pytest.approx(0.7 / 0.3)]
    start = initial_subnet(TINY, PROBS)
    # maps then tokens, the most probable split: stage 3 [4d, 3d] (0.6 * 0.7), stage 4 [4d, 3d] (0.5 * 0.6)
    assert start == Subnet(TINY.max_widths, (("4d",), ("4d",), ("4d", "3d"), ("4d", "3d")))


def test_actions_are_the_documented_three():
    start = initial_subnet(TINY, PROBS)
    acts = {a.kind: a for a in actions(TINY, start, importance(PROBS))}
    assert set(acts) == {"drop", "to4d", "narrow"}
    # (1) the least important MetaPath (stage 4, first, importance 1.5) becomes an identity
    assert acts["drop"].stage == 3 and acts["drop"].index == 0
    assert acts["drop"].subnet.choices[3] == ("id", "3d")
    # (2) the first MB3D of a stage becomes MB4D (one candidate per stage with MB3D blocks)
    to4d = [a for a in actions(TINY, start, importance(PROBS)) if a.kind == "to4d"]
    assert [(a.stage, a.index) for a in to4d] == [(2, 1), (3, 1)]
    # (3) the least important stage wider than the minimum loses 16 channels: stage sums are
    # 9, 4, 11.33, 3.83 -> stage 4 (32 -> 16)
    assert acts["narrow"].stage == 3 and acts["narrow"].subnet.widths == (16, 32, 32, 16)
    # A stage keeps one block; at the minimum width a stage is not narrowed.
    lean = Subnet((16, 16, 16, 16), (("4d",), ("4d",), ("id", "4d"), ("4d", "id")))
    assert actions(TINY, lean, importance(PROBS)) == []


def _fake_latency(arch: EfficientFormerArch) -> float:
    # 1 ms per block and 1 ms per 16 channels; MB3D blocks cost 2 ms more
    return float(sum(s.depth + 2 * s.num_3d + s.width / 16 for s in arch.stages))


@pytest.mark.parametrize("best", ["drop", "to4d", "narrow"])
def test_slimming_takes_the_smallest_drop_per_ms(best):
    start = initial_subnet(TINY, PROBS)
    imp = importance(PROBS)
    cands = {a.kind: a.subnet for a in actions(TINY, start, imp)}
    # savings from the start (13 blocks-ms): drop the stage-4 MB4D: 1 ms; to4d: 2 ms; narrow: 1 ms.
    drops = {"drop": 2.0, "to4d": 2.0, "narrow": 2.0}
    drops[best] = 0.5
    acc = {start.key(): 90.0} | {s.key(): 90.0 - drops[k] for k, s in cands.items()}

    def evaluate(sub: Subnet) -> float:
        return acc.get(sub.key(), 50.0)

    budget = _fake_latency(TINY.arch_of(start)) - 0.5  # one action is enough
    rows = slim(TINY, PROBS, _fake_latency, evaluate, budget, smallest_ms=8.0, num_classes=10, log=lambda m: None)
    assert [r["action"] for r in rows] == ["start", best]
    assert rows[-1]["subnet"] == cands[best].to_dict()
    scores = {c["action"]: c["score"] for c in rows[-1]["candidates"]}
    gains = {"drop": 1.0, "to4d": 2.0, "narrow": 1.0}
    assert scores == {k: pytest.approx(drops[k] / gains[k]) for k in gains}


def test_slimming_runs_to_the_budget_and_resumes(tmp_path):
    state = tmp_path / "slim.json"
    calls = []

    def evaluate(sub: Subnet) -> float:  # more blocks and channels: higher accuracy
        calls.append(sub.key())
        arch = TINY.arch_of(sub)
        return 50.0 + sum(s.depth + s.width / 16 for s in arch.stages)

    rows = slim(TINY, PROBS, _fake_latency, evaluate, 9.0, 8.0, state_path=state, num_classes=10, log=lambda m: None)
    lat = [r["pred_ms"] for r in rows]
    assert lat[-1] <= 9.0 < lat[-2] and all(a > b for a, b in zip(lat, lat[1:]))
    assert rows[0]["action"] == "start" and all(r["action"] in ("drop", "to4d", "narrow") for r in rows[1:])
    # Resuming a finished run evaluates nothing and returns the same steps.
    n = len(calls)
    again = slim(TINY, PROBS, _fake_latency, evaluate, 9.0, 8.0, state_path=state, num_classes=10,
                 log=lambda m: None)
    assert again == json.loads(json.dumps(rows)) and len(calls) == n


def test_impossible_budget_names_the_smallest_latency():
    with pytest.raises(BudgetError, match=r"below the smallest latency .* \(4\.000 ms"):
        slim(TINY, PROBS, _fake_latency, lambda s: 0.0, 3.0, smallest_ms=4.0, log=lambda m: None)


def test_mes_objective():
    # EfficientFormerV2's score: 100 * (params/1M)^-0.5 * (latency/1ms)^-0.5
    assert mes(1.0, 1.0) == pytest.approx(100.0)
    assert mes(4.0, 1.0) == pytest.approx(50.0) and mes(1.0, 4.0) == pytest.approx(50.0)
    start = initial_subnet(TINY, PROBS)

    def evaluate(sub: Subnet) -> float:
        return 80.0

    rows = slim(TINY, PROBS, _fake_latency, evaluate, _fake_latency(TINY.arch_of(start)) - 0.5, 8.0,
                objective="mes", num_classes=10, log=lambda m: None)
    cands = rows[-1]["candidates"]
    # gains are MES differences (not ms) and all drops are 0, so the largest MES gain breaks the tie
    assert all(c["gain"] == pytest.approx(c["gain"]) and c["drop"] == 0 for c in cands)
    best = max(cands, key=lambda c: c["gain"])
    assert rows[-1]["action"] == best["action"] and rows[-1]["mes"] > rows[0]["mes"]


# ---- the command ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    pytest.importorskip("torchvision")
    pytest.importorskip("sklearn")
    from effivit.train.digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root, size=32, max_per_class=3)
    return root


def test_search_command_end_to_end(digits, tmp_path, capsys):
    from effivit.cli import main

    out = tmp_path / "search"
    common = ["search", "--data", str(digits), "--out", str(out), "--space", "tiny", "--epochs", "1",
              "--batch-size", "10", "--workers", "0", "--threads", "1", "--sample-ms", "1", "--rounds", "1",
              "--holdout", "0.34", "--calib-images", "10", "--scale", "0.8", "1", "--hflip", "0",
              "--randaugment", "0", "0", "--no-progress"]
    # At 32 px the ops take microseconds: a table measured from single calls can come out flat (the largest
    # network predicted no slower than the smallest), leaving no budget between them. Measure again then.
    for attempt in range(3):
        assert main([*common, "--stop-after", "table", *(["--rebuild-table"] if attempt else [])]) == 0
        table = LatencyTable.load(out / "latency_table.json")
        floor, _ = smallest_latency(table)
        start_ms = table.predict(TINY.arch_of(TINY.largest()))
        if start_ms > 1.2 * floor:
            break
    assert start_ms > 1.2 * floor, f"three latency tables could not tell the largest network ({start_ms:.4f} " \
        f"ms) from the smallest ({floor:.4f} ms)"
    # An impossible budget: one line naming the smallest latency, exit 2, before any training.
    assert main([*common, "--budget-ms", f"{floor / 2:.6f}"]) == 2
    err = capsys.readouterr().err
    assert "below the smallest latency" in err and f"{floor:.3f}" in err and "Traceback" not in err
    assert not (out / "supernet").exists()
    # A budget between the smallest and the start: slimming takes steps.
    budget = floor + 0.5 * (start_ms - floor)
    assert main([*common, "--budget-ms", f"{budget:.6f}"]) == 0
    printed = capsys.readouterr().out
    folder = next(out.glob("budget-*ms"))
    report = (folder / "report.md").read_text()
    assert "effivit train --model efficientformer_custom --model-arg arch=" in report and "measured" in report
    steps = json.loads((folder / "slimming.json").read_text())["steps"]
    assert steps[-1]["pred_ms"] <= budget and steps[0]["action"] == "start"
    assert all(a["pred_ms"] > b["pred_ms"] for a, b in zip(steps, steps[1:]))
    assert "search done" in printed
    # The architecture builds like any model, and the supernet's weights load into it as `effivit train
    # --pretrained` loads them (strict, classifier included).
    from effivit.train.loop import build_model

    arch_file = folder / "arch.json"
    model = build_model("efficientformer_custom", 10, {"arch": str(arch_file)},
                        pretrained=str(folder / "supernet_weights.pt"))
    weights = torch.load(folder / "supernet_weights.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert model.arch == EfficientFormerArch.load(arch_file)
    # Phases resume: the same command again trains nothing and slims nothing new.
    mtime = (out / "supernet" / "last.pt").stat().st_mtime_ns
    assert main([*common, "--budget-ms", f"{budget:.6f}"]) == 0
    assert (out / "supernet" / "last.pt").stat().st_mtime_ns == mtime
    assert "resumed after step" in capsys.readouterr().out
    # --predict: predicted and measured latency of an architecture file.
    assert main(["search", "--predict", str(arch_file), "--table", str(out / "latency_table.json"), "-v"]) == 0
    text = capsys.readouterr().out
    assert "predicted" in text and "measured" in text and "stem/" in text


def test_torchrun_trains_the_supernet_on_two_processes(digits, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "ddp"
    common = ["--data", str(digits), "--out", str(out), "--space", "tiny", "--epochs", "1", "--batch-size", "10",
              "--workers", "0", "--threads", "1", "--sample-ms", "0", "--rounds", "1", "--holdout", "0.34",
              "--calib-images", "10", "--scale", "0.8", "1", "--hflip", "0", "--randaugment", "0", "0",
              "--no-progress", "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "effivit",
                "search"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # No table yet: N training processes must not measure latency; the error says how to build it first.
    res = subprocess.run([*torchrun, *common, "--budget-ms", "100"], capture_output=True, text=True, env=env)
    assert res.returncode != 0 and "--stop-after table" in res.stderr + res.stdout
    assert subprocess.run([sys.executable, "-m", "effivit", "search", *common, "--stop-after", "table"],
                          env=env).returncode == 0
    res = subprocess.run([*torchrun, *common, "--budget-ms", "100"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = torch.load(out / "supernet" / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2  # both processes' random streams are saved
    assert (out / "budget-100ms" / "arch.json").is_file() and res.stdout.count("search done") == 1  # rank 0 slims
