"""Relative-position tables, indices and shift masks of GRL (SPEC §4.4, §6).

Everything attention needs that depends only on geometry (window/stripe size, anchor
down-factor, padded input size) is built here, directly on the target device, and cached
per (configuration, size, device). Blocks and the network look sets up with
:func:`grl_geometry`; nothing is built per block or per forward, and nothing is stored in
a ``state_dict`` (so weights trained at one size run at any other).

Conventions follow the official code literally (SPEC §9 B2-B4): masks hold ``-100`` (not
``-inf``), the anchor grid of the relative index is not centred, and the label map of the
masks uses the Python slices ``[0, -w)``, ``[-w, -shift)``, ``[-shift, end)``.
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
    """Stripe extent and shift per axis (official ``_get_stripe_info``).

    An axis with ``groups`` set uses ``extent // groups`` (so it follows the resolution) and
    the shift ``extent // (2 groups)`` (0 for one group) whatever ``shift`` says; otherwise the
    configured size and, when shifting, half of it.
    """
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
    """Multiple the padded input size must have.

    The official ``pad_size`` is the maximum of the window, the stripe sizes and
    ``groups * df``; we take the least common multiple, which is the same number for every
    official configuration and the size that actually divides for all others (where the
    official maximum makes the partition fail).
    """
    parts = [window_size] + [s for s in stripe_size if s] + [g * df for g in stripe_groups if g]
    return math.lcm(*[int(p) for p in parts])


# --------------------------------------------------------------------------------------- tables
class GridAxes(NamedTuple):
    """A coordinate grid's axes in float64 (:func:`grid_axes`): ``a`` (rows,), ``b`` (cols,) in
    ascending order, and ``order``, the permutation that sorted the table's columns (``None`` if
    they were)."""
    a: torch.Tensor
    b: torch.Tensor
    order: Optional[torch.Tensor]


@lru_cache(maxsize=64)
def coords_table(window: Size2, df: int, device: torch.device) -> torch.Tensor:
    """Log-spaced relative coordinate table (1, w0 + a0 - 1, w1 + a1 - 1, 2), a = w // df.

    Per axis the coordinates run from ``-(a-1) - (w-a)//2`` to ``w-1 - (w-a)//2``, are divided
    by the positive end, scaled by 8 and mapped by ``sign(t) log2(|t|+1) / log2(8)``. With
    ``df = 1`` this is the SwinV2 table. (A one-pixel axis, where the official code divides by
    zero, is normalised by 1.)
    """
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
    """Index into the flattened :func:`coords_table` for every (query, key) pair.

    ``w2a``: window tokens (rows) attend to anchor tokens (columns), shape (w0 w1, a0 a1);
    otherwise anchors attend to window tokens, shape (a0 a1, w0 w1). Both grids start at 0, so
    the two directions are not mirror images (official quirk B3). With ``df = 1`` and ``w2a``
    this is the usual Swin window index.
    """
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
    """(order, inverse): the raster token indices (H W,) of an (H, W) grid rolled by ``-shift``
    and cut into ``part``-sized windows (windows row-major, tokens row-major inside), and the
    inverse permutation.

    ``tokens.index_select(1, order)`` is ``window_partition(roll(grid, -shift))`` in one gather;
    ``windowed.index_select(1, inverse)`` undoes it (window reverse, then roll back).
    """
    with torch.inference_mode(False):
        grid = torch.arange(size[0] * size[1], device=device).view(size)
        if any(shift):
            grid = torch.roll(grid, shifts=(-shift[0], -shift[1]), dims=(0, 1))
        order = rearrange(grid, "(nh h) (nw w) -> (nh nw h w)", h=part[0], w=part[1]).contiguous()
        return order, torch.argsort(order)


@lru_cache(maxsize=64)
def _gather_plan(index: torch.Tensor, table_width: int):
    with torch.inference_mode(False):
        n1, n2 = index.shape
        rows, cols = index // table_width, index % table_width
        # the longest runs of keys (a divisor of N2) along which the table row is constant
        run = next((r for r in range(n2, 1, -1)
                    if n2 % r == 0 and bool((rows.view(n1, -1, r) == rows.view(n1, -1, r)[..., :1]).all())), 1)
        if run < 4:
            return None
        patterns, which = torch.unique(cols.reshape(-1, run), dim=0, return_inverse=True)
        n_rows = int(rows.max()) + 1
        runs = rows.reshape(-1, run)[:, 0] * len(patterns) + which  # run -> row of the small table
        small = (torch.arange(n_rows, device=index.device)[:, None, None] * table_width + patterns[None])
        if not torch.equal(small.view(-1, run).index_select(0, runs).view(n1, n2), index):
            return None
        return patterns.reshape(-1), runs, n_rows


@torch.compiler.disable
def gather_plan(index: torch.Tensor, table_width: int):
    """A two-step plan for gathering ``values[:, index]`` of a relative-position index, or None.

    GRL's indices are ``row_offset * table_width + col_offset``, where the row offset is the
    same along each run of key columns and the column offsets of a run follow one of a few
    patterns (one per query column). Step 1 gathers the patterns from every table row (a
    small (heads, rows * patterns, run) table); step 2 copies whole runs of it into place, one
    index per run instead of one per entry (about half the time of a plain gather for 32x32
    windows and 64x64 stripes). Returns ``(patterns (P*run,), runs (N1*N2/run,), rows)``;
    ``None`` where runs are shorter than 4 keys or the plan does not reproduce ``index``
    exactly (checked on construction). Cached per index tensor.
    """
    return _gather_plan(index, int(table_width))


@lru_cache(maxsize=64)
def _reversed_keys_plan(index: torch.Tensor, table_width: int):
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


@torch.compiler.disable
def reversed_keys_plan(index: torch.Tensor, table_width: int):
    """How a relative-position index becomes a strided view of the table once the keys are
    taken in reverse order, or None.

    GRL's indices are ``(qy - ky + c0) * table_width + (qx - kx + c1)`` (or with the signs
    swapped): with the key order reversed (``index.flip(-1)``) both query and key coordinates
    count upwards, so ``values[:, index.flip(-1)]`` is the table itself seen through strides
    ``(table_width, 1, table_width, 1)`` over (qy, qx, ky, kx) from one offset -- a copy of
    contiguous runs instead of a gather (a key-order reversal of attention changes nothing but
    the order of the softmax sums). Returns ``(offset, sizes, strides, reversed_index)``, or
    ``None`` where the index has no such form (checked exactly on construction). Cached per
    index tensor.
    """
    return _reversed_keys_plan(index, int(table_width))


@lru_cache(maxsize=32)
def flip_keys(mask: torch.Tensor) -> torch.Tensor:
    """``mask.flip(-1)`` (a region mask for keys in reverse order), cached per mask tensor like
    the masks themselves (so CPU training at large shifted windows holds each mask twice)."""
    with torch.inference_mode(False):
        return mask.flip(-1).contiguous()


@lru_cache(maxsize=64)
def _grid_axes(table: torch.Tensor) -> Optional["GridAxes"]:
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


@torch.compiler.disable
def grid_axes(table: torch.Tensor) -> Optional["GridAxes"]:
    """The axes of a (1, rows, cols, 2) coordinate table that is a grid, ``table[0, i, j] ==
    (a_i, b_j)`` (every :func:`coords_table` is: a meshgrid), else ``None``. Cached per table tensor (checked once,
    not at every forward)."""
    if table.dim() != 4 or table.shape[0] != 1 or table.shape[-1] != 2:
        return None
    return _grid_axes(table)


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
    """(a2w (nS, N2, N1), w2a (nS, N1, N2)) masks of shifted anchored stripe attention.

    Window-token labels come from the full grid with ``stripe``/``shift``; anchor labels from
    the (H/df, W/df) grid with ``stripe // df`` and ``shift // df`` (floored, quirk B4).
    """
    with torch.inference_mode(False):
        tokens = _region_labels(size, stripe, shift, device)
        anchors = _region_labels((size[0] // df, size[1] // df), (stripe[0] // df, stripe[1] // df),
                                 (shift[0] // df, shift[1] // df), device)
        w2a = _compare(tokens, anchors)
        return w2a.transpose(1, 2).contiguous(), w2a


@lru_cache(maxsize=64)
def _mask_split(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False):
        mixed = mask.flatten(1).ne(0).any(1)
        masked = mixed.nonzero().flatten()
        return masked, (~mixed).nonzero().flatten(), mask.index_select(0, masked)


@torch.compiler.disable  # one host sync per mask, then a cache hit
def mask_split(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked, plain, masked_values) of an (nW, N1, N2) region mask: the indices of the windows
    whose mask holds a -100 entry, of those whose mask is all 0 (they need the position bias
    only), and ``mask[masked]``.

    With shifted windows or stripes only the last row and column of windows mix regions
    (:func:`mask_factors` works on those alone). Cached per mask (the masks are cached
    objects themselves, so their identity is stable).
    """
    return _mask_split(mask)


@lru_cache(maxsize=64)
def _mask_factors(mask: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    with torch.inference_mode(False):
        n_w, n1, n2 = mask.shape
        masked = _mask_split(mask)[0].tolist()
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


@torch.compiler.disable  # host syncs while building, then a cache hit
def mask_factors(mask: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(a (nW, N1, R), b (nW, N2, R))`` with ``a @ b^T == mask`` exactly, R small, or ``None``.

    A region mask compares labels: key j is visible to query i (0) when their regions match,
    else -100. Keys group by region; ``b`` is the one-hot group of each key and ``a[w, i, r]``
    the mask value of query i for group r. Appended to q and k as R extra columns, they add
    the mask inside the product q k^T, so the attention kernel takes the position bias alone,
    shared by all windows, and no (windows, heads, N1, N2) bias + mask is ever written. The
    products are -100 x 1 or 0 x 1 and the sums add zeros: exact in any float format. R is
    the most regions in one window (4 for GRL's shifted windows and stripes). Checked on
    construction; ``None`` where the mask does not factor (then bias + mask is formed).
    Cached per mask.
    """
    return _mask_factors(mask)


# ---------------------------------------------------------------------------------- sets / cache
Orders = Tuple[torch.Tensor, torch.Tensor]  # (order, inverse) of partition_order


class WindowGeometry(NamedTuple):
    """What (shifted) window attention needs at one padded size.

    ``orders``: the :func:`partition_order` pairs without and with the shift."""
    window: int
    shift: int
    table: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor
    orders: Tuple[Orders, Orders]


class StripeGeometry(NamedTuple):
    """What anchored stripe attention of one orientation needs at one padded size.

    ``orders`` / ``anchor_orders``: the :func:`partition_order` pairs of the token grid and of
    the anchor grid, without and with the shift."""
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
    # "V" (W-type) stripes use the reversed configuration evaluated on the same grid. The
    # official code reverses the H-type *result* instead, which differs -- and crashes -- for
    # non-square inputs with stripe groups (SPEC §9 B1); both agree everywhere else.
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
    for fn in (coords_table, relative_index, partition_order, _gather_plan, _reversed_keys_plan, flip_keys,
               _grid_axes, window_mask, stripe_masks,
               _mask_split, _mask_factors, _grl_geometry):
        fn.cache_clear()
