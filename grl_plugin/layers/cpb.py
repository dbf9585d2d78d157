"""The continuous position bias MLP (SwinV2, GRL: SPEC §5) and its CPU training forms.

The MLP maps every cell ``t = (y, x)`` of a relative-coordinate table to one value per head::

    cpb(t) = w2 relu(w1 t + b1)        w1: (hidden, 2), b1: (hidden,), w2: (heads, hidden)

computed here head-major, (heads, T), for the T cells at once (:func:`cpb_mlp`). GRL's hidden
width is 512, so the plain form writes and reads a (T, 512) layer: 33 MB for the 127 x 127
table of 64 x 64 stripes, several passes of it per training step and attention module (CPU:
10-18 % of GRL-S's training step at the SR settings went here with the previous, blocked MLP).

On a coordinate grid (every :func:`~.geometry.coords_table` is one: cell (i, j) = (a_i, b_j))
the first layer is ``A[i, c] + b_j w[c]`` with ``A = a w1[:, 0]^T + b1`` and ``w = w1[:, 1]``.
With the columns in ascending order, channel c of row i is on (``> 0``) for a run of columns:
``j >= e[i, c]`` where ``w[c] > 0``, ``j < e[i, c]`` where ``w[c] <= 0`` (one
``searchsorted``). On its run it adds ``w2[:, c] A[i, c] + b_j w2[:, c] w[c]`` to the row, so
each row of the output is ``P(j) + b_j Q(j)`` with P and Q running sums over j of what the
channels add where they switch on or off (:func:`_grid_forward`), and the weights' gradients
are sums of the output gradient and of the output gradient times b_j over each channel's run,
i.e. differences of running sums (:func:`_grid_backward`). That is O(rows x hidden +
rows x cols) work instead of O(rows x cols x hidden), done in float64 (running sums of
terms that cancel), with no (T, hidden) tensor. It is the CPU training and eval form for
tables of ``_GRID_MIN_CELLS`` cells and more; elsewhere (small tables, GPUs, where the
plain form is a few large kernels, ``torch.compile`` and tracing) the plain form runs, with
its hidden layer recomputed in the backward instead of kept (:class:`CpbMlp`).
"""
from __future__ import annotations

from typing import Optional

import torch

from .geometry import GridAxes
from .geometry import grid_axes as _cached_grid_axes

# Tables of at least this many cells take the grid form on CPU (GRL's 32 x 32 windows: 63 x 63,
# its 64 x 64 stripes: 79 x 79 and 127 x 127; not its 8 x 8 windows: 15 x 15, where the plain form's
# (225, 512) layer is small and the grid form's ~30 small operations take longer)
_GRID_MIN_CELLS = 1536


def cpb_mlp(t: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The MLP head-major, ``w2 @ relu(t @ w1^T + b1)^T`` -> (heads, T), in one piece. ``t``: (T, 2)
    cells; ``w1``, ``b1``, ``w2``: its ``Linear(2, hidden)`` and ``Linear(hidden, heads, bias=False)``."""
    return torch.mm(w2, torch.addmm(b1, t, w1.t()).relu_().t())


def grid_axes(table: torch.Tensor) -> Optional[GridAxes]:
    """The axes of a (1, rows, cols, 2) coordinate table for the grid form (cached per table,
    :func:`~.geometry.grid_axes`), or ``None`` for the plain form: tables that are no grid, of
    fewer than ``_GRID_MIN_CELLS`` cells, off the CPU, and under ``torch.compile`` or tracing."""
    if (table.dim() != 4 or table.device.type != "cpu" or table.numel() // 2 < _GRID_MIN_CELLS
            or torch.compiler.is_compiling() or torch.jit.is_tracing()):
        return None
    return _cached_grid_axes(table)


def cpb_values(t: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               axes: Optional[GridAxes] = None) -> torch.Tensor:
    """:func:`cpb_mlp` of the table's cells ``t`` (T, 2), in the grid form where ``axes`` are given."""
    if axes is None:
        return cpb_mlp(t, w1, b1, w2)
    return _grid_forward(axes, w1, b1, w2)[0]


def _first_layer(axes: GridAxes, w1: torch.Tensor, b1: torch.Tensor):
    """The first layer on the grid, ``A[i, c] + b_j w[c]``: ``(A, w)``, (rows, hidden) and (hidden,), float64."""
    return (torch.addcmul(b1.to(torch.float64), axes.a[:, None], w1[:, 0].to(torch.float64)),
            w1[:, 1].to(torch.float64))


def _grid_edges(axes: GridAxes, w1: torch.Tensor, b1: torch.Tensor):
    """``(A, w, on_right, e)``: the first layer's row term A (rows, hidden) and column slope
    w (hidden,) in float64, which channels are on to the right of their edge (``w > 0``) and the
    edges e (rows, hidden): channel c of row i is on for ``j >= e`` (``w[c] > 0``) or ``j < e``."""
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
    # contiguous (heads, T), as the plain form's (a view of the permuted sums would have strides
    # (1, heads), which the attention's strided bias plans cannot take)
    return out.to(w2.dtype, memory_format=torch.contiguous_format).view(heads, -1), e


def _grid_backward(axes: GridAxes, w1, b1, w2, e: torch.Tensor, grad: torch.Tensor, needs):
    """Gradients (w1, b1, w2) of the grid form from the output gradient (heads, rows * cols),
    each ``None`` where ``needs`` (three flags) says it is not wanted."""
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
    """:func:`cpb_values` for autograd, keeping no (T, hidden) layer for the backward: the
    grid form keeps its edges (int16, rows x hidden), the plain form recomputes its hidden
    layer. ``t`` gets no gradient."""

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
