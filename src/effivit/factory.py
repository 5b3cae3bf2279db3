"""``create_model``: build a registered model, optionally load weights, optionally as a feature backbone.

It takes timm's keywords, so code written for ``timm.create_model`` works after changing the import.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import HF_HUB_PREFIX, load_checkpoint
from .models._base import check_input
from .models._features import FeatureExtractor, FeatureList
from .registry import ModelEntry, builder_kwargs, get_entry, split_model_name

_log = logging.getLogger("effivit")

# Keys of timm's hub config.json that name the architecture and the weight.
_HUB_CONFIG = "config.json"


def _bool_or_none(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be True, False or None, got {value!r}")


def _parse_img_size(img_size: Any) -> tuple[int, int]:
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        return img_size, img_size
    if (isinstance(img_size, (tuple, list)) and len(img_size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in img_size)):
        return int(img_size[0]), int(img_size[1])
    raise ValueError(f"img_size must be an int or a pair of ints (H, W), got {img_size!r}")


def _resolve_hub_name(model_name: str, cache_dir: str | os.PathLike | None) -> tuple[str, str]:
    """``hf-hub:org/name[@rev]`` -> (registered model name, hub id). The architecture comes from the
    repository's ``config.json`` (from the huggingface_hub cache when offline) or, for timm's repositories,
    from the repository name itself (``timm/levit_128s.fb_dist_in1k``)."""
    hub_id = model_name[len(HF_HUB_PREFIX):]
    repo, _, revision = hub_id.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"hf-hub model names look like 'hf-hub:org/name', got {model_name!r}")
    try:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(repo, _HUB_CONFIG, revision=revision or None, cache_dir=cache_dir)) as f:
            config = json.load(f)
        arch = config.get("architecture")
        tag = (config.get("pretrained_cfg") or {}).get("tag")
        if isinstance(arch, str) and arch:
            return (f"{arch}.{tag}" if tag else arch), hub_id
    except Exception as e:  # offline without a cached config, or no config in the repository
        _log.debug("no usable %s for %s (%s); reading the architecture from the name", _HUB_CONFIG, repo, e)
    name = repo.split("/", 1)[1]
    try:
        get_entry(name)
    except ValueError as e:
        raise ValueError(
            f"cannot tell which architecture {model_name!r} holds: its {_HUB_CONFIG} is not in the "
            f"huggingface_hub cache (offline?) and {name!r} is not a registered model name. {e}"
        ) from None
    return name, hub_id


def _pretrained_cfg(entry: ModelEntry, tag: str | None, pretrained_cfg: Any,
                    overlay: Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(pretrained_cfg, str):  # timm: a tag name
        tag = pretrained_cfg
        pretrained_cfg = None
    cfg = entry.pretrained_cfg(tag)
    if pretrained_cfg is not None:
        if not isinstance(pretrained_cfg, Mapping):
            raise ValueError(f"pretrained_cfg must be a tag name or a dict, got {type(pretrained_cfg).__name__}")
        cfg.update(pretrained_cfg)
    if overlay is not None:
        if not isinstance(overlay, Mapping):
            raise ValueError(f"pretrained_cfg_overlay must be a dict, got {type(overlay).__name__}")
        cfg.update(overlay)
    return cfg


def _weights_source(model_name: str, cfg: Mapping[str, Any]) -> Any:
    """Where ``pretrained=True`` reads weights from: the cfg's local ``file``, else its hub id."""
    if cfg.get("file"):
        return cfg["file"]
    if cfg.get("hf_hub_id"):
        return HF_HUB_PREFIX + cfg["hf_hub_id"]
    if cfg.get("url"):
        raise ValueError(
            f"model {model_name!r}: weights by URL are not downloaded by effivit; download {cfg['url']} and pass "
            f"its path as pretrained=PATH (or pretrained_cfg_overlay=dict(file=PATH))"
        )
    raise ValueError(f"model {model_name!r} has no released weights; pass a checkpoint source instead")


def create_model(
    model_name: str,
    pretrained: bool | str | os.PathLike | Mapping[str, torch.Tensor] = False,
    pretrained_cfg: str | Mapping[str, Any] | None = None,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    scriptable: bool | None = None,
    exportable: bool | None = None,
    no_jit: bool | None = None,
    num_classes: int | None = None,
    in_chans: int = 3,
    img_size: int | tuple[int, int] | None = None,
    features_only: bool = False,
    out_indices: int | list[int] | tuple[int, ...] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``model_name`` (``arch``, ``arch.tag`` or ``hf-hub:org/name``), with timm's keywords.

    pretrained: ``False``; ``True`` for the tag's official weights (the cfg's ``file`` if set, else its hub id,
        through huggingface_hub; offline it reads the cache); or any source ``load_checkpoint`` accepts (path,
        ``hf-hub:`` id, state dict). The classifier loads when the checkpoint has ``num_classes`` classes; with
        another count (or ``num_classes=0``) the backbone loads, the head starts fresh, and the dropped keys
        are logged on the ``effivit`` logger.
    pretrained_cfg: a tag name, or a dict that overrides the model's config; pretrained_cfg_overlay: a dict of
        keys to override (e.g. ``dict(file="weights.safetensors")``).
    checkpoint_path: a checkpoint loaded (strictly) after building, as timm does.
    cache_dir: the huggingface_hub cache folder for hub weights and configs.
    scriptable / exportable / no_jit: accepted for timm compatibility and otherwise unused: every effivit
        model is always scriptable (``torch.jit.script``) and exportable (ONNX, ``torch.export``), through the
        same code path, and none uses custom JIT-compiled ops.
    num_classes: classes of the classifier (0: no classifier, ``forward`` returns pooled features).
    in_chans: input channels; with pretrained RGB weights the convolutions that read the image are adapted
        as timm adapts them (``checkpoint.adapt_input_conv``: summed for 1 channel, repeated and rescaled
        for more).
    img_size: the input size (int or (H, W)) the model is set up for: it must satisfy the architecture's
        size rule; it sets ``pretrained_cfg['input_size']`` and prepares size-dependent tables.
    features_only / out_indices: return a backbone whose forward gives the feature maps of those stages (the
        rest of the model is pruned away).
    device / dtype: where and in which floating-point type to build the model (``device="meta"`` builds
        without memory; load with ``to_empty()`` + ``load_state_dict(..., assign=True)``).
    Other keyword arguments go to the family's model (e.g. ``attn='xca'``, ``drop_path_rate=0.1``);
    unknown ones raise ``ValueError`` naming the allowed ones.
    """
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a str, got {type(model_name).__name__}")
    for flag, value in (("scriptable", scriptable), ("exportable", exportable), ("no_jit", no_jit)):
        _bool_or_none(flag, value)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    hub_id = None
    if model_name.startswith(HF_HUB_PREFIX):
        model_name, hub_id = _resolve_hub_name(model_name, cache_dir)
    entry = get_entry(model_name)
    _, tag = split_model_name(model_name)
    allowed = builder_kwargs(entry)
    unknown = sorted(set(kwargs) - allowed - {"img_size"})
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for model {entry.name!r}; allowed: {sorted(allowed)} "
                         f"and create_model's own keywords")
    cfg = _pretrained_cfg(entry, tag, pretrained_cfg, pretrained_cfg_overlay)
    if hub_id is not None:
        cfg["hf_hub_id"] = hub_id
    head_classes = cfg["num_classes"] if num_classes is None else num_classes
    if img_size is not None:
        h, w = _parse_img_size(img_size)
        if "img_size" not in allowed:  # a builder that takes img_size checks it against its own size rule
            check_input(torch.empty(1, in_chans, h, w, device="meta"), in_chans, entry.defaults.size_divisor,
                        cfg["min_input_size"][-1])
        if entry.defaults.fixed_input_size and (h, w) != tuple(cfg["input_size"][1:]):
            raise ValueError(f"model {entry.name!r} only takes its training size "
                             f"{tuple(cfg['input_size'][1:])}; got img_size={(h, w)}")
        if "img_size" in allowed:
            kwargs["img_size"] = (h, w)
        cfg["input_size"] = (in_chans, h, w)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = entry.builder(entry.config, num_classes=head_classes, in_chans=in_chans, **kwargs)
    cfg["num_classes"] = head_classes
    if hasattr(model, "size_divisor"):  # the size rule of the model as built (MaxViT's follows img_size)
        cfg["size_divisor"] = model.size_divisor
        cfg["min_input_size"] = (in_chans, model.min_size, model.min_size)
    model.pretrained_cfg = cfg
    if img_size is not None and hasattr(model, "set_input_size") and "img_size" not in allowed:
        model.set_input_size(cfg["input_size"][1:])
    if pretrained is not False and pretrained is not None:
        source = _weights_source(model_name, cfg) if pretrained is True else pretrained
        load_checkpoint(model, source, adapt_classifier=True, adapt_input_channels=in_chans != 3,
                        cache_dir=cache_dir)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, cache_dir=cache_dir)
    if dtype is not None:
        model = model.to(dtype=dtype)
    if features_only:
        return (FeatureList if model.feature_chain else FeatureExtractor)(model, out_indices)
    if out_indices is not None:
        raise ValueError("out_indices is only used with features_only=True")
    return model

