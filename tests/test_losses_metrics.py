"""GRLCharbonnierLoss, GRLPerceptualLoss, calculate_psnrb, calculate_ssim_grl."""
import math
import socket
import urllib.request

import cv2
import numpy as np
import pytest
import torch

import grl_plugin  # noqa: F401  (registers)
from basicsr.losses import build_loss
from basicsr.metrics import calculate_metric
from basicsr.metrics.psnr_ssim import calculate_psnr, calculate_ssim
from basicsr.utils.registry import LOSS_REGISTRY, METRIC_REGISTRY
from grl_plugin.losses import GRLCharbonnierLoss, GRLPerceptualLoss
from grl_plugin.metrics import calculate_psnrb, calculate_ssim_grl


# ----------------------------------------------------------------------------- registration
def test_registered_without_replacing_basicsr():
    assert LOSS_REGISTRY.get("GRLCharbonnierLoss") is GRLCharbonnierLoss
    assert LOSS_REGISTRY.get("GRLPerceptualLoss") is GRLPerceptualLoss
    assert METRIC_REGISTRY.get("calculate_psnrb") is calculate_psnrb
    assert METRIC_REGISTRY.get("calculate_ssim_grl") is calculate_ssim_grl
    assert LOSS_REGISTRY.get("CharbonnierLoss").__module__.startswith("basicsr.")
    assert METRIC_REGISTRY.get("calculate_ssim") is calculate_ssim


# ----------------------------------------------------------------------------- Charbonnier
def test_charbonnier_hand_values_and_build_loss():
    loss = build_loss({"type": "GRLCharbonnierLoss", "loss_weight": 1.0, "eps": 1e-3, "reduction": "mean"})
    assert isinstance(loss, GRLCharbonnierLoss)
    x = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    assert loss(x, x).item() == pytest.approx(1e-3, rel=1e-12)  # diff 0 -> eps
    y = torch.tensor([[[[3e-3, 0.0]]]], dtype=torch.float64)
    expected = (math.sqrt(9e-6 + 1e-6) + 1e-3) / 2
    assert loss(y, x).item() == pytest.approx(expected, rel=1e-12)

    summed = build_loss({"type": "GRLCharbonnierLoss", "loss_weight": 2.0, "reduction": "sum"})
    assert summed(y, x).item() == pytest.approx(2 * (math.sqrt(1e-5) + 1e-3), rel=1e-12)
    none = GRLCharbonnierLoss(reduction="none", eps=0.5)
    assert torch.allclose(none(y, x), torch.sqrt(y ** 2 + 0.25))
    # BasicSR's CharbonnierLoss is sqrt(d^2 + 1e-12): not the official loss
    basic = build_loss({"type": "CharbonnierLoss"})
    assert basic(x, x).item() == pytest.approx(1e-6, rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        GRLCharbonnierLoss(reduction="avg")


def test_charbonnier_gradient_is_finite_at_zero():
    x = torch.zeros(2, 3, 4, 4, requires_grad=True)
    GRLCharbonnierLoss()(x, torch.zeros_like(x)).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() == 0


# ----------------------------------------------------------------------------- PSNR-B
def _psnrb_by_hand(x, y):
    """PSNR-B of one channel (uint8 2-D arrays) with explicit loops over adjacent pixel pairs."""
    h, w = x.shape
    xf, yf = x.astype(np.float64) / 255, y.astype(np.float64) / 255
    mse = sum((xf[r, c] - yf[r, c]) ** 2 for r in range(h) for c in range(w)) / (h * w)
    boundary, other = [], []
    for r in range(h):
        for c in range(w - 1):  # horizontal neighbours; a block boundary lies between columns 7|8, 15|16, ...
            (boundary if c % 8 == 7 else other).append((xf[r, c] - xf[r, c + 1]) ** 2)
    for r in range(h - 1):
        for c in range(w):
            (boundary if r % 8 == 7 else other).append((xf[r, c] - xf[r + 1, c]) ** 2)
    d_b, d_bc = sum(boundary) / len(boundary), sum(other) / len(other)
    bef = math.log2(8) / math.log2(min(h, w)) * (d_b - d_bc) if d_b > d_bc else 0.0
    return 10 * math.log10(1 / (mse + bef))


def test_psnrb_block_offsets_hand_computed():
    # reference flat 100; restored = 100 + a different offset in each 8x8 block of a 16x16 image
    ref = np.full((16, 16), 100, np.uint8)
    out = ref.copy()
    out[:8, 8:] += 4
    out[8:, :8] += 8
    out[8:, 8:] += 12
    # MSE = (0 + 16 + 64 + 144) / 4 = 56; boundary pairs: 16 x 4^2 (cols 7|8) + 16 x 8^2 (rows 7|8)
    # over 32 pairs = 40, other pairs 0 -> BEF = log2(8)/log2(16) * 40 = 30 (8-bit units squared)
    expected = 10 * math.log10(255 ** 2 / (56 + 30))
    assert calculate_psnrb(out, ref, crop_border=0) == pytest.approx(expected, abs=1e-10)
    assert calculate_psnrb(out, ref, crop_border=0) == pytest.approx(_psnrb_by_hand(out, ref), abs=1e-10)
    assert calculate_psnr(out, ref, crop_border=0) == pytest.approx(10 * math.log10(255 ** 2 / 56), abs=1e-10)
    # BEF is measured on the restored image (first argument) only
    assert calculate_psnrb(ref, out, crop_border=0) == pytest.approx(10 * math.log10(255 ** 2 / 56), abs=1e-10)


def test_psnrb_matches_loops_on_random_color_images():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    out = np.clip(ref.astype(int) + rng.integers(-20, 21, ref.shape), 0, 255).astype(np.uint8)
    out[:, 8:16] = np.clip(out[:, 8:16].astype(int) + 30, 0, 255)  # a blocky column band
    expected = np.mean([_psnrb_by_hand(out[..., c], ref[..., c]) for c in range(3)])
    assert calculate_psnrb(out, ref, crop_border=0) == pytest.approx(expected, abs=1e-9)
    # CHW input and crop_border
    got = calculate_psnrb(out.transpose(2, 0, 1), ref.transpose(2, 0, 1), crop_border=0, input_order="CHW")
    assert got == pytest.approx(expected, abs=1e-9)
    cropped = np.mean([_psnrb_by_hand(out[4:-4, 4:-4, c], ref[4:-4, 4:-4, c]) for c in range(3)])
    assert calculate_psnrb(out, ref, crop_border=4) == pytest.approx(cropped, abs=1e-9)


def test_psnrb_equals_psnr_without_blocking():
    rows, cols = np.mgrid[0:32, 0:32]
    out = (3 * rows + 2 * cols).astype(np.uint8)  # every adjacent difference equal: BEF 0
    rng = np.random.default_rng(1)
    ref = np.clip(out.astype(int) + rng.integers(-5, 6, out.shape), 0, 255).astype(np.uint8)
    assert calculate_psnrb(out, ref, 0) == pytest.approx(calculate_psnr(out, ref, 0), abs=1e-10)
    assert calculate_psnrb(out, out, 0) == float("inf")


def test_psnrb_below_psnr_with_block_artefacts():
    skdata = pytest.importorskip("skimage.data")
    ref = cv2.cvtColor(skdata.astronaut()[100:164, 200:264], cv2.COLOR_RGB2BGR)
    rng = np.random.default_rng(2)
    offsets = np.kron(rng.integers(-6, 7, (8, 8, 3)), np.ones((8, 8, 1), dtype=int))
    blocky = np.clip(ref.astype(int) + offsets, 0, 255).astype(np.uint8)
    # per-channel PSNR averaged, to compare like with like
    psnr = np.mean([calculate_psnr(blocky[..., c], ref[..., c], 0) for c in range(3)])
    assert calculate_psnrb(blocky, ref, 0) < psnr - 0.5
    # real JPEG artefacts: PSNR-B below PSNR on the Y channel too
    ok, enc = cv2.imencode(".jpg", ref, [cv2.IMWRITE_JPEG_QUALITY, 10])
    jpeg = cv2.imdecode(enc, cv2.IMREAD_COLOR)
    assert calculate_psnrb(jpeg, ref, 0, test_y_channel=True) < calculate_psnr(jpeg, ref, 0, test_y_channel=True)


def test_y_channel_is_rounded_bt601():
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = np.clip(ref.astype(int) + rng.integers(-9, 10, ref.shape), 0, 255).astype(np.uint8)

    def y_of(bgr):  # MATLAB BT.601 luma of BGR 8-bit input, rounded to 8-bit levels
        b, g, r = [bgr[..., i].astype(np.float64) for i in range(3)]
        return np.round(16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255).astype(np.uint8)

    yo, yr = y_of(out), y_of(ref)
    assert calculate_psnrb(out, ref, 0, test_y_channel=True) == pytest.approx(_psnrb_by_hand(yo, yr), abs=1e-9)
    assert calculate_ssim_grl(out, ref, 0, test_y_channel=True) == pytest.approx(calculate_ssim_grl(yo, yr, 0),
                                                                                 abs=1e-12)


def test_metrics_through_calculate_metric():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    img2 = np.clip(img.astype(int) + 3, 0, 255).astype(np.uint8)
    data = {"img": img, "img2": img2}
    for name, fn in (("calculate_psnrb", calculate_psnrb), ("calculate_ssim_grl", calculate_ssim_grl)):
        for y in (False, True):
            got = calculate_metric(data, {"type": name, "crop_border": 2, "test_y_channel": y})
            assert got == fn(img, img2, crop_border=2, test_y_channel=y) and np.isfinite(got)


# ----------------------------------------------------------------------------- SSIM
def _ssim_reference(x, y):
    """Independent zero-padded Gaussian SSIM (scipy correlate, constant 0 border), per channel."""
    from scipy import ndimage
    ax = np.arange(11) - 5
    g = np.exp(-ax ** 2 / (2 * 1.5 ** 2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for c in range(x.shape[2]):
        a, b = x[..., c].astype(np.float64) / 255, y[..., c].astype(np.float64) / 255

        def f(t):
            return ndimage.correlate(t, win, mode="constant", cval=0.0)
        mu1, mu2 = f(a), f(b)
        s1, s2, s12 = f(a * a) - mu1 ** 2, f(b * b) - mu2 ** 2, f(a * b) - mu1 * mu2
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        vals.append((((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))).mean())
    return float(np.mean(vals))


def test_ssim_identical_is_one_and_matches_reference():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    assert calculate_ssim_grl(img, img, 0) == pytest.approx(1.0, abs=1e-12)
    noisy = np.clip(img.astype(int) + rng.integers(-25, 26, img.shape), 0, 255).astype(np.uint8)
    assert calculate_ssim_grl(noisy, img, 0) == pytest.approx(_ssim_reference(noisy, img), abs=1e-10)
    gray = img[..., 0]
    assert calculate_ssim_grl(gray, noisy[..., 0], 0) == pytest.approx(
        _ssim_reference(gray[..., None], noisy[..., :1]), abs=1e-10)


def test_ssim_differs_from_basicsr_at_the_borders():
    # constant images a, b: the 'valid' SSIM (BasicSR/MATLAB) is exactly (2ab + C1)/(a^2 + b^2 + C1)
    # (no variance); the zero-padded map sees dark borders -> means and variances change there
    a, b = 200, 150
    x, y = np.full((32, 32, 1), a, np.uint8), np.full((32, 32, 1), b, np.uint8)
    c1 = (0.01 * 255) ** 2
    valid = (2 * a * b + c1) / (a * a + b * b + c1)
    assert calculate_ssim(x, y, 0) == pytest.approx(valid, abs=1e-6)
    grl = calculate_ssim_grl(x, y, 0)
    assert grl == pytest.approx(_ssim_reference(x, y), abs=1e-10)
    assert abs(grl - valid) > 1e-3


# ----------------------------------------------------------------------------- perceptual
@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_perceptual_missing_weights_one_line_error(tmp_path, no_network):
    missing = tmp_path / "nowhere" / "vgg19-dcbb9e9d.pth"
    with pytest.raises(FileNotFoundError) as err:
        build_loss({"type": "GRLPerceptualLoss", "vgg_weights": str(missing)})
    msg = str(err.value)
    assert "\n" not in msg and str(missing) in msg and "vgg_weights" in msg
    assert "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in msg
    with pytest.raises(ValueError, match="vgg_weights"):
        build_loss({"type": "GRLPerceptualLoss"})  # required: never guessed
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError) as err:
        GRLPerceptualLoss(vgg_weights=str(bad))
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_perceptual_random_runs(no_network):
    torch.manual_seed(0)
    loss = build_loss({"type": "GRLPerceptualLoss", "vgg_weights": "random",
                       "layer_weights": {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1, "conv4_4": 1, "conv5_4": 1},
                       "perceptual_weight": 1.0, "style_weight": 0.0, "criterion": "l1"})
    x = torch.rand(1, 3, 32, 32)
    percep, style = loss(x, x.clone())
    assert percep.item() == 0 and style is None
    y = torch.rand(1, 3, 32, 32, requires_grad=True)
    percep, style = loss(y, x)
    assert percep.item() > 0 and style is None
    percep.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in loss.vgg.parameters())
    loss.train()
    assert not loss.vgg.training
    styled = GRLPerceptualLoss(vgg_weights="random", layer_weights={"relu2_1": 1.0}, perceptual_weight=0,
                               style_weight=1.0)
    p, s = styled(y, x)
    assert p is None and s.item() > 0


def test_perceptual_disabled_returns_none(no_network):
    for value in (None, "none", "None"):
        loss = GRLPerceptualLoss(vgg_weights=value)
        assert loss.vgg is None and loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)) == (None, None)


def test_perceptual_local_torchvision_weights_match_torchvision_features(tmp_path, no_network):
    vgg = pytest.importorskip("torchvision.models.vgg")
    torch.manual_seed(0)
    features = vgg.make_layers(vgg.cfgs["E"], batch_norm=False)  # torchvision's vgg19().features
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # the real file has a classifier: ignored
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    torch.save(state, path)

    weights = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}
    loss = build_loss({"type": "GRLPerceptualLoss", "vgg_weights": str(path), "layer_weights": weights})
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)

    taps = {2: "conv1_2", 7: "conv2_2", 16: "conv3_4", 25: "conv4_4", 34: "conv5_4"}
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def tv_feats(t):
        out, t = {}, (t - mean) / std
        for i, layer in enumerate(features):
            t = layer(t)
            if i in taps:
                out[taps[i]] = t.clone()  # torchvision's ReLUs are in place
            if i == 34:
                break
        return out

    fx, fy = tv_feats(x), tv_feats(y)
    with torch.no_grad():
        mine = loss.features(x)
        for k in weights:
            assert torch.allclose(mine[k], fx[k], atol=1e-5), k
        expected = sum(w * torch.nn.functional.l1_loss(fx[k], fy[k]) for k, w in weights.items())
        percep, style = loss(x, y)
    assert style is None and percep.item() == pytest.approx(expected.item(), rel=1e-5)
