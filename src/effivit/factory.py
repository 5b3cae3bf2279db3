"""``create_model``: build a registered model, optionally load weights, optionally as a feature backbone."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .models._features import FeatureExtractor
from .registry import builder_kwargs, get_entry, split_model_name


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike | Mapping[str, torch.Tensor] = False,
    num_classes: int | None = None,
    in_chans: int = 3,
    features_only: bool = False,
    out_indices: int | list[int] | tuple[int, ...] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` (``arch`` or ``arch.tag``).

    pretrained: ``False``; ``True`` for the official weights of the tag (resolved through the hub id in
    the model's config with huggingface_hub); or any source ``load_checkpoint`` accepts (path, ``hf-hub:``
    id, state dict). A ``num_classes`` other than the checkpoint's keeps the backbone and starts a new head.
    features_only / out_indices: return a backbone whose forward gives the feature maps of those stages.
    Other keyword arguments go to the family's model (e.g. ``attn='xca'``, ``drop_path_rate=0.1``);
    unknown ones raise ``ValueError`` naming the allowed ones.
    """
    entry = get_entry(name)
    _, tag = split_model_name(name)
    allowed = builder_kwargs(entry)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for model {entry.name!r}; allowed: {sorted(allowed)}")
    cfg = entry.pretrained_cfg(tag)
    head_classes = cfg["num_classes"] if num_classes is None else num_classes
    model = entry.builder(entry.config, num_classes=head_classes, in_chans=in_chans, **kwargs)
    cfg["num_classes"] = head_classes
    model.pretrained_cfg = cfg
    if pretrained is not False and pretrained is not None:
        if pretrained is True:
            if not cfg["hf_hub_id"]:
                raise ValueError(f"model {name!r} has no released weights; pass a checkpoint source instead")
            source: Any = "hf-hub:" + cfg["hf_hub_id"]
        else:
            source = pretrained
        if in_chans != 3:
            raise ValueError(f"pretrained weights take 3 input channels; got in_chans={in_chans}")
        load_checkpoint(model, source, drop_classifier=head_classes != 1000)
    if features_only:
        return FeatureExtractor(model, out_indices)
    if out_indices is not None:
        raise ValueError("out_indices is only used with features_only=True")
    return model
