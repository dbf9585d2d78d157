"""Property-based test (hypothesis): any valid small GRL configuration on any input size.

For random valid configurations (channels, heads that divide each attention half, window and
stripe geometry with stripes divisible by the anchor down-factor, stripe groups, shifts,
every upsampler with a scale it supports, local branch, conv type) and random input sizes
(including sizes smaller than a window and odd, non-square ones), the network returns the
documented shape and only finite values, in eval and in train mode with a backward pass.
"""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from grl_plugin.archs.grl_arch import GRL  # noqa: E402

UPSAMPLERS = {"pixelshuffle": (2, 3, 4), "pixelshuffledirect": (1, 2, 3), "nearest+conv": (4,), "": (1,)}


@st.composite
def configs(draw):
    heads_w = draw(st.sampled_from([1, 2]))
    heads_s = draw(st.sampled_from([1, 2]))
    per_head = draw(st.sampled_from([2, 4]))
    embed_dim = 2 * heads_w * heads_s * per_head            # each half divisible by both head counts
    df = draw(st.sampled_from([1, 2]))
    stripe = [draw(st.sampled_from([1, 2, 4])) * df for _ in range(2)]   # multiples of df
    groups = draw(st.sampled_from([[None, None], [None, 2], [2, None]]))
    stripe_size = [None if g else s for s, g in zip(stripe, groups)]
    upsampler = draw(st.sampled_from(sorted(UPSAMPLERS)))
    depth = draw(st.integers(1, 2))
    return dict(
        in_channels=draw(st.sampled_from([1, 3])), embed_dim=embed_dim,
        depths=[depth] * draw(st.integers(1, 2)), window_size=draw(st.sampled_from([2, 4, 6])),
        stripe_size=stripe_size, stripe_groups=groups, stripe_shift=draw(st.booleans()),
        anchor_window_down_factor=df, mlp_ratio=draw(st.sampled_from([1, 2])), upsampler=upsampler,
        upscale=draw(st.sampled_from(UPSAMPLERS[upsampler])), local_connection=draw(st.booleans()),
        conv_type=draw(st.sampled_from(["1conv", "1conv1x1", "linear"])),
        heads=(heads_w, heads_s))


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cfg=configs(), h=st.integers(1, 23), w=st.integers(1, 23), batch=st.integers(1, 2))
def test_any_valid_config_and_size_gives_right_shape_and_finite_output(cfg, h, w, batch):
    heads_w, heads_s = cfg.pop("heads")
    stages = len(cfg["depths"])
    torch.manual_seed(0)
    net = GRL(num_heads_window=[heads_w] * stages, num_heads_stripe=[heads_s] * stages, **cfg)
    x = torch.rand(batch, cfg["in_channels"], h, w)
    scale = cfg["upscale"]
    expected = (batch, cfg["in_channels"], h * scale, w * scale)
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert tuple(out.shape) == expected
    assert torch.isfinite(out).all()
    net.train()
    out = net(x)
    assert tuple(out.shape) == expected
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
