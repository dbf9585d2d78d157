"""Regional modelling: (shifted) window self-attention on one half of the channels (SPEC §4.2)."""
from __future__ import annotations

from typing import Tuple

import torch
from einops import rearrange
from torch import nn

from .attention import AffineTransform, cosine_attention
from .geometry import WindowGeometry


def window_partition(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, size0 * size1, C), windows in row-major order."""
    return rearrange(x, "b (nh h) (nw w) c -> (b nh nw) (h w) c", h=size[0], w=size[1])


def window_reverse(x: torch.Tensor, size: Tuple[int, int], hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, size0 * size1, C) -> (B, H, W, C)."""
    return rearrange(x, "(b nh nw) (h w) c -> b (nh h) (nw w) c",
                     nh=hw[0] // size[0], nw=hw[1] // size[1], h=size[0], w=size[1])


def split_heads(x: torch.Tensor, parts: int, heads: int):
    """(B', N, parts * heads * d) -> ``parts`` tensors of shape (B', heads, N, d).

    Channel layout of the official QKV projection: (part, head, d), heads contiguous.
    """
    x = rearrange(x, "b n (p h d) -> p b h n d", p=parts, h=heads)
    return x.unbind(0)


class WindowAttention(nn.Module):
    """Window self-attention of GRL (official ``WindowAttention``; key ``attn_transform``).

    Takes the window half of the QKV projection as (B, L, 3 * dim) tokens of an (H, W) grid
    whose sides are multiples of the window, returns (B, L, dim).

    Args:
        dim: channels of the output (the window half of the block's channels).
        window_size: square window side.
        num_heads: heads; ``dim`` must be divisible by it.
        window_shift: roll the grid by half a window (and use the region mask).
        attn_drop: attention dropout.
        attn_impl: ``"sdpa"`` or ``"reference"`` (see :mod:`.attention`).
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, window_shift: bool = False,
                 attn_drop: float = 0.0, attn_impl: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"window attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.window_shift = window_shift
        self.attn_drop = attn_drop
        self.attn_impl = attn_impl
        self.attn_transform = AffineTransform(num_heads)

    def forward(self, qkv: torch.Tensor, x_size: Tuple[int, int], geom: WindowGeometry) -> torch.Tensor:
        H, W = x_size
        B = qkv.shape[0]
        ws = (self.window_size, self.window_size)
        qkv = qkv.view(B, H, W, -1)
        shift = geom.shift if self.window_shift else 0
        if shift:
            qkv = torch.roll(qkv, shifts=(-shift, -shift), dims=(1, 2))
        q, k, v = split_heads(window_partition(qkv, ws), 3, self.num_heads)
        out = cosine_attention(q, k, v, self.attn_transform, geom.table, geom.index,
                               geom.mask if shift else None,
                               self.attn_drop if self.training else 0.0, self.attn_impl)
        out = window_reverse(rearrange(out, "b h n d -> b n (h d)"), ws, (H, W))
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out.reshape(B, H * W, -1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, " \
               f"window_shift={self.window_shift}"
