"""Additive white Gaussian noise on the fly (GRL denoising)."""
from __future__ import annotations

import hashlib
import os.path as osp
import random

import numpy as np
import torch
from basicsr.utils import img2tensor

from .base import GTImageDataset, modcrop


def validation_noise(name: str, shape, sigma: float) -> np.ndarray:
    """Deterministic noise for a validation image: the official seed is the uint32 view of the
    SHA-256 of the image name up to its first ``_``."""
    prefix = osp.splitext(osp.basename(name))[0].split("_")[0]
    seed = np.frombuffer(hashlib.sha256(prefix.encode()).digest(), dtype=np.uint32)
    return np.random.RandomState(seed).normal(0, sigma / 255.0, shape).astype(np.float32)


class GaussianNoiseDataset(GTImageDataset):
    """GT from LMDB/folder, LQ = GT + N(0, (sigma/255)^2), not clipped, not quantised.

    Options (besides :class:`GTImageDataset`'s): ``sigma`` (fixed noise level in 0-255 units)
    or ``sigma_range: [lo, hi]`` (uniform per training sample; validation uses ``sigma`` or the
    middle of the range); ``modulo`` (validation: top-left crop to a multiple of it; default 1,
    the official data modules use 8). Training noise is random; validation noise is fixed per
    image.
    Returns ``lq``, ``gt`` (C, H, W float tensors; RGB for color images), ``lq_path``,
    ``gt_path``, ``sigma``.
    """

    def __init__(self, opt: dict):
        super().__init__(opt)
        if opt.get("sigma") is None and not opt.get("sigma_range"):
            raise ValueError(f"{opt.get('name', 'GaussianNoiseDataset')}: set sigma or sigma_range")

    def _sigma(self, train: bool) -> float:
        rng = self.opt.get("sigma_range")
        if rng and train:
            return random.uniform(float(rng[0]), float(rng[1]))
        if self.opt.get("sigma") is not None:
            return float(self.opt["sigma"])
        return (float(rng[0]) + float(rng[1])) / 2

    def __getitem__(self, index: int) -> dict:
        gt, path = self.read_gt(index)
        train = self.opt.get("phase") == "train"
        if train:
            gt = self.crop_and_augment(gt)
        else:
            gt = modcrop(gt, int(self.opt.get("modulo", 1)))
        gt_t = img2tensor(gt, bgr2rgb=gt.shape[2] == 3, float32=True)
        sigma = self._sigma(train)
        if train:
            noise = torch.randn_like(gt_t) * (sigma / 255.0)
        else:
            noise = torch.from_numpy(validation_noise(path, tuple(gt_t.shape), sigma))
        return {"lq": gt_t + noise, "gt": gt_t, "lq_path": path, "gt_path": path, "sigma": sigma}
