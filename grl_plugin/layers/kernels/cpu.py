"""The CPU executor of :func:`~..attention.cosine_attention`: in training :class:`_LeanAttention`
(fused forward, blocked recomputing backward), in eval the fused kernel with the cached bias,
or :func:`_grouped_flash` for large windows and stripes whose bias is not cached. Large windows
and stripes take their keys in reverse order, which makes the bias the table seen through
strides (:func:`~..bias.reversed_keys`). Probabilities are floored at 1e-20 (no subnormals).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..bias import gather_bias, reversed_keys, strided_bias
from ..geometry import flip_keys
from . import sdpa

#: Bytes of logits the backward handles at a time (blocks that stay in the cache).
_BACKWARD_BLOCK_BYTES = 8 * 2 ** 20
#: The fused CPU kernel behind SDPA, called directly for its row log-sum-exp (None if absent).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_LOG_FLOOR = math.log(1e-20)


def attention(q, k, v, transform, table, index, mask, lean_backward: Optional[bool] = None):
    """The CPU attention -> (B*nW, heads, N1, dv)."""
    width = table.shape[-2]
    if torch.is_grad_enabled():
        values = transform.bias_values(table).to(q.dtype)
        if any(t.requires_grad for t in (q, k, v, values)):
            return _LeanAttention.apply(q, k, v.contiguous(), values, index, mask,
                                        _keep_probs(q, k, v, lean_backward), width, lean_backward is True)
        return sdpa.fused(q, k, v, gather_bias(values, index), mask)
    plan = reversed_keys(index, width) if _FLASH_CPU is not None else None
    if plan is not None:
        bias = transform.position_bias(table, index, plan=plan).to(q.dtype)
        if bias.dim() == 3:  # cached in full
            return sdpa.fused(q, k, v, bias, mask)
        out = _grouped_flash(q, k.flip(-2), v.flip(-2), bias, None if mask is None else flip_keys(mask))
        if out is not None:
            return out
    return sdpa.fused(q, k, v, *sdpa.bias_and_mask(transform, table, index, mask, q.dtype))


def _keep_probs(q, k, v, lean_backward: Optional[bool]) -> bool:
    """Whether the backward keeps P: never for ``lean_backward`` True, always for False, else
    where P is no larger than the q, k, v and output kept anyway."""
    if lean_backward is not None:
        return not lean_backward
    n1, n2, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    return n1 * n2 <= n1 * d + n2 * d + n2 * dv + n1 * dv


def _grouped_flash(q, k, v, bias, mask) -> Optional[torch.Tensor]:
    """The fused kernel for keys (``k``, ``v``, ``mask``) in reverse order with the bias as
    :func:`~..bias.grouped_bias` runs (heads, Qx, Qy + Ky - 1, Kx) -> (B*nW, heads, N1, dv);
    ``None`` where a mask does not factor or v's head dim exceeds q's.

    The kernel reads its mask with strides (batch, head, row); for the queries of one grid
    column qx, rows qy = 0, 1, ... start Kx cells apart in ``bias[:, qx]``. So each window is
    one call whose "heads" are the (head, qx) pairs and whose rows are that column's qy."""
    heads, qx, rows, kx = bias.shape
    n, _, n1, d = q.shape
    n2, dv = k.shape[-2], v.shape[-1]
    qy = n1 // qx
    mask, factors = sdpa.mask_columns(mask, n1, n2)
    if (mask is not None and factors is None) or dv > d + (0 if factors is None else factors[0].shape[-1]):
        return None
    q, k, v = sdpa.widen(q, k, v, factors)
    d = q.shape[-1]
    attn_mask = bias.as_strided((heads, qx, qy, n2), (qx * rows * kx, rows * kx, kx, 1))
    out = q.new_empty(n, heads, qy, qx, dv)
    for i in range(n):
        o = _FLASH_CPU(q[i].view(heads, qy, qx, d).transpose(1, 2), k[i].unsqueeze(1).expand(heads, qx, n2, d),
                       v[i].unsqueeze(1).expand(heads, qx, n2, d), 0.0, False, attn_mask=attn_mask, scale=1.0)[0]
        out[i].copy_(o[..., :dv].transpose(1, 2))
    return out.view(n, heads, n1, dv)


def _fused_with_lse(q, k, v, bias, mask):  # -> (out, the rows' log-sum-exp (B*nW, heads, N1))
    return sdpa.run(q, k, v, bias, mask, lambda qs, ks, vs, m: _FLASH_CPU(qs, ks, vs, 0.0, False, attn_mask=m, scale=1.0))


def _logit_operands(q, k, mask, lse=None):
    """``(qx, kx_t, mask, lse)`` for :func:`_logits_block`: a factoring region mask and (in
    float32 and wider) -lse enter as extra columns of q and k ([q, a, -lse] . [k, b, 1]); the
    mask and lse returned are what is left to add (``None`` when folded in)."""
    mask, factors = sdpa.mask_columns(mask, q.shape[-2], k.shape[-2])
    if factors is not None:
        q, k, mask = sdpa.with_columns(q, factors[0]), sdpa.with_columns(k, factors[1]), None
    if lse is not None and q.element_size() >= 4:
        q = torch.cat([q, -lse.unsqueeze(-1).to(q.dtype)], -1)
        k = torch.cat([k, k.new_ones(k.shape[:-1] + (1,))], -1)
        lse = None
    return q, k.transpose(-2, -1), mask, lse


def _logits_block(qx, kx_t, bias, mask, lse, rows: slice = slice(None)):
    """Rows ``rows`` of q k^T + bias (+ mask) (- lse) as one new tensor. ``bias``: (heads, N1,
    N2), (nW, heads, N1, N2), or the table as (heads, Qy, Qx, Ky, Kx) for reversed keys
    (:func:`~..bias.strided_bias`; ``rows`` are then whole query rows)."""
    s = torch.matmul(qx[:, :, rows], kx_t)
    if lse is not None:
        s.sub_(lse[:, :, rows].unsqueeze(-1))
    if bias.dim() == 5:
        width = bias.shape[2]
        start, stop, _ = rows.indices(bias.shape[1] * width)
        bias = bias[:, start // width:-(-stop // width)]
    else:
        bias = bias[..., rows, :]
    s.view(-1, *bias.shape).add_(bias)
    if mask is not None:
        s.view(-1, mask.shape[0], *s.shape[1:]).add_(mask[:, rows].unsqueeze(1).to(s.dtype))
    return s


def _softmax_(s: torch.Tensor) -> torch.Tensor:
    """In-place softmax over the last dim, probabilities floored at 1e-20."""
    s.sub_(s.amax(-1, keepdim=True)).clamp_min_(_LOG_FLOOR).exp_()
    return s.div_(s.sum(-1, keepdim=True))


def _probs_(s: torch.Tensor) -> torch.Tensor:
    """exp(s) in place, floored at 1e-20, for logits that include -lse."""
    return s.clamp_min_(_LOG_FLOOR).exp_()


class _LeanAttention(torch.autograd.Function):
    """softmax(q k^T + bias + mask) @ v on CPU, the bias given as (heads, T) table values + index.

    The fused forward also gives the rows' log-sum-exp; q, k, v, output, lse and the bias (or,
    for reversed keys, the table) are kept. The backward recomputes P = exp(q k^T + bias + mask
    - lse) and dS = P * (dO v^T - rowsum(dO * O)) in blocks (:func:`_backward_blocks`). With
    ``save_probs`` P is kept instead; ``least_memory`` keeps neither P nor the output."""

    @staticmethod
    def forward(ctx, q, k, v, values, index, mask, save_probs, width=None, least_memory=False):
        plan = reversed_keys(index, width) if values.is_contiguous() else None
        ctx.plan, ctx.n_values = plan, values.shape[1]
        if plan is None:
            bias = gather_bias(values, index)
        else:  # keys in reverse order: the bias is the table seen through strides, no gather
            k, v, index = k.flip(-2), v.flip(-2), plan[3]
            mask = None if mask is None else flip_keys(mask)
            bias = strided_bias(values, plan).reshape(values.shape[0], *index.shape)
        p = lse = None
        if not (save_probs or _FLASH_CPU is None or q.shape[-1] != v.shape[-1]):
            out, lse = _fused_with_lse(q, k, v, bias.detach(), mask)  # (the kernel's mask takes no grad)
        else:
            qx, kx_t, m, _ = _logit_operands(q, k, mask)
            p = _softmax_(_logits_block(qx, kx_t, bias, m, None))
            out = torch.matmul(p, v)
        keep_out = p is None and not least_memory
        ctx.save_for_backward(q, k, v, bias if plan is None else values, index, mask,
                              out if keep_out else None, p, lse)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, bias, index, mask, out, p, lse = ctx.saved_tensors
        need_q, need_k, need_v, need_values = ctx.needs_input_grad[:4]
        plan = ctx.plan
        if plan is not None:  # (heads, Qy, Qx, Ky, Kx): blocks of whole query rows
            bias = strided_bias(bias, plan)
        d_out = d_out.contiguous()
        n, heads, n1, n2 = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        if p is None:
            qx, kx_t, mask, lse = _logit_operands(q, k, mask, lse)
            kx_t = kx_t.contiguous()
        # dS = P * (dO v^T - rowsum(dO * O)): with the output kept, the row term is an extra column
        if out is not None:
            do_x = torch.cat([d_out, (d_out * out).sum(-1, keepdim=True).neg_()], -1)
            v_t = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], -1).transpose(-2, -1).contiguous()
        else:  # P * dP, then minus P * its row sums
            do_x, v_t = d_out, v.transpose(-2, -1).contiguous()
        windows, step = _backward_blocks(n, heads * n2 * q.element_size(), n1,
                                         16 if plan is None else math.lcm(16, plan[1][1]),
                                         None if mask is None or p is not None else mask.shape[0])
        # dV and dK accumulate transposed (dV^T += dO^T P, dK^T += q^T dS); with several blocks
        # into whole gradients, and the bias gradient into one (heads, N1, N2) tensor first
        d_q = d_k_t = d_v_t = None
        split = windows < n or step < n1
        if split:
            d_q = torch.empty_like(q) if need_q else None
            d_k_t = q.new_empty(n, heads, q.shape[-1], n2) if need_k else None
            d_v_t = v.new_empty(n, heads, v.shape[-1], n2) if need_v else None
        d_values = q.new_zeros(heads, ctx.n_values) if need_values else None
        d_bias = q.new_zeros(heads, n1, n2) if need_values and windows < n else None
        for first in range(0, n, windows):
            w = slice(first, first + windows)
            w_mask = mask
            if p is None and mask is not None and windows % mask.shape[0]:  # a divisor of its count
                w_mask = mask[first % mask.shape[0]:][:windows]
            for start in range(0, n1, step):
                rows = slice(start, start + step)
                if p is not None:
                    pb = p[w, :, rows]
                else:
                    pb = _probs_(_logits_block(qx[w], kx_t[w], bias, w_mask,
                                               None if lse is None else lse[w], rows))
                if need_v:
                    d_v_t = _transposed_grad(d_v_t, w, rows, d_out, pb)
                ds = torch.matmul(do_x[w, :, rows], v_t[w]).mul_(pb)
                if out is None:
                    ds.addcmul_(pb, ds.sum(-1, keepdim=True), value=-1.0)
                del pb
                if need_k:
                    d_k_t = _transposed_grad(d_k_t, w, rows, q, ds)
                if need_q:
                    if step < n1:
                        d_q[w, :, rows] = torch.matmul(ds, k[w])
                    elif split:
                        torch.matmul(ds, k[w], out=d_q[w])
                    else:
                        d_q = torch.matmul(ds, k)
                if need_values:
                    ds_sum = ds[0] if ds.shape[0] == 1 else ds.sum(0)
                    if d_bias is not None:
                        d_bias[:, rows].add_(ds_sum)
                    else:
                        d_values.index_add_(1, index[rows].reshape(-1), ds_sum.view(heads, -1))
                del ds
        if d_bias is not None:
            d_values.index_add_(1, index.reshape(-1), d_bias.view(heads, -1))
        d_k = None if d_k_t is None else d_k_t.transpose(-2, -1)
        d_v = None if d_v_t is None else d_v_t.transpose(-2, -1)
        if plan is not None:  # back to the keys' own order
            d_k = None if d_k is None else d_k.flip(-2)
            d_v = None if d_v is None else d_v.flip(-2)
        return d_q, d_k, d_v, d_values, None, None, None, None, None


def _block_rows(row_bytes: int, rows: int, multiple: int = 16) -> int:
    """Rows per backward block: all where they fit (:data:`_BACKWARD_BLOCK_BYTES`, half as
    much again), else a multiple of ``multiple``."""
    if row_bytes * rows <= _BACKWARD_BLOCK_BYTES * 3 // 2:
        return rows
    return max(multiple, _BACKWARD_BLOCK_BYTES // row_bytes // multiple * multiple)


def _backward_blocks(n: int, row_bytes: int, n1: int, multiple: int = 16,
                     mask_windows: Optional[int] = None) -> Tuple[int, int]:
    """``(windows, rows)`` per backward block over (n, heads, N1, N2) logits: all where they
    fit, else whole windows (so dV^T and dK^T are products over all N1 rows at once; their
    count divides, or is a multiple of, ``mask_windows``), else rows of one window."""
    limit = _BACKWARD_BLOCK_BYTES * 3 // 2
    window = row_bytes * n1
    if window * n <= limit:
        return n, n1
    if window > limit:
        return 1, _block_rows(row_bytes, n1, multiple)
    blocks = -(-window * n // _BACKWARD_BLOCK_BYTES)
    windows = -(-n // blocks)
    if mask_windows:
        if windows >= mask_windows:
            windows = windows // mask_windows * mask_windows
        else:
            windows = max(d for d in range(1, windows + 1) if mask_windows % d == 0)
    return windows, n1


def _transposed_grad(acc: Optional[torch.Tensor], w: slice, rows: slice, x, y) -> torch.Tensor:
    """A block's share of ``x^T @ y`` for windows ``w`` and ``rows``: written into ``acc[w]``,
    added to it for later row blocks of a window, or returned whole (``acc`` None: one block)."""
    a = x[w, :, rows].transpose(-2, -1)
    if acc is None:
        return torch.matmul(a, y)
    if rows.start:
        acc[w].view(-1, *acc.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), y.reshape(-1, *y.shape[-2:]))
    else:
        torch.matmul(a, y, out=acc[w])
    return acc
