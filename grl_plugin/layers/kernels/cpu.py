"""The CPU executor of GRL's attention (entered from :func:`~..attention.cosine_attention` for
CPU tensors outside ``torch.compile``, tracing and attention dropout).

What it computes is the reference's softmax(cos(q, k) * scale + bias + mask) @ v; how:

* **training** (autograd): :class:`_LeanAttention` -- the fused CPU kernel's forward (no
  N1 x N2 logits written), which also gives the rows' log-sum-exp, and a hand-written backward
  that recomputes the probabilities in cache-sized blocks instead of keeping them
  (``lean_backward``: where P is larger than q, k, v and the output; see :func:`_keep_probs`),
  the position-bias gradient going straight back to the table cells. Large windows and stripes
  take their keys in reverse order, so that the bias is the table seen through strides
  (:func:`~..bias.reversed_keys`): no (heads, N1, N2) bias kept per module.
* **eval, large windows and stripes beyond the bias cache's budget**: :func:`_grouped_flash`,
  the fused kernel reading the bias as runs of table cells (keys reversed), no bias tensor.
* **otherwise**: the fused kernel (:func:`~.sdpa.run`).

The softmax here floors probabilities at 1e-20 (masked pairs would otherwise give subnormal
floats, on which x86 CPUs compute many times slower).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..bias import gather_bias, reversed_keys, strided_bias
from . import sdpa

#: Bytes of logits the CPU backward handles at a time (blocks that stay in the cache).
_BACKWARD_BLOCK_BYTES = 8 * 2 ** 20
#: The fused CPU kernel behind SDPA, called directly for its row log-sum-exp (None if absent).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_LOG_FLOOR = math.log(1e-20)  # probabilities are floored at 1e-20 (no subnormal floats)


def attention(q, k, v, transform, table, index, mask, lean_backward: Optional[bool] = None):
    """softmax(q k^T + bias + mask) @ v on the CPU, q and k normalised (q scaled) -> (B*nW, heads, N1, dv)."""
    width = table.shape[-2]
    if torch.is_grad_enabled():
        values = transform.bias_values(table).to(q.dtype)
        if any(t.requires_grad for t in (q, k, v, values)):
            return _LeanAttention.apply(q, k, v.contiguous(), values, index, mask,
                                        _keep_probs(q, k, v, lean_backward), width, lean_backward is True)
        bias = gather_bias(values, index, width)
    else:
        bias = None
        plan = reversed_keys(index, width) if _FLASH_CPU is not None else None
        if plan is not None:  # large windows/stripes: keys reversed, no N1 x N2 bias
            bias = transform.position_bias(table, index, plan=plan).to(q.dtype)
            if bias.dim() == 4:  # not cached in full: the grouped form (see bias.position_bias)
                from ..geometry import flip_keys
                out = _grouped_flash(q, k.flip(-2), v.flip(-2), bias, None if mask is None else flip_keys(mask))
                if out is not None:
                    return out
                bias = None  # (a mask that does not factor: the plain bias, below)
        if bias is None:
            bias, mask = sdpa.bias_and_mask(transform, table, index, mask, q.dtype)
    return _fused(q, k, v, bias, mask)


def _fused(q, k, v, bias, mask):
    """The fused kernel behind SDPA with bias (+ mask)."""
    return sdpa.run(q, k, v, bias, mask, sdpa._sdpa_kernel)[0]


def _keep_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lean_backward: Optional[bool]) -> bool:
    """Whether the CPU backward keeps P: not for ``lean_backward`` True, always for False, else
    where P is no larger than the q, k, v and output kept anyway."""
    if lean_backward is not None:
        return not lean_backward
    n1, n2, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    return n1 * n2 <= n1 * d + n2 * d + n2 * dv + n1 * dv  # P no larger than q, k, v and out


def _grouped_flash(q, k, v, bias, mask) -> Optional[torch.Tensor]:
    """The fused CPU kernel (``_FLASH_CPU``) for keys in reverse order, its bias read from
    :func:`~..bias.grouped_bias` instead of a (heads, N1, N2) tensor -> (B*nW, heads, N1, dv), or
    ``None`` where a region mask does not factor (:func:`~.sdpa.mask_columns`) or v's head dim
    exceeds q's.

    ``k``, ``v`` and ``mask`` are in reverse key order (:func:`~.geometry.flip_keys`). The kernel
    reads its mask through strides (batch, head, row), each row contiguous; the bias of
    reversed keys is not such a tensor, but for the queries of one grid column qx it is: rows
    qy = 0, 1, ... of that column start Kx cells apart in ``bias[:, qx]`` (and overlap). So
    each window is one call whose "heads" are the (head, qx) pairs and whose rows are the qy of
    that column (q a strided view, k and v broadcast over qx): the same products and softmax
    sums as one call on the whole window, with no N1 x N2 bias (its query blocks are Qy rows
    instead of up to 256)."""
    heads, qx, rows, kx = bias.shape
    n, _, n1, d = q.shape
    n2, dv = k.shape[-2], v.shape[-1]
    qy = n1 // qx
    mask, factors = sdpa.mask_columns(mask, n1, n2)
    if mask is not None and factors is None:
        return None
    width = d + (0 if factors is None else factors[0].shape[-1])
    if dv > width:
        return None
    q, k, v = sdpa.widen(q, k, v, factors, 0)
    d = q.shape[-1]
    attn_mask = bias.as_strided((heads, qx, qy, n2), (qx * rows * kx, rows * kx, kx, 1))
    out = q.new_empty(n, heads, qy, qx, dv)
    for i in range(n):
        o = _FLASH_CPU(q[i].view(heads, qy, qx, d).transpose(1, 2), k[i].unsqueeze(1).expand(heads, qx, n2, d),
                       v[i].unsqueeze(1).expand(heads, qx, n2, d), 0.0, False, attn_mask=attn_mask, scale=1.0)[0]
        out[i].copy_(o[..., :dv].transpose(1, 2))
    return out.view(n, heads, n1, dv)


def _logit_operands(q, k, mask, lse=None):
    """``(qx, kx_t, mask, lse)``: what :func:`_logits_block` multiplies and adds.

    A large windows' region mask (:func:`~.sdpa.mask_columns`) and the rows' log-sum-exp ``lse``
    enter as extra columns of q and k ([q, a, -lse] . [k, b, 1]), so the product writes them
    with no pass of their own; the mask and lse returned are what is left to add (``None``
    when folded in). (In 16-bit formats, where -lse itself would be rounded to 8-11 bits, it
    is subtracted after the product, in float.)"""
    n1, n2 = q.shape[-2], k.shape[-2]
    mask, factors = sdpa.mask_columns(mask, n1, n2)
    if factors is not None:
        q, k = sdpa.with_columns(q, factors[0]), sdpa.with_columns(k, factors[1])
        mask = None
    if lse is not None and q.element_size() >= 4:
        q = torch.cat([q, -lse.unsqueeze(-1).to(q.dtype)], -1)
        k = torch.cat([k, k.new_ones(k.shape[:-1] + (1,))], -1)
        lse = None
    return q, k.transpose(-2, -1), mask, lse


def _logits_block(qx, kx_t, bias, mask, lse, rows: slice = slice(None)):
    """Rows ``rows`` of q k^T + bias (+ mask) (- lse) from :func:`_logit_operands`, one new
    (B*nW, heads, rows, N2) tensor; the bias is added in place. ``bias`` is (heads, N1, N2),
    bias + mask (nW, heads, N1, N2), or the table seen as (heads, Qy, Qx, Ky, Kx) for keys in
    reverse order (:func:`~..bias.strided_bias`; ``rows`` then whole query rows of Qx)."""
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


def _logits_(q, k, bias, mask, lse=None):
    """q k^T + bias (+ mask) (- lse), computed into one new (B*nW, heads, N1, N2) tensor
    (:func:`_logit_operands`, :func:`_logits_block`)."""
    qx, kx_t, mask, lse = _logit_operands(q, k, mask, lse)
    return _logits_block(qx, kx_t, bias, mask, lse)


def _block_rows(row_bytes: int, rows: int, multiple: int = 16) -> int:
    """Rows per block of the backward (:data:`_BACKWARD_BLOCK_BYTES`), all of them when
    the whole fits, else a multiple of ``multiple`` (16, or a multiple of it)."""
    if row_bytes * rows <= _BACKWARD_BLOCK_BYTES * 3 // 2:
        return rows
    return max(multiple, _BACKWARD_BLOCK_BYTES // row_bytes // multiple * multiple)


def _softmax_(s: torch.Tensor) -> torch.Tensor:
    """In-place softmax over the last dim with the 1e-20 floor (see ``_LOG_FLOOR``)."""
    s.sub_(s.amax(-1, keepdim=True)).clamp_min_(_LOG_FLOOR).exp_()
    return s.div_(s.sum(-1, keepdim=True))


def _probs_(s: torch.Tensor) -> torch.Tensor:
    """exp(s) in place with the 1e-20 floor, for logits that already include -lse."""
    return s.clamp_min_(_LOG_FLOOR).exp_()


class _LeanAttention(torch.autograd.Function):
    """softmax(q k^T + bias + mask) @ v for autograd on CPU, with a lean hand-written backward.

    Takes the position bias as its (heads, T) table values and the (N1, N2) index and gathers
    it itself. The forward is the fused CPU kernel (no N1 x N2 tensor written), which also
    gives every row's log-sum-exp; it saves q, k, v, the output, that (N1-sized) log-sum-exp
    and the gathered bias (one (heads, N1, N2) tensor per module, shared by all windows). The
    backward recomputes the probabilities P = exp(q k^T + bias + mask - lse) (one matrix
    product that also writes the mask and -lse, see :func:`_logits_`, then the bias add, the
    floor and exp in place) and the logits' gradient dS = P * (dO v^T - rowsum(dO * O)) (one
    product, the row term again an extra column, times P in place), in blocks of about
    :data:`_BACKWARD_BLOCK_BYTES` (:func:`_backward_blocks`); the bias gradient, summed over
    the windows, goes back to the table cells by ``index_add_``. Between forward and backward
    no per-window N1 x N2 tensor is kept.
    With ``save_probs`` (or where the fused kernel is missing, or v's head dim differs from
    q's, which it does not take) the forward computes P explicitly and keeps it instead of
    the output and the log-sum-exp (faster backward; the row term is then rowsum(P * dP), as
    also with ``least_memory`` (``lean_backward=True``), which keeps neither P nor the output).

    Where the index is GRL's relative index of a large window or stripe (:func:`~..bias.reversed_keys`),
    the keys (and values) are taken in reverse order: then the bias is the (heads, T) table seen
    through strides, (heads, Qy, Qx, Ky, Kx), so the forward copies it for the fused kernel
    instead of gathering it, and the backward keeps the table instead of the gathered bias and
    adds it to the logits through the same strides (row blocks of whole query rows). The
    attention itself does not depend on the order of its keys; dK and dV are flipped back.
    """

    @staticmethod
    def forward(ctx, q, k, v, values, index, mask, save_probs, width=None, least_memory=False):
        plan = reversed_keys(index, width) if values.is_contiguous() else None
        ctx.plan = plan
        if plan is None:
            bias = gather_bias(values, index, width)
        else:  # keys in reverse order: the bias is the table seen through strides, no gather
            k, v, index = k.flip(-2), v.flip(-2), plan[3]
            if mask is not None:
                from ..geometry import flip_keys
                mask = flip_keys(mask)
            bias = strided_bias(values, plan).reshape(values.shape[0], *index.shape)
        p = lse = None
        # the fused kernel (absent from older torch) needs one head dim for q, k and v
        save_probs = save_probs or _FLASH_CPU is None or q.shape[-1] != v.shape[-1]
        if not save_probs:  # detached: the kernel takes no mask that needs a gradient
            out, lse = _fused_with_lse(q, k, v, bias.detach(), mask)
        else:
            p = _softmax_(_logits_(q, k, bias, mask))
            out = torch.matmul(p, v)
        ctx.n_values = values.shape[1]
        # with P kept, or for the least memory, the backward takes the row term from P * dP
        # and the output is not kept
        keep_out = p is None and not least_memory
        # with a plan, the backward sees the bias through strides again: the table is kept, not the bias
        ctx.save_for_backward(q, k, v, bias if plan is None else values, index, mask,
                              out if keep_out else None, p, lse)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, bias, index, mask, out, p, lse = ctx.saved_tensors
        need_q, need_k, need_v, need_values = ctx.needs_input_grad[:4]
        plan = ctx.plan
        if plan is not None:  # bias: (heads, Qy, Qx, Ky, Kx), blocks of whole query rows (Qx)
            bias = strided_bias(bias, plan)
        d_out = d_out.contiguous()
        n, heads, n1, n2 = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        if p is None:
            qx, kx_t, mask, lse = _logit_operands(q, k, mask, lse)
            kx_t = kx_t.contiguous()
        # dS = P * (dP - rowsum(dO * O)) with dP = dO v^T, and rowsum(dO * O) = rowsum(P * dP):
        # from the output, the row term is an extra column of the product
        if out is not None:
            rows_term = (d_out * out).sum(-1, keepdim=True).neg_()
            do_x = torch.cat([d_out, rows_term], -1)
            v_t = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], -1).transpose(-2, -1).contiguous()
        else:  # P * dP, then minus P * its row sums
            do_x, v_t = d_out, v.transpose(-2, -1).contiguous()
        # (a mask left to add per window, only where P is recomputed, constrains the window blocks)
        windows, step = _backward_blocks(n, heads * n2 * q.element_size(), n1,
                                         16 if plan is None else math.lcm(16, plan[1][1]),
                                         None if mask is None or p is not None else mask.shape[0])
        # dV and dK are accumulated transposed, dV^T += dO^T P and dK^T += q^T dS: the same sums,
        # with no transposed first operand
        d_q = d_k_t = d_v_t = None
        split = windows < n or step < n1
        if split:  # blocks write into the whole gradients; one block's products are them
            d_q = torch.empty_like(q) if need_q else None
            d_k_t = q.new_empty(n, heads, q.shape[-1], n2) if need_k else None
            d_v_t = v.new_empty(n, heads, v.shape[-1], n2) if need_v else None
        # the bias gradient goes back to the table cells summed over the windows: with blocks of
        # windows, summed into one (heads, N1, N2) tensor first (one index_add_ at the end)
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


def _backward_blocks(n: int, row_bytes: int, n1: int, multiple: int = 16,
                     mask_windows: Optional[int] = None) -> Tuple[int, int]:
    """``(windows, rows)`` per block of the CPU backward over (n, heads, N1, N2) logits of
    ``row_bytes`` per window row: all of them where they fit :data:`_BACKWARD_BLOCK_BYTES`
    (half as much again), else blocks of whole windows where one window fits, so that the
    products dV^T = dO^T P and dK^T = q^T dS run over all N1 rows at once (row blocks of
    several windows split them into sums of short products). Windows per block divide ``mask_windows`` or are a multiple of it (a
    region mask added to the logits, per window). Only a single window larger than the budget
    goes in blocks of rows (:func:`_block_rows`)."""
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


def _transposed_grad(acc: Optional[torch.Tensor], w: slice, rows: slice, x: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
    """A block's share of ``x^T @ y`` (dV^T = dO^T P, dK^T = q^T dS) for windows ``w`` and
    ``rows`` of ``x``: written into ``acc[w]`` (``acc`` is the whole gradient, allocated when
    there are several blocks), added to it for the row blocks after a window's first (rows
    not starting at 0), or returned as the whole (``acc`` ``None``: one block)."""
    a = x[w, :, rows].transpose(-2, -1)
    if acc is None:
        return torch.matmul(a, y)
    if rows.start:
        _accumulate(acc[w], a, y)
    else:
        torch.matmul(a, y, out=acc[w])
    return acc


def _accumulate(acc: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` over the last two dims (``a @ b`` when ``acc`` is ``None``), in place."""
    if acc is None:
        return torch.matmul(a, b)
    acc.view(-1, *acc.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return acc


def _fused_with_lse(q, k, v, bias, mask):
    """The fused CPU kernel behind SDPA, which also returns the rows' log-sum-exp:
    (output (B*nW, heads, N1, dv), lse (B*nW, heads, N1))."""
    return sdpa.run(q, k, v, bias, mask, lambda qs, ks, vs, m: _FLASH_CPU(qs, ks, vs, 0.0, False, attn_mask=m, scale=1.0))
