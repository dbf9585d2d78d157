"""How the plugin replaces a BasicSR attribute, and the list of what it replaced.

Every global change to BasicSR goes through :func:`patch`: the replacement remembers the
original (:func:`original`), a second patch of the same attribute is a no-op, and
:func:`patches` lists what is replaced in this process with the module that did it. The
workarounds are in :mod:`grl_plugin.compat`; the few features that must act on BasicSR's own
pipeline are in :mod:`grl_plugin.data.robust` (BasicSR's datasets reading bad files),
:mod:`grl_plugin.models.checkpoint_io` (crash-safe ``--auto_resume``) and
:mod:`grl_plugin.models.exact_resume` (resuming inside an epoch). Everything else the plugin does
lives in its own classes (``GRLModel`` overrides BasicSR's extension points).

This module does not import BasicSR.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Dict, List

__all__ = ['patch', 'original', 'is_patched', 'patches', 'register', 'warn_later', 'flush_warnings']

_MARK = '_grl_patch'
_ORIGINAL = '_grl_original'
_PATCHES: Dict[str, str] = {}  # 'module:attr' -> the grl_plugin module that replaced it


def _resolve(module: str, attr: str):
    owner: Any = importlib.import_module(module)
    *parents, name = attr.split('.')
    for p in parents:
        owner = getattr(owner, p)
    current = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name)
    return owner, name, current


def original(module: str, attr: str) -> Any:
    """The BasicSR object a patch replaced (``original('basicsr.train', 'load_resume_state')``,
    ``original('basicsr.models.base_model', 'BaseModel.get_optimizer')``); the current one if
    nothing was replaced."""
    current = _resolve(module, attr)[2]
    return getattr(current, _ORIGINAL, current)


def is_patched(module: str, attr: str) -> bool:
    return bool(getattr(_resolve(module, attr)[2], _MARK, False))


def patch(module: str, attr: str, new: Any, by: str) -> bool:
    """Replace ``module.attr`` (``attr`` may be ``Class.method``) by ``new``; ``by`` names the
    plugin module responsible. A function is wrapped first, so that marking it never touches
    ``new`` itself. Returns False if the attribute was patched already."""
    owner, name, current = _resolve(module, attr)
    if getattr(current, _MARK, False):
        return False
    if callable(new) and not isinstance(new, type):
        fn = new
        new = functools.wraps(fn)(lambda *args, **kwargs: fn(*args, **kwargs))
    setattr(new, _MARK, True)
    setattr(new, _ORIGINAL, current)
    setattr(owner, name, new)
    _PATCHES[f'{module}:{attr}'] = by
    return True


_PENDING: List[str] = []  # warnings for BasicSR's log file, which does not exist yet


def warn_later(message: str) -> None:
    """Log ``message`` as a warning through BasicSR's root logger once a pipeline creates it
    (``parse_options`` and ``load_resume_state`` run before it; see :func:`flush_warnings`)."""
    _PENDING.append(message)


def flush_warnings(logger: Any) -> None:
    """Log what :func:`warn_later` kept (``grl_plugin.compat`` calls this when BasicSR's pipelines
    create their logger)."""
    while _PENDING:
        logger.warning(_PENDING.pop(0))


def patches() -> Dict[str, str]:
    """``{'module:attr': grl_plugin module that replaced it}`` for this process (a copy)."""
    return dict(_PATCHES)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    key: Callable[[Any], tuple] = lambda o: (getattr(o, '__module__', None), getattr(o, '__qualname__', None))
    return key(a)[1] is not None and key(a) == key(b)


def _describe(o: Any) -> str:
    return f"{getattr(o, '__module__', '?')}.{getattr(o, '__qualname__', repr(o))}"


def register(registry: Any, obj: Any, name: str | None = None) -> Any:
    """Idempotently register ``obj`` into a BasicSR ``Registry`` under ``name`` (default
    ``obj.__name__``). The same object again: nothing happens; one with the same module and
    qualified name (a module reload) replaces it; an unrelated object under the name raises a
    ``ValueError`` naming both. Returns ``obj``."""
    name = name or obj.__name__
    if name in registry:
        existing = registry._obj_map[name]
        if _same(existing, obj):
            registry._obj_map[name] = obj
            return obj
        raise ValueError(f"Cannot register {_describe(obj)} as '{name}' in the '{registry._name}' "
                         f"registry: the name is already taken by {_describe(existing)}")
    registry._do_register(name, obj)
    return obj

