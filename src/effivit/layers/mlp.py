"""Feed-forward blocks on tokens (B, N, C) and on maps (B, C, H, W)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Mlp(nn.Module):
    """fc1 -> act -> drop -> (norm) -> fc2 -> drop over the last dimension."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class ConvMlp(nn.Module):
    """The same MLP on (B, C, H, W) maps with 1x1 convs (no layout round trip)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1, bias=bias)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.norm(self.fc1(x)))))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer, arXiv:2002.05202) with an optional norm on the hidden features (EVA-02's
    sub-LN, arXiv:2303.11331): ``fc2(norm(silu(x W_g + b_g) * (x W_x + b_x)))``.

    Two parameter layouts of the same maths, named as timm names them so checkpoints load unchanged:

    - ``packed=True``: one ``fc1`` of width ``2 * hidden`` whose first half is the gate (timm's ``GluMlp``
      with ``gate_last=False``: EVA-02 tiny/small);
    - ``packed=False``: ``fc1_g`` (gate) and ``fc1_x`` (timm's ``SwiGLU``: EVA-02 base/large).

    ``fuse()`` (deploy) turns the split form into the packed one (one matrix product instead of two) and folds
    the norm's affine part into ``fc2``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
        drop: float = 0.0,
        packed: bool = False,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.hidden_features = hidden_features
        if packed:
            self.fc1 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
            self.fc1_g = self.fc1_x = None
        else:
            self.fc1 = None
            self.fc1_g = nn.Linear(in_features, hidden_features, bias=bias)
            self.fc1_x = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc1 is not None:
            gate, x = self.fc1(x).chunk(2, dim=-1)
        else:
            assert self.fc1_g is not None and self.fc1_x is not None
            gate, x = self.fc1_g(x), self.fc1_x(x)
        x = self.drop1(self.act(gate) * x)
        return self.drop2(self.fc2(self.norm(x)))

    def fuse(self) -> nn.Module:
        from ..deploy.fold import fold_affine_into_input

        if self.fc1 is None:
            assert self.fc1_g is not None and self.fc1_x is not None
            g, v = self.fc1_g, self.fc1_x
            fc1 = nn.Linear(g.in_features, 2 * self.hidden_features, bias=g.bias is not None).to(g.weight)
            with torch.no_grad():
                fc1.weight.copy_(torch.cat((g.weight, v.weight)))
                if g.bias is not None and v.bias is not None:
                    fc1.bias.copy_(torch.cat((g.bias, v.bias)))
            self.fc1, self.fc1_g, self.fc1_x = fc1, None, None
        norm = self.norm
        if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.weight is not None:
            # fc2(n * w + b) = (W diag(w)) n + (W b + c): the norm keeps only its normalisation.
            shift = norm.bias.detach() if norm.bias is not None else torch.zeros_like(norm.weight)
            self.fc2 = fold_affine_into_input(self.fc2, norm.weight.detach(), shift)
            self.norm = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
        return self
