"""Metrics (registered in BasicSR's METRIC_REGISTRY by ``import grl_plugin``)."""

#: Metric functions registered in BasicSR's METRIC_REGISTRY.
METRICS = []

__all__ = ["METRICS"]
