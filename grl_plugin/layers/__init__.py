"""GRL building blocks in pure PyTorch (+ einops): :mod:`.attention` (the attention math and its
one dispatch), :mod:`.geometry` (cached tables, indices, masks), regional / global / local
modules, and :class:`GRLBlock` / :class:`GRLStage`, which take (B, C, H, W) maps of any size."""
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
    "ATTN_IMPLS", "ANCHOR_PROJ_TYPES", "CONV_TYPES", "AffineTransform", "AnchorProjection", "AnchorStripeAttention",
    "BiasCacheBudget", "CAB", "ChannelAttention", "DropPath", "GRLBlock", "GRLGeometry", "GRLStage", "MixedAttention",
    "Mlp", "WindowAttention", "bias_cache_bytes", "build_last_conv", "clear_cache", "compile_blocks", "configure",
    "cosine_attention", "default_heads", "grl_geometry", "normalize_qkv", "pad_multiple", "pad_to_multiple",
    "stripe_info", "to_map", "to_tokens", "uncompile_blocks"]
