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
    the logit scale is folded into the normalised queries and bias + mask form one additive
    mask. Without autograd it calls ``F.scaled_dot_product_attention`` (a fused kernel on CPU
    and CUDA: no N1 x N2 logits written to memory). With autograd on CUDA it also calls SDPA;
    on CPU, where SDPA would fall back to its unfused math kernel, :class:`_LeanAttention`
    computes the same attention with a hand-written backward that keeps no N1 x N2 tensor
    between forward and backward (it recomputes the probabilities from the saved row
    log-sum-exp) and does its softmax and gradient passes in place. The position bias is
    computed once per call from the small table (MLP, sigmoid, then one gather) and, when no
    gradient is needed, cached per module until its weights change (:func:`set_bias_cache`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPLS = ("sdpa", "reference")
_MAX_LOGIT_SCALE = math.log(1.0 / 0.01)
_BIAS_CACHE = {"enabled": True}
_SAVE_PROBS = [False]
_CACHE_ENTRIES = 2  # geometries (input sizes) remembered per module


def set_bias_cache(enabled: bool) -> None:
    """Switch the eval-time position-bias cache on (default) or off for every module.

    The cache keeps one (heads, N1, N2) tensor per attention module and geometry, e.g.
    ~24 MiB per GRL-T block at the SR settings; switch it off to trade that memory for
    recomputing the bias at every forward.
    """
    _BIAS_CACHE["enabled"] = bool(enabled)


def set_lean_backward(enabled: bool) -> None:
    """CPU training memory/speed trade-off of the ``"sdpa"`` path (default: lean, ``True``).

    Lean: the backward recomputes the attention probabilities, so no N1 x N2 tensor lives
    between forward and backward (about half the reference path's training peak at the SR
    settings). ``False`` keeps them instead: a faster backward for more memory.
    """
    _SAVE_PROBS[0] = not enabled


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

    def scale(self) -> torch.Tensor:
        """exp(min(logit_scale, log 100)), shape (heads, 1, 1)."""
        return torch.clamp(self.logit_scale, max=_MAX_LOGIT_SCALE).exp()

    def position_bias_reference(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """SPEC §5 literally: MLP on the table, gather by ``index``, 16 * sigmoid -> (heads, N1, N2)."""
        values = self.cpb_mlp(table.to(self.logit_scale.dtype)).view(-1, self.num_heads)
        bias = values[index.reshape(-1)].view(*index.shape, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias)

    def position_bias(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """16 * sigmoid(cpb_mlp(table)) gathered by ``index`` (N1, N2) -> (heads, N1, N2).

        Same values as :meth:`position_bias_reference`, computed head-major on the small
        table: the MLP runs on the (T, 2) table as two plain matrix products giving (heads, T)
        directly, the sigmoid is applied before the gather (it is elementwise), and the gather
        is one ``index_select`` (a faster kernel than advanced indexing, and a dense
        ``index_add_`` backward instead of ``index_put_(accumulate=True)``, which sorts the
        N1 * N2 index on every call). Cached while no gradient is needed (see
        :func:`set_bias_cache`); the cache key holds the weights' versions, so an optimizer
        step or ``load_state_dict`` invalidates it.
        """
        lin1, lin2 = self.cpb_mlp[0], self.cpb_mlp[2]
        cache = (_BIAS_CACHE["enabled"] and not torch.is_grad_enabled()
                 and not (torch.jit.is_tracing() or torch.compiler.is_compiling()))
        if cache:
            versions = tuple((p.data_ptr(), p._version) for p in (lin1.weight, lin1.bias, lin2.weight))
            hit = self._bias_cache.get((id(table), id(index)))
            # the entry holds table and index themselves, so their ids cannot be reused meanwhile
            if hit is not None and hit[0] is table and hit[1] is index and hit[2] == versions:
                return hit[3]
        hidden = F.relu(F.linear(table.reshape(-1, 2).to(lin1.weight.dtype), lin1.weight, lin1.bias))  # (T, hidden)
        values = 16 * torch.sigmoid(torch.mm(lin2.weight, hidden.t()))            # (heads, T)
        bias = values.index_select(1, index.reshape(-1)).view(self.num_heads, *index.shape)
        if cache:
            if len(self._bias_cache) >= _CACHE_ENTRIES:  # e.g. tiles of another size: drop the oldest
                self._bias_cache.pop(next(iter(self._bias_cache)))
            self._bias_cache[(id(table), id(index))] = (table, index, versions, bias)
        return bias

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): cached biases are stale
        self._bias_cache = {}
        return super()._apply(fn, recurse)



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


def _logits_(q, k, bias, mask):
    """q k^T + bias (+ mask), computed into one new (B*nW, heads, N1, N2) tensor."""
    s = torch.matmul(q, k.transpose(-2, -1))
    heads, n1, n2 = s.shape[1:]
    if mask is None:
        s.add_(bias)
    else:
        sv = s.view(-1, mask.shape[0], heads, n1, n2)
        sv.add_(bias)
        sv.add_(mask.unsqueeze(1).to(s.dtype))
    return s


class _LeanAttention(torch.autograd.Function):
    """softmax(q k^T + bias + mask) @ v for autograd on CPU, with a lean hand-written backward.

    Saves q, k, v and the output; the backward recomputes the probabilities P (one matrix
    product and a softmax) and forms the logits' gradient in place:
    dS = P * (dO v^T - rowsum(dO * O)). Between forward and backward nothing of size
    N1 x N2 is kept (``save_probs=True`` keeps P instead: faster, more memory).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, save_probs):
        p = torch.softmax(_logits_(q, k, bias, mask), dim=-1)
        out = torch.matmul(p, v)
        ctx.save_probs = save_probs
        ctx.save_for_backward(q, k, v, bias, mask, out, p if save_probs else None)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, bias, mask, out, p = ctx.saved_tensors
        d_out = d_out.contiguous()
        if p is None:
            p = torch.softmax(_logits_(q, k, bias, mask), dim=-1)
        d_v = torch.matmul(p.transpose(-2, -1), d_out) if ctx.needs_input_grad[2] else None
        ds = torch.matmul(d_out, v.transpose(-2, -1))
        ds.sub_((d_out * out).sum(-1, keepdim=True)).mul_(p)
        del p
        d_q = torch.matmul(ds, k) if ctx.needs_input_grad[0] else None
        d_k = torch.matmul(ds.transpose(-2, -1), q) if ctx.needs_input_grad[1] else None
        d_bias = ds.view(-1, *bias.shape).sum(0) if ctx.needs_input_grad[3] else None
        return d_q, d_k, d_v, d_bias, None, None


def _fused(q, k, v, bias, mask):
    """SDPA with bias (+ mask) as one 4-D additive mask (broadcast over the batch, stride 0)."""
    heads, n1, n2 = bias.shape
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).expand(q.shape[0], -1, -1, -1),
                                              scale=1.0)
    n_w = mask.shape[0]
    full = (bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)).view(1, n_w * heads, n1, n2)
    b = q.shape[0] // n_w
    out = F.scaled_dot_product_attention(
        q.reshape(b, n_w * heads, n1, -1), k.reshape(b, n_w * heads, n2, -1),
        v.reshape(b, n_w * heads, n2, -1), attn_mask=full.expand(b, -1, -1, -1), scale=1.0)
    return out.view(b * n_w, heads, n1, -1)


def cosine_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, transform: AffineTransform,
                     table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     dropout_p: float = 0.0, impl: str = "sdpa") -> torch.Tensor:
    """Scaled cosine attention with position bias and optional region mask.

    Args:
        q: (B*nW, heads, N1, d) queries; ``k`` (B*nW, heads, N2, d); ``v`` (B*nW, heads, N2, dv).
        transform: the :class:`AffineTransform` holding logit scale and CPB MLP.
        table, index: coordinate table and (N1, N2) relative index from ``layers.geometry``.
        mask: optional (nW, N1, N2) additive mask; the leading dim of ``q`` is batch-major
            over the nW windows (as produced by the window/stripe partition).
        dropout_p: attention dropout (only applied when > 0).
        impl: ``"sdpa"`` or ``"reference"``.

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
    q = F.normalize(q, dim=-1) * transform.scale().to(q.dtype)
    k = F.normalize(k, dim=-1)
    bias = transform.position_bias(table, index).to(q.dtype)
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():  # in-place on views breaks export
        return _explicit(q, k, v, bias, mask, dropout_p, inplace=False)
    if dropout_p > 0:
        return _explicit(q, k, v, bias, mask, dropout_p, inplace=True)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
    if q.device.type == "cpu" and needs_grad and not torch.compiler.is_compiling():
        return _LeanAttention.apply(q, k, v.contiguous(), bias, mask, _SAVE_PROBS[0])
    return _fused(q, k, v, bias, mask)
