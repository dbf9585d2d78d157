"""GRL forward/backward on every head, channel count and odd sizes; block patterns; kwargs."""
import pytest
import torch

from grl_plugin import GRL
from grl_plugin.layers import GRLBlock, GRLStage

TINY = dict(embed_dim=16, depths=[2], num_heads_window=[1], num_heads_stripe=[1], window_size=4,
            stripe_size=[8, 8], stripe_groups=[None, None], stripe_shift=True,
            anchor_window_down_factor=2, mlp_ratio=2, drop_path_rate=0.0)

HEADS = [("pixelshuffle", 2), ("pixelshuffle", 3), ("pixelshuffle", 4), ("pixelshuffle", 8),
         ("pixelshuffledirect", 2), ("pixelshuffledirect", 3), ("nearest+conv", 4), ("", 1)]


@pytest.mark.parametrize("upsampler,scale", HEADS)
@pytest.mark.parametrize("channels", [1, 3, 4, 6])
def test_every_head_and_channel_count(upsampler, scale, channels):
    out_ch = 3 if channels == 6 else channels
    model = GRL(**TINY, upsampler=upsampler, upscale=scale, in_channels=channels,
                out_channels=out_ch).eval()
    for h, w in [(1, 1), (5, 9), (17, 8)]:
        x = torch.rand(1, channels, h, w)
        with torch.no_grad():
            y = model(x)
        assert y.shape == (1, out_ch, h * scale, w * scale)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (7, 7), (16, 16), (23, 41), (97, 131)])
def test_odd_sizes_model_yaml_style(size):
    # official model-YAML geometry: stripe [8, None], groups [None, 4], df 4 (pad 16)
    model = GRL(embed_dim=16, depths=[4], num_heads_window=[1], num_heads_stripe=[1], window_size=8,
                stripe_size=[8, None], stripe_groups=[None, 4], stripe_shift=True,
                anchor_window_down_factor=4, upsampler="pixelshuffledirect", upscale=2).eval()
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, size[0] * 2, size[1] * 2) and torch.isfinite(y).all()


@pytest.mark.parametrize("batch", [1, 2])
def test_sdpa_equals_reference_path(batch):
    torch.manual_seed(0)
    model = GRL(**dict(TINY, depths=[4]), upsampler="pixelshuffle", upscale=2,
                local_connection=True).eval()
    for p in model.parameters():  # make logit scales, CPB MLPs and norms non-trivial
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(batch, 3, 21, 30)
    with torch.no_grad():
        fast = model(x)
        ref = model.set_attn_impl("reference")(x)
    assert (fast - ref).abs().max() <= 1e-5


def test_gradients_reach_every_parameter():
    model = GRL(**dict(TINY, depths=[4]), upsampler="pixelshuffle", upscale=2,
                local_connection=True).train()
    model(torch.rand(1, 3, 12, 20)).abs().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = GRL(**TINY, upsampler="", upscale=1).train()
    b = GRL(**TINY, upsampler="", upscale=1, fairscale_checkpoint=True).train()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 16, 16)
    for m in (a, b):
        m(x).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_block_pattern_per_stage():
    stage = GRL(embed_dim=16, depths=[8], num_heads_window=[1], num_heads_stripe=[1],
                stripe_shift=True).layers[0]
    pattern = [(b.attn.window_attn.window_shift, b.attn.stripe_type, b.attn.stripe_attn.stripe_shift)
               for b in stage.blocks]
    assert pattern == [(True, "H", False), (False, "W", False), (True, "H", True), (False, "W", True)] * 2
    no_shift = GRL(embed_dim=16, depths=[4], num_heads_window=[1], num_heads_stripe=[1]).layers[0]
    assert not any(b.attn.stripe_attn.stripe_shift for b in no_shift.blocks)


def test_drop_path_schedule():
    model = GRL(embed_dim=16, depths=[2, 3], num_heads_window=[1, 1], num_heads_stripe=[1, 1])
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.layers for b in s.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 5).tolist())
    assert isinstance(model.layers[0].blocks[0].drop_path, torch.nn.Identity)


def test_official_noop_keys_accepted_and_unknown_key_named():
    GRL(**TINY, name="grl_tiny", double_window=False, stripe_square=False, separable_conv_act=True,
        use_buffer=True, use_efficient_buffer=True, out_proj_type="linear",
        pretrained_window_size=[0, 0], pretrained_stripe_size=[0, 0], offload_to_cpu=False,
        img_size=256)
    with pytest.raises(TypeError, match="stripe_sizes"):
        GRL(**TINY, stripe_sizes=[8, 8])


@pytest.mark.parametrize("method", ["n", "l", "w", "r", "t02"])
def test_init_methods(method):
    model = GRL(**TINY, upsampler="", upscale=1, init_method=method)
    blk = model.layers[0].blocks[0]
    if method == "l":
        assert blk.norm1.weight.abs().sum() == 0 and model.norm_start.weight.sum() == 16
    else:
        assert torch.equal(blk.norm1.weight, torch.ones(16))
    assert blk.res_scale == (0.1 if method == "r" else 1.0)
    assert torch.allclose(blk.attn.window_attn.attn_transform.logit_scale, torch.log(torch.tensor(10.0)))
    std = blk.attn.qkv.body.weight.std().item()
    want = {"n": 0.02, "l": 0.02, "r": 0.02, "w": 0.002, "t02": 0.02}[method]
    assert std == pytest.approx(want, rel=0.25)
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(1, 3, 8, 8))).all()


@pytest.mark.parametrize("shape", [(1, 16, 5, 7), (2, 16, 16, 16), (1, 16, 33, 9)])
def test_block_and_stage_take_maps_of_any_size(shape):
    torch.manual_seed(0)
    block = GRLBlock(16, window_size=4, stripe_size=(8, 8), anchor_window_down_factor=2,
                     local_connection=True).eval()
    stage = GRLStage(16, 2, window_size=4, stripe_size=(8, 8), anchor_window_down_factor=2).eval()
    seq = torch.nn.Sequential(block, stage)
    x = torch.rand(*shape)
    with torch.no_grad():
        assert seq(x).shape == x.shape
        # the token form on a padded grid gives the same result as the map form
        if shape[2] % 8 == 0 and shape[3] % 8 == 0:
            tokens = x.flatten(2).transpose(1, 2)
            y = block(tokens, (shape[2], shape[3]))
            assert torch.allclose(y.transpose(1, 2).reshape(shape), block(x), atol=1e-6)


def test_token_form_on_unpadded_grid_is_a_clear_error():
    block = GRLBlock(16, window_size=4, stripe_size=(8, 8))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        block(torch.rand(1, 30, 16), (5, 6))
    with pytest.raises(ValueError, match="x_size"):
        block(torch.rand(1, 30, 16))
