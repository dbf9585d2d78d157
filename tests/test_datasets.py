"""On-the-fly degradation datasets: JPEG, demosaicking (Malvar-He-Cutler), dual-pixel pairs.

Fixtures are small crops of the photographs bundled with scikit-image, written as PNG folders
(and LMDBs via ``basicsr.utils.lmdb_util.make_lmdb_from_imgs``) under a temporary directory.
"""
from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest

import grl_plugin  # noqa: F401 - import fixes + registration before basicsr
from basicsr.data import build_dataset
from basicsr.utils.lmdb_util import make_lmdb_from_imgs

from grl_plugin.data import DemosaicDataset, DualPixelDataset, JPEGDataset
from grl_plugin.data.demosaic_dataset import (PATTERNS, bayer_mosaic, malvar_demosaic, pack_bayer,
                                              unpack_bayer)
from grl_plugin.data.jpeg_dataset import jpeg_compress

PHOTOS = ("astronaut", "coffee", "chelsea")
H, W = 60, 76  # not multiples of 8/16: the JPEG block grid and the crop grid differ


def _photos():
    import skimage.data
    out = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()[..., :3]
        h, w = img.shape[:2]
        out.append(np.ascontiguousarray(img[h // 3:h // 3 + H, w // 3:w // 3 + W]))  # RGB uint8
    return out


def _write_folder(folder, rgbs, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"{i:04d}.png" for i in range(len(rgbs))]
    for name, rgb in zip(names, rgbs):
        assert cv2.imwrite(str(folder / name), np.ascontiguousarray(rgb[..., ::-1]))
    return names


def _to_lmdb(folder, names, lmdb_path):
    make_lmdb_from_imgs(str(folder), str(lmdb_path), names, [n[:-4] for n in names], map_size=1 << 24)
    return str(lmdb_path)


@pytest.fixture(scope="module")
def photos():
    return _photos()


@pytest.fixture(scope="module")
def gt_folder(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("gt") / "GT"
    _write_folder(folder, photos)
    return str(folder)


@pytest.fixture(scope="module")
def gt_lmdb(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("gt_lmdb")
    names = _write_folder(root / "png", photos)
    return _to_lmdb(root / "png", names, root / "GT.lmdb")


def _opt(dataroot, phase="val", backend="disk", **kw):
    opt = dict(name=f"test_{phase}", dataroot_gt=dataroot, io_backend=dict(type=backend), phase=phase)
    if phase == "train":
        opt.update(gt_size=24, use_hflip=False, use_rot=False)
    opt.update(kw)
    return opt


def _u8(t):
    """(C, H, W) float tensor in [0, 1] -> HWC uint8 (exact for values that are k/255)."""
    return np.round(t.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)


def _find(patch, full):
    """All (top, left) where ``patch`` occurs in ``full`` (HWC)."""
    ph, pw = patch.shape[:2]
    win = np.lib.stride_tricks.sliding_window_view(full, (ph, pw), axis=(0, 1))  # H', W', C, ph, pw
    hits = np.all(win == patch.transpose(2, 0, 1)[None, None], axis=(2, 3, 4))
    return [tuple(map(int, p)) for p in np.argwhere(hits)]


def _dihedral(img, k):
    """The k-th (0..7) of the 8 dihedral transforms of an HW(C) image."""
    out = np.rot90(img, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def _locate(patch, full):
    """[(k, top, left)]: ``_dihedral(patch, k)`` occurs at (top, left) of ``full``."""
    return [(k, *pos) for k in range(8) for pos in _find(_dihedral(patch, k), full)]


# --- JPEG ------------------------------------------------------------------------------------

def test_jpeg_validation_matches_opencv_and_quality_is_monotonic(gt_lmdb, photos):
    errors = []
    for q in (10, 30, 60, 95):
        ds = JPEGDataset(_opt(gt_lmdb, backend="lmdb", quality=q))
        assert len(ds) == len(photos)
        item = ds[0]
        assert item["quality"] == q and item["lq_path"] == item["gt_path"] == "0000"
        assert item["lq"].shape == item["gt"].shape == (3, H, W)
        assert np.array_equal(_u8(item["gt"]), photos[0])  # RGB, the whole image
        expected = jpeg_compress(np.ascontiguousarray(photos[0][..., ::-1]), q)[..., ::-1]  # BGR encode
        assert np.array_equal(_u8(item["lq"]), expected)
        errors.append(float((item["lq"] - item["gt"]).abs().mean()))
    assert errors[0] > errors[1] > errors[2] > errors[3] > 0, errors


def test_jpeg_whole_image_compressed_before_crop(gt_folder, photos):
    q = 15
    ds = JPEGDataset(_opt(gt_folder, "train", quality=q))
    patchwise = JPEGDataset(_opt(gt_folder, "train", quality=q, patchwise=True))
    random.seed(0)
    off_grid = 0
    for index in range(len(photos)):
        full_jpeg = jpeg_compress(np.ascontiguousarray(photos[index][..., ::-1]), q)[..., ::-1]
        for _ in range(4):
            item = ds[index]
            gt, lq = _u8(item["gt"]), _u8(item["lq"])
            assert gt.shape == (24, 24, 3)
            (top, left), = _find(gt, photos[index])
            assert np.array_equal(lq, full_jpeg[top:top + 24, left:left + 24])
            if top % 8 or left % 8:
                off_grid += 1
                patch_jpeg = jpeg_compress(np.ascontiguousarray(gt[..., ::-1]), q)[..., ::-1]
                assert not np.array_equal(lq, patch_jpeg)  # the block grid differs from patchwise
            item = patchwise[index]
            gt = np.ascontiguousarray(_u8(item["gt"])[..., ::-1])
            assert np.array_equal(_u8(item["lq"])[..., ::-1], jpeg_compress(gt, q))
    assert off_grid > 0


def test_jpeg_gray_and_augmentation(gt_folder):
    random.seed(1)
    ds = JPEGDataset(_opt(gt_folder, "train", quality=20, color=False, use_hflip=True, use_rot=True))
    gray_full = cv2.imread(f"{gt_folder}/0001.png", cv2.IMREAD_GRAYSCALE)
    full_jpeg = jpeg_compress(gray_full, 20)
    assert full_jpeg.shape == gray_full.shape
    for _ in range(6):
        item = ds[1]
        assert item["lq"].shape == item["gt"].shape == (1, 24, 24)
        gt, lq = _u8(item["gt"])[..., 0], _u8(item["lq"])[..., 0]
        # the same crop and dihedral transform for LQ and GT: undo it by locating the GT patch
        (k, top, left), = _locate(gt[..., None], gray_full[..., None])
        assert np.array_equal(_dihedral(lq, k), full_jpeg[top:top + 24, left:left + 24])
    val = JPEGDataset(_opt(gt_folder, quality=20, color=False))[1]
    assert val["lq"].shape == (1, H, W)
    assert np.array_equal(_u8(val["lq"])[..., 0], full_jpeg)


def test_jpeg_quality_range(gt_folder):
    random.seed(2)
    ds = JPEGDataset(_opt(gt_folder, "train", quality_range=[10, 40]))
    qualities = {ds[0]["quality"] for _ in range(12)}
    assert qualities <= set(range(10, 41)) and len(qualities) > 1
    assert JPEGDataset(_opt(gt_folder, quality_range=[10, 40]))[0]["quality"] == 25
    assert JPEGDataset(_opt(gt_folder, quality=30, quality_range=[10, 40]))[0]["quality"] == 30
    cropped = JPEGDataset(_opt(gt_folder, quality=30, modulo=8))[0]
    assert cropped["gt"].shape == (3, H // 8 * 8, W // 8 * 8)


# --- demosaicking ----------------------------------------------------------------------------

def test_bayer_mosaic_sample_positions():
    rgb = np.empty((6, 8, 3), np.float32)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0.1, 0.5, 0.9
    m = bayer_mosaic(rgb)
    assert m.shape == (6, 8)
    assert np.all(m[0::2, 0::2] == np.float32(0.1)) and np.all(m[1::2, 1::2] == np.float32(0.9))
    assert np.all(m[0::2, 1::2] == np.float32(0.5)) and np.all(m[1::2, 0::2] == np.float32(0.5))
    packed = pack_bayer(m)
    assert packed.shape == (4, 3, 4)
    assert [float(packed[i, 0, 0]) for i in range(4)] == pytest.approx([0.1, 0.5, 0.5, 0.9])
    rand = np.random.RandomState(0).rand(6, 8, 3)
    mr = bayer_mosaic(rand)
    assert (mr[2, 4], mr[2, 5], mr[3, 4], mr[3, 5]) == (rand[2, 4, 0], rand[2, 5, 1], rand[3, 4, 1],
                                                        rand[3, 5, 2])
    assert np.array_equal(unpack_bayer(pack_bayer(mr)), mr)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_malvar_keeps_known_samples_and_constants(pattern):
    rand = np.random.RandomState(1).rand(10, 12, 3)
    m = bayer_mosaic(rand, pattern)
    out = malvar_demosaic(m, pattern)
    assert out.shape == (10, 12, 3) and out.dtype == np.float64
    assert np.array_equal(bayer_mosaic(out, pattern), m)  # known samples copied exactly
    const = np.empty((10, 12, 3))
    const[:] = (0.2, 0.6, 0.7)
    np.testing.assert_allclose(malvar_demosaic(bayer_mosaic(const, pattern), pattern), const, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_malvar_exact_on_linear_ramps(pattern, dtype):
    y, x = np.mgrid[0:16, 0:20].astype(np.float64)
    rgb = np.stack([0.010 * x + 0.020 * y + 0.10,  # a different linear function per channel
                    -0.015 * x + 0.005 * y + 0.60,
                    0.003 * x - 0.025 * y + 0.55], axis=-1).astype(dtype)
    out = malvar_demosaic(bayer_mosaic(rgb, pattern), pattern)
    assert out.dtype == dtype
    np.testing.assert_allclose(out[2:-2, 2:-2], rgb[2:-2, 2:-2], atol=1e-5, rtol=0)
    assert np.abs(out[:2] - rgb[:2]).max() > 1e-3  # reflect padding: the border is not exact


def test_malvar_published_formulas():
    m = np.random.RandomState(2).rand(12, 12)
    out = malvar_demosaic(m)
    r, c = 4, 6  # an R site (even, even) of RGGB
    g = (4 * m[r, c] + 2 * (m[r - 1, c] + m[r + 1, c] + m[r, c - 1] + m[r, c + 1])
         - (m[r - 2, c] + m[r + 2, c] + m[r, c - 2] + m[r, c + 2])) / 8
    b = (6 * m[r, c] + 2 * (m[r - 1, c - 1] + m[r - 1, c + 1] + m[r + 1, c - 1] + m[r + 1, c + 1])
         - 1.5 * (m[r - 2, c] + m[r + 2, c] + m[r, c - 2] + m[r, c + 2])) / 8
    assert out[r, c] == pytest.approx([m[r, c], g, b], abs=1e-12)
    r, c = 4, 5  # a G site in an R row: R from left/right, B from above/below
    red = (5 * m[r, c] + 4 * (m[r, c - 1] + m[r, c + 1]) - (m[r, c - 2] + m[r, c + 2])
           - (m[r - 1, c - 1] + m[r - 1, c + 1] + m[r + 1, c - 1] + m[r + 1, c + 1])
           + 0.5 * (m[r - 2, c] + m[r + 2, c])) / 8
    blue = (5 * m[r, c] + 4 * (m[r - 1, c] + m[r + 1, c]) - (m[r - 2, c] + m[r + 2, c])
            - (m[r - 1, c - 1] + m[r - 1, c + 1] + m[r + 1, c - 1] + m[r + 1, c + 1])
            + 0.5 * (m[r, c - 2] + m[r, c + 2])) / 8
    assert out[r, c] == pytest.approx([red, m[r, c], blue], abs=1e-12)


def test_demosaic_dataset(gt_folder, photos):
    random.seed(3)
    ds = DemosaicDataset(_opt(gt_folder, "train", gt_size=16))
    for index in range(len(photos)):
        item = ds[index]
        gt = _u8(item["gt"])
        assert item["lq"].shape == item["gt"].shape == (3, 16, 16)
        (top, left), = _find(gt, photos[index])
        assert top % 2 == 0 and left % 2 == 0  # crop at even offsets: RGGB of the full image
        rgb = item["gt"].numpy().transpose(1, 2, 0)
        expected = np.clip(malvar_demosaic(bayer_mosaic(rgb)), 0, 1)
        np.testing.assert_allclose(item["lq"].numpy().transpose(1, 2, 0), expected, atol=1e-6)
        assert np.array_equal(item["lq"][0, 0::2, 0::2], item["gt"][0, 0::2, 0::2])  # R samples
        assert np.array_equal(item["lq"][2, 1::2, 1::2], item["gt"][2, 1::2, 1::2])  # B samples
    odd = Path(gt_folder).parent / "odd"  # validation: odd sizes are cropped to even
    _write_folder(odd, [photos[0][:33, :47]])
    val = DemosaicDataset(_opt(str(odd)))
    assert val[0]["lq"].shape == val[0]["gt"].shape == (3, 32, 46)
    assert float(val[0]["lq"].min()) >= 0 and float(val[0]["lq"].max()) <= 1


# --- dual pixel ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dp_roots(tmp_path_factory, photos):
    """gt = photo, left = 255 - photo, right = photo // 2: any crop/transform mismatch shows."""
    root = tmp_path_factory.mktemp("dpdd")
    names = ["a1.png", "b2.png", "c3.png"]
    _write_folder(root / "target", photos, names)
    _write_folder(root / "left", [255 - p for p in photos], names)
    _write_folder(root / "right", [p // 2 for p in photos], names)
    return root, names


def _dp_opt(root, phase="val", backend="disk", suffix="", **kw):
    opt = dict(name=f"dp_{phase}", type="DualPixelDataset", dataroot_gt=str(root / f"target{suffix}"),
               dataroot_lq_left=str(root / f"left{suffix}"), dataroot_lq_right=str(root / f"right{suffix}"),
               io_backend=dict(type=backend), phase=phase)
    if phase == "train":
        opt.update(gt_size=20, use_hflip=True, use_rot=True)
    opt.update(kw)
    return opt


def _check_dp(item):
    gt, left, right = _u8(item["gt"]), _u8(item["lq"][:3]), _u8(item["lq"][3:])
    assert item["lq"].shape[0] == 6 and item["gt"].shape[0] == 3
    assert np.array_equal(left, 255 - gt) and np.array_equal(right, gt // 2)
    return gt


def test_dual_pixel_train_stacks_and_crops_together(dp_roots, photos):
    root, names = dp_roots
    random.seed(5)
    ds = DualPixelDataset(_dp_opt(root, "train"))
    assert len(ds) == 3
    transforms = set()
    for index in range(len(ds)):
        for _ in range(4):
            item = ds[index]
            assert item["lq"].shape == (6, 20, 20) and item["gt"].shape == (3, 20, 20)
            gt = _check_dp(item)
            (k, _, _), = _locate(gt, photos[index])  # a crop of the GT under one dihedral transform
            transforms.add(k)
            assert item["lq_path"].endswith(f"left/{names[index]}")
            assert item["gt_path"].endswith(f"target/{names[index]}")
    assert len(transforms) > 2  # augmentation happened, and LQ/GT stayed consistent


def test_dual_pixel_lmdb_validation(dp_roots):
    root, names = dp_roots
    for sub in ("target", "left", "right"):
        if not (root / f"{sub}.lmdb").exists():
            _to_lmdb(root / sub, names, root / f"{sub}.lmdb")
    ds = DualPixelDataset(_dp_opt(root, backend="lmdb", suffix=".lmdb"))
    item = ds[1]
    assert item["lq"].shape == (6, H, W) and item["lq_path"] == "b2"
    _check_dp(item)


def test_dual_pixel_missing_file(dp_roots, tmp_path, photos):
    root, names = dp_roots
    _write_folder(tmp_path / "target", photos, names)
    _write_folder(tmp_path / "left", photos, names)
    _write_folder(tmp_path / "right", photos[:1] + photos[2:], [names[0], names[2]])
    with pytest.raises(ValueError, match=r"dp_val: 'b2' of dataroot_gt has no match in dataroot_lq_right"):
        DualPixelDataset(_dp_opt(tmp_path))


# --- options and registration ----------------------------------------------------------------

@pytest.mark.parametrize("cls, extra, message", [
    (JPEGDataset, dict(quality=0), "quality must be an integer in 1..100"),
    (JPEGDataset, dict(quality=101), "quality must be an integer in 1..100"),
    (JPEGDataset, dict(quality_range=[50, 10]), "lo <= hi"),
    (JPEGDataset, dict(quality_range=[5]), r"quality_range must be \[lo, hi\]"),
    (JPEGDataset, dict(), "set quality or quality_range"),
    (JPEGDataset, dict(quality=10, phase="train", gt_size=0), "gt_size"),
    (DemosaicDataset, dict(phase="train", gt_size=15), "gt_size must be a positive even integer"),
    (DemosaicDataset, dict(color=False), "needs color images"),
    (DemosaicDataset, dict(bayer_pattern="RGBG"), "bayer pattern"),
    (DemosaicDataset, dict(modulo=3), "modulo"),
])
def test_bad_options(gt_folder, cls, extra, message):
    opt = _opt(gt_folder, name="bad_ds")
    opt.update(extra)
    with pytest.raises(ValueError, match=f"^bad_ds: .*{message}") as err:
        cls(opt)
    assert "\n" not in str(err.value)


def test_build_dataset_registration(gt_folder, gt_lmdb, dp_roots):
    root, _ = dp_roots
    opts = [dict(_opt(gt_lmdb, "train", backend="lmdb", quality=10), type="JPEGDataset"),
            dict(_opt(gt_folder, "train", gt_size=16), type="DemosaicDataset"),
            _dp_opt(root, "train")]
    for opt in opts:
        ds = build_dataset(opt)
        assert type(ds).__name__ == opt["type"]
        item = ds[0]
        assert item["gt"].shape[0] == 3 and item["lq"].shape[0] in (3, 6)
