"""Metrics (registered in BasicSR's METRIC_REGISTRY by ``import grl_plugin``).

* :func:`calculate_psnrb` -- PSNR-B (JPEG artefact removal), official GRL protocol.
* :func:`calculate_ssim_grl` -- the official GRL SSIM (zero-padded Gaussian window, full map).
"""
from .grl_metrics import blocking_effect_factor, calculate_psnrb, calculate_ssim_grl

#: Metric functions registered in BasicSR's METRIC_REGISTRY.
METRICS = []
METRICS += [calculate_psnrb, calculate_ssim_grl]

__all__ = ["METRICS", "calculate_psnrb", "calculate_ssim_grl", "blocking_effect_factor"]
