"""The runtime interface: one small class per runtime (prepare from a fused model, run, describe).

A :class:`Backend` turns a *fused* fp32 ``nn.Module`` and an example input into a :class:`Prepared`
runtime at one precision: everything slow (export, compilation, quantization, session creation, a first
call) happens in :meth:`Backend.prepare`; :meth:`Prepared.__call__` is the one call that is timed (the
bound example input, output left in the runtime's own form), :meth:`Prepared.run` maps any input to a
torch tensor (for accuracy checks). Backends that cannot run here (package missing, no CUDA device,
precision not offered) raise :class:`BackendUnavailable` with the reason, never a crash deep inside.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

# Precisions a bench row or an export can ask for.
DTYPES = ("fp32", "fp16", "bf16", "int8")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class BackendUnavailable(RuntimeError):
    """This backend (or this precision of it) cannot run here; the message says why. Reported as skipped."""


@dataclass
class Prepared:
    """A runtime ready to time: ``prepared()`` runs the bound example input once.

    fn: the timed call (no conversions: the input is already in the runtime's form).
    run: any NCHW fp32 tensor -> fp32 torch tensor of logits (for accuracy checks; not timed).
    details: what was built (runtime version, precision actually used, quantization recipe, artifact ...).
    artifact: the file the runtime reads (ONNX / OpenVINO IR), when there is one.
    """

    backend: str
    dtype: str
    fn: Callable[[], Any]
    run: Callable[[torch.Tensor], torch.Tensor]
    details: dict[str, Any] = field(default_factory=dict)
    artifact: Path | None = None

    def __call__(self) -> Any:
        return self.fn()

    def describe(self) -> dict[str, Any]:
        return dict(backend=self.backend, dtype=self.dtype, artifact=str(self.artifact) if self.artifact else None,
                    **self.details)


@dataclass
class Context:
    """What a backend may need besides the model: where it runs and where it writes.

    calibration: images for int8 (an iterable of NCHW fp32 batches); None means a small synthetic set
    (random normal images: the latency is representative, the accuracy of such rows is unknown).
    workdir: where exports go (a temporary folder that lives as long as the context when None).
    key: a name for the artifacts (model label, size), so one export is shared by several precisions.
    """

    device: str = "cpu"
    threads: int | None = None
    channels_last: bool = False
    calibration: Iterable[torch.Tensor] | None = None
    workdir: Path | None = None
    key: str = "model"
    _tmp: Any = field(default=None, repr=False)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def path(self, suffix: str) -> Path:
        """A file path for an artifact named after ``key`` (the folder is created)."""
        if self.workdir is None:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="effivit-backend-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.key)
        return self.workdir / f"{safe}{suffix}"

    def cached(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per context (e.g. the verified fp32 ONNX file all ONNX-reading backends share)."""
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]


class Backend:
    """One runtime. Subclasses set ``name``, ``dtypes`` (precisions offered), ``devices``, and implement
    :meth:`prepare`; :meth:`unavailable` says why it cannot run here (``None``: it can)."""

    name: ClassVar[str] = ""
    dtypes: ClassVar[tuple[str, ...]] = ("fp32",)
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    # The Python package the backend needs (checked by unavailable()); "" for none beyond torch.
    package: ClassVar[str] = ""
    install_hint: ClassVar[str] = ""

    def unavailable(self, device: str = "cpu", dtype: str | None = None) -> str | None:
        """Why this backend cannot run on ``device`` (at ``dtype``) here, or ``None`` if it can."""
        if device not in self.devices:
            return f"{self.name} does not run on {device} (runs on: {', '.join(self.devices)})"
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        if dtype is not None and dtype not in self.dtypes:
            return f"{self.name} has no {dtype} path (offers: {', '.join(self.dtypes)})"
        if self.package and not _importable(self.package):
            hint = f" ({self.install_hint})" if self.install_hint else ""
            return f"{self.package} is not installed{hint}"
        return None

    def check(self, device: str, dtype: str) -> None:
        reason = self.unavailable(device, dtype)
        if reason:
            raise BackendUnavailable(f"{self.name} {dtype}: skipped: {reason}")

    def prepare(self, model: nn.Module, example: torch.Tensor, dtype: str = "fp32",
                ctx: Context | None = None) -> Prepared:
        raise NotImplementedError

    def version(self) -> str | None:
        if not self.package:
            return torch.__version__
        try:
            return getattr(__import__(self.package), "__version__", None)
        except Exception:
            return None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "dtypes": list(self.dtypes), "devices": list(self.devices),
                "package": self.package or "torch", "version": self.version(), "available": self.unavailable() is None,
                "why_not": self.unavailable()}


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def quiet() -> contextlib.AbstractContextManager:
    """Exporters print progress on stdout; keep stdout for result tables."""
    return contextlib.redirect_stdout(io.StringIO())


def numpy_input(x: torch.Tensor):
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


def env_threads(threads: int | None) -> int:
    return threads or torch.get_num_threads() or os.cpu_count() or 1
