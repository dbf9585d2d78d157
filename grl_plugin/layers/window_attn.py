"""Regional modelling: (shifted) window self-attention on one half of the channels."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from einops import rearrange
from torch import nn

from .attention import AffineTransform, cosine_attention, normalize_qkv
from .geometry import WindowGeometry


def window_partition(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, size0 * size1, C), windows in row-major order."""
    return rearrange(x, "b (nh h) (nw w) c -> (b nh nw) (h w) c", h=size[0], w=size[1])


def window_reverse(x: torch.Tensor, size: Tuple[int, int], hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, size0 * size1, C) -> (B, H, W, C)."""
    return rearrange(x, "(b nh nw) (h w) c -> b (nh h) (nw w) c",
                     nh=hw[0] // size[0], nw=hw[1] // size[1], h=size[0], w=size[1])


def split_heads(x: torch.Tensor, parts: int, heads: int):
    """(B', N, parts * heads * d) -> ``parts`` tensors (B', heads, N, d) (official (part, head, d) layout)."""
    x = rearrange(x, "b n (p h d) -> p b h n d", p=parts, h=heads)
    return x.unbind(0)


def permute_tokens(x: torch.Tensor, order: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x[:, order]`` for (B, L, C) tokens: one gather for the official roll + partition copy
    (:func:`~.geometry.partition_order`); without autograd into ``out`` when given."""
    return x.index_select(1, order) if out is None else torch.index_select(x, 1, order, out=out)


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
        self.lean_backward: Optional[bool] = None  # see cosine_attention; set by layers.configure
        self.attn_transform = AffineTransform(num_heads)

    def forward(self, qkv: torch.Tensor, x_size: Tuple[int, int], geom: WindowGeometry,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """qkv (B, L, 3 dim) -> (B, L, dim), written into ``out`` when given (no autograd)."""
        H, W = x_size
        B = qkv.shape[0]
        ws = (self.window_size, self.window_size)
        shift = geom.shift if self.window_shift else 0

        def attend(q, k, v, normalized=False):
            return cosine_attention(q, k, v, self.attn_transform, geom.table, geom.index,
                                    geom.mask if shift else None,
                                    self.attn_drop if self.training else 0.0, self.attn_impl, normalized,
                                    self.lean_backward)

        if self.attn_impl != "reference":  # one gather in, one out (no rolls, no partition copies)
            order, inverse = geom.orders[1 if shift else 0]
            qkv = partition_heads(permute_tokens(qkv, order), ws[0] * ws[1], 3, self.num_heads)
            y = attend(*normalize_qkv(qkv, self.attn_transform.scale()), normalized=True)
            return permute_tokens(merge_heads(y, B), inverse, out)
        # the official steps: roll, partition, attention, reverse, roll back
        qkv = qkv.view(B, H, W, -1)
        if shift:
            qkv = torch.roll(qkv, shifts=(-shift, -shift), dims=(1, 2))
        y = attend(*split_heads(window_partition(qkv, ws), 3, self.num_heads))
        y = window_reverse(rearrange(y, "b h n d -> b n (h d)"), ws, (H, W))
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        y = y.reshape(B, H * W, -1)
        return y if out is None else out.copy_(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, " \
               f"window_shift={self.window_shift}"
