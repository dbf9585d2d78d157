"""Position-bias tensors of the fast path: formed head-major on the small table (MLP, sigmoid,
one gather), cached in eval within a :class:`BiasCacheBudget`, and for large windows and
stripes on the CPU seen as strides over the table with the keys in reverse order.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

_CACHE_ENTRIES = 2  # geometries (input sizes) remembered per module
#: Relative indices of this many entries and more are "large" (reversed-key plans on the CPU).
_LARGE_INDEX_MIN = 1 << 16


class BiasCacheBudget:
    """``max_mib`` the eval-time bias caches of the attentions sharing it may hold (0: none): one
    bias (or bias + mask) per module and geometry. Modules beyond it recompute theirs, except
    large CPU windows and stripes, which keep their much smaller :func:`grouped_bias` runs.
    Each GRL network has its own (512 MiB); :func:`~.block.configure` sets another."""

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

    def __reduce__(self):  # pickled with a whole module: the limit, not the members
        return (BiasCacheBudget, (self.max_mib,))


DEFAULT_BIAS_BUDGET = BiasCacheBudget()


def bias_cache_bytes(module: nn.Module) -> int:
    """Bytes held by the eval-time position-bias caches of the attentions inside ``module``."""
    return sum(m.cache_bytes() for m in module.modules() if hasattr(m, "cache_bytes") and hasattr(m, "bias_budget"))


def position_bias(transform, table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  plan=None) -> torch.Tensor:
    """16 * sigmoid(cpb_mlp(table))[index] -> (heads, N1, N2), or with an (nW, N1, N2) ``mask``
    bias + mask -> (nW, heads, N1, N2); with a reversed-keys ``plan``, where the bias is not
    cached in full, its :func:`grouped_bias` runs (4-D).

    Cached while no gradient is needed; the key holds the weights' versions (an optimizer step
    or ``load_state_dict`` invalidates it) and the autocast dtype."""
    lin1, lin2 = transform.cpb_mlp[0], transform.cpb_mlp[2]
    budget = transform.bias_budget
    cache = (budget.max_bytes > 0 and not torch.is_grad_enabled()
             and not (torch.jit.is_tracing() or torch.compiler.is_compiling()))
    if cache:
        device = table.device.type
        key = (id(table), id(index), id(mask), plan is not None,
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
        bias = gather_bias(values, index)
        if mask is not None:
            bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)
    if cache and (fits or plan is not None):
        transform._bias_cache[key] = ((table, index, mask), versions, bias)
        budget.members.add(transform)
    return bias


def gather_bias(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(heads, T) table values gathered by an (N1, N2) index -> (heads, N1, N2) (``index_select``:
    a dense ``index_add_`` backward, no sort of the index)."""
    return values.index_select(1, index.reshape(-1)).view(values.shape[0], *index.shape)


def reversed_keys(index: torch.Tensor, width: Optional[int]):
    """:func:`~.geometry.reversed_keys_plan` of large indices into a table of ``width``
    columns; ``None`` for small ones, under tracing or compile, or without a strided form."""
    if not width or index.numel() < _LARGE_INDEX_MIN or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    from .geometry import reversed_keys_plan
    return reversed_keys_plan(index, width)


def strided_bias(values: torch.Tensor, plan) -> torch.Tensor:
    """(heads, T) values as the (heads, Qy, Qx, Ky, Kx) bias of reversed keys (a view)."""
    offset, sizes, strides = plan[:3]
    return values.as_strided((values.shape[0],) + sizes, (values.stride(0),) + strides,
                             values.storage_offset() + offset)


def grouped_bias(values: torch.Tensor, plan) -> torch.Tensor:
    """(heads, T) values as (heads, Qx, Qy + Ky - 1, Kx), ``E[h, x, r, c] = values[h, offset + r *
    width + x + c]``: with keys reversed, query (qy, qx)'s bias row is ``E[:, qx, qy:qy +
    Ky].flatten()``. 16x (32x32 windows) to 13x (64x64 stripes) smaller than the bias."""
    offset, (qy, qx, ky, kx), (width, _, _, _) = plan[:3]
    return values.as_strided((values.shape[0], qx, qy + ky - 1, kx), (values.stride(0), 1, width, 1),
                             values.storage_offset() + offset).contiguous()
