"""Learned relative-position bias with signed offsets inside a window (MaxViT, arXiv:2204.01697).

**The table.** A parameter ``relative_position_bias_table`` of shape ``(num_heads, 2 * Wh - 1, 2 * Ww - 1)``
for a ``Wh x Ww`` window: entry ``[n, dy + Wh - 1, dx + Ww - 1]`` is head n's bias for a key ``(dy, dx)``
away from its query (key minus query, so the sign matters, unlike LeViT's ``|dy|, |dx|`` table in
``attn_bias.py``). This is the layout of the official TensorFlow MaxViT weights and of timm's ``RelPosBiasTf``,
so checkpoints load unchanged. The reference gathers it with two einsums against one-hot lookup tables kept in
buffers; here one integer index, computed from the window size, gathers the same numbers (each bias is a
table entry, exactly).

**Other windows.** When the window a model runs at differs from the table's, the table (seen as a
``(heads, 2Wh-1, 2Ww-1)`` image of offsets) is resampled bicubically, ``align_corners=False``, then indexed.

**The cache.** :class:`RelPosBias` is an :class:`~effivit.layers.attn_bias.AttentionBiasBase`: the gathered
``(heads, N, N)`` bias is kept in a non-persistent buffer stamped with the table's version and storage, rebuilt
lazily when the table changes, and bypassed while the table can receive gradients or under graph capture
(see that module). Nothing size-dependent is stored in checkpoints, and a meta-device build has nothing to
fill in later.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attn_bias import AttentionBiasBase

__all__ = ["RelPosBias", "gather_relative_position_bias", "relative_position_index", "resample_relative_table"]


def relative_position_index(win_h: int, win_w: int, device: torch.device | None = None) -> torch.Tensor:
    """(N, N) long index, N = win_h * win_w, into a flattened ``(2 win_h - 1, 2 win_w - 1)`` table: for query
    ``(i, j)`` and key ``(y, x)`` (raster order) the entry ``(y - i + win_h - 1) * (2 win_w - 1) + x - j + win_w - 1``."""
    ys = torch.arange(win_h, device=device)
    xs = torch.arange(win_w, device=device)
    dy = ys[None, :] - ys[:, None] + (win_h - 1)  # query row, key row
    dx = xs[None, :] - xs[:, None] + (win_w - 1)  # query col, key col
    idx = dy[:, None, :, None] * (2 * win_w - 1) + dx[None, :, None, :]  # (qi, qj, ky, kx)
    return idx.reshape(win_h * win_w, win_h * win_w)


def resample_relative_table(table: torch.Tensor, win_h: int, win_w: int) -> torch.Tensor:
    """A ``(heads, Th, Tw)`` offset table resampled to ``(heads, 2 win_h - 1, 2 win_w - 1)`` (bicubic,
    ``align_corners=False``; float32 at least). Returns ``table`` itself when it already has that size."""
    dst_h, dst_w = 2 * win_h - 1, 2 * win_w - 1
    if table.shape[-2] == dst_h and table.shape[-1] == dst_w:
        return table
    work_dtype = torch.promote_types(table.dtype, torch.float32)
    out = F.interpolate(table[None].to(work_dtype), size=(dst_h, dst_w), mode="bicubic", align_corners=False)
    return out[0].to(table.dtype)


def gather_relative_position_bias(table: torch.Tensor, win_h: int, win_w: int) -> torch.Tensor:
    """The ``(heads, N, N)`` bias of a ``win_h x win_w`` window from a ``(heads, Th, Tw)`` signed-offset table."""
    table = resample_relative_table(table, win_h, win_w)
    return table.flatten(1)[:, relative_position_index(win_h, win_w, table.device)]


# FX records one call (window sizes may come from proxies in other callers).
torch.fx.wrap("gather_relative_position_bias")


class RelPosBias(AttentionBiasBase):
    """The relative-position bias of one attention over ``window_size`` windows: ``forward()`` returns the
    ``(num_heads, N, N)`` bias (N = Wh * Ww) to add to the attention logits (cached in eval, see the module
    docstring). Parameter: ``relative_position_bias_table`` (num_heads, 2Wh-1, 2Ww-1)."""

    def __init__(self, window_size: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        wh, ww = int(window_size[0]), int(window_size[1])
        if wh < 1 or ww < 1 or num_heads < 1:
            raise ValueError(f"RelPosBias needs a positive window and num_heads >= 1; got window_size="
                             f"{(wh, ww)}, num_heads={num_heads}")
        self.window_size = (wh, ww)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_heads, 2 * wh - 1, 2 * ww - 1))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.init_bias_cache((wh, ww))

    def compute_attention_bias(self, key_h: int, key_w: int) -> torch.Tensor:
        return gather_relative_position_bias(self.relative_position_bias_table, key_h, key_w)

    @torch.jit.unused
    def bias_sources(self) -> list[torch.Tensor]:
        return [self.relative_position_bias_table]

    def forward(self) -> torch.Tensor:
        return self.attention_bias(self.window_size[0], self.window_size[1])

    def fuse(self) -> nn.Module:
        # The deploy form carries the gathered bias (TorchScript and tracing then use it as a constant).
        self.build_bias_cache(self.window_size[0], self.window_size[1])
        return self

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, num_heads={self.relative_position_bias_table.shape[0]}"
