"""effivit against timm, side by side in one process: same weights, our fused form vs timm's best form.

For each model: timm's model is built with random weights, the same weights are loaded into ours
(``load_checkpoint``), ours is fused with ``deploy.fuse`` and timm's with its own
``timm.utils.model.reparameterize_model`` (which calls the ``fuse``/``reparameterize`` methods timm has).
Both are checked to give the same logits, then every runtime of both implementations is timed in one
:func:`~effivit.bench.timing.paired` call (alternating rounds), and the speed ratio is the median of the
per-round ratios. ONNX models are exported (and verified) once per model before timing starts.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .flops import achieved_gflops, count_macs
from .runner import _short, make_forward
from .timing import Timing, paired, paired_ratio, percentile


@dataclass(frozen=True)
class Runtime:
    name: str
    backend: str  # eager | onnxruntime | compile
    dtype: str  # fp32 | bf16 | fp16 (autocast)


RUNTIMES = {
    "eager-fp32": Runtime("eager-fp32", "eager", "fp32"),
    "eager-bf16": Runtime("eager-bf16", "eager", "bf16"),
    "onnxruntime-fp32": Runtime("onnxruntime-fp32", "onnxruntime", "fp32"),
    "compile-fp32": Runtime("compile-fp32", "compile", "fp32"),
}


def build_pair(name: str, seed: int = 0) -> tuple[nn.Module, nn.Module, float]:
    """(our fused model, timm's reparameterized model, max |logit difference| / max |logit|) with the same
    weights, at the model's native input size."""
    import timm
    from timm.utils.model import reparameterize_model

    from ..checkpoint import load_checkpoint
    from ..deploy import fuse
    from ..factory import create_model

    torch.manual_seed(seed)
    theirs = timm.create_model(name, pretrained=False).eval()
    ours = create_model(name).eval()
    load_checkpoint(ours, theirs.state_dict())
    ours = fuse(ours)
    theirs = reparameterize_model(theirs)
    size = _native_size(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        ref = theirs(x)
        # Relative to the largest logit: randomly initialised heads give logits of very different scales.
        diff = float((ours(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    return ours, theirs, diff


def _native_size(name: str) -> int:
    from ..registry import get_entry

    return int(get_entry(name).pretrained_cfg()["input_size"][-1])


def _export(model: nn.Module, path: Path, size: int, threads: int | None):
    from ..deploy import export_onnx
    from ..deploy.formats import onnx_session

    with contextlib.redirect_stdout(io.StringIO()):
        export_onnx(model, path, img_size=size, dynamic_batch=True)
    return onnx_session(path, threads=threads)


def _forward(model: nn.Module, sess: Any, rt: Runtime, x: torch.Tensor) -> Callable[[], Any]:
    if getattr(model, "is_fused", False) and rt.backend != "onnxruntime":
        from ..deploy import optimize

        model = optimize(model, "cpu")  # ours as effivit runs it on a CPU (timm's model has no such pass)
    if rt.backend == "onnxruntime":
        feed = {sess.get_inputs()[0].name: x.numpy()}
        return lambda: sess.run(None, feed)
    if rt.backend == "compile":
        fn = make_forward(torch.compile(model, dynamic=False), x, rt.dtype)
        fn()
        return fn
    return make_forward(model, x, rt.dtype)


def round_ratios(slow: Timing, fast: Timing) -> list[float]:
    return [a / b for a, b in zip(slow.round_medians, fast.round_medians) if b > 0]


def compare_models(
    names: Sequence[str],
    runtimes: Sequence[str] = ("eager-fp32", "eager-bf16", "onnxruntime-fp32"),
    batch_sizes: Sequence[int] = (1, 8),
    img_size: int = 224,
    rounds: int = 7,
    iters_per_round: int = 5,
    warmup: int = 5,
    threads: int | None = None,
    workdir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    min_round_ms: float = 100.0,
) -> list[dict[str, Any]]:
    """One row per model x batch x runtime with both latencies and the paired ratio (timm / ours)."""
    import tempfile

    log = log or (lambda m: print(m, file=sys.stderr))
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        raise ValueError(f"unknown runtime(s) {bad}; allowed: {list(RUNTIMES)}")
    if threads:
        torch.set_num_threads(threads)
    rts = [RUNTIMES[r] for r in runtimes]
    rows: list[dict[str, Any]] = []
    tmp = tempfile.TemporaryDirectory(prefix="effivit-compare-") if workdir is None else None
    root = Path(workdir) if workdir is not None else Path(tmp.name)
    try:
        for name in names:
            rows += _compare_one(name, rts, batch_sizes, img_size, rounds, iters_per_round, warmup, threads, root,
                                 log, min_round_ms)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows


def _row(name: str, rt: Runtime, batch: int, img_size: int) -> dict[str, Any]:
    return {"model": name, "runtime": rt.name, "backend": rt.backend, "dtype": rt.dtype, "batch_size": batch,
            "img_size": img_size, "status": "failed", "error": "", "ours_ms": None, "timm_ms": None,
            "ours_iqr_ms": None, "timm_iqr_ms": None, "speedup": None, "speedup_q1": None, "speedup_q3": None,
            "gmacs": None, "ours_gflops": None, "timm_gflops": None, "max_logit_diff": None}


def _compare_one(name, rts, batch_sizes, img_size, rounds, iters_per_round, warmup, threads, root, log,
                 min_round_ms):
    rows = []
    log(f"[{name}] building effivit and timm models with the same weights")
    try:
        ours, theirs, diff = build_pair(name)
    except Exception as e:
        log(f"[{name}] failed: {_short(e)}")
        return [dict(_row(name, rt, b, img_size), error=f"build: {_short(e)}") for b in batch_sizes for rt in rts]
    sessions: dict[str, Any] = {}
    errors: dict[str, str] = {}
    if any(rt.backend == "onnxruntime" for rt in rts):
        for impl, model in (("ours", ours), ("timm", theirs)):
            log(f"[{name}] exporting {impl} to ONNX (verified)")
            try:
                sessions[impl] = _export(model, root / f"{name}_{impl}_{img_size}.onnx", img_size, threads)
            except Exception as e:
                errors[impl] = f"onnx export ({impl}): {_short(e)}"
    try:
        macs = count_macs(ours, torch.randn(1, 3, img_size, img_size))
    except Exception:
        macs = None
    for batch in batch_sizes:
        x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
        fns: dict[str, Callable[[], Any]] = {}
        fail: dict[str, str] = {}
        for rt in rts:
            for impl, model in (("ours", ours), ("timm", theirs)):
                key = f"{impl}/{rt.name}"
                if rt.backend == "onnxruntime" and impl not in sessions:
                    fail[rt.name] = errors.get(impl, "onnx session missing")
                    continue
                try:
                    fns[key] = _forward(model, sessions.get(impl), rt, x)
                    fns[key]()  # fails here rather than inside the timed rounds
                except Exception as e:
                    fail[rt.name] = f"{impl}: {_short(e)}"
        for rt_name in fail:
            fns.pop(f"ours/{rt_name}", None)
            fns.pop(f"timm/{rt_name}", None)
        log(f"[{name}] timing batch {batch}: {len(fns) // 2} runtime(s) x 2 implementations, paired")
        res = paired(fns, rounds=rounds, iters_per_round=iters_per_round, warmup=warmup,
                     min_round_ms=min_round_ms) if fns else {}
        for rt in rts:
            row = _row(name, rt, batch, img_size)
            row["max_logit_diff"] = diff
            row["gmacs"] = None if macs is None else macs / 1e9
            if rt.name in fail:
                row["error"] = fail[rt.name]
            else:
                o, t = res[f"ours/{rt.name}"], res[f"timm/{rt.name}"]
                rr = round_ratios(t, o)
                row.update(status="ok", ours_ms=o.median_ms, timm_ms=t.median_ms, ours_iqr_ms=o.iqr_ms,
                           timm_iqr_ms=t.iqr_ms, speedup=paired_ratio(t, o), speedup_q1=percentile(rr, 25),
                           speedup_q3=percentile(rr, 75))
                if macs is not None:
                    row["ours_gflops"] = achieved_gflops(macs * batch, o.median_ms)
                    row["timm_gflops"] = achieved_gflops(macs * batch, t.median_ms)
            rows.append(row)
    return rows


def geomean_speedup(rows: Sequence[dict[str, Any]]) -> float | None:
    vals = [r["speedup"] for r in rows if r.get("status") == "ok" and r.get("speedup")]
    if not vals:
        return None
    return statistics.geometric_mean(vals)
