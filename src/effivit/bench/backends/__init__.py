"""Runtimes the benchmark (and ``effivit search``) time a model in: one small class per runtime.

Every backend has the same interface (:class:`~effivit.bench.backends.base.Backend`): ``prepare`` a fused
model at a precision into a :class:`~effivit.bench.backends.base.Prepared` runtime, call it, ``describe``
it. Adding a runtime means adding one module to this package that defines a ``Backend`` subclass decorated
with :func:`register_backend`; the command line, the runner, the memory probe and the reports read the
registry, nothing else needs editing.

Timing an arbitrary ``nn.Module`` (a block, a layer, a whole model) in a chosen runtime and precision::

    import torch
    from effivit.bench.backends import time_module

    block = MyBlock(64).eval()
    x = torch.randn(1, 64, 14, 14)                       # any input shape the module takes
    t = time_module(block, x, backend="openvino", dtype="bf16", threads=1)
    print(t.median_ms, t.iqr_ms)                          # a effivit.bench.timing.Timing

or, to time several candidates in alternating rounds (fair on a noisy machine)::

    from effivit.bench.backends import Context, prepare
    from effivit.bench.timing import paired

    ctx = Context(threads=1)
    runs = {f"{b}-{d}": prepare(b, block, x, d, ctx) for b, d in
            [("eager", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "bf16")]}
    timings = paired(runs, rounds=5, iters_per_round=10, warmup=5)

The module is fused first (``effivit.deploy.fuse``: a no-op for modules without an inference form) and
must take one tensor and return one tensor (exports of ONNX-based runtimes are verified against it). An
unavailable runtime or precision raises :class:`BackendUnavailable` (its message says why: package not
installed, no CUDA device, precision not offered), which callers report as skipped.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import torch
from torch import nn

from .base import DTYPES, TORCH_DTYPES, Backend, BackendUnavailable, Context, Prepared

_REGISTRY: dict[str, Backend] = {}
# The order backends are listed in (help text, reports): the reference first.
ORDER = ("eager", "compile", "onnxruntime", "openvino", "tensorrt")


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make ``cls`` (a :class:`Backend` with a unique ``name``) selectable everywhere."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    _REGISTRY[cls.name] = cls()
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base",) and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def list_backends() -> list[str]:
    """Every registered backend name, installed or not (reference order, then the rest by name)."""
    known = [n for n in ORDER if n in _REGISTRY]
    return known + sorted(n for n in _REGISTRY if n not in ORDER)


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; allowed: {list_backends()}")
    return _REGISTRY[name]


def available_backends(device: str = "cpu") -> list[str]:
    """Backends that can run on ``device`` here (package installed, device present)."""
    return [n for n in list_backends() if _REGISTRY[n].unavailable(device) is None]


def prepare(backend: str, module: nn.Module, example: torch.Tensor, dtype: str = "fp32",
            ctx: Context | None = None, fuse: bool = True) -> Prepared:
    """``module`` (fused first unless ``fuse=False``) prepared in ``backend`` at ``dtype`` for ``example``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {list(DTYPES)}")
    b = get_backend(backend)
    ctx = ctx or Context()
    b.check(ctx.device, dtype)
    if fuse and not getattr(module, "is_fused", False):
        from ...deploy import fuse as fuse_model

        module = fuse_model(module)
    return b.prepare(module.eval(), example, dtype, ctx)


def time_module(module: nn.Module, example: torch.Tensor, backend: str = "eager", dtype: str = "fp32",
                threads: int | None = None, device: str = "cpu", rounds: int = 5, iters_per_round: int = 10,
                warmup: int = 5, calibration: Any = None, fuse: bool = True):
    """Latency of ``module(example)`` in ``backend`` at ``dtype``: a :class:`~effivit.bench.timing.Timing`.

    calibration: images for int8 (an iterable of NCHW batches; default: a small synthetic set).
    """
    from ..timing import paired

    if threads:
        torch.set_num_threads(threads)
    run = prepare(backend, module, example, dtype, Context(device=device, threads=threads, calibration=calibration),
                  fuse=fuse)
    return paired({"x": run}, rounds=rounds, iters_per_round=iters_per_round, warmup=warmup, device=device)["x"]


_discover()

__all__ = ["DTYPES", "TORCH_DTYPES", "Backend", "BackendUnavailable", "Context", "Prepared", "available_backends",
           "get_backend", "list_backends", "prepare", "register_backend", "time_module"]
