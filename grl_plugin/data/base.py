"""Ground-truth image sources shared by the on-the-fly degradation datasets.

GT images come from an LMDB (``io_backend: {type: lmdb}``, made with
``basicsr.utils.lmdb_util``) or a folder (``io_backend: {type: disk}``, optionally listed by a
``meta_info_file``), read through BasicSR's ``FileClient``. Training samples are cropped at a
random position (zero-padded bottom/right when smaller than the patch, as the official data
modules do) and augmented with the 8 dihedral transforms; the degradation is then applied by
the subclass to the cropped patch.

Unreadable samples raise :class:`~grl_plugin.data.robust.DataError` naming the file or the LMDB
key and path; ``skip_corrupt: true`` skips them (see :mod:`grl_plugin.data.robust`).
"""
from __future__ import annotations

import os.path as osp
import random
from typing import List, Tuple

import numpy as np
from basicsr.data.transforms import augment
from basicsr.utils import FileClient, scandir
from torch.utils import data

from .robust import get_item, read_image


class GTImageDataset(data.Dataset):
    """Lists and reads GT images; subclasses implement ``degrade(gt, index) -> dict``.

    Options: ``dataroot_gt``, ``io_backend``, ``meta_info_file`` (disk only, optional),
    ``color`` (True: RGB, False: gray, 1 channel), ``gt_size`` (train patch), ``use_hflip``,
    ``use_rot`` (train augmentation), ``phase`` (set by BasicSR), ``skip_corrupt`` (default False:
    an unreadable GT raises ``DataError``; True: it is skipped with a warning, see :meth:`read_gt`).
    """

    handles_skip_corrupt = True

    def __init__(self, opt: dict):
        super().__init__()
        self.opt = opt
        self.io_backend_opt = dict(opt["io_backend"])
        self.file_client = None
        self.gt_folder = opt["dataroot_gt"]
        self.color = opt.get("color", True)
        self.paths = self._list_paths()
        if not self.paths:
            raise ValueError(f"{opt.get('name', type(self).__name__)}: no images in {self.gt_folder}")

    def _list_paths(self) -> List[str]:
        if self.io_backend_opt["type"] == "lmdb":
            self.io_backend_opt["db_paths"] = [self.gt_folder]
            self.io_backend_opt["client_keys"] = ["gt"]
            meta = osp.join(self.gt_folder, "meta_info.txt")
            if not osp.isfile(meta):
                raise ValueError(f"{self.gt_folder}: not an LMDB made by basicsr (no meta_info.txt)")
            with open(meta) as f:  # meta_info lists file names; the LMDB keys drop the extension
                return [osp.splitext(line.split(" ")[0])[0] for line in f if line.strip()]
        if self.opt.get("meta_info_file"):
            with open(self.opt["meta_info_file"]) as f:
                return [osp.join(self.gt_folder, line.split(" ")[0]) for line in f if line.strip()]
        return sorted(scandir(self.gt_folder, full_path=True))

    def __len__(self) -> int:
        return len(self.paths)

    def read_gt(self, index: int) -> Tuple[np.ndarray, str]:
        """(GT, its path or LMDB key): float32 HWC in [0, 1], BGR as BasicSR reads it (C = 3) or
        gray (C = 1). An unreadable GT raises ``DataError`` naming it; with ``skip_corrupt`` the next
        readable one is returned instead (use the returned path, not ``self.paths[index]``)."""
        return get_item(self, index, self._read_gt)

    def _read_gt(self, index: int) -> Tuple[np.ndarray, str]:
        if self.file_client is None:
            opt = dict(self.io_backend_opt)
            self.file_client = FileClient(opt.pop("type"), **opt)
        path = self.paths[index]
        img = read_image(self.file_client, path, "gt", flag="color" if self.color else "grayscale", float32=True)
        if img.ndim == 2:
            img = img[..., None]
        return img, path

    def crop_and_augment(self, img: np.ndarray) -> np.ndarray:
        """Random ``gt_size`` patch (zero-padded if the image is smaller) + dihedral augmentation."""
        return self.crop_and_augment_all([img])[0]

    def crop_and_augment_all(self, imgs: List[np.ndarray], step: int = 1) -> List[np.ndarray]:
        """:func:`crop_and_augment_all` with this dataset's ``gt_size``/``use_hflip``/``use_rot``."""
        return crop_and_augment_all(imgs, self.opt["gt_size"], self.opt.get("use_hflip", True),
                                    self.opt.get("use_rot", True), step)


def dataset_name(opt: dict, default: str) -> str:
    """The dataset's ``name`` option (for error messages), else ``default``."""
    return str(opt.get("name") or default)


def check_gt_size(opt: dict, name: str, even: bool = False) -> None:
    """ValueError unless ``gt_size`` is a positive (even, if asked) integer; training only."""
    if opt.get("phase") != "train":
        return
    size = opt.get("gt_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or (even and size % 2):
        kind = "a positive even integer" if even else "a positive integer"
        raise ValueError(f"{name}: gt_size must be {kind} for training, got {size!r}")


def modcrop(img: np.ndarray, modulo: int) -> np.ndarray:
    """Top-left crop of an HWC image to a multiple of ``modulo`` in height and width."""
    if modulo <= 1:
        return img
    h, w = img.shape[:2]
    return img[:h - h % modulo, :w - w % modulo]


def crop_and_augment_all(imgs: List[np.ndarray], size: int, use_hflip: bool = True, use_rot: bool = True,
                         step: int = 1) -> List[np.ndarray]:
    """The same random ``size`` x ``size`` window (top-left corner a multiple of ``step``) cut out
    of every HWC image of ``imgs`` (all the same height/width; zero-padded bottom/right when smaller
    than the patch), then the same random dihedral transform (basicsr ``augment``) on all of them.

    Returns new contiguous arrays (the inputs are never modified).
    """
    h, w = imgs[0].shape[:2]
    if any(im.shape[:2] != (h, w) for im in imgs):
        raise ValueError(f"crop: images differ in size: {[im.shape[:2] for im in imgs]}")
    if h < size or w < size:
        imgs = [np.pad(im, ((0, max(size - h, 0)), (0, max(size - w, 0)), (0, 0))) for im in imgs]
        h, w = imgs[0].shape[:2]
    top = random.randint(0, (h - size) // step) * step
    left = random.randint(0, (w - size) // step) * step
    patches = [np.ascontiguousarray(im[top:top + size, left:left + size]) for im in imgs]
    patches = augment(patches, use_hflip, use_rot)
    if not isinstance(patches, list):  # basicsr returns a bare array for a one-element list
        patches = [patches]
    return [np.ascontiguousarray(p) for p in patches]
