"""GRL: global (anchored stripe), regional (window) and local (conv) modelling.

Weight- and output-compatible with the official implementation: same constructor arguments
and defaults, same ``state_dict`` keys and shapes (without the 13 size-dependent buffers,
which are computed on the fly and cached per size and device), same outputs.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Type

import torch
from torch import nn

from ..layers import ATTN_IMPLS, GRLStage, build_last_conv, configure, grl_geometry, pad_multiple
from ..layers.block import pad_to_multiple, to_map, to_tokens
from .checkpoint import GRL_KWARGS

UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect", "nearest+conv", "")
NUM_OUT_FEATS = 64  # channels of the reconstruction heads (hard-coded in the official code)


class Upsample(nn.Module):
    """Conv + PixelShuffle(2) per factor of 2, or one Conv + PixelShuffle(3) (key ``up``)."""

    def __init__(self, scale: int, num_feat: int):
        super().__init__()
        layers = []
        if scale > 1 and scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"upsampler 'pixelshuffle' supports upscale 2^n and 3, got {scale}")
        self.up = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class UpsampleOneStep(Upsample):
    """One Conv(C, scale^2 * out) + PixelShuffle(scale) (lightweight SR; key ``up``)."""

    def __init__(self, scale: int, num_feat: int, num_out_ch: int):
        nn.Module.__init__(self)
        self.up = nn.Sequential(nn.Conv2d(num_feat, scale ** 2 * num_out_ch, 3, 1, 1),
                                nn.PixelShuffle(scale))


class GRL(nn.Module):
    """The GRL image-restoration network.

    Arguments and defaults are those of the official class. Keys that official
    configs carry but that have no effect there are accepted and ignored: ``name``,
    ``double_window``, ``stripe_square``, ``separable_conv_act``, ``use_buffer``,
    ``use_efficient_buffer``, ``out_proj_type``, ``pretrained_window_size``,
    ``pretrained_stripe_size``, ``offload_to_cpu`` and ``img_size`` (tables and masks are
    built for whatever size comes in). ``fairscale_checkpoint=True`` turns on activation
    checkpointing per block (``torch.utils.checkpoint``); keys are unchanged.

    Plugin-only keyword: ``attn_impl`` -- ``"sdpa"`` (default, fused where available) or
    ``"reference"`` (the literal official computation); both give the same outputs.

    Input (B, in_channels, H, W) of any size: padded right/bottom (reflect, else zeros) to a
    multiple of :attr:`pad_size`, output cropped to (H * upscale, W * upscale). Restoration
    configs (``upsampler=""``) must set ``upscale=1``; the official class default of 2 makes
    the official model -- and so this one -- return the padded output.
    """

    def __init__(self, img_size: int = 64, in_channels: int = 3, out_channels: Optional[int] = None,
                 embed_dim: int = 96, upscale: int = 2, img_range: float = 1.0, upsampler: str = "",
                 depths: Sequence[int] = (6, 6, 6, 6, 6, 6),
                 num_heads_window: Sequence[int] = (3, 3, 3, 3, 3, 3),
                 num_heads_stripe: Sequence[int] = (3, 3, 3, 3, 3, 3), window_size: int = 8,
                 stripe_size: Sequence[Optional[int]] = (8, 8),
                 stripe_groups: Sequence[Optional[int]] = (None, None), stripe_shift: bool = False,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qkv_proj_type: str = "linear",
                 anchor_proj_type: str = "avgpool", anchor_one_stage: bool = True,
                 anchor_window_down_factor: int = 1, out_proj_type: str = "linear",
                 local_connection: bool = False, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, norm_layer: Type[nn.Module] = nn.LayerNorm,
                 pretrained_window_size: Sequence[int] = (0, 0),
                 pretrained_stripe_size: Sequence[int] = (0, 0), conv_type: str = "1conv",
                 init_method: str = "n", fairscale_checkpoint: bool = False,
                 offload_to_cpu: bool = False, euclidean_dist: bool = False, *,
                 attn_impl: str = "sdpa", name: Optional[str] = None, double_window: bool = False,
                 stripe_square: bool = False, separable_conv_act: bool = False,
                 use_buffer: bool = False, use_efficient_buffer: bool = False):
        given = locals()  # the constructor kwargs, kept plain for checkpoints (init_kwargs)
        super().__init__()
        #: The GRL kwargs this network was built with (JSON-able values; what GRLModel stores in
        #: its network files as ``grl_kwargs``). Not part of the state dict.
        self.init_kwargs = {k: v for k, v in ((k, _plain(given[k])) for k in GRL_KWARGS) if v is not _NOT_PLAIN}
        out_channels = out_channels or in_channels
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if upsampler == "nearest+conv" and upscale != 4:
            raise ValueError(f"upsampler 'nearest+conv' supports upscale 4 only, got {upscale}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if euclidean_dist:
            raise ValueError("euclidean_dist=True is not supported (no official config uses it)")
        if not (len(depths) == len(num_heads_window) == len(num_heads_stripe)):
            raise ValueError(f"depths {list(depths)}, num_heads_window {list(num_heads_window)} and "
                             f"num_heads_stripe {list(num_heads_stripe)} must have the same length")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.embed_dim = embed_dim
        self.upscale, self.upsampler, self.img_range = upscale, upsampler, img_range
        self.window_size = int(window_size)
        self.stripe_size = [None if s is None else int(s) for s in stripe_size]
        self.stripe_groups = [None if g is None else int(g) for g in stripe_groups]
        self.anchor_window_down_factor = int(anchor_window_down_factor)
        self.pad_size = pad_multiple(self.window_size, self.stripe_size, self.stripe_groups,
                                     self.anchor_window_down_factor)
        mean = (0.4488, 0.4371, 0.4040) if in_channels == 3 else (0.0,)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)

        self.conv_first = nn.Conv2d(in_channels, embed_dim, 3, 1, 1)
        self.norm_start = norm_layer(embed_dim)
        self.pos_drop = nn.Dropout(p=drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        res_scale = 0.1 if init_method == "r" else 1.0
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(GRLStage(
                embed_dim, depth, num_heads_window[i], num_heads_stripe[i], self.window_size,
                self.stripe_size, self.stripe_groups, stripe_shift,
                drop_path=rates[start:start + depth], conv_type=conv_type,
                use_checkpoint=fairscale_checkpoint,
                anchor_window_down_factor=self.anchor_window_down_factor, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, qkv_proj_type=qkv_proj_type, anchor_proj_type=anchor_proj_type,
                anchor_one_stage=anchor_one_stage, local_connection=local_connection,
                drop=drop_rate, attn_drop=attn_drop_rate, res_scale=res_scale, attn_impl=attn_impl))
        self.norm_end = norm_layer(embed_dim)
        self.conv_after_body = build_last_conv(conv_type, embed_dim)

        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, NUM_OUT_FEATS, 3, 1, 1), nn.LeakyReLU(inplace=True))
            self.upsample = Upsample(upscale, NUM_OUT_FEATS)
            self.conv_last = nn.Conv2d(NUM_OUT_FEATS, out_channels, 3, 1, 1)
        elif upsampler == "pixelshuffledirect":
            self.upsample = UpsampleOneStep(upscale, embed_dim, out_channels)
        elif upsampler == "nearest+conv":
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, NUM_OUT_FEATS, 3, 1, 1), nn.LeakyReLU(inplace=True))
            self.conv_up1 = nn.Conv2d(NUM_OUT_FEATS, NUM_OUT_FEATS, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(NUM_OUT_FEATS, NUM_OUT_FEATS, 3, 1, 1)
            self.conv_hr = nn.Conv2d(NUM_OUT_FEATS, NUM_OUT_FEATS, 3, 1, 1)
            self.conv_last = nn.Conv2d(NUM_OUT_FEATS, out_channels, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        else:
            self.conv_last = nn.Conv2d(embed_dim, out_channels, 3, 1, 1)

        self.apply(_init_weights)
        if init_method in ("l", "w") or "t" in init_method:
            for layer in self.layers:
                _init_stage(layer, init_method)
        configure(self, bias_cache_mib=512)  # this network's own position-bias cache budget

    def set_attn_impl(self, impl: str) -> "GRL":
        """Switch the whole network between the fast path (``"sdpa"``) and ``"reference"``."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        for m in self.modules():
            if hasattr(m, "attn_impl"):
                m.attn_impl = impl
        return self

    def configure(self, **options) -> "GRL":
        """Run-time options of every layer of this network (:func:`grl_plugin.layers.configure`:
        ``lean_backward``, ``bias_cache_mib``); other networks in the process are not affected."""
        configure(self, **options)
        return self

    @property
    def fast(self) -> bool:
        """On the fast path: besides the attention, the feature maps are kept channels-last
        (the token <-> map conversions are views, oneDNN's convolutions are faster)."""
        return self.layers[0].blocks[0].fast

    def geometry(self, size, device):
        """Tables/indices/masks for a padded size (shared cache, see ``layers.geometry``)."""
        return grl_geometry(self.window_size, self.stripe_size, self.stripe_groups,
                            self.anchor_window_down_factor, size, device)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        geom = self.geometry(size, x.device)
        x = self.pos_drop(self.norm_start(to_tokens(x)))
        for layer in self.layers:
            x = layer(x, size, geom)
        return to_map(self.norm_end(x), size, channels_last=self.fast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        x = pad_to_multiple(x, self.pad_size)
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        if self.upsampler == "pixelshuffle":
            f = self.conv_first(x)
            f = self.conv_after_body(self.forward_features(f)) + f
            y = self.conv_last(self.upsample(self.conv_before_upsample(f)))
        elif self.upsampler == "pixelshuffledirect":
            f = self.conv_first(x)
            y = self.upsample(self.conv_after_body(self.forward_features(f)) + f)
        elif self.upsampler == "nearest+conv":
            f = self.conv_first(x)
            f = self.conv_before_upsample(self.conv_after_body(self.forward_features(f)) + f)
            f = self.lrelu(self.conv_up1(nn.functional.interpolate(f, scale_factor=2, mode="nearest")))
            f = self.lrelu(self.conv_up2(nn.functional.interpolate(f, scale_factor=2, mode="nearest")))
            y = self.conv_last(self.lrelu(self.conv_hr(f)))
        else:
            f = self.conv_first(x)
            r = self.conv_after_body(self.forward_features(f)) + f
            y = x + self.conv_last(r) if self.in_channels == self.out_channels else self.conv_last(r)
        y = y / self.img_range + mean
        # Official crop, whatever the head: with upsampler "" and upscale > 1 (no official
        # config) this keeps the padded border, as the official model does.
        y = y[:, :, :H * self.upscale, :W * self.upscale]
        return y.contiguous() if self.fast else y


_NOT_PLAIN = object()


def _plain(value):
    """``value`` as JSON-able python (tuples as lists), or ``_NOT_PLAIN``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):  # numpy integers too
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    return _NOT_PLAIN


def _init_weights(m: nn.Module) -> None:
    """Official init: trunc-normal(0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _init_stage(stage: nn.Module, method: str) -> None:
    """Stage-level init variants ``l``, ``w`` and ``t<k>`` (as the official code)."""
    for name, m in stage.named_modules():
        if "cpb_mlp" in name:
            continue
        if method == "l" and isinstance(m, nn.LayerNorm):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        elif method == "w" and isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.data.mul_(0.1)
        elif "t" in method:
            if isinstance(m, nn.Linear):
                k = int(method[-1]) if method[-1].isdigit() else 1
                nn.init.trunc_normal_(m.weight, std=0.1 ** (len(method) - 1) * k)
            elif isinstance(m, nn.Conv2d):
                m.weight.data.mul_(0.1)
