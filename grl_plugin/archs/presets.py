"""GRL presets as the official model YAMLs define them (``config/model/grl/*.yaml``).

Each preset is a function returning a :class:`GRL`; keyword arguments override the preset,
e.g. ``grl_tiny(upscale=2, window_size=32, stripe_size=[64, 64], stripe_groups=[None, None])``
for the released SR x2 tiny model. Registered in BasicSR's ARCH_REGISTRY as ``GRL_T``,
``GRL_S``, ``GRL_B`` and ``GRL_B_BSR``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

from .grl_arch import GRL

_COMMON: Dict[str, Any] = dict(
    img_size=64, in_channels=3, upscale=4, img_range=1.0, window_size=8, stripe_size=[8, None],
    stripe_groups=[None, 4], stripe_shift=True, mlp_ratio=2, qkv_proj_type="linear",
    anchor_proj_type="avgpool", anchor_one_stage=True, anchor_window_down_factor=4,
    out_proj_type="linear", conv_type="1conv", init_method="n")

PRESET_KWARGS: Dict[str, Dict[str, Any]] = {
    "GRL_T": dict(_COMMON, embed_dim=64, depths=[4, 4, 4, 4], num_heads_window=[2, 2, 2, 2],
                  num_heads_stripe=[2, 2, 2, 2], upsampler="pixelshuffledirect",
                  local_connection=False),
    "GRL_S": dict(_COMMON, embed_dim=128, depths=[4, 4, 4, 4], num_heads_window=[2, 2, 2, 2],
                  num_heads_stripe=[2, 2, 2, 2], upsampler="pixelshuffle", local_connection=False),
    "GRL_B": dict(_COMMON, embed_dim=180, depths=[4, 4, 8, 8, 8, 4, 4],
                  num_heads_window=[3] * 7, num_heads_stripe=[3] * 7, upsampler="pixelshuffle",
                  local_connection=True),
}
# Real-world SR generator (grl_base_bsr.yaml): the base model with the nearest+conv head.
PRESET_KWARGS["GRL_B_BSR"] = dict(PRESET_KWARGS["GRL_B"], upsampler="nearest+conv")


def preset_kwargs(name: str, **overrides: Any) -> Dict[str, Any]:
    """The kwargs of preset ``name`` updated with ``overrides`` (a fresh dict)."""
    if name not in PRESET_KWARGS:
        raise KeyError(f"unknown GRL preset {name!r}; choose from {sorted(PRESET_KWARGS)}")
    kwargs = {k: list(v) if isinstance(v, list) else v for k, v in PRESET_KWARGS[name].items()}
    kwargs.update(overrides)
    return kwargs


def grl_tiny(**overrides: Any) -> GRL:
    """GRL-T: 0.91 M parameters (x4 pixelshuffledirect head)."""
    return GRL(**preset_kwargs("GRL_T", **overrides))


def grl_small(**overrides: Any) -> GRL:
    """GRL-S: 3.49 M parameters (x4 pixelshuffle head)."""
    return GRL(**preset_kwargs("GRL_S", **overrides))


def grl_base(**overrides: Any) -> GRL:
    """GRL-B: 20.2 M parameters (x4 pixelshuffle head, local conv branch)."""
    return GRL(**preset_kwargs("GRL_B", **overrides))


def grl_base_bsr(**overrides: Any) -> GRL:
    """GRL-B generator for real-world SR (x4 nearest+conv head), 20.0 M parameters."""
    return GRL(**preset_kwargs("GRL_B_BSR", **overrides))


PRESETS: Dict[str, Callable[..., GRL]] = {
    "GRL_T": grl_tiny, "GRL_S": grl_small, "GRL_B": grl_base, "GRL_B_BSR": grl_base_bsr}
