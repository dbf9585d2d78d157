"""The continuous position-bias MLP ``cpb(t) = w2 relu(w1 t + b1)`` (w1: (hidden, 2), b1:
(hidden,), w2: (heads, hidden), hidden 512 in GRL) for every cell t of a coordinate table,
head-major (heads, T), and its grid form for large tables on the CPU.

On a grid (cell (i, j) = (a_i, b_j)) the first layer is ``A[i, c] + b_j w[c]``; channel c of
row i is on for a run of the sorted columns, so each output row is ``P(j) + b_j Q(j)`` with P,
Q running sums of what channels add where they switch (:func:`_grid_forward`), and the
gradients are differences of running sums (:func:`_grid_backward`): O(rows x (hidden + cols))
work in float64, no (T, hidden) layer.
"""
from __future__ import annotations

from typing import Optional

import torch

from .geometry import GridAxes
from .geometry import grid_axes as _grid_axes

#: Tables of at least this many cells take the grid form on CPU (not GRL's 8x8 windows' 15 x 15).
_GRID_MIN_CELLS = 1536


def cpb_mlp(t: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``w2 @ relu(t @ w1^T + b1)^T`` -> (heads, T) for cells ``t`` (T, 2)."""
    return torch.mm(w2, torch.addmm(b1, t, w1.t()).relu_().t())


def grid_axes(table: torch.Tensor) -> Optional[GridAxes]:
    """The table's :class:`~.geometry.GridAxes` where the grid form runs (CPU, a grid of at least
    ``_GRID_MIN_CELLS`` cells, not compiling or tracing), else ``None``."""
    if (table.dim() != 4 or table.device.type != "cpu" or table.numel() // 2 < _GRID_MIN_CELLS
            or torch.compiler.is_compiling() or torch.jit.is_tracing()):
        return None
    return _grid_axes(table)


def cpb_values(t, w1, b1, w2, axes: Optional[GridAxes] = None) -> torch.Tensor:
    """:func:`cpb_mlp`, in the grid form where ``axes`` are given."""
    return cpb_mlp(t, w1, b1, w2) if axes is None else _grid_forward(axes, w1, b1, w2)[0]


def _first_layer(axes: GridAxes, w1: torch.Tensor, b1: torch.Tensor):
    """``(A (rows, hidden), w (hidden,))`` of the first layer ``A[i, c] + b_j w[c]``, float64."""
    return (torch.addcmul(b1.to(torch.float64), axes.a[:, None], w1[:, 0].to(torch.float64)),
            w1[:, 1].to(torch.float64))


def _grid_edges(axes: GridAxes, w1: torch.Tensor, b1: torch.Tensor):
    """``(A, w, on_right, e)``: channel c of row i is on for ``j >= e[i, c]`` where ``on_right``
    (``w[c] > 0``), else for ``j < e[i, c]``."""
    A, w = _first_layer(axes, w1, b1)
    on_right = w > 0
    # on where A + b_j w > 0: b_j > -A / w (w > 0, edge = #{b_j <= -A / w}), b_j < -A / w (w < 0,
    # edge = #{b_j < -A / w}); where w == 0, all columns or none as A > 0
    thr = A / w.neg()
    if bool((w == 0).any()):
        thr = torch.where(w == 0, torch.where(A > 0, float("inf"), float("-inf")).to(thr.dtype), thr)
    thr = torch.where(on_right, thr.nextafter(thr.new_tensor(float("inf"))), thr)  # #{b <= x} = #{b < next(x)}
    return A, w, on_right, torch.searchsorted(axes.b, thr)


def _grid_forward(axes: GridAxes, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor):
    """The grid form of :func:`cpb_mlp` -> ((heads, rows * cols) in ``w2``'s dtype, edges)."""
    a, b, order = axes
    rows, cols, heads = a.shape[0], b.shape[0], w2.shape[0]
    A, w, on_right, e = _grid_edges(axes, w1, b1)
    w2d = w2.to(torch.float64)
    sign = torch.where(on_right, 1.0, -1.0).to(torch.float64)
    # what channel c adds to row i where it switches on (subtracts where it switches off):
    # (w2[:, c] A[i, c], w2[:, c] w[c]) to the row's (P, Q), with the sign of its switch
    delta = A.new_empty(rows, w.shape[0], 2, heads)
    torch.mul(A[:, :, None], w2d.t() * sign[:, None], out=delta[:, :, 0])
    delta[:, :, 1] = w2d.t() * (w * sign)[:, None]
    d = A.new_zeros(rows, cols + 1, 2, heads)
    off_right = (~on_right).to(torch.float64)  # channels on from column 0 until their edge
    torch.mm(A * off_right, w2d.t(), out=d[:, 0, 0])
    d[:, 0, 1] = torch.mv(w2d, w * off_right)
    d.view(rows, cols + 1, -1).scatter_add_(1, e[:, :, None].expand(-1, -1, 2 * heads), delta.view(rows, -1, 2 * heads))
    pq = d.cumsum_(1)[:, :cols]
    out = torch.addcmul(pq[:, :, 0], b[:, None], pq[:, :, 1]).permute(2, 0, 1)  # (heads, rows, cols)
    if order is not None:  # back to the table's column order
        out = out.new_empty(out.shape).index_copy_(2, order, out)
    # contiguous (heads, T), as the plain form's (the strided bias plans need it)
    return out.to(w2.dtype, memory_format=torch.contiguous_format).view(heads, -1), e


def _grid_backward(axes: GridAxes, w1, b1, w2, e: torch.Tensor, grad: torch.Tensor, needs):
    """Gradients (w1, b1, w2) of the grid form from the output's (heads, rows * cols); ``None``
    where ``needs`` (three flags) says so."""
    a, b, order = axes
    rows, cols = a.shape[0], b.shape[0]
    heads, hidden = w2.shape
    A, w = _first_layer(axes, w1, b1)
    w2d = w2.to(torch.float64)
    g = grad.reshape(heads, rows, cols)
    if order is not None:
        g = g.index_select(2, order)
    g = g.to(torch.float64)
    # running sums over the columns of g and g * b_j, from 0: sums over any run are differences
    c = g.new_empty(2, heads, rows, cols + 1)
    c[..., 0] = 0
    torch.cumsum(g, 2, out=c[0, ..., 1:])
    torch.cumsum(g * b, 2, out=c[1, ..., 1:])
    at_edge = c.gather(3, e.long().expand(2, heads, rows, hidden))
    # (2, heads, rows, hidden): sums of g and of g * b_j over the run where channel c of row i is on
    s = torch.where(w > 0, c[..., cols:] - at_edge, at_edge)
    s_b = s[1].sum(1)  # (heads, hidden)
    d_w1 = d_b1 = d_w2 = None
    if needs[2]:
        d_w2 = (torch.einsum("ic,hic->hc", A, s[0]) + w * s_b).to(w2.dtype)
    if needs[0] or needs[1]:
        d_A = torch.einsum("hc,hic->ic", w2d, s[0])  # (rows, hidden)
        if needs[0]:
            d_w1 = torch.stack([torch.mv(d_A.t(), a), (w2d * s_b).sum(0)], 1).to(w1.dtype)
        if needs[1]:
            d_b1 = d_A.sum(0).to(b1.dtype)
    return d_w1, d_b1, d_w2


class CpbMlp(torch.autograd.Function):
    """:func:`cpb_values` for autograd without keeping a (T, hidden) layer: the grid form keeps
    its edges, the plain form recomputes its hidden layer. ``t`` gets no gradient."""

    @staticmethod
    def forward(ctx, t, w1, b1, w2, axes=None):
        ctx.axes = axes
        if axes is None:
            ctx.save_for_backward(t, w1, b1, w2)
            return cpb_mlp(t, w1, b1, w2)
        out, e = _grid_forward(axes, w1, b1, w2)
        ctx.save_for_backward(w1, b1, w2, e.to(torch.int16) if axes.b.shape[0] < 2 ** 15 else e)
        return out

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[1:4]
        if ctx.axes is not None:
            w1, b1, w2, e = ctx.saved_tensors
            return (None, *_grid_backward(ctx.axes, w1, b1, w2, e, grad, needs), None)
        t, w1, b1, w2 = ctx.saved_tensors
        hidden = torch.addmm(b1, t, w1.t()).relu_()
        d_w2 = torch.mm(grad, hidden) if needs[2] else None
        d_w1 = d_b1 = None
        if needs[0] or needs[1]:
            d_hidden = torch.ops.aten.threshold_backward(torch.mm(grad.t(), w2), hidden, 0)
            d_w1 = torch.mm(t.t(), d_hidden).t() if needs[0] else None  # ((2, T) @ (T, hidden): the faster shape)
            d_b1 = d_hidden.sum(0) if needs[1] else None
        return None, d_w1, d_b1, d_w2, None
