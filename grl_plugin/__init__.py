"""grl_plugin: the GRL image-restoration transformer (CVPR 2023) as a BasicSR plugin.

``import grl_plugin`` applies the torchvision/BasicSR workarounds this machine needs
(:mod:`grl_plugin.compat`) and, when basicsr is importable, registers every component into
BasicSR's registries and installs the three features that act on BasicSR's own pipeline (see
:mod:`grl_plugin.patching`). Without basicsr, the networks (:mod:`grl_plugin.archs`) and blocks
(:mod:`grl_plugin.layers`) work with PyTorch and einops alone. Importing again never registers twice.
"""
__version__ = "0.1.0"

from . import compat as _compat

_compat.apply()

from .archs import (GRL, PRESET_KWARGS, PRESETS, grl_base, grl_base_bsr, grl_small,  # noqa: E402
                    grl_tiny, preset_kwargs)
from .archs.checkpoint import CheckpointError, load_checkpoint  # noqa: E402


def _register_all() -> bool:
    """Register into BasicSR's registries and install the BasicSR hooks; False without basicsr."""
    try:
        from basicsr.utils.registry import (ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY,
                                            MODEL_REGISTRY)
    except ImportError:
        return False
    from . import archs, data, losses, metrics, models
    from .data import robust
    from .models import checkpoint_io, exact_resume
    from .patching import register

    register(ARCH_REGISTRY, GRL, "GRL")
    for name, fn in PRESETS.items():
        register(ARCH_REGISTRY, fn, name)
    for obj in archs.ARCHS:
        register(ARCH_REGISTRY, obj)
    for registry, objs in ((DATASET_REGISTRY, data.DATASETS), (MODEL_REGISTRY, models.MODELS),
                           (LOSS_REGISTRY, losses.LOSSES), (METRIC_REGISTRY, metrics.METRICS)):
        for obj in objs:
            register(registry, obj)
    _compat.apply_basicsr()
    robust.install()
    checkpoint_io.install()
    exact_resume.install()
    return True


#: True when basicsr was importable and everything is registered.
BASICSR = _register_all()

__all__ = ["__version__", "GRL", "PRESETS", "PRESET_KWARGS", "grl_tiny", "grl_small", "grl_base",
           "grl_base_bsr", "preset_kwargs", "load_checkpoint", "CheckpointError", "BASICSR"]
