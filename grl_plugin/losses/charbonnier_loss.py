"""GRLCharbonnierLoss: the official GRL Charbonnier loss.

``loss = mean(sqrt((pred - target)^2 + eps^2))`` with ``eps = 1e-3`` (JPEG, demosaicking and
deblurring experiments). BasicSR's own ``CharbonnierLoss`` differs: ``sqrt(d^2 + eps)`` with
``eps = 1e-12``.

Option file::

    pixel_opt:
      type: GRLCharbonnierLoss
      loss_weight: 1.0
      eps: !!float 1e-3
      reduction: mean      # mean | sum | none
"""
import torch
from basicsr.losses.loss_util import weight_reduce_loss
from torch import nn

_REDUCTIONS = ('none', 'mean', 'sum')


class GRLCharbonnierLoss(nn.Module):
    """``loss_weight * reduce(sqrt((pred - target)^2 + eps^2))`` (official GRL, eps 1e-3).

    Args:
        loss_weight (float): multiplier of the loss. Default 1.
        eps (float): Charbonnier epsilon (squared inside the root). Default 1e-3.
        reduction (str): ``'mean'`` | ``'sum'`` | ``'none'``. Default ``'mean'``.

    ``forward(pred, target, weight=None)``: an optional element-wise ``weight`` is applied as in
    BasicSR's losses (``mean`` then divides by the weight sum).
    """

    def __init__(self, loss_weight=1.0, eps=1e-3, reduction='mean'):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f'GRLCharbonnierLoss: unsupported reduction {reduction!r}; use one of {_REDUCTIONS}')
        self.loss_weight = float(loss_weight)
        self.eps = float(eps)
        self.reduction = reduction

    def forward(self, pred, target, weight=None, **kwargs):
        loss = torch.sqrt((pred - target) ** 2 + self.eps ** 2)
        return self.loss_weight * weight_reduce_loss(loss, weight, self.reduction)

    def extra_repr(self):
        return f'loss_weight={self.loss_weight}, eps={self.eps}, reduction={self.reduction!r}'
