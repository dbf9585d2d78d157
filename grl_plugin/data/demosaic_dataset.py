"""Demosaicking data: Bayer mosaic of the GT + Malvar-He-Cutler interpolation.

The official GRL pipeline builds the RGGB mosaic of the uint8 RGB GT patch in the dataset and
interpolates it in the engine with ``dm_matlab`` (Malvar-He-Cutler 2004 gradient-corrected
linear interpolation, the method of MATLAB's ``demosaic``); the 3-channel interpolated image is
the network input. Here the dataset does both, so the model sees a plain (lq, gt) pair.

Malvar, He, Cutler, "High-quality linear interpolation for demosaicing of Bayer-patterned color
images", ICASSP 2004: four 5x5 filters (coefficients / 8), applied with reflect padding 2; the
known sample of each pixel is kept as is.
"""
from __future__ import annotations

import numpy as np
from basicsr.utils import img2tensor

from .base import GTImageDataset, check_gt_size, dataset_name, modcrop
from .jpeg_dataset import to_uint8

#: G at R or B sites.
K_G_AT_RB = np.array([[0, 0, -1, 0, 0],
                      [0, 0, 2, 0, 0],
                      [-1, 2, 4, 2, -1],
                      [0, 0, 2, 0, 0],
                      [0, 0, -1, 0, 0]], dtype=np.float64) / 8
#: R (B) at a G site whose ROW holds R (B) samples: the R (B) neighbours are left/right.
K_AT_G_ROW = np.array([[0, 0, 0.5, 0, 0],
                       [0, -1, 0, -1, 0],
                       [-1, 4, 5, 4, -1],
                       [0, -1, 0, -1, 0],
                       [0, 0, 0.5, 0, 0]], dtype=np.float64) / 8
#: R (B) at a G site whose COLUMN holds R (B) samples: the neighbours are above/below.
K_AT_G_COL = K_AT_G_ROW.T.copy()
#: R at B sites and B at R sites (diagonal neighbours).
K_RB_AT_BR = np.array([[0, 0, -1.5, 0, 0],
                       [0, 2, 0, 2, 0],
                       [-1.5, 0, 6, 0, -1.5],
                       [0, 2, 0, 2, 0],
                       [0, 0, -1.5, 0, 0]], dtype=np.float64) / 8

PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


def _check_pattern(pattern: str) -> str:
    p = str(pattern).upper()
    if p not in PATTERNS:
        raise ValueError(f"bayer pattern must be one of {PATTERNS}, got {pattern!r}")
    return p


def _site_masks(h: int, w: int, pattern: str):
    """Boolean HxW masks of the R, G and B sample sites of ``pattern`` (colours of the 2x2 cell
    in the order (0,0), (0,1), (1,0), (1,1))."""
    rows = np.arange(h)[:, None] % 2
    cols = np.arange(w)[None, :] % 2
    cell = rows * 2 + cols  # index in the 2x2 cell
    masks = {}
    for c in "RGB":
        masks[c] = np.isin(cell, [i for i, pc in enumerate(pattern) if pc == c])
    return masks


def bayer_mosaic(rgb: np.ndarray, pattern: str = "RGGB") -> np.ndarray:
    """HxW mosaic of an HxWx3 RGB image: each pixel keeps the channel of its Bayer site
    (RGGB: R at (0,0), G at (0,1) and (1,0), B at (1,1) of every 2x2 cell)."""
    pattern = _check_pattern(pattern)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"bayer_mosaic: expects an HxWx3 RGB image, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    masks = _site_masks(h, w, pattern)
    out = np.zeros((h, w), dtype=rgb.dtype)
    for i, c in enumerate("RGB"):
        out[masks[c]] = rgb[..., i][masks[c]]
    return out


def pack_bayer(mosaic: np.ndarray) -> np.ndarray:
    """(4, H/2, W/2) half-resolution packing of an HxW mosaic: samples at (0,0), (0,1), (1,0),
    (1,1) of each 2x2 cell ([R, G, G, B] for RGGB)."""
    if mosaic.ndim != 2 or mosaic.shape[0] % 2 or mosaic.shape[1] % 2:
        raise ValueError(f"pack_bayer: expects an HxW mosaic with even H and W, got shape {mosaic.shape}")
    return np.stack([mosaic[0::2, 0::2], mosaic[0::2, 1::2], mosaic[1::2, 0::2], mosaic[1::2, 1::2]])


def unpack_bayer(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_bayer`: (4, h, w) -> (2h, 2w) mosaic."""
    if packed.ndim != 3 or packed.shape[0] != 4:
        raise ValueError(f"unpack_bayer: expects a (4, h, w) array, got shape {packed.shape}")
    _, h, w = packed.shape
    out = np.empty((2 * h, 2 * w), dtype=packed.dtype)
    out[0::2, 0::2], out[0::2, 1::2], out[1::2, 0::2], out[1::2, 1::2] = packed
    return out


def _correlate5(padded: np.ndarray, kernel: np.ndarray, h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w), dtype=padded.dtype)
    for i in range(5):
        for j in range(5):
            if kernel[i, j]:
                out += padded.dtype.type(kernel[i, j]) * padded[i:i + h, j:j + w]
    return out


def malvar_demosaic(mosaic_hw: np.ndarray, pattern: str = "RGGB", clip: bool = False) -> np.ndarray:
    """Malvar-He-Cutler (2004) gradient-corrected linear demosaicking of an HxW Bayer mosaic.

    Reflect padding of 2 (``np.pad(mode='reflect')`` = ``F.pad(mode='reflect')``; it keeps the
    Bayer parity), the four published 5x5 filters (/8) at the missing samples, the known sample
    of every pixel copied unchanged. Returns HxWx3 RGB, float32 (float64 for float64 input);
    ``clip=True`` clips to [0, 1] (for mosaics in [0, 1]). The filters reproduce any per-channel
    linear function exactly away from the 2-pixel border.
    """
    pattern = _check_pattern(pattern)
    if mosaic_hw.ndim != 2:
        raise ValueError(f"malvar_demosaic: expects an HxW mosaic, got shape {mosaic_hw.shape}")
    x = mosaic_hw.astype(np.float64 if mosaic_hw.dtype == np.float64 else np.float32)
    h, w = x.shape
    padded = np.pad(x, 2, mode="reflect")
    g_at_rb = _correlate5(padded, K_G_AT_RB, h, w)
    at_g_row = _correlate5(padded, K_AT_G_ROW, h, w)
    at_g_col = _correlate5(padded, K_AT_G_COL, h, w)
    diag = _correlate5(padded, K_RB_AT_BR, h, w)

    masks = _site_masks(h, w, pattern)
    r_row = np.broadcast_to(masks["R"].any(axis=1, keepdims=True), (h, w))  # rows holding R samples
    g_site = masks["G"]
    out = np.empty((h, w, 3), dtype=x.dtype)
    # R: known at R; at G from the row (R row) or the column (B row, R column); at B diagonal.
    out[..., 0] = np.where(masks["R"], x, np.where(g_site, np.where(r_row, at_g_row, at_g_col), diag))
    # G: known at G, else the G filter.
    out[..., 1] = np.where(g_site, x, g_at_rb)
    # B: known at B; at G from the row (B row) or the column (R row, B column); at R diagonal.
    out[..., 2] = np.where(masks["B"], x, np.where(g_site, np.where(~r_row, at_g_row, at_g_col), diag))
    if clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out


class DemosaicDataset(GTImageDataset):
    """GT from LMDB/folder (color only); LQ = Malvar demosaicking of its Bayer mosaic.

    The uint8 RGB GT (the training patch: an even ``gt_size`` window at even offsets, then the
    dihedral augmentation) is mosaicked with ``bayer_pattern`` (default ``RGGB``: R at (0,0), G at
    (0,1) and (1,0), B at (1,1)) and interpolated with :func:`malvar_demosaic`. Options (besides
    :class:`GTImageDataset`'s): ``bayer_pattern``; ``clip_lq`` (default True: the interpolated
    image is clipped to [0, 1] like MATLAB's uint8 ``demosaic``); ``modulo`` (validation: top-left
    crop of the GT to a multiple of ``modulo``, even, default 2; the official data module used 8).

    Returns ``lq`` (3, H, W interpolated RGB), ``gt`` (3, H, W RGB), both float in [0, 1],
    ``lq_path``, ``gt_path``.
    """

    def __init__(self, opt: dict):
        super().__init__(opt)
        name = dataset_name(opt, "DemosaicDataset")
        if not self.color:
            raise ValueError(f"{name}: demosaicking needs color images (color: true)")
        check_gt_size(opt, name, even=True)
        try:
            self.pattern = _check_pattern(opt.get("bayer_pattern", "RGGB"))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        self.modulo = opt.get("modulo", 2)
        if isinstance(self.modulo, bool) or not isinstance(self.modulo, int) or self.modulo < 2 \
                or self.modulo % 2:
            raise ValueError(f"{name}: modulo must be a positive even integer, got {self.modulo!r}")
        self.clip_lq = bool(opt.get("clip_lq", True))

    def __getitem__(self, index: int) -> dict:
        gt, path = self.read_gt(index)
        gt = to_uint8(gt)
        if self.opt.get("phase") == "train":
            gt = self.crop_and_augment_all([gt], step=2)[0]
        else:
            gt = modcrop(gt, self.modulo)
        rgb = np.ascontiguousarray(gt[..., ::-1]).astype(np.float32) / 255.0
        lq = malvar_demosaic(bayer_mosaic(rgb, self.pattern), self.pattern, clip=self.clip_lq)
        gt_t, lq_t = img2tensor([rgb, lq], bgr2rgb=False, float32=True)
        return {"lq": lq_t, "gt": gt_t, "lq_path": path, "gt_path": path}
