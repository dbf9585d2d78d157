"""GRL's attention: scaled cosine attention with a continuous position bias (SwinV2-style).

For queries ``q``, keys ``k`` and values ``v`` of one window or stripe::

    logits = cos(q, k) * exp(min(logit_scale, log 100))      # learned per head, clamped
           + 16 * sigmoid(cpb_mlp(table))[index]             # continuous position bias
           + mask                                            # 0, or -100 across shifted regions
    out    = softmax(logits) @ v

:func:`cosine_attention` is the one entry point. ``impl="reference"`` runs these steps one by
one (the official code's; the oracle of every test). ``impl="sdpa"`` (default) computes the same
with faster executors, chosen here and nowhere else:

* tracing / ONNX export and attention dropout: :func:`.kernels.sdpa.explicit`;
* CPU tensors: :func:`.kernels.cpu.attention` (its own forward and backward, see there);
* every other device (CUDA), and under ``torch.compile``: :func:`.kernels.sdpa.attention`
  (PyTorch's fused ``scaled_dot_product_attention`` with the bias as its additive mask).

The position bias of the fast path is formed and cached by :mod:`.bias`; the bias MLP's fast
forms are in :mod:`.cpb`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import bias
from .bias import BiasCacheBudget, bias_cache_bytes
from .cpb import CpbMlp, cpb_values, grid_axes
from .kernels import cpu, sdpa
from .kernels.sdpa import normalize_qkv

__all__ = ["ATTN_IMPLS", "AffineTransform", "BiasCacheBudget", "bias_cache_bytes", "cosine_attention",
           "normalize_qkv"]

ATTN_IMPLS = ("sdpa", "reference")
_MAX_LOGIT_SCALE = math.log(1.0 / 0.01)
_EPS = 1e-12  # F.normalize's default


class AffineTransform(nn.Module):
    """Learned logit scale and continuous relative position bias of one attention.

    State-dict keys (official): ``logit_scale`` (heads, 1, 1), ``cpb_mlp.0`` Linear(2, 512),
    ``cpb_mlp.2`` Linear(512, heads, bias=False).

    Args:
        num_heads: attention heads.
        cpb_hidden: hidden width of the position-bias MLP (512 in GRL).
    """

    def __init__(self, num_heads: int, cpb_hidden: int = 512):
        super().__init__()
        self.num_heads = num_heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_hidden, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(cpb_hidden, num_heads, bias=False))
        self._bias_cache: dict = {}
        self.bias_budget = bias.DEFAULT_BIAS_BUDGET

    def cache_bytes(self) -> int:
        """Bytes held by this module's eval-time position-bias cache."""
        return sum(entry[2].numel() * entry[2].element_size() for entry in self._bias_cache.values())

    def scale(self) -> torch.Tensor:
        """exp(min(logit_scale, log 100)), shape (heads, 1, 1)."""
        return torch.clamp(self.logit_scale, max=_MAX_LOGIT_SCALE).exp()

    def position_bias_reference(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The continuous position bias: MLP on the coordinate table, gathered by the relative
        ``index`` (N1, N2), 16 * sigmoid -> (heads, N1, N2)."""
        values = self.cpb_mlp(table.to(self.logit_scale.dtype)).view(-1, self.num_heads)
        bias = values[index.reshape(-1)].view(*index.shape, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias)

    def position_bias(self, table: torch.Tensor, index: torch.Tensor,
                      mask: Optional[torch.Tensor] = None, plan=None) -> torch.Tensor:
        """:meth:`position_bias_reference` (+ ``mask``) as the fast path forms and caches it
        (:func:`.bias.position_bias`)."""
        return bias.position_bias(self, table, index, mask, plan)

    def bias_values(self, table: torch.Tensor) -> torch.Tensor:
        """16 * sigmoid(cpb_mlp(table)) for every table cell, head-major: (heads, T).

        The MLP is :mod:`.cpb`'s: on CPU, for GRL's large windows and stripes, in its grid form
        (no (T, 512) hidden layer at all); with autograd, by :class:`~.cpb.CpbMlp`, which keeps
        no hidden layer for the backward. Under autocast the MLP and the sigmoid run in
        float32 (as the grid form always does; the table is small) and the values are rounded
        to the autocast dtype once, in training and eval alike (the reference path's MLP runs
        in the autocast dtype: its values differ by that rounding)."""
        device = table.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return self.bias_values(table).to(torch.get_autocast_dtype(device))
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and self.logit_scale.requires_grad:
            if self._bias_cache:  # training: the eval-time biases go stale with the next step
                self._bias_cache = {}
            return 16 * torch.sigmoid(CpbMlp.apply(*self._mlp_inputs(table)))
        return self._bias_values(table)

    def _mlp_inputs(self, table: torch.Tensor):
        """(t (T, 2), w1, b1, w2, axes) for :func:`~.cpb.cpb_values` / :class:`~.cpb.CpbMlp`;
        ``axes`` (:func:`~.cpb.grid_axes`) where the grid form runs, else ``None``."""
        lin1, lin2 = self.cpb_mlp[0], self.cpb_mlp[2]
        t = table.reshape(-1, 2).to(lin1.weight.dtype)
        return t, lin1.weight, lin1.bias, lin2.weight, grid_axes(table)

    def _bias_values(self, table: torch.Tensor) -> torch.Tensor:
        return 16 * torch.sigmoid(cpb_values(*self._mlp_inputs(table)))

    def train(self, mode: bool = True):  # training: the eval-time biases go stale with the next step
        if mode:
            self._bias_cache = {}
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): cached biases are stale
        self._bias_cache = {}
        return super()._apply(fn, recurse)


def cosine_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, transform: AffineTransform,
                     table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     dropout_p: float = 0.0, impl: str = "sdpa", normalized: bool = False,
                     lean_backward: Optional[bool] = None) -> torch.Tensor:
    """Scaled cosine attention with position bias and optional region mask.

    Args:
        q: (B*nW, heads, N1, d) queries; ``k`` (B*nW, heads, N2, d); ``v`` (B*nW, heads, N2, dv).
        transform: the :class:`AffineTransform` holding logit scale and CPB MLP.
        table, index: coordinate table and (N1, N2) relative index from ``layers.geometry``.
        mask: optional (nW, N1, N2) additive mask; the leading dim of ``q`` is batch-major
            over the nW windows (as produced by the window/stripe partition).
        dropout_p: attention dropout (only applied when > 0).
        impl: ``"sdpa"`` or ``"reference"``.
        normalized: ``"sdpa"`` only: q and k are already normalised and q carries the logit
            scale (:func:`normalize_qkv`), as the window and stripe modules hand them over.
        lean_backward: CPU training memory/speed trade-off of ``"sdpa"``: ``None`` (automatic)
            recomputes the probabilities P in the backward where P is larger than the q, k, v
            and output kept anyway, ``True`` always (and keeps no
            output: least memory), ``False`` never (fastest backward).

    Returns:
        (B*nW, heads, N1, dv).
    """
    if impl == "reference":  # the official steps, one by one
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * transform.scale()
        attn = attn + transform.position_bias_reference(table, index).unsqueeze(0)
        if mask is not None:
            n_w, heads, n1, n2 = mask.shape[0], attn.shape[1], attn.shape[2], attn.shape[3]
            attn = (attn.view(-1, n_w, heads, n1, n2) + mask[None, :, None]).view(-1, heads, n1, n2)
        attn = attn.softmax(dim=-1)
        if dropout_p > 0:
            attn = F.dropout(attn, dropout_p)
        return attn @ v
    if impl != "sdpa":
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    if not normalized:  # normalise q and fold the logit scale in with one pass over q: q * (scale / |q|)
        q = q * (transform.scale().to(q.dtype) / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(_EPS))
        k = F.normalize(k, dim=-1, eps=_EPS)
    exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if exporting or dropout_p > 0:  # (in-place ops on views do not export)
        return sdpa.explicit(q, k, v, transform.position_bias(table, index).to(q.dtype), mask, dropout_p,
                             inplace=not exporting)
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        return cpu.attention(q, k, v, transform, table, index, mask, lean_backward)
    return sdpa.attention(q, k, v, transform, table, index, mask)
