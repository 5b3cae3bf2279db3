"""Cross-covariance attention (XCA, XCiT arXiv:2106.09681): attention between channels, not tokens.

For each head, ``softmax(temperature * q_hat k_hat^T)`` is a (head_dim x head_dim) matrix built from
l2-normalised q and k (normalised over tokens), and it mixes the channels of v. Cost is linear in the
number of tokens. q and k may come from a down-scaled map (fewer tokens) while v keeps full resolution:
the channel-by-channel matrix does not depend on the token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_covariance_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """q, k: (B, heads, head_dim, M); v: (B, heads, head_dim, N); temperature: (heads, 1, 1).

    Returns (B, heads, head_dim, N).
    """
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temperature  # B, heads, head_dim, head_dim
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p, training)
    return attn @ v
