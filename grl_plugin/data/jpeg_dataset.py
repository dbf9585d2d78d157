"""JPEG compression artefacts on the fly (GRL JPEG artefact removal)."""
from __future__ import annotations

import random

import cv2
import numpy as np
from basicsr.utils import img2tensor

from .base import GTImageDataset, check_gt_size, dataset_name, modcrop


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8 (rounded, clipped)."""
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def jpeg_compress(img: np.ndarray, quality: int) -> np.ndarray:
    """OpenCV JPEG round trip of a uint8 image: HxWx3 BGR (libjpeg default 4:2:0 chroma
    subsampling) or HxW / HxWx1 gray (single channel). Returns uint8 of the input's shape."""
    if img.dtype != np.uint8:
        raise ValueError(f"jpeg_compress: expects uint8, got {img.dtype}")
    gray = img.ndim == 2 or img.shape[2] == 1
    ok, buf = cv2.imencode(".jpg", img[..., 0] if img.ndim == 3 and gray else img,
                           [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError(f"jpeg_compress: cv2.imencode failed (quality {quality}, shape {img.shape})")
    out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    return out.reshape(img.shape)


def _check_quality(name: str, key: str, q) -> int:
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 1 <= q <= 100:
        raise ValueError(f"{name}: {key} must be an integer in 1..100, got {q!r}")
    return int(q)


class JPEGDataset(GTImageDataset):
    """GT from LMDB/folder, LQ = OpenCV JPEG round trip of the uint8 GT.

    Options (besides :class:`GTImageDataset`'s): ``quality`` (fixed JPEG quality, 1..100) or
    ``quality_range: [lo, hi]`` (random integer in [lo, hi] per training sample; validation uses
    ``quality`` or the midpoint ``(lo + hi) // 2``); ``color`` (True: 3-channel, encoded on BGR
    uint8 like the official RGB->BGR + imencode, libjpeg 4:2:0; False: gray, 1 channel);
    ``patchwise`` (False, default and official: in training the WHOLE image is compressed and the
    patch cropped afterwards, so the 8x8 block grid is aligned to the full image and sits at a
    random offset in the patch; True: the cropped patch is compressed); ``modulo`` (validation
    only: top-left crop of the GT to a multiple of ``modulo`` before compression; default 1 = whole
    image, the official data module used 8).

    Returns ``lq``, ``gt`` (C, H, W float tensors in [0, 1], RGB for color), ``lq_path``,
    ``gt_path``, ``quality``.
    """

    def __init__(self, opt: dict):
        super().__init__(opt)
        name = dataset_name(opt, "JPEGDataset")
        self.quality = None if opt.get("quality") is None else _check_quality(name, "quality", opt["quality"])
        rng = opt.get("quality_range")
        self.quality_range = None
        if rng:
            if not isinstance(rng, (list, tuple)) or len(rng) != 2:
                raise ValueError(f"{name}: quality_range must be [lo, hi], got {rng!r}")
            lo, hi = (_check_quality(name, "quality_range", q) for q in rng)
            if lo > hi:
                raise ValueError(f"{name}: quality_range must have lo <= hi, got {rng!r}")
            self.quality_range = (lo, hi)
        if self.quality is None and self.quality_range is None:
            raise ValueError(f"{name}: set quality or quality_range")
        check_gt_size(opt, name)
        self.patchwise = bool(opt.get("patchwise", False))
        self.modulo = int(opt.get("modulo", 1))
        if self.modulo < 1:
            raise ValueError(f"{name}: modulo must be >= 1, got {opt.get('modulo')!r}")

    def _quality(self, train: bool) -> int:
        if self.quality_range and train:
            return random.randint(*self.quality_range)
        if self.quality is not None:
            return self.quality
        return (self.quality_range[0] + self.quality_range[1]) // 2

    def __getitem__(self, index: int) -> dict:
        gt, path = self.read_gt(index)
        gt = to_uint8(gt)  # the official pipeline works on uint8 images
        train = self.opt.get("phase") == "train"
        quality = self._quality(train)
        if not train:
            gt = np.ascontiguousarray(modcrop(gt, self.modulo))
            lq = jpeg_compress(gt, quality)
        elif self.patchwise:
            gt = self.crop_and_augment(gt)
            lq = jpeg_compress(gt, quality)
        else:
            gt, lq = self.crop_and_augment_all([gt, jpeg_compress(gt, quality)])
        rgb = gt.shape[2] == 3
        gt_t, lq_t = img2tensor([gt.astype(np.float32) / 255.0, lq.astype(np.float32) / 255.0],
                                bgr2rgb=rgb, float32=True)
        return {"lq": lq_t, "gt": gt_t, "lq_path": path, "gt_path": path, "quality": quality}
