"""The one attention core of GRL: scaled cosine attention with a continuous position bias.

SwinV2-style (SPEC §5). For queries ``q`` and keys ``k``::

    logits = cos(q, k) * exp(min(logit_scale, log 100)) + 16 * sigmoid(cpb_mlp(table)[index]) + mask
    out    = softmax(logits) @ v

Window attention and both stages of anchored stripe attention call :func:`cosine_attention`.
Two implementations give the same result:

``"reference"``
    the official steps one by one (SPEC §5 literally: MLP on the table, gather, sigmoid,
    logits, scale, bias, mask, softmax, @ v); the oracle.
``"sdpa"`` (default)
    the logit scale is folded into the normalised queries (:func:`normalize_qkv` does queries
    and keys in one pass; the window and stripe modules call it and pass ``normalized=True``)
    and bias + mask form one additive mask. Without autograd it calls ``F.scaled_dot_product_attention`` (a fused kernel on CPU
    and CUDA: no N1 x N2 logits written to memory), except on CPU with fewer than
    ``_CPU_FUSED_MIN_KEYS`` keys per query (GRL's 8x8 windows, and its 8 anchors per stripe at
    8x8 windows), where explicit logits and an in-place softmax take less time (a quarter of
    the fused kernel's at 8 keys). With autograd on CUDA it also calls SDPA;
    on CPU, where SDPA's backward would run its unfused math kernel (and gives no gradient for
    the position bias), :class:`_LeanAttention` runs the fused forward and a hand-written
    backward that recomputes the probabilities instead of keeping an N1 x N2 tensor between
    forward and backward, doing its gradient passes in place; where the probabilities are
    no larger than the q, k, v and output it saves anyway (small windows) it keeps them
    instead (see ``lean_backward`` of :func:`cosine_attention`). Its softmax floors probabilities at 1e-20
    (masked pairs would otherwise be subnormal floats, on which x86 CPUs are many times
    slower; nothing below float32 resolution changes). The position bias is computed once per call from
    the small table (MLP, sigmoid, then one gather) and, when no gradient is needed, cached
    per module until its weights change (:class:`BiasCacheBudget`); beyond the cache's budget,
    the CPU eval path of large windows and stripes hands the kernel no bias tensor at all
    (:func:`_grouped_flash`: keys reversed, queries grouped by grid column).
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .cpb import CpbMlp, cpb_values, grid_axes

ATTN_IMPLS = ("sdpa", "reference")
_MAX_LOGIT_SCALE = math.log(1.0 / 0.01)
_CACHE_ENTRIES = 2  # geometries (input sizes) remembered per module
_EPS = 1e-12  # F.normalize's default
# Below this many keys per query the fused CPU kernel is slower than explicit logits + softmax
# (measured, float32, 2 threads: ~0.2-0.3x the time for 4-15 keys, ~0.65x for 24, ~1x at 32-64
# on an Intel Xeon VM; 0.6-0.75x at 64 keys on an AMD EPYC VM, GRL-T/S/B eval at 8x8 windows
# 2-3 % faster; GRL's stripe stage 2 at the 8x8-window model configs reads 8 anchors)
_CPU_FUSED_MIN_KEYS = 65
# From this many query-key pairs per window on, a region mask enters as extra q/k columns
# instead of a materialised bias + mask (measured, CPU: GRL-B at the SR geometry 0.92x the eval
# time; at 8x8 windows writing bias + mask is cheap and the wider head dim costs more)
_MASK_COLUMNS_MIN_PAIRS = 1 << 16
# Relative indices of this many entries and more (_large_index) are gathered in two steps (see
# _gather_bias), and the CPU training path takes them as strides over the table, keys reversed
# (_reversed_keys: a (heads, N1, N2) bias less kept per attention, e.g. 24 MiB per GRL block at
# the SR settings; below this size the bias is small and the flips cost more than they save)
_LARGE_INDEX_MIN = 1 << 16
# Windows and rows of the (B*nW, heads, N1, N2) logits the CPU backward handles at a time
# (_backward_blocks): blocks of about 8 MiB, so that the passes over one block (product, bias,
# exp, dS, the three products reading it) find it in the cache instead of main memory. On the
# 2-core AMD EPYC VM of the measurements (32 MiB L3) forward + backward of GRL's 32x32-window
# and 64x64-stripe attentions took 0.82-0.97 of the unblocked time; 4 MiB blocks were within
# the noise of 8 MiB, 2 MiB slower on the larger head dims. Blocks of whole windows rather
# than of rows across all windows: GRL-S@sr training at 128x128 (16 windows, 64-row blocks
# before) 0.909 (4 interleaved rounds), at 64x64 0.89-0.99 (noise), GRL-B@sr 64x64 1.003.
_BACKWARD_BLOCK_BYTES = 8 * 2 ** 20
# The fused CPU kernel runs head dims that are multiples of 16 fastest (float32, 4 x 3 heads x
# 1024 x 1024 with a bias, AMD EPYC Zen 4 VM, ms): 28 15, 30 17.3, 31 19.5, 32 13.8; 14 12.3,
# 16 9.4; 60 23.5, 62 26.5, 64 22.9; but 24 (12.4) and 56 (20.5) beat 32 and 64. So on CPU q, k
# and v get zero columns up to the next multiple of 16 where that takes at most this many (GRL-B:
# head dim 30)
_CPU_HEAD_PAD_MAX = 4
# the fused CPU kernel behind SDPA, called directly for its row log-sum-exp (None if absent)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


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
        self.members: "weakref.WeakSet[AffineTransform]" = weakref.WeakSet()

    def used(self) -> int:
        """Bytes held by the caches of the modules sharing this budget."""
        return sum(module.cache_bytes() for module in list(self.members))

    def __deepcopy__(self, memo):  # a copy of a network (e.g. its EMA) shares its budget
        return self

    def __reduce__(self):  # pickled (torch.save of a whole module): the limit, not the members
        return (BiasCacheBudget, (self.max_mib,))


#: The budget of AffineTransforms made outside a GRL network, until configured otherwise.
DEFAULT_BIAS_BUDGET = BiasCacheBudget()


def bias_cache_bytes(module: nn.Module) -> int:
    """Bytes held by the eval-time position-bias caches of the attentions inside ``module``."""
    return sum(m.cache_bytes() for m in module.modules() if isinstance(m, AffineTransform))


def keep_mlp_hidden(large_attention: bool = False, lean_backward: Optional[bool] = None) -> bool:
    """Whether a block's MLP keeps its hidden layer and its post-norms their inputs for the
    backward: ``lean_backward`` False keeps, True does not; ``None`` (automatic) keeps them where
    the block's attention recomputes its probabilities (``large_attention``, see
    :func:`probs_recomputed`)."""
    return lean_backward is False or (lean_backward is None and large_attention)


def probs_recomputed(n1: int, n2: int, d: int, dv: int) -> bool:
    """Whether the automatic CPU backward recomputes the probabilities of an attention of
    ``n1`` queries, ``n2`` keys and head dims ``d`` (q, k) and ``dv`` (v): where P is larger
    than the q, k, v and output saved anyway (GRL's 32x32 windows, not its 8x8 ones)."""
    return n1 * n2 > n1 * d + n2 * d + n2 * dv + n1 * dv


def _keep_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lean_backward: Optional[bool]) -> bool:
    """Whether the CPU backward keeps P: not for ``lean_backward`` True, always for False, else
    where :func:`probs_recomputed` says no."""
    if lean_backward is not None:
        return not lean_backward
    return not probs_recomputed(q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1])


class AffineTransform(nn.Module):
    """Learned logit scale and continuous relative position bias of one attention.

    State-dict keys (official): ``logit_scale`` (heads, 1, 1), ``cpb_mlp.0`` Linear(2, 512),
    ``cpb_mlp.2`` Linear(512, heads, bias=False).

    Args:
        num_heads: attention heads.
        cpb_hidden: hidden width of the position-bias MLP (512 in GRL).
    """

    def __init__(self, num_heads: int, cpb_hidden: int = 512):
        super().__init__()
        self.num_heads = num_heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_hidden, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(cpb_hidden, num_heads, bias=False))
        self._bias_cache: dict = {}
        self.bias_budget = DEFAULT_BIAS_BUDGET

    def cache_bytes(self) -> int:
        """Bytes held by this module's eval-time position-bias cache."""
        return sum(entry[2].numel() * entry[2].element_size() for entry in self._bias_cache.values())

    def scale(self) -> torch.Tensor:
        """exp(min(logit_scale, log 100)), shape (heads, 1, 1)."""
        return torch.clamp(self.logit_scale, max=_MAX_LOGIT_SCALE).exp()

    def position_bias_reference(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """SPEC §5 literally: MLP on the table, gather by ``index``, 16 * sigmoid -> (heads, N1, N2)."""
        values = self.cpb_mlp(table.to(self.logit_scale.dtype)).view(-1, self.num_heads)
        bias = values[index.reshape(-1)].view(*index.shape, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias)

    def position_bias(self, table: torch.Tensor, index: torch.Tensor,
                      mask: Optional[torch.Tensor] = None, plan=None) -> torch.Tensor:
        """16 * sigmoid(cpb_mlp(table)) gathered by ``index`` (N1, N2) -> (heads, N1, N2), or
        with an (nW, N1, N2) region ``mask`` the sum bias + mask -> (nW, heads, N1, N2).

        Same values as :meth:`position_bias_reference`, computed head-major on the small
        table: the MLP gives (heads, T) directly (:meth:`bias_values`), the sigmoid is applied
        before the gather (it is elementwise), and the gather is one ``index_select`` (a faster
        kernel than advanced indexing, and a dense ``index_add_`` backward instead of
        ``index_put_(accumulate=True)``, which sorts the N1 * N2 index on every call). Cached
        while no gradient is needed (see :class:`BiasCacheBudget`); the cache key holds the
        weights' versions, so an optimizer step or ``load_state_dict`` invalidates it, and it
        holds the autocast dtype, so a bias made under autocast never serves a float32 forward.
        (The masked sum is what small shifted windows hand the attention kernel; caching it
        saves forming it at every forward.)

        With a reversed-keys ``plan`` (:func:`_reversed_keys`, large windows and stripes): where
        the bias is not cached and does not fit the cache's budget, the (heads, Qx, Qy + Ky - 1,
        Kx) runs :func:`_grouped_flash` reads instead (:func:`_grouped_bias`; 4-D, where the
        plain bias is 3-D), cached beyond the budget (1/13-1/16 of the bias's size): the fused
        kernel reads them ~10 % slower than a bias tensor, but forming the bias at every forward
        costs more (GRL-B at the SR settings, whose biases are 1.4 GiB: 0.92 of the time).
        """
        lin1, lin2 = self.cpb_mlp[0], self.cpb_mlp[2]
        budget = self.bias_budget
        cache = (budget.max_bytes > 0 and not torch.is_grad_enabled()
                 and not (torch.jit.is_tracing() or torch.compiler.is_compiling()))
        if cache:
            device = table.device.type  # values made under autocast (16-bit) are not float32's
            key = (id(table), id(index), id(mask), plan is not None,  # (the grouped form is 4-D)
                   torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
            versions = tuple((p.data_ptr(), p._version) for p in (lin1.weight, lin1.bias, lin2.weight))
            hit = self._bias_cache.get(key)
            # the entry holds table, index and mask themselves, so their ids cannot be reused meanwhile
            if (hit is not None and all(a is b for a, b in zip(hit[0], (table, index, mask)))
                    and hit[1] == versions):
                return hit[2]
            if len(self._bias_cache) >= _CACHE_ENTRIES:  # e.g. tiles of another size: drop the oldest
                self._bias_cache.pop(next(iter(self._bias_cache)))
        values = self.bias_values(table)
        size = index.numel() * values.shape[0] * values.element_size() * (1 if mask is None else mask.shape[0])
        fits = cache and budget.used() + size <= budget.max_bytes
        if plan is not None and not fits:
            bias = _grouped_bias(values, plan)
        else:
            bias = _gather_bias(values, index, table.shape[-2])
            if mask is not None:
                bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)
        if cache and (fits or plan is not None):
            self._bias_cache[key] = ((table, index, mask), versions, bias)
            budget.members.add(self)
        return bias

    def bias_values(self, table: torch.Tensor) -> torch.Tensor:
        """16 * sigmoid(cpb_mlp(table)) for every table cell, head-major: (heads, T).

        The MLP is :mod:`.cpb`'s: on CPU, for GRL's large windows and stripes, in its grid form
        (no (T, 512) hidden layer at all); with autograd, by :class:`~.cpb.CpbMlp`, which keeps
        no hidden layer for the backward (8-13 MiB per attention module at the SR settings,
        more than the attention itself keeps). Under autocast the MLP and the sigmoid run in
        float32 (as the grid form always does; the table is small) and the values are rounded
        to the autocast dtype once, in training and eval alike (the reference path's MLP runs
        in the autocast dtype: its values differ by that rounding)."""
        device = table.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return self.bias_values(table).to(torch.get_autocast_dtype(device))
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and self.logit_scale.requires_grad:
            if self._bias_cache:  # training: the eval-time biases go stale with the next step
                self._bias_cache = {}
            return 16 * torch.sigmoid(CpbMlp.apply(*self._mlp_inputs(table)))
        return self._bias_values(table)

    def _mlp_inputs(self, table: torch.Tensor):
        """(t (T, 2), w1, b1, w2, axes) for :func:`~.cpb.cpb_values` / :class:`~.cpb.CpbMlp`;
        ``axes`` (:func:`~.cpb.grid_axes`) where the grid form runs, else ``None``."""
        lin1, lin2 = self.cpb_mlp[0], self.cpb_mlp[2]
        t = table.reshape(-1, 2).to(lin1.weight.dtype)
        return t, lin1.weight, lin1.bias, lin2.weight, grid_axes(table)

    def _bias_values(self, table: torch.Tensor) -> torch.Tensor:
        return 16 * torch.sigmoid(cpb_values(*self._mlp_inputs(table)))

    def train(self, mode: bool = True):  # training: the eval-time biases go stale with the next step
        if mode:
            self._bias_cache = {}
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): cached biases are stale
        self._bias_cache = {}
        return super()._apply(fn, recurse)


def _large_index(index: torch.Tensor, width: Optional[int]) -> bool:
    """Whether an index into a table of ``width`` columns is large enough for the index plans
    (``_LARGE_INDEX_MIN`` entries and more; never under tracing or compile)."""
    return bool(width) and index.numel() >= _LARGE_INDEX_MIN and not (
        torch.compiler.is_compiling() or torch.jit.is_tracing())


def _reversed_keys(index: torch.Tensor, width: Optional[int]):
    """:func:`~.geometry.reversed_keys_plan` for large indices (:func:`_large_index`); ``None``
    for others or where the index has no strided form."""
    if not _large_index(index, width):
        return None
    from .geometry import reversed_keys_plan
    return reversed_keys_plan(index, width)


def _strided_bias(values: torch.Tensor, plan) -> torch.Tensor:
    """The (heads, T) table values as the (heads, Qy, Qx, Ky, Kx) bias of keys in reverse order
    (a view, no copy; ``plan`` from :func:`_reversed_keys`)."""
    offset, sizes, strides = plan[:3]
    return values.as_strided((values.shape[0],) + sizes, (values.stride(0),) + strides,
                             values.storage_offset() + offset)


def _grouped_bias(values: torch.Tensor, plan) -> torch.Tensor:
    """The (heads, T) table values as the bias of :func:`_grouped_flash`: (heads, Qx, Qy + Ky - 1,
    Kx), ``E[h, x, r, c] = values[h, offset + r * width + x + c]`` (``plan`` from
    :func:`_reversed_keys`). With keys in reverse order, query (qy, qx)'s bias row is
    ``E[:, qx, qy:qy + Ky].flatten()``: one contiguous run, Kx cells after the previous row's of
    the same qx. About N1 * N2 / (Qx * (Qy + Ky - 1) * Kx) times smaller than the bias itself
    (16x for GRL's 32x32 windows, 13x for its 64x64 stripes)."""
    offset, (qy, qx, ky, kx), (width, _, _, _) = plan[:3]
    return values.as_strided((values.shape[0], qx, qy + ky - 1, kx), (values.stride(0), 1, width, 1),
                             values.storage_offset() + offset).contiguous()


def _grouped_flash(q, k, v, bias, mask) -> Optional[torch.Tensor]:
    """The fused CPU kernel (``_FLASH_CPU``) for keys in reverse order, its bias read from
    :func:`_grouped_bias` instead of a (heads, N1, N2) tensor -> (B*nW, heads, N1, dv), or
    ``None`` where a region mask does not factor (:func:`_mask_columns`) or v's head dim
    exceeds q's.

    ``k``, ``v`` and ``mask`` are in reverse key order (:func:`~.geometry.flip_keys`). The kernel
    reads its mask through strides (batch, head, row), each row contiguous; the bias of
    reversed keys is not such a tensor, but for the queries of one grid column qx it is: rows
    qy = 0, 1, ... of that column start Kx cells apart in ``bias[:, qx]`` (and overlap). So
    each window is one call whose "heads" are the (head, qx) pairs and whose rows are the qy of
    that column (q a strided view, k and v broadcast over qx): the same products and softmax
    sums as one call on the whole window, with no N1 x N2 bias (its query blocks are Qy rows
    instead of up to 256, which the kernel runs ~10 % slower: measured on GRL-S's 32x32
    windows and 64x64 stripes)."""
    heads, qx, rows, kx = bias.shape
    n, _, n1, d = q.shape
    n2, dv = k.shape[-2], v.shape[-1]
    qy = n1 // qx
    mask, factors = _mask_columns(mask, n1, n2)
    if mask is not None and factors is None:
        return None
    width = d + (0 if factors is None else factors[0].shape[-1])
    if dv > width:
        return None
    q, k, v = _widen(q, k, v, factors, _cpu_head_pad(width))
    d = q.shape[-1]
    attn_mask = bias.as_strided((heads, qx, qy, n2), (qx * rows * kx, rows * kx, kx, 1))
    out = q.new_empty(n, heads, qy, qx, dv)
    for i in range(n):
        o = _FLASH_CPU(q[i].view(heads, qy, qx, d).transpose(1, 2), k[i].unsqueeze(1).expand(heads, qx, n2, d),
                       v[i].unsqueeze(1).expand(heads, qx, n2, d), 0.0, False, attn_mask=attn_mask, scale=1.0)[0]
        out[i].copy_(o[..., :dv].transpose(1, 2))
    return out.view(n, heads, n1, dv)


def _gather_bias(values: torch.Tensor, index: torch.Tensor, width: Optional[int] = None) -> torch.Tensor:
    """(heads, T) table values gathered by an (N1, N2) index -> (heads, N1, N2).

    With the table's ``width`` (its (rows, width) grid flattened is T), in two steps where the
    index allows (:func:`~.geometry.gather_plan`: the runs of equal table row become one copy
    each)."""
    heads = values.shape[0]
    plan = None
    if _large_index(index, width):
        from .geometry import gather_plan
        plan = gather_plan(index, width)
    if plan is None:
        return values.index_select(1, index.reshape(-1)).view(heads, *index.shape)
    patterns, runs, rows = plan
    run = index.numel() // runs.numel()
    small = values.view(heads, -1, width)[:, :rows].index_select(2, patterns)  # (heads, rows, P * run)
    return small.view(heads, -1, run).index_select(1, runs).view(heads, *index.shape)


def _explicit(q, k, v, bias, mask, dropout_p, inplace):
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


def _mask_columns(mask: Optional[torch.Tensor], n1: int, n2: int):
    """``(mask, factors)``: how a region mask enters the product q k^T. ``mask`` is ``None``
    when no window mixes regions; ``factors`` (:func:`~.geometry.mask_factors`) when it goes in
    as extra q/k columns (windows of at least ``_MASK_COLUMNS_MIN_PAIRS`` pairs, not under
    ``torch.compile``), else ``None`` (add the mask to the logits)."""
    if mask is None or torch.compiler.is_compiling():
        return mask, None
    from .geometry import mask_factors, mask_split
    if not mask_split(mask)[0].numel():
        return None, None
    return mask, (mask_factors(mask) if n1 * n2 >= _MASK_COLUMNS_MIN_PAIRS else None)


def _with_columns(x: torch.Tensor, cols: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """(B*nW, heads, N, d) with per-window columns (nW, N, r) appended (and ``pad`` zero
    columns) -> (B*nW, heads, N, d + r + pad)."""
    n_w, rows, r = cols.shape
    n, heads = x.shape[:2]
    cols = cols.to(x.dtype)
    if pad:
        cols = F.pad(cols, (0, pad))
    cols = cols[None, :, None].expand(n // n_w, n_w, heads, rows, r + pad)
    return torch.cat([x.view(n // n_w, n_w, heads, rows, -1), cols], -1).view(n, heads, rows, -1)


def _logit_operands(q, k, mask, lse=None):
    """``(qx, kx_t, mask, lse)``: what :func:`_logits_block` multiplies and adds.

    A large windows' region mask (:func:`_mask_columns`) and the rows' log-sum-exp ``lse``
    enter as extra columns of q and k ([q, a, -lse] . [k, b, 1]), so the product writes them
    with no pass of their own; the mask and lse returned are what is left to add (``None``
    when folded in). (In 16-bit formats, where -lse itself would be rounded to 8-11 bits, it
    is subtracted after the product, in float.)"""
    n1, n2 = q.shape[-2], k.shape[-2]
    mask, factors = _mask_columns(mask, n1, n2)
    if factors is not None:
        q, k = _with_columns(q, factors[0]), _with_columns(k, factors[1])
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
    reverse order (:func:`_strided_bias`; ``rows`` then whole query rows of Qx)."""
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


# Probabilities below 1e-20 (13 orders of magnitude under float32 resolution relative to a
# row's largest one) are raised to 1e-20 by the CPU softmax of the fast path: masked pairs
# (logit -100) would otherwise come out around e^-100, subnormal floats on which x86 CPUs
# compute many times slower (exp, then dS = P * (dP - D) and the products dS k, dS^T q).
_LOG_FLOOR = math.log(1e-20)
# exp(x) is taken as exp2(x * log2 e): on the AMD EPYC VM of the measurements torch.exp ran at
# a quarter of torch.exp2's speed (0.24 vs 0.06 ms for 2^19 floats, torch 2.13), and the extra
# multiply is a cheap pass; the product's rounding changes P by a few float32 ulps.
_LOG2E = 1.0 / math.log(2.0)
_LOG2_FLOOR = _LOG_FLOOR * _LOG2E


def _softmax_(s: torch.Tensor) -> torch.Tensor:
    """In-place softmax over the last dim with the 1e-20 floor (see ``_LOG_FLOOR``)."""
    s.sub_(s.amax(-1, keepdim=True)).mul_(_LOG2E).clamp_min_(_LOG2_FLOOR).exp2_()
    return s.div_(s.sum(-1, keepdim=True))


def _probs_(s: torch.Tensor) -> torch.Tensor:
    """exp(s) in place with the 1e-20 floor, for logits that already include -lse."""
    return s.mul_(_LOG2E).clamp_min_(_LOG2_FLOOR).exp2_()


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

    Where the index is GRL's relative index of a large window or stripe (:func:`_reversed_keys`),
    the keys (and values) are taken in reverse order: then the bias is the (heads, T) table seen
    through strides, (heads, Qy, Qx, Ky, Kx), so the forward copies it for the fused kernel
    instead of gathering it, and the backward keeps the table instead of the gathered bias and
    adds it to the logits through the same strides (row blocks of whole query rows). The
    attention itself does not depend on the order of its keys; dK and dV are flipped back.
    """

    @staticmethod
    def forward(ctx, q, k, v, values, index, mask, save_probs, width=None, least_memory=False):
        plan = _reversed_keys(index, width) if values.is_contiguous() else None
        ctx.plan = plan
        if plan is None:
            bias = _gather_bias(values, index, width)
        else:  # keys in reverse order: the bias is the table seen through strides, no gather
            k, v, index = k.flip(-2), v.flip(-2), plan[3]
            if mask is not None:
                from .geometry import flip_keys
                mask = flip_keys(mask)
            bias = _strided_bias(values, plan).reshape(values.shape[0], *index.shape)
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
            bias = _strided_bias(bias, plan)
        d_out = d_out.contiguous()
        n, heads, n1, n2 = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        if p is None:
            qx, kx_t, mask, lse = _logit_operands(q, k, mask, lse)
            kx_t = kx_t.contiguous()  # (products with a transposed view ran up to 1.6x slower)
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
        # 1.2-2.4x faster than P^T dO and dS^T q (whose first operand is a transposed view)
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
    several windows split them into sums of short products: GRL-S's 32x32 windows at 128x128
    took 64-row blocks). Windows per block divide ``mask_windows`` or are a multiple of it (a
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


def _widen(q, k, v, factors, pad: int):
    """q and k with a region mask's columns (``factors`` from :func:`_mask_columns`, or
    ``None``) and ``pad`` zero columns after them; v zero-padded to their width (the kernels
    take one head dim; v's extra columns give output columns that are cut off)."""
    if factors is not None:
        q, k = _with_columns(q, factors[0], pad), _with_columns(k, factors[1], pad)
    elif pad:
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
    return q, k, v if v.shape[-1] == q.shape[-1] else F.pad(v, (0, q.shape[-1] - v.shape[-1]))


def _cpu_head_pad(width: int) -> int:
    """Zero columns the fused CPU kernel's operands of head dim ``width`` get (``_CPU_HEAD_PAD_MAX``)."""
    extra = -width % 16
    return extra if extra <= _CPU_HEAD_PAD_MAX else 0


def _padded(kernel, q, k, v, attn_mask):
    """``kernel(q, k, v, attn_mask)`` with q, k (and v, where its head dim is q's) padded with
    zero columns as :func:`_cpu_head_pad` says on CPU: the q.k products are unchanged, v's
    zero columns give zero output columns, which are cut off."""
    extra = _cpu_head_pad(q.shape[-1]) if q.device.type == "cpu" else 0
    if not extra or v.shape[-1] != q.shape[-1]:
        return kernel(q, k, v, attn_mask)
    out, lse = kernel(*_widen(q, k, v, None, extra), attn_mask)
    return out[..., :-extra], lse


def _sdpa(q, k, v, bias, mask, kernel, multiple: int = 1):
    """Run ``kernel(q, k, v, attn_mask)`` (4-D SDPA operands; it returns ``(out, lse or None)``)
    with bias (+ mask) as the additive mask -> (out (B*nW, heads, N1, dv), lse or None).

    ``bias`` is (heads, N1, N2), broadcast over the batch and the windows (stride 0), or bias +
    mask already formed per window, (nW, heads, N1, N2) (``mask`` then ``None``). A region mask
    enters as R extra columns of q and k (:func:`~.geometry.mask_factors`; zero columns of v
    match them; on CUDA R rounded up to ``multiple`` for the kernel's head-dim alignment, on CPU
    padded to the kernel's faster widths, :func:`_cpu_head_pad`, as q, k, v are), so that no
    (windows, heads, N1, N2) bias + mask is written. Small windows (fewer than
    ``_MASK_COLUMNS_MIN_PAIRS`` query-key pairs, e.g. 8x8), masks that do not factor, and all
    masks under ``torch.compile`` add the mask to the bias for every window instead."""
    heads, n1, n2 = bias.shape[-3:]
    n = q.shape[0]
    if bias.dim() == 3:
        mask, factors = _mask_columns(mask, n1, n2)
        d, dv = q.shape[-1], v.shape[-1]
        if factors is not None and dv <= d + factors[0].shape[-1]:
            r = factors[0].shape[-1]
            pad = _cpu_head_pad(d + r) if q.device.type == "cpu" else -r % multiple
            out, lse = kernel(*_widen(q, k, v, factors, pad), bias.unsqueeze(0).expand(n, -1, -1, -1))
            return out[..., :dv], lse
        if mask is None:
            return _padded(kernel, q, k, v, bias.unsqueeze(0).expand(n, -1, -1, -1))
        bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)
    n_w = bias.shape[0]
    if n == n_w:  # one image: its windows are the batch
        return _padded(kernel, q, k, v, bias)
    out, lse = _padded(kernel, *(x.reshape(n // n_w, n_w * heads, *x.shape[2:]) for x in (q, k, v)),
                       bias.view(1, n_w * heads, n1, n2).expand(n // n_w, -1, -1, -1))
    return out.reshape(n, heads, n1, -1), lse if lse is None else lse.reshape(n, heads, n1)


def _head_dim_multiple(q: torch.Tensor) -> int:
    """Head-dim multiple SDPA's fused CUDA kernels need (memory-efficient attention with a mask:
    8 for 16-bit, 4 for float32 inputs); 1 elsewhere (the CPU kernel takes any head dim)."""
    if q.device.type != "cuda":
        return 1
    return 4 if q.dtype == torch.float32 else 8


def _fused(q, k, v, bias, mask, head_multiple: Optional[int] = None):
    """``F.scaled_dot_product_attention`` with bias (+ mask) -> (B*nW, heads, N1, dv).

    A head dim the fused kernel cannot take (GRL-B: 30) is zero-padded to ``head_multiple``
    (default :func:`_head_dim_multiple`): zeros change no q.k product (the scale is passed
    explicitly) and give zero output columns, which are cut off."""
    d, dv = q.shape[-1], v.shape[-1]
    m = head_multiple or _head_dim_multiple(q)
    if d % m or dv % m:
        q, k = F.pad(q, (0, -d % m)), F.pad(k, (0, -d % m))
        v = F.pad(v, (0, -dv % m))
    out, _ = _sdpa(q, k, v, bias, mask,
                   lambda *qkvm: (F.scaled_dot_product_attention(*qkvm[:3], attn_mask=qkvm[3], scale=1.0), None), m)
    return out[..., :dv]


def _fused_with_lse(q, k, v, bias, mask):
    """The fused CPU kernel behind SDPA, which also returns the rows' log-sum-exp:
    (output (B*nW, heads, N1, dv), lse (B*nW, heads, N1))."""
    return _sdpa(q, k, v, bias, mask,
                 lambda qs, ks, vs, m: _FLASH_CPU(qs, ks, vs, 0.0, False, attn_mask=m, scale=1.0))


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
        scale: (heads, 1, 1) logit scale (:meth:`AffineTransform.scale`).

    Returns:
        q, k, v, each (B', heads, N, d): ``q * scale / |q|``, ``k / |k|`` (the logit scale
        folded into the queries, ready for :func:`cosine_attention` with ``normalized=True``)
        and ``v``; the input is never written. With autograd they are contiguous views of one
        new tensor, and only it and the norms are kept for the backward (the backward's
        products then read them without copies); without, q and k are a new tensor in the
        input's layout and v a view of the input.
    """
    factor = _qkv_factor(scale, qkv.shape[-2], qkv.dtype)
    if not (torch.is_grad_enabled() and (qkv.requires_grad or factor.requires_grad)):
        # no copy of v, and q, k copied without reordering (the CPU kernels read them strided
        # as fast, and the copy takes ~15 % less time)
        qk = qkv[:, :, :2].clone(memory_format=torch.contiguous_format)
        qk.mul_(factor.view(2, -1, 1) / torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min_(_EPS))
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, qkv[:, :, 2].transpose(1, 2)
    if not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        return _NormalizeQKV.apply(qkv, factor)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = q * (factor[0] / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(_EPS))
    return q, F.normalize(k, dim=-1, eps=_EPS), v


def cosine_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, transform: AffineTransform,
                     table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     dropout_p: float = 0.0, impl: str = "sdpa", normalized: bool = False,
                     lean_backward: Optional[bool] = None) -> torch.Tensor:
    """Scaled cosine attention with position bias and optional region mask.

    Args:
        q: (B*nW, heads, N1, d) queries; ``k`` (B*nW, heads, N2, d); ``v`` (B*nW, heads, N2, dv).
        transform: the :class:`AffineTransform` holding logit scale and CPB MLP.
        table, index: coordinate table and (N1, N2) relative index from ``layers.geometry``.
        mask: optional (nW, N1, N2) additive mask; the leading dim of ``q`` is batch-major
            over the nW windows (as produced by the window/stripe partition).
        dropout_p: attention dropout (only applied when > 0).
        impl: ``"sdpa"`` or ``"reference"``.
        normalized: ``"sdpa"`` only: q and k are already normalised and q carries the logit
            scale (:func:`normalize_qkv`), as the window and stripe modules hand them over.
        lean_backward: CPU training memory/speed trade-off of ``"sdpa"``: ``None`` (automatic)
            recomputes the probabilities P in the backward where P is larger than the q, k, v
            and output kept anyway (:func:`probs_recomputed`), ``True`` always (and keeps no
            output: least memory), ``False`` never (fastest backward).

    Returns:
        (B*nW, heads, N1, dv).
    """
    if impl == "reference":
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * transform.scale()
        attn = attn + transform.position_bias_reference(table, index).unsqueeze(0)
        if mask is not None:
            n_w, heads, n1, n2 = mask.shape[0], attn.shape[1], attn.shape[2], attn.shape[3]
            attn = attn.view(-1, n_w, heads, n1, n2) + mask[None, :, None]
            attn = attn.view(-1, heads, n1, n2)
        attn = attn.softmax(dim=-1)
        if dropout_p > 0:
            attn = F.dropout(attn, dropout_p)
        return attn @ v
    if impl != "sdpa":
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    if not normalized:  # normalise q and fold the logit scale in with one pass over q: q * (scale / |q|)
        q = q * (transform.scale().to(q.dtype) / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(_EPS))
        k = F.normalize(k, dim=-1, eps=_EPS)
    exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if (q.device.type == "cpu" and torch.is_grad_enabled() and dropout_p == 0 and not exporting
            and not torch.compiler.is_compiling()):  # CPU training: the lean autograd function
        values = transform.bias_values(table).to(q.dtype)
        if any(t.requires_grad for t in (q, k, v, values)):
            v = v.contiguous()
            return _LeanAttention.apply(q, k, v, values, index, mask, _keep_probs(q, k, v, lean_backward),
                                        table.shape[-2], lean_backward is True)
        bias = _gather_bias(values, index, table.shape[-2])
    else:
        bias = None
        if (q.device.type == "cpu" and _FLASH_CPU is not None and dropout_p == 0 and not exporting
                and not torch.is_grad_enabled()):  # large windows/stripes: keys reversed, no N1 x N2 bias
            plan = _reversed_keys(index, table.shape[-2])
            if plan is not None:
                bias = transform.position_bias(table, index, plan=plan).to(q.dtype)
                if bias.dim() == 4:  # not cached in full: the grouped form (see position_bias)
                    from .geometry import flip_keys
                    fused = _grouped_flash(q, k.flip(-2), v.flip(-2), bias,
                                           None if mask is None else flip_keys(mask))
                    if fused is not None:
                        return fused
                    bias = None  # (a mask that does not factor: the plain bias, below)
        if (bias is None and mask is not None and not exporting and dropout_p == 0 and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            mask, factors = _mask_columns(mask, *index.shape)
            if mask is not None and factors is None:  # small windows: bias + mask, cached with the bias
                bias, mask = transform.position_bias(table, index, mask).to(q.dtype), None
        if bias is None:
            bias = transform.position_bias(table, index).to(q.dtype)
    if exporting:  # in-place on views breaks export
        return _explicit(q, k, v, bias, mask, dropout_p, inplace=False)
    if dropout_p > 0:
        return _explicit(q, k, v, bias, mask, dropout_p, inplace=True)
    if (q.device.type == "cpu" and k.shape[-2] < _CPU_FUSED_MIN_KEYS and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias)))):
        return torch.matmul(_softmax_(_logits_(q, k, bias, mask)), v)  # few keys: explicit is faster
    return _fused(q, k, v, bias, mask)
