"""The generic fast path: ``F.scaled_dot_product_attention`` with the position bias as its
additive mask (CUDA, and any device under ``torch.compile``), plus the pieces the CPU executor
shares: :func:`run` (a region mask as extra q/k columns where it factors) and
:func:`normalize_qkv`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_EPS = 1e-12  # F.normalize's default
#: From this many query-key pairs per window on, a region mask enters as extra q/k columns.
_MASK_COLUMNS_MIN_PAIRS = 1 << 16


def _sdpa_kernel(q, k, v, attn_mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0), None


def fused(q, k, v, bias, mask):
    """``F.scaled_dot_product_attention`` with bias (+ mask) -> (B*nW, heads, N1, dv)."""
    return run(q, k, v, bias, mask, _sdpa_kernel)[0]


def bias_and_mask(transform, table, index, mask, dtype):
    """``(bias, mask)`` for a kernel: the cached position bias and the region mask; without
    autograd, for small windows that mix regions, bias + mask formed (and cached) once, mask
    ``None``; a mask in which no window mixes regions is dropped."""
    if mask is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        mask, factors = mask_columns(mask, *index.shape)
        if mask is not None and factors is None:
            return transform.position_bias(table, index, mask).to(dtype), None
    return transform.position_bias(table, index).to(dtype), mask


def attention(q, k, v, transform, table, index, mask):
    """The executor of devices without one of their own, and under ``torch.compile``."""
    return fused(q, k, v, *bias_and_mask(transform, table, index, mask, q.dtype))


def run(q, k, v, bias, mask, kernel):
    """``kernel(q, k, v, attn_mask) -> (out, lse or None)`` (4-D SDPA operands) with ``bias``
    (heads, N1, N2) (+ ``mask``) or bias + mask per window (nW, heads, N1, N2) as the additive
    mask; a mask that factors (:func:`mask_columns`) enters as extra q/k columns instead."""
    heads, n1, n2 = bias.shape[-3:]
    n, dv = q.shape[0], v.shape[-1]
    if bias.dim() == 3:
        mask, factors = mask_columns(mask, n1, n2)
        if factors is not None and dv <= q.shape[-1] + factors[0].shape[-1]:
            out, lse = kernel(*widen(q, k, v, factors), bias.expand(n, -1, -1, -1))
            return out[..., :dv], lse
        if mask is None:
            return kernel(q, k, v, bias.expand(n, -1, -1, -1))
        bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)
    n_w = bias.shape[0]
    if n == n_w:  # one image: its windows are the batch
        return kernel(q, k, v, bias)
    out, lse = kernel(*(x.reshape(n // n_w, n_w * heads, *x.shape[2:]) for x in (q, k, v)),
                      bias.view(1, n_w * heads, n1, n2).expand(n // n_w, -1, -1, -1))
    return out.reshape(n, heads, n1, -1), None if lse is None else lse.reshape(n, heads, n1)


def mask_columns(mask: Optional[torch.Tensor], n1: int, n2: int):
    """``(mask, factors)``: ``mask`` ``None`` where no window mixes regions; ``factors``
    (:func:`~..geometry.mask_factors`) where the mask goes in as extra q/k columns (windows of
    at least :data:`_MASK_COLUMNS_MIN_PAIRS` pairs, not compiling), else ``None``."""
    if mask is None or torch.compiler.is_compiling():
        return mask, None
    from ..geometry import mask_factors, masked_windows
    if not masked_windows(mask).numel():
        return None, None
    return mask, (mask_factors(mask) if n1 * n2 >= _MASK_COLUMNS_MIN_PAIRS else None)


def with_columns(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B*nW, heads, N, d) with per-window columns (nW, N, r) appended -> (B*nW, heads, N, d + r)."""
    n_w, rows, r = cols.shape
    n, heads = x.shape[:2]
    cols = cols.to(x.dtype)[None, :, None].expand(n // n_w, n_w, heads, rows, r)
    return torch.cat([x.view(n // n_w, n_w, heads, rows, -1), cols], -1).view(n, heads, rows, -1)


def widen(q, k, v, factors):
    """q and k with a mask's columns (``factors`` or ``None``); v zero-padded to their width
    (one head dim for the kernels; the extra output columns are cut off)."""
    if factors is not None:
        q, k = with_columns(q, factors[0]), with_columns(k, factors[1])
    return q, k, v if v.shape[-1] == q.shape[-1] else F.pad(v, (0, q.shape[-1] - v.shape[-1]))


class _NormalizeQKV(torch.autograd.Function):
    """Autograd of :func:`normalize_qkv` that keeps only its output and the norms and writes
    the input gradient in the input's layout. Per row, with ``u = y / f`` (f: the logit scale
    for queries, 1 for keys): ``dx = (f dy - y (u . dy)) / |x|`` (no projection term where
    the norm was clamped), ``d scale = sum over queries of u . dy``."""

    @staticmethod
    def forward(ctx, qkv, factor):
        y = qkv.permute(2, 0, 3, 1, 4).clone(memory_format=torch.contiguous_format)  # (3, B', heads, N, d)
        inv = torch.linalg.vector_norm(y[:2], dim=-1, keepdim=True).clamp_min_(_EPS).reciprocal_()
        y[:2].mul_(inv * factor)
        ctx.save_for_backward(y, inv, factor)
        ctx.layout = qkv.shape
        return y.unbind(0)

    @staticmethod
    def backward(ctx, d_q, d_k, d_v):
        y, inv, factor = ctx.saved_tensors
        d_qkv = y.new_empty(ctx.layout)
        d_view = d_qkv.permute(2, 0, 3, 1, 4)  # (3, B', heads, N, d) view of the result
        d_view[2].zero_() if d_v is None else d_view[2].copy_(d_v)
        d_factor = torch.zeros_like(factor) if ctx.needs_input_grad[1] else None
        for i, dy in enumerate((d_q, d_k)):
            if dy is None:
                d_view[i].zero_()
                continue
            u_dy = torch.linalg.vecdot(y[i], dy, dim=-1).unsqueeze(-1).div_(factor[i])
            if d_factor is not None and i == 0:  # (the keys' factor is a constant 1)
                d_factor[0] = u_dy.sum((0, 2), keepdim=True)
            u_dy.masked_fill_(inv[i] >= 1.0 / _EPS, 0.0).mul_(inv[i])  # clamped: x / eps
            torch.addcmul(dy * (factor[i] * inv[i]), y[i], u_dy, value=-1.0, out=d_view[i])
        return d_qkv, d_factor


def normalize_qkv(qkv: torch.Tensor, scale: torch.Tensor):
    """Partitioned QKV tokens (B', N, 3, heads, d) -> q, k, v (B', heads, N, d) with
    ``q * scale / |q|`` and ``k / |k|`` (ready for ``cosine_attention(..., normalized=True)``);
    ``scale`` is :meth:`~..attention.AffineTransform.scale`. The input is never written."""
    scale = scale.reshape(1, -1, 1, 1).to(qkv.dtype)
    factor = torch.stack([scale, torch.ones_like(scale)])  # (2, 1, heads, 1, 1)
    if not (torch.is_grad_enabled() and (qkv.requires_grad or factor.requires_grad)):
        # q and k copied in the input's layout (the kernels read them strided), v a view
        qk = qkv[:, :, :2].clone(memory_format=torch.contiguous_format)
        qk.mul_(factor.view(2, -1, 1) / torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min_(_EPS))
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, qkv[:, :, 2].transpose(1, 2)
    if not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        return _NormalizeQKV.apply(qkv, factor)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = q * (factor[0] / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(_EPS))
    return q, F.normalize(k, dim=-1, eps=_EPS), v
