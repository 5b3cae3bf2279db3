"""Loading weights: safetensors, ``weights_only`` torch files, hf-hub ids and state dicts.

Nothing here executes pickled code: ``.pth/.pt/.bin`` files go through ``torch.load(weights_only=True)``.
timm-format checkpoints (which carry the official weights) load directly; a family whose module names
differ from timm's declares a ``checkpoint_filter(state_dict, model)`` (a module-level function named
``checkpoint_filter`` in its family file, referenced from the model class as ``checkpoint_filter``).
"""

from __future__ import annotations

import logging
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


_log = logging.getLogger("effivit")


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model."""


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        # Training checkpoints nest the weights; prefer EMA weights like timm does for evaluation. (Official
        # Hiera files nest them under "model_state".)
        for key in ("state_dict_ema", "model_ema", "state_dict", "model", "model_state"):
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


def _download_from_hub(hub_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise CheckpointError("loading hf-hub weights needs huggingface_hub (pip install huggingface_hub)") from e
    last_error: Exception | None = None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(hub_id, filename, revision=revision, cache_dir=cache_dir))
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


def load_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor],
                    cache_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
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
        path = _download_from_hub(hub_id, revision or None, cache_dir)
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


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    heads = getattr(model, "pretrained_cfg", {}).get("classifier", "head.fc")
    return (heads,) if isinstance(heads, str) else tuple(heads)


def _head_prefixes(classifiers: tuple[str, ...]) -> tuple[str, ...]:
    # The module a classifier sits in (LeViT's ``head`` holds ``bn`` + ``linear``): its keys go away with the
    # classifier when a model is built without one (num_classes=0).
    return tuple(c.rsplit(".", 1)[0] + "." if "." in c else c + "." for c in classifiers)


def checkpoint_num_classes(state: Mapping[str, torch.Tensor], model: nn.Module) -> int | None:
    """The number of classes of the checkpoint's first classifier (None if it has none)."""
    for name in _classifier_names(model):
        for suffix in (".weight", ".linear.weight", ".fc.weight"):
            w = state.get(name + suffix)
            if w is not None and w.dim() >= 1:
                return int(w.shape[0])
    return None


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    strict: bool = True,
    drop_classifier: bool = False,
    adapt_classifier: bool = False,
    adapt_input_channels: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Load weights into ``model`` and return it.

    ``source``: a ``.safetensors`` file, a ``.pth/.pt/.bin`` file (``weights_only=True``), an
    ``hf-hub:org/name`` id (huggingface_hub, works offline from its cache) or a state dict.
    timm-format checkpoints are accepted; key names are mapped by the family's ``checkpoint_filter``.

    Classifier weights (the ``classifier`` entries of the model's ``pretrained_cfg``):

    - by default they load like every other weight (a mismatch is an error);
    - ``adapt_classifier=True`` (what ``create_model(..., pretrained=...)`` uses) loads them whenever the
      checkpoint has as many classes as the model, and otherwise keeps the model's new head, logging the
      dropped keys on the ``effivit`` logger;
    - ``drop_classifier=True`` always keeps the model's head.

    ``adapt_input_channels=True`` (what ``create_model(..., pretrained=..., in_chans=N)`` uses) loads RGB
    weights into a model built for another number of input channels: every convolution that reads the image
    (a checkpoint weight with 3 input channels where the model's has N) gets :func:`adapt_input_conv`.

    Missing, unexpected or mis-shaped keys raise :class:`CheckpointError` listing them (when ``strict``).
    Nothing is copied until everything has been checked and converted to the model's dtypes and devices, so a
    load that fails leaves the model untouched. A model built on the meta device gets the checkpoint's
    tensors assigned (``load_state_dict(assign=True)``).
    """
    from .models._features import FeatureExtractor, FeatureList

    state = load_state_dict(source, cache_dir)
    if isinstance(model, FeatureList):
        target = model.checked_source_model()
        state = model.to_model_keys(state)  # timm's FeatureListNet keys (stem_0.weight) -> the model's
    elif isinstance(model, FeatureExtractor):
        target = model.model
        state = model.to_model_keys(state)  # timm's FeatureGetterNet keys (model.*) -> the model's
    else:
        target = model
    filt = _filter_for(target)
    if filt is not None:
        state = filt(state, target)
    own = target.state_dict()
    name = target.pretrained_cfg.get("architecture", type(target).__name__)
    if adapt_input_channels:
        state = _adapt_input_convs(state, own, name)
    classifiers = _classifier_names(target)
    own_heads: set[str] = set()
    own_heads: set[str] = set()
    own_classifier = {k for k in own if k.startswith(tuple(c + "." for c in classifiers))}
    if adapt_classifier and not drop_classifier:
        ckpt_classes = checkpoint_num_classes(state, target)
        model_classes = getattr(target, "num_classes", None)
        if ckpt_classes is None and own_classifier:
            _log.warning("%s: the checkpoint has no classifier: keeping the model's new one", name)
            own_heads = own_classifier
        elif ckpt_classes is not None and ckpt_classes != model_classes:
            # Classifier weights, and weights of the head modules that the model's head no longer has or has
            # in another shape (LeViT's head BatchNorm with num_classes=0), have no place in this model.
            prefixes = _head_prefixes(classifiers)
            dropped = sorted(k for k in state if k.startswith(prefixes) and (
                k not in own or own[k].shape != state[k].shape or k.startswith(tuple(c + "." for c in classifiers))))
            _log.warning(
                "%s: the checkpoint has %d classes and the model %d: keeping the model's new classifier, "
                "dropping %d checkpoint keys: %s", name, ckpt_classes, model_classes, len(dropped), _clip(dropped))
            drop = set(dropped)
            state = {k: v for k, v in state.items() if k not in drop}
            own_heads = own_classifier
    elif drop_classifier:
        state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in classifiers)}
        own_heads = own_classifier
    missing = sorted(k for k in own if k not in state and k not in own_heads)
    unexpected = sorted(k for k in state if k not in own)
    if isinstance(model, (FeatureExtractor, FeatureList)) and unexpected:
        # A feature extractor has been pruned (later stages, final norm, head): those weights have no place.
        _log.info("%s: %d checkpoint keys belong to parts a features_only model pruned: %s", name,
                  len(unexpected), _clip(unexpected))
        state = {k: v for k, v in state.items() if k in own}
        unexpected = []
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
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
    on_meta = any(t.is_meta for t in own.values())
    # Convert everything first (the step that can fail: dtype, device, memory); then copy, which cannot.
    lossy = sorted(f"{k}: {state[k].dtype} -> {own[k].dtype}" for k in state if k in own and (
        (state[k].is_complex() and not own[k].is_complex())
        or (state[k].is_floating_point() and not (own[k].is_floating_point() or own[k].is_complex()))))
    if lossy:
        raise CheckpointError(f"could not convert the checkpoint's tensors for model {name!r} without losing "
                              f"values: {_clip(lossy)}")
    try:
        prepared = {}
        for k, v in state.items():
            if k not in own:
                continue
            ref = own[k]
            if on_meta:
                dtype = ref.dtype if ref.is_floating_point() and v.is_floating_point() else v.dtype
                prepared[k] = v.to(dtype=dtype)
            else:
                prepared[k] = v.to(device=ref.device, dtype=ref.dtype)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"could not convert the checkpoint's tensors for model {name!r}: {e}") from e
    target.load_state_dict(prepared, strict=False, assign=on_meta)
    return model


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB filters ``(out, 3, ...)`` for an ``in_chans``-channel input (timm's convention, so weights agree).

    One channel: the three filters summed (a grey image then gives what the RGB model gives for that image
    in all three channels). More channels: the RGB filters repeated over the new channels and scaled by
    ``3 / in_chans`` (the response's scale is kept; exact for multiples of 3 channels holding the same image).
    """
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if weight.dim() < 3 or weight.shape[1] != 3:
        raise ValueError(f"expected a convolution weight with 3 input channels, got shape {tuple(weight.shape)}")
    work = weight.float()
    if in_chans == 1:
        work = work.sum(dim=1, keepdim=True)
    else:
        reps = (in_chans + 2) // 3
        work = work.repeat(1, reps, *([1] * (weight.dim() - 2)))[:, :in_chans] * (3.0 / in_chans)
    return work.to(weight.dtype)


def _adapt_input_convs(state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], name: str
                       ) -> dict[str, torch.Tensor]:
    """Adapt the checkpoint's image-reading convolutions to the model's number of input channels."""
    adapted = {}
    for k, v in state.items():
        ref = own.get(k)
        if (ref is not None and v.is_floating_point() and v.dim() >= 3 and v.dim() == ref.dim()
                and v.shape[1] == 3 and ref.shape[1] != 3 and v.shape[0] == ref.shape[0]
                and v.shape[2:] == ref.shape[2:]):
            adapted[k] = adapt_input_conv(v, ref.shape[1])
    if adapted:
        _log.info("%s: adapted %d RGB input convolution(s) to %d input channels: %s", name, len(adapted),
                  next(iter(own[k] for k in adapted)).shape[1], _clip(sorted(adapted)))
        state = {**state, **adapted}
    return state


def _clip(items: list[str], n: int = 12) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def save_safetensors(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a model's weights as safetensors (shared storage is cloned so the file is self-contained)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, os.fspath(path))
