"""Workarounds for BasicSR 1.4.2 / torchvision on current PyTorch.

Every fix is a small function that checks whether it is needed and does nothing
otherwise (e.g. on a GPU machine with a matching torch/torchvision pair).
:func:`apply` runs them all; it is idempotent and is called by
``grl_plugin/__init__.py`` before anything imports ``basicsr``.
:func:`applied` lists the fixes that were actually applied in this process.

This module must not import ``basicsr`` itself.
"""
import sys
import types

__all__ = ['apply', 'applied', 'register', 'fix_torchvision_import', 'fix_functional_tensor']

_APPLIED = []

# Modules of torchvision that register fake/autograd kernels for its C++ ops.
_TV_REGISTRATION_MODULES = ('torchvision._meta_registrations', 'torchvision._autograd_registrations')


def fix_torchvision_import():
    """Make ``import torchvision`` work with a CUDA torchvision wheel on CPU-only torch.

    Symptom: ``RuntimeError: operator torchvision::nms does not exist`` -- the C++
    extension needs ``libtorch_cuda.so`` and is not loaded, then
    ``torchvision/_meta_registrations.py`` tries to register kernels for its ops.
    Fix: drop the partially imported torchvision modules and import again with empty
    stand-ins for the two registration modules. The pure-Python parts (transforms,
    models) then work; ``torchvision.ops`` stays unusable.

    Returns True if the fix was applied.
    """
    try:
        import torchvision  # noqa: F401
        return False
    except ImportError:
        return False  # not installed: nothing to fix here, basicsr will report it
    except RuntimeError as err:
        if 'torchvision::nms' not in str(err):
            raise
    for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
        del sys.modules[name]
    for name in _TV_REGISTRATION_MODULES:
        sys.modules[name] = types.ModuleType(name)
    import torchvision  # noqa: F401,F811
    return True


def fix_functional_tensor():
    """Provide ``torchvision.transforms.functional_tensor`` (removed in torchvision 0.17).

    basicsr 1.4.2 (``basicsr/data/degradations.py``) does
    ``from torchvision.transforms.functional_tensor import rgb_to_grayscale``.
    Registers a module of that name re-exporting ``rgb_to_grayscale`` from
    ``torchvision.transforms.functional``, only if the real one is missing.

    Returns True if the fix was applied.
    """
    name = 'torchvision.transforms.functional_tensor'
    try:
        __import__(name)
        return False
    except ImportError:
        pass
    try:
        import torchvision.transforms
        from torchvision.transforms.functional import rgb_to_grayscale
    except (ImportError, RuntimeError):
        return False  # torchvision unusable; nothing this fix can do
    mod = types.ModuleType(name)
    mod.__doc__ = 'Shim created by grl_plugin.compat for basicsr 1.4.2.'
    mod.rgb_to_grayscale = rgb_to_grayscale
    sys.modules[name] = mod
    torchvision.transforms.functional_tensor = mod
    return True


_FIXES = (fix_torchvision_import, fix_functional_tensor)


def apply():
    """Run every fix that is needed (idempotent). Returns :func:`applied`."""
    for fix in _FIXES:
        if fix() and fix.__name__ not in _APPLIED:
            _APPLIED.append(fix.__name__)
    return applied()


def applied():
    """Names of the fixes actually applied in this process (a copy)."""
    return list(_APPLIED)


def _same(a, b):
    if a is b:
        return True
    key = lambda o: (getattr(o, '__module__', None), getattr(o, '__qualname__', None))  # noqa: E731
    return key(a)[1] is not None and key(a) == key(b)


def _describe(o):
    return f"{getattr(o, '__module__', '?')}.{getattr(o, '__qualname__', repr(o))}"


def register(registry, obj, name=None):
    """Idempotently register ``obj`` into a basicsr ``Registry`` under ``name``.

    ``name`` defaults to ``obj.__name__``. If the name already holds the same object,
    nothing happens; if it holds one with the same ``__module__`` and ``__qualname__``
    (a module reload), the new object replaces it. If an unrelated object holds the
    name, a ``ValueError`` naming both is raised. Returns ``obj``.
    """
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
