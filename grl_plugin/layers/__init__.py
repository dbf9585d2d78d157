"""GRL building blocks: pure PyTorch (+ einops), usable in any network.

* :mod:`.attention` -- the one attention core (scaled cosine attention + continuous bias).
* :mod:`.cpb` -- the continuous position-bias MLP, with its CPU form for coordinate grids.
* :mod:`.geometry` -- tables, relative indices and masks, cached per (size, device).
* :class:`WindowAttention`, :class:`AnchorStripeAttention`, :class:`AnchorProjection`.
* :class:`CAB` -- the local conv + channel-attention branch.
* :class:`MixedAttention`, :class:`GRLBlock`, :class:`GRLStage` -- take (B, C, H, W) of any
  size, or (B, L, C) tokens with ``x_size``; :func:`compile_blocks` compiles each block (regional).
"""
from .attention import (ATTN_IMPLS, AffineTransform, BiasCacheBudget, bias_cache_bytes, cosine_attention,
                        normalize_qkv)
from .block import (CONV_TYPES, DropPath, configure, GRLBlock, GRLStage, MixedAttention, Mlp,
                    build_last_conv, compile_blocks, default_heads, pad_to_multiple, to_map, to_tokens,
                    uncompile_blocks)
from .geometry import GRLGeometry, clear_cache, grl_geometry, pad_multiple, stripe_info
from .local import CAB, ChannelAttention
from .stripe_attn import ANCHOR_PROJ_TYPES, AnchorProjection, AnchorStripeAttention
from .window_attn import WindowAttention

__all__ = [
    "ATTN_IMPLS", "ANCHOR_PROJ_TYPES", "CONV_TYPES", "AffineTransform", "AnchorProjection",
    "AnchorStripeAttention", "CAB", "ChannelAttention", "DropPath", "GRLBlock", "GRLGeometry",
    "GRLStage", "MixedAttention", "Mlp", "WindowAttention", "build_last_conv", "clear_cache", "compile_blocks",
    "cosine_attention", "default_heads", "normalize_qkv", "grl_geometry", "pad_multiple", "pad_to_multiple",
    "BiasCacheBudget", "configure", "bias_cache_bytes",
    "stripe_info", "to_map", "to_tokens", "uncompile_blocks",
]
