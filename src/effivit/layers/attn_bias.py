"""Learned attention biases indexed by relative offset, at any resolution, with a cache that cannot go stale.

LeViT (arXiv:2104.01136) introduced a per-head bias added to the attention logits, indexed by the absolute
offset ``(|dy|, |dx|)`` between a query and a key token; EfficientFormer (arXiv:2206.01191), EfficientFormerV2
(arXiv:2212.08059) and EfficientViT-MSRA (arXiv:2305.07027) reuse it. This module holds that idea once.

**The table.** A parameter ``attention_biases`` of shape ``(num_heads, Ht * Wt)`` where ``(Ht, Wt)`` is the
*trained* key grid; entry ``|dy| * Wt + |dx|`` is the bias for offset ``(|dy|, |dx|)``. This is exactly the
layout of timm's checkpoints (and of the official ones, whose offset dictionaries enumerate offsets in the
same raster order), so the parameter loads unchanged.

**Strided queries.** Downsampling attentions (LeViT's AttentionDownsample, EfficientFormerV2's
Attention4DDownsample) take queries on the key grid subsampled by ``stride``: query ``(i, j)`` sits at key
position ``(stride * i, stride * j)``, so there are ``ceil(H / stride) * ceil(W / stride)`` queries.

**Any resolution.** The originals tie the table to the training resolution. Here the key grid comes from the
input: when it differs from ``(Ht, Wt)`` the table, seen as a ``(num_heads, Ht, Wt)`` image of offsets, is
resampled bicubically (``align_corners=False``, as for position embeddings) to the new grid, then indexed.
At the trained grid nothing is resampled, so results equal the reference bit for bit.

**The cache.** Gathering ``table[:, index]`` every forward costs a few ops that inference does not need. The
gathered ``(num_heads, Nq, Nk)`` bias is kept in a *non-persistent* buffer (``attention_bias_cache``; never
in ``state_dict``) together with a stamp of what it was computed from: the key grid, and the table's storage
pointer and in-place version counter. Any change to the table — ``load_state_dict``, an optimizer or EMA
update (even in eval mode), ``.to(device/dtype)``, ``.half()`` — changes the stamp, and the next eval forward
rebuilds the cache. (The reference pattern, which builds the cache in ``train(False)``, goes stale when
weights are loaded or updated after ``eval()`` is called.) While gradients can reach the table (training, or
eval with autograd on), the bias is gathered fresh so the table gets its gradient.

Tracing and TorchScript never mutate the cache: they use it when it was built for the grid being run (it
becomes a constant of the traced graph) and otherwise gather/resample in-graph. ``torch.compile`` and
``torch.export`` (ONNX) always gather in-graph (ONNX Runtime folds the gather of constants at load), so a
compiled model never sees a stale bias; FX records the gather as one call. ``set_bias_grid`` (called by the models' ``set_input_size``) builds it ahead of time, so an export
at a non-trained size carries the resampled bias as one constant.

Usage (an attention module subclasses :class:`AttentionBiasBase`)::

    class MyAttention(AttentionBiasBase):
        def __init__(self, dim, num_heads, resolution):
            super().__init__()
            ...
            self.init_attention_bias(num_heads, resolution, stride=1)

        def forward(self, x):                      # x: (B, C, H, W)
            q, k, v = ...                          # (B, heads, N, head_dim)
            bias = self.attention_bias(x.shape[-2], x.shape[-1])   # (heads, Nq, Nk), key grid H x W
            out = attend(q, k, v, bias.to(q.dtype))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttentionBiasBase",
    "biased_attention",
    "build_bias_caches",
    "fold_scale_into_rows",
    "gather_attention_bias",
    "offset_index",
    "query_grid",
    "resample_bias_table",
]


def query_grid(key_h: int, key_w: int, stride: int = 1) -> tuple[int, int]:
    """The query grid of a key grid subsampled by ``stride`` (query i at key position stride * i)."""
    return (key_h - 1) // stride + 1, (key_w - 1) // stride + 1


def offset_index(key_h: int, key_w: int, stride: int = 1, device: torch.device | None = None) -> torch.Tensor:
    """(Nq, Nk) long index into a flattened ``(key_h, key_w)`` offset table: ``|dy| * key_w + |dx|``.

    Queries sit on the key grid subsampled by ``stride``; keys are every position of the key grid.
    """
    ky = torch.arange(key_h, device=device)
    kx = torch.arange(key_w, device=device)
    qy = torch.arange(0, key_h, stride, device=device)
    qx = torch.arange(0, key_w, stride, device=device)
    dy = (qy[:, None] - ky[None, :]).abs()  # Hq, Hk
    dx = (qx[:, None] - kx[None, :]).abs()  # Wq, Wk
    # (Hq, 1, Hk, 1) * Wk + (1, Wq, 1, Wk) -> (Hq, Wq, Hk, Wk) -> (Nq, Nk), raster order on both grids
    idx = dy[:, None, :, None] * key_w + dx[None, :, None, :]
    return idx.reshape(qy.shape[0] * qx.shape[0], key_h * key_w)


def resample_bias_table(table: torch.Tensor, src_size: tuple[int, int], dst_size: tuple[int, int]) -> torch.Tensor:
    """Resample a ``(heads, Hs * Ws)`` offset table to ``(heads, Hd * Wd)`` (bicubic, align_corners=False).

    Returns ``table`` itself when the sizes are equal. Computed in float32 at least (bicubic in half
    precision is coarse), returned in the table's dtype.
    """
    if src_size[0] == dst_size[0] and src_size[1] == dst_size[1]:
        return table
    heads = table.shape[0]
    grid = table.reshape(1, heads, src_size[0], src_size[1])
    work_dtype = torch.promote_types(table.dtype, torch.float32)
    out = F.interpolate(grid.to(work_dtype), size=(dst_size[0], dst_size[1]), mode="bicubic", align_corners=False)
    return out.reshape(heads, dst_size[0] * dst_size[1]).to(table.dtype)


def gather_attention_bias(
    table: torch.Tensor, table_size: tuple[int, int], key_h: int, key_w: int, stride: int = 1
) -> torch.Tensor:
    """The ``(heads, Nq, Nk)`` bias for a key grid ``key_h x key_w`` (queries subsampled by ``stride``) from
    a ``(heads, Ht * Wt)`` table trained on ``table_size``; resampled when the grids differ."""
    table = resample_bias_table(table, table_size, (key_h, key_w))
    return table[:, offset_index(key_h, key_w, stride, table.device)]


# FX records one call (the key grid comes from the input's shape, a proxy while tracing); callers in other
# modules reach it as ``attn_bias.gather_attention_bias`` so the wrapped name is the one they look up.
torch.fx.wrap("gather_attention_bias")


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: float = 1.0) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` for (B, heads, N, d) tensors, ``bias`` broadcasting to
    (B, heads, Nq, Nk); ``v`` may have another head size than ``q``/``k`` (these families use 4x wider v).

    Written out rather than through ``F.scaled_dot_product_attention``: on CPU, SDPA's fused kernel needs
    equal q/v head sizes, and its math fallback with a float mask adds full passes over the logits (checks
    for fully masked rows) that cost more than the attention itself at these sizes. Fused models fold
    ``scale`` into the query projection and pass ``scale=1.0``, leaving matmul, add, softmax, matmul.
    """
    attn = torch.matmul(q, k.transpose(-2, -1))  # B, heads, Nq, Nk
    if scale != 1.0:
        attn = attn * scale
    attn = (attn + bias.to(attn.dtype)).softmax(dim=-1)
    return torch.matmul(attn, v)


def fold_scale_into_rows(layer: nn.Module, rows: torch.Tensor, scale: float) -> None:
    """Multiply the output rows/channels ``rows`` (a bool mask) of a fused Linear/Conv2d (with bias) by
    ``scale`` in place: folds the attention scale into the query projection."""
    factor = torch.where(rows, torch.tensor(scale, dtype=layer.weight.dtype),
                         torch.tensor(1.0, dtype=layer.weight.dtype)).to(layer.weight.device)
    with torch.no_grad():
        layer.weight.mul_(factor.reshape(-1, *([1] * (layer.weight.dim() - 1))))
        if layer.bias is not None:
            layer.bias.mul_(factor)


def _stamp(sources: list[torch.Tensor], key_h: int, key_w: int) -> tuple:
    # What a cached bias was computed from: any in-place update bumps _version, any move/cast changes the
    # storage pointer, dtype or device.
    return (key_h, key_w) + tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)


class AttentionBiasBase(nn.Module):
    """Base class of attention modules with a learned per-head bias indexed by relative offset.

    Call :meth:`init_attention_bias` in ``__init__`` (it creates the ``attention_biases`` parameter, named as
    in timm's checkpoints) and :meth:`attention_bias` in ``forward``. See the module docstring for the
    layout, resampling and caching rules.
    """

    # The stamp is Python-only bookkeeping; TorchScript never reads it.
    __jit_ignored_attributes__ = ["_bias_stamp"]

    def init_attention_bias(self, num_heads: int, resolution: int | tuple[int, int], stride: int = 1) -> None:
        """Create the ``(num_heads, H * W)`` table for the trained key grid ``resolution`` (zeros, as the
        references initialise it) and an empty cache. ``stride`` subsamples the queries."""
        h, w = (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))
        if num_heads < 1 or h < 1 or w < 1 or stride < 1:
            raise ValueError(
                f"attention bias needs num_heads >= 1, a positive resolution and stride >= 1; got "
                f"num_heads={num_heads}, resolution={(h, w)}, stride={stride}"
            )
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, h * w))
        self.init_bias_cache((h, w), stride)

    def init_bias_cache(self, resolution: tuple[int, int], stride: int = 1) -> None:
        """The cache bookkeeping alone (``init_attention_bias`` calls it): for subclasses that own a table of
        another layout (MaxViT's signed-offset ``relative_position_bias_table``) and override
        :meth:`compute_attention_bias` and :meth:`bias_sources`. ``resolution`` is the trained key grid."""
        self.bias_resolution: tuple[int, int] = (int(resolution[0]), int(resolution[1]))
        self.bias_stride: int = stride
        # The key grid the cache holds; (0, 0) when empty.
        self.bias_cache_grid: tuple[int, int] = (0, 0)
        self.register_buffer("attention_bias_cache", torch.zeros(0), persistent=False)
        self._bias_stamp: Any = None

    # ---- computing ------------------------------------------------------------------------------
    def compute_attention_bias(self, key_h: int, key_w: int) -> torch.Tensor:
        """Gather (and, off the trained grid, resample) the bias for a key grid; differentiable.

        Subclasses may post-process the gathered bias (EfficientFormerV2 mixes it across heads with its
        first talking-head projection); they then list the extra tensors in :meth:`bias_sources`.
        """
        return gather_attention_bias(self.attention_biases, self.bias_resolution, key_h, key_w, self.bias_stride)

    @torch.jit.unused
    def bias_sources(self) -> list[torch.Tensor]:
        """The tensors the cached bias is computed from (a change to any of them invalidates the cache)."""
        return [self.attention_biases]

    def attention_bias(self, key_h: int, key_w: int) -> torch.Tensor:
        """The ``(num_heads, Nq, Nk)`` bias for a ``key_h x key_w`` key grid, from the cache when valid."""
        if torch.jit.is_scripting():
            if self.bias_cache_grid[0] == key_h and self.bias_cache_grid[1] == key_w:
                return self.attention_bias_cache
            return self.compute_attention_bias(key_h, key_w)
        if torch.compiler.is_compiling():
            # torch.compile / torch.export: gathered in-graph on every call. Validating a cache would read
            # storage pointers and version counters (graph breaks, recompiles), and trusting one unchecked
            # goes stale after an optimizer step or a switch to training; the gather is a few cheap ops.
            return self.compute_attention_bias(key_h, key_w)
        if torch.jit.is_tracing():
            # Graph capture must not mutate module state: use the cache if it fits, else compute in-graph.
            if self.bias_cache_grid == (key_h, key_w) and self._bias_stamp_valid(key_h, key_w):
                return self.attention_bias_cache
            return self.compute_attention_bias(key_h, key_w)
        return self._eager_attention_bias(key_h, key_w)

    @torch.jit.unused
    def _eager_attention_bias(self, key_h: int, key_w: int) -> torch.Tensor:
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            # FX: key_h/key_w are proxies; gather_attention_bias is an opaque call that runs at run time.
            return self.compute_attention_bias(key_h, key_w)
        if self.training or (torch.is_grad_enabled() and any(t.requires_grad for t in self.bias_sources())):
            return self.compute_attention_bias(key_h, key_w)
        if self._bias_stamp != _stamp(self.bias_sources(), key_h, key_w):
            self.build_bias_cache(key_h, key_w)
        return self.attention_bias_cache

    @torch.jit.unused
    def _bias_stamp_valid(self, key_h: int, key_w: int) -> bool:
        """True when the cache was built from the current tables for this key grid."""
        return self._bias_stamp == _stamp(self.bias_sources(), key_h, key_w)

    @torch.jit.unused
    def build_bias_cache(self, key_h: int, key_w: int) -> None:
        """(Re)build the cache for a key grid now (``set_input_size`` and ``fuse`` call this)."""
        with torch.no_grad():
            self.attention_bias_cache = self.compute_attention_bias(key_h, key_w).detach().contiguous()
        self.bias_cache_grid = (key_h, key_w)
        self._bias_stamp = _stamp(self.bias_sources(), key_h, key_w)

    @torch.jit.unused
    def build_trained_bias_cache(self) -> None:
        """Build the cache for the grid last used (or the trained grid when none was)."""
        grid = self.bias_cache_grid if self.bias_cache_grid[0] > 0 else self.bias_resolution
        self.build_bias_cache(grid[0], grid[1])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # The stamp already catches the in-place copy; dropping the cache also frees its memory early.
        self._bias_stamp = None

    def extra_repr(self) -> str:
        return f"bias_resolution={self.bias_resolution}, bias_stride={self.bias_stride}"


def build_bias_caches(model: nn.Module, img_size: int | tuple[int, int]) -> None:
    """Build every :class:`AttentionBiasBase` cache in ``model`` for inputs of ``img_size`` (H, W).

    One forward of ``model.forward_features`` on a zero image (batch 1, eval mode, no autograd) computes each
    attention's key grid from the real strides, so nothing here restates the architecture. Train/eval mode
    is restored afterwards. The model's own ``set_input_size`` validates the size first.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else None
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.forward_features(torch.zeros(1, int(getattr(model, "in_chans", 3)), h, w, device=device,
                                               dtype=dtype))
    finally:
        model.train(was_training)
