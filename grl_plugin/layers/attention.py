"""The one attention core of GRL: scaled cosine attention with a continuous position bias.

SwinV2-style (SPEC §5). For queries ``q`` and keys ``k``::

    logits = cos(q, k) * exp(min(logit_scale, log 100)) + 16 * sigmoid(cpb_mlp(table)[index]) + mask
    out    = softmax(logits) @ v

Window attention and both stages of anchored stripe attention call :func:`cosine_attention`.
Two implementations give the same result: ``"sdpa"`` (default) folds the logit scale into the
normalised queries and hands bias + mask to ``F.scaled_dot_product_attention`` as one additive
mask, so no logits are materialised where a fused kernel exists (on CPU, where SDPA would run
its math fallback with extra safe-softmax passes, it computes the same folded form explicitly);
``"reference"`` spells out the official steps one by one and is kept as the oracle.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPLS = ("sdpa", "reference")
_MAX_LOGIT_SCALE = math.log(1.0 / 0.01)


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

    def scale(self) -> torch.Tensor:
        """exp(min(logit_scale, log 100)), shape (heads, 1, 1)."""
        return torch.clamp(self.logit_scale, max=_MAX_LOGIT_SCALE).exp()

    def position_bias(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """16 * sigmoid(cpb_mlp(table)) gathered by ``index`` (N1, N2) -> (heads, N1, N2).

        The sigmoid is applied to the small table before the gather (it is elementwise, so the
        result is the same) and the gather reads head-major, giving a contiguous result.
        """
        values = 16 * torch.sigmoid(self.cpb_mlp(table).view(-1, self.num_heads))
        # index_select on the contiguous (heads, T) table: a faster gather than advanced
        # indexing, and its backward is one dense index_add_ instead of autograd's
        # index_put_(accumulate=True), which sorts the (N1 * N2)-long index on every call.
        return values.t().contiguous().index_select(1, index.reshape(-1)).view(self.num_heads, *index.shape)


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
    bias = transform.position_bias(table, index)
    if impl == "reference":
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * transform.scale()
        attn = attn + bias.unsqueeze(0)
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
    if q.device.type == "cpu":
        # On CPU, SDPA with a float mask runs its math kernel, which adds safe-softmax checks
        # (isneginf / all / where over the whole logit tensor, forward and backward). The
        # explicit form below is the same math without them; bias and mask are added in place
        # (autograd-safe: the matmul backward does not need its output).
        attn = q @ k.transpose(-2, -1)
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()  # in-place on views breaks export
        if mask is None:
            attn = attn + bias.to(q.dtype) if tracing else attn.add_(bias.to(q.dtype))
        else:
            n_w, heads, n1, n2 = mask.shape[0], attn.shape[1], attn.shape[2], attn.shape[3]
            full = (bias.unsqueeze(0) + mask.unsqueeze(1)).to(q.dtype)
            if tracing:
                attn = (attn.view(-1, n_w, heads, n1, n2) + full).view(-1, heads, n1, n2)
            else:
                attn.view(-1, n_w, heads, n1, n2).add_(full)
        attn = attn.softmax(dim=-1)
        if dropout_p > 0:
            attn = F.dropout(attn, dropout_p)
        return attn @ v
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                              dropout_p=dropout_p, scale=1.0)
    n_w = mask.shape[0]
    attn_mask = (bias.unsqueeze(0) + mask.unsqueeze(1)).to(q.dtype)  # (nW, heads, N1, N2)
    out = F.scaled_dot_product_attention(
        q.unflatten(0, (-1, n_w)), k.unflatten(0, (-1, n_w)), v.unflatten(0, (-1, n_w)),
        attn_mask=attn_mask, dropout_p=dropout_p, scale=1.0)
    return out.flatten(0, 1)
