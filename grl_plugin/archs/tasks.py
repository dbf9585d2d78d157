"""Task settings of the official experiments: geometry and head per task.

``task_kwargs("dn", "T", color=False)`` gives the full GRL kwargs of a released model family:
the size preset (``GRL_T``/``GRL_S``/``GRL_B``) with the experiment's window / stripes /
anchor factor and the task's head. Weights do not store the geometry, so loading a bare
checkpoint needs these (or the option file it was trained with).
"""
from __future__ import annotations

from typing import Any, Dict

from .presets import preset_kwargs

_RESTORE = dict(upsampler="", upscale=1)

#: Per-task overrides of the model-YAML presets (official experiment configs).
TASKS: Dict[str, Dict[str, Any]] = {
    "sr": dict(window_size=32, stripe_size=[64, 64]),  # head of the size preset, scale below
    "dn": dict(_RESTORE, window_size=16, stripe_size=[64, 128]),
    "jpeg": dict(_RESTORE, window_size=36, stripe_size=[72, 144]),
    "dm": dict(_RESTORE, window_size=8, stripe_size=[32, 32]),
    "db_motion": dict(_RESTORE, window_size=12, stripe_size=[48, 96]),
    "db_defocus": dict(_RESTORE, window_size=16, stripe_size=[48, 96]),
    "db_defocus_dual": dict(_RESTORE, window_size=16, stripe_size=[48, 96], in_channels=6, out_channels=3),
    "bsr": dict(window_size=16, stripe_size=[32, 64], upsampler="nearest+conv", upscale=4),
}
_COMMON = dict(stripe_groups=[None, None], stripe_shift=True, anchor_window_down_factor=4)
SIZES = {"T": "GRL_T", "S": "GRL_S", "B": "GRL_B"}


def task_kwargs(task: str, size: str = "T", *, scale: int = 4, color: bool = True,
                **overrides: Any) -> Dict[str, Any]:
    """GRL kwargs for ``task`` (one of :data:`TASKS`) at ``size`` T/S/B.

    ``scale`` is the SR factor (``sr`` only); ``color=False`` makes a 1-channel model (gray
    denoising / JPEG). ``overrides`` win over everything.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if size.upper() not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from T, S, B")
    kwargs = preset_kwargs(SIZES[size.upper()], **_COMMON, **TASKS[task])
    if task == "sr":
        kwargs["upscale"] = int(scale)
    if not color:
        kwargs["in_channels"] = 1
    kwargs["img_size"] = kwargs["stripe_size"][1]
    kwargs.update(overrides)
    return kwargs
