"""The device-agnostic fast path: PyTorch's ``F.scaled_dot_product_attention`` with the position
bias as its additive mask, and the pieces the CPU executor shares.

* :func:`attention` runs on CUDA (and wherever no device module of its own applies, e.g. under
  ``torch.compile``): the cached bias, one fused SDPA call.
* :func:`run` calls an SDPA-like kernel with bias (+ region mask), the mask as extra q/k
  columns where it factors (:func:`mask_columns`) instead of a per-window bias + mask.
* :func:`explicit` is the plain softmax(q k^T + bias + mask) @ v for attention dropout and for
  tracing / ONNX export.
* :func:`normalize_qkv` splits the partitioned QKV tokens into heads and normalises q and k in
  one pass, the logit scale folded into q (its autograd keeps only its output and the norms).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_EPS = 1e-12  # F.normalize's default
#: From this many query-key pairs per window on, a region mask enters as extra q/k columns
#: instead of a per-window bias + mask.
_MASK_COLUMNS_MIN_PAIRS = 1 << 16


def _head_dim_multiple(q: torch.Tensor) -> int:
    """Head-dim multiple SDPA's fused CUDA kernels need (memory-efficient attention with a mask:
    8 for 16-bit, 4 for float32 inputs); 1 elsewhere."""
    if q.device.type != "cuda":
        return 1
    return 4 if q.dtype == torch.float32 else 8


def fused(q, k, v, bias, mask, head_multiple: Optional[int] = None):
    """``F.scaled_dot_product_attention`` with bias (+ mask) -> (B*nW, heads, N1, dv).

    A head dim the fused kernel cannot take (GRL-B: 30) is zero-padded to ``head_multiple``
    (default :func:`_head_dim_multiple`): zeros change no q.k product (the scale is passed
    explicitly) and give zero output columns, which are cut off."""
    d, dv = q.shape[-1], v.shape[-1]
    m = head_multiple or _head_dim_multiple(q)
    if d % m or dv % m:
        q, k = F.pad(q, (0, -d % m)), F.pad(k, (0, -d % m))
        v = F.pad(v, (0, -dv % m))
    out, _ = run(q, k, v, bias, mask, _sdpa_kernel, lambda width: -width % m)
    return out[..., :dv]


def _sdpa_kernel(q, k, v, attn_mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0), None


def bias_and_mask(transform, table, index, mask, dtype):
    """``(bias, mask)`` to hand a kernel: the cached position bias and the region mask, or,
    without autograd for small windows that mix regions, bias + mask formed (and cached) once
    for every window, mask ``None``; a mask no window mixes regions in is dropped."""
    if mask is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        mask, factors = mask_columns(mask, *index.shape)
        if mask is not None and factors is None:
            return transform.position_bias(table, index, mask).to(dtype), None
    return transform.position_bias(table, index).to(dtype), mask


def attention(q, k, v, transform, table, index, mask):
    """The executor for devices without one of their own (CUDA today) and under
    ``torch.compile``: the cached position bias (:func:`bias_and_mask`) and one :func:`fused`
    SDPA call per attention."""
    return fused(q, k, v, *bias_and_mask(transform, table, index, mask, q.dtype))


def run(q, k, v, bias, mask, kernel, pad=lambda width: 0):
    """Run ``kernel(q, k, v, attn_mask)`` (4-D SDPA operands; it returns ``(out, lse or None)``)
    with bias (+ mask) as the additive mask -> (out (B*nW, heads, N1, dv), lse or None).

    ``bias`` is (heads, N1, N2), broadcast over the batch and the windows (stride 0), or bias +
    mask already formed per window, (nW, heads, N1, N2) (``mask`` then ``None``). A region mask
    enters as R extra columns of q and k (:func:`~..geometry.mask_factors`; zero columns of v
    match them), so that no (windows, heads, N1, N2) bias + mask is written; small windows
    (fewer than :data:`_MASK_COLUMNS_MIN_PAIRS` query-key pairs), masks that do not factor and
    all masks under ``torch.compile`` add the mask to the bias for every window instead.
    ``pad(width)``: zero columns to append to q and k (and v) of that head dim for the kernel."""
    heads, n1, n2 = bias.shape[-3:]
    n = q.shape[0]
    if bias.dim() == 3:
        mask, factors = mask_columns(mask, n1, n2)
        d, dv = q.shape[-1], v.shape[-1]
        if factors is not None and dv <= d + factors[0].shape[-1]:
            out, lse = kernel(*widen(q, k, v, factors, pad(d + factors[0].shape[-1])),
                              bias.unsqueeze(0).expand(n, -1, -1, -1))
            return out[..., :dv], lse
        if mask is None:
            return _padded(kernel, q, k, v, bias.unsqueeze(0).expand(n, -1, -1, -1), pad)
        bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)
    n_w = bias.shape[0]
    if n == n_w:  # one image: its windows are the batch
        return _padded(kernel, q, k, v, bias, pad)
    out, lse = _padded(kernel, *(x.reshape(n // n_w, n_w * heads, *x.shape[2:]) for x in (q, k, v)),
                       bias.view(1, n_w * heads, n1, n2).expand(n // n_w, -1, -1, -1), pad)
    return out.reshape(n, heads, n1, -1), lse if lse is None else lse.reshape(n, heads, n1)


def _padded(kernel, q, k, v, attn_mask, pad):
    """``kernel(q, k, v, attn_mask)`` with ``pad(d)`` zero columns on q, k (and v, where its head
    dim is q's): the q.k products are unchanged, v's zero columns give zero output columns,
    which are cut off."""
    extra = pad(q.shape[-1])
    if not extra or v.shape[-1] != q.shape[-1]:
        return kernel(q, k, v, attn_mask)
    out, lse = kernel(*widen(q, k, v, None, extra), attn_mask)
    return out[..., :-extra], lse


def mask_columns(mask: Optional[torch.Tensor], n1: int, n2: int):
    """``(mask, factors)``: how a region mask enters the product q k^T. ``mask`` is ``None``
    when no window mixes regions; ``factors`` (:func:`~.geometry.mask_factors`) when it goes in
    as extra q/k columns (windows of at least :data:`_MASK_COLUMNS_MIN_PAIRS` pairs, not under
    ``torch.compile``), else ``None`` (add the mask to the logits)."""
    if mask is None or torch.compiler.is_compiling():
        return mask, None
    from ..geometry import mask_factors, mask_split
    if not mask_split(mask)[0].numel():
        return None, None
    return mask, (mask_factors(mask) if n1 * n2 >= _MASK_COLUMNS_MIN_PAIRS else None)


def with_columns(x: torch.Tensor, cols: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """(B*nW, heads, N, d) with per-window columns (nW, N, r) appended (and ``pad`` zero
    columns) -> (B*nW, heads, N, d + r + pad)."""
    n_w, rows, r = cols.shape
    n, heads = x.shape[:2]
    cols = cols.to(x.dtype)
    if pad:
        cols = F.pad(cols, (0, pad))
    cols = cols[None, :, None].expand(n // n_w, n_w, heads, rows, r + pad)
    return torch.cat([x.view(n // n_w, n_w, heads, rows, -1), cols], -1).view(n, heads, rows, -1)


def widen(q, k, v, factors, pad: int):
    """q and k with a region mask's columns (``factors`` from :func:`mask_columns`, or
    ``None``) and ``pad`` zero columns after them; v zero-padded to their width (the kernels
    take one head dim; v's extra columns give output columns that are cut off)."""
    if factors is not None:
        q, k = with_columns(q, factors[0], pad), with_columns(k, factors[1], pad)
    elif pad:
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
    return q, k, v if v.shape[-1] == q.shape[-1] else F.pad(v, (0, q.shape[-1] - v.shape[-1]))


def explicit(q, k, v, bias, mask, dropout_p, inplace):
    """softmax(q k^T + bias [+ mask]) @ v with autograd (dropout, tracing/ONNX export)."""
    attn = q @ k.transpose(-2, -1)
    heads, n1, n2 = attn.shape[1:]
    if mask is None:
        attn = attn.add_(bias) if inplace else attn + bias
    else:
        n_w = mask.shape[0]
        full = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)
        if inplace:
            attn.view(-1, n_w, heads, n1, n2).add_(full)
        else:
            attn = (attn.view(-1, n_w, heads, n1, n2) + full).view(-1, heads, n1, n2)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def _qkv_factor(scale: torch.Tensor, heads: int, dtype) -> torch.Tensor:
    """(2, 1, heads, 1, 1): the logit scale for the queries, 1 for the keys."""
    scale = scale.reshape(1, heads, 1, 1).to(dtype)
    return torch.stack([scale, torch.ones_like(scale)])


class _NormalizeQKV(torch.autograd.Function):
    """Autograd of :func:`normalize_qkv`: saves only its output (which the attention keeps
    anyway) and the norms, not the partitioned QKV input, and writes the input gradient
    straight into the input's layout (no zero-filled slice gradients to add up).

    Per row, with ``u = y / f`` (f: the logit scale for queries, 1 for keys):
    ``dx = (f dy - y (u . dy)) / |x|`` (no projection term where the norm was clamped to eps),
    ``d scale = sum over queries of u . dy``."""

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
        if d_v is None:
            d_view[2].zero_()
        else:
            d_view[2].copy_(d_v)
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
    """Split partitioned QKV tokens into heads and normalise the queries and keys, in one copy.

    Args:
        qkv: (B', N, 3, heads, d): tokens of B' windows/stripes, channels in the official
            (part, head, d) order (a view of the partitioned QKV projection).
        scale: (heads, 1, 1) logit scale (:meth:`~..attention.AffineTransform.scale`).

    Returns:
        q, k, v, each (B', heads, N, d): ``q * scale / |q|``, ``k / |k|`` (the logit scale
        folded into the queries, ready for :func:`~..attention.cosine_attention` with ``normalized=True``)
        and ``v``; the input is never written. With autograd they are contiguous views of one
        new tensor, and only it and the norms are kept for the backward (the backward's
        products then read them without copies); without, q and k are a new tensor in the
        input's layout and v a view of the input.
    """
    factor = _qkv_factor(scale, qkv.shape[-2], qkv.dtype)
    if not (torch.is_grad_enabled() and (qkv.requires_grad or factor.requires_grad)):
        # no copy of v, and q, k copied without reordering (the CPU kernels read them strided)
        qk = qkv[:, :, :2].clone(memory_format=torch.contiguous_format)
        qk.mul_(factor.view(2, -1, 1) / torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min_(_EPS))
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, qkv[:, :, 2].transpose(1, 2)
    if not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        return _NormalizeQKV.apply(qkv, factor)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = q * (factor[0] / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(_EPS))
    return q, F.normalize(k, dim=-1, eps=_EPS), v
