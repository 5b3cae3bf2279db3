"""Latency of modules in one runtime and precision: the one place the search measures anything.

Everything the search times (latency-table entries, whole networks for ``--predict`` and the report) goes
through :func:`prepare` and :func:`time_prepared`. Runtimes are :mod:`effivit.bench.backends` (one class
per runtime: ``eager``, ``onnxruntime``, ``openvino``, ``compile``, ...; precisions ``fp32``, ``bf16``,
``fp16``, ``int8`` where the backend offers them), so the search measures in exactly the form ``effivit
bench`` does. For the ONNX-reading runtimes the module is exported with the tracing exporter (a fraction of
a second per block, against several seconds for torch.export with verification; the table has hundreds
of blocks), and the same exporter serves whole networks, so blocks and networks are the same graphs.

Timing is :func:`effivit.bench.timing.paired` (alternating rounds in one process, so drift on a shared
machine hits every module alike); a sample is a burst of consecutive calls lasting ``sample_ms`` (see
:func:`time_prepared` for why), read on the wall clock or, with ``clock="cpu"``, on this thread's CPU-time
clock. Measurements run on the CPU.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bench.timing import Timing, paired

CLOCKS = ("wall", "cpu")
_keys = itertools.count()


def runtimes() -> list[str]:
    """Every runtime ``effivit.bench.backends`` registers (installed or not)."""
    from ..bench.backends import list_backends

    return list_backends()


def precisions() -> tuple[str, ...]:
    from ..bench.backends import DTYPES

    return DTYPES


@dataclass(frozen=True)
class MeasureSettings:
    """How latencies are measured: runtime, precision, threads, batch size and the paired-timing counts."""

    runtime: str = "eager"
    precision: str = "fp32"
    threads: int | None = None  # None: torch's current number of threads
    batch_size: int = 1
    rounds: int = 5
    iters: int = 3  # timed samples per round
    warmup: int = 3
    sample_ms: float = 10.0  # one timed sample: a burst of calls lasting at least this long
    clock: str = "wall"  # or "cpu": this thread's CPU time (one thread; immune to other processes' load)

    @property
    def label(self) -> str:
        return (f"{self.runtime} {self.precision}, {self.resolved_threads} thread(s), batch {self.batch_size}, "
                f"{self.clock} clock")

    def __post_init__(self) -> None:
        from ..bench.backends import get_backend

        backend = get_backend(self.runtime)  # a clear error for unknown names
        reason = backend.unavailable("cpu", self.precision)
        if reason:
            raise ValueError(f"runtime {self.runtime} at {self.precision} cannot run here: {reason}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock {self.clock!r} is not supported; allowed: {list(CLOCKS)}")
        if self.clock == "cpu" and self.resolved_threads != 1:
            raise ValueError("clock='cpu' measures one thread's CPU time: it needs threads=1 "
                             f"(got {self.resolved_threads})")
        if self.batch_size < 1 or self.rounds < 1 or self.iters < 1 or self.warmup < 0 or self.sample_ms < 0:
            raise ValueError(f"batch_size, rounds and iters must be >= 1, warmup and sample_ms >= 0, got {self}")

    @property
    def resolved_threads(self) -> int:
        return self.threads or torch.get_num_threads()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["threads"] = self.resolved_threads
        return d


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _onnx_file(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    # The tracing exporter: a fraction of a second per block; the same for blocks and whole networks.
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example[:1],), str(path), dynamo=False, input_names=["input"],
                          output_names=["output"], opset_version=17, do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def prepare(module: nn.Module, example: torch.Tensor, settings: MeasureSettings,
            workdir: str | os.PathLike | None = None) -> Callable[[], Any]:
    """A ready-to-time call of ``module(example)`` (eval mode, already in its deploy form) in the settings'
    runtime and precision, through :func:`effivit.bench.backends.prepare`."""
    from ..bench.backends import BackendUnavailable, Context
    from ..bench.backends import prepare as backend_prepare

    module = module.eval()
    ctx = Context(threads=settings.resolved_threads, workdir=Path(workdir) if workdir is not None else None,
                  key=f"op{next(_keys)}")
    # ONNX-reading backends share the context's fp32 export: give them the tracing export (see above).
    ctx.cached("onnx:fp32", lambda: _onnx_file(module, example, ctx.path(".fp32.onnx")))
    try:
        with torch_threads(settings.resolved_threads):
            return backend_prepare(settings.runtime, module, example, settings.precision, ctx, fuse=False)
    except BackendUnavailable as e:
        raise ValueError(str(e)) from None


def time_prepared(fns: Mapping[str, Callable[[], Any]], settings: MeasureSettings) -> dict[str, Timing]:
    """Per-call latency (ms) of ready calls: paired rounds (:func:`effivit.bench.timing.paired` alternates
    the calls) whose every sample times a burst of consecutive calls lasting at least ``sample_ms``.

    Why bursts: on a CPU shared with other processes a call is now and then descheduled for milliseconds.
    The median of single calls skips those stalls for a 0.05 ms block but not for a 5 ms network (every
    one of its calls meets some), so sums of single-call medians under-predict networks on a busy
    machine. Bursts of one length give every module the same exposure; on a quiet machine a sample is
    simply the mean of a warm burst.

    ``clock="cpu"`` reads this thread's CPU time instead of the wall clock (one thread only): the time
    the work itself took, without the time other processes held the CPU. On a machine shared with other
    jobs it is the latency the same machine would show when idle, and it does not drift with their load.
    """
    clock = time.perf_counter_ns if settings.clock == "wall" else time.thread_time_ns
    with torch_threads(settings.resolved_threads):
        bursts: dict[str, Callable[[], Any]] = {}
        calls: dict[str, int] = {}
        samples: dict[str, list[float]] = {}
        for name, fn in fns.items():
            for _ in range(settings.warmup):
                fn()
            t0 = clock()
            fn()
            est_ms = max((clock() - t0) / 1e6, 1e-4)
            calls[name] = n = max(1, math.ceil(settings.sample_ms / est_ms))
            samples[name] = []
            bursts[name] = _burst(fn, n, clock, samples[name])
        paired(bursts, rounds=settings.rounds, iters_per_round=settings.iters, warmup=1)
    if settings.clock == "cpu":
        _check_cpu_clock(fns, settings)
    out = {}
    for name, got in samples.items():
        got = got[1:]  # the first burst was paired's warm-up
        per_round = [statistics.median(got[r * settings.iters:(r + 1) * settings.iters]) for r in range(settings.rounds)]
        out[name] = Timing(tuple(got), tuple(per_round))
    return out


def _check_cpu_clock(fns: Mapping[str, Callable[[], Any]], settings: MeasureSettings) -> None:
    """The CPU clock sees only work done on the calling thread: refuse a runtime that computes elsewhere."""
    fn = next(iter(fns.values()))
    c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
    for _ in range(3):
        fn()
    cpu, wall = time.thread_time_ns() - c0, time.perf_counter_ns() - w0
    if wall > 1e6 and cpu < 0.02 * wall:
        raise ValueError(f"{settings.runtime} computes outside the calling thread here (CPU time {cpu / 1e6:.2f} ms "
                         f"of {wall / 1e6:.2f} ms): use clock='wall' (--clock wall)")


def _burst(fn: Callable[[], Any], n: int, clock: Callable[[], int], record: list[float]) -> Callable[[], None]:
    def run() -> None:
        t0 = clock()
        for _ in range(n):
            fn()
        record.append((clock() - t0) / 1e6 / n)

    return run


def measure_modules(modules: Mapping[str, tuple[nn.Module, torch.Tensor]], settings: MeasureSettings,
                    workdir: str | os.PathLike | None = None) -> dict[str, Timing]:
    """Prepare every ``(module, example)`` and time them together (one paired call)."""
    with tempfile.TemporaryDirectory(prefix="effivit-search-", dir=workdir) as tmp, \
            torch_threads(settings.resolved_threads):
        fns = {k: prepare(m, x, settings, tmp) for k, (m, x) in modules.items()}
        return time_prepared(fns, settings)


class NullOp(nn.Module):
    """The cheapest call a runtime can make (one ReLU on one number): its latency is the per-call overhead
    (Python dispatch, session.run, input copy) that every isolated measurement pays once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


def null_example(batch_size: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, 1, 1, 1)
