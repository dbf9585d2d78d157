"""Tiled inference: identical to untiled when one tile covers the image, close otherwise."""
import pytest
import torch

from grl_plugin import GRL
from grl_plugin.tiling import tile_origins, tiled_forward

NET = dict(embed_dim=16, depths=[2], num_heads_window=[1], num_heads_stripe=[1], window_size=4,
           stripe_size=[8, 8], anchor_window_down_factor=2, stripe_shift=True, drop_path_rate=0.0)


def test_tile_origins_follow_official_rule():
    assert tile_origins(100, 40, 32) == [0, 32, 60]
    assert tile_origins(40, 40, 32) == [0]
    assert tile_origins(30, 40, 32) == [0]


@pytest.mark.parametrize("upsampler,scale", [("", 1), ("pixelshuffle", 2)])
def test_one_tile_is_exactly_untiled(upsampler, scale):
    model = GRL(**NET, upsampler=upsampler, upscale=scale).eval()
    x = torch.rand(1, 3, 21, 30)
    with torch.no_grad():
        whole = model(x)
        tiled = tiled_forward(model, x, tile=30, overlap=4, scale=scale, multiple=model.pad_size)
    assert torch.equal(whole, tiled)


def test_identity_network_is_reconstructed_exactly_by_any_tiling():
    x = torch.rand(2, 3, 37, 53)
    for blend in ("linear", "uniform"):
        y = tiled_forward(lambda t: t * 2, x, tile=16, overlap=5, blend=blend)
        assert torch.allclose(y, x * 2, atol=1e-6)
    up = torch.nn.Upsample(scale_factor=2, mode="nearest")
    assert torch.allclose(tiled_forward(up, x, tile=16, overlap=4, scale=2), up(x), atol=1e-6)


def test_tiled_close_to_untiled_and_linear_blend_beats_uniform():
    skimage = pytest.importorskip("skimage.data")
    torch.manual_seed(0)
    model = GRL(**NET, upsampler="", upscale=1).eval()
    x = torch.from_numpy(skimage.astronaut()[100:164, 180:260].copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        whole = model(x)
        errs = {b: (tiled_forward(model, x, 32, 8, multiple=model.pad_size, blend=b) - whole).abs().mean()
                for b in ("linear", "uniform")}
    change = (whole - x).abs().mean()  # how much the network changes the image
    assert errs["linear"] < 0.1 * change
    assert errs["linear"] < errs["uniform"]


def test_tile_rounded_to_pad_multiple_and_bad_overlap():
    seen = []

    def net(t):
        seen.append(tuple(t.shape[-2:]))
        return t

    tiled_forward(net, torch.rand(1, 1, 40, 40), tile=10, overlap=2, multiple=8)
    assert set(seen) == {(16, 16)}  # 10 -> 16
    with pytest.raises(ValueError, match="overlap"):
        tiled_forward(net, torch.rand(1, 1, 40, 40), tile=16, overlap=16)
