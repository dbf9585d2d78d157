"""Relative-position tables, indices, shift masks and token orders of GRL.

Everything attention needs that depends only on the geometry (window/stripe size, anchor
down-factor, padded input size) is built here on the target device and cached per argument
set (:func:`grl_geometry`); nothing is built per forward or stored in a ``state_dict``, so
weights trained at one size run at any other. As in the official code, masks hold ``-100``,
the anchor grid of the relative index is not centred, and the mask labels use the slices
``[0, -w)``, ``[-w, -shift)``, ``[-shift, end)``.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from einops import rearrange

Size2 = Tuple[int, int]
MASK_VALUE = -100.0


def stripe_info(stripe_size: Sequence[Optional[int]], stripe_groups: Sequence[Optional[int]],
                shift: bool, input_size: Size2) -> Tuple[Size2, Size2]:
    """Stripe extent and shift per axis (official ``_get_stripe_info``): with ``groups`` set,
    ``extent // groups`` and shift ``extent // (2 groups)`` (0 for one group); otherwise the
    configured size and, when ``shift``, half of it."""
    sizes, shifts = [], []
    for s, g, d in zip(stripe_size, stripe_groups, input_size):
        if g is None:
            sizes.append(int(s))
            shifts.append(int(s) // 2 if shift else 0)
        else:
            sizes.append(d // g)
            shifts.append(0 if g == 1 else d // (g * 2))
    return (sizes[0], sizes[1]), (shifts[0], shifts[1])


def pad_multiple(window_size: int, stripe_size: Sequence[Optional[int]],
                 stripe_groups: Sequence[Optional[int]], df: int) -> int:
    """Multiple the padded input size must have: the least common multiple of the window, the
    stripe sizes and ``groups * df`` (the official maximum for every official configuration,
    and a size that divides for all others)."""
    parts = [window_size] + [s for s in stripe_size if s] + [g * df for g in stripe_groups if g]
    return math.lcm(*[int(p) for p in parts])


# --------------------------------------------------------------------------------------- tables
class GridAxes(NamedTuple):
    """A coordinate grid's axes in float64: ``a`` (rows,), ``b`` (cols,) ascending, and ``order``,
    the permutation that sorted the columns (``None`` if they were)."""
    a: torch.Tensor
    b: torch.Tensor
    order: Optional[torch.Tensor]


@lru_cache(maxsize=64)
def coords_table(window: Size2, df: int, device: torch.device) -> torch.Tensor:
    """Log-spaced relative coordinate table (1, w0 + a0 - 1, w1 + a1 - 1, 2), a = w // df: per
    axis ``-(a-1) - (w-a)//2 .. w-1 - (w-a)//2``, divided by the positive end (1 for a one-pixel
    axis), times 8, mapped by ``sign(t) log2(|t|+1) / 3``; SwinV2's table for ``df = 1``."""
    with torch.inference_mode(False):  # cached tensors must also serve autograd later
        axes, ends = [], []
        for w in window:
            a = w // df
            pos = w - 1 - (w - a) // 2
            neg = -(a - 1) - (w - a) // 2
            axes.append(torch.arange(neg, pos + 1, dtype=torch.float32, device=device))
            ends.append(float(max(pos, 1)))
        table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        table = table / torch.tensor(ends, device=device) * 8
        table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.unsqueeze(0)


@lru_cache(maxsize=64)
def relative_index(window: Size2, df: int, w2a: bool, device: torch.device) -> torch.Tensor:
    """Index into the flattened :func:`coords_table` per (query, key): ``w2a`` (w0 w1, a0 a1),
    window tokens attend to anchors, else (a0 a1, w0 w1). Both grids start at 0, so the two
    directions are not mirror images (as officially); Swin's index for ``df = 1``, ``w2a``."""
    (w0, w1), (a0, a1) = window, (window[0] // df, window[1] // df)
    stride = a1 + w1 - 1
    with torch.inference_mode(False):
        r, c = (t.flatten() for t in torch.meshgrid(
            torch.arange(w0, device=device), torch.arange(w1, device=device), indexing="ij"))
        ra, ca = (t.flatten() for t in torch.meshgrid(
            torch.arange(a0, device=device), torch.arange(a1, device=device), indexing="ij"))
        if w2a:
            return (r[:, None] - ra[None] + a0 - 1) * stride + (c[:, None] - ca[None] + a1 - 1)
        return (ra[:, None] - r[None] + w0 - 1) * stride + (ca[:, None] - c[None] + w1 - 1)


# ------------------------------------------------------------------------------ token orders
@lru_cache(maxsize=64)
def partition_order(size: Size2, part: Size2, shift: Size2,
                    device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse) permutations of H W tokens: ``tokens.index_select(1, order)`` is
    ``window_partition(roll(grid, -shift), part)`` in one gather; ``inverse`` undoes it."""
    with torch.inference_mode(False):
        grid = torch.arange(size[0] * size[1], device=device).view(size)
        if any(shift):
            grid = torch.roll(grid, shifts=(-shift[0], -shift[1]), dims=(0, 1))
        order = rearrange(grid, "(nh h) (nw w) -> (nh nw h w)", h=part[0], w=part[1]).contiguous()
        return order, torch.argsort(order)


@lru_cache(maxsize=64)
def reversed_keys_plan(index: torch.Tensor, table_width: int):
    """``(offset, sizes, strides, index.flip(-1))``: ``values[:, index.flip(-1)]`` is the table seen
    through ``strides`` over (qy, qx, ky, kx) (GRL's ``(qy - ky + c0) * width + qx - kx + c1`` with
    the keys reversed), or ``None``; checked exactly, cached per index tensor."""
    n1, n2 = index.shape
    if n1 < 2 or n2 < 2 or int(index.min()) < 0:
        return None
    with torch.inference_mode(False):
        rev = index.flip(-1).contiguous()

        def run(line):  # leading entries rising by one: the grid's width along that axis
            steps = (line[1:] - line[:-1]) == 1
            return int(steps.long().cumprod(0).sum()) + 1

        kx, qx = run(rev[0]), run(rev[:, 0])
        if n2 % kx or n1 % qx:
            return None
        base, sizes, strides = int(rev[0, 0]), (n1 // qx, qx, n2 // kx, kx), (table_width, 1, table_width, 1)
        cells = torch.arange(base + sum((n - 1) * s for n, s in zip(sizes, strides)) + 1, device=index.device)
        if not torch.equal(cells.as_strided(sizes, strides, base).reshape(n1, n2), rev):
            return None
        return base, sizes, strides, rev


@lru_cache(maxsize=32)
def flip_keys(mask: torch.Tensor) -> torch.Tensor:
    """``mask.flip(-1)`` (for keys in reverse order), cached per mask tensor."""
    with torch.inference_mode(False):
        return mask.flip(-1).contiguous()


@lru_cache(maxsize=64)
def grid_axes(table: torch.Tensor) -> Optional[GridAxes]:
    """:class:`GridAxes` of a (1, rows, cols, 2) table with ``table[0, i, j] == (a_i, b_j)`` (every
    :func:`coords_table`), else ``None``; cached per table tensor."""
    if table.dim() != 4 or table.shape[0] != 1 or table.shape[-1] != 2:
        return None
    g = table[0]
    if not (torch.equal(g[..., 0], g[:, :1, 0].expand_as(g[..., 0]))
            and torch.equal(g[..., 1], g[:1, :, 1].expand_as(g[..., 1]))):
        return None
    with torch.inference_mode(False):  # cached tensors must also serve autograd later
        a, b = g[:, 0, 0].to(torch.float64), g[0, :, 1].to(torch.float64)
        order = None
        if not bool((b[1:] >= b[:-1]).all()):
            b, order = torch.sort(b, stable=True)
        return GridAxes(a.contiguous(), b.contiguous(), order)


# ---------------------------------------------------------------------------------------- masks
def _region_labels(size: Size2, window: Size2, shift: Size2, device: torch.device) -> torch.Tensor:
    """(n_windows, w0 w1) region labels of the shifted layout, partitioned into windows."""
    labels = torch.zeros(size, device=device)
    slices = [(slice(0, -w), slice(-w, -s), slice(-s, None)) for w, s in zip(window, shift)]
    count = 0
    for hs in slices[0]:
        for ws in slices[1]:
            # a stripe as long as the axis leaves [0, -w) empty: no zero-size write (export)
            if len(range(*hs.indices(size[0]))) and len(range(*ws.indices(size[1]))):
                labels[hs, ws] = count
            count += 1
    return rearrange(labels, "(nh h) (nw w) -> (nh nw) (h w)", h=window[0], w=window[1])


def _compare(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    same = rows[:, :, None] == cols[:, None, :]
    return torch.where(same, 0.0, MASK_VALUE).to(torch.float32)


@lru_cache(maxsize=32)
def window_mask(size: Size2, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(nW, N, N) mask of shifted-window attention: 0 within a region, -100 across regions."""
    with torch.inference_mode(False):
        labels = _region_labels(size, (window, window), (shift, shift), device)
        return _compare(labels, labels)


@lru_cache(maxsize=32)
def stripe_masks(size: Size2, stripe: Size2, shift: Size2, df: int,
                 device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(a2w (nS, N2, N1), w2a (nS, N1, N2)) masks of shifted anchored stripe attention; the
    anchor labels come from the (H/df, W/df) grid with ``stripe // df``, ``shift // df``."""
    with torch.inference_mode(False):
        tokens = _region_labels(size, stripe, shift, device)
        anchors = _region_labels((size[0] // df, size[1] // df), (stripe[0] // df, stripe[1] // df),
                                 (shift[0] // df, shift[1] // df), device)
        w2a = _compare(tokens, anchors)
        return w2a.transpose(1, 2).contiguous(), w2a


@lru_cache(maxsize=64)
def masked_windows(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the windows whose (nW, N1, N2) mask holds a -100 entry; cached per mask tensor."""
    with torch.inference_mode(False):
        return mask.flatten(1).ne(0).any(1).nonzero().flatten()


@lru_cache(maxsize=64)
def mask_factors(mask: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(a (nW, N1, R), b (nW, N2, R))`` with ``a @ b^T == mask`` exactly (``b``: each key's one-hot
    region group, ``a``: each query's mask value per group; R <= 4 in GRL), or ``None``. As extra
    q/k columns they add the mask inside q k^T exactly. Cached per mask tensor."""
    with torch.inference_mode(False):
        n_w, n1, n2 = mask.shape
        masked = masked_windows(mask).tolist()
        groups = []  # per masked window: (representative key of each key group, group of each key)
        for w in masked:
            # keys whose columns are alike share their first accepting query (label-built masks);
            # a key no query accepts gets its own group. Checked exactly below.
            ok = mask[w] == 0
            first = torch.where(ok.any(0), ok.float().argmax(0), n1)
            _, group = torch.unique(first, return_inverse=True)
            rep = torch.empty(int(group.max()) + 1, dtype=torch.long, device=mask.device)
            rep.scatter_(0, group, torch.arange(n2, device=mask.device))
            groups.append((rep, group))
        r = max([len(rep) for rep, _ in groups], default=0)
        a = mask.new_zeros(n_w, n1, r)
        b = mask.new_zeros(n_w, n2, r)
        for w, (rep, group) in zip(masked, groups):
            a[w, :, :len(rep)] = mask[w][:, rep]
            b[w, torch.arange(n2, device=mask.device), group] = 1.0
        if not torch.equal(torch.bmm(a, b.transpose(1, 2)), mask):
            return None
        return a, b


# ---------------------------------------------------------------------------------- sets / cache
Orders = Tuple[torch.Tensor, torch.Tensor]  # (order, inverse) of partition_order


class WindowGeometry(NamedTuple):
    """What (shifted) window attention needs at one padded size (``orders``: without, with shift)."""
    window: int
    shift: int
    table: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor
    orders: Tuple[Orders, Orders]


class StripeGeometry(NamedTuple):
    """What anchored stripe attention of one orientation needs at one padded size
    (``orders`` / ``anchor_orders``: token / anchor grid, without and with the shift)."""
    stripe: Size2
    shift: Size2
    df: int
    table: torch.Tensor
    index_a2w: torch.Tensor
    index_w2a: torch.Tensor
    mask_a2w: torch.Tensor
    mask_w2a: torch.Tensor
    orders: Tuple[Orders, Orders]
    anchor_orders: Tuple[Orders, Orders]


class GRLGeometry(NamedTuple):
    """The complete set (the official 13 buffers) for one padded size and device."""
    window: WindowGeometry
    stripe_h: StripeGeometry
    stripe_v: StripeGeometry


def _stripe_geometry(stripe_size, stripe_groups, df, size, device) -> StripeGeometry:
    stripe, shift = stripe_info(stripe_size, stripe_groups, True, size)
    a2w, w2a = stripe_masks(size, stripe, shift, df, device)
    anchor_size, anchor_stripe = (size[0] // df, size[1] // df), (stripe[0] // df, stripe[1] // df)
    orders = tuple(partition_order(size, stripe, s, device) for s in ((0, 0), shift))
    anchor_orders = tuple(partition_order(anchor_size, anchor_stripe, s, device)
                          for s in ((0, 0), (shift[0] // df, shift[1] // df)))
    return StripeGeometry(stripe, shift, df, coords_table(stripe, df, device),
                          relative_index(stripe, df, False, device),
                          relative_index(stripe, df, True, device), a2w, w2a, orders, anchor_orders)


@lru_cache(maxsize=32)
def _grl_geometry(window_size, stripe_size, stripe_groups, df, size, device) -> GRLGeometry:
    ws = (window_size, window_size)
    window = WindowGeometry(window_size, window_size // 2, coords_table(ws, 1, device),
                            relative_index(ws, 1, True, device),
                            window_mask(size, window_size, window_size // 2, device),
                            tuple(partition_order(size, ws, (s, s), device) for s in (0, window_size // 2)))
    # W-type stripes: the reversed configuration on the same grid (the official code reverses
    # the H-type result, which crashes for non-square inputs with stripe groups; else equal)
    return GRLGeometry(window, _stripe_geometry(stripe_size, stripe_groups, df, size, device),
                       _stripe_geometry(stripe_size[::-1], stripe_groups[::-1], df, size, device))


@torch.compiler.disable  # a cache lookup, not graph code: dynamo would re-trace the builders
def grl_geometry(window_size: int, stripe_size: Sequence[Optional[int]],
                 stripe_groups: Sequence[Optional[int]], df: int, size: Size2,
                 device: torch.device | str | None = None) -> GRLGeometry:
    """Tables, indices and masks for a padded input of ``size`` (cached per argument set)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _grl_geometry(int(window_size), tuple(stripe_size), tuple(stripe_groups), int(df),
                         (int(size[0]), int(size[1])), device)


def clear_cache() -> None:
    """Drop every cached table, index and mask (e.g. to free device memory)."""
    for fn in (coords_table, relative_index, partition_order, reversed_keys_plan, flip_keys, grid_axes,
               window_mask, stripe_masks, masked_windows, mask_factors, _grl_geometry):
        fn.cache_clear()
