"""``features_only=True``: a backbone that returns the multi-scale maps a detection/segmentation neck needs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._base import check_dtype, check_input, resolve_indices


class FeatureInfo(list):
    """timm-compatible feature info: a list of ``dict(num_chs, reduction, module)`` with accessors."""

    def channels(self, idx: int | None = None) -> list[int] | int:
        return self[idx]["num_chs"] if idx is not None else [f["num_chs"] for f in self]

    def reduction(self, idx: int | None = None) -> list[int] | int:
        return self[idx]["reduction"] if idx is not None else [f["reduction"] for f in self]

    def module_name(self, idx: int | None = None) -> list[str] | str:
        return self[idx]["module"] if idx is not None else [f["module"] for f in self]


class _FeatureOutputs:
    """What both ``features_only`` forms report: timm's ``default_cfg`` alias and torchvision's ``out_channels``
    (read by detection necks), plus the strides; TorchScript leaves these properties out."""

    __jit_unused_properties__ = ["default_cfg", "out_channels", "strides"]

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @property
    def out_channels(self) -> list[int]:
        return self.feature_info.channels()

    @property
    def strides(self) -> list[int]:
        return self.feature_info.reduction()


class FeatureExtractor(_FeatureOutputs, nn.Module):
    """Wraps a model; ``forward`` returns the feature maps after the stages in ``out_indices``.

    The model is pruned first (``prune_intermediate_layers``, timm's contract): stages after the last one
    needed, the final norm and the head leave the model, its parameters and its state dict, so nothing
    computes for nothing and DDP sees no unused parameters.
    """

    def __init__(self, model: nn.Module, out_indices: int | list[int] | tuple[int, ...] | None = None) -> None:
        super().__init__()
        num_stages = len(model.feature_info)
        self.out_indices = tuple(resolve_indices(out_indices, num_stages))
        self.feature_info = FeatureInfo(dict(model.feature_info[i], index=i) for i in self.out_indices)
        model.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
        self.model = model
        self.pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def to_model_keys(self, state: dict[str, Any]) -> dict[str, Any]:
        """A state dict of this extractor (``model.`` + the model's keys, as timm's ``FeatureGetterNet``)
        with the model's keys; a full-model state dict passes unchanged."""
        if state and all(k.startswith("model.") for k in state):
            return {k[len("model."):]: v for k, v in state.items()}
        return dict(state)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(
            x, indices=list(self.out_indices), stop_early=True, intermediates_only=True
        )


class FeatureList(_FeatureOutputs, nn.ModuleDict):
    """``features_only`` for models whose stem and stages are a chain of (B, C, H, W) maps: timm's
    ``FeatureListNet`` form.

    The model's top-level modules, ``nn.Sequential`` ones flattened one level (``stem.0`` -> ``stem_0``,
    ``stages.1`` -> ``stages_1``), become this dict's entries, in order, up to the last stage needed; ``forward``
    runs them one after the other and returns the maps of the ``out_indices`` stages. So the state-dict keys
    are timm's for the same model (a timm ``features_only`` checkpoint loads as it is), and torchvision's
    ``IntermediateLayerGetter`` / ``BackboneWithFPN`` read it (``return_layers`` names the entries, e.g.
    ``{"stages_1": "0", "stages_2": "1"}``). Models that carry tokens between stages (plain ViTs, Hiera,
    LeViT's linear form) get :class:`FeatureExtractor` instead, as timm gives them ``FeatureGetterNet``.

    The pruned source model is kept as a plain attribute, not a child: its modules are this dict's entries
    (shared, not copied); ``load_checkpoint`` uses it to read full-model checkpoints and run the family's
    key filter.
    """

    def __init__(self, model: nn.Module, out_indices: int | list[int] | tuple[int, ...] | None = None) -> None:
        num_stages = len(model.feature_info)
        out = tuple(resolve_indices(out_indices, num_stages))
        info = FeatureInfo(dict(model.feature_info[i], index=i) for i in out)
        model.prune_intermediate_layers(list(out), prune_norm=True, prune_head=True)
        remaining = {f["module"] for f in info}
        layers: dict[str, nn.Module] = {}
        dotted: dict[str, str] = {}
        for name, child in model.named_children():
            parts = list(child.named_children()) if isinstance(child, nn.Sequential) else [("", child)]
            for sub, module in parts:
                path = f"{name}.{sub}" if sub else name
                layers[path.replace(".", "_")] = module
                dotted[path.replace(".", "_")] = path
                remaining.discard(path)
                if not remaining:
                    break
            if not remaining:
                break
        if remaining:
            raise ValueError(f"{type(model).__name__}: feature modules {sorted(remaining)} are not top-level "
                             f"modules or entries of a top-level nn.Sequential (use FeatureExtractor)")
        super().__init__(layers)
        names = {v: k for k, v in dotted.items()}
        self.return_layers: list[str] = [names[f["module"]] for f in info]
        self.dotted_names = dotted
        self.out_indices = out
        self.feature_info = info
        self.in_chans: int = model.in_chans
        self.size_divisor: int = model.size_divisor
        self.min_size: int = model.min_size
        self.pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})
        object.__setattr__(self, "source_model", model)  # not a child: no second copy of the keys

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for m in self.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = enable

    @torch.jit.ignore
    def checked_source_model(self) -> nn.Module:
        """The pruned source model, after checking that its modules still are this dict's entries (fusing
        replaces entries: a fused extractor no longer has the model's keys to load into)."""
        model = self.source_model
        for flat, path in self.dotted_names.items():
            if model.get_submodule(path) is not self[flat]:
                raise RuntimeError(f"features_only model: entry {flat!r} was replaced (deploy.fuse?) and no longer "
                                   f"matches the model's {path!r}; load weights before fusing")
        return model

    def to_model_keys(self, state: dict[str, Any]) -> dict[str, Any]:
        """A state dict with this extractor's keys (``stem_0.weight``) renamed to the model's (``stem.0.weight``);
        keys already in the model's form pass unchanged."""
        out = {}
        for k, v in state.items():
            head, sep, rest = k.partition(".")
            out[self.dotted_names.get(head, head) + sep + rest] = v
        return out

    @torch.jit.unused
    def _check_dtype(self, x: torch.Tensor) -> torch.Tensor:
        weight = next((p for p in self.parameters() if p.dim() >= 2), None)
        return x if weight is None else check_dtype(x, weight)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = check_input(x, self.in_chans, self.size_divisor, self.min_size)
        if not torch.jit.is_scripting():
            x = self._check_dtype(x)
        features: list[torch.Tensor] = []
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                features.append(x)
        return features
