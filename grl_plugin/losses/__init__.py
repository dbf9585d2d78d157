"""Losses (registered in BasicSR's LOSS_REGISTRY by ``import grl_plugin``)."""

#: Loss classes registered in BasicSR's LOSS_REGISTRY (names must not collide with BasicSR's).
LOSSES = []

__all__ = ["LOSSES"]
