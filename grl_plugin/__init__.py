"""grl_plugin: the GRL image-restoration transformer (CVPR 2023) as a BasicSR plugin.

``import grl_plugin`` applies the BasicSR/torchvision import fixes that this machine needs
(:mod:`grl_plugin.compat`) and registers every component into BasicSR's registries. It is
idempotent: importing it again, or importing a submodule first, never registers twice.
"""
__version__ = "0.1.0"

from . import compat as _compat

_compat.apply()

from .archs import (GRL, PRESET_KWARGS, PRESETS, grl_base, grl_base_bsr, grl_small,  # noqa: E402
                    grl_tiny, preset_kwargs)
from .archs.checkpoint import CheckpointError, load_checkpoint  # noqa: E402


def _register_all() -> None:
    from basicsr.utils.registry import (ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY,
                                        MODEL_REGISTRY)

    from . import archs, data, losses, metrics, models

    _compat.register(ARCH_REGISTRY, GRL, "GRL")
    for name, fn in PRESETS.items():
        _compat.register(ARCH_REGISTRY, fn, name)
    for obj in archs.ARCHS:
        _compat.register(ARCH_REGISTRY, obj)
    for registry, objs in ((DATASET_REGISTRY, data.DATASETS), (MODEL_REGISTRY, models.MODELS),
                           (LOSS_REGISTRY, losses.LOSSES), (METRIC_REGISTRY, metrics.METRICS)):
        for obj in objs:
            _compat.register(registry, obj)


_register_all()
_compat.apply_basicsr()

__all__ = ["__version__", "GRL", "PRESETS", "PRESET_KWARGS", "grl_tiny", "grl_small", "grl_base",
           "grl_base_bsr", "preset_kwargs", "load_checkpoint", "CheckpointError"]
