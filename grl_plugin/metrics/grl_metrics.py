"""Official-GRL metrics as BasicSR metric functions: PSNR-B and the zero-padded SSIM.

Both take what BasicSR's metrics take: 8-bit images (values in [0, 255]), ``HWC`` (or ``CHW``
with ``input_order='CHW'``; 2-D grey images allowed), BGR channel order as produced by
``basicsr.utils.tensor2img`` (only the Y conversion cares about the order). ``img`` is the
restored image, ``img2`` the reference.

``test_y_channel=True`` compares the MATLAB BT.601 luma (``basicsr.metrics.metric_util.to_y_channel``)
ROUNDED to 8-bit levels as the official evaluation does (``round_y=False`` keeps BasicSR's
unrounded Y).

Option file::

    val:
      metrics:
        psnrb:   {type: calculate_psnrb, crop_border: 0, test_y_channel: false}
        psnrb_y: {type: calculate_psnrb, crop_border: 0, test_y_channel: true}
        ssim:    {type: calculate_ssim_grl, crop_border: 0, test_y_channel: false}
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from basicsr.metrics.metric_util import reorder_image, to_y_channel

BLOCK_SIZE = 8


def _prepare(img, img2, crop_border, input_order, test_y_channel, round_y, name):
    """Float64 HWC arrays in [0, 255] (cropped, optionally the rounded Y channel)."""
    assert img.shape == img2.shape, f'{name}: image shapes are different: {img.shape}, {img2.shape}.'
    if input_order not in ('HWC', 'CHW'):
        raise ValueError(f'{name}: wrong input_order {input_order}; supported: "HWC", "CHW"')
    img = reorder_image(np.asarray(img), input_order=input_order)
    img2 = reorder_image(np.asarray(img2), input_order=input_order)
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border, ...]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border, ...]
    if test_y_channel and img.shape[2] == 3:
        img, img2 = to_y_channel(img), to_y_channel(img2)
        if round_y:
            img, img2 = np.round(img), np.round(img2)
    return img.astype(np.float64), img2.astype(np.float64)


def blocking_effect_factor(channel, block_size=BLOCK_SIZE):
    """Blocking effect factor of one 2-D channel (in the units of its values, squared).

    Mean squared difference of horizontally/vertically adjacent pixels across 8x8 block
    boundaries (between columns/rows ``7|8, 15|16, ...``) minus that of the other adjacent
    pairs, times ``log2(8) / log2(min(H, W))``; 0 when the boundary term is not larger.
    The pair counts are ``H * (W // 8 - 1)`` (+ ``W * (H // 8 - 1)``) boundary pairs and the rest
    of the ``H * (W - 1) + W * (H - 1)`` adjacent pairs, as in the reference implementation
    (Yim & Bovik; the ``psnrb`` code used by GRL/SwinIR/FBCNN) -- exact when H and W are
    multiples of 8.
    """
    x = np.asarray(channel, dtype=np.float64)
    h, w = x.shape
    bh = np.arange(block_size - 1, w - 1, block_size)  # boundary columns (pair c, c+1)
    bv = np.arange(block_size - 1, h - 1, block_size)  # boundary rows
    nbh = np.setdiff1d(np.arange(0, w - 1), bh)
    nbv = np.setdiff1d(np.arange(0, h - 1), bv)
    d_bh = ((x[:, bh] - x[:, bh + 1]) ** 2).sum()
    d_bv = ((x[bv, :] - x[bv + 1, :]) ** 2).sum()
    d_nbh = ((x[:, nbh] - x[:, nbh + 1]) ** 2).sum()
    d_nbv = ((x[nbv, :] - x[nbv + 1, :]) ** 2).sum()
    n_bh = h * (w // block_size - 1)
    n_bv = w * (h // block_size - 1)
    n_nbh = h * (w - 1) - n_bh
    n_nbv = w * (h - 1) - n_bv
    if n_bh + n_bv <= 0 or n_nbh + n_nbv <= 0 or min(h, w) < 2:
        return 0.0  # smaller than two blocks: no block boundary inside the image
    boundary = (d_bh + d_bv) / (n_bh + n_bv)
    nonboundary = (d_nbh + d_nbv) / (n_nbh + n_nbv)
    if boundary <= nonboundary:
        return 0.0
    return float(math.log2(block_size) / math.log2(min(h, w)) * (boundary - nonboundary))


def calculate_psnrb(img, img2, crop_border, input_order='HWC', test_y_channel=False, round_y=True, **kwargs):
    """PSNR-B (JPEG artefact removal): per channel ``10*log10(1 / (MSE + BEF(img)))`` in [0, 1]
    units, averaged over channels; ``BEF`` is :func:`blocking_effect_factor` of the RESTORED
    image ``img``. Returns ``inf`` for a channel with ``MSE + BEF == 0``.

    Args:
        img (ndarray): restored image, [0, 255].
        img2 (ndarray): reference image, [0, 255].
        crop_border (int): pixels removed on every side first.
        input_order (str): ``'HWC'`` or ``'CHW'``.
        test_y_channel (bool): use the (rounded, see ``round_y``) MATLAB BT.601 Y channel.
        round_y (bool): round Y to 8-bit levels (official GRL). Default True.
    """
    x, y = _prepare(img, img2, crop_border, input_order, test_y_channel, round_y, 'calculate_psnrb')
    # computed in 8-bit units, 10*log10(255^2 / (MSE + BEF)) (same value): squared differences of
    # integer levels are exact, so equal boundary / non-boundary means compare equal (no
    # spurious BEF from rounding noise, e.g. identical images give inf)
    total = 0.0
    for c in range(x.shape[2]):
        mse = np.mean((x[..., c] - y[..., c]) ** 2)
        denom = mse + blocking_effect_factor(x[..., c])
        total += float('inf') if denom == 0 else 10. * math.log10(255. ** 2 / denom)
    return total / x.shape[2]


def _gaussian_window(size=11, sigma=1.5):
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def calculate_ssim_grl(img, img2, crop_border, input_order='HWC', test_y_channel=False, round_y=True, **kwargs):
    """SSIM as the official GRL evaluation computes it (differs from BasicSR's ``calculate_ssim``).

    11x11 Gaussian window (sigma 1.5), each channel filtered separately (grouped conv) with
    ZERO padding 5, so the SSIM map has the image's size and includes the borders (BasicSR /
    MATLAB use the 'valid' part only); C1 = 0.01^2, C2 = 0.03^2 for data in [0, 1]; the result
    is the mean over the map and the channels. Arguments as :func:`calculate_psnrb`.
    """
    x, y = _prepare(img, img2, crop_border, input_order, test_y_channel, round_y, 'calculate_ssim_grl')
    x, y = x / 255., y / 255.
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    y = torch.from_numpy(np.ascontiguousarray(y.transpose(2, 0, 1)))[None]
    channels = x.shape[1]
    window = _gaussian_window().expand(channels, 1, 11, 11).contiguous()

    def filt(t):
        return F.conv2d(t, window, padding=5, groups=channels)

    mu1, mu2 = filt(x), filt(y)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = filt(x * x) - mu1_sq
    sigma2_sq = filt(y * y) - mu2_sq
    sigma12 = filt(x * y) - mu12
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu12 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return float(ssim_map.mean())
