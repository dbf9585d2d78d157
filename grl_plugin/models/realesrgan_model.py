"""Real-world SR training (GRL-B-BSR) on CPU or CUDA: Real-ESRGAN degradations + GRLModel extras.

* :class:`GRLRealESRNetModel` -- PSNR stage (official ``bsr/grl_psnr.yaml``): BasicSR's
  ``RealESRNetModel`` (second-order degradations synthesised from the GT on the model device,
  L1 against the USM-sharpened GT with ``gt_usm: true``).
* :class:`GRLRealESRGANModel` -- GAN stage (official ``bsr/grl.yaml``): BasicSR's
  ``RealESRGANModel`` (L1 + perceptual on the USM GT, vanilla GAN with a U-Net discriminator).

What they change in BasicSR's classes (``basicsr/models/realesr{gan,net}_model.py`` call
``.cuda()`` and so cannot run on CPU):

* ``DiffJPEG`` and ``USMSharp`` are built on ``self.device`` (BasicSR: ``.cuda()``); the JPEG
  output is made contiguous (:class:`ContiguousDiffJPEG`: on CPU BasicSR's ``filter2D`` fails on
  DiffJPEG's channels-last output for batches > 1);
* the training-pair pool (``queue_lr``/``queue_gt``) is allocated on ``self.device``
  (BasicSR: ``torch.zeros(...).cuda()``); the rest of BasicSR's ``feed_data`` is device-agnostic
  (``filter2D``, ``random_add_*_noise_pt``, ``paired_random_crop``, ``F.interpolate`` work on the
  tensors' device) and is reused unchanged;
* everything :class:`~grl_plugin.models.grl_model.GRLModel` adds: official ``.ckpt`` /
  ``.pth`` / ``.safetensors`` GRL weights in ``path.pretrain_network_g``; the discriminator
  (``path.pretrain_network_d``) loads BasicSR files as BasicSR does and the ``model_d.*`` part of
  an official GAN-stage ``.ckpt``; ``train.amp`` (bf16 on CPU/CUDA, fp16 on CUDA), ``train.grad_clip``
  (generator), ``train.activation_checkpointing``, ``train.compile``, tiled validation
  (``val.tile``) and distributed validation; the synthetic degradation is switched off during
  validation, as in BasicSR;
* robustness (see :mod:`grl_plugin.models.grl_model`): atomic checkpoints, exact resume (the
  training state also holds the training-pair pool ``queue_lr``/``queue_gt``, restored when the
  run has as many processes -- about ``queue_size`` x (LQ + GT patch) float32, e.g. 150 MB for 180
  GT patches of 256x256 -- because the pool is part of what the next batches are made of), and
  ``train.nan_tolerance``: in :class:`GRLRealESRGANModel` a non-finite generator *or*
  discriminator loss skips both optimizer steps and the EMA update.

Option keys read at the top level of the option file (BasicSR reads most of them with
``opt[...]``, i.e. they are required; values of BasicSR's ``train_realesrgan_x4plus.yml``)::

    model_type: GRLRealESRGANModel     # or GRLRealESRNetModel
    scale: 4
    high_order_degradation: true       # false: paired data (lq/gt from the dataset)
    gt_usm: true                       # RealESRNet: L1 against the USM-sharpened GT (default true here)
    l1_gt_usm: true                    # RealESRGAN (optional here, default true)
    percep_gt_usm: true                # RealESRGAN (optional here, default true)
    gan_gt_usm: false                  # RealESRGAN (optional here, default false in GRL/Real-ESRGAN)
    resize_prob: [0.2, 0.7, 0.1]       # up, down, keep
    resize_range: [0.15, 1.5]
    gaussian_noise_prob: 0.5
    noise_range: [1, 30]
    poisson_scale_range: [0.05, 3]
    gray_noise_prob: 0.4
    jpeg_range: [30, 95]
    second_blur_prob: 0.8
    resize_prob2: [0.3, 0.4, 0.3]
    resize_range2: [0.3, 1.2]
    gaussian_noise_prob2: 0.5
    noise_range2: [1, 25]
    poisson_scale_range2: [0.05, 2.5]
    gray_noise_prob2: 0.4
    jpeg_range2: [30, 95]
    gt_size: 256                       # GT crop after the degradation; <= 400 (see below)
    queue_size: 180                    # multiple of the batch size per GPU

The dataset is BasicSR's ``RealESRGANDataset`` (kernels made on the CPU workers); it crops or
pads every GT to 400x400 (hard-coded in BasicSR 1.4.2), so ``gt_size`` must be at most 400 (the
official GRL LR patch 128 = GT 512 is not possible with it). Note: these are Real-ESRGAN's
degradations; the official GRL BSR data module uses BSRGAN-style ``degradation_sr2`` in the
dataset, which is not what runs here. GAN-stage
losses: ``pixel_opt: {type: L1Loss, loss_weight: 1}``, ``perceptual_opt: {type:
GRLPerceptualLoss, vgg_weights: <vgg19-dcbb9e9d.pth>, ...}``, ``gan_opt: {type: GANLoss,
gan_type: vanilla, real_label_val: 1.0, fake_label_val: 0.0, loss_weight: 0.1}``,
``network_d: {type: UNetDiscriminatorSN, num_in_ch: 3, num_feat: 64, skip_connection: true}``,
``train.optim_d``.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from basicsr.losses.loss_util import get_refined_artifact_map
from basicsr.models.realesrgan_model import RealESRGANModel
from basicsr.models.realesrnet_model import RealESRNetModel
from basicsr.models.sr_model import SRModel
from basicsr.utils import DiffJPEG, USMSharp, get_root_logger

from ..archs.grl_arch import GRL
from .grl_model import GRLModel


def official_discriminator_state_dict(path):
    """``model_d.*`` tensors (prefix stripped) of an official GRL GAN-stage Lightning checkpoint."""
    from ..archs.checkpoint import CheckpointError, _torch_load
    try:
        obj = _torch_load(Path(path), False, 'cpu')
    except CheckpointError as err:
        raise CheckpointError(f'{path}: {err}') from None
    sd = obj.get('state_dict', obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f'{path}: not a Lightning checkpoint (no state_dict)')
    out = OrderedDict((k[len('model_d.'):], v) for k, v in sd.items() if k.startswith('model_d.'))
    if not out:
        raise CheckpointError(f'{path}: no discriminator weights (model_d.*) in this checkpoint; '
                              'only the GAN-stage checkpoints (bsr_grl_base.ckpt) have them')
    return out


class ContiguousDiffJPEG(DiffJPEG):
    """BasicSR's ``DiffJPEG`` returning a contiguous tensor.

    ``DiffJPEG`` returns a channels-last strided view. On CPU, ``F.pad(mode='reflect')`` keeps
    that layout and ``basicsr.utils.img_process_util.filter2D`` (used right after the JPEG step)
    then fails in ``.view(1, b * c, h, w)`` for batches > 1; on CUDA the padding returns a
    contiguous tensor, which is why BasicSR never hit this.
    """

    def forward(self, x, quality):
        return super().forward(x, quality).contiguous()


class _DeviceDegradationMixin:
    """Device-aware replacements of the ``.cuda()`` parts of BasicSR's Real-ESR models."""

    def _init_degradation(self, opt):
        self.jpeger = ContiguousDiffJPEG(differentiable=False).to(self.device)  # JPEG artefacts
        self.usm_sharpener = USMSharp().to(self.device)  # USM sharpening
        self.queue_size = opt.get('queue_size', 180)

    @torch.no_grad()
    def _dequeue_and_enqueue(self):
        # Allocate the pool on the model device; BasicSR's method then finds it and only
        # shuffles / swaps (device-agnostic) -- it would allocate it with .cuda() otherwise.
        if not hasattr(self, 'queue_lr'):
            b, c, h, w = self.lq.size()
            assert self.queue_size % b == 0, f'queue size {self.queue_size} should be divisible by batch size {b}'
            self.queue_lr = torch.zeros(self.queue_size, c, h, w, dtype=self.lq.dtype, device=self.device)
            _, c, h, w = self.gt.size()
            self.queue_gt = torch.zeros(self.queue_size, c, h, w, dtype=self.gt.dtype, device=self.device)
            self.queue_ptr = 0
        self._basicsr_model_class._dequeue_and_enqueue(self)

    # the training-pair pool is part of the training state (exact resume)
    def training_state(self, epoch, current_iter):
        state = super().training_state(epoch, current_iter)
        if hasattr(self, 'queue_lr') and self._rank_world()[1] == 1:
            state['degradation_queue'] = {'lq': self.queue_lr.cpu(), 'gt': self.queue_gt.cpu(),
                                          'ptr': int(self.queue_ptr)}
        return state

    def resume_training(self, resume_state):
        super().resume_training(resume_state)
        queue = resume_state.get('degradation_queue')
        if queue is not None and self._rank_world()[1] == 1:
            self.queue_lr = queue['lq'].to(self.device)
            self.queue_gt = queue['gt'].to(self.device)
            self.queue_ptr = int(queue['ptr'])

    # no synthetic degradation during validation (BasicSR does this in nondist_validation only)
    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        was_train, self.is_train = self.is_train, False
        try:
            super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
        finally:
            self.is_train = was_train

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        was_train, self.is_train = self.is_train, False
        try:
            super().dist_validation(dataloader, current_iter, tb_logger, save_img)
        finally:
            self.is_train = was_train


class GRLRealESRNetModel(_DeviceDegradationMixin, GRLModel, RealESRNetModel):
    """BasicSR's ``RealESRNetModel`` on any device, with GRLModel's extras (PSNR stage).

    MRO: mixin -> GRLModel (loading, AMP, clipping, tiled/distributed validation,
    ``optimize_parameters``) -> RealESRNetModel (``feed_data``) -> SRModel.
    """

    _basicsr_model_class = RealESRNetModel

    def __init__(self, opt):
        opt.setdefault('gt_usm', True)  # BasicSR reads opt['gt_usm']; official GRL: L1 vs USM GT
        SRModel.__init__(self, opt)  # skip RealESRNetModel.__init__ (it calls .cuda())
        self._init_degradation(opt)


class GRLRealESRGANModel(_DeviceDegradationMixin, GRLModel, RealESRGANModel):
    """BasicSR's ``RealESRGANModel`` on any device, with GRLModel's extras (GAN stage).

    ``optimize_parameters`` is BasicSR's RealESRGANModel step plus ``train.amp`` (autocast of
    the generator and discriminator forwards; losses in float32; fp16 uses one GradScaler for
    both optimizers) and ``train.grad_clip`` (generator gradient norm; ``train.grad_clip_d``
    for the discriminator). ``l1_gt_usm`` / ``percep_gt_usm`` default to true and
    ``gan_gt_usm`` to false when absent.
    """

    _basicsr_model_class = RealESRGANModel

    def __init__(self, opt):
        SRModel.__init__(self, opt)  # skip RealESRGANModel.__init__ (it calls .cuda())
        self._init_degradation(opt)

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """GRL generator: any format GRLModel reads. Discriminator: BasicSR files as BasicSR
        loads them, and the ``model_d.*`` weights of an official GAN-stage Lightning ``.ckpt``
        (e.g. the released ``bsr_grl_base.ckpt``) when the file name ends in ``.ckpt``."""
        bare = self.get_bare_model(net)
        if isinstance(bare, GRL) or Path(str(load_path)).suffix != '.ckpt':
            return super().load_network(net, load_path, strict, param_key)
        state_dict = official_discriminator_state_dict(load_path)
        get_root_logger().info(f'Loading {bare.__class__.__name__} weights (model_d.*) from {load_path}.')
        self._print_different_keys_loading(net, state_dict, strict)
        bare.load_state_dict(state_dict, strict=strict)

    def init_training_settings(self):
        super().init_training_settings()  # GRLModel (amp, grad_clip) -> SRGANModel (net_d, losses)
        self.grad_clip_d = self.opt['train'].get('grad_clip_d')

    def _backward(self, loss):
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _unscale_and_clip(self, optimizer, params, max_norm, loss_dict, key):
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if max_norm:
            loss_dict[key] = torch.nn.utils.clip_grad_norm_(params, float(max_norm)).detach()
            return loss_dict[key]
        return None

    def _step(self, optimizer):
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def optimize_parameters(self, current_iter):
        """BasicSR's step (same computations in the same order), except that the generator's
        optimizer step waits until the discriminator's losses are known: when any loss is
        non-finite neither network is updated (see ``train.nan_tolerance``)."""
        opt = self.opt
        l1_gt = self.gt_usm if opt.get('l1_gt_usm', True) is not False else self.gt
        percep_gt = self.gt_usm if opt.get('percep_gt_usm', True) is not False else self.gt
        gan_gt = self.gt_usm if opt.get('gan_gt_usm', False) is not False else self.gt

        # ------------------------------------------------------------------ generator
        for p in self.net_d.parameters():
            p.requires_grad = False
        self.optimizer_g.zero_grad(set_to_none=True)
        with self._autocast(self.amp_dtype):
            self.output = self.net_g(self.lq)
            if self.cri_ldl:
                with torch.no_grad():
                    self.output_ema = self.net_g_ema(self.lq)
        output = self.output.float()

        l_g_total = 0
        loss_dict = OrderedDict()
        step_g = current_iter % self.net_d_iters == 0 and current_iter > self.net_d_init_iters
        if step_g:
            if self.cri_pix:
                l_g_pix = self.cri_pix(output, l1_gt)
                l_g_total += l_g_pix
                loss_dict['l_g_pix'] = l_g_pix
            if self.cri_ldl:
                pixel_weight = get_refined_artifact_map(self.gt, output, self.output_ema.float(), 7)
                l_g_ldl = self.cri_ldl(torch.mul(pixel_weight, output), torch.mul(pixel_weight, self.gt))
                l_g_total += l_g_ldl
                loss_dict['l_g_ldl'] = l_g_ldl
            if self.cri_perceptual:
                l_g_percep, l_g_style = self.cri_perceptual(output, percep_gt)
                if l_g_percep is not None:
                    l_g_total += l_g_percep
                    loss_dict['l_g_percep'] = l_g_percep
                if l_g_style is not None:
                    l_g_total += l_g_style
                    loss_dict['l_g_style'] = l_g_style
            with self._autocast(self.amp_dtype):
                fake_g_pred = self.net_d(self.output)
            l_g_gan = self.cri_gan(fake_g_pred.float(), True, is_disc=False)
            l_g_total += l_g_gan
            loss_dict['l_g_gan'] = l_g_gan

            self._backward(l_g_total)  # the step comes after the discriminator's losses

        # -------------------------------------------------------------- discriminator
        for p in self.net_d.parameters():
            p.requires_grad = True
        self.optimizer_d.zero_grad(set_to_none=True)
        with self._autocast(self.amp_dtype):
            real_d_pred = self.net_d(gan_gt)
        l_d_real = self.cri_gan(real_d_pred.float(), True, is_disc=True)
        loss_dict['l_d_real'] = l_d_real
        loss_dict['out_d_real'] = torch.mean(real_d_pred.detach().float())
        self._backward(l_d_real)
        with self._autocast(self.amp_dtype):
            fake_d_pred = self.net_d(self.output.detach().clone())
        l_d_fake = self.cri_gan(fake_d_pred.float(), False, is_disc=True)
        loss_dict['l_d_fake'] = l_d_fake
        loss_dict['out_d_fake'] = torch.mean(fake_d_pred.detach().float())
        self._backward(l_d_fake)

        # ------------------------------------------------------------------ steps
        if not self._all_finite([l_g_total, *loss_dict.values()]):
            return self._skip_nonfinite_step(current_iter, loss_dict)
        norms = []
        if step_g:
            norms.append(self._unscale_and_clip(self.optimizer_g, self.net_g.parameters(), self.grad_clip,
                                                loss_dict, 'grad_norm'))
        norms.append(self._unscale_and_clip(self.optimizer_d, self.net_d.parameters(), self.grad_clip_d,
                                            loss_dict, 'grad_norm_d'))
        # fp16: GradScaler skips steps with inf/NaN gradients itself (and lowers its scale)
        if self.scaler is None and not self._all_finite(norms):
            return self._skip_nonfinite_step(current_iter, loss_dict, 'gradient norm')
        if step_g:
            self._step(self.optimizer_g)
        self._step(self.optimizer_d)
        if self.scaler is not None:
            self.scaler.update()

        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)
        self.log_dict = self.reduce_loss_dict(loss_dict)
        self.nonfinite_streak = 0
