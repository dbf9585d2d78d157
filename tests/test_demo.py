"""The demo's data preparation, option files and helpers (no training: `make demo` does that)."""
import os
import os.path as osp

import cv2
import lmdb
import numpy as np
import pytest

pytest.importorskip("skimage")

import grl_plugin  # noqa: F401,E402  (compat fixes before basicsr)
from grl_plugin.cli import demo  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = dict(train_photos=("astronaut", "rocket"), heldout_photos=("chelsea",), crop_size=64, step=160,
            heldout_size=32)


def _read_lmdb(path):
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        items = {k.decode(): cv2.imdecode(np.frombuffer(v, np.uint8), cv2.IMREAD_UNCHANGED)
                 for k, v in txn.cursor()}
    env.close()
    return items


def _meta(path):
    with open(osp.join(path, "meta_info.txt")) as f:
        return [line.split() for line in f if line.strip()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo_data"))
    return root, demo.build_dataset(root, **TINY)


def test_subimage_positions_follow_basicsr():
    # extract_subimages: stride `step`, plus a last crop flush with the border.
    assert demo.subimage_positions(512, 96, 48) == list(range(0, 417, 48)) + [416]
    assert demo.subimage_positions(192, 96, 48) == [0, 48, 96]
    assert demo.subimage_positions(95, 96, 48) == []


def test_train_lmdb_matches_meta_info(tiny):
    root, info = tiny
    assert info["reused"] == []
    assert info["train_lmdb"] == osp.join(root, "train_gt.lmdb")
    meta = _meta(info["train_lmdb"])
    items = _read_lmdb(info["train_lmdb"])
    # astronaut 512x512 and rocket 427x640 with 64-pixel crops every 160 pixels (+ border crop)
    assert len(meta) == info["n_train"] == len(items) == 4 * 4 + 4 * 5
    for name, shape, level in meta:
        key = name[:-len(".png")]
        assert name.endswith(".png") and shape == "(64,64,3)" and level == "1"
        assert items[key].shape == (64, 64, 3) and items[key].dtype == np.uint8
    # the first sub-image is the top-left corner of the photo (stored BGR, as cv2 writes)
    first = demo.load_photo("astronaut")[:64, :64, ::-1]
    np.testing.assert_array_equal(items["astronaut_s001"], first)
    # sub-image PNG sources sit next to the LMDB, as extract_subimages leaves them
    assert sorted(os.listdir(info["train_png"])) == sorted(f"{k}.png" for k in items)


def test_heldout_lmdb_is_disjoint_from_training(tiny):
    _, info = tiny
    val = _read_lmdb(info["val_lmdb"])
    assert [m[0] for m in _meta(info["val_lmdb"])] == ["chelsea.png"]
    assert val["chelsea"].shape == (32, 32, 3)
    np.testing.assert_array_equal(val["chelsea"], demo.center_crop(demo.load_photo("chelsea"), 32)[..., ::-1])
    train_keys = set(_read_lmdb(info["train_lmdb"]))
    assert all(k.split("_s")[0] in TINY["train_photos"] for k in train_keys)
    assert not {k.split("_s")[0] for k in train_keys} & set(val)


def test_default_split_is_disjoint_also_by_pixels():
    assert not set(demo.TRAIN_PHOTOS) & set(demo.HELDOUT_PHOTOS)
    # skimage.data.cat is chelsea: aliases must not leak a held-out photo into training
    held = [demo.load_photo(n) for n in demo.HELDOUT_PHOTOS]
    for name in demo.TRAIN_PHOTOS:
        img = demo.load_photo(name)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
        assert not any(h.shape == img.shape and np.array_equal(h, img) for h in held), name
    with pytest.raises(ValueError, match="both in training and held out"):
        demo.build_dataset("unused", train_photos=("chelsea",), heldout_photos=("chelsea",))


def test_build_dataset_is_idempotent(tiny, tmp_path):
    root, info = tiny
    mdb = osp.join(info["train_lmdb"], "data.mdb")
    before = os.stat(mdb).st_mtime_ns
    again = demo.build_dataset(root, **TINY)
    assert again["reused"] == ["train", "val"] and os.stat(mdb).st_mtime_ns == before
    # other settings -> that split is rebuilt, the matching one reused
    changed = demo.build_dataset(root, **dict(TINY, heldout_size=48))
    assert changed["reused"] == ["train"]
    assert _read_lmdb(changed["val_lmdb"])["chelsea"].shape == (48, 48, 3)
    demo.build_dataset(root, **TINY)  # back to the module fixture's state


def test_noise_dataset_reads_the_demo_lmdbs(tiny):
    from basicsr.utils.registry import DATASET_REGISTRY
    _, info = tiny
    cls = DATASET_REGISTRY.get("GaussianNoiseDataset")
    val = cls(dict(name="v", dataroot_gt=info["val_lmdb"], io_backend={"type": "lmdb"}, sigma=25,
                   color=True, phase="val"))
    a, b = val[0], val[0]
    assert a["gt"].shape == a["lq"].shape == (3, 32, 32)
    assert np.allclose(a["lq"].numpy(), b["lq"].numpy())  # fixed validation noise
    rgb = demo.center_crop(demo.load_photo("chelsea"), 32)
    np.testing.assert_allclose(a["gt"].numpy().transpose(1, 2, 0) * 255, rgb, atol=1e-3)
    train = cls(dict(name="t", dataroot_gt=info["train_lmdb"], io_backend={"type": "lmdb"}, sigma=25,
                     color=True, phase="train", gt_size=32, use_hflip=True, use_rot=True))
    assert len(train) == info["n_train"] and train[3]["gt"].shape == (3, 32, 32)


def test_option_files_agree_with_the_demo():
    opt_dir = osp.join(REPO, "options", "demo")
    train = demo.read_yaml(osp.join(opt_dir, demo.TRAIN_OPT))
    test = demo.read_yaml(osp.join(opt_dir, demo.TEST_OPT))
    assert train["network_g"] == test["network_g"]
    assert train["network_g"]["upscale"] == 1 and train["network_g"]["upsampler"] == ""
    assert test["path"]["pretrain_network_g"] == f"experiments/{train['name']}/models/net_g_latest.pth"
    assert train["datasets"]["train"]["dataroot_gt"] == "datasets/demo/train_gt.lmdb"
    assert train["datasets"]["val"]["dataroot_gt"] == test["datasets"]["test_1"]["dataroot_gt"] \
        == "datasets/demo/val_gt.lmdb"
    assert train["train"]["scheduler"]["periods"] == [train["train"]["total_iter"]]
    # every key the demo may override exists (--force_yml cannot create keys)
    demo.apply_overrides(train, {"train:total_iter": 5, "train:scheduler:periods": [5], "val:val_freq": 1,
                                 "logger:print_freq": 1, "path:pretrain_network_g": "/x.pth",
                                 "datasets:train:dataroot_gt": "a", "datasets:val:dataroot_gt": "b"})
    demo.apply_overrides(test, {"path:pretrain_network_g": "/x.pth", "datasets:test_1:dataroot_gt": "b"})
    assert train["train"]["total_iter"] == 5 and test["path"]["pretrain_network_g"] == "/x.pth"
    with pytest.raises(KeyError):
        demo.apply_overrides(train, {"train:no_such_key": 1})


def test_force_yml_args_round_trip():
    from basicsr.utils.options import _postprocess_yml_value
    args = demo.force_yml_args({"train:total_iter": 300, "train:scheduler:periods": [300], "path:p": None,
                                "datasets:train:dataroot_gt": "/tmp/x/train_gt.lmdb"})
    assert args[0] == "--force_yml"
    parsed = {k: _postprocess_yml_value(v) for k, v in (a.split("=") for a in args[1:])}
    assert parsed == {"train:total_iter": 300, "train:scheduler:periods": [300], "path:p": None,
                      "datasets:train:dataroot_gt": "/tmp/x/train_gt.lmdb"}
    with pytest.raises(ValueError):
        demo.force_yml_args({"path:p": "C:/x"})


def test_log_filter_drops_only_the_network_structure():
    log = ["2026-01-01 00:00:00,000 INFO: Network: GRL, with parameters: 880,227\n",
           "2026-01-01 00:00:00,001 INFO: GRL(\n", "  (conv_first): Conv2d(3, 64)\n", "  (layers): ModuleList(\n",
           "    dim=32, window_size=8\n", "  )\n", ")\n",
           "2026-01-01 00:00:00,002 INFO: Model [GRLModel] is created.\n", "\t # psnr: 30.0\n"]
    out = list(demo.filter_network_structure(log))
    assert out[0] == log[0] and "left out" in out[1] and out[2:] == log[-2:]


def test_table_and_pictures(tmp_path):
    rows = [dict(name="chelsea", size="128x128", noisy_psnr=20.2, noisy_ssim=0.4, grl_psnr=28.1, grl_ssim=0.8)]
    table = demo.format_table(rows)
    assert "chelsea" in table and "+7.90" in table and table.splitlines()[-1].startswith("mean")
    panel = demo._labelled(np.zeros((16, 16, 3), np.uint8), "noisy 20.20dB", 2)
    assert panel.shape[1] == 32 and panel.shape[0] > 32
    assert demo._labelled(np.zeros((16, 16, 3), np.uint8), "ground truth", 2).shape == panel.shape
