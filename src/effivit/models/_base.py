"""The model surface every family shares, so code written for timm backbones works unchanged.

``forward_features`` / ``forward_head(x, pre_logits=False)`` / ``forward``, ``reset_classifier``,
``get_classifier``, ``set_grad_checkpointing``, ``forward_intermediates``, ``num_features``,
``feature_info`` (a list of ``dict(num_chs, reduction, module)``) and ``pretrained_cfg``/``default_cfg``.
"""

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def check_input(x: torch.Tensor, in_chans: int, size_divisor: int, min_size: int = 1) -> torch.Tensor:
    """Reject inputs the architecture cannot take, naming what was wrong and what is allowed; returns ``x``.

    Tracers see one opaque call (``torch.fx.wrap`` below), so FX graphs (torchvision's
    ``create_feature_extractor``) keep the check and run it on real tensors; returning ``x`` puts the call on
    the data path, so dead-code elimination cannot drop it. TorchScript and torch.export read the shapes.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input (B, {in_chans}, H, W), got shape {list(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels (B, {in_chans}, H, W), got {x.shape[1]} in shape {list(x.shape)}"
        )
    h, w = x.shape[2], x.shape[3]
    if size_divisor > 1 and (h % size_divisor != 0 or w % size_divisor != 0 or h == 0 or w == 0):
        raise ValueError(
            f"input size H={h}, W={w} is not allowed: H and W must be positive multiples of {size_divisor}"
        )
    if h < min_size or w < min_size:
        raise ValueError(f"input size H={h}, W={w} is not allowed: H and W must be at least {min_size}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point image tensor, got dtype {x.dtype} (convert it with .float())")
    return x


torch.fx.wrap("check_input")


@torch.jit.unused
def _autocast_enabled(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type)


def check_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Outside autocast the input must have the model's dtype (a conv would fail deep inside otherwise).
    TorchScript (an FX graph compiled later) skips it: its autocast query takes no device."""
    if torch.jit.is_scripting():
        return x
    if x.dtype != weight.dtype and not _autocast_enabled(x.device.type):
        raise ValueError(
            f"input dtype {x.dtype} does not match the model's {weight.dtype}: cast the input (x.to({weight.dtype})), "
            f"the model (model.to({x.dtype})), or run under torch.autocast"
        )
    return x


torch.fx.wrap("check_dtype")


def checkpoint_seq(blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a sequence of blocks, recomputing each block's activations in backward.

    Not scriptable (TorchScript cannot take a module argument); stages call it behind a guard that
    TorchScript compiles away::

        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
    """
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x



class Stage(nn.Module):
    """An optional down-sampling module then a sequence of blocks; recomputes block activations in backward
    when gradient checkpointing is on. Parameter names: ``downsample.*``, ``blocks.<i>.*``."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

def resolve_indices(indices: int | list[int] | tuple[int, ...] | None, num_stages: int) -> list[int]:
    """timm's convention: an int n takes the last n stages, a sequence picks stages (negative allowed)."""
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices} must be in 1..{num_stages} (the number of stages)")
        return list(range(num_stages - indices, num_stages))
    out = []
    for i in indices:
        j = i + num_stages if i < 0 else i
        if not 0 <= j < num_stages:
            raise ValueError(f"feature index {i} is out of range for {num_stages} stages (allowed: "
                             f"{-num_stages}..{num_stages - 1})")
        out.append(j)
    return sorted(set(out))


class Backbone(nn.Module):
    """Base class of every effivit model.

    Subclasses build ``self.stem``, ``self.stages`` (an ``nn.Sequential`` of stages), ``self.norm``
    (applied after the last stage, may be ``nn.Identity``) and ``self.head``, and fill ``feature_info``.
    Families with another layout override ``forward_features`` / ``forward_intermediates``.
    """

    __jit_unused_properties__ = ["default_cfg"]
    # Leaf names of parameters that take no weight decay (timm's optimizer factory reads no_weight_decay()).
    no_weight_decay_names: tuple[str, ...] = (
        "attention_biases", "relative_position_bias_table", "pos_embed", "cls_token", "dist_token", "gamma",
        "gamma1", "gamma2", "layer_scale", "temperature",
    )
    # Modules that run only in forward_final (pruned with prune_norm=True).
    final_module_names: tuple[str, ...] = ("norm",)
    # True when the top-level modules (nn.Sequential ones entry by entry) run one after the other on
    # (B, C, H, W) maps from the image to the last stage: features_only then takes timm's FeatureListNet
    # form (models/_features.py: FeatureList), which torchvision's BackboneWithFPN can read.
    feature_chain: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" not in cls.__dict__:
            # torch.compile caches compiled frames per code object, at most 8 (recompile_limit), then runs
            # eager with only a warning. One shared forward would let the 9th compiled family in a process
            # (a zoo benchmark) fall back to eager; each family gets its own copy, as each timm class has.
            shared = Backbone.forward
            code = shared.__code__.replace(co_qualname=f"{cls.__qualname__}.forward")
            cls.forward = types.FunctionType(code, shared.__globals__, "forward", shared.__defaults__,
                                             shared.__closure__)

    def __init__(self, in_chans: int, num_classes: int, size_divisor: int, min_size: int | None = None) -> None:
        super().__init__()
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0 removes the classifier), got {num_classes!r}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.size_divisor = size_divisor
        self.min_size = size_divisor if min_size is None else min_size
        self.grad_checkpointing = False
        self.pretrained_cfg: dict[str, Any] = {}
        self.feature_info: list[dict[str, Any]] = []
        # Width of forward_features' output (num_features) and of the head's pre-logits (head_hidden_size,
        # which differs when the head has its own hidden layer); families set both.
        self.num_features = 0
        self.head_hidden_size = 0

    # ---- timm surface -------------------------------------------------------------------------
    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` (0 removes it)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for m in self.modules():
            if m is not self and hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = enable

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x, self.in_chans, self.size_divisor, self.min_size)
        if not torch.jit.is_scripting():
            x = self._check_dtype(x)
        return x

    @torch.jit.unused
    def _check_dtype(self, x: torch.Tensor) -> torch.Tensor:
        # The first weight of rank >= 2 (a conv/linear kernel or a position table): norms may keep fp32
        # parameters in a half-precision model (deploy.to_dtype), kernels and tables never do.
        weight = next((p for p in self.parameters() if p.dim() >= 2), None)
        return x if weight is None else check_dtype(x, weight)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters that take no weight decay: attention-bias and position tables, class tokens, layer
        scales, temperatures (timm's optimizer factory reads this)."""
        return {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in self.no_weight_decay_names}

    def _stem_names(self) -> list[str]:
        names = []
        for name, _ in self.named_children():
            if name == "stages":
                break
            names.append(name)
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter grouping (layer-wise learning-rate decay): the stem first, then stage by stage
        (block by block unless ``coarse``), the final norm last; the head matches nothing (the last group)."""
        stem = r"^(?:" + "|".join(self._stem_names()) + r")\."
        if coarse:
            return dict(stem=stem, blocks=r"^stages\.(\d+)")
        final = "|".join(self.final_module_names)
        return dict(stem=stem, blocks=[
            (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^stages\.(\d+)\.", (0,)),
            (r"^(?:" + final + r")\.", (99999,)),
        ])

    @torch.jit.ignore
    def head_module_names(self) -> list[str]:
        """The top-level modules holding the classifier(s), from ``pretrained_cfg['classifier']``."""
        classifiers = self.pretrained_cfg.get("classifier", "head.fc")
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        names = []
        for c in classifiers:
            top = c.split(".", 1)[0]
            if top not in names and hasattr(self, top):
                names.append(top)
        return names or ["head"]

    @torch.jit.ignore
    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop what ``forward_intermediates(indices)`` does not need (timm's contract): the stages after the
        last one taken, the final norm/conv with ``prune_norm``, the head(s) with ``prune_head`` (their
        parameters leave the model and its state dict). Returns the stage indices kept."""
        take = resolve_indices(indices, len(self.stages))
        self.stages = self.stages[: max(take) + 1]
        self.feature_info = self.feature_info[: max(take) + 1]
        if prune_norm:
            for name in self.final_module_names:
                if hasattr(self, name):
                    setattr(self, name, nn.Identity())
        if prune_head:
            for name in self.head_module_names():
                setattr(self, name, nn.Identity())
            self.num_classes = 0
        return take

    # ---- forward --------------------------------------------------------------------------------
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the first stage (families name their stem differently)."""
        return self.stem(x)

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        """Everything between the last stage and the head (a norm, a final conv, or nothing)."""
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.check_input(x)
        x = self.forward_stem(x)
        x = self.stages(x)  # each stage checkpoints its own blocks when grad checkpointing is on
        return self.forward_final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    # No postponed annotations in this file and no return annotation here: FX records this signature for
    # traced graphs (which TorchScript then compiles), and distilled models may return a pair.
    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Feature maps after the chosen stages (timm's signature); ``norm`` applies the final norm
        to the last stage's map."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; allowed: 'NCHW'")
        x = self.check_input(x)
        take = resolve_indices(indices, len(self.stages))
        last = len(self.stages) - 1
        stages = self.stages if not stop_early else self.stages[: max(take) + 1]
        final_norm = getattr(self, "norm", None) if norm else None
        intermediates = []
        x = self.forward_stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(final_norm(x) if (final_norm is not None and i == last) else x)
        if intermediates_only:
            return intermediates
        if len(stages) - 1 == last:
            x = self.forward_final(x)
        return x, intermediates


GLOBAL_POOLS = ("avg", "")


class DistilledBackbone(Backbone):
    """A backbone with a classifier and a distillation classifier (DeiT, arXiv:2012.12877).

    Training returns their mean, as timm does (``set_distilled_training(True)``: ``(logits, logits_dist)``, which
    the trainer sets when it distils); eval returns
    their mean. At deploy time ``merge_distilled_heads`` turns the two Linears into one (the mean of two affine
    maps is one), and ``use_channels_last`` keeps the maps in channels_last memory (oneDNN's fast convolutions
    on CPU), converting the input once at the stem via ``stem_input``. Subclasses build ``self.head`` and
    ``self.head_dist`` with ``_new_head`` and pool in ``forward_head`` before calling ``classify``.
    """

    def __init__(self, in_chans: int, num_classes: int, size_divisor: int, global_pool: str = "avg") -> None:
        super().__init__(in_chans, num_classes, size_divisor)
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={global_pool!r} is not supported; allowed: {GLOBAL_POOLS}")
        self.global_pool = global_pool
        self.distilled_training = False  # timm's default; the trainer turns it on when it distils
        self.merged_heads = False  # set at deploy time: head holds the average of both heads
        self.channels_last = False  # set at deploy time

    def _new_head(self, num_classes: int) -> nn.Module:
        """A freshly initialised classifier on pooled features (families with another head override it)."""
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    @torch.jit.ignore
    def get_classifier(self) -> tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New heads for ``num_classes`` (0 removes them), on the model's device/dtype and in its mode."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool={global_pool!r} is not supported; allowed: {GLOBAL_POOLS}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = next(iter(self.parameters()))
        self.head = self._new_head(num_classes).to(ref.device, ref.dtype).train(self.training)
        self.head_dist = self._new_head(num_classes).to(ref.device, ref.dtype).train(self.training)
        self.merged_heads = False

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """True: training mode returns (logits, logits_dist). False (default, as timm): their mean, as in eval."""
        self.distilled_training = enable

    @torch.jit.ignore
    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Prepare the attention biases for inputs of ``img_size`` (resampled once, then cached)."""
        from ..layers.attn_bias import build_bias_caches

        h, w = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        self.check_input(torch.empty(1, self.in_chans, h, w, device="meta"))
        build_bias_caches(self, (h, w))

    def stem_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def classify(self, x: torch.Tensor):
        """Both heads on pooled features: the pair while distillation-training, else their mean."""
        if self.merged_heads:
            return self.head(x)
        out, out_dist = self.head(x), self.head_dist(x)
        if self.training and self.distilled_training and not torch.jit.is_scripting():
            return out, out_dist
        return (out + out_dist) / 2

    @torch.jit.ignore
    def merge_distilled_heads(self) -> None:
        from ..deploy.fold import average_linears

        if isinstance(self.head, nn.Linear) and isinstance(self.head_dist, nn.Linear):
            self.head = average_linears([self.head, self.head_dist])
            self.head_dist = nn.Identity()
            self.merged_heads = True

    @torch.jit.ignore
    def use_channels_last(self) -> None:
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
