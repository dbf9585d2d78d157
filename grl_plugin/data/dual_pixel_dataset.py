"""Dual-pixel defocus deblurring pairs (DPDD): left + right views -> sharp image."""
from __future__ import annotations

import os.path as osp
from typing import Dict, List, Tuple

import numpy as np
import torch
from basicsr.utils import FileClient, img2tensor, scandir
from torch.utils import data

from .base import check_gt_size, crop_and_augment_all, dataset_name
from .robust import DataDecodeError, get_item, read_image

_ROOTS = (("gt", "dataroot_gt"), ("lq_left", "dataroot_lq_left"), ("lq_right", "dataroot_lq_right"))


class DualPixelDataset(data.Dataset):
    """Paired dual-pixel data: ``lq`` = concat(left view, right view) (6 channels, left first),
    ``gt`` = the all-in-focus image (3 channels).

    Options: ``dataroot_gt``, ``dataroot_lq_left``, ``dataroot_lq_right`` (folders, or LMDBs made
    by ``basicsr.utils.lmdb_util`` when ``io_backend: {type: lmdb}``); ``meta_info_file`` (disk
    only, optional: lists the GT file names); ``gt_size``, ``use_hflip``, ``use_rot`` (training:
    the same random crop and dihedral transform for the three images); ``phase``. Images are
    matched across the three roots by file name without extension (LMDB keys). Returns ``lq``
    (6, H, W) and ``gt`` (3, H, W) RGB float tensors in [0, 1], ``lq_path`` (left view),
    ``lq_right_path``, ``gt_path``. ``skip_corrupt: true``: a sample with an unreadable image (or
    views of different sizes) is skipped with a warning (:mod:`grl_plugin.data.robust`).
    """

    handles_skip_corrupt = True

    def __init__(self, opt: dict):
        super().__init__()
        self.opt = opt
        self.name = dataset_name(opt, "DualPixelDataset")
        for _, key in _ROOTS:
            if not opt.get(key):
                raise ValueError(f"{self.name}: option {key} is required")
        if "io_backend" not in opt:
            raise ValueError(f"{self.name}: option io_backend is required")
        check_gt_size(opt, self.name)
        self.io_backend_opt = dict(opt["io_backend"])
        self.file_client = None
        backend = self.io_backend_opt.get("type")
        if backend == "lmdb":
            self.io_backend_opt["db_paths"] = [opt[key] for _, key in _ROOTS]
            self.io_backend_opt["client_keys"] = [client for client, _ in _ROOTS]
            listings = [self._lmdb_keys(opt[key]) for _, key in _ROOTS]
        elif backend == "disk":
            listings = [self._folder_files(opt[key]) for _, key in _ROOTS]
            if opt.get("meta_info_file"):
                with open(opt["meta_info_file"]) as f:
                    names = [line.split(" ")[0] for line in f if line.strip()]
                listings[0] = {osp.splitext(n)[0]: osp.join(opt["dataroot_gt"], n) for n in names}
        else:
            raise ValueError(f"{self.name}: io_backend type must be disk or lmdb, got {backend!r}")
        gt, left, right = listings
        if not gt:
            raise ValueError(f"{self.name}: no images in {opt['dataroot_gt']}")
        self.items: List[Tuple[str, str, str]] = []
        for stem in sorted(gt):
            for views, key in ((left, "dataroot_lq_left"), (right, "dataroot_lq_right")):
                if stem not in views:
                    raise ValueError(f"{self.name}: {stem!r} of dataroot_gt has no match in {key} "
                                     f"({opt[key]})")
            self.items.append((gt[stem], left[stem], right[stem]))

    def _lmdb_keys(self, root: str) -> Dict[str, str]:
        meta = osp.join(root, "meta_info.txt")
        if not osp.isfile(meta):
            raise ValueError(f"{self.name}: {root} is not an LMDB made by basicsr (no meta_info.txt)")
        with open(meta) as f:
            keys = [osp.splitext(line.split(" ")[0])[0] for line in f if line.strip()]
        return {k: k for k in keys}

    def _folder_files(self, root: str) -> Dict[str, str]:
        if not osp.isdir(root):
            raise ValueError(f"{self.name}: folder {root} does not exist")
        files: Dict[str, str] = {}
        for rel in sorted(scandir(root)):
            stem = osp.splitext(rel)[0]
            if stem in files:
                raise ValueError(f"{self.name}: two files named {stem!r} in {root}")
            files[stem] = osp.join(root, rel)
        return files

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, path: str, client: str) -> np.ndarray:
        return read_image(self.file_client, path, client, float32=True)

    def __getitem__(self, index: int) -> dict:
        return get_item(self, index, self._load, self.name)

    def _load(self, index: int) -> dict:
        if self.file_client is None:
            opt = dict(self.io_backend_opt)
            self.file_client = FileClient(opt.pop("type"), **opt)
        paths = self.items[index]
        imgs = [self._read(p, client) for p, (client, _) in zip(paths, _ROOTS)]
        if any(im.shape != imgs[0].shape for im in imgs):
            raise DataDecodeError(f"{self.name}: sizes differ for {paths[0]!r}: {[im.shape for im in imgs]}")
        if self.opt.get("phase") == "train":
            imgs = crop_and_augment_all(imgs, self.opt["gt_size"], self.opt.get("use_hflip", True),
                                        self.opt.get("use_rot", True))
        gt, left, right = img2tensor(imgs, bgr2rgb=True, float32=True)
        return {"lq": torch.cat([left, right], dim=0), "gt": gt, "lq_path": paths[1],
                "lq_right_path": paths[2], "gt_path": paths[0]}
