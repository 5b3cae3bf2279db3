"""Training checkpoints: written atomically, readable with ``torch.load(weights_only=True)``.

A checkpoint is a dict of plain values (tensors, dicts, lists, tuples, str, numbers, bools, None):
``model`` (the state dict, so ``effivit.load_checkpoint`` and ``create_model(pretrained=path)`` read it),
``optimizer``, ``scheduler``, ``ema`` (an ``AveragedModel`` state dict), ``scaler``, ``rng`` (per process:
torch, CUDA, numpy and Python states, each a tensor), ``epoch`` (last completed, 0-based), ``global_step``,
``classes``, ``config`` and ``best``. :func:`check_plain` rejects anything else before writing, so a file
never needs pickle code to load.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "effivit-train-checkpoint"
VERSION = 1
_PLAIN = (str, int, float, bool, type(None))


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` naming the first value ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN) or isinstance(obj, torch.Size):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; only str/int keys are stored")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold only tensors and plain values")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of writes a killed process never finished (``save_atomic``'s
    ``.<name>.*.tmp`` and the metrics log's ``*.tmp``); the files they were replacing are intact."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(".tmp")
             and (p.name.startswith(".") or p.name.startswith("metrics."))]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_atomic(obj: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A run killed while writing leaves the previous checkpoint intact (rename is atomic on POSIX and NTFS).
    """
    check_plain(obj)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(obj), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint without executing pickle code; a clear error for other files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an effivit training checkpoint (no format={FORMAT!r}); "
                         f"to start from its weights use --pretrained instead of --resume")
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written by a newer effivit (checkpoint version {ckpt['version']} > {VERSION})")
    return ckpt


# ---- RNG states as tensors -------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states, every one a tensor (numpy/Python states are integer tensors)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.tensor([int(v) for v in np_state[1]] + [int(np_state[2]), int(np_state[3])],
                              dtype=torch.int64),
        "numpy_gauss": torch.tensor([float(np_state[4])], dtype=torch.float64),
        "python": torch.tensor([py_version, *py_internal], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if py_gauss is None else py_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_vals = state["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(np_vals[:-2], dtype=np.uint32), np_vals[-2], np_vals[-1],
                         float(state["numpy_gauss"][0])))
    py = state["python"].tolist()
    gauss = float(state["python_gauss"][0])
    random.setstate((py[0], tuple(py[1:]), None if gauss != gauss else gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict with paths as strings and tuples kept, ready for :func:`check_plain`."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        elif isinstance(v, Mapping):
            v = plain_config(v)
        out[k] = v
    return out
