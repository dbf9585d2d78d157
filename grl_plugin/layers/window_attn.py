"""Regional modelling: (shifted) window self-attention on one half of the channels."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .attention import AffineTransform, cosine_attention, normalize_qkv
from .geometry import WindowGeometry


def permute_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x[:, order]`` for (B, L, C) tokens: one gather for the official roll + partition copy
    (:func:`~.geometry.partition_order`)."""
    return x.index_select(1, order)


def merge_heads(y: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * nW, heads, N, d) -> (B, nW * N, heads * d) (a view for SDPA's usual output layout)."""
    return y.transpose(1, 2).reshape(batch, -1, y.shape[1] * y.shape[3])


def partition_heads(tokens: torch.Tensor, n: int, parts: int, heads: int) -> torch.Tensor:
    """Partitioned (B, nW * n, parts * heads * d) tokens -> a (B * nW, n, parts, heads, d) view."""
    return tokens.view(-1, n, parts, heads, tokens.shape[-1] // (parts * heads))


class WindowAttention(nn.Module):
    """Window self-attention of GRL (official ``WindowAttention``; key ``attn_transform``): the
    window half of the QKV projection, (B, L, 3 * dim) tokens of an (H, W) grid -> (B, L, dim).

    Args:
        dim, num_heads: channels of the output (the block's window half), divisible by the heads.
        window_size, window_shift: square window side; shift by half a window (and use the mask).
        attn_drop, attn_impl: attention dropout; ``"sdpa"`` or ``"reference"``.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, window_shift: bool = False,
                 attn_drop: float = 0.0, attn_impl: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"window attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.window_size, self.num_heads, self.window_shift = dim, window_size, num_heads, window_shift
        self.attn_drop, self.attn_impl = attn_drop, attn_impl
        self.lean_backward: Optional[bool] = None  # see cosine_attention; set by layers.configure
        self.attn_transform = AffineTransform(num_heads)

    def forward(self, qkv: torch.Tensor, x_size: Tuple[int, int], geom: WindowGeometry) -> torch.Tensor:
        """qkv (B, L, 3 dim) -> (B, L, dim); tokens are rolled and partitioned by one gather, and
        put back by another."""
        shift = geom.shift if self.window_shift else 0
        order, inverse = geom.orders[1 if shift else 0]
        x = partition_heads(permute_tokens(qkv, order), self.window_size ** 2, 3, self.num_heads)
        fast = self.attn_impl != "reference"
        q, k, v = normalize_qkv(x, self.attn_transform.scale()) if fast else x.permute(2, 0, 3, 1, 4).unbind(0)
        y = cosine_attention(q, k, v, self.attn_transform, geom.table, geom.index, geom.mask if shift else None,
                             self.attn_drop if self.training else 0.0, self.attn_impl, fast, self.lean_backward)
        return permute_tokens(merge_heads(y, qkv.shape[0]), inverse)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, " \
               f"window_shift={self.window_shift}"
