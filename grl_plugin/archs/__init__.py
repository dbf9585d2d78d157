"""GRL networks: the architecture, its presets and checkpoint conversion (no training code)."""
from .grl_arch import GRL
from .presets import PRESET_KWARGS, PRESETS, grl_base, grl_base_bsr, grl_small, grl_tiny, preset_kwargs
from .tasks import TASKS, task_kwargs
from .hybrid_arch import AnchorStripeAttention2d, GRLInserted, GRLUNet, WindowAttention2d

#: Extra architectures registered in BasicSR's ARCH_REGISTRY (besides GRL and the presets).
ARCHS = [GRLUNet, GRLInserted]

__all__ = ["GRL", "PRESETS", "PRESET_KWARGS", "grl_tiny", "grl_small", "grl_base", "grl_base_bsr",
           "preset_kwargs", "TASKS", "task_kwargs",
           "ARCHS", "GRLUNet", "GRLInserted", "WindowAttention2d", "AnchorStripeAttention2d"]
