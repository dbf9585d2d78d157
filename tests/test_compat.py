"""grl_plugin.compat: each fix is needed (where it is), works, and is idempotent.

The "fails without the fix" checks run plain imports in a subprocess; on a machine where
the plain import works (e.g. a GPU machine with matching torch/torchvision) they skip.
compat.py is loaded by file path in the subprocesses so that grl_plugin/__init__.py
(which applies every fix) does not run.
"""
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPAT = REPO_ROOT / 'grl_plugin' / 'compat.py'

LOAD_COMPAT = ('import importlib.util as u, sys\n'
               f's = u.spec_from_file_location("grl_compat_standalone", {str(COMPAT)!r})\n'
               'compat = u.module_from_spec(s); s.loader.exec_module(compat)\n')


def run_py(code):
    return subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def test_torchvision_import_needs_fix():
    plain = run_py('import torchvision')
    if plain.returncode == 0:
        pytest.skip('plain `import torchvision` works here (matching torch/torchvision): fix not needed')
    assert 'operator torchvision::nms does not exist' in plain.stderr, plain.stderr[-2000:]

    fixed = run_py(LOAD_COMPAT + 'assert compat.fix_torchvision_import() is True\n'
                   'import torchvision.transforms.functional, torchvision.models\n'
                   'assert compat.fix_torchvision_import() is False\n'  # second call: nothing to do
                   'print("OK")')
    assert fixed.returncode == 0 and 'OK' in fixed.stdout, fixed.stderr[-2000:]


def test_basicsr_import_needs_functional_tensor_fix():
    plain = run_py(LOAD_COMPAT + 'compat.fix_torchvision_import()\n'
                   'import torchvision.transforms.functional_tensor')
    if plain.returncode == 0:
        pytest.skip('torchvision here still has transforms.functional_tensor: fix not needed')
    assert 'functional_tensor' in plain.stderr, plain.stderr[-2000:]

    without = run_py(LOAD_COMPAT + 'compat.fix_torchvision_import()\nimport basicsr')
    assert without.returncode != 0
    assert "No module named 'torchvision.transforms.functional_tensor'" in without.stderr, without.stderr[-2000:]

    fixed = run_py(LOAD_COMPAT + 'compat.fix_torchvision_import()\n'
                   'assert compat.fix_functional_tensor() is True\n'
                   'from torchvision.transforms.functional_tensor import rgb_to_grayscale\n'
                   'import basicsr\nprint("OK")')
    assert fixed.returncode == 0 and 'OK' in fixed.stdout, fixed.stderr[-2000:]


def test_apply_makes_basicsr_usable_and_is_idempotent():
    code = LOAD_COMPAT + (
        'first = compat.apply()\n'
        'assert "basicsr" not in sys.modules, "compat must not import basicsr"\n'
        'assert compat.apply() == first == compat.applied(), (first, compat.applied())\n'
        'import torch, basicsr\n'
        'from basicsr.utils.registry import ARCH_REGISTRY\n'
        'net = ARCH_REGISTRY.get("MSRResNet")(num_feat=8, num_block=1, upscale=2)\n'
        'assert net(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)\n'
        'print("APPLIED", ",".join(first))')
    res = run_py(code)
    assert res.returncode == 0, res.stderr[-3000:]
    applied = res.stdout.split('APPLIED', 1)[1].strip().split(',')
    plain_tv = run_py('import torchvision')
    if plain_tv.returncode != 0:  # CPU torch + CUDA torchvision: both fixes must have been used
        assert applied == ['fix_torchvision_import', 'fix_functional_tensor'], applied


def test_package_import_applies_compat_before_basicsr():
    res = run_py('import grl_plugin, basicsr\n'
                 'from grl_plugin import compat\n'
                 'from basicsr.utils.registry import ARCH_REGISTRY\n'
                 'assert "MSRResNet" in ARCH_REGISTRY\n'
                 'print("APPLIED", compat.applied())')
    assert res.returncode == 0, res.stderr[-3000:]


# --- register() -----------------------------------------------------------------------

@pytest.fixture
def registry():
    from grl_plugin import compat
    compat.apply()
    from basicsr.utils.registry import Registry
    return Registry('test')


def _make_class(name='Net', module='grl_plugin.archs.fake'):
    return type(name, (), {'__module__': module, '__qualname__': name})


def test_register_is_idempotent(registry):
    from grl_plugin.patching import register
    cls = _make_class()
    assert register(registry, cls) is cls
    assert register(registry, cls) is cls
    assert registry.get('Net') is cls
    assert list(registry.keys()) == ['Net']


def test_register_same_qualname_after_reload_replaces(registry):
    from grl_plugin.patching import register
    old, new = _make_class(), _make_class()
    assert old is not new
    register(registry, old)
    register(registry, new)  # e.g. importlib.reload of the defining module
    assert registry.get('Net') is new
    assert list(registry.keys()) == ['Net']


def test_register_with_explicit_name(registry):
    from grl_plugin.patching import register
    cls = _make_class()
    register(registry, cls, name='Alias')
    register(registry, cls, name='Alias')
    assert 'Alias' in registry and 'Net' not in registry


def test_register_conflict_raises(registry):
    from grl_plugin.patching import register
    register(registry, _make_class())
    other = _make_class(module='someone.else')
    with pytest.raises(ValueError, match=r"'Net'.*grl_plugin\.archs\.fake\.Net"):
        register(registry, other)
    with pytest.raises(ValueError, match='already taken'):
        register(registry, types.SimpleNamespace, name='Net')
