"""A short CPU training on scikit-image photos lowers the validation loss (denoising, JPEG,
demosaicking): the datasets, losses and GRLModel fit together into something that learns."""
import copy

import cv2
import pytest
import torch

import grl_plugin  # noqa: F401  (registers)
from basicsr.data import build_dataloader, build_dataset
from basicsr.models import build_model

NET = dict(type="GRL", embed_dim=16, depths=[1], num_heads_window=[1], num_heads_stripe=[1],
           window_size=4, stripe_size=[8, 8], stripe_groups=[None, None], stripe_shift=True,
           anchor_window_down_factor=2, mlp_ratio=2, upsampler="", upscale=1, drop_path_rate=0.0)
TASKS = {
    "denoise": ({"type": "GaussianNoiseDataset", "sigma": 25}, "L1Loss"),
    "jpeg": ({"type": "JPEGDataset", "quality": 10}, "GRLCharbonnierLoss"),
    "demosaic": ({"type": "DemosaicDataset"}, "GRLCharbonnierLoss"),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    skdata = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("photos")
    for split, items in {"train": [("astronaut", skdata.astronaut()[:256, :256]),
                                   ("rocket", skdata.rocket()[:256, 100:356])],
                         "val": [("coffee", skdata.coffee()[100:196, 200:296])]}.items():
        (root / split).mkdir()
        for name, img in items:
            cv2.imwrite(str(root / split / f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return root


def _val_loss(model, loader):
    model.net_g.eval()
    losses = []
    with torch.no_grad():
        for batch in loader:
            losses.append(model.cri_pix(model.net_g(batch["lq"]), batch["gt"]).item())
    model.net_g.train()
    return sum(losses) / len(losses)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_short_training_lowers_validation_loss(task, photos):
    torch.manual_seed(0)
    ds_opt, loss = TASKS[task]
    common = dict(ds_opt, io_backend={"type": "disk"}, gt_size=32, use_hflip=True, use_rot=True,
                  batch_size_per_gpu=8, num_worker_per_gpu=0)
    train = build_dataset(dict(common, name="train", phase="train", dataroot_gt=str(photos / "train")))
    val = build_dataset(dict(common, name="val", phase="val", dataroot_gt=str(photos / "val")))
    steps = 60  # random crops of the training photos, with replacement
    train_loader = torch.utils.data.DataLoader(
        train, batch_size=8, sampler=torch.utils.data.RandomSampler(train, True, 8 * steps))
    val_loader = build_dataloader(val, dict(common, phase="val"), num_gpu=0, dist=False, sampler=None)
    opt = {"name": task, "model_type": "GRLModel", "num_gpu": 0, "dist": False, "is_train": True,
           "scale": 1, "network_g": copy.deepcopy(NET), "path": {"pretrain_network_g": None},
           "train": {"ema_decay": 0, "optim_g": {"type": "AdamW", "lr": 2e-3, "weight_decay": 1e-4},
                     "scheduler": {"type": "MultiStepLR", "milestones": [1000], "gamma": 0.5},
                     "pixel_opt": {"type": loss, "loss_weight": 1.0}},
           "val": {}}
    model = build_model(opt)
    before = _val_loss(model, val_loader)
    for it, batch in enumerate(train_loader):
        model.feed_data(batch)
        model.optimize_parameters(it)
    after = _val_loss(model, val_loader)
    print(f"{task}: validation loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (task, before, after)
