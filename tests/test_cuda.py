"""The fast path on a CUDA device: same outputs and gradients as the reference, fused kernels,
no host->device copies inside a forward, bf16 autocast, torch.compile.

Skipped without CUDA (CI has none); run on the device machine when one is lent. The checks
that do not depend on CUDA kernels (equality, bf16, compile) also run on another device with
``GRL_TEST_CUDA_DEVICE=cpu``, which is how this file's logic is tried without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from grl_plugin.archs.grl_arch import GRL
from helpers import assert_same_training_step

DEVICE = torch.device(os.environ.get("GRL_TEST_CUDA_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
pytestmark = pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="no CUDA device here")
TOL = 1e-4

# window 8 (64-token windows: bias + mask formed per window), window 16 (256 tokens: the region
# mask as extra q/k columns), head dims 8 and 15 (15: zero-padded for the CUDA kernels)
NETS = {
    "w8": dict(img_size=32, embed_dim=32, depths=[4], num_heads_window=[2], num_heads_stripe=[2], window_size=8,
               stripe_size=[16, 16], stripe_shift=True, anchor_window_down_factor=2, mlp_ratio=2, upscale=2,
               upsampler="pixelshuffledirect", drop_path_rate=0.0),
    "w16_hd15": dict(img_size=64, embed_dim=60, depths=[4], num_heads_window=[2], num_heads_stripe=[2],
                     window_size=16, stripe_size=[32, 32], stripe_shift=True, anchor_window_down_factor=2,
                     mlp_ratio=2, upscale=2, upsampler="pixelshuffle", drop_path_rate=0.0, local_connection=True),
}

@pytest.fixture(autouse=True)
def strict_fp32():
    """Full fp32 products (no TF32) so that the two paths are compared at fp32 precision."""
    if not ON_CUDA:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pair(name: str):
    torch.manual_seed(0)
    ref = GRL(attn_impl="reference", **NETS[name])
    fast = GRL(attn_impl="sdpa", **NETS[name])
    fast.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    size = NETS[name]["img_size"]
    x = torch.rand(2, 3, size, size, device=DEVICE)
    return ref.to(DEVICE), fast.to(DEVICE), x


@pytest.mark.parametrize("name", sorted(NETS))
def test_eval_fast_equals_reference(name):
    ref, fast, x = _pair(name)
    with torch.no_grad():
        a, b = ref.eval()(x), fast.eval()(x)
        c = fast(x)  # second call: the cached biases
    assert a.device.type == DEVICE.type and torch.isfinite(a).all()
    assert (a - b).abs().max() <= TOL and torch.equal(b, c)


@pytest.mark.parametrize("name", sorted(NETS))
def test_train_step_fast_equals_reference(name):
    ref, fast, x = _pair(name)
    assert_same_training_step(ref.train(), fast.train(), x, TOL)


def test_bf16_autocast_close_to_fp32_and_trains():
    _, fast, x = _pair("w16_hd15")
    with torch.no_grad():
        full = fast.eval()(x)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            low = fast(x)
    err = float((low.float() - full).abs().max())
    assert 0 < err <= 0.05 * max(1.0, float(full.abs().max()))  # bf16 used, and close
    fast.train()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = fast(x).float().abs().mean()
    loss.backward()
    grads = [p.grad for p in fast.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def _profile(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(DEVICE)
    return [e.name for e in prof.events()]


@pytest.mark.skipif(not ON_CUDA, reason="CUDA kernels and copies")
@pytest.mark.parametrize("name", sorted(NETS))
def test_fused_kernel_and_no_host_copies(name):
    """After a first call (tables, indices, masks and eval biases built on the device), an eval
    forward and a training step run SDPA's memory-efficient kernel, never the math fallback
    (which stores the N x N maps), and copy nothing from the host."""
    _, fast, x = _pair(name)

    def eval_fwd():
        with torch.no_grad():
            fast.eval()(x)

    def train_step():
        fast.train()(x).abs().mean().backward()

    for fn in (eval_fwd, train_step):
        fn()  # warm-up: caches filled
        names = _profile(fn)
        assert any("efficient_attention" in n for n in names), fn.__name__
        assert not any("_scaled_dot_product_attention_math" in n for n in names), fn.__name__
        copies = [n for n in names if "HtoD" in n]  # "Memcpy HtoD (Pageable -> Device)", ...
        assert not copies, (fn.__name__, copies[:5])


def test_compile_matches_eager():
    """``torch.compile`` (default inductor backend) at a fixed size gives the eager outputs."""
    _, fast, x = _pair("w8")
    fast.eval()
    with torch.no_grad():
        eager = fast(x)
        compiled = torch.compile(fast)(x)
    assert (compiled - eager).abs().max() <= TOL


def test_compile_blocks_with_cuda_graphs_matches_eager():
    """Regional compilation (``compile_blocks``, mode ``reduce-overhead``: a CUDA graph per block
    layout, replayed by the blocks of that layout) gives the eager outputs in eval, and in
    training the eager gradients over repeated steps (replays must not overwrite what the
    backward still reads). Off CUDA the blocks go through dynamo only (``backend="eager"``)."""
    import copy
    from grl_plugin.layers import compile_blocks
    _, fast, x = _pair("w8")
    eager = copy.deepcopy(fast)
    kwargs = {"mode": "reduce-overhead"} if ON_CUDA else {"backend": "eager"}
    torch._dynamo.reset()
    compile_blocks(fast, **kwargs)
    with torch.no_grad():
        want = eager.eval()(x)
        for _ in range(2):
            assert (fast.eval()(x) - want).abs().max() <= TOL
    target = torch.rand_like(want)
    for _ in range(3):
        grads = []
        for net in (eager, fast):
            net.train().zero_grad(set_to_none=True)
            (net(x) - target).abs().mean().backward()
            grads.append([p.grad.detach().clone() for p in net.parameters()])
        for a, b in zip(*grads):
            assert (a - b).abs().max() <= 1e-3 * max(1.0, float(a.abs().max()))
    torch._dynamo.reset()
