"""GRL blocks inside other networks.

* :class:`WindowAttention2d`, :class:`AnchorStripeAttention2d` -- standalone (B, C, H, W)
  versions of GRL's two attentions: they own their QKV / anchor / output projections, pad the
  map to the multiple they need, take their tables and masks from the shared geometry cache
  (:func:`grl_plugin.layers.grl_geometry`) and crop back.
* :class:`GRLUNet` -- a Restormer/UNet-like encoder-decoder whose levels are GRL stages or
  plain conv residual blocks, configured level by level (registered arch ``GRLUNet``).
* :class:`GRLInserted` -- wraps any registered BasicSR arch and appends GRL stages after
  named submodules (registered arch ``GRLInserted``), so GRL runs inside e.g. EDSR from YAML.

Pure PyTorch (+ the plugin's layers); BasicSR is imported only by :class:`GRLInserted` to build
its backbone.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..layers import (AnchorStripeAttention, GRLStage, WindowAttention, default_heads, grl_geometry,
                      pad_multiple, pad_to_multiple, to_map, to_tokens)
from ..layers.stripe_attn import AnchorLinear

__all__ = ["WindowAttention2d", "AnchorStripeAttention2d", "ResBlock", "GRLUNet", "GRLInserted"]


def _heads(dim: int, num_heads: Optional[int]) -> int:
    # default_heads(d) picks heads for a *half* of d channels: ask for a whole ``dim`` here
    return num_heads or default_heads(2 * dim)


# ------------------------------------------------------------------------ standalone attentions
class WindowAttention2d(nn.Module):
    """(Shifted) window self-attention of GRL on a (B, C, H, W) map of any size.

    ``qkv`` (Linear C -> 3C) -> :class:`~grl_plugin.layers.WindowAttention` -> ``proj``.
    The map is padded (reflect) to a multiple of ``window_size`` and cropped back.

    Args:
        dim: channels (divisible by ``num_heads``).
        num_heads: heads (default: head dim near 32).
        window_size: square window side.
        window_shift: shift the windows by half a window (with the region mask).
        qkv_bias: bias of the QKV projection.
        attn_drop, proj_drop: dropouts.
        attn_impl: ``"sdpa"`` or ``"reference"``.
    """

    def __init__(self, dim: int, num_heads: Optional[int] = None, window_size: int = 8,
                 window_shift: bool = False, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_impl: str = "sdpa"):
        super().__init__()
        self.dim, self.window_size = dim, int(window_size)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn = WindowAttention(dim, self.window_size, _heads(dim, num_heads), window_shift,
                                    attn_drop, attn_impl)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def pad_multiple(self) -> int:
        return self.window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        xp = pad_to_multiple(x, self.pad_multiple)
        size = (xp.shape[-2], xp.shape[-1])
        ws = self.window_size
        geom = grl_geometry(ws, (ws, ws), (None, None), 1, size, x.device).window
        y = self.attn(self.qkv(to_tokens(xp)), size, geom)
        return to_map(self.proj_drop(self.proj(y)), size)[..., :H, :W]


class AnchorStripeAttention2d(nn.Module):
    """Anchored stripe attention of GRL on a (B, C, H, W) map of any size.

    ``qkv`` (Linear C -> 3C) and an anchor map (``anchor``: avg/max-pool by
    ``anchor_window_down_factor`` + Linear C -> C) -> :class:`~grl_plugin.layers.AnchorStripeAttention`
    -> ``proj``. The map is padded to the stripe / group multiple and cropped back.

    Args:
        dim: channels (divisible by ``num_heads``).
        num_heads: heads (default: head dim near 32).
        stripe_size, stripe_groups: stripe extent per axis (``None`` entries allowed; a group
            count makes that axis follow the resolution).
        stripe_type: ``"H"`` (as given) or ``"W"`` (size / groups reversed).
        stripe_shift: shift the stripes by half a stripe (with the region masks).
        anchor_window_down_factor: anchor down-sampling ``df`` (stripe sizes divisible by it).
        anchor_pooling: ``"avgpool"`` or ``"maxpool"``.
        qkv_bias, attn_drop, proj_drop, attn_impl: as in :class:`WindowAttention2d`.
    """

    def __init__(self, dim: int, num_heads: Optional[int] = None,
                 stripe_size: Sequence[Optional[int]] = (8, 8),
                 stripe_groups: Sequence[Optional[int]] = (None, None), stripe_type: str = "H",
                 stripe_shift: bool = False, anchor_window_down_factor: int = 2,
                 anchor_pooling: str = "avgpool", qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_impl: str = "sdpa"):
        super().__init__()
        if stripe_type not in ("H", "W"):
            raise ValueError(f"stripe_type must be 'H' or 'W', got {stripe_type!r}")
        if anchor_pooling not in ("avgpool", "maxpool"):
            raise ValueError(f"anchor_pooling must be 'avgpool' or 'maxpool', got {anchor_pooling!r}")
        df = int(anchor_window_down_factor)
        for s in stripe_size:
            if s is not None and int(s) % df:
                raise ValueError(f"stripe_size {tuple(stripe_size)} must be divisible by "
                                 f"anchor_window_down_factor {df}")
        self.dim, self.df = dim, df
        self.stripe_size, self.stripe_groups = tuple(stripe_size), tuple(stripe_groups)
        self.stripe_type = stripe_type
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.anchor = AnchorLinear(dim, dim, df, anchor_pooling)
        self.attn = AnchorStripeAttention(dim, _heads(dim, num_heads), stripe_type, stripe_shift,
                                          attn_drop, attn_impl)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def pad_multiple(self) -> int:
        return pad_multiple(self.df, self.stripe_size, self.stripe_groups, self.df)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        xp = pad_to_multiple(x, self.pad_multiple)
        size = (xp.shape[-2], xp.shape[-1])
        geom = grl_geometry(self.df, self.stripe_size, self.stripe_groups, self.df, size, x.device)
        geom = geom.stripe_h if self.stripe_type == "H" else geom.stripe_v
        anchor = self.anchor(xp).permute(0, 2, 3, 1)            # (B, H/df, W/df, C)
        y = self.attn(self.qkv(to_tokens(xp)), anchor, size, geom)
        return to_map(self.proj_drop(self.proj(y)), size)[..., :H, :W]


# ----------------------------------------------------------------------------------- GRLUNet
class ResBlock(nn.Module):
    """conv3x3 -> LeakyReLU(0.2) -> conv3x3, plus the input (the ``grl: false`` levels)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
                                  nn.Conv2d(dim, dim, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


_LEVEL_KEYS = ("dim", "depth", "grl", "decoder_depth")


def _level_body(level: Mapping[str, Any], depth: int, index: int) -> Tuple[nn.Module, int]:
    """(module, pad multiple at the level's resolution) for one level spec."""
    dim = int(level["dim"])
    if depth <= 0:
        return nn.Identity(), 1
    if not level.get("grl", True):
        extra = sorted(set(level) - set(_LEVEL_KEYS))
        if extra:
            raise ValueError(f"GRLUNet level {index}: {extra} are GRL stage options but the level "
                             f"has grl: false")
        return nn.Sequential(*[ResBlock(dim) for _ in range(depth)]), 1
    kwargs = {k: v for k, v in level.items() if k not in _LEVEL_KEYS}
    try:
        stage = GRLStage(dim, depth, **kwargs)
    except TypeError as err:
        raise ValueError(f"GRLUNet level {index}: {err}") from None
    return stage, stage.pad_multiple


class GRLUNet(nn.Module):
    """A Restormer/UNet-like encoder-decoder with GRL stages at chosen levels.

    Level ``i`` works at 1 / 2**i of the input resolution. The first ``N - 1`` levels have an
    encoder body, a down-sampling to the next level and, on the way back, an up-sampling
    (conv + pixel-shuffle), a 1x1 fusion of the skip connection and a decoder body; the last
    level is the bottleneck. A body is a :class:`~grl_plugin.layers.GRLStage` (``grl: true``,
    default) or ``depth`` conv residual blocks (``grl: false``). Output:
    ``x + conv_last(features)`` (``global_residual``, needs ``out_channels == in_channels``).

    Inputs of any size: the map is padded (reflect) to the least common multiple of the total
    down factor and every GRL level's padding unit (scaled to the input resolution), then the
    output is cropped back.

    Args:
        in_channels: input channels.
        out_channels: output channels (default: ``in_channels``).
        levels: one dict per level, e.g. ``{dim: 32, depth: 2, grl: true, window_size: 8,
            stripe_size: [16, 16], anchor_window_down_factor: 2}``. Keys: ``dim``, ``depth``,
            ``grl`` (default true), ``decoder_depth`` (default ``depth``; ignored for the
            bottleneck) and, for GRL levels, any :class:`~grl_plugin.layers.GRLStage` /
            :class:`~grl_plugin.layers.GRLBlock` keyword (``num_heads_window``,
            ``stripe_groups``, ``stripe_shift``, ``mlp_ratio``, ``local_connection``,
            ``conv_type``, ``use_checkpoint``, ...).
        downsample: ``"pixelunshuffle"`` (conv to dim/4 + pixel-unshuffle; next dim divisible
            by 4) or ``"conv"`` (4x4 stride-2 conv).
        global_residual: add the input to the output.
        img_range: inputs are in [0, img_range] (only rescales before / after the network).
    """

    def __init__(self, in_channels: int = 3, out_channels: Optional[int] = None,
                 levels: Optional[Sequence[Mapping[str, Any]]] = None,
                 downsample: str = "pixelunshuffle", global_residual: bool = True,
                 img_range: float = 1.0):
        super().__init__()
        if levels is None:
            levels = [dict(dim=32, depth=2, grl=False), dict(dim=64, depth=2, window_size=8, stripe_size=(8, 8),
                                                              anchor_window_down_factor=2)]
        levels = [dict(lv) for lv in levels]
        if not levels:
            raise ValueError("GRLUNet: levels must not be empty")
        for i, lv in enumerate(levels):
            if "dim" not in lv or "depth" not in lv:
                raise ValueError(f"GRLUNet level {i}: 'dim' and 'depth' are required, got {sorted(lv)}")
        if downsample not in ("pixelunshuffle", "conv"):
            raise ValueError(f"GRLUNet: downsample must be 'pixelunshuffle' or 'conv', got {downsample!r}")
        out_channels = out_channels or in_channels
        if global_residual and out_channels != in_channels:
            raise ValueError(f"GRLUNet: global_residual needs out_channels == in_channels "
                             f"({out_channels} != {in_channels})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.global_residual, self.img_range = global_residual, float(img_range)
        self.levels = levels
        dims = [int(lv["dim"]) for lv in levels]
        n = len(levels)

        self.conv_first = nn.Conv2d(in_channels, dims[0], 3, 1, 1)
        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        self.ups, self.fuses, self.decoders = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        multiple = 2 ** (n - 1)
        for i, lv in enumerate(levels):
            body, m = _level_body(lv, int(lv["depth"]), i)
            multiple = math.lcm(multiple, m * 2 ** i)
            if i == n - 1:
                self.bottleneck = body
                break
            self.encoders.append(body)
            if downsample == "pixelunshuffle":
                if dims[i + 1] % 4:
                    raise ValueError(f"GRLUNet level {i + 1}: dim {dims[i + 1]} must be divisible by 4 "
                                     f"with downsample: pixelunshuffle")
                self.downs.append(nn.Sequential(nn.Conv2d(dims[i], dims[i + 1] // 4, 3, 1, 1),
                                                nn.PixelUnshuffle(2)))
            else:
                self.downs.append(nn.Conv2d(dims[i], dims[i + 1], 4, 2, 1))
            self.ups.append(nn.Sequential(nn.Conv2d(dims[i + 1], dims[i] * 4, 3, 1, 1), nn.PixelShuffle(2)))
            self.fuses.append(nn.Conv2d(2 * dims[i], dims[i], 1))
            dec, m = _level_body(lv, int(lv.get("decoder_depth", lv["depth"])), i)
            multiple = math.lcm(multiple, m * 2 ** i)
            self.decoders.append(dec)
        self.conv_last = nn.Conv2d(dims[0], out_channels, 3, 1, 1)
        self.pad_multiple = multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        inp = x
        x = pad_to_multiple(x / self.img_range if self.img_range != 1.0 else x, self.pad_multiple)
        feat = self.conv_first(x)
        skips = []
        for enc, down in zip(self.encoders, self.downs):
            feat = enc(feat)
            skips.append(feat)
            feat = down(feat)
        feat = self.bottleneck(feat)
        for i in reversed(range(len(self.decoders))):
            feat = self.fuses[i](torch.cat([self.ups[i](feat), skips[i]], dim=1))
            feat = self.decoders[i](feat)
        out = self.conv_last(feat)[..., :H, :W]
        if self.img_range != 1.0:
            out = out * self.img_range
        return out + inp if self.global_residual else out


# ------------------------------------------------------------------------------- GRLInserted
def _in_channels(kwargs: Mapping[str, Any]) -> int:
    for key in ("num_in_ch", "in_channels", "in_nc", "in_chans"):
        if key in kwargs:
            return int(kwargs[key])
    return 3


class GRLInserted(nn.Module):
    """A registered BasicSR arch with :class:`~grl_plugin.layers.GRLStage` s appended after
    named submodules: ``module`` becomes ``nn.Sequential(module, GRLStage(...))``.

    Args:
        backbone: ``{type: <registered arch>, **kwargs}`` (as ``network_g``).
        insert: one dict per insertion: ``after`` (dotted module path in the backbone, e.g.
            ``body.3``), ``depth`` (default 2), ``dim`` (optional: the module's output channels,
            checked) and any other :class:`~grl_plugin.layers.GRLStage` keyword.
        probe_size: side of the dry-forward input used to find (and check) the channel count
            at each insertion point.

    State-dict keys: ``backbone.<path>.0.*`` (the original module), ``backbone.<path>.1.*``
    (the GRL stage); everything else keeps its backbone key under ``backbone.``.
    """

    def __init__(self, backbone: Mapping[str, Any], insert: Sequence[Mapping[str, Any]],
                 probe_size: int = 16):
        super().__init__()
        from basicsr.utils.registry import ARCH_REGISTRY

        spec = dict(copy.deepcopy(dict(backbone)))
        arch = spec.pop("type", None)
        if arch is None:
            raise ValueError("GRLInserted: backbone needs a 'type' (a registered arch name)")
        if arch not in ARCH_REGISTRY:
            raise ValueError(f"GRLInserted: backbone type {arch!r} is not a registered arch")
        self.backbone = ARCH_REGISTRY.get(arch)(**spec)
        inserts = [dict(item) for item in insert]
        if not inserts:
            raise ValueError("GRLInserted: insert must list at least one {after: <module path>, ...}")
        paths = []
        for item in inserts:
            path = item.get("after")
            if not isinstance(path, str):
                raise ValueError(f"GRLInserted: each insert needs 'after: <module path>', got {item}")
            try:
                self.backbone.get_submodule(path)
            except AttributeError:
                tops = ", ".join(name for name, _ in self.backbone.named_children())
                raise ValueError(f"GRLInserted: no module {path!r} in {arch} (top-level modules: "
                                 f"{tops})") from None
            if path in paths:
                raise ValueError(f"GRLInserted: module {path!r} is listed twice in insert")
            paths.append(path)
        channels = self._probe(paths, _in_channels(spec), probe_size, arch)
        for item, path in zip(inserts, paths):
            c = channels[path]
            dim = int(item.pop("dim", c))
            item.pop("after")
            if dim != c:
                raise ValueError(f"GRLInserted: {arch}.{path} outputs {c} channels but the insert "
                                 f"says dim: {dim}")
            depth = int(item.pop("depth", 2))
            try:
                stage = GRLStage(dim, depth, **item)
            except (TypeError, ValueError) as err:
                raise ValueError(f"GRLInserted: insert after {path}: {err}") from None
            parent_path, _, name = path.rpartition(".")
            parent = self.backbone.get_submodule(parent_path) if parent_path else self.backbone
            setattr(parent, name, nn.Sequential(self.backbone.get_submodule(path), stage))
        self.inserted = paths

    def _probe(self, paths: List[str], in_ch: int, size: int, arch: str) -> Dict[str, int]:
        """Output channels of each named module, from one dry forward pass."""
        found: Dict[str, Any] = {}
        hooks = [self.backbone.get_submodule(p).register_forward_hook(
            lambda _m, _i, out, p=p: found.setdefault(p, out)) for p in paths]
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                self.backbone(torch.zeros(1, in_ch, size, size))
        except Exception as err:  # noqa: BLE001 - one line that says what failed
            raise ValueError(f"GRLInserted: dry forward of {arch} on a 1x{in_ch}x{size}x{size} input "
                             f"failed: {type(err).__name__}: {err}") from None
        finally:
            for h in hooks:
                h.remove()
            self.backbone.train(was_training)
        out = {}
        for p in paths:
            t = found.get(p)
            if t is None:
                raise ValueError(f"GRLInserted: {arch}.{p} is not called by {arch}.forward")
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"GRLInserted: {arch}.{p} does not output a (B, C, H, W) map "
                                 f"(got {shape}); insert after a conv/residual block")
            out[p] = int(t.shape[1])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)
