"""`import grl_plugin` registers into BasicSR's registries, idempotently, in any import order."""
import subprocess
import sys

SCRIPT = r"""
import importlib
import grl_plugin.layers            # a submodule first: imports the package (and registers) once
import grl_plugin.archs.grl_arch
import grl_plugin
importlib.reload(grl_plugin)        # a second registration pass must not raise
import grl_plugin.archs.grl_arch as arch
importlib.reload(arch)              # the class object changes; the registry follows it
importlib.reload(grl_plugin)
from basicsr.utils.registry import ARCH_REGISTRY
from basicsr.archs import build_network
assert ARCH_REGISTRY.get("GRL") is grl_plugin.GRL
net = build_network({"type": "GRL_T", "upscale": 2})
assert type(net).__name__ == "GRL" and net.upscale == 2
net = build_network({"type": "GRL", "embed_dim": 16, "depths": [1], "num_heads_window": [1],
                     "num_heads_stripe": [1], "upsampler": "", "upscale": 1})
print("ok", sorted(k for k in ARCH_REGISTRY.keys() if k.startswith("GRL")))
"""


def test_registration_idempotent_in_any_order():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok ['GRL', 'GRLInserted', 'GRLUNet', 'GRL_B', 'GRL_B_BSR', 'GRL_S', 'GRL_T']" in out.stdout
