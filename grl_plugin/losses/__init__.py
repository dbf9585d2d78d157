"""Losses (registered in BasicSR's LOSS_REGISTRY by ``import grl_plugin``).

* :class:`GRLCharbonnierLoss` -- official GRL Charbonnier, ``mean(sqrt(d^2 + eps^2))``, eps 1e-3.
* :class:`GRLPerceptualLoss` -- VGG19 perceptual/style loss, weights from a local file only.

GAN terms use BasicSR's own ``GANLoss`` (official GRL: ``gan_type: vanilla``, real 1 / fake 0,
``loss_weight: 0.1``).
"""
from .charbonnier_loss import GRLCharbonnierLoss
from .perceptual_loss import GRLPerceptualLoss

#: Loss classes registered in BasicSR's LOSS_REGISTRY (names must not collide with BasicSR's).
LOSSES = []
LOSSES += [GRLCharbonnierLoss, GRLPerceptualLoss]

__all__ = ["LOSSES", "GRLCharbonnierLoss", "GRLPerceptualLoss"]
