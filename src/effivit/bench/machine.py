"""What a measurement was taken on: results are per machine, so every report carries this."""

from __future__ import annotations

import os
import platform
import re
from typing import Any

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except Exception:
        return None
    return getattr(m, "__version__", None)


def _cpu_count() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Host, CPU, cores, threads, library versions and (for CUDA) the GPU."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_cores_available": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "timm": _version("timm"),
        "effivit": _version("effivit"),
        "device": device,
    }
    try:
        with open("/proc/loadavg", encoding="utf-8") as f:
            info["load_average_1m"] = float(f.read().split()[0])
    except (OSError, ValueError):
        info["load_average_1m"] = None
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_memory_gb"] = round(p.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line for a report header."""
    dev = info.get("gpu") if info.get("device") == "cuda" else info.get("cpu")
    dev = re.sub(r"\s+", " ", str(dev))
    parts = [f"{info.get('device', 'cpu')}: {dev}", f"{info.get('cpu_cores_available')} cores available",
             f"{info.get('torch_threads')} torch threads", f"torch {info.get('torch')}"]
    if info.get("onnxruntime"):
        parts.append(f"onnxruntime {info['onnxruntime']}")
    if info.get("load_average_1m") is not None:
        parts.append(f"load avg {info['load_average_1m']:.1f}")
    return ", ".join(parts)
