"""GRLModel: BasicSR's SRModel with what GRL training and testing need.

Option keys on top of SRModel's (all optional)::

    train:
      amp: bf16               # mixed precision: bf16 (CPU and CUDA) | fp16 (CUDA, GradScaler) | none
      grad_clip: 0.5          # clip the global gradient norm (null: off)
      activation_checkpointing: true   # recompute GRL blocks in backward (less memory)
      lean_backward: null     # true: least memory without checkpointing (all attention probabilities
                              # recomputed); false: fastest (MLP hidden layers, post-norm inputs kept); null: automatic
      compile: false          # torch.compile the network (or a dict of torch.compile kwargs; with
                              # regional: true each GRL block instead, compile_blocks: much quicker to compile)
      nan_tolerance: 5        # stop after this many iterations in a row with a NaN/Inf loss (null: never)
    val:
      tile: {size: 256, overlap: 32, blend: linear}   # tiled validation/test (size 0: whole image)
      amp: none               # autocast during validation too
      self_ensemble: false    # true: x8 self-ensemble (the 8 flips/rotations restored, turned back, averaged)
    path:
      pretrain_network_g: sr_grl_tiny_c3x4.ckpt      # official .ckpt, BasicSR .pth or .safetensors
      trust_checkpoint: false # true: full (unsafe) unpickle of files the safe reader refuses

Validation under ``--launcher pytorch`` splits the images over the ranks and all-reduces the
metrics, so every rank takes part and none waits in a collective while rank 0 validates.

Robustness (also in the Real-ESR models of :mod:`grl_plugin.models.realesrgan_model`):

* **Non-finite losses.** When a loss term (or, with ``grad_clip`` and without fp16, the gradient
  norm) is NaN/Inf, the iteration takes no optimizer step: gradients are zeroed, parameters,
  optimizer states and EMA stay as they were, and a warning names the iteration and the bad
  terms. After ``train.nan_tolerance`` such iterations in a row (default
  :data:`DEFAULT_NAN_TOLERANCE` = 5; ``null``: never stop) training stops with
  :class:`NonFiniteLossError` (``grl-train: error: ...``, exit status 2). No checkpoint is written
  while such a streak lasts, so the newest checkpoint is the last good one. Under
  ``--launcher pytorch`` the decision is all-reduced (every rank skips together).
* **Crash safety / exact resume.** Networks and training states are written atomically
  (:func:`grl_plugin.models.checkpoint_io.atomic_save`). The training state also holds the RNG
  states (python, numpy, torch, CUDA; one per rank), the position inside the epoch
  (:func:`grl_plugin.models.exact_resume.training_progress`) and the fp16 GradScaler;
  ``resume_training`` hands them to :func:`~grl_plugin.models.exact_resume.resume_progress`, so
  with a fixed ``manual_seed``,
  ``num_worker_per_gpu: 0`` and ``prefetch_mode: null`` a run killed and resumed with
  ``--auto_resume`` logs the same losses as a run never interrupted. Validation leaves the RNG
  states as it found them (training randomness does not depend on ``val_freq``). States written
  by BasicSR (no RNG/position) resume as BasicSR does (the epoch restarts).
* **Safe loading.** Weights are read with ``weights_only`` unless ``path.trust_checkpoint: true``;
  a file that cannot be read or does not fit raises a one-line
  :class:`~grl_plugin.archs.checkpoint.CheckpointError` (a ``RuntimeError``, as BasicSR's
  ``load_network`` raises) naming the file and the first differing keys.
"""
from __future__ import annotations

import contextlib
import math
import os.path as osp
import warnings
from collections import OrderedDict

import torch
import torch.distributed as dist
from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from tqdm import tqdm

from ..archs.checkpoint import CheckpointError, CheckpointWarning, check_fit, load_checkpoint, torch_load
from ..archs.grl_arch import GRL
from ..layers import compile_blocks, configure
from ..tiling import self_ensemble, tiled_forward
from .checkpoint_io import save_checkpoint_file, trust_checkpoint
from .exact_resume import get_rng_state, resume_progress, set_rng_state, training_progress

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


#: Default of ``train.nan_tolerance``: iterations in a row with a non-finite loss before training stops.
DEFAULT_NAN_TOLERANCE = 5


class NonFiniteLossError(RuntimeError):
    """``train.nan_tolerance`` iterations in a row had a non-finite loss: training stopped
    (one-line message; ``grl-train`` prints it as ``grl-train: error: ...``, exit status 2)."""


def _lean_backward(value):
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"train.lean_backward must be true (least memory: recompute all attention probabilities), "
                     f"false (keep them, the MLP hidden layers and the post-norm inputs: fastest) or null (automatic), "
                     f"got {value!r}")


def _self_ensemble(value):
    if isinstance(value, bool):
        return value
    raise ValueError(f"val.self_ensemble must be true (x8 self-ensemble: flips and rotations averaged) or false, "
                     f"got {value!r}")


def _nan_tolerance(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"train.nan_tolerance must be a positive integer (iterations in a row with a non-finite "
                         f"loss before training stops) or null (never stop), got {value!r}")
    return value


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
        compile_opt = train_opt.get("compile") if self.opt.get("is_train") else (self.opt.get("val") or {}).get("compile")
        kwargs = dict(compile_opt) if isinstance(compile_opt, dict) else {}
        regional = kwargs.pop("regional", False)
        if compile_opt and regional:  # each GRL block compiled in place (compile_blocks); no wrapper
            compile_blocks(net, **kwargs)
        net = super().model_to_device(net)
        if compile_opt and not regional:
            net = torch.compile(net, **kwargs)
        return net

    def get_bare_model(self, net):
        net = super().get_bare_model(getattr(net, "_orig_mod", net))  # torch.compile, then DDP
        return getattr(net, "_orig_mod", net)

    def load_network(self, net, load_path, strict=True, param_key="params"):
        """GRL weights from any format ``load_checkpoint`` reads; other networks from BasicSR files
        (``param_key``, falling back to ``params``). Both read safely (module docstring)."""
        bare = self.get_bare_model(net)
        logger = get_root_logger()
        trust = trust_checkpoint(self.opt)
        what = "network_g (GRL)" if isinstance(bare, GRL) else f"the network ({type(bare).__name__})"
        if isinstance(bare, GRL):
            with warnings.catch_warnings():  # geometry not stored in the file: network_g gives it
                warnings.simplefilter("ignore", CheckpointWarning)
                state_dict, kwargs = load_checkpoint(load_path, key=param_key, trust=trust, require_geometry=False)
            logger.info(f"Loading GRL weights from {load_path} ({kwargs.format}).")
            for name in ("window_size", "stripe_size", "stripe_groups", "anchor_window_down_factor"):
                if name in kwargs and kwargs.origin.get(name) != "assumed" and \
                        list(_as_list(kwargs[name])) != list(_as_list(getattr(bare, name, None))):
                    logger.warning(f"  {name}: checkpoint was trained with {kwargs[name]!r}, network uses "
                                   f"{getattr(bare, name, None)!r}")
        else:
            state_dict = torch_load(load_path, trust=trust)
            if param_key is not None:
                if isinstance(state_dict, dict) and param_key not in state_dict and "params" in state_dict:
                    logger.info("Loading: params_ema does not exist, use params.")
                    param_key = "params"
                if not isinstance(state_dict, dict) or param_key not in state_dict:
                    top = ", ".join(map(str, list(state_dict)[:6])) if isinstance(state_dict, dict) \
                        else type(state_dict).__name__
                    raise CheckpointError(f"{load_path}: no {param_key!r} entry (top level: {top})")
                state_dict = state_dict[param_key]
            if not isinstance(state_dict, dict):
                raise CheckpointError(f"{load_path}: not a state dict ({type(state_dict).__name__})")
            logger.info(f"Loading {type(bare).__name__} model from {load_path}, with param key: [{param_key}].")
            state_dict = type(state_dict)((k[len("module."):] if k.startswith("module.") else k, v)
                                          for k, v in state_dict.items())
        if strict:  # one line naming the file and the first differing keys
            check_fit(bare, state_dict, path=load_path, what=what)
        self._print_different_keys_loading(net, state_dict, strict)
        bare.load_state_dict(state_dict, strict=strict)

    def save_network(self, net, net_label, current_iter, param_key="params"):
        """BasicSR's ``models/<net_label>_<iter>.pth`` (the same keys, ``module.`` prefixes removed,
        the state dicts' ``_metadata`` kept), written atomically by rank 0. A GRL network's file
        also holds ``grl_kwargs``: its constructor kwargs (plain values, ``GRL.init_kwargs``), so
        :func:`~grl_plugin.archs.checkpoint.load_checkpoint` and the CLIs rebuild it from the file
        alone; BasicSR's loaders read only ``params`` / ``params_ema`` and ignore it."""
        if self._rank_world()[0] != 0:
            return
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        assert len(nets) == len(keys), "The lengths of net and param_key should be the same."
        save_dict, grl_kwargs = {}, None
        for net_, key in zip(nets, keys):
            state_dict = self.get_bare_model(net_).state_dict()
            clean = OrderedDict((k[len("module."):] if k.startswith("module.") else k, v.cpu())
                                for k, v in state_dict.items())
            if hasattr(state_dict, "_metadata"):
                clean._metadata = state_dict._metadata
            save_dict[key] = clean
            bare = self.get_bare_model(net_)
            if isinstance(bare, GRL) and grl_kwargs is None and isinstance(getattr(bare, "init_kwargs", None), dict):
                grl_kwargs = dict(bare.init_kwargs)
        if grl_kwargs is not None:
            save_dict["grl_kwargs"] = grl_kwargs
        label = "latest" if current_iter == -1 else current_iter
        save_checkpoint_file(save_dict, osp.join(self.opt["path"]["models"], f"{net_label}_{label}.pth"), "model")

    # ---------------------------------------------------------------------------- training
    def init_training_settings(self):
        train_opt = self.opt["train"]
        self.amp_dtype = _amp_dtype(train_opt.get("amp"), self.device, "train.amp")
        self.grad_clip = train_opt.get("grad_clip")
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.nan_tolerance = _nan_tolerance(train_opt.get("nan_tolerance", DEFAULT_NAN_TOLERANCE))
        lean = _lean_backward(train_opt.get("lean_backward"))
        configure(self.get_bare_model(self.net_g), lean_backward=lean)  # this model's network only
        if lean is not None:
            get_root_logger().info(f"Lean backward: {'least memory' if lean else 'fastest (keep probabilities)'}.")
        self.nonfinite_streak = 0  # iterations in a row with a non-finite loss
        self.last_checkpoint_iter = None
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
        else:
            l_total.backward()
        if not self._all_finite([l_total, *loss_dict.values()]):
            return self._skip_nonfinite_step(current_iter, loss_dict)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer_g)
        if self.grad_clip:
            loss_dict["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.net_g.parameters(),
                                                                   float(self.grad_clip)).detach()
            # fp16: GradScaler skips steps with inf/NaN gradients itself (and lowers its scale)
            if self.scaler is None and not self._all_finite([loss_dict["grad_norm"]]):
                return self._skip_nonfinite_step(current_iter, loss_dict, "gradient norm")
        if self.scaler is not None:
            self.scaler.step(self.optimizer_g)
            self.scaler.update()
        else:
            self.optimizer_g.step()
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)
        self.nonfinite_streak = 0

    # ------------------------------------------------------------- non-finite losses
    def _all_finite(self, values) -> bool:
        """True if every tensor in ``values`` is finite -- on every rank (all-reduced under DDP)."""
        flags = [torch.isfinite(v.detach()).all() for v in values if torch.is_tensor(v)]
        ok = torch.stack(flags).all() if flags else torch.tensor(True)
        if self.opt.get("dist") and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = ok.to(device=self.device if self.device.type == "cuda" else "cpu", dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = flag
        return bool(ok.item())

    def _skip_nonfinite_step(self, current_iter, loss_dict, what="loss"):
        """No step on this iteration: zero the gradients, log, stop after ``nan_tolerance`` in a row."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.log_dict = self.reduce_loss_dict(loss_dict)
        self.nonfinite_streak += 1
        terms = ", ".join(f"{k}={v}" for k, v in self.log_dict.items() if not math.isfinite(v)) or "on another rank"
        tolerance = self.nan_tolerance
        get_root_logger().warning(
            f"Iteration {current_iter}: non-finite {what} ({terms}): optimizer step skipped, gradients zeroed, "
            f"no EMA update ({self.nonfinite_streak} in a row; train.nan_tolerance: {tolerance}).")
        if tolerance is not None and self.nonfinite_streak >= tolerance:
            last = (f"the newest checkpoint is iteration {self.last_checkpoint_iter} (resume it with --auto_resume "
                    f"once the cause is fixed)" if self.last_checkpoint_iter is not None
                    else "no checkpoint was saved by this run")
            raise NonFiniteLossError(
                f"iteration {current_iter}: {self.nonfinite_streak} iterations in a row with a non-finite {what} "
                f"({terms}); training stopped (train.nan_tolerance: {tolerance}); nothing was saved from them, "
                f"{last}")

    # ------------------------------------------------ checkpoints, training state, resume
    def save(self, epoch, current_iter):
        """BasicSR's save, except while iterations with non-finite losses are being skipped: the
        newest checkpoint stays the last good one."""
        if current_iter != -1 and getattr(self, "nonfinite_streak", 0):
            get_root_logger().warning(
                f"Iteration {current_iter}: checkpoint not saved: the last {self.nonfinite_streak} iteration(s) had a "
                f"non-finite loss (newest checkpoint: iteration {self.last_checkpoint_iter}).")
            return
        super().save(epoch, current_iter)
        if current_iter != -1:
            self.last_checkpoint_iter = current_iter

    def _gather(self, obj):
        """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` outside a process group)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            out = [None] * dist.get_world_size()
            dist.all_gather_object(out, obj)
            return out
        return [obj]

    def training_state(self, epoch, current_iter) -> dict:
        """BasicSR's training state (epoch, iter, optimizers, schedulers) plus ``grad_scaler``
        (fp16) and ``exact_resume``: per rank, the RNG states and the position in the epoch.
        Called on every rank (the RNG states are gathered)."""
        state = {"epoch": epoch, "iter": current_iter,
                 "optimizers": [o.state_dict() for o in self.optimizers],
                 "schedulers": [s.state_dict() for s in self.schedulers]}
        if getattr(self, "scaler", None) is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        state["exact_resume"] = self._gather({"rng": get_rng_state(), "progress": training_progress()})
        return state

    def save_training_state(self, epoch, current_iter):
        """Write ``training_states/<iter>.state`` atomically (rank 0) with :meth:`training_state`."""
        if current_iter == -1:
            return
        state = self.training_state(epoch, current_iter)
        if self._rank_world()[0] == 0:
            save_checkpoint_file(state, osp.join(self.opt["path"]["training_states"], f"{current_iter}.state"),
                                 "training state")

    def resume_training(self, resume_state):
        """BasicSR's resume (optimizers, schedulers) plus the GradScaler, and the RNG states and
        position in the epoch for the train prefetcher (:func:`.exact_resume.resume_progress`)."""
        super().resume_training(resume_state)
        self.last_checkpoint_iter = resume_state.get("iter")
        if resume_state.get("grad_scaler") is not None and getattr(self, "scaler", None) is not None:
            self.scaler.load_state_dict(resume_state["grad_scaler"])
        logger = get_root_logger()
        entries = resume_state.get("exact_resume")
        rank, world = self._rank_world()
        if not entries:
            logger.info("The training state holds no RNG states or position in the epoch (written by BasicSR): "
                        "the epoch restarts from its first batch.")
            return
        if len(entries) != world:
            logger.warning(f"The training state was written by {len(entries)} process(es), this run has {world}: "
                           "RNG states not restored, the epoch restarts from its first batch.")
            return
        entry = entries[rank]
        if entry.get("progress") is None:
            logger.info("The training state holds no position in the epoch: the epoch restarts from its first batch.")
            return
        resume_progress(entry["progress"], entry.get("rng"))

    def validation(self, dataloader, current_iter, tb_logger, save_img=False):
        """BasicSR's validation, leaving the RNG states as it found them (creating the validation
        DataLoader iterator draws from torch's RNG): training randomness does not depend on when
        validation runs, and a resumed run draws what an uninterrupted one draws."""
        rng = get_rng_state()
        try:
            super().validation(dataloader, current_iter, tb_logger, save_img)
        finally:
            set_rng_state(rng)

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
        ensemble = _self_ensemble(val_opt.get("self_ensemble", False))

        def restore(x):
            return tiled_forward(net, x, tile.get("size"), tile.get("overlap", 0),
                                 scale=int(self.opt.get("scale", 1)), multiple=getattr(net, "pad_size", 1),
                                 blend=tile.get("blend", "linear"))

        with torch.no_grad(), self._autocast(dtype):
            # x8 self-ensemble: the helper grl-infer --ensemble uses (grl_plugin.tiling.self_ensemble)
            self.output = self_ensemble(restore, self.lq) if ensemble else restore(self.lq).float()
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
