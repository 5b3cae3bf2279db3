"""Loading weights: safetensors, ``weights_only`` torch files, hf-hub ids and state dicts.

Nothing here executes pickled code: ``.pth/.pt/.bin`` files go through ``torch.load(weights_only=True)``.
timm-format checkpoints (which carry the official weights) load directly; a family whose module names
differ from timm's declares a ``checkpoint_filter(state_dict, model)`` (a module-level function named
``checkpoint_filter`` in its family file, referenced from the model class as ``checkpoint_filter``).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

HF_HUB_PREFIX = "hf-hub:"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model."""


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        # Training checkpoints nest the weights; prefer EMA weights like timm does for evaluation.
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} does not contain a state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:10]}")
    out = {}
    for k, v in obj.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _download_from_hub(hub_id: str, revision: str | None = None) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise CheckpointError("loading hf-hub weights needs huggingface_hub (pip install huggingface_hub)") from e
    last_error: Exception | None = None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(hub_id, filename, revision=revision))
        except EntryNotFoundError as e:
            last_error = e
            continue
        except LocalEntryNotFoundError as e:
            last_error = e
            continue
        except Exception as e:  # repository missing, auth, HTTP errors: say which id failed
            last_error = e
            continue
    raise CheckpointError(
        f"could not get weights for hf-hub:{hub_id} (tried model.safetensors and pytorch_model.bin). "
        f"If this machine is offline, the files must already be in the huggingface_hub cache "
        f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}); "
        f"download them on a connected machine (`huggingface-cli download {hub_id}`) or pass a local file. "
        f"Last error: {type(last_error).__name__}: {last_error}"
    )


def load_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read a state dict from a path, an ``hf-hub:org/name[@revision]`` id or a mapping, without pickle."""
    if isinstance(source, Mapping):
        return _unwrap(source, "the given state dict")
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(
            f"checkpoint source must be a path, an 'hf-hub:org/name' id or a state dict, got {type(source).__name__}"
        )
    text = os.fspath(source)
    if text.startswith(HF_HUB_PREFIX):
        hub_id, _, revision = text[len(HF_HUB_PREFIX):].partition("@")
        path = _download_from_hub(hub_id, revision or None)
    else:
        path = Path(text)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path), device="cpu"), str(path))
        except Exception as e:  # header/offset errors surface as several exception types
            raise CheckpointError(f"{path} is not a valid safetensors file: {type(e).__name__}: {e}") from e
    if suffix in _TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"refused to load {path}: it needs pickle code execution, which is not allowed "
                f"(only tensors and plain containers load, torch.load(weights_only=True)). Detail: {e}"
            ) from e
        except Exception as e:  # random or truncated bytes fail in many ways inside the unpickler
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {type(e).__name__}: {e}") from e
        return _unwrap(obj, str(path))
    raise CheckpointError(
        f"unsupported checkpoint file type {suffix!r} for {path}; allowed: .safetensors, "
        + ", ".join(_TORCH_SUFFIXES)
    )


def _filter_for(model: nn.Module):
    return getattr(type(model), "checkpoint_filter", None)


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    strict: bool = True,
    drop_classifier: bool = False,
) -> nn.Module:
    """Load weights into ``model`` and return it.

    ``source``: a ``.safetensors`` file, a ``.pth/.pt/.bin`` file (``weights_only=True``), an
    ``hf-hub:org/name`` id (huggingface_hub, works offline from its cache) or a state dict.
    timm-format checkpoints are accepted; key names are mapped by the family's ``checkpoint_filter``.
    ``drop_classifier`` skips the classifier weights (fine-tuning with a new head).
    Missing, unexpected or mis-shaped keys raise :class:`CheckpointError` listing them (when ``strict``).
    """
    from .models._features import FeatureExtractor

    target = model.model if isinstance(model, FeatureExtractor) else model
    state = load_state_dict(source)
    filt = _filter_for(target)
    if filt is not None:
        state = filt(state, target)
    own = target.state_dict()
    if drop_classifier:
        heads = target.pretrained_cfg.get("classifier", "head.fc")
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads)}
        own_heads = {k for k in own if any(k.startswith(h + ".") for h in heads)}
    else:
        own_heads = set()
    missing = sorted(k for k in own if k not in state and k not in own_heads)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    name = target.pretrained_cfg.get("architecture", type(target).__name__)
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_clip(mismatched)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing keys: {_clip(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_clip(unexpected)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not fit model {name!r} (is it for another model or configuration?): "
            + "; ".join(problems)
        )
    target.load_state_dict(state, strict=False)
    return model


def _clip(items: list[str], n: int = 12) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def save_safetensors(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a model's weights as safetensors (shared storage is cloned so the file is self-contained)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, os.fspath(path))
