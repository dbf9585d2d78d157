"""GRLModel options (EMA, bf16, clipping, checkpointing, tiling, official ckpt) without the CLI."""
import copy

import cv2
import numpy as np
import pytest
import torch

import grl_plugin  # noqa: F401  (registers)
from basicsr.data import build_dataloader, build_dataset
from basicsr.models import build_model

NET = dict(type="GRL", embed_dim=16, depths=[2], num_heads_window=[1], num_heads_stripe=[1],
           window_size=4, stripe_size=[8, 8], stripe_groups=[None, None], stripe_shift=True,
           anchor_window_down_factor=2, mlp_ratio=2, upsampler="", upscale=1, drop_path_rate=0.0)


def make_opt(tmp_path, train=None, val=None, path=None, is_train=True):
    return {
        "name": "t", "model_type": "GRLModel", "num_gpu": 0, "dist": False, "is_train": is_train,
        "scale": 1, "rank": 0, "world_size": 1, "network_g": copy.deepcopy(NET),
        "path": dict({"pretrain_network_g": None, "strict_load_g": True,
                      "visualization": str(tmp_path / "vis"), "models": str(tmp_path / "models")}, **(path or {})),
        "train": dict({"ema_decay": 0, "optim_g": {"type": "Adam", "lr": 1e-3},
                       "scheduler": {"type": "MultiStepLR", "milestones": [100], "gamma": 0.5},
                       "total_iter": 10, "pixel_opt": {"type": "L1Loss", "loss_weight": 1.0}}, **(train or {})),
        "val": dict({"metrics": {"psnr": {"type": "calculate_psnr", "crop_border": 0, "test_y_channel": False}}},
                    **(val or {})),
    }


@pytest.fixture
def images(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    folder = tmp_path / "gt"
    folder.mkdir()
    for name, img in [("astronaut", skdata.astronaut()), ("coffee", skdata.coffee())]:
        cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(img[:40, :56], cv2.COLOR_RGB2BGR))
    return folder


def _loader(folder, phase="val"):
    opt = {"name": "noise", "type": "GaussianNoiseDataset", "dataroot_gt": str(folder), "phase": phase,
           "io_backend": {"type": "disk"}, "sigma": 25, "gt_size": 16, "use_hflip": True, "use_rot": True,
           "batch_size_per_gpu": 2, "num_worker_per_gpu": 0}
    return build_dataloader(build_dataset(opt), opt, num_gpu=0, dist=False, sampler=None)


def _train_steps(model, loader, n=2):
    for _ in range(n):
        for batch in loader:
            model.feed_data(batch)
            model.optimize_parameters(1)


def test_training_options_run_and_update_weights(tmp_path, images):
    opt = make_opt(tmp_path, train={"ema_decay": 0.9, "amp": "bf16", "grad_clip": 0.1,
                                    "activation_checkpointing": True,
                                    "optim_g": {"type": "Adam", "lr": 1e-3}})
    model = build_model(opt)
    assert all(s.use_checkpoint for s in model.net_g.layers)
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    ema_before = {k: v.clone() for k, v in model.net_g_ema.state_dict().items()}
    _train_steps(model, _loader(images, "train"))
    log = model.get_current_log()
    assert "l_pix" in log and log["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.net_g.state_dict().items())
    assert any(not torch.equal(ema_before[k], v) for k, v in model.net_g_ema.state_dict().items())
    model.validation(_loader(images), 1, None, False)
    assert np.isfinite(model.metric_results["psnr"])


def test_grad_clip_bounds_the_step(tmp_path, images):
    opt = make_opt(tmp_path, train={"grad_clip": 1e-3, "optim_g": {"type": "SGD", "lr": 1.0}})
    pytest.importorskip("grl_plugin.compat")
    try:
        model = build_model(opt)
    except NotImplementedError:
        pytest.skip("optimizer compat fix not in place")
    before = torch.cat([p.detach().flatten().clone() for p in model.net_g.parameters()])
    _train_steps(model, _loader(images, "train"), 1)
    after = torch.cat([p.detach().flatten() for p in model.net_g.parameters()])
    # SGD with lr 1 moves the weights by exactly the clipped gradient: global norm <= 1e-3
    assert (after - before).norm() <= 1e-3 * 1.001


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        build_model(make_opt(tmp_path, train={"amp": "fp16"}))


def test_lean_backward_option_sets_the_mode_and_rejects_bad_values(tmp_path, images):
    """train.lean_backward: true gives the least-memory backward to this model's network only
    (a second model built afterwards keeps its own) and a training step that updates the
    weights; a value other than true/false/null is one clear error naming the key."""
    def modes(net):
        return {m.lean_backward for m in net.modules() if hasattr(m, "lean_backward")}

    model = build_model(make_opt(tmp_path, train={"lean_backward": True}))
    assert modes(model.net_g) == {True}
    before = [p.detach().clone() for p in model.net_g.parameters()]
    _train_steps(model, _loader(images, "train"), n=1)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.net_g.parameters()))
    other = build_model(make_opt(tmp_path / "auto"))
    assert modes(other.net_g) == {None} and modes(model.net_g) == {True}
    with pytest.raises(ValueError, match=r"train.lean_backward must be true .* got 'yes'"):
        build_model(make_opt(tmp_path / "bad", train={"lean_backward": "yes"}))


def test_tiled_validation_equals_untiled_when_one_tile_covers(tmp_path, images):
    model = build_model(make_opt(tmp_path, is_train=False))
    model.validation(_loader(images), 0, None, False)
    whole = model.metric_results["psnr"]
    model.opt["val"]["tile"] = {"size": 64, "overlap": 8}  # covers 40x56
    model.validation(_loader(images), 0, None, False)
    assert model.metric_results["psnr"] == whole
    model.opt["val"]["tile"] = {"size": 16, "overlap": 4}
    model.validation(_loader(images), 0, None, False)
    assert abs(model.metric_results["psnr"] - whole) < 1.0


def test_pretrain_from_official_lightning_checkpoint(tmp_path):
    src = grl_plugin.GRL(**{k: v for k, v in NET.items() if k != "type"})
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ckpt = {"state_dict": {**{f"model.{k}": v for k, v in src.state_dict().items()},
                           "current_val_metric": torch.tensor(0.0), "best_val_metric": torch.tensor(0.0),
                           "best_iter": torch.tensor(0)},
            "hyper_parameters": {"model": {k: v for k, v in NET.items() if k != "type"}}}
    torch.save(ckpt, tmp_path / "official.ckpt")
    model = build_model(make_opt(tmp_path, train={"ema_decay": 0.99},
                                 path={"pretrain_network_g": str(tmp_path / "official.ckpt")}))
    for net in (model.net_g, model.net_g_ema):
        for k, v in src.state_dict().items():
            assert torch.equal(net.state_dict()[k], v), k


def test_noise_dataset_levels_and_deterministic_validation(images):
    train = _loader(images, "train").dataset
    val = _loader(images, "val").dataset
    for sigma in (15, 50):
        train.opt["sigma"] = sigma
        s = train[0]
        assert s["lq"].shape == s["gt"].shape == (3, 16, 16)
        samples = [train[i % 2] for i in range(40)]
        noise = torch.cat([(t["lq"] - t["gt"]).flatten() for t in samples])
        assert abs(noise.std().item() * 255 - sigma) < 0.05 * sigma
    a, b = val[0], val[0]
    assert torch.equal(a["lq"], b["lq"]) and a["lq"].shape == (3, 40, 56)
    assert not torch.equal(val[0]["lq"] - val[0]["gt"], val[1]["lq"][:, :40, :56] - val[1]["gt"])
    assert (a["lq"] - a["gt"]).abs().max() > 0 and (a["lq"] < 0).any()  # not clipped


def test_noise_dataset_gray_and_range(images):
    opt = dict(_loader(images, "train").dataset.opt, color=False, sigma=None, sigma_range=[5, 10])
    ds = build_dataset(opt)
    sigmas = {round(ds[0]["sigma"], 3) for _ in range(5)}
    s = ds[0]
    assert s["gt"].shape == (1, 16, 16)
    assert all(5 <= x <= 10 for x in sigmas) and len(sigmas) > 1


def test_compile_option_wraps_and_saves_bare_weights(tmp_path, images):
    opt = make_opt(tmp_path, train={"compile": {"backend": "eager"}})
    (tmp_path / "models").mkdir()
    model = build_model(opt)
    assert hasattr(model.net_g, "_orig_mod")
    assert isinstance(model.get_bare_model(model.net_g), grl_plugin.GRL)
    _train_steps(model, _loader(images, "train"), 1)
    model.save_network(model.net_g, "net_g", 1)
    saved = torch.load(tmp_path / "models" / "net_g_1.pth", weights_only=True)["params"]
    assert list(saved) == list(grl_plugin.GRL(**{k: v for k, v in NET.items() if k != "type"}).state_dict())


def test_regional_compile_option_compiles_each_block(tmp_path, images):
    """``train.compile: {regional: true, ...}``: the network is not wrapped, each GRL block's
    token forward is compiled with the other keys (``compile_blocks``), training runs and the
    saved weights are the plain GRL's."""
    from grl_plugin.layers import GRLBlock
    opt = make_opt(tmp_path, train={"compile": {"regional": True, "backend": "eager"}})
    (tmp_path / "models").mkdir()
    torch._dynamo.reset()
    model = build_model(opt)
    assert not hasattr(model.net_g, "_orig_mod") and isinstance(model.net_g, grl_plugin.GRL)
    blocks = [m for m in model.net_g.modules() if isinstance(m, GRLBlock)]
    assert blocks and all("forward_tokens" in vars(b) for b in blocks)
    before = [p.detach().clone() for p in model.net_g.parameters()]
    _train_steps(model, _loader(images, "train"), 1)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.net_g.parameters()))
    model.save_network(model.net_g, "net_g", 1)
    saved = torch.load(tmp_path / "models" / "net_g_1.pth", weights_only=True)["params"]
    assert list(saved) == list(grl_plugin.GRL(**{k: v for k, v in NET.items() if k != "type"}).state_dict())
    torch._dynamo.reset()
