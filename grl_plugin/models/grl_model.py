"""GRLModel: BasicSR's SRModel with what GRL training and testing need.

Option keys on top of SRModel's (all optional)::

    train:
      amp: bf16               # mixed precision: bf16 (CPU and CUDA) | fp16 (CUDA, GradScaler) | none
      grad_clip: 0.5          # clip the global gradient norm (null: off)
      activation_checkpointing: true   # recompute GRL blocks in backward (less memory)
      compile: false          # torch.compile the network (or a dict of torch.compile kwargs)
    val:
      tile: {size: 256, overlap: 32, blend: linear}   # tiled validation/test (size 0: whole image)
      amp: none               # autocast during validation too
    path:
      pretrain_network_g: sr_grl_tiny_c3x4.ckpt      # official .ckpt, BasicSR .pth or .safetensors

Validation under ``--launcher pytorch`` splits the images over the ranks and all-reduces the
metrics, so every rank takes part and none waits in a collective while rank 0 validates.
"""
from __future__ import annotations

import contextlib
import os.path as osp
import warnings
from collections import OrderedDict

import torch
import torch.distributed as dist
from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from tqdm import tqdm

from ..archs.checkpoint import CheckpointWarning, load_checkpoint
from ..archs.grl_arch import GRL
from ..tiling import tiled_forward

AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
              "float16": torch.float16}


def _amp_dtype(value, device: torch.device, where: str):
    if value in (None, False, "none", "fp32", "float32"):
        return None
    if value not in AMP_DTYPES:
        raise ValueError(f"{where}: amp must be one of bf16, fp16, none; got {value!r}")
    dtype = AMP_DTYPES[value]
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"{where}: amp fp16 needs CUDA; use bf16 on {device.type}")
    return dtype


class GRLModel(SRModel):
    """SRModel + tiled validation, AMP, gradient clipping, activation checkpointing, compile,
    official-checkpoint loading and distributed validation (see the module docstring)."""

    # ---------------------------------------------------------------- network setup / loading
    def model_to_device(self, net):
        train_opt = self.opt.get("train") or {}
        if self.opt.get("is_train") and train_opt.get("activation_checkpointing"):
            for m in net.modules():
                if hasattr(m, "use_checkpoint"):
                    m.use_checkpoint = True
        net = super().model_to_device(net)
        compile_opt = train_opt.get("compile") if self.opt.get("is_train") else (self.opt.get("val") or {}).get("compile")
        if compile_opt:
            net = torch.compile(net, **(compile_opt if isinstance(compile_opt, dict) else {}))
        return net

    def get_bare_model(self, net):
        net = super().get_bare_model(getattr(net, "_orig_mod", net))  # torch.compile, then DDP
        return getattr(net, "_orig_mod", net)

    def load_network(self, net, load_path, strict=True, param_key="params"):
        """Load GRL weights from any format ``load_checkpoint`` reads; other nets as BasicSR does."""
        bare = self.get_bare_model(net)
        if not isinstance(bare, GRL):
            return super().load_network(net, load_path, strict, param_key)
        with warnings.catch_warnings():  # geometry not stored in the file: network_g gives it
            warnings.simplefilter("ignore", CheckpointWarning)
            state_dict, kwargs = load_checkpoint(load_path, key=param_key)
        logger = get_root_logger()
        logger.info(f"Loading GRL weights from {load_path} ({kwargs.format}).")
        for name in ("window_size", "stripe_size", "stripe_groups", "anchor_window_down_factor"):
            if name in kwargs and kwargs.origin.get(name) != "assumed" and \
                    list(_as_list(kwargs[name])) != list(_as_list(getattr(bare, name, None))):
                logger.warning(f"  {name}: checkpoint was trained with {kwargs[name]!r}, network uses "
                               f"{getattr(bare, name, None)!r}")
        self._print_different_keys_loading(net, state_dict, strict)
        bare.load_state_dict(state_dict, strict=strict)

    # ---------------------------------------------------------------------------- training
    def init_training_settings(self):
        train_opt = self.opt["train"]
        self.amp_dtype = _amp_dtype(train_opt.get("amp"), self.device, "train.amp")
        self.grad_clip = train_opt.get("grad_clip")
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        super().init_training_settings()
        if self.amp_dtype is not None:
            get_root_logger().info(f"Mixed precision training: {self.amp_dtype}.")

    def _autocast(self, dtype):
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def optimize_parameters(self, current_iter):
        self.optimizer_g.zero_grad(set_to_none=True)
        with self._autocast(self.amp_dtype):
            self.output = self.net_g(self.lq)
        output = self.output.float()
        l_total = 0
        loss_dict = OrderedDict()
        if self.cri_pix:
            l_pix = self.cri_pix(output, self.gt)
            l_total += l_pix
            loss_dict["l_pix"] = l_pix
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(output, self.gt)
            if l_percep is not None:
                l_total += l_percep
                loss_dict["l_percep"] = l_percep
            if l_style is not None:
                l_total += l_style
                loss_dict["l_style"] = l_style
        if self.scaler is not None:
            self.scaler.scale(l_total).backward()
            self.scaler.unscale_(self.optimizer_g)
        else:
            l_total.backward()
        if self.grad_clip:
            loss_dict["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.net_g.parameters(),
                                                                   float(self.grad_clip)).detach()
        if self.scaler is not None:
            self.scaler.step(self.optimizer_g)
            self.scaler.update()
        else:
            self.optimizer_g.step()
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    # ----------------------------------------------------------------------------- testing
    def _tile_options(self):
        tile = (self.opt.get("val") or {}).get("tile") or {}
        if isinstance(tile, int):
            tile = {"size": tile}
        return tile

    def test(self):
        # The bare network: a DDP wrapper would run collectives (buffer broadcast) in forward,
        # and ranks validate different numbers of images.
        net = self.get_bare_model(self.net_g_ema if hasattr(self, "net_g_ema") else self.net_g)
        was_training = net.training
        net.eval()
        tile = self._tile_options()
        val_opt = self.opt.get("val") or {}
        dtype = _amp_dtype(val_opt.get("amp"), self.device, "val.amp")
        with torch.no_grad(), self._autocast(dtype):
            self.output = tiled_forward(
                net, self.lq, tile.get("size"), tile.get("overlap", 0),
                scale=int(self.opt.get("scale", 1)), multiple=getattr(net, "pad_size", 1),
                blend=tile.get("blend", "linear")).float()
        if was_training:
            net.train()

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        self._validate(dataloader, current_iter, tb_logger, save_img, *self._rank_world())

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        self._validate(dataloader, current_iter, tb_logger, save_img, 0, 1)

    @staticmethod
    def _rank_world():
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _validate(self, dataloader, current_iter, tb_logger, save_img, rank, world):
        """Images ``rank::world`` on each rank; metric sums all-reduced across ranks."""
        dataset_name = dataloader.dataset.opt["name"]
        val_opt = self.opt["val"]
        metrics = val_opt.get("metrics") or {}
        if metrics:
            if not hasattr(self, "metric_results"):
                self.metric_results = {name: 0 for name in metrics}
            self._initialize_best_metric_results(dataset_name)
        sums = torch.zeros(len(metrics) + 1, dtype=torch.float64)
        pbar = tqdm(total=len(dataloader), unit="image") if val_opt.get("pbar", False) and rank == 0 else None
        for idx, val_data in enumerate(dataloader):
            if idx % world != rank:
                continue
            img_name = osp.splitext(osp.basename(val_data["lq_path"][0]))[0]
            self.feed_data(val_data)
            self.test()
            visuals = self.get_current_visuals()
            metric_data = {"img": tensor2img([visuals["result"]])}
            if "gt" in visuals:
                metric_data["img2"] = tensor2img([visuals["gt"]])
                del self.gt
            del self.lq, self.output
            if save_img:
                imwrite(metric_data["img"], self._save_path(img_name, dataset_name, current_iter))
            for k, (name, opt_) in enumerate(metrics.items()):
                sums[k] += calculate_metric(metric_data, opt_)
            sums[-1] += 1
            if pbar is not None:
                pbar.update(world)
                pbar.set_description(f"Test {img_name}")
        if pbar is not None:
            pbar.close()
        if world > 1:
            reduced = sums.to(self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(reduced)
            sums = reduced.cpu()
        if metrics:
            count = max(sums[-1].item(), 1.0)
            for k, name in enumerate(metrics):
                self.metric_results[name] = sums[k].item() / count
                self._update_best_metric_result(dataset_name, name, self.metric_results[name], current_iter)
            if rank == 0:
                self._log_validation_metric_values(current_iter, dataset_name, tb_logger)

    def _save_path(self, img_name, dataset_name, current_iter):
        if self.opt["is_train"]:
            return osp.join(self.opt["path"]["visualization"], img_name, f"{img_name}_{current_iter}.png")
        suffix = self.opt["val"].get("suffix") or self.opt["name"]
        return osp.join(self.opt["path"]["visualization"], dataset_name, f"{img_name}_{suffix}.png")


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]
