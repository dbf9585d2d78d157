"""GRL's attention: scaled cosine attention with a continuous position bias (SwinV2-style).

For queries ``q``, keys ``k`` and values ``v`` of one window or stripe::

    logits = cos(q, k) * exp(min(logit_scale, log 100))      # learned per head, clamped
           + 16 * sigmoid(cpb_mlp(table))[index]             # continuous position bias
           + mask                                            # 0, or -100 across shifted regions
    out    = softmax(logits) @ v

:func:`cosine_attention` is the one entry point. ``impl="reference"`` runs these steps one by
one, as the official code (the oracle of every test); ``impl="sdpa"`` (default) dispatches, here
only, to a faster executor: plain operations for export and dropout, :func:`.kernels.cpu.attention`
on CPU, :func:`.kernels.sdpa.attention` (fused SDPA) elsewhere and under ``torch.compile``.
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

__all__ = ["ATTN_IMPLS", "AffineTransform", "BiasCacheBudget", "bias_cache_bytes", "cosine_attention", "normalize_qkv"]

ATTN_IMPLS = ("sdpa", "reference")
_MAX_LOGIT_SCALE = math.log(1.0 / 0.01)
_EPS = 1e-12  # F.normalize's default


class AffineTransform(nn.Module):
    """Learned logit scale and continuous position bias of one attention: ``logit_scale`` (heads,
    1, 1), ``cpb_mlp.0`` Linear(2, ``cpb_hidden``), ``cpb_mlp.2`` Linear(``cpb_hidden``, heads, bias=False)."""

    def __init__(self, num_heads: int, cpb_hidden: int = 512):
        super().__init__()
        self.num_heads = num_heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_hidden, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(cpb_hidden, num_heads, bias=False))
        self._bias_cache, self.bias_budget = {}, bias.DEFAULT_BIAS_BUDGET  # (see .bias)

    def cache_bytes(self) -> int:
        """Bytes held by this module's eval-time position-bias cache (:mod:`.bias`)."""
        return sum(entry[2].numel() * entry[2].element_size() for entry in self._bias_cache.values())

    def scale(self) -> torch.Tensor:
        """exp(min(logit_scale, log 100)), shape (heads, 1, 1)."""
        return torch.clamp(self.logit_scale, max=_MAX_LOGIT_SCALE).exp()

    def position_bias_reference(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """16 * sigmoid(cpb_mlp(table)) gathered by the relative ``index`` (N1, N2) -> (heads, N1, N2)."""
        values = self.cpb_mlp(table.to(self.logit_scale.dtype)).view(-1, self.num_heads)
        bias = values[index.reshape(-1)].view(*index.shape, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias)

    def position_bias(self, table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor] = None, plan=None):
        """:meth:`position_bias_reference` (+ ``mask``) as the fast path caches it (:mod:`.bias`)."""
        return bias.position_bias(self, table, index, mask, plan)

    def bias_values(self, table: torch.Tensor) -> torch.Tensor:
        """16 * sigmoid(cpb_mlp(table)) per table cell, head-major (heads, T), by :mod:`.cpb`.
        Under autocast computed in float32 and rounded once (the reference path's MLP runs in
        the autocast dtype: its values differ by that rounding)."""
        device = table.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return self.bias_values(table).to(torch.get_autocast_dtype(device))
        lin1, lin2 = self.cpb_mlp[0], self.cpb_mlp[2]
        inputs = (table.reshape(-1, 2).to(lin1.weight.dtype), lin1.weight, lin1.bias, lin2.weight, grid_axes(table))
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and self.logit_scale.requires_grad:
            self._bias_cache = {}  # training: the eval-time biases go stale with the next step
            return 16 * torch.sigmoid(CpbMlp.apply(*inputs))
        return 16 * torch.sigmoid(cpb_values(*inputs))

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
        q, k, v: (B*nW, heads, N1, d), (B*nW, heads, N2, d), (B*nW, heads, N2, dv) -> (B*nW, heads, N1, dv).
        transform: the :class:`AffineTransform` holding logit scale and CPB MLP.
        table, index: coordinate table and (N1, N2) relative index (``layers.geometry``).
        mask: optional (nW, N1, N2) additive mask; ``q``'s leading dim is batch-major over nW.
        dropout_p, impl: attention dropout; ``"sdpa"`` or ``"reference"``.
        normalized: ``"sdpa"`` only: q and k come normalised, q scaled (:func:`normalize_qkv`).
        lean_backward: CPU training trade-off of ``"sdpa"``: ``None`` recomputes the probabilities
            in the backward where larger than q, k, v and the output, ``True`` always, ``False`` never.
    """
    if impl == "reference":  # the official steps, one by one
        logits = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * transform.scale()
        return _softmax_attend(logits, transform.position_bias_reference(table, index), mask, dropout_p, v)
    if impl != "sdpa":
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    if not normalized:  # q * (scale / |q|): normalised and scaled in one pass
        q = q * (transform.scale().to(q.dtype) / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(_EPS))
        k = F.normalize(k, dim=-1, eps=_EPS)
    if dropout_p > 0 or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():  # plain operations
        return _softmax_attend(q @ k.transpose(-2, -1), transform.position_bias(table, index).to(q.dtype), mask,
                               dropout_p, v)
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        return cpu.attention(q, k, v, transform, table, index, mask, lean_backward)
    return sdpa.attention(q, k, v, transform, table, index, mask)


def _softmax_attend(logits, bias, mask, dropout_p, v):
    """softmax(logits + bias [+ mask]) [dropout] @ v, the mask (nW, N1, N2) batch-major over nW."""
    attn = logits + bias.unsqueeze(0)
    if mask is not None:
        heads, n1, n2 = attn.shape[1:]
        attn = (attn.view(-1, mask.shape[0], heads, n1, n2) + mask[None, :, None]).view(-1, heads, n1, n2)
    attn = attn.softmax(dim=-1)
    return (F.dropout(attn, dropout_p) if dropout_p > 0 else attn) @ v
