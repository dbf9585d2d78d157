"""GRLRealESRGANModel / GRLRealESRNetModel: Real-ESRGAN degradations + training steps on CPU.

BasicSR's RealESRGANDataset over real photographs (scikit-image) with a meta_info file, a tiny
GRL generator (nearest+conv x4) and a tiny UNetDiscriminatorSN; ``.cuda()`` is made to raise
so any CUDA-only line in the pipeline fails the test.
"""
import copy
import random

import cv2
import numpy as np
import pytest
import torch

import grl_plugin  # noqa: F401  (registers)
from basicsr.data import build_dataloader, build_dataset
from basicsr.models import build_model

skdata = pytest.importorskip("skimage.data")

NET_G = dict(type="GRL", in_channels=3, embed_dim=16, depths=[1], num_heads_window=[1], num_heads_stripe=[1],
             window_size=4, stripe_size=[8, 8], stripe_groups=[None, None], anchor_window_down_factor=2,
             mlp_ratio=2, upsampler="nearest+conv", upscale=4, drop_path_rate=0.0)
NET_D = dict(type="UNetDiscriminatorSN", num_in_ch=3, num_feat=8, skip_connection=True)

# BasicSR's options/train/RealESRGAN/train_realesrgan_x4plus.yml (model part), smaller gt_size/queue
DEGRADATION = dict(
    high_order_degradation=True, gt_usm=True, l1_gt_usm=True, percep_gt_usm=True, gan_gt_usm=False,
    resize_prob=[0.2, 0.7, 0.1], resize_range=[0.15, 1.5], gaussian_noise_prob=0.5, noise_range=[1, 30],
    poisson_scale_range=[0.05, 3], gray_noise_prob=0.4, jpeg_range=[30, 95],
    second_blur_prob=0.8, resize_prob2=[0.3, 0.4, 0.3], resize_range2=[0.3, 1.2], gaussian_noise_prob2=0.5,
    noise_range2=[1, 25], poisson_scale_range2=[0.05, 2.5], gray_noise_prob2=0.4, jpeg_range2=[30, 95],
    gt_size=64, queue_size=4)

KERNELS = ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
KERNEL_PROB = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]


@pytest.fixture
def no_cuda(monkeypatch):
    """Any ``.cuda()`` on a tensor or module fails loudly."""
    def boom(*args, **kwargs):
        raise AssertionError(".cuda() called")
    monkeypatch.setattr(torch.Tensor, "cuda", boom)
    monkeypatch.setattr(torch.nn.Module, "cuda", boom)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("realsr")
    gt, lq = root / "gt", root / "lq"
    gt.mkdir()
    lq.mkdir()
    names = []
    for name in ("astronaut", "coffee", "chelsea"):
        rgb = getattr(skdata, name)()[:128, :128, :3]
        bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(gt / f"{name}.png"), bgr)
        cv2.imwrite(str(lq / f"{name}.png"), cv2.resize(bgr[:64, :64], (16, 16), interpolation=cv2.INTER_AREA))
        cv2.imwrite(str(gt / f"{name}_val.png"), bgr[:64, :64])
        names.append(f"{name}.png")
    meta = root / "meta_info.txt"
    meta.write_text("".join(f"{n} (128,128,3)\n" for n in names))
    return {"root": root, "gt": gt, "lq": lq, "meta": meta}


def _train_loader(photos):
    opt = dict(name="realsr", type="RealESRGANDataset", phase="train", dataroot_gt=str(photos["gt"]),
               meta_info=str(photos["meta"]), io_backend=dict(type="disk"),
               blur_kernel_size=21, kernel_list=KERNELS, kernel_prob=KERNEL_PROB, sinc_prob=0.1,
               blur_sigma=[0.2, 3], betag_range=[0.5, 4], betap_range=[1, 2],
               blur_kernel_size2=21, kernel_list2=KERNELS, kernel_prob2=KERNEL_PROB, sinc_prob2=0.1,
               blur_sigma2=[0.2, 1.5], betag_range2=[0.5, 4], betap_range2=[1, 2], final_sinc_prob=0.8,
               gt_size=64, use_hflip=True, use_rot=False, use_shuffle=True, num_worker_per_gpu=0,
               batch_size_per_gpu=2, dataset_enlarge_ratio=1, prefetch_mode=None)
    return build_dataloader(build_dataset(opt), opt, num_gpu=0, dist=False, sampler=None, seed=0)


def _val_loader(photos):
    # PairedImageDataset pairs GT and LQ by file name: a folder with only the 64x64 GT crops
    val_gt = photos["root"] / "val_gt"
    if not val_gt.exists():
        val_gt.mkdir()
        for p in photos["gt"].glob("*_val.png"):
            (val_gt / p.name.replace("_val", "")).write_bytes(p.read_bytes())
    opt = dict(name="val", type="PairedImageDataset", phase="val", dataroot_gt=str(val_gt),
               dataroot_lq=str(photos["lq"]), io_backend=dict(type="disk"), scale=4)
    return build_dataloader(build_dataset(opt), opt, num_gpu=0, dist=False, sampler=None)


def _opt(tmp_path, model_type, **train):
    opt = dict(name="realsr_t", model_type=model_type, num_gpu=0, dist=False, is_train=True, scale=4,
               rank=0, world_size=1, network_g=copy.deepcopy(NET_G),
               path=dict(pretrain_network_g=None, strict_load_g=True, visualization=str(tmp_path / "vis"),
                         models=str(tmp_path / "models")),
               train=dict(ema_decay=0.9, optim_g=dict(type="Adam", lr=1e-3, betas=[0.9, 0.99]),
                          scheduler=dict(type="MultiStepLR", milestones=[100], gamma=0.5), total_iter=2,
                          warmup_iter=-1, pixel_opt=dict(type="L1Loss", loss_weight=1.0, reduction="mean")),
               val=dict(metrics=dict(
                   psnr=dict(type="calculate_psnr", crop_border=4, test_y_channel=True),
                   ssim=dict(type="calculate_ssim_grl", crop_border=4, test_y_channel=True),
                   psnrb=dict(type="calculate_psnrb", crop_border=4, test_y_channel=False))),
               **copy.deepcopy(DEGRADATION))
    opt["train"].update(train)
    return opt


def _seed(seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _changed(before, net):
    return any(not torch.equal(before[k], v) for k, v in net.state_dict().items())


def _run_steps(model, loader, n=2):
    logs = []
    it = iter(loader)
    for step in range(1, n + 1):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        model.feed_data(batch)
        assert model.lq.shape == (2, 3, 16, 16) and model.gt.shape == (2, 3, 64, 64)
        assert model.lq.device == model.device and model.gt.device == model.device
        assert 0 <= model.lq.min() and model.lq.max() <= 1
        model.optimize_parameters(step)
        logs.append(model.get_current_log())
    return logs


def test_realesrgan_model_trains_on_cpu(tmp_path, photos, no_cuda):
    _seed()
    opt = _opt(tmp_path, "GRLRealESRGANModel",
               optim_d=dict(type="Adam", lr=1e-3, betas=[0.9, 0.99]),
               perceptual_opt=dict(type="GRLPerceptualLoss", vgg_weights="random",
                                   layer_weights={"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1, "conv4_4": 1,
                                                  "conv5_4": 1},
                                   perceptual_weight=1.0, style_weight=0, criterion="l1"),
               gan_opt=dict(type="GANLoss", gan_type="vanilla", real_label_val=1.0, fake_label_val=0.0,
                            loss_weight=0.1),
               net_d_iters=1, net_d_init_iters=0, grad_clip=1.0)
    opt["network_d"] = copy.deepcopy(NET_D)
    model = build_model(opt)
    assert type(model).__name__ == "GRLRealESRGANModel"
    assert all(t.device == model.device for t in [*model.jpeger.parameters(), *model.usm_sharpener.buffers()])
    g0, d0 = _snapshot(model.net_g), _snapshot(model.net_d)
    logs = _run_steps(model, _train_loader(photos))
    for log in logs:
        for key in ("l_g_pix", "l_g_percep", "l_g_gan", "l_d_real", "l_d_fake", "grad_norm"):
            assert key in log and np.isfinite(log[key]), (key, log)
    assert logs[-1]["l_g_percep"] > 0
    assert _changed(g0, model.net_g) and _changed(d0, model.net_d)
    assert model.queue_lr.device == model.device and model.queue_ptr == 4  # pool filled (2 x batch 2)

    model.validation(_val_loader(photos), 2, None, False)  # no synthetic degradation in validation
    assert model.is_train
    assert all(np.isfinite(model.metric_results[k]) for k in ("psnr", "ssim", "psnrb"))


def test_realesrnet_model_trains_on_cpu(tmp_path, photos, no_cuda):
    _seed(1)
    model = build_model(_opt(tmp_path, "GRLRealESRNetModel", ema_decay=0))
    assert type(model).__name__ == "GRLRealESRNetModel"
    g0 = _snapshot(model.net_g)
    logs = _run_steps(model, _train_loader(photos), n=3)  # third step: the full pool swaps pairs
    assert all(np.isfinite(log["l_pix"]) for log in logs)
    assert _changed(g0, model.net_g)
    assert model.queue_ptr == 4 and model.queue_gt.device == model.device
    model.validation(_val_loader(photos), 2, None, False)
    assert model.is_train and np.isfinite(model.metric_results["psnr"])


def test_realesrgan_model_loads_official_ckpt_and_bf16(tmp_path, photos, no_cuda):
    """Generator (and EMA) + discriminator from an official-style GAN-stage Lightning .ckpt
    (model_g.* / model_d.*), then one bf16-autocast step."""
    from basicsr.archs import build_network
    torch.manual_seed(3)
    net_g, net_d = build_network(copy.deepcopy(NET_G)), build_network(copy.deepcopy(NET_D))
    state = {f"model_g.{k}": v for k, v in net_g.state_dict().items()}
    state.update({f"model_d.{k}": v for k, v in net_d.state_dict().items()})
    ckpt = tmp_path / "bsr_grl_tiny.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, ckpt)
    _seed(2)
    opt = _opt(tmp_path, "GRLRealESRGANModel", ema_decay=0.9, amp="bf16",
               optim_d=dict(type="Adam", lr=1e-3), pixel_opt=None, perceptual_opt=None,
               gan_opt=dict(type="GANLoss", gan_type="vanilla", loss_weight=0.1))
    opt["network_d"] = copy.deepcopy(NET_D)
    opt["path"].update(pretrain_network_g=str(ckpt), pretrain_network_d=str(ckpt), strict_load_d=True)
    model = build_model(opt)
    for net, ref in ((model.net_g, net_g), (model.net_g_ema, net_g), (model.net_d, net_d)):
        sd = net.state_dict()
        for k, v in ref.state_dict().items():
            assert torch.equal(sd[k], v), k
    logs = _run_steps(model, _train_loader(photos), n=1)
    assert np.isfinite(logs[0]["l_g_gan"]) and np.isfinite(logs[0]["l_d_fake"])

    no_d = tmp_path / "psnr_stage.ckpt"
    torch.save({"state_dict": {k: v for k, v in state.items() if k.startswith("model_g.")}}, no_d)
    opt["path"].update(pretrain_network_d=str(no_d))
    with pytest.raises(ValueError, match="model_d"):
        build_model(opt)
