"""The GRL transformer block and stage.

:class:`MixedAttention` splits one QKV projection into a window half (regional) and a stripe
half (global); :class:`GRLBlock` adds the res-post-norm residuals, the MLP and optionally the
local conv branch; :class:`GRLStage` stacks blocks in the official shift / stripe pattern with
a closing convolution. Each takes (B, C, H, W) maps of any size (padded inside, cropped) or
(B, L, C) tokens + ``x_size``.
"""
from __future__ import annotations

import types
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AffineTransform, BiasCacheBudget
from .geometry import GRLGeometry, grl_geometry, pad_multiple
from .local import CAB
from .stripe_attn import AnchorProjection, AnchorStripeAttention
from .window_attn import WindowAttention

CONV_TYPES = ("1conv", "3conv", "1conv1x1", "linear")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (B, C, H, W) right/bottom to multiples of ``multiple``: reflect, or zeros where the
    pad is not smaller than the side (as the official GRL)."""
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    if not ph and not pw:
        return x
    try:
        return F.pad(x, (0, pw, 0, ph), mode="reflect")
    except (RuntimeError, NotImplementedError):
        return F.pad(x, (0, pw, 0, ph), mode="constant")


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def to_map(x: torch.Tensor, x_size: Tuple[int, int], channels_last: bool = False) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W): a copy, or with ``channels_last`` a channels-last view."""
    if channels_last:
        return x.reshape(x.shape[0], x_size[0], x_size[1], x.shape[-1]).permute(0, 3, 1, 2)
    return rearrange(x, "b (h w) c -> b c h w", h=x_size[0], w=x_size[1])


class DropPath(nn.Module):
    """Stochastic depth per sample, in training (eager: ``bernoulli_(1 - drop_prob)`` as the
    official code; compiled: ``uniform < keep`` with ``keep`` a 0-dim buffer, so blocks of
    different rates share one graph under :func:`compile_blocks`)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    @property
    def drop_prob(self) -> float:
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self._drop_prob = float(value)
        self._drops = self._drop_prob != 0.0  # (compiled graphs are guarded on this bool, not the rate)
        old = self._buffers.get("_keep")
        self.register_buffer("_keep", torch.tensor(1.0 - self._drop_prob, device=None if old is None else old.device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self._drops):
            return x
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        if torch.compiler.is_compiling():
            keep = self._keep.to(x.dtype)
            return x * ((torch.rand(shape, device=x.device, dtype=x.dtype) < keep).to(x.dtype) / keep)
        keep = 1.0 - self.drop_prob
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


_UNSET = object()


def configure(module: nn.Module, *, lean_backward=_UNSET, bias_cache_mib=_UNSET) -> nn.Module:
    """Set run-time options on every GRL layer inside ``module`` (nothing outside); returns it.
    ``lean_backward``: ``None`` (automatic), ``True`` (least training memory: probabilities, MLP
    hidden layers, post-norm inputs recomputed in the backward) or ``False`` (fastest: all kept).
    ``bias_cache_mib``: a new :class:`~.bias.BiasCacheBudget` for the module's attentions (0: none)."""
    if bias_cache_mib is not _UNSET:
        budget = BiasCacheBudget(bias_cache_mib)
        for m in module.modules():
            if isinstance(m, AffineTransform):
                m.bias_budget, m._bias_cache = budget, {}
    if lean_backward is not _UNSET:
        if lean_backward is not None and not isinstance(lean_backward, bool):
            raise ValueError(f"lean_backward must be True, False or None, got {lean_backward!r}")
        for m in module.modules():
            if hasattr(m, "lean_backward"):
                m.lean_backward = lean_backward
    return module


def _recompute(x: torch.Tensor, module: nn.Module, *dropouts: nn.Dropout) -> bool:
    """Whether ``module``'s layers (+ post-norm) are recomputed in the backward, their input
    kept: with autograd, ``dropouts`` inactive, no autocast or tracing, ``lean_backward`` not False."""
    return (torch.is_grad_enabled() and (not module.training or all(d.p == 0 for d in dropouts))
            and not torch.is_autocast_enabled(x.device.type)
            and not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())
            and module.lean_backward is not False)


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (keys ``fc1``, ``fc2``); ``lean`` (the fast path,
    as ``attn_impl``): MLP and the post-norm of ``forward(x, norm)`` recomputed in the backward."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, lean: bool = True):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop)
        self.fc2, self.drop2 = nn.Linear(hidden, dim), nn.Dropout(drop)
        self.attn_impl = "sdpa" if lean else "reference"
        self.lean_backward: Optional[bool] = None  # see _recompute; set by layers.configure

    @property
    def lean(self) -> bool:
        return self.attn_impl != "reference"

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        if self.lean and _recompute(x, self, self.drop1, self.drop2):
            return checkpoint(self._layers, x, norm, use_reentrant=False)
        return self._layers(x, norm)

    def _layers(self, x: torch.Tensor, norm: Optional[nn.Module]) -> torch.Tensor:
        y = self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
        return y if norm is None else norm(y)


class PixelLinear(nn.Linear):
    """A Linear(C, C) applied to every pixel of a (B, C, H, W) map (``conv_type="linear"``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def build_last_conv(conv_type: str, dim: int) -> nn.Module:
    """The convolution closing each stage and the body (official ``build_last_conv``)."""
    if conv_type == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if conv_type == "3conv":
        return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
                             nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, inplace=True),
                             nn.Conv2d(dim // 4, dim, 3, 1, 1))
    if conv_type == "1conv1x1":
        return nn.Conv2d(dim, dim, 1, 1, 0)
    if conv_type == "linear":
        return PixelLinear(dim, dim)
    raise ValueError(f"conv_type must be one of {CONV_TYPES}, got {conv_type!r}")


class QKVProjection(nn.Module):
    """Token-wise QKV projection (key ``body``; channels (window, stripe) x (q, k, v) x heads)."""

    def __init__(self, dim: int, qkv_bias: bool = True, proj_type: str = "linear"):
        super().__init__()
        if proj_type != "linear":
            raise ValueError(f"qkv_proj_type {proj_type!r} is not supported (official configs use 'linear')")
        self.body = nn.Linear(dim, dim * 3, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class MixedAttention(nn.Module):
    """Window attention on half of the channels, anchored stripe attention on the other half.

    Keys: ``qkv.body``, ``anchor.body.*``, ``window_attn.attn_transform``,
    ``stripe_attn.attn_transform{1,2}``, ``proj``.

    Args:
        dim: channels (even; each half divisible by its head count).
        num_heads_window, num_heads_stripe: heads of the two halves.
        window_size, window_shift: square window side; shifted windows.
        stripe_size, stripe_groups: the network's stripe pairs (``None`` allowed; reversed for
            ``stripe_type="W"``, else ``"H"``); stripe_shift: shifted stripes.
        anchor_window_down_factor: anchor down-sampling ``df``.
        qkv_bias, qkv_proj_type, anchor_proj_type, anchor_one_stage: projections.
        attn_drop, proj_drop, attn_impl: dropouts; ``"sdpa"`` or ``"reference"``.
    """

    def __init__(self, dim: int, num_heads_window: int, num_heads_stripe: int, window_size: int = 8,
                 window_shift: bool = False, stripe_size: Sequence[Optional[int]] = (8, 8),
                 stripe_groups: Sequence[Optional[int]] = (None, None), stripe_type: str = "H",
                 stripe_shift: bool = False, anchor_window_down_factor: int = 1,
                 qkv_bias: bool = True, qkv_proj_type: str = "linear",
                 anchor_proj_type: str = "avgpool", anchor_one_stage: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, attn_impl: str = "sdpa"):
        super().__init__()
        if dim % 2:
            raise ValueError(f"mixed attention: dim must be even, got {dim}")
        if stripe_type not in ("H", "W"):
            raise ValueError(f"stripe_type must be 'H' or 'W', got {stripe_type!r}")
        self.dim, self.window_size, self.stripe_type = dim, int(window_size), stripe_type
        self.stripe_size, self.stripe_groups = tuple(stripe_size), tuple(stripe_groups)
        self.anchor_window_down_factor = int(anchor_window_down_factor)
        self.qkv = QKVProjection(dim, qkv_bias, qkv_proj_type)
        self.anchor = AnchorProjection(dim, anchor_proj_type, anchor_one_stage, anchor_window_down_factor)
        self.window_attn = WindowAttention(dim // 2, window_size, num_heads_window, window_shift, attn_drop, attn_impl)
        self.stripe_attn = AnchorStripeAttention(dim // 2, num_heads_stripe, stripe_type, stripe_shift, attn_drop,
                                                 attn_impl)
        self.proj, self.proj_drop = nn.Linear(dim, dim), nn.Dropout(proj_drop)
        self.lean_backward: Optional[bool] = None  # see _recompute; set by layers.configure

    @property
    def pad_multiple(self) -> int:  # the sides of a token grid must be multiples of it
        return pad_multiple(self.window_size, self.stripe_size, self.stripe_groups, self.anchor_window_down_factor)

    def geometry(self, x_size: Tuple[int, int], device) -> GRLGeometry:
        """Tables, indices and masks for a grid of ``x_size`` (cached)."""
        if x_size[0] % self.pad_multiple or x_size[1] % self.pad_multiple:
            raise ValueError(f"token grid {x_size[0]}x{x_size[1]} is not a multiple of {self.pad_multiple}; "
                             f"pass (B, C, H, W) maps to have them padded")
        return grl_geometry(self.window_size, self.stripe_size, self.stripe_groups, self.anchor_window_down_factor,
                            x_size, device)

    def forward(self, x: torch.Tensor, x_size: Tuple[int, int],
                geom: Optional[GRLGeometry] = None, norm: Optional[nn.Module] = None) -> torch.Tensor:
        """``proj(attention)``, or ``norm(proj(attention))`` (recomputed as in :class:`Mlp`)."""
        geom = geom or self.geometry(x_size, x.device)
        stripe_geom = geom.stripe_h if self.stripe_type == "H" else geom.stripe_v
        fast = self.window_attn.attn_impl != "reference"
        qkv_window, qkv_stripe = self.qkv(x).chunk(2, dim=-1)
        anchor = self.anchor(x, x_size)
        y = torch.cat([self.window_attn(qkv_window, x_size, geom.window),
                       self.stripe_attn(qkv_stripe, anchor, x_size, stripe_geom)], dim=-1)
        if fast and norm is not None and _recompute(x, self, self.proj_drop):
            return checkpoint(self._project, y, norm, use_reentrant=False)  # keeps y only
        return self._project(y, norm)

    def _project(self, y: torch.Tensor, norm: Optional[nn.Module]) -> torch.Tensor:
        y = self.proj_drop(self.proj(y))
        return y if norm is None else norm(y)


class _MapOrTokens(nn.Module):
    """Lets a token module also take (B, C, H, W) maps of any size (padded, then cropped)."""

    pad_multiple: int

    def forward(self, x: torch.Tensor, x_size: Optional[Tuple[int, int]] = None,
                geom: Optional[GRLGeometry] = None) -> torch.Tensor:
        if x.dim() == 3:
            if x_size is None:
                raise ValueError(f"{type(self).__name__}: (B, L, C) input needs x_size=(H, W)")
            return self.forward_tokens(x, tuple(x_size), geom)
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected (B, C, H, W) or (B, L, C), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        xp = pad_to_multiple(x, self.pad_multiple)
        size = tuple(xp.shape[-2:])
        y = self.forward_tokens(to_tokens(xp), size, geom)
        return to_map(y, size)[..., :H, :W]


class GRLBlock(_MapOrTokens):
    """GRL's mixed-attention transformer block (official ``EfficientMixAttnTransformerBlock``).

    ``x = x + s drop_path(norm1(attn(x))) [+ CAB(x)]``, ``x = x + s drop_path(norm2(mlp(x)))``, ``s = res_scale``.

    Args:
        dim, mlp_ratio: channels; MLP hidden width / dim.
        num_heads_window, num_heads_stripe: heads of the two halves (default :func:`default_heads`).
        window_size ... anchor_one_stage, attn_drop, attn_impl: see :class:`MixedAttention`.
        local_connection: add the conv + channel attention branch (:class:`CAB`).
        drop, drop_path, res_scale: dropout (MLP, projection); stochastic depth; residual scale.
    """

    def __init__(self, dim: int, num_heads_window: Optional[int] = None,
                 num_heads_stripe: Optional[int] = None, window_size: int = 8,
                 window_shift: bool = False, stripe_size: Sequence[Optional[int]] = (8, 8),
                 stripe_groups: Sequence[Optional[int]] = (None, None), stripe_type: str = "H",
                 stripe_shift: bool = False, anchor_window_down_factor: int = 1,
                 mlp_ratio: float = 2.0, qkv_bias: bool = True, qkv_proj_type: str = "linear",
                 anchor_proj_type: str = "avgpool", anchor_one_stage: bool = True,
                 local_connection: bool = False, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, res_scale: float = 1.0, attn_impl: str = "sdpa"):
        super().__init__()
        self.dim, self.res_scale = dim, res_scale
        self.attn = MixedAttention(dim, num_heads_window or default_heads(dim), num_heads_stripe or default_heads(dim),
                                   window_size, window_shift, stripe_size, stripe_groups, stripe_type, stripe_shift,
                                   anchor_window_down_factor, qkv_bias, qkv_proj_type, anchor_proj_type,
                                   anchor_one_stage, attn_drop, drop, attn_impl)
        self.norm1 = nn.LayerNorm(dim)
        self.conv = CAB(dim) if local_connection else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, lean=attn_impl != "reference")
        self.norm2 = nn.LayerNorm(dim)

    @property
    def pad_multiple(self) -> int:
        return self.attn.pad_multiple

    @property
    def fast(self) -> bool:  # attn_impl is not "reference"
        return self.attn.window_attn.attn_impl != "reference"

    def forward_tokens(self, x: torch.Tensor, x_size: Tuple[int, int],
                       geom: Optional[GRLGeometry] = None) -> torch.Tensor:
        y = self._residual(x, self.attn(x, x_size, geom, norm=self.norm1))
        if self.conv is not None:
            y = y + self.conv(x, x_size, channels_last=self.fast)
        return self._residual(y, self.mlp(y, norm=self.norm2))

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return torch.add(x, self.drop_path(branch), alpha=self.res_scale)


def default_heads(dim: int) -> int:
    """A head count for one attention half of ``dim`` channels: head dim near 32."""
    half = dim // 2
    for heads in range(max(half // 32, 1), 0, -1):
        if half % heads == 0:
            return heads
    return 1


class GRLStage(_MapOrTokens):
    """A stack of :class:`GRLBlock` with the official per-block pattern and a closing conv.

    Block ``j``: shifted windows and stripe type ``"H"`` for even ``j`` (``"W"`` for odd), shifted
    stripes when ``stripe_shift`` and ``j % 4 in (2, 3)``. Output ``conv(blocks(x)) + x``; keys
    ``blocks.{j}``, ``conv``.

    Args:
        dim, depth, drop_path: channels; number of blocks; a rate, or one per block.
        conv_type: closing convolution, one of :data:`CONV_TYPES`.
        use_checkpoint: recompute each block in the backward (activation checkpointing).
        **block_kwargs: for every :class:`GRLBlock` (not ``window_shift``, ``stripe_type``).
    """

    def __init__(self, dim: int, depth: int, num_heads_window: Optional[int] = None,
                 num_heads_stripe: Optional[int] = None, window_size: int = 8,
                 stripe_size: Sequence[Optional[int]] = (8, 8),
                 stripe_groups: Sequence[Optional[int]] = (None, None), stripe_shift: bool = False,
                 drop_path=0.0, conv_type: str = "1conv", use_checkpoint: bool = False,
                 **block_kwargs):
        super().__init__()
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            GRLBlock(dim, num_heads_window, num_heads_stripe, window_size, window_shift=j % 2 == 0,
                     stripe_size=stripe_size, stripe_groups=stripe_groups,
                     stripe_type="H" if j % 2 == 0 else "W",
                     stripe_shift=bool(stripe_shift) and j % 4 in (2, 3), drop_path=rates[j],
                     **block_kwargs)
            for j in range(depth)])
        self.conv = build_last_conv(conv_type, dim)

    @property
    def pad_multiple(self) -> int:
        return self.blocks[0].pad_multiple

    def forward_tokens(self, x: torch.Tensor, x_size: Tuple[int, int],
                       geom: Optional[GRLGeometry] = None) -> torch.Tensor:
        geom = geom or self.blocks[0].attn.geometry(x_size, x.device)
        y, ckpt = x, self.use_checkpoint and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            y = checkpoint(blk.forward_tokens, y, x_size, geom, use_reentrant=False) if ckpt else \
                blk.forward_tokens(y, x_size, geom)
        return to_tokens(self.conv(to_map(y, x_size, channels_last=self.blocks[0].fast))) + x


def compile_blocks(module: nn.Module, **compile_kwargs) -> nn.Module:
    """Regional compilation: ``torch.compile`` (``compile_kwargs``) the token forward of every
    :class:`GRLBlock` in ``module`` in place (one graph per block layout, at most 5 in GRL's
    pattern); the state dict is unchanged, :func:`uncompile_blocks` undoes it."""
    compiled = {}
    for m in module.modules():
        if isinstance(m, GRLBlock):
            if type(m) not in compiled:
                compiled[type(m)] = torch.compile(type(m).forward_tokens, **compile_kwargs)
            m.forward_tokens = types.MethodType(compiled[type(m)], m)
    return module


def uncompile_blocks(module: nn.Module) -> nn.Module:
    """Undo :func:`compile_blocks` (the blocks' plain token forward again)."""
    for m in module.modules():
        if isinstance(m, GRLBlock):
            m.__dict__.pop("forward_tokens", None)
    return module
