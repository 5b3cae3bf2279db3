"""Peak memory of inference, measured where it can be measured honestly.

* CUDA: ``torch.cuda.max_memory_allocated`` around one forward (weights + activations + workspaces that
  PyTorch's caching allocator hands out; cuDNN/cuBLAS handles are not included).
* CPU: tensors come from malloc, which neither ``tracemalloc`` nor torch's profiler sees reliably, and a
  process that has already run other models keeps freed pages. So the forward runs in a *fresh* process
  (``python -m effivit.bench.memory``): it imports the runtime, notes its resident set (RSS), builds and
  fuses the model and prepares it in the backend (or loads the backend's artifact: ONNX / OpenVINO), resets the kernel's peak-RSS mark
  (``/proc/self/clear_refs``) so building does not count, runs two forwards and reads the peak (``VmHWM``).
  Reported: peak RSS minus the RSS after imports = weights + activations + runtime workspaces of one
  inference. Where the peak mark cannot be reset (not Linux) ``ru_maxrss`` is used and includes building.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

_KB = 1024.0


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            m = re.search(field + r":\s+(\d+)\s+kB", f.read())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / _KB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _KB


def _peak_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / _KB
    import resource

    scale = 1.0 if sys.platform != "darwin" else 1.0 / 1024  # macOS reports bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / _KB


def _child(job: dict[str, Any]) -> dict[str, Any]:
    import importlib
    from pathlib import Path

    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    from .backends import Context, get_backend
    from .specs import ModelSpec, build_model

    backend = get_backend(job["backend"])
    if backend.package:
        importlib.import_module(backend.package)  # imported before the baseline: its code is not the model's cost
    base = _rss_mb()
    spec = ModelSpec.parse(job["spec"])
    x = torch.randn(job["batch_size"], 3, job["img_size"], job["img_size"])
    ctx = Context(threads=job.get("threads"), channels_last=job.get("channels_last", False), key="memory")
    artifact = job.get("artifact") or job.get("onnx_path") or ""
    if artifact and hasattr(backend, "load"):
        prepared = backend.load(Path(artifact), x, job["dtype"], ctx)
    else:
        model = build_model(spec, fused=job["fused"], device="cpu")
        prepared = backend.prepare(model, x, job["dtype"], ctx)
    exact = _reset_peak()
    prepared()
    prepared()
    return {"peak_mb": _peak_mb() - base, "exact": exact}


def measure_cpu_peak(job: dict[str, Any], timeout_s: float = 600.0) -> tuple[float | None, str]:
    """Run ``job`` in a fresh process; (peak MB or None, note)."""
    env = dict(os.environ)
    if job.get("threads"):
        env["OMP_NUM_THREADS"] = str(job["threads"])
    try:
        out = subprocess.run([sys.executable, "-m", "effivit.bench.memory", json.dumps(job)], capture_output=True,
                             text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        return None, f"memory probe timed out after {timeout_s:.0f} s"
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"memory probe failed: {err}"
    res = json.loads(lines[-1])
    return float(res["peak_mb"]), "" if res.get("exact") else "includes model building (peak could not be reset)"


def measure_cuda_peak(fn) -> float:
    """Peak CUDA memory (MB) allocated by torch while ``fn`` runs once, weights included."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
