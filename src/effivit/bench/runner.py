"""The benchmark runner: build each model once, prepare each runtime x precision once, time them, collect rows.

What is timed is one forward call on a fixed input, nothing else: model building, fusing, exports,
quantization, session creation and ``torch.compile``'s compilation all happen in the backend's ``prepare``
(:mod:`effivit.bench.backends`) before the timer starts. All runtimes x precisions of one model at one
size and batch are timed in one :func:`~effivit.bench.timing.paired` call (alternating rounds), so their
ratios are fair on a noisy machine. A runtime that is not installed or has no device is recorded as
skipped with the reason; one that fails is recorded with the error; the run goes on.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backends import DTYPES as ALL_DTYPES
from .backends import BackendUnavailable, Context, Prepared, get_backend, list_backends
from .flops import achieved_gflops, count_macs, count_params
from .pareto import pareto_front
from .specs import ModelSpec, build_model
from .timing import Timing, paired, paired_ratio

# Autocast precisions of :func:`make_forward` (the effivit-vs-timm comparison uses it).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# effivit: our fused model; unfused: ours before deploy.fuse; timm: timm's model in its own fused form.
IMPLS = ("effivit", "unfused", "timm")

# Columns of the CSV and of each JSON result, in order.
RESULT_FIELDS = (
    "model", "label", "impl", "family", "img_size", "batch_size", "backend", "dtype", "device", "fused",
    "channels_last", "status", "error", "median_ms", "q1_ms", "q3_ms", "iqr_ms", "spread_pct", "p10_ms",
    "p90_ms", "mean_ms", "min_ms", "n", "throughput_ips", "params_m", "gmacs", "achieved_gflops", "pct_of_gemm",
    "top1", "top1_img_size", "accuracy", "accuracy_held", "logit_err", "peak_mem_mb", "mem_note", "pareto",
    "best_path", "speedup_vs_eager", "speedup_vs_timm", "fuse_speedup",
)


def backend_names() -> list[str]:
    return list_backends()


@dataclass(frozen=True)
class Settings:
    img_sizes: tuple[int, ...] = (224,)
    batch_sizes: tuple[int, ...] = (1,)
    backends: tuple[str, ...] = ("eager",)
    # Precisions: every backend x dtype pair is a candidate; pairs a backend does not offer are skipped.
    dtypes: tuple[str, ...] = ("fp32",)
    channels_last: bool = False
    threads: int | None = None
    device: str = "cpu"
    warmup: int = 10
    iters: int = 50
    rounds: int = 5
    # Time budget (s) for the timed calls of one model at one size and batch: slow models get fewer calls
    # (never fewer than min_iters). None: always ``iters`` calls.
    max_time_s: float | None = None
    min_iters: int = 10
    # Also time the unfused model / timm's implementation, paired with ours.
    unfused: bool = False
    compare_timm: bool = False
    memory: bool = True
    # Images for int8 calibration (a folder); None: a small synthetic set (accuracy of int8 rows unknown).
    calibration: str | None = None
    calibration_images: int = 64
    # This machine's GEMM rate per precision (GFLOP/s or GOP/s), for the pct_of_gemm column.
    gemm_rates: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        known = list_backends()
        bad = [b for b in self.backends if b not in known]
        if bad or not self.backends:
            raise ValueError(f"unknown backend(s) {bad}; allowed: {known} or 'all'")
        bad = [d for d in self.dtypes if d not in ALL_DTYPES]
        if bad or not self.dtypes:
            raise ValueError(f"unknown dtype(s) {bad}; allowed: {list(ALL_DTYPES)} or 'all'")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}; allowed: 'cpu', 'cuda'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but CUDA is not available here")
        for key in ("img_sizes", "batch_sizes"):
            vals = getattr(self, key)
            if not vals or any(int(v) < 1 for v in vals):
                raise ValueError(f"{key} must be positive integers, got {vals}")
        if self.warmup < 0 or self.iters < 1 or self.rounds < 1:
            raise ValueError(f"warmup >= 0, iters >= 1 and rounds >= 1 are required "
                             f"(got {self.warmup}, {self.iters}, {self.rounds})")
        if self.max_time_s is not None and self.max_time_s < 0:
            raise ValueError(f"max_time_s must be >= 0, got {self.max_time_s}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.calibration is not None and not Path(self.calibration).is_dir():
            raise ValueError(f"calibration={self.calibration!r} is not a folder of images")

    @property
    def dtype(self) -> str:
        """The first precision (what single-precision reports print)."""
        return self.dtypes[0]

    def gemm_rate(self, dtype: str) -> float | None:
        return dict(self.gemm_rates).get(dtype)

    def as_dict(self) -> dict[str, Any]:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        out["gemm_rates"] = dict(self.gemm_rates)
        out["dtype"] = self.dtype
        return out


# --- building and running -----------------------------------------------------------------------------------


def _autocast(dtype: str, device: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=DTYPES[dtype])


def make_forward(model: nn.Module, x: torch.Tensor, dtype: str = "fp32", channels_last: bool = False,
                 device: str = "cpu") -> Callable[[], Any]:
    """One call ``model(x)`` under inference mode and, for fp16/bf16, autocast (what a user gets from a
    model without ``deploy.to_dtype``; the bench's eager backend casts the weights once instead)."""
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def fn() -> Any:
        with torch.inference_mode(), _autocast(dtype, device):
            return model(x)

    return fn


def published_top1(spec: ModelSpec, img_size: int) -> tuple[float | None, int | None]:
    """Published ImageNet-1K top-1 of the model's weights at ``img_size`` if released there, else of its
    default weights (with their resolution). ``None`` for constructor arguments that change the
    architecture away from what was published (e.g. ``attn='xca'``)."""
    from ..registry import get_entry

    entry = get_entry(spec.name)
    params = inspect.signature(entry.builder).parameters
    for k, v in spec.kwargs:
        if k not in params or params[k].default != v:
            return None, None
    tags = [t for t in entry.tags if t.published.top1 is not None]
    if not tags:
        return None, None
    same = [t for t in tags if t.input_size[1] == img_size]
    tag = same[0] if same else tags[0]
    return tag.published.top1, tag.input_size[1]


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


@dataclass
class _Candidate:
    impl: str
    backend: str
    dtype: str
    model: nn.Module | None
    fn: Prepared | Callable[[], Any] | None = None
    error: str = ""
    skipped: bool = False
    timing: Timing | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.impl}/{self.backend}/{self.dtype}"


def prepare_backend(backend: str, dtype: str, model: nn.Module, x: torch.Tensor, ctx: Context) -> Prepared:
    """``model`` (already fused) ready to time in ``backend`` at ``dtype`` on ``x`` (see :mod:`.backends`)."""
    b = get_backend(backend)
    b.check(ctx.device, dtype)
    return b.prepare(model, x, dtype, ctx)


def _warm(c: _Candidate, settings: Settings) -> float:
    """Warm ``c`` up; returns the duration (s) of its last warm-up call (the per-call estimate)."""
    start = time.perf_counter()
    last = 0.0
    for i in range(max(1, settings.warmup)):
        t0 = time.perf_counter()
        c.fn()
        if settings.device == "cuda":
            torch.cuda.synchronize()
        last = time.perf_counter() - t0
        # A slow model gets fewer warm-up calls (at least 2) rather than minutes of them.
        if settings.max_time_s and i >= 1 and time.perf_counter() - start > settings.max_time_s / 4:
            break
    return last


def _time_candidates(cands: list[_Candidate], settings: Settings) -> None:
    ready = []
    per_call = 0.0
    for c in cands:
        if c.fn is None:
            continue
        try:
            per_call += _warm(c, settings)
            ready.append(c)
        except Exception as e:
            c.error, c.fn = f"{c.backend} {c.dtype}: {_short(e)}", None
    if not ready:
        return
    iters = settings.iters
    if settings.max_time_s and per_call > 0:
        # Cap the timed work of this model at about max_time_s, but never below min_iters calls each.
        iters = max(min(settings.iters, settings.min_iters), min(iters, int(settings.max_time_s / per_call)))
    rounds = max(1, min(settings.rounds, iters))
    per_round = max(1, math.ceil(iters / rounds))
    fns = {c.key: c.fn for c in ready}
    try:
        res = paired(fns, rounds=rounds, iters_per_round=per_round, warmup=0, device=settings.device)
        for c in ready:
            c.timing = res[c.key]
        return
    except Exception:
        pass  # one of them fails while running: time each alone so the others still get numbers
    for c in ready:
        try:
            c.timing = paired({"x": c.fn}, rounds=rounds, iters_per_round=per_round, warmup=0,
                              device=settings.device)["x"]
        except Exception as e:
            c.error, c.fn = f"timing: {_short(e)}", None


def _timm_model(spec: ModelSpec, ours: nn.Module) -> nn.Module:
    """timm's implementation of the same model with our weights, in timm's own fused form."""
    import timm
    from timm.utils.model import reparameterize_model

    if spec.kwargs:
        raise RuntimeError(f"timm has no counterpart of {spec.label} (constructor arguments)")
    theirs = timm.create_model(spec.name, pretrained=False).eval()
    missing = _copy_weights(ours, theirs)
    if missing:
        raise RuntimeError(f"could not give timm's {spec.name} our weights: {missing}")
    return reparameterize_model(theirs)


def _copy_weights(ours: nn.Module, theirs: nn.Module) -> str:
    """Load timm's random init into ours (unfused) so both hold the same weights; '' on success."""
    from ..checkpoint import load_checkpoint

    try:
        load_checkpoint(ours, theirs.state_dict())
    except Exception as e:
        return _short(e)
    return ""


def calibration_batches(settings: Settings, spec: ModelSpec, img_size: int) -> list[torch.Tensor] | None:
    """int8 calibration images for ``spec`` at ``img_size`` from ``settings.calibration`` (None: synthetic)."""
    if settings.calibration is None:
        return None
    from ..deploy.precision import calibration_from_folder

    return calibration_from_folder(settings.calibration, spec.name, img_size,
                                   max_images=settings.calibration_images)


def run_benchmark(
    specs: Iterable[ModelSpec],
    settings: Settings,
    progress: bool = True,
    workdir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every spec at every size x batch x backend x dtype; one row (dict with ``RESULT_FIELDS``) each."""
    from tqdm.auto import tqdm

    specs = list(specs)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    impls = [i for i in IMPLS if i == "effivit" or (i == "unfused" and settings.unfused)
             or (i == "timm" and settings.compare_timm)]
    paths = [(b, d) for b in settings.backends for d in settings.dtypes]
    total = len(specs) * len(settings.img_sizes) * len(settings.batch_sizes) * len(paths) * len(impls)
    rows: list[dict[str, Any]] = []
    tmp = tempfile.TemporaryDirectory(prefix="effivit-bench-") if workdir is None else None
    root = Path(workdir) if workdir is not None else Path(tmp.name)
    bar = tqdm(total=total, disable=not progress, unit="run", dynamic_ncols=True, file=sys.stderr)
    try:
        for spec in specs:
            bar.set_postfix_str(spec.label)
            rows += _bench_spec(spec, settings, impls, paths, root, bar, log)
    finally:
        bar.close()
        if tmp is not None:
            tmp.cleanup()
    mark_pareto(rows)
    return rows


def _base_row(spec: ModelSpec, settings: Settings, family: str, impl: str, size: int, batch: int,
              backend: str, dtype: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(RESULT_FIELDS)
    row.update(model=spec.name, label=spec.label, impl=impl, family=family, img_size=size, batch_size=batch,
               backend=backend, dtype=dtype, device=settings.device, fused=impl != "unfused",
               channels_last=settings.channels_last, status="failed", error="", pareto=False, best_path=False)
    return row


def _bench_spec(spec, settings, impls, paths, root, bar, log) -> list[dict[str, Any]]:
    from ..registry import get_entry

    rows: list[dict[str, Any]] = []
    combos = [(s, b) for s in settings.img_sizes for b in settings.batch_sizes]
    n_per_combo = len(paths) * len(impls)
    try:
        family = get_entry(spec.name).family
    except Exception as e:
        err = f"unknown model: {_short(e)}"
        for s, b in combos:
            rows += [dict(_base_row(spec, settings, "", impl, s, b, k, d), error=err) for impl in impls
                     for k, d in paths]
        bar.update(len(combos) * n_per_combo)
        return rows
    models: dict[str, tuple[nn.Module | None, str]] = {}
    try:
        cpu_model = build_model(spec, fused=False)
        params = count_params(cpu_model)
    except Exception as e:
        log(f"{spec.label}: build failed: {_short(e)}")
        cpu_model, params = None, None
        models["effivit"] = (None, f"build: {_short(e)}")
    if cpu_model is not None and "timm" in impls:
        try:
            models["timm"] = (_timm_model(spec, cpu_model), "")
        except Exception as e:
            models["timm"] = (None, f"timm: {_short(e)}")
    if cpu_model is not None:
        try:
            from ..deploy import fuse

            models["effivit"] = (fuse(cpu_model), "")
        except Exception as e:
            models["effivit"] = (None, f"fuse: {_short(e)}")
        if "unfused" in impls:
            models["unfused"] = (cpu_model, "")
    contexts: dict[tuple[str, int], Context] = {}
    for size, batch in combos:
        top1, top1_size = (None, None)
        with contextlib.suppress(Exception):
            top1, top1_size = published_top1(spec, size)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        cands: list[_Candidate] = []
        macs: int | None = None
        calib: Any = None
        for impl in impls:
            model, err = models.get(impl, (None, "not built"))
            if model is not None and impl != "timm":
                try:
                    # Counted on the fused graph (what is timed); the unfused rows show the fused count too.
                    macs = count_macs(model, x[:1]) if macs is None else macs
                except Exception as e:
                    err = f"forward at {size}x{size}: {_short(e)}"
                    model = None
            for backend, dtype in paths:
                c = _Candidate(impl, backend, dtype, model, error=err)
                cands.append(c)
                if model is None:
                    continue
                reason = get_backend(backend).unavailable(settings.device, dtype)
                if reason:
                    c.error, c.skipped = f"skipped: {reason}", True
                    continue
                ctx = contexts.get((impl, size))
                if ctx is None:
                    ctx = contexts[(impl, size)] = Context(
                        device=settings.device, threads=settings.threads, channels_last=settings.channels_last,
                        workdir=root, key=f"{impl}_{spec.label}_{size}")
                if dtype == "int8" and ctx.calibration is None and settings.calibration is not None:
                    try:
                        calib = calib if calib is not None else calibration_batches(settings, spec, size)
                        ctx.calibration = calib
                    except Exception as e:
                        c.error = f"calibration: {_short(e)}"
                        continue
                try:
                    c.fn = prepare_backend(backend, dtype, model, x, ctx)
                except BackendUnavailable as e:
                    c.error, c.skipped = str(e), True
                except Exception as e:
                    c.error = f"{backend} {dtype}: {_short(e)}"
        _time_candidates(cands, settings)
        _logit_errors(cands, models, x)
        refs = {c.impl: c.timing for c in cands if c.backend == "eager" and c.dtype == "fp32" and c.timing}
        for c in cands:
            row = _base_row(spec, settings, family, c.impl, size, batch, c.backend, c.dtype)
            row.update(params_m=None if params is None else params / 1e6, top1=top1, top1_img_size=top1_size,
                       gmacs=None if macs is None else macs / 1e9)
            if c.timing is None:
                row["error"] = c.error or "not run"
                row["status"] = "skipped" if c.skipped else "failed"
                if not c.skipped:
                    log(f"{spec.label} [{c.impl}/{c.backend}/{c.dtype}] {size}px b{batch}: FAILED {row['error']}")
            else:
                t = c.timing
                row.update(status="ok", throughput_ips=t.throughput(batch), **t.summary())
                row["n"] = len(t.samples_ms)
                row.update(c.extra)
                row["accuracy"], row["accuracy_held"] = accuracy_of(family, c.backend, c.dtype,
                                                                    calibrated=settings.calibration is not None)
                if macs is not None:
                    row["achieved_gflops"] = achieved_gflops(macs * batch, t.median_ms)
                    rate = settings.gemm_rate(c.dtype)
                    if rate:
                        row["pct_of_gemm"] = 100.0 * row["achieved_gflops"] / rate
                if c.impl in refs:
                    row["speedup_vs_eager"] = paired_ratio(refs[c.impl], t)
                row["peak_mem_mb"], row["mem_note"] = _memory(spec, c, size, batch, settings)
            rows.append(row)
            bar.update(1)
        # On our rows: how many times faster ours is than the other form (median of per-round ratios).
        ours = {(c.backend, c.dtype): c.timing for c in cands if c.impl == "effivit" and c.timing is not None}
        for other, column in (("timm", "speedup_vs_timm"), ("unfused", "fuse_speedup")):
            theirs = {(c.backend, c.dtype): c.timing for c in cands if c.impl == other and c.timing is not None}
            for row in rows[-len(cands):]:
                k = (row["backend"], row["dtype"])
                if row["impl"] == "effivit" and k in ours and k in theirs:
                    row[column] = paired_ratio(theirs[k], ours[k])
    return rows


def _logit_errors(cands: list[_Candidate], models: dict, x: torch.Tensor) -> None:
    """Each timed candidate's max |logit - fp32 eager logit| / max |fp32 eager logit| on the timed input."""
    refs: dict[str, torch.Tensor] = {}
    for c in cands:
        if c.timing is None or not isinstance(c.fn, Prepared):
            continue
        try:
            if c.impl not in refs:
                with torch.inference_mode():
                    refs[c.impl] = models[c.impl][0](x).float()
            ref = refs[c.impl]
            got = c.fn.run(x)
            c.extra["logit_err"] = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        except Exception:
            c.extra["logit_err"] = None


def accuracy_of(family: str, backend: str, dtype: str, calibrated: bool = True) -> tuple[str, bool | None]:
    """(what is known about this path's accuracy, whether it is held) from the digits study's table
    (``effivit/data/precision_accuracy.csv``, written by ``benchmarks/deploy_accuracy.py``)."""
    if dtype == "fp32":
        return "reference (fp32)", True
    if dtype == "int8" and not calibrated:
        return "unknown (synthetic calibration)", None
    from ..deploy.precision import accuracy_record

    rec = accuracy_record(family, backend, dtype)
    if rec is None:
        return "unknown (not in the digits study)", None
    drop = rec["drop_pts"]
    return (f"{'held' if rec['held'] else 'lost'} (digits study: {drop:+.2f} pts top-1)", bool(rec["held"]))


def _memory(spec, c: _Candidate, size, batch, settings: Settings) -> tuple[float | None, str]:
    if not settings.memory:
        return None, "not measured (--no-memory)"
    if c.backend == "compile":
        return None, "not measured for compile (see eager)"
    try:
        if settings.device == "cuda":
            if c.backend != "eager":
                return None, f"not measured for {c.backend} on CUDA"
            from .memory import measure_cuda_peak

            return measure_cuda_peak(c.fn), "torch.cuda.max_memory_allocated"
        if c.impl != "effivit":
            return None, f"not measured for {c.impl}"
        from .memory import measure_cpu_peak

        artifact = getattr(c.fn, "artifact", None)
        job = {"spec": spec.label, "img_size": size, "batch_size": batch, "backend": c.backend,
               "dtype": c.dtype, "channels_last": settings.channels_last, "fused": c.impl != "unfused",
               "threads": settings.threads or torch.get_num_threads(),
               "artifact": str(artifact) if artifact else ""}
        return measure_cpu_peak(job)
    except Exception as e:
        return None, f"memory: {_short(e)}"


# --- after the run ------------------------------------------------------------------------------------------


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """Mark the answer rows among our fused models at the same size, batch and device:

    * ``pareto``: on the top-1/latency front over every (model, runtime, precision) whose accuracy is held
      (fp32, or a lower precision the digits study found held); the unfused and timm rows are references.
    * ``best_path``: the fastest held (runtime, precision) of each model (what to deploy it with here).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    per_model: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        r["pareto"] = False
        r["best_path"] = False
        if r.get("status") == "ok" and r.get("impl", "effivit") == "effivit" and _held(r):
            key = (r["img_size"], r["batch_size"], r["device"])
            groups.setdefault(key, []).append(r)
            per_model.setdefault((r["label"],) + key, []).append(r)
    for grp in groups.values():
        for r, on in zip(grp, pareto_front([r.get("median_ms") for r in grp], [r.get("top1") for r in grp])):
            r["pareto"] = on
    for grp in per_model.values():
        min(grp, key=lambda r: r["median_ms"])["best_path"] = True


def _held(row: dict[str, Any]) -> bool:
    held = row.get("accuracy_held")
    return row.get("dtype", "fp32") == "fp32" if held is None else bool(held)


def with_settings(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)
