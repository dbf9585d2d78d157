"""Global modelling: anchored stripe self-attention. The tokens of a stripe do not attend to
each other: an anchor map ``df`` times smaller first gathers the stripe (anchor -> window,
"a2w"), then every token reads the anchors ("w2a"): ``2 N1 N2`` per stripe instead of ``N1^2``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import AffineTransform, cosine_attention, normalize_qkv
from .geometry import StripeGeometry
from .window_attn import merge_heads, partition_heads, permute_tokens

ANCHOR_PROJ_TYPES = ("avgpool", "maxpool", "conv2d", "separable_conv", "patchmerging")


class AnchorLinear(nn.Module):
    """Pool by ``down_factor`` (avg or max), then a per-pixel Linear (key ``reduction``)."""

    def __init__(self, in_dim: int, out_dim: int, down_factor: int, pooling: str = "avgpool"):
        super().__init__()
        pool = nn.AvgPool2d if pooling == "avgpool" else nn.MaxPool2d
        self.pool = pool(down_factor, down_factor)
        self.reduction = nn.Linear(in_dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # BCHW -> BCHW
        x = self.pool(x)
        return self.reduction(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PatchMerging(nn.Module):
    """Space-to-depth by ``down_factor`` and a Linear without bias (key ``reduction``)."""

    def __init__(self, in_dim: int, out_dim: int, down_factor: int):
        super().__init__()
        self.down_factor = down_factor
        self.reduction = nn.Linear(in_dim * down_factor ** 2, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # BCHW -> BCHW
        f = self.down_factor
        x = rearrange(x, "b c (h f1) (w f2) -> b h w (f1 f2 c)", f1=f, f2=f)
        return self.reduction(x).permute(0, 3, 1, 2)


def _anchor_stage(kind: str, in_dim: int, out_dim: int, factor: int) -> nn.Module:
    if kind in ("avgpool", "maxpool"):
        return AnchorLinear(in_dim, out_dim, factor, kind)
    if kind == "patchmerging":
        return PatchMerging(in_dim, out_dim, factor)
    kernel = factor + 1 if factor > 1 else 1
    if kind == "conv2d":
        return nn.Conv2d(in_dim, out_dim, kernel, factor, kernel // 2)
    if kind == "separable_conv":
        return nn.Sequential(nn.Conv2d(in_dim, in_dim, kernel, factor, kernel // 2, groups=in_dim),
                             nn.Conv2d(in_dim, out_dim, 1))
    raise ValueError(f"anchor_proj_type must be one of {ANCHOR_PROJ_TYPES}, got {kind!r}")


class AnchorProjection(nn.Module):
    """Anchor map from the block input: (B, L, dim) on (H, W) -> (B, H/df, W/df, dim // 2).

    ``one_stage`` reduces by ``df`` at once (every official config: avgpool, key
    ``body.0.reduction``), else in ``log2(df)`` stages of 2."""

    def __init__(self, dim: int, proj_type: str = "avgpool", one_stage: bool = True, down_factor: int = 1):
        super().__init__()
        if one_stage or down_factor == 1:
            self.body = nn.Sequential(_anchor_stage(proj_type, dim, dim // 2, down_factor))
        elif down_factor & (down_factor - 1):
            raise ValueError(f"multi-stage anchor projection needs a power-of-two anchor_window_down_factor, "
                             f"got {down_factor}")
        else:
            stages = down_factor.bit_length() - 1
            self.body = nn.Sequential(*[_anchor_stage(proj_type, dim, dim // 2 if i == stages - 1 else dim, 2)
                                        for i in range(stages)])

    def forward(self, x: torch.Tensor, x_size: Tuple[int, int]) -> torch.Tensor:
        H, W = x_size
        x = rearrange(x, "b (h w) c -> b c h w", h=H, w=W)
        return self.body(x).permute(0, 2, 3, 1)


class AnchorStripeAttention(nn.Module):
    """Two-stage anchored stripe attention (official ``AnchorStripeAttention``).

    Keys: ``attn_transform1`` (anchor -> window), ``attn_transform2`` (window -> anchor).

    Args:
        dim, num_heads: channels of the output (the block's stripe half), divisible by the heads.
        stripe_type: ``"H"`` or ``"W"`` (the reversed stripe size / groups) geometry.
        stripe_shift: shift by half a stripe (and use the region masks).
        attn_drop, attn_impl: attention dropout; ``"sdpa"`` or ``"reference"``.
    """

    def __init__(self, dim: int, num_heads: int, stripe_type: str = "H", stripe_shift: bool = False,
                 attn_drop: float = 0.0, attn_impl: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"stripe attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.stripe_type, self.stripe_shift = dim, num_heads, stripe_type, stripe_shift
        self.attn_drop, self.attn_impl = attn_drop, attn_impl
        self.lean_backward: Optional[bool] = None  # see cosine_attention; set by layers.configure
        self.attn_transform1 = AffineTransform(num_heads)
        self.attn_transform2 = AffineTransform(num_heads)

    def forward(self, qkv: torch.Tensor, anchor: torch.Tensor, x_size: Tuple[int, int],
                geom: StripeGeometry) -> torch.Tensor:
        """qkv (B, L, 3 dim), anchor (B, H/df, W/df, dim) -> (B, L, dim)."""
        B, stripe, df = qkv.shape[0], geom.stripe, geom.df
        masked, fast = self.stripe_shift, self.attn_impl != "reference"
        (order, inverse), (a_order, _) = geom.orders[int(masked)], geom.anchor_orders[int(masked)]
        qkv = partition_heads(permute_tokens(qkv, order), stripe[0] * stripe[1], 3, self.num_heads)
        anchor = permute_tokens(anchor.reshape(B, -1, anchor.shape[-1]), a_order)
        a = partition_heads(anchor, (stripe[0] // df) * (stripe[1] // df), 1, self.num_heads)[:, :, 0].transpose(1, 2)
        if fast:  # q (scaled for stage 2), k and the anchors (keys of stage 2, scaled queries of stage 1) normalised
            q, k, v = normalize_qkv(qkv, self.attn_transform2.scale())
            a = F.normalize(a, dim=-1)
            a_query = a * self.attn_transform1.scale().to(a.dtype)
        else:
            (q, k, v), a_query = qkv.permute(2, 0, 3, 1, 4).unbind(0), a
        drop = self.attn_drop if self.training else 0.0
        y = cosine_attention(a_query, k, v, self.attn_transform1, geom.table, geom.index_a2w,  # anchor -> window
                             geom.mask_a2w if masked else None, drop, self.attn_impl, fast, self.lean_backward)
        y = cosine_attention(q, a, y, self.attn_transform2, geom.table, geom.index_w2a,  # window -> anchor
                             geom.mask_w2a if masked else None, drop, self.attn_impl, fast, self.lean_backward)
        return permute_tokens(merge_heads(y, B), inverse)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, stripe_type={self.stripe_type}, " \
               f"stripe_shift={self.stripe_shift}"
