"""Latency measurement: one call timed at a time, medians and percentiles, paired alternating rounds.

Why paired: on a shared machine the speed of one process drifts (20% between processes here, 2x for tiny
models), so a number from one run and a number from another run are not comparable. :func:`paired` times
several callables in the *same* process, alternating short rounds (A B C, B C A, C A B, ...), so drift and
ordering hit every candidate alike; :func:`paired_ratio` then takes the median of the per-round ratios.

On CUDA each call is bracketed with CUDA events and the device is synchronised before the clock is read;
on CPU ``time.perf_counter_ns`` is read around each call.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Timing:
    """Per-call latencies (ms) of one callable and their summary.

    ``round_medians`` holds the median of each round of a paired measurement (one entry for :func:`measure`).
    """

    samples_ms: tuple[float, ...]
    round_medians: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise ValueError("Timing needs at least one sample")

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def p10_ms(self) -> float:
        return percentile(self.samples_ms, 10)

    @property
    def p90_ms(self) -> float:
        return percentile(self.samples_ms, 90)

    @property
    def q1_ms(self) -> float:
        return percentile(self.samples_ms, 25)

    @property
    def q3_ms(self) -> float:
        return percentile(self.samples_ms, 75)

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @property
    def spread_pct(self) -> float:
        """Interquartile range relative to the median, in percent (the spread we report)."""
        m = self.median_ms
        return 100.0 * self.iqr_ms / m if m > 0 else math.nan

    def throughput(self, batch_size: int) -> float:
        """Images per second at the median latency."""
        return 1000.0 * batch_size / self.median_ms if self.median_ms > 0 else math.inf

    def summary(self) -> dict[str, float]:
        return {
            "median_ms": self.median_ms, "mean_ms": self.mean_ms, "min_ms": self.min_ms,
            "p10_ms": self.p10_ms, "p90_ms": self.p90_ms, "q1_ms": self.q1_ms, "q3_ms": self.q3_ms,
            "iqr_ms": self.iqr_ms, "spread_pct": self.spread_pct, "n": float(len(self.samples_ms)),
        }

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms (IQR {self.q1_ms:.3f}-{self.q3_ms:.3f}, n={len(self.samples_ms)})"


def _check_counts(**counts: int) -> None:
    for k, v in counts.items():
        if not isinstance(v, int) or v < (0 if k == "warmup" else 1):
            allowed = ">= 0" if k == "warmup" else ">= 1"
            raise ValueError(f"{k} must be an int {allowed}, got {v!r}")


def _resolve_device(device: str | torch.device | None) -> str:
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    return kind


def _time_calls(fn: Callable[[], Any], n: int, device: str) -> list[float]:
    """Time ``n`` calls of ``fn``, one at a time, in milliseconds."""
    if device == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def warm_up(fn: Callable[[], Any], warmup: int, device: str | torch.device | None = None) -> None:
    kind = _resolve_device(device)
    for _ in range(warmup):
        fn()
    if kind == "cuda":
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], Any], warmup: int = 10, iters: int = 50, device: str | torch.device | None = None
) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then time ``iters`` calls one by one."""
    _check_counts(warmup=warmup, iters=iters)
    kind = _resolve_device(device)
    warm_up(fn, warmup, kind)
    samples = _time_calls(fn, iters, kind)
    return Timing(tuple(samples), (statistics.median(samples),))


def measure_for(
    fn: Callable[[], Any], min_time_s: float = 1.0, warmup: int = 3, min_iters: int = 5, max_iters: int = 1000,
    device: str | torch.device | None = None,
) -> Timing:
    """Time calls until ``min_time_s`` of timed work (at least ``min_iters``, at most ``max_iters`` calls)."""
    _check_counts(warmup=warmup, min_iters=min_iters, max_iters=max_iters)
    kind = _resolve_device(device)
    warm_up(fn, warmup, kind)
    samples: list[float] = []
    while len(samples) < max_iters and (len(samples) < min_iters or sum(samples) < 1000 * min_time_s):
        samples += _time_calls(fn, 1, kind)
    return Timing(tuple(samples), (statistics.median(samples),))


def paired(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int = 5,
    iters_per_round: int = 10,
    warmup: int = 5,
    device: str | torch.device | None = None,
    min_round_ms: float = 0.0,
) -> dict[str, Timing]:
    """Time several callables in one process, alternating rounds so drift hits each of them alike.

    Every callable is warmed up first (``warmup`` calls). Then ``rounds`` rounds are run; in each round
    every callable is timed for ``iters_per_round`` consecutive calls, and the order of the callables is
    rotated from round to round (so none always runs first, right after another one's cache pollution).

    min_round_ms: a callable faster than that gets more calls per round, so that one round of it lasts
    at least this long (estimated from one timed call after warm-up): a round of a 2 ms model is otherwise
    shorter than one time slice of a busy scheduler, and one preemption decides its median.
    """
    if not fns:
        raise ValueError("paired() needs at least one callable")
    _check_counts(rounds=rounds, iters_per_round=iters_per_round, warmup=warmup)
    if min_round_ms < 0:
        raise ValueError(f"min_round_ms must be >= 0, got {min_round_ms}")
    kind = _resolve_device(device)
    names = list(fns)
    per_round = dict.fromkeys(names, iters_per_round)
    for n in names:
        warm_up(fns[n], warmup, kind)
        if min_round_ms > 0:
            est = max(_time_calls(fns[n], 1, kind)[0], 1e-3)
            per_round[n] = max(iters_per_round, math.ceil(min_round_ms / est))
    samples: dict[str, list[float]] = {n: [] for n in names}
    medians: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            got = _time_calls(fns[n], per_round[n], kind)
            samples[n] += got
            medians[n].append(statistics.median(got))
    return {n: Timing(tuple(samples[n]), tuple(medians[n])) for n in names}


def paired_ratio(slow: Timing, fast: Timing) -> float:
    """How many times faster ``fast`` is than ``slow``: the median over rounds of the per-round ratios.

    With timings from one :func:`paired` call the rounds line up, so each ratio compares two
    measurements taken moments apart; otherwise the ratio of the medians is returned.
    """
    a, b = slow.round_medians, fast.round_medians
    if len(a) == len(b) and len(a) > 1:
        return statistics.median(x / y for x, y in zip(a, b) if y > 0)
    return slow.median_ms / fast.median_ms


def geomean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return math.nan
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


# --- the hardware limit -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmRate:
    """This machine's fp32 GEMM rate (GFLOP/s) with PyTorch and with ONNX Runtime, measured now."""

    n: int
    torch_gflops: float
    ort_gflops: float | None
    threads: int

    @property
    def best_gflops(self) -> float:
        return max(self.torch_gflops, self.ort_gflops or 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "torch_gflops": self.torch_gflops, "ort_gflops": self.ort_gflops,
                "best_gflops": self.best_gflops, "threads": self.threads}


def _ort_matmul_session(n: int, threads: int | None):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = torch.Generator().manual_seed(0)
    b = torch.randn(n, n, generator=rng).numpy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])],
        "gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
        initializer=[numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)  # readable by older onnxruntime releases too
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def gemm_rate(n: int = 1024, rounds: int = 3, iters_per_round: int = 5, warmup: int = 3,
              threads: int | None = None, with_onnxruntime: bool = True) -> GemmRate:
    """Measure fp32 ``n x n @ n x n`` GEMM GFLOP/s on the CPU with torch and with ONNX Runtime (paired).

    The better of the two is the practical ceiling a model's achieved GFLOP/s (2 x MACs / latency) is
    compared with. ONNX Runtime is skipped (``ort_gflops=None``) when it is not installed.
    """
    if n < 16:
        raise ValueError(f"n must be >= 16, got {n}")
    threads = threads or torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    fns: dict[str, Callable[[], Any]] = {"torch": lambda: torch.mm(a, b)}
    if with_onnxruntime:
        try:
            sess = _ort_matmul_session(n, threads)
            feed = {"A": a.numpy()}
            fns["onnxruntime"] = lambda: sess.run(None, feed)
        except ImportError:
            pass
    t = paired(fns, rounds=rounds, iters_per_round=iters_per_round, warmup=warmup)
    flops = 2.0 * n ** 3

    def rate(name: str) -> float:
        # The best round median: the ceiling is what the machine can do, not its average under load.
        return flops / (min(t[name].round_medians) * 1e-3) / 1e9

    return GemmRate(n=n, torch_gflops=rate("torch"),
                    ort_gflops=rate("onnxruntime") if "onnxruntime" in t else None, threads=threads)


def _ort_int8_matmul_session(n: int, threads: int | None):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = torch.Generator().manual_seed(0)
    b = torch.randint(-127, 128, (n, n), generator=rng, dtype=torch.int8).numpy()
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["C"])],
        "gemm_int8",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.INT32, [n, n])],
        initializer=[numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def gemm_rates(dtypes: Sequence[str] = ("fp32", "bf16", "int8"), n: int = 1024, rounds: int = 3,
               iters_per_round: int = 5, warmup: int = 3, threads: int | None = None) -> dict[str, dict[str, Any]]:
    """This CPU's GEMM rate per precision, measured now in one paired call: the ceiling each precision's
    achieved rate (2 x MACs / latency, GFLOP/s or GOP/s) is compared with.

    fp32: the better of torch (``torch.mm``) and ONNX Runtime (``MatMul``); bf16: ``torch.mm`` on bf16
    (oneDNN's AVX-512-bf16/AMX kernels where the CPU has them); int8: ONNX Runtime's ``MatMulInteger``
    (u8 x s8 -> s32, VNNI where the CPU has it). A precision whose library is missing is left out.
    """
    threads = threads or torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    fns: dict[str, Callable[[], Any]] = {}
    if "fp32" in dtypes:
        fns["fp32/torch"] = lambda: torch.mm(a, b)
        try:
            sess = _ort_matmul_session(n, threads)
            feed = {"A": a.numpy()}
            fns["fp32/onnxruntime"] = lambda: sess.run(None, feed)
        except ImportError:
            pass
    if "bf16" in dtypes:
        ab, bb = a.bfloat16(), b.bfloat16()
        fns["bf16/torch"] = lambda: torch.mm(ab, bb)
    if "fp16" in dtypes and torch.cuda.is_available() is False:
        pass  # no fp16 GEMM worth a ceiling on CPU
    if "int8" in dtypes:
        try:
            sess8 = _ort_int8_matmul_session(n, threads)
            feed8 = {"A": torch.randint(0, 256, (n, n), generator=gen, dtype=torch.uint8).numpy()}
            fns["int8/onnxruntime"] = lambda: sess8.run(None, feed8)
        except ImportError:
            pass
    if not fns:
        return {}
    t = paired(fns, rounds=rounds, iters_per_round=iters_per_round, warmup=warmup)
    flops = 2.0 * n ** 3
    out: dict[str, dict[str, Any]] = {}
    for key, timing in t.items():
        dtype, lib = key.split("/")
        rate = flops / (min(timing.round_medians) * 1e-3) / 1e9
        if dtype not in out or rate > out[dtype]["rate"]:
            out[dtype] = {"rate": rate, "library": lib, "n": n, "threads": threads}
    return out
