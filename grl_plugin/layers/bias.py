"""Position-bias tensors of the fast path: the eval-time cache and its budget, and the gathers.

:func:`position_bias` is :meth:`AffineTransform.position_bias <.attention.AffineTransform.position_bias>`:
the bias of :meth:`~.attention.AffineTransform.position_bias_reference` computed head-major on
the small table (MLP, sigmoid, then one gather), cached while no gradient is needed, within a
:class:`BiasCacheBudget`. Large relative indices are gathered in two steps
(:func:`gather_bias`), or, on the CPU, seen as strides over the table with the keys in reverse
order (:func:`reversed_keys`, :func:`strided_bias`, :func:`grouped_bias`).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

_CACHE_ENTRIES = 2  # geometries (input sizes) remembered per module
#: Relative indices of this many entries and more are "large": gathered in two steps, and on the
#: CPU taken as strides over the table with the keys reversed.
_LARGE_INDEX_MIN = 1 << 16


class BiasCacheBudget:
    """How many bytes the eval-time position-bias caches of the :class:`AffineTransform` s sharing
    this budget may hold together (``max_mib``; 0: nothing is cached).

    A cache keeps one (heads, N1, N2) tensor per attention module and geometry (e.g. 24 MiB per
    GRL-T block and 36 MiB per GRL-B block at the SR settings, a few KiB with 8x8 windows; for
    shifted 8x8 windows the (nW, heads, N1, N2) bias + mask), which saves recomputing and
    gathering the bias at every eval forward. The modules beyond the budget recompute theirs,
    except on CPU those with large windows or stripes, which cache the runs of table cells the
    fused kernel reads instead of a bias (1/16 and 1/13 of its size, kept even beyond the
    budget; see :meth:`AffineTransform.position_bias`). Every GRL network has its own budget of
    512 MiB; :func:`~.block.configure` (``bias_cache_mib``) gives a module tree a new one."""

    def __init__(self, max_mib: float = 512):
        if max_mib < 0:
            raise ValueError(f"bias_cache_mib must be >= 0, got {max_mib!r}")
        self.max_mib = max_mib
        self.max_bytes = int(max_mib * 2 ** 20)
        self.members: weakref.WeakSet = weakref.WeakSet()  # the AffineTransforms holding entries

    def used(self) -> int:
        """Bytes held by the caches of the modules sharing this budget."""
        return sum(module.cache_bytes() for module in list(self.members))

    def __deepcopy__(self, memo):  # a copy of a network (e.g. its EMA) shares its budget
        return self

    def __reduce__(self):  # pickled (torch.save of a whole module): the limit, not the members
        return (BiasCacheBudget, (self.max_mib,))


DEFAULT_BIAS_BUDGET = BiasCacheBudget()


def bias_cache_bytes(module: nn.Module) -> int:
    """Bytes held by the eval-time position-bias caches of the attentions inside ``module``."""
    return sum(m.cache_bytes() for m in module.modules() if hasattr(m, "cache_bytes") and hasattr(m, "bias_budget"))


def position_bias(transform, table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  plan=None) -> torch.Tensor:
    """16 * sigmoid(cpb_mlp(table)) gathered by ``index`` (N1, N2) -> (heads, N1, N2), or
    with an (nW, N1, N2) region ``mask`` the sum bias + mask -> (nW, heads, N1, N2).

    Same values as :meth:`position_bias_reference`, computed head-major on the small
    table: the MLP gives (heads, T) directly (:meth:`AffineTransform.bias_values`), the sigmoid is applied
    before the gather (it is elementwise), and the gather is one ``index_select`` (a faster
    kernel than advanced indexing, and a dense ``index_add_`` backward instead of
    ``index_put_(accumulate=True)``, which sorts the N1 * N2 index on every call). Cached
    while no gradient is needed (see :class:`BiasCacheBudget`); the cache key holds the
    weights' versions, so an optimizer step or ``load_state_dict`` invalidates it, and it
    holds the autocast dtype, so a bias made under autocast never serves a float32 forward.
    (The masked sum is what small shifted windows hand the attention kernel; caching it
    saves forming it at every forward.)

    With a reversed-keys ``plan`` (:func:`reversed_keys`, large windows and stripes): where
    the bias is not cached and does not fit the cache's budget, the (heads, Qx, Qy + Ky - 1,
    Kx) runs :func:`.kernels.cpu._grouped_flash` reads instead (:func:`grouped_bias`; 4-D, where the
    plain bias is 3-D), cached beyond the budget (1/13-1/16 of the bias's size): the fused
    kernel reads them a little slower than a bias tensor, but forming the bias at every forward
    costs more.
    """
    lin1, lin2 = transform.cpb_mlp[0], transform.cpb_mlp[2]
    budget = transform.bias_budget
    cache = (budget.max_bytes > 0 and not torch.is_grad_enabled()
             and not (torch.jit.is_tracing() or torch.compiler.is_compiling()))
    if cache:
        device = table.device.type  # values made under autocast (16-bit) are not float32's
        key = (id(table), id(index), id(mask), plan is not None,  # (the grouped form is 4-D)
               torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        versions = tuple((p.data_ptr(), p._version) for p in (lin1.weight, lin1.bias, lin2.weight))
        hit = transform._bias_cache.get(key)
        # the entry holds table, index and mask themselves, so their ids cannot be reused meanwhile
        if (hit is not None and all(a is b for a, b in zip(hit[0], (table, index, mask)))
                and hit[1] == versions):
            return hit[2]
        if len(transform._bias_cache) >= _CACHE_ENTRIES:  # e.g. tiles of another size: drop the oldest
            transform._bias_cache.pop(next(iter(transform._bias_cache)))
    values = transform.bias_values(table)
    size = index.numel() * values.shape[0] * values.element_size() * (1 if mask is None else mask.shape[0])
    fits = cache and budget.used() + size <= budget.max_bytes
    if plan is not None and not fits:
        bias = grouped_bias(values, plan)
    else:
        bias = gather_bias(values, index, table.shape[-2])
        if mask is not None:
            bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)
    if cache and (fits or plan is not None):
        transform._bias_cache[key] = ((table, index, mask), versions, bias)
        budget.members.add(transform)
    return bias



def large_index(index: torch.Tensor, width: Optional[int]) -> bool:
    """Whether an index into a table of ``width`` columns is large enough for the index plans
    (:data:`_LARGE_INDEX_MIN` entries and more; never under tracing or compile)."""
    return bool(width) and index.numel() >= _LARGE_INDEX_MIN and not (
        torch.compiler.is_compiling() or torch.jit.is_tracing())


def reversed_keys(index: torch.Tensor, width: Optional[int]):
    """:func:`~.geometry.reversed_keys_plan` for large indices (:func:`_large_index`); ``None``
    for others or where the index has no strided form."""
    if not large_index(index, width):
        return None
    from .geometry import reversed_keys_plan
    return reversed_keys_plan(index, width)


def strided_bias(values: torch.Tensor, plan) -> torch.Tensor:
    """The (heads, T) table values as the (heads, Qy, Qx, Ky, Kx) bias of keys in reverse order
    (a view, no copy; ``plan`` from :func:`reversed_keys`)."""
    offset, sizes, strides = plan[:3]
    return values.as_strided((values.shape[0],) + sizes, (values.stride(0),) + strides,
                             values.storage_offset() + offset)


def grouped_bias(values: torch.Tensor, plan) -> torch.Tensor:
    """The (heads, T) table values as the bias of :func:`_grouped_flash`: (heads, Qx, Qy + Ky - 1,
    Kx), ``E[h, x, r, c] = values[h, offset + r * width + x + c]`` (``plan`` from
    :func:`reversed_keys`). With keys in reverse order, query (qy, qx)'s bias row is
    ``E[:, qx, qy:qy + Ky].flatten()``: one contiguous run, Kx cells after the previous row's of
    the same qx. About N1 * N2 / (Qx * (Qy + Ky - 1) * Kx) times smaller than the bias itself
    (16x for GRL's 32x32 windows, 13x for its 64x64 stripes)."""
    offset, (qy, qx, ky, kx), (width, _, _, _) = plan[:3]
    return values.as_strided((values.shape[0], qx, qy + ky - 1, kx), (values.stride(0), 1, width, 1),
                             values.storage_offset() + offset).contiguous()


def gather_bias(values: torch.Tensor, index: torch.Tensor, width: Optional[int] = None) -> torch.Tensor:
    """(heads, T) table values gathered by an (N1, N2) index -> (heads, N1, N2).

    With the table's ``width`` (its (rows, width) grid flattened is T), in two steps where the
    index allows (:func:`~.geometry.gather_plan`: the runs of equal table row become one copy
    each)."""
    heads = values.shape[0]
    plan = None
    if large_index(index, width):
        from .geometry import gather_plan
        plan = gather_plan(index, width)
    if plan is None:
        return values.index_select(1, index.reshape(-1)).view(heads, *index.shape)
    patterns, runs, rows = plan
    run = index.numel() // runs.numel()
    small = values.view(heads, -1, width)[:, :rows].index_select(2, patterns)  # (heads, rows, P * run)
    return small.view(heads, -1, run).index_select(1, runs).view(heads, *index.shape)
