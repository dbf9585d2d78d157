#!/usr/bin/env python3
"""Write the GRL option files under ``options/train/`` and ``options/test/``.

The released GRL models come in many near-identical configurations (3 sizes x 3 SR scales,
3 sizes x 2 colour modes x 3 noise levels, 2 colour modes x 4 JPEG qualities, ...), so the YAMLs
are generated from the tables below -- the official values (the official config
files: ``config/experiment/**`` + ``config/model/grl/**``) and the released checkpoint names --
and committed. Edit this script, not the YAMLs, and re-run it::

    python options/generate.py            # (re)write every file
    python options/generate.py --check    # exit status 1 if a committed file differs (tests do this)

Plain Python, no third-party imports: the output is YAML text with comments.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

OPTIONS_DIR = Path(__file__).resolve().parent
RELEASE = 'https://github.com/ofsoundof/GRL-Image-Restoration/releases/tag/v1.0.0'
PRETRAINED = 'experiments/pretrained_models'

# ----------------------------------------------------------------------------------- YAML text
_SECTION = object()
_AMBIGUOUS = {'y', 'n', 'yes', 'no', 'on', 'off', 'true', 'false', 'null', '~'}
COMMENT_COL = 32


def fmt(value) -> str:
    """A YAML flow representation of ``value``."""
    if value is None:
        return '~'
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-2:
            mantissa, exponent = f'{value:e}'.split('e')
            return f'!!float {mantissa.rstrip("0").rstrip(".")}e{int(exponent)}'
        return repr(value)
    if isinstance(value, str):
        if re.fullmatch(r'[A-Za-z_][\w./+-]*', value) and value.lower() not in _AMBIGUOUS:
            return value
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(fmt(v) for v in value) + ']'
    if isinstance(value, dict):
        return '{' + ', '.join(f'{k}: {fmt(v)}' for k, v in value.items()) + '}'
    raise TypeError(f'cannot format {value!r}')


class Doc:
    """Lines of a commented YAML file."""

    def __init__(self):
        self.lines: List[str] = []

    def comment(self, text: str, ind: int = 0) -> 'Doc':
        for line in text.strip('\n').split('\n'):
            self.lines.append(' ' * ind + ('# ' + line if line else '#').rstrip())
        return self

    def blank(self) -> 'Doc':
        self.lines.append('')
        return self

    def kv(self, ind: int, key: str, value=_SECTION, comment: Optional[str] = None) -> 'Doc':
        line = ' ' * ind + f'{key}:' + ('' if value is _SECTION else ' ' + fmt(value))
        if comment:
            line = line.ljust(COMMENT_COL - 1) + ' # ' + comment
        self.lines.append(line)
        return self

    def raw(self, text: str, ind: int = 0) -> 'Doc':
        for line in text.strip('\n').split('\n'):
            self.lines.append((' ' * ind + line).rstrip())
        return self

    def text(self) -> str:
        return '\n'.join(self.lines).rstrip() + '\n'


# ----------------------------------------------------------------------------- model tables
SIZES = {  # official model YAMLs config/model/grl/grl_{tiny,small,base}.yaml
    'T': dict(long='tiny', title='GRL-T', embed_dim=64, depths=[4, 4, 4, 4], heads=2, local=False,
              sr_upsampler='pixelshuffledirect'),
    'S': dict(long='small', title='GRL-S', embed_dim=128, depths=[4, 4, 4, 4], heads=2, local=False,
              sr_upsampler='pixelshuffle'),
    'B': dict(long='base', title='GRL-B', embed_dim=180, depths=[4, 4, 8, 8, 8, 4, 4], heads=3, local=True,
              sr_upsampler='pixelshuffle'),
}
UPSAMPLER_NOTE = {
    'pixelshuffledirect': 'GRL-T head: one conv + pixel shuffle',
    'pixelshuffle': 'conv + LeakyReLU, conv + pixel shuffle, conv',
    'nearest+conv': 'Real-ESRGAN-style head: 2x (nearest x2 + conv)',
    '': 'no upsampling: output = input + conv_last(features)',
}


def pad_size(window: int, stripes) -> int:
    return max([window] + [s for s in stripes if s])


def network(d: Doc, size: str, *, upscale: int, upsampler: str, in_ch: int, window: int, stripes,
            df: int, geometry_note: str, out_ch: Optional[int] = None, checkpointing: bool = False,
            source: str = '', key: str = 'network_g') -> None:
    s = SIZES[size]
    d.kv(0, key)
    d.kv(2, 'type', 'GRL', f'{s["title"]}, explicit official kwargs{" (" + source + ")" if source else ""}')
    d.kv(2, 'upscale', upscale, 'restoration: output size = input size' if upscale == 1 else None)
    d.kv(2, 'upsampler', upsampler, UPSAMPLER_NOTE[upsampler])
    d.kv(2, 'in_channels', in_ch, {1: 'grayscale', 3: 'RGB', 6: 'left + right dual-pixel views (RGB each)'}[in_ch])
    if out_ch is not None:
        d.kv(2, 'out_channels', out_ch, 'the all-in-focus RGB image (no global residual: in != out)')
    d.kv(2, 'img_range', 1.0)
    d.kv(2, 'embed_dim', s['embed_dim'])
    d.kv(2, 'depths', s['depths'])
    d.kv(2, 'num_heads_window', [s['heads']] * len(s['depths']))
    d.kv(2, 'num_heads_stripe', [s['heads']] * len(s['depths']))
    d.kv(2, 'mlp_ratio', 2)
    d.kv(2, 'local_connection', s['local'], 'the channel-attention conv branch (base models)')
    d.kv(2, 'window_size', window, geometry_note)
    d.kv(2, 'stripe_size', list(stripes), 'anchored stripe attention: [height, width] of a stripe')
    d.kv(2, 'stripe_groups', [None, None])
    d.kv(2, 'stripe_shift', True)
    d.kv(2, 'anchor_window_down_factor', df,
         f'inputs are padded to a multiple of {pad_size(window, stripes)}')
    d.kv(2, 'qkv_proj_type', 'linear')
    d.kv(2, 'anchor_proj_type', 'avgpool')
    d.kv(2, 'anchor_one_stage', True)
    d.kv(2, 'out_proj_type', 'linear')
    d.kv(2, 'conv_type', '1conv')
    d.kv(2, 'init_method', 'n')
    d.kv(2, 'drop_path_rate', 0.1, 'class default, in effect in every official run')
    d.kv(2, 'fairscale_checkpoint', checkpointing,
         'recompute blocks in backward (official BSR PSNR stage)' if checkpointing else
         'true: recompute blocks in backward (less memory)')
    d.comment('Official keys without effect (img_size, name, use_buffer, ...) are left out. Window and\n'
              'stripe sizes do not change any weight shape: a checkpoint runs with any geometry, but\n'
              'outputs change, so keep the geometry a model was trained (or released) with.', 2)


def disc(d: Doc, num_feat: int = 64) -> None:
    d.kv(0, 'network_d')
    d.kv(2, 'type', 'UNetDiscriminatorSN', 'U-Net discriminator with spectral norm (Real-ESRGAN)')
    d.comment('(BasicSR registers it as UNetDiscriminatorSN_basicsr and prints a notice when it\n'
              'resolves this name; either name works)', 2)
    d.kv(2, 'num_in_ch', 3)
    d.kv(2, 'num_feat', num_feat)
    d.kv(2, 'skip_connection', True)


# --------------------------------------------------------------------------- common blocks
def header(d: Doc, lines: str, rel: str, train: bool) -> None:
    path = f'options/{rel}'
    d.comment(lines)
    d.comment('')
    if train:
        d.comment(f'  grl-train -opt {path}                  # 1 GPU (or CPU)\n'
                  f'  torchrun --nproc_per_node=8 -m grl_plugin.train -opt {path} --launcher pytorch\n'
                  f'  grl-train -opt {path} --dry-run        # check: build model + data, no training')
    else:
        d.comment(f'  grl-test -opt {path}')
    d.comment('')
    d.comment('Generated by options/generate.py: edit that script and re-run it (tests check that the\n'
              'committed files are in sync). Relative paths are relative to the current directory;\n'
              'experiments/, results/ and tb_logger/ go under --root (default: the current directory).')
    d.blank()


def general(d: Doc, name: str, model_type: str, scale: int, note: str = '') -> None:
    d.kv(0, 'name', name, 'results/<name>/' if name.startswith('test_') else 'run folder: experiments/<name>/')
    d.kv(0, 'model_type', model_type, note or 'BasicSR SRModel + tiled validation, AMP, grad clip, .ckpt loading')
    d.kv(0, 'scale', scale)
    d.kv(0, 'num_gpu', 'auto', 'all visible CUDA devices (0 = CPU); torchrun: one per process')
    d.kv(0, 'manual_seed', 1234, 'official seed')
    d.blank()


def io_lmdb(d: Doc, ind: int, roots: Dict[str, str], folders: Dict[str, str], meta: Optional[str],
            extra_folder: Optional[Dict[str, str]] = None, meta_key: str = 'meta_info_file',
            meta_note: str = 'optional: one GT file name per line') -> None:
    """LMDB roots (active) + the folder variant (commented)."""
    for k, v in roots.items():
        d.kv(ind, k, v)
    d.kv(ind, 'io_backend')
    d.kv(ind + 2, 'type', 'lmdb', 'made with basicsr.utils.lmdb_util (meta_info.txt inside)')
    d.comment('Folder variant (the same images as PNG files), instead of the lines above:', ind)
    for k, v in folders.items():
        d.comment(f'{k}: {v}', ind)
    if meta:
        d.comment(f'{meta_key}: {meta}  # {meta_note}', ind)
    for k, v in (extra_folder or {}).items():
        d.comment(f'{k}: {v}', ind)
    d.comment('io_backend:\n  type: disk', ind)


def loader(d: Doc, batch: int, gpus: int = 8, workers: int = 2, enlarge: int = 1, note: str = '') -> None:
    total = batch * gpus
    per_gpu = ', '.join(f'{total // n} on {n}' for n in (1, 2, 4, 8) if total % n == 0)
    d.comment(f'Data loader. Official run: {gpus} GPUs x {batch} = {total} patches per iteration. To reproduce it\n'
              f'keep batch_size_per_gpu x number of GPUs = {total} (batch_size_per_gpu {per_gpu} GPUs);\n'
              'with fewer patches per iteration (memory) keep the schedule; results drop slightly.'
              + (('\n' + note) if note else ''), 4)
    d.kv(4, 'use_shuffle', True)
    d.kv(4, 'num_worker_per_gpu', workers, 'official: 2 workers; more if data loading is the bottleneck')
    d.kv(4, 'batch_size_per_gpu', batch)
    d.kv(4, 'dataset_enlarge_ratio', enlarge, 'iterations, not epochs, count; >1 = fewer epoch restarts'
         if enlarge > 1 else None)
    d.kv(4, 'prefetch_mode', None)


def paths_train(d: Doc, pretrain: Optional[str] = None, note: Optional[str] = None, d_net: bool = False) -> None:
    d.kv(0, 'path')
    d.kv(2, 'pretrain_network_g', pretrain, note or ('from scratch (official); see finetune_*.yml'
                                                    if pretrain is None else None))
    if pretrain is not None:
        d.kv(2, 'param_key_g', 'params', 'BasicSR .pth key; official .ckpt files are recognised')
    d.kv(2, 'strict_load_g', True)
    if d_net:
        d.kv(2, 'pretrain_network_d', None, 'no discriminator is released: trained from scratch')
        d.kv(2, 'strict_load_d', True)
    d.kv(2, 'resume_state', None, 'or: grl-train ... --auto_resume')
    d.blank()


def optimizer(d: Doc, key: str, kind: str, lr: float, wd: float, betas) -> None:
    d.kv(2, key)
    d.kv(4, 'type', kind, 'AdamW: any torch.optim class works with GRLModel' if kind == 'AdamW' else None)
    d.kv(4, 'lr', lr)
    d.kv(4, 'weight_decay', wd)
    d.kv(4, 'betas', list(betas), 'torch defaults (the official config sets none)'
         if list(betas) == [0.9, 0.999] else None)


def schedule(d: Doc, milestones, total: int, warmup: int = -1, warmup_note: Optional[str] = None,
             milestone_note: Optional[str] = None) -> None:
    d.kv(2, 'scheduler')
    d.kv(4, 'type', 'MultiStepLR', 'stepped every iteration, as the official scheduler')
    d.kv(4, 'milestones', list(milestones), milestone_note)
    d.kv(4, 'gamma', 0.5)
    d.kv(2, 'total_iter', total)
    d.kv(2, 'warmup_iter', warmup, warmup_note or ('no warm-up' if warmup < 0 else None))


def extras(d: Doc, base: bool) -> None:
    d.comment('GRLModel extras, off in the official runs:', 2)
    d.comment('amp: bf16                       # mixed precision (bf16; fp16 adds a GradScaler)', 2)
    d.comment('grad_clip: 0.5                  # max global gradient norm', 2)
    d.comment('lean_backward: true             # keep less for the backward without checkpointing (recompute\n'
              '                                # all attention probabilities), a little slower', 2)
    if base:
        d.comment('activation_checkpointing: true  # recompute blocks in backward: far less memory for\n'
                  '                                # GRL-B at the official patch size, ~30% slower', 2)
    else:
        d.comment('activation_checkpointing: true  # recompute blocks in backward: less memory, slower', 2)


def l1(d: Doc, note: Optional[str] = None) -> None:
    d.kv(2, 'pixel_opt', comment=note)
    d.kv(4, 'type', 'L1Loss')
    d.kv(4, 'loss_weight', 1.0)
    d.kv(4, 'reduction', 'mean')


def charbonnier(d: Doc) -> None:
    d.kv(2, 'pixel_opt')
    d.kv(4, 'type', 'GRLCharbonnierLoss', 'mean(sqrt(diff^2 + eps^2)), the official Charbonnier')
    d.kv(4, 'eps', 1e-3)
    d.kv(4, 'loss_weight', 1.0)
    d.kv(4, 'reduction', 'mean')


def tile_block(d: Doc, ind: int, size: int, overlap: int, note: str) -> None:
    d.kv(ind, 'tile', comment=note)
    d.kv(ind + 2, 'size', size, '0: the whole image at once' if size == 0 else 'input pixels per tile')
    d.kv(ind + 2, 'overlap', overlap)
    d.kv(ind + 2, 'blend', 'uniform', 'plain average of overlapping tiles (official); linear: no seams')


def metrics(d: Doc, ind: int, entries) -> None:
    """entries: (key, type, crop_border, test_y_channel, comment)."""
    d.kv(ind, 'metrics')
    for key, kind, crop, y, note in entries:
        d.kv(ind + 2, key, comment=note)
        d.kv(ind + 4, 'type', kind)
        if crop is not None:
            d.kv(ind + 4, 'crop_border', crop)
        if y is not None:
            d.kv(ind + 4, 'test_y_channel', y)
        if kind == 'calculate_niqe':
            d.kv(ind + 4, 'better', 'lower')


def val_train(d: Doc, tile, entries, note: str = '') -> None:
    d.kv(0, 'val')
    d.kv(2, 'val_freq', 5000, 'official: validation every 5k iterations')
    d.kv(2, 'save_img', False)
    if tile is not None:
        tile_block(d, 2, tile[0], tile[1], tile[2])
    metrics(d, 2, entries)
    if note:
        d.comment(note, 2)
    d.blank()


def val_test(d: Doc, tile, entries, suffix: Optional[str] = None, note: str = '') -> None:
    d.kv(0, 'val')
    d.kv(2, 'save_img', True, 'results/<name>/visualization/<dataset>/')
    d.kv(2, 'suffix', suffix, 'file name suffix (~: the run name)')
    tile_block(d, 2, tile[0], tile[1], tile[2])
    if entries:
        metrics(d, 2, entries)
    if note:
        d.comment(note, 2)


def logger_dist(d: Doc) -> None:
    d.kv(0, 'logger')
    d.kv(2, 'print_freq', 100)
    d.kv(2, 'save_checkpoint_freq', 5000)
    d.kv(2, 'use_tb_logger', True)
    d.kv(2, 'wandb')
    d.kv(4, 'project', None, 'a project name turns on wandb (pip install wandb)')
    d.kv(4, 'resume_id', None)
    d.blank()
    d.kv(0, 'dist_params', comment='used by --launcher slurm')
    d.kv(2, 'backend', 'nccl')
    d.kv(2, 'port', 29500)


def test_path(d: Doc, ckpt: str) -> None:
    d.kv(0, 'path')
    d.kv(2, 'pretrain_network_g', f'{PRETRAINED}/{ckpt}', 'released official checkpoint (see header)')
    d.kv(2, 'param_key_g', 'params', 'only read for BasicSR .pth files; official .ckpt: ignored')
    d.kv(2, 'strict_load_g', True)
    d.blank()


def download_note(ckpt: str) -> str:
    return (f'Weights: {ckpt} from the GRL release ({RELEASE})\n'
            f'into {PRETRAINED}/ (GRLModel loads official Lightning .ckpt files directly).')


def finetune_train(d: Doc, ckpt: str, why: str) -> None:
    """The ``path`` block of a fine-tune file."""
    d.kv(0, 'path')
    d.kv(2, 'pretrain_network_g', f'{PRETRAINED}/{ckpt}', 'the released official checkpoint')
    d.kv(2, 'param_key_g', 'params', 'BasicSR .pth key; official .ckpt files are recognised')
    d.kv(2, 'strict_load_g', True, 'network_g must have the released model\'s shapes')
    d.kv(2, 'resume_state', None)
    d.comment(why, 2)
    d.blank()


def train_sections(d: Doc, rel: str, finetune: bool, ckpt: str, *, lr: float, ft_lr: float, scratch: tuple,
                   fine: tuple, loss, base: bool, tile, entries, val_note: str = '',
                   why: str = 'Geometry above = the released model\'s.') -> None:
    """Everything after ``network_g`` in a train file (path, train, val, logger), then write it.

    ``scratch`` / ``fine``: ``(args, kwargs)`` of :func:`schedule` for training from scratch and
    for fine-tuning the released checkpoint ``ckpt``.
    """
    if finetune:
        finetune_train(d, ckpt, why)
    else:
        paths_train(d)
    d.kv(0, 'train')
    d.kv(2, 'ema_decay', 0, 'the official runs keep no EMA copy')
    optimizer(d, 'optim_g', 'AdamW', ft_lr if finetune else lr, 1e-4, [0.9, 0.999])
    args, kwargs = fine if finetune else scratch
    schedule(d, *args, **kwargs)
    loss(d)
    extras(d, base)
    d.blank()
    val_train(d, tile, entries, note=val_note)
    logger_dist(d)
    emit(rel, d)


def rgb_metrics(y_too: bool, crop: int = 0, official_ssim: bool = False):
    out = [('psnr', 'calculate_psnr', crop, False, 'RGB PSNR (the number reported in the paper)'),
           ('ssim', 'calculate_ssim', crop, False, "BasicSR's SSIM (MATLAB-style, valid region)")]
    if official_ssim:
        out.append(('ssim_grl', 'calculate_ssim_grl', crop, False, 'official GRL SSIM (zero-padded window)'))
    if y_too:
        out += [('psnr_y', 'calculate_psnr', crop, True, 'Y channel (logged by the official code too)'),
                ('ssim_y', 'calculate_ssim', crop, True, None)]
    return out


def gray_metrics(official_ssim: bool = False):
    out = [('psnr', 'calculate_psnr', 0, False, 'grayscale PSNR (reported in the paper)'),
           ('ssim', 'calculate_ssim', 0, False, "BasicSR's SSIM (MATLAB-style, valid region)")]
    if official_ssim:
        out.append(('ssim_grl', 'calculate_ssim_grl', 0, False, 'official GRL SSIM (zero-padded window)'))
    return out


FILES: Dict[str, str] = {}


def emit(rel: str, d: Doc) -> None:
    if rel in FILES:
        raise RuntimeError(f'{rel} generated twice')
    FILES[rel] = d.text()


# ------------------------------------------------------------------------------------- SR
SR_TEST_SETS = [('Set5', 'datasets/Set5'), ('Set14', 'datasets/Set14'), ('BSD100', 'datasets/BSD100'),
                ('Urban100', 'datasets/Urban100'), ('Manga109', 'datasets/Manga109')]
SR = dict(window=32, stripes=[64, 64], df=4, lr=1e-4, milestones=[100000, 150000, 175000, 200000],
          total=225000, patch=256)


def sr_train_file(size: str, scale: int, finetune: bool = False) -> None:
    s = SIZES[size]
    stem = f'{"finetune" if finetune else "train"}_GRL_{size}_SRx{scale}'
    rel = f'train/sr/{stem}.yml'
    ckpt = f'sr_grl_{s["long"]}_c3x{scale}.ckpt'
    d = Doc()
    if finetune:
        header(d, f'{s["title"]}, classical super-resolution x{scale}: FINE-TUNING the released {ckpt}\n'
                  'on your own paired LR/HR data (here DF2K as a placeholder), with a lower learning rate\n'
                  f'and a short schedule. The full recipe from scratch is train_GRL_{size}_SRx{scale}.yml.\n'
                  + download_note(ckpt), rel, True)
    else:
        header(d, f'{s["title"]}, classical image super-resolution x{scale} (bicubic LR), from scratch on DF2K\n'
                  '(DIV2K 800 + Flickr2K 2650 training images): the official recipe of the released\n'
                  f'{ckpt} (official config: experiment sr/grl/grl_p256.yaml, model grl/grl_{s["long"]}.yaml;\n'
                  f'the experiment file sets scale 4, the released x2/x3 models use the same recipe).\n'
                  'Official run: 8 GPUs x 1 patch, AdamW lr 1e-4 / weight decay 1e-4, L1 loss, 225k iterations.',
               rel, True)
    general(d, stem.replace('train_', ''), 'GRLModel', scale)
    d.kv(0, 'datasets')
    d.kv(2, 'train')
    d.kv(4, 'name', 'DF2K')
    d.kv(4, 'type', 'PairedImageDataset', 'LR images read from disk (MATLAB-bicubic, pre-generated)')
    io_lmdb(d, 4, {'dataroot_gt': 'datasets/DF2K/DF2K_HR.lmdb',
                   'dataroot_lq': f'datasets/DF2K/DF2K_LR_bicubic_X{scale}.lmdb'},
            {'dataroot_gt': 'datasets/DF2K/DF2K_HR', 'dataroot_lq': f'datasets/DF2K/DF2K_LR_bicubic/X{scale}'},
            'datasets/DF2K/meta_info_DF2K.txt',
            {'filename_tmpl': f"'{{}}x{scale}'  # LR file = GT file name + x{scale} (DIV2K naming)"})
    gt = SR['patch'] * scale
    d.kv(4, 'gt_size', gt, f'HR patch = official LR patch {SR["patch"]} x {scale}')
    d.comment(f'The official patch_size 256 is the LR patch. BasicSR 480x480 sub-images are too small for\n'
              f'it: build the LMDBs from whole images (or sub-images >= {gt} px). Smaller patches (e.g.\n'
              f'gt_size {64 * scale}) train much faster but do not reproduce the released models.', 4)
    d.kv(4, 'use_hflip', True, '+ rotations: the 8 flips/transposes, as the official loader')
    d.kv(4, 'use_rot', True)
    loader(d, 1, enlarge=100)
    d.kv(2, 'val')
    d.kv(4, 'name', 'Set5', 'official: Set5, Set14, B100, Urban100, Manga109, DIV2K val')
    d.kv(4, 'type', 'PairedImageDataset')
    d.kv(4, 'dataroot_gt', 'datasets/Set5/GTmod12')
    d.kv(4, 'dataroot_lq', f'datasets/Set5/LRbicx{scale}')
    d.kv(4, 'io_backend')
    d.kv(6, 'type', 'disk')
    d.blank()
    network(d, size, upscale=scale, upsampler=s['sr_upsampler'], in_ch=3, window=SR['window'],
            stripes=SR['stripes'], df=SR['df'], geometry_note='SR experiment geometry (model YAML: window 8)',
            source=f'official experiment {s["long"]}@sr' if size != 'B' else 'SR experiment overrides')
    if size == 'B':
        d.comment('The released base SR models were evaluated with anchor_window_down_factor 2 (official\n'
                  'test commands), presumably fine-tuned with it; the experiment file trains with 4.', 2)
    d.blank()
    train_sections(d, rel, finetune, ckpt, lr=SR['lr'], ft_lr=2e-5,
                   scratch=((SR['milestones'], SR['total']), {}),
                   fine=(([25000, 40000], 50000),
                         dict(milestone_note='official from scratch: lr 1e-4, 225k iterations')),
                   loss=l1, base=size == 'B', tile=(640, 32, 'official validation tiles (640 / 32); 0: whole image'),
                   entries=[('psnr', 'calculate_psnr', scale, True, 'PSNR on Y, border of `scale` pixels removed'),
                            ('ssim', 'calculate_ssim', scale, True, None)],
                   why='Geometry above = the released model\'s (window 32, stripes 64x64, df 4).')


def sr_test_file(size: str, scale: int) -> None:
    s = SIZES[size]
    stem = f'test_GRL_{size}_SRx{scale}'
    rel = f'test/sr/{stem}.yml'
    ckpt = f'sr_grl_{s["long"]}_c3x{scale}.ckpt'
    df = 2 if size == 'B' else SR['df']
    d = Doc()
    header(d, f'Test the released {s["title"]} x{scale} super-resolution model on Set5, Set14, BSD100, Urban100\n'
              'and Manga109 (PSNR/SSIM on the Y channel, `scale` border pixels removed).\n'
              + download_note(ckpt), rel, False)
    general(d, stem, 'GRLModel', scale)
    d.kv(0, 'datasets')
    for i, (name, root) in enumerate(SR_TEST_SETS, 1):
        d.kv(2, f'test_{i}')
        d.kv(4, 'name', name)
        d.kv(4, 'type', 'PairedImageDataset')
        d.kv(4, 'dataroot_gt', f'{root}/GTmod12', 'HR cropped to a multiple of 12')
        d.kv(4, 'dataroot_lq', f'{root}/LRbicx{scale}', f'MATLAB bicubic x1/{scale}')
        d.kv(4, 'io_backend')
        d.kv(6, 'type', 'disk')
    d.blank()
    network(d, size, upscale=scale, upsampler=s['sr_upsampler'], in_ch=3, window=SR['window'],
            stripes=SR['stripes'], df=df,
            geometry_note='released test geometry' + (': df 2 (official test commands)' if size == 'B' else ''))
    d.blank()
    test_path(d, ckpt)
    val_test(d, (0, 32, 'released test commands: whole images (tile 0); e.g. 640 / 32 saves memory'),
             [('psnr', 'calculate_psnr', scale, True, 'PSNR on Y (MATLAB BT.601), border `scale` removed'),
              ('ssim', 'calculate_ssim', scale, True, "BasicSR's SSIM on Y"),
              ('ssim_grl', 'calculate_ssim_grl', scale, True, 'the official GRL SSIM (zero-padded window)')])
    emit(rel, d)


# ---------------------------------------------------------------------------------- denoise
DN = dict(window=16, stripes=[64, 128], df=4, lr=1e-4, milestones=[100000, 150000, 175000, 200000],
          total=225000, patch=256)
DN_TEST = {'color': [('McMaster', 'datasets/McMaster'), ('CBSD68', 'datasets/CBSD68'),
                     ('Kodak24', 'datasets/Kodak24'), ('Urban100', 'datasets/Urban100/HR')],
           'gray': [('Set12', 'datasets/Set12'), ('BSD68', 'datasets/BSD68'), ('Urban100', 'datasets/Urban100/HR')]}


def dn_ckpt(size: str, mode: str, sigma: int) -> str:
    return f'dn_grl_{SIZES[size]["long"]}_c{3 if mode == "color" else 1}s{sigma}.ckpt'


def dn_train_file(size: str, mode: str, sigma: int, finetune: bool = False) -> None:
    s = SIZES[size]
    color = mode == 'color'
    stem = f'{"finetune" if finetune else "train"}_GRL_{size}_DN_{mode}_s{sigma}'
    rel = f'train/dn/{stem}.yml'
    ckpt = dn_ckpt(size, mode, sigma)
    d = Doc()
    what = f'{s["title"]}, {mode} image denoising, additive white Gaussian noise sigma {sigma} (0-255 scale)'
    if finetune:
        header(d, f'{what}:\nFINE-TUNING the released {ckpt} on your own clean images (here DFWB as a\n'
                  'placeholder), with a lower learning rate and a short schedule.\n' + download_note(ckpt),
               rel, True)
    else:
        header(d, f'{what},\nfrom scratch on DFWB (DIV2K + Flickr2K + BSD400 + WED): the official recipe of the '
                  'released\n'
                  f'{ckpt} (official config: experiment dn/grl/grl_p256.yaml, model grl/grl_{s["long"]}.yaml;\n'
                  'the experiment file sets sigma 15, the other released levels use the same recipe).\n'
                  'Official run: 8 GPUs x 1 patch 256x256, AdamW lr 1e-4 / weight decay 1e-4, L1 loss, '
                  '225k iterations.',
               rel, True)
    general(d, stem.replace('train_', ''), 'GRLModel', 1)
    d.kv(0, 'datasets')
    d.kv(2, 'train')
    d.kv(4, 'name', 'DFWB')
    d.kv(4, 'type', 'GaussianNoiseDataset', 'lq = gt + N(0, (sigma/255)^2), on the fly, not clipped')
    io_lmdb(d, 4, {'dataroot_gt': 'datasets/DFWB/DFWB_HR_sub.lmdb'}, {'dataroot_gt': 'datasets/DFWB/DFWB_HR_sub'},
            'datasets/DFWB/meta_info_DFWB_HR_sub.txt')
    d.kv(4, 'sigma', sigma, 'fixed noise level (sigma_range: [lo, hi] draws one per patch)')
    d.kv(4, 'color', color, 'RGB' if color else 'grayscale (read as 1 channel)')
    d.kv(4, 'gt_size', DN['patch'], 'official patch 256 (BasicSR 480x480 sub-images are fine)')
    d.kv(4, 'use_hflip', True, '+ rotations: the 8 flips/transposes')
    d.kv(4, 'use_rot', True)
    loader(d, 1)
    vname, vroot = ('McMaster', 'datasets/McMaster') if color else ('Set12', 'datasets/Set12')
    d.kv(2, 'val')
    d.kv(4, 'name', vname, 'official validation set: Set12' + ('' if not color else ' (gray); McMaster here'))
    d.kv(4, 'type', 'GaussianNoiseDataset', 'validation noise is fixed per image (seeded by its name)')
    d.kv(4, 'dataroot_gt', vroot)
    d.kv(4, 'io_backend')
    d.kv(6, 'type', 'disk')
    d.kv(4, 'sigma', sigma)
    d.kv(4, 'color', color)
    d.kv(4, 'modulo', 8, 'official: validation images cropped to a multiple of 8 (top-left)')
    d.blank()
    network(d, size, upscale=1, upsampler='', in_ch=3 if color else 1, window=DN['window'],
            stripes=DN['stripes'], df=DN['df'], geometry_note='DN experiment geometry',
            source='official experiment tiny@dn' if size == 'T' else 'DN experiment overrides')
    if size == 'B':
        d.comment('The released base denoisers were evaluated with window 32 and df 2 (official test\n'
                  'commands; the experiment file trains with window 16, df 4).', 2)
    d.blank()
    train_sections(d, rel, finetune, ckpt, lr=DN['lr'], ft_lr=2e-5,
                   scratch=((DN['milestones'], DN['total']), {}),
                   fine=(([25000, 40000], 50000),
                         dict(milestone_note='official from scratch: lr 1e-4, 225k iterations')),
                   loss=l1, base=size == 'B', tile=(0, 32, 'the official config validates whole images'),
                   entries=rgb_metrics(True) if color else gray_metrics())


def dn_test_file(size: str, mode: str, sigma: int) -> None:
    s = SIZES[size]
    color = mode == 'color'
    stem = f'test_GRL_{size}_DN_{mode}_s{sigma}'
    rel = f'test/dn/{stem}.yml'
    ckpt = dn_ckpt(size, mode, sigma)
    sets = DN_TEST[mode]
    d = Doc()
    header(d, f'Test the released {s["title"]} {mode} denoiser (Gaussian noise sigma {sigma}) on '
              f'{", ".join(n for n, _ in sets)}.\nThe noise is deterministic per image (seeded by its name, '
              'as the official code), so runs are repeatable.\n' + download_note(ckpt), rel, False)
    general(d, stem, 'GRLModel', 1)
    d.kv(0, 'datasets')
    for i, (name, root) in enumerate(sets, 1):
        d.kv(2, f'test_{i}')
        d.kv(4, 'name', name)
        d.kv(4, 'type', 'GaussianNoiseDataset')
        d.kv(4, 'dataroot_gt', root, 'clean images; the noisy input is made on the fly')
        d.kv(4, 'io_backend')
        d.kv(6, 'type', 'disk')
        d.kv(4, 'sigma', sigma)
        d.kv(4, 'color', color, None if color else 'read as grayscale')
        d.kv(4, 'modulo', 8, 'official: cropped to a multiple of 8 (top-left)')
    d.blank()
    base = size == 'B'
    network(d, size, upscale=1, upsampler='', in_ch=3 if color else 1, window=32 if base else DN['window'],
            stripes=DN['stripes'], df=2 if base else DN['df'],
            geometry_note='released test geometry' + (': window 32, df 2 (official commands)' if base else ''))
    d.blank()
    test_path(d, ckpt)
    tile = (256, 32, 'released test command for GRL-B: 256 / 32') if base else \
        (0, 32, 'released test commands: whole images')
    val_test(d, tile, rgb_metrics(True, official_ssim=True) if color else gray_metrics(official_ssim=True))
    emit(rel, d)


# ------------------------------------------------------------------------------------- JPEG
JPEG = dict(window=36, stripes=[72, 144], df=4, lr=1e-4, milestones=[50000, 100000, 125000, 150000],
            total=175000, patch=288)
JPEG_TEST = {'color': [('LIVE1', 'datasets/LIVE1'), ('BSDS500', 'datasets/BSDS500'),
                       ('Urban100', 'datasets/Urban100/HR')],
             'gray': [('Classic5', 'datasets/Classic5'), ('LIVE1', 'datasets/LIVE1'),
                      ('BSDS500', 'datasets/BSDS500'), ('Urban100', 'datasets/Urban100/HR')]}


def jpeg_ckpt(mode: str, q: int) -> str:
    return f'jpeg_grl_small_c{3 if mode == "color" else 1}q{q}.ckpt'


def jpeg_train_file(mode: str, q: int, finetune: bool = False) -> None:
    color = mode == 'color'
    stem = f'{"finetune" if finetune else "train"}_GRL_S_JPEG_{mode}_q{q}'
    rel = f'train/jpeg/{stem}.yml'
    ckpt = jpeg_ckpt(mode, q)
    d = Doc()
    what = f'GRL-S, {mode} JPEG compression artefact removal, quality {q}'
    if finetune:
        header(d, f'{what}: FINE-TUNING the released\n{ckpt} on your own images (here DFWB as a placeholder), '
                  'with a lower learning rate\nand a short schedule.\n' + download_note(ckpt), rel, True)
    else:
        header(d, f'{what}, from scratch on DFWB (DIV2K + Flickr2K +\nBSD400 + WED): the official recipe of '
                  f'the released {ckpt} (official config: experiment\njpeg/grl/grl_p288.yaml, model '
                  'grl/grl_small.yaml; the file sets quality 10, the other released qualities\nuse the same '
                  'recipe). Official run: 8 GPUs x 1 patch 288x288, AdamW lr 1e-4 / weight decay 1e-4,\n'
                  'Charbonnier loss, 175k iterations.', rel, True)
    general(d, stem.replace('train_', ''), 'GRLModel', 1)
    d.kv(0, 'datasets')
    d.kv(2, 'train')
    d.kv(4, 'name', 'DFWB')
    d.kv(4, 'type', 'JPEGDataset', 'lq = OpenCV JPEG round trip of the GT, on the fly')
    io_lmdb(d, 4, {'dataroot_gt': 'datasets/DFWB/DFWB_HR_sub.lmdb'}, {'dataroot_gt': 'datasets/DFWB/DFWB_HR_sub'},
            'datasets/DFWB/meta_info_DFWB_HR_sub.txt')
    d.kv(4, 'quality', q, 'JPEG quality factor (quality_range: [lo, hi] draws one per patch)')
    d.kv(4, 'color', color, 'RGB, libjpeg 4:2:0 chroma' if color else 'grayscale, one channel encoded')
    d.kv(4, 'patchwise', False, 'official: compress the whole image, then crop (8x8 grid at random offset)')
    d.kv(4, 'gt_size', JPEG['patch'], 'official patch 288')
    d.kv(4, 'use_hflip', True, '+ rotations: the 8 flips/transposes')
    d.kv(4, 'use_rot', True)
    loader(d, 1)
    d.kv(2, 'val')
    d.kv(4, 'name', 'LIVE1', 'official validation set')
    d.kv(4, 'type', 'JPEGDataset')
    d.kv(4, 'dataroot_gt', 'datasets/LIVE1')
    d.kv(4, 'io_backend')
    d.kv(6, 'type', 'disk')
    d.kv(4, 'quality', q)
    d.kv(4, 'color', color)
    d.kv(4, 'modulo', 8, 'official: validation images cropped to a multiple of 8 (top-left)')
    d.blank()
    network(d, 'S', upscale=1, upsampler='', in_ch=3 if color else 1, window=JPEG['window'],
            stripes=JPEG['stripes'], df=JPEG['df'], geometry_note='JPEG experiment geometry',
            source='official experiment small@jpeg')
    d.blank()
    train_sections(d, rel, finetune, ckpt, lr=JPEG['lr'], ft_lr=2e-5,
                   scratch=((JPEG['milestones'], JPEG['total']), {}),
                   fine=(([25000, 40000], 50000),
                         dict(milestone_note='official from scratch: lr 1e-4, 175k iterations')),
                   loss=charbonnier, base=False, tile=(576, 72, 'official validation tiles 576 / 72'),
                   entries=rgb_metrics(True) if color else gray_metrics())


def jpeg_test_file(mode: str, q: int) -> None:
    color = mode == 'color'
    stem = f'test_GRL_S_JPEG_{mode}_q{q}'
    rel = f'test/jpeg/{stem}.yml'
    ckpt = jpeg_ckpt(mode, q)
    sets = JPEG_TEST[mode]
    d = Doc()
    header(d, f'Test the released GRL-S {mode} JPEG artefact removal model (quality {q}) on\n'
              f'{", ".join(n for n, _ in sets)}: PSNR, SSIM and PSNR-B'
              + (' (RGB and Y channel).' if color else '.') + '\n' + download_note(ckpt), rel, False)
    general(d, stem, 'GRLModel', 1)
    d.kv(0, 'datasets')
    for i, (name, root) in enumerate(sets, 1):
        d.kv(2, f'test_{i}')
        d.kv(4, 'name', name)
        d.kv(4, 'type', 'JPEGDataset')
        d.kv(4, 'dataroot_gt', root, 'clean images; compressed on the fly')
        d.kv(4, 'io_backend')
        d.kv(6, 'type', 'disk')
        d.kv(4, 'quality', q)
        d.kv(4, 'color', color, None if color else 'read as grayscale (official: Y of RGB, except Classic5)')
        d.kv(4, 'modulo', 8, 'official: cropped to a multiple of 8 (top-left)')
    d.blank()
    network(d, 'S', upscale=1, upsampler='', in_ch=3 if color else 1, window=JPEG['window'],
            stripes=JPEG['stripes'], df=JPEG['df'], geometry_note='released test geometry')
    d.blank()
    test_path(d, ckpt)
    if color:
        entries = rgb_metrics(True, official_ssim=True) + [
            ('psnrb', 'calculate_psnrb', 0, False, 'PSNR-B: PSNR with a blocking-effect penalty'),
            ('psnrb_y', 'calculate_psnrb', 0, True, None)]
    else:
        entries = gray_metrics(official_ssim=True) + [
            ('psnrb', 'calculate_psnrb', 0, False, 'PSNR-B: PSNR with a blocking-effect penalty')]
    val_test(d, (576, 72, 'the JPEG experiment tiles 576 / 72 (the released commands used 288 / 36)'), entries)
    emit(rel, d)


# ------------------------------------------------------------------------------- demosaicking
DM = dict(window=8, stripes=[32, 32], df=4, lr=2e-4, milestones=[400000, 700000, 850000, 900000, 950000],
          total=1000000, patch=64)
DM_TEST = [('McMaster', 'datasets/McMaster'), ('Kodak24', 'datasets/Kodak24'), ('CBSD68', 'datasets/CBSD68'),
           ('Urban100', 'datasets/Urban100/HR')]


def dm_train_file(finetune: bool = False) -> None:
    stem = 'finetune_GRL_S_DM' if finetune else 'train_GRL_S_DM'
    rel = f'train/dm/{stem}.yml'
    ckpt = 'dm_grl_small.ckpt'
    d = Doc()
    if finetune:
        header(d, f'GRL-S, image demosaicking (RGGB Bayer): FINE-TUNING the released {ckpt} on your own\n'
                  'images (here ImageNet as a placeholder), with a lower learning rate and a short schedule.\n'
                  + download_note(ckpt), rel, True)
    else:
        header(d, 'GRL-S, image demosaicking (RGGB Bayer mosaic -> RGB), from scratch on ImageNet (train):\n'
                  f'the official recipe of the released {ckpt} (official config: experiment dm/grl.yaml,\n'
                  'model grl/grl_small.yaml). The network input is the Malvar-He-Cutler interpolation of the\n'
                  'mosaic (3 channels, full resolution); GRL learns the residual.\n'
                  'Official run: 8 GPUs x 4 patches 64x64, AdamW lr 2e-4 (50k warm-up iterations) / weight\n'
                  'decay 1e-4, Charbonnier loss, 1M iterations.', rel, True)
    general(d, stem.replace('train_', ''), 'GRLModel', 1)
    d.kv(0, 'datasets')
    d.kv(2, 'train')
    d.kv(4, 'name', 'ImageNet')
    d.kv(4, 'type', 'DemosaicDataset', 'lq = Malvar demosaicking of the RGGB mosaic of the GT')
    io_lmdb(d, 4, {'dataroot_gt': 'datasets/ImageNet/ImageNet_train.lmdb'},
            {'dataroot_gt': 'datasets/ImageNet/train'}, 'datasets/ImageNet/meta_info_ImageNet_train.txt')
    d.kv(4, 'gt_size', DM['patch'], 'official patch 64 (even: whole Bayer cells)')
    d.kv(4, 'use_hflip', True, '+ rotations: the 8 flips/transposes')
    d.kv(4, 'use_rot', True)
    loader(d, 4)
    d.kv(2, 'val')
    d.kv(4, 'name', 'McMaster', 'official: McMaster, Kodak24, CBSD68, Urban100')
    d.kv(4, 'type', 'DemosaicDataset')
    d.kv(4, 'dataroot_gt', 'datasets/McMaster')
    d.kv(4, 'io_backend')
    d.kv(6, 'type', 'disk')
    d.kv(4, 'modulo', 8, 'official: cropped to a multiple of 8 (top-left)')
    d.blank()
    network(d, 'S', upscale=1, upsampler='', in_ch=3, window=DM['window'], stripes=DM['stripes'], df=DM['df'],
            geometry_note='DM experiment geometry', source='official experiment small@dm')
    d.blank()
    train_sections(d, rel, finetune, ckpt, lr=DM['lr'], ft_lr=4e-5,
                   scratch=((DM['milestones'], DM['total'], 50000),
                            dict(warmup_note='linear warm-up (BasicSR: from 0; official: from 1e-5)')),
                   fine=(([25000, 40000], 50000, -1),
                         dict(milestone_note='official from scratch: lr 2e-4, 1M iterations')),
                   loss=charbonnier, base=False, tile=None,
                   entries=rgb_metrics(True),
                   val_note='The official config validates whole images (no tiles).')


def dm_test_file() -> None:
    stem = 'test_GRL_S_DM'
    rel = f'test/dm/{stem}.yml'
    ckpt = 'dm_grl_small.ckpt'
    d = Doc()
    header(d, 'Test the released GRL-S demosaicking model on McMaster, Kodak24, CBSD68 and Urban100\n'
              '(RGGB mosaic made from each image; PSNR/SSIM in RGB and on Y).\n' + download_note(ckpt), rel, False)
    general(d, stem, 'GRLModel', 1)
    d.kv(0, 'datasets')
    for i, (name, root) in enumerate(DM_TEST, 1):
        d.kv(2, f'test_{i}')
        d.kv(4, 'name', name)
        d.kv(4, 'type', 'DemosaicDataset')
        d.kv(4, 'dataroot_gt', root, 'RGB images; mosaicked and interpolated on the fly')
        d.kv(4, 'io_backend')
        d.kv(6, 'type', 'disk')
        d.kv(4, 'modulo', 8, 'official: cropped to a multiple of 8 (top-left)')
    d.blank()
    network(d, 'S', upscale=1, upsampler='', in_ch=3, window=DM['window'], stripes=DM['stripes'], df=DM['df'],
            geometry_note='released test geometry')
    d.blank()
    test_path(d, ckpt)
    val_test(d, (0, 32, 'whole images'), rgb_metrics(True, official_ssim=True))
    emit(rel, d)


# --------------------------------------------------------------------------- motion deblurring
MOTION = dict(window=12, stripes=[48, 96], df=4, lr=1e-5, milestones=[40000, 80000], total=40000, patch=480)
MOTION_DATA = {
    'GoPro': dict(ckpt='db_motion_grl_base_gopro.ckpt', train='datasets/GoPro/train',
                  test=[('GoPro', 'datasets/GoPro/test'), ('HIDE', 'datasets/HIDE/test')]),
    'RealBlur_J': dict(ckpt='db_motion_grl_base_realblur_j.ckpt', train='datasets/RealBlur_J/train',
                       test=[('RealBlur_J', 'datasets/RealBlur_J/test')]),
    'RealBlur_R': dict(ckpt='db_motion_grl_base_realblur_r.ckpt', train='datasets/RealBlur_R/train',
                       test=[('RealBlur_R', 'datasets/RealBlur_R/test')]),
}


def motion_train_file(data: str, finetune: bool = False) -> None:
    info = MOTION_DATA[data]
    stem = f'{"finetune" if finetune else "train"}_GRL_B_{data}'
    rel = f'train/db_motion/{stem}.yml'
    ckpt = info['ckpt']
    d = Doc()
    if finetune:
        header(d, f'GRL-B, single-image motion deblurring: FINE-TUNING the released {ckpt} on your own\n'
                  f'blurry/sharp pairs (here {data} as a placeholder), with a lower learning rate and a short\n'
                  'schedule.\n' + download_note(ckpt), rel, True)
    else:
        header(d, f'GRL-B, single-image motion deblurring on {data}: the official recipe of the released\n'
                  f'{ckpt} (official config: experiment db_motion/grl_p480.yaml, model\n'
                  'grl/grl_base.yaml). Official run: 8 GPUs x 1 patch 480x480, AdamW lr 1e-5 / weight decay\n'
                  '1e-4, Charbonnier loss, 40k iterations (a short, low-lr schedule: the official config is a\n'
                  'final large-patch stage; it loads no weights itself).', rel, True)
    general(d, stem.replace('train_', ''), 'GRLModel', 1)
    root = info['train']
    d.kv(0, 'datasets')
    d.kv(2, 'train')
    d.kv(4, 'name', data)
    d.kv(4, 'type', 'PairedImageDataset', 'blurry (lq) / sharp (gt) pairs, same file names')
    io_lmdb(d, 4, {'dataroot_gt': f'{root}/target.lmdb', 'dataroot_lq': f'{root}/input.lmdb'},
            {'dataroot_gt': f'{root}/target', 'dataroot_lq': f'{root}/input'}, f'{root}/meta_info.txt')
    d.kv(4, 'gt_size', MOTION['patch'], 'official patch 480')
    d.kv(4, 'use_hflip', True, '+ rotations: the 8 flips/transposes')
    d.kv(4, 'use_rot', True)
    loader(d, 1, enlarge=10)
    tname, troot = info['test'][0]
    d.kv(2, 'val')
    d.kv(4, 'name', tname)
    d.kv(4, 'type', 'PairedImageDataset')
    d.kv(4, 'dataroot_gt', f'{troot}/target')
    d.kv(4, 'dataroot_lq', f'{troot}/input')
    d.kv(4, 'io_backend')
    d.kv(6, 'type', 'disk')
    d.blank()
    network(d, 'B', upscale=1, upsampler='', in_ch=3, window=MOTION['window'], stripes=MOTION['stripes'],
            df=MOTION['df'], geometry_note='motion deblurring geometry', source='official experiment base@db_motion')
    d.blank()
    train_sections(d, rel, finetune, ckpt, lr=MOTION['lr'], ft_lr=5e-6,
                   scratch=((MOTION['milestones'], MOTION['total']),
                            dict(milestone_note='official; never reached in 40k')),
                   fine=(([10000, 15000], 20000), dict(milestone_note='official: lr 1e-5, 40k iterations')),
                   loss=charbonnier, base=True, tile=(480, 48, 'official validation tiles 480 / 48'),
                   entries=rgb_metrics(True))


def motion_test_file(data: str) -> None:
    info = MOTION_DATA[data]
    stem = f'test_GRL_B_{data}'
    rel = f'test/db_motion/{stem}.yml'
    ckpt = info['ckpt']
    names = ', '.join(n for n, _ in info['test'])
    d = Doc()
    header(d, f'Test the released GRL-B motion deblurring model trained on {data} ({ckpt}) on\n'
              f'{names} (PSNR/SSIM in RGB and on Y).\n' + download_note(ckpt), rel, False)
    general(d, stem, 'GRLModel', 1)
    d.kv(0, 'datasets')
    for i, (name, root) in enumerate(info['test'], 1):
        d.kv(2, f'test_{i}')
        d.kv(4, 'name', name)
        d.kv(4, 'type', 'PairedImageDataset')
        d.kv(4, 'dataroot_gt', f'{root}/target', 'sharp')
        d.kv(4, 'dataroot_lq', f'{root}/input', 'blurry')
        d.kv(4, 'io_backend')
        d.kv(6, 'type', 'disk')
    d.blank()
    network(d, 'B', upscale=1, upsampler='', in_ch=3, window=MOTION['window'], stripes=MOTION['stripes'],
            df=MOTION['df'], geometry_note='released test geometry')
    d.blank()
    test_path(d, ckpt)
    val_test(d, (480, 48, 'experiment tiles 480 / 48; released commands: 0 (whole image, more memory)'),
             rgb_metrics(True, official_ssim=True))
    emit(rel, d)


# -------------------------------------------------------------------------- defocus deblurring
DEFOCUS = dict(window=16, stripes=[48, 96], df=4, lr=5e-5, milestones=[20000, 40000, 60000, 70000], total=80000,
               patch=480)
DEFOCUS_CKPT = {'single': 'db_defocus_single_pixel_grl_base.ckpt', 'dual': 'db_defocus_dual_pixel_grl_base.ckpt'}


def _dpdd_dataset(d: Doc, mode: str, split: str, train: bool) -> None:
    root = 'datasets/DPDD'
    if mode == 'single':
        d.kv(4, 'type', 'PairedImageDataset', 'blurry (combined view) / all-in-focus pairs')
        if train:
            io_lmdb(d, 4, {'dataroot_gt': f'{root}/{split}_c/target.lmdb',
                           'dataroot_lq': f'{root}/{split}_c/source.lmdb'},
                    {'dataroot_gt': f'{root}/{split}_c/target', 'dataroot_lq': f'{root}/{split}_c/source'},
                    f'{root}/meta_info_{split}.txt')
        else:
            d.kv(4, 'dataroot_gt', f'{root}/{split}_c/target')
            d.kv(4, 'dataroot_lq', f'{root}/{split}_c/source')
            d.kv(4, 'io_backend')
            d.kv(6, 'type', 'disk')
    else:
        d.kv(4, 'type', 'DualPixelDataset', 'lq = left + right views (6 channels), gt = all-in-focus')
        if train:
            io_lmdb(d, 4, {'dataroot_gt': f'{root}/{split}_c/target.lmdb',
                           'dataroot_lq_left': f'{root}/{split}_l/source.lmdb',
                           'dataroot_lq_right': f'{root}/{split}_r/source.lmdb'},
                    {'dataroot_gt': f'{root}/{split}_c/target', 'dataroot_lq_left': f'{root}/{split}_l/source',
                     'dataroot_lq_right': f'{root}/{split}_r/source'}, f'{root}/meta_info_{split}.txt')
        else:
            d.kv(4, 'dataroot_gt', f'{root}/{split}_c/target')
            d.kv(4, 'dataroot_lq_left', f'{root}/{split}_l/source')
            d.kv(4, 'dataroot_lq_right', f'{root}/{split}_r/source')
            d.kv(4, 'io_backend')
            d.kv(6, 'type', 'disk')


def defocus_train_file(mode: str, finetune: bool = False) -> None:
    stem = f'{"finetune" if finetune else "train"}_GRL_B_DPDD_{mode}'
    rel = f'train/db_defocus/{stem}.yml'
    ckpt = DEFOCUS_CKPT[mode]
    view = 'single-pixel (one combined view)' if mode == 'single' else 'dual-pixel (left + right views)'
    d = Doc()
    if finetune:
        header(d, f'GRL-B, {view} defocus deblurring: FINE-TUNING the released\n{ckpt} on your own data '
                  '(here DPDD as a placeholder), with a lower learning rate and a\nshort schedule.\n'
                  + download_note(ckpt), rel, True)
    else:
        header(d, f'GRL-B, {view} defocus deblurring on DPDD: the official recipe of the\nreleased {ckpt} '
                  '(official config: experiment db_defocus/grl_p480.yaml, model\ngrl/grl_base.yaml'
                  + ('' if mode == 'single' else '; the dual-pixel variant is referenced there but its file is\n'
                     'missing: same recipe, 6 input channels') + '). Official run: 8 GPUs x 1 patch 480x480, AdamW\n'
                  'lr 5e-5 / weight decay 1e-4, Charbonnier loss, 80k iterations.', rel, True)
    general(d, stem.replace('train_', ''), 'GRLModel', 1)
    d.kv(0, 'datasets')
    d.kv(2, 'train')
    d.kv(4, 'name', 'DPDD')
    _dpdd_dataset(d, mode, 'train', True)
    d.kv(4, 'gt_size', DEFOCUS['patch'], 'official patch 480')
    d.kv(4, 'use_hflip', True, '+ rotations (the same transform for every view)')
    d.kv(4, 'use_rot', True)
    loader(d, 1, enlarge=10)
    d.kv(2, 'val')
    d.kv(4, 'name', 'DPDD_test')
    _dpdd_dataset(d, mode, 'test', False)
    d.blank()
    network(d, 'B', upscale=1, upsampler='', in_ch=3 if mode == 'single' else 6, window=DEFOCUS['window'],
            stripes=DEFOCUS['stripes'], df=DEFOCUS['df'], geometry_note='defocus deblurring geometry',
            out_ch=None if mode == 'single' else 3, source='official experiment base@db_defocus'
            + ('' if mode == 'single' else ' + 6 input channels'))
    d.blank()
    train_sections(d, rel, finetune, ckpt, lr=DEFOCUS['lr'], ft_lr=1e-5,
                   scratch=((DEFOCUS['milestones'], DEFOCUS['total']), {}),
                   fine=(([10000, 15000], 20000), dict(milestone_note='official: lr 5e-5, 80k iterations')),
                   loss=charbonnier, base=True, tile=(480, 48, 'official validation tiles 480 / 48'),
                   entries=rgb_metrics(True))


def defocus_test_file(mode: str) -> None:
    stem = f'test_GRL_B_DPDD_{mode}'
    rel = f'test/db_defocus/{stem}.yml'
    ckpt = DEFOCUS_CKPT[mode]
    d = Doc()
    header(d, f'Test the released GRL-B {mode}-pixel defocus deblurring model ({ckpt})\non the DPDD test set '
              '(PSNR/SSIM in RGB and on Y).\n' + download_note(ckpt), rel, False)
    general(d, stem, 'GRLModel', 1)
    d.kv(0, 'datasets')
    d.kv(2, 'test_1')
    d.kv(4, 'name', 'DPDD_test')
    _dpdd_dataset(d, mode, 'test', False)
    d.blank()
    network(d, 'B', upscale=1, upsampler='', in_ch=3 if mode == 'single' else 6, window=DEFOCUS['window'],
            stripes=DEFOCUS['stripes'], df=DEFOCUS['df'], geometry_note='released test geometry',
            out_ch=None if mode == 'single' else 3)
    d.blank()
    test_path(d, ckpt)
    val_test(d, (480, 48, 'official tiles 480 / 48'), rgb_metrics(True, official_ssim=True))
    emit(rel, d)


# ------------------------------------------------------------------------- real-world SR (BSR)
REALESRGAN_DEGRADATION = '''\
# ---- second-order degradation, synthesised on the model device (Real-ESRGAN's values) -------
# The official GRL data module uses a BSRGAN-style random-order pipeline (its restoration_bsr.py); these
# options are Real-ESRGAN's (BasicSR RealESRGANDataset + Real-ESR models), the closest BasicSR
# has. The first-order blur kernels come from the dataset (datasets.train below).
high_order_degradation: true    # false: lq/gt pairs straight from the dataset
# the first degradation process
resize_prob: [0.2, 0.7, 0.1]    # up, down, keep
resize_range: [0.15, 1.5]
gaussian_noise_prob: 0.5
noise_range: [1, 30]
poisson_scale_range: [0.05, 3]
gray_noise_prob: 0.4
jpeg_range: [30, 95]
# the second degradation process
second_blur_prob: 0.8
resize_prob2: [0.3, 0.4, 0.3]   # up, down, keep
resize_range2: [0.3, 1.2]
gaussian_noise_prob2: 0.5
noise_range2: [1, 25]
poisson_scale_range2: [0.05, 2.5]
gray_noise_prob2: 0.4
jpeg_range2: [30, 95]
'''

REALESRGAN_KERNELS = '''\
blur_kernel_size: 21
kernel_list: [iso, aniso, generalized_iso, generalized_aniso, plateau_iso, plateau_aniso]
kernel_prob: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
sinc_prob: 0.1
blur_sigma: [0.2, 3]
betag_range: [0.5, 4]
betap_range: [1, 2]

blur_kernel_size2: 21
kernel_list2: [iso, aniso, generalized_iso, generalized_aniso, plateau_iso, plateau_aniso]
kernel_prob2: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
sinc_prob2: 0.1
blur_sigma2: [0.2, 1.5]
betag_range2: [0.5, 4]
betap_range2: [1, 2]

final_sinc_prob: 0.8
'''

BSR_PSNR = dict(stripes=[64, 64], lr=2e-4, milestones=[500000, 800000, 900000, 950000], total=1000000, batch=4)
BSR_GAN = dict(stripes=[32, 64], lr=1e-5, milestones=[600000], total=600000, batch=1)


def bsr_train_file(stage: str, finetune: bool = False) -> None:
    gan = stage == 'gan'
    cfg = BSR_GAN if gan else BSR_PSNR
    stem = f'{"finetune" if finetune else "train"}_GRL_B_BSR_{stage}'
    rel = f'train/bsr/{stem}.yml'
    d = Doc()
    if finetune:
        header(d, 'GRL-B, real-world SR x4, GAN stage: FINE-TUNING the released bsr_grl_base.ckpt (the GAN-stage\n'
                  'generator) on your own HR images, with a lower learning rate and a short schedule. No\n'
                  'discriminator is released: it starts from scratch, so the generator waits net_d_init_iters\n'
                  'iterations while the discriminator catches up.\n' + download_note('bsr_grl_base.ckpt'),
               rel, True)
    elif gan:
        header(d, 'GRL-B, real-world (blind) SR x4, stage 2 of 2: GAN fine-tuning of the PSNR-stage generator\n'
                  '(train_GRL_B_BSR_psnr.yml), the recipe of the released bsr_grl_base.ckpt (official config:\n'
                  'experiment bsr/grl.yaml, model grl/grl_base_bsr.yaml). Losses: L1 (weight 1) + VGG19\n'
                  'perceptual (weight 1) against the USM-sharpened GT, vanilla GAN (weight 0.1) with a U-Net\n'
                  'discriminator. Official run: 8 GPUs x 1 LR patch 128, Adam lr 1e-5, 600k iterations.\n'
                  'VGG19 weights: https://download.pytorch.org/models/vgg19-dcbb9e9d.pth into '
                  f'{PRETRAINED}/.', rel, True)
    else:
        header(d, 'GRL-B, real-world (blind) SR x4, stage 1 of 2: PSNR-oriented training on synthetic\n'
                  'degradations (official config: experiment bsr/grl_psnr.yaml, model grl/grl_base.yaml with\n'
                  'the nearest+conv head). Official run: 8 GPUs x 4 LR patches 128, Adam lr 2e-4, L1 loss\n'
                  'against the USM-sharpened GT, 1M iterations, activation checkpointing.\n'
                  'Stage 2: train_GRL_B_BSR_gan.yml.', rel, True)
    general(d, stem.replace('train_', ''), 'GRLRealESRGANModel' if gan else 'GRLRealESRNetModel', 4,
            'BasicSR RealESR' + ('GAN' if gan else 'Net') + 'Model on CPU/CUDA + GRLModel extras')
    d.raw(REALESRGAN_DEGRADATION)
    if gan:
        d.kv(0, 'l1_gt_usm', True, 'L1 and perceptual losses against the USM-sharpened GT,')
        d.kv(0, 'percep_gt_usm', True, 'the GAN loss against the plain GT (official)')
        d.kv(0, 'gan_gt_usm', False)
    else:
        d.kv(0, 'gt_usm', True, 'L1 against the USM-sharpened GT (official)')
    d.kv(0, 'gt_size', 256, 'HR crop after the degradation (LR patch 64)')
    d.comment('The official LR patch is 128 (HR 512), but RealESRGANDataset crops/pads the GT to 400x400\n'
              'before the degradation, so the HR crop is at most 400: 256 is Real-ESRGAN\'s value.')
    d.kv(0, 'queue_size', 180, 'pool of training pairs mixed across batches (multiple of the batch size)')
    d.blank()
    d.kv(0, 'datasets')
    d.kv(2, 'train')
    d.kv(4, 'name', 'LSDIR_OST_SCUT_FFHQ', 'official "all": LSDIR + OST + SCUT-CTW1500 + FFHQ')
    d.kv(4, 'type', 'RealESRGANDataset', 'BasicSR: GT crop 400 + first-order blur kernels')
    io_lmdb(d, 4, {'dataroot_gt': 'datasets/BSR/BSR_HR.lmdb'}, {'dataroot_gt': 'datasets/BSR'},
            'datasets/BSR/meta_info_BSR_HR.txt', meta_key='meta_info',
            meta_note='required: image paths relative to dataroot_gt')
    d.raw(REALESRGAN_KERNELS, 4)
    d.kv(4, 'gt_size', 256)
    d.kv(4, 'use_hflip', True)
    d.kv(4, 'use_rot', False, 'as Real-ESRGAN')
    loader(d, cfg['batch'], workers=4, note='RealESRGANDataset builds the blur kernels on the CPU workers.')
    d.kv(2, 'val')
    if gan:
        d.kv(4, 'name', 'RealSR', 'official: real LR photos without GT (NIQE)')
        d.kv(4, 'type', 'SingleImageDataset')
        d.kv(4, 'dataroot_lq', 'datasets/RealSR/LR')
    else:
        d.kv(4, 'name', 'Set5', 'official: Set5 (against the USM-sharpened GT)')
        d.kv(4, 'type', 'PairedImageDataset')
        d.kv(4, 'dataroot_gt', 'datasets/Set5/GTmod12')
        d.kv(4, 'dataroot_lq', 'datasets/Set5/LRbicx4')
    d.kv(4, 'io_backend')
    d.kv(6, 'type', 'disk')
    d.blank()
    network(d, 'B', upscale=4, upsampler='nearest+conv', in_ch=3, window=16, stripes=cfg['stripes'], df=4,
            geometry_note='BSR geometry', checkpointing=not gan,
            source='official experiment ' + ('base_bsr@bsr' if gan else 'base@bsr_psnr'))
    if gan:
        d.blank()
        disc(d)
    d.blank()
    if finetune:
        d.kv(0, 'path')
        d.kv(2, 'pretrain_network_g', f'{PRETRAINED}/bsr_grl_base.ckpt', 'the released GAN-stage generator')
        d.kv(2, 'param_key_g', 'params', 'BasicSR .pth key; official .ckpt files are recognised')
        d.kv(2, 'strict_load_g', True)
        d.kv(2, 'pretrain_network_d', None, 'no discriminator is released')
        d.kv(2, 'strict_load_d', True)
        d.kv(2, 'resume_state', None)
        d.blank()
    elif gan:
        paths_train(d, 'experiments/GRL_B_BSR_psnr/models/net_g_latest.pth',
                    note='the PSNR stage (train_GRL_B_BSR_psnr.yml)', d_net=True)
    else:
        paths_train(d)
    d.kv(0, 'train')
    d.kv(2, 'ema_decay', 0, 'the official runs keep no EMA copy (Real-ESRGAN: 0.999)')
    lr = 5e-6 if finetune else cfg['lr']
    optimizer(d, 'optim_g', 'Adam', lr, 0, [0.9, 0.999])
    if gan:
        optimizer(d, 'optim_d', 'Adam', lr, 0, [0.9, 0.999])
    if finetune:
        schedule(d, [50000], 100000, milestone_note='official GAN stage: lr 1e-5, 600k iterations')
    else:
        schedule(d, cfg['milestones'], cfg['total'])
    l1(d, 'against the USM-sharpened GT (l1_gt_usm / gt_usm)')
    if gan:
        d.kv(2, 'perceptual_opt')
        d.kv(4, 'type', 'GRLPerceptualLoss', 'VGG19 features before ReLU; never downloads')
        d.kv(4, 'vgg_weights', f'{PRETRAINED}/vgg19-dcbb9e9d.pth', "torchvision's VGG19 ImageNet weights")
        d.kv(4, 'layer_weights')
        for layer, w in (('conv1_2', 0.1), ('conv2_2', 0.1), ('conv3_4', 1), ('conv4_4', 1), ('conv5_4', 1)):
            d.kv(6, layer, w)
        d.kv(4, 'use_input_norm', True, 'ImageNet mean/std')
        d.kv(4, 'range_norm', False)
        d.kv(4, 'perceptual_weight', 1.0)
        d.kv(4, 'style_weight', 0)
        d.kv(4, 'criterion', 'l1')
        d.kv(2, 'gan_opt')
        d.kv(4, 'type', 'GANLoss')
        d.kv(4, 'gan_type', 'vanilla', 'BCE with logits')
        d.kv(4, 'real_label_val', 1.0)
        d.kv(4, 'fake_label_val', 0.0)
        d.kv(4, 'loss_weight', 0.1, 'generator weight (the discriminator loss has weight 1)')
        d.kv(2, 'net_d_iters', 1)
        d.kv(2, 'net_d_init_iters', 2000 if finetune else 0,
             'generator frozen while a fresh discriminator warms up' if finetune else None)
    extras(d, True)
    d.blank()
    if gan:
        val_train(d, (0, 32, 'whole images'),
                  [('niqe', 'calculate_niqe', 4, None, 'no-reference quality, lower is better (official)')])
    else:
        val_train(d, (0, 32, 'whole images'),
                  [('psnr', 'calculate_psnr', 4, True, 'against the plain GT (official: USM GT)'),
                   ('ssim', 'calculate_ssim', 4, True, None)])
    logger_dist(d)
    emit(rel, d)


def bsr_test_file() -> None:
    stem = 'test_GRL_B_BSR'
    rel = f'test/bsr/{stem}.yml'
    ckpt = 'bsr_grl_base.ckpt'
    d = Doc()
    header(d, 'Real-world SR x4 with the released GRL-B GAN-stage generator (bsr_grl_base.ckpt) on real\n'
              'low-resolution photos without ground truth: saves the x4 images and reports NIQE.\n'
              + download_note(ckpt), rel, False)
    general(d, stem, 'GRLModel', 4, 'the generator alone (no discriminator / losses at test time)')
    d.kv(0, 'datasets')
    d.kv(2, 'test_1')
    d.kv(4, 'name', 'RealSR')
    d.kv(4, 'type', 'SingleImageDataset', 'LR images only')
    d.kv(4, 'dataroot_lq', 'datasets/RealSR/LR')
    d.kv(4, 'io_backend')
    d.kv(6, 'type', 'disk')
    d.blank()
    network(d, 'B', upscale=4, upsampler='nearest+conv', in_ch=3, window=16, stripes=BSR_GAN['stripes'], df=4,
            geometry_note='released geometry (window 16, stripes 32x64, df 4)')
    d.blank()
    test_path(d, ckpt)
    val_test(d, (0, 32, 'whole images; e.g. 256 / 32 for large photos'),
             [('niqe', 'calculate_niqe', 4, None, 'no-reference quality, lower is better')])
    emit(rel, d)


# ------------------------------------------------------------------------------------- all
def build() -> Dict[str, str]:
    """Relative path (under options/) -> YAML text, for every generated file."""
    FILES.clear()
    for size in 'TSB':
        for scale in (2, 3, 4):
            sr_train_file(size, scale)
            sr_test_file(size, scale)
    sr_train_file('T', 4, finetune=True)
    for size in 'TSB':
        for mode in ('color', 'gray'):
            for sigma in (15, 25, 50):
                dn_train_file(size, mode, sigma)
                dn_test_file(size, mode, sigma)
    dn_train_file('T', 'color', 25, finetune=True)
    for mode in ('color', 'gray'):
        for q in (10, 20, 30, 40):
            jpeg_train_file(mode, q)
            jpeg_test_file(mode, q)
    jpeg_train_file('color', 10, finetune=True)
    dm_train_file()
    dm_train_file(finetune=True)
    dm_test_file()
    for data in MOTION_DATA:
        motion_train_file(data)
        motion_test_file(data)
    motion_train_file('GoPro', finetune=True)
    for mode in ('single', 'dual'):
        defocus_train_file(mode)
        defocus_test_file(mode)
    defocus_train_file('single', finetune=True)
    bsr_train_file('psnr')
    bsr_train_file('gan')
    bsr_train_file('gan', finetune=True)
    bsr_test_file()
    return dict(sorted(FILES.items()))


def out_of_date(root: Path = OPTIONS_DIR) -> List[str]:
    """Generated files that are missing or differ, and stale YAMLs under train/ or test/."""
    files = build()
    bad = [rel for rel, text in files.items()
           if not (root / rel).is_file() or (root / rel).read_text(encoding='utf-8') != text]
    for sub in ('train', 'test'):
        for p in sorted((root / sub).rglob('*.yml')) if (root / sub).is_dir() else []:
            rel = p.relative_to(root).as_posix()
            if rel not in files:
                bad.append(f'{rel} (not generated: remove it or add it to generate.py)')
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--check', action='store_true', help='only report files that are out of date')
    args = parser.parse_args(argv)
    if args.check:
        bad = out_of_date()
        for rel in bad:
            print(f'out of date: {rel}')
        if bad:
            print('run: python options/generate.py', file=sys.stderr)
        return 1 if bad else 0
    files = build()
    for rel, text in files.items():
        path = OPTIONS_DIR / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text(encoding='utf-8') != text:
            path.write_text(text, encoding='utf-8')
    print(f'wrote {len(files)} option files under {OPTIONS_DIR}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
