"""Shared test utilities: tiny real-image LMDB datasets and minimal BasicSR option files.

``make_lmdb`` cuts crops out of the photographs bundled with scikit-image (astronaut, chelsea,
coffee, rocket: real images, available offline) and writes BasicSR LMDBs with
``basicsr.utils.lmdb_util.make_lmdb_from_imgs`` (``meta_info.txt`` included): GT, plus a
MATLAB-bicubic LQ for scale > 1. ``write_options`` / ``write_test_options`` write minimal
valid train / test YAMLs for a tiny GRL (every option BasicSR reads unconditionally is set).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
OFFICIAL_DATA = Path(__file__).resolve().parent / 'data'

PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket')

TINY_GRL = dict(type='GRL', in_channels=3, embed_dim=16, depths=[2], num_heads_window=[1],
                num_heads_stripe=[1], window_size=4, stripe_size=[8, 8], stripe_groups=[None, None],
                anchor_window_down_factor=2, mlp_ratio=2, drop_path_rate=0.0)


def official(name: str) -> Any:
    """Facts about the official GRL kept in ``tests/data`` (see its README): ``'state_dicts'``
    (per model YAML: config, buffers then parameters in state-dict order, counts), ``'tasks'`` (per
    experiment: resolved kwargs, pad size, counts, buffer shapes), ``'flops'`` (forward FLOPs)."""
    return json.loads((OFFICIAL_DATA / f'official_{name}.json').read_text())


def tiny_grl(scale: int) -> Dict[str, Any]:
    """``network_g`` of the tiny GRL: pixelshuffle x``scale``, or no upsampler for scale 1."""
    net = dict(TINY_GRL, upscale=scale, upsampler='pixelshuffle' if scale > 1 else '')
    return copy.deepcopy(net)


def _crops(n_images: int, size: int):
    """``n_images`` RGB uint8 crops ``size`` x ``size``, from several photos and positions."""
    import numpy as np
    import skimage.data
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    crops = []
    for i in range(n_images):
        img = photos[i % len(photos)]
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        h, w = img.shape[:2]
        k = i // len(photos)
        # walk a diagonal through the middle of the photo: distinct, non-flat content
        top = (h // 4 + k * size) % max(h - size, 1)
        left = (w // 4 + k * size * 2) % max(w - size, 1)
        crops.append(np.ascontiguousarray(img[top:top + size, left:left + size, :3]))
    return crops


def make_lmdb(tmp_path, n_images: int = 4, size: int = 32, scale: int = 2, name: str = 'tiny') -> Dict[str, Any]:
    """Write ``<tmp_path>/<name>_GT.lmdb`` (and ``<name>_LQx<scale>.lmdb`` when scale > 1).

    Returns ``{'gt': str, 'lq': str | None, 'scale': int, 'keys': [...], 'size': int}``.
    LQ images are ``basicsr.utils.matlab_functions.imresize`` (MATLAB bicubic) of the GT.
    """
    import cv2
    import grl_plugin  # noqa: F401 - import fixes before basicsr
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs
    from basicsr.utils.matlab_functions import imresize
    import numpy as np

    if size % scale:
        raise ValueError(f'size {size} is not a multiple of scale {scale}')
    tmp_path = Path(tmp_path)
    gt_dir = tmp_path / f'{name}_GT_png'
    lq_dir = tmp_path / f'{name}_LQx{scale}_png'
    gt_dir.mkdir(parents=True, exist_ok=True)
    if scale > 1:
        lq_dir.mkdir(parents=True, exist_ok=True)
    keys, files = [], []
    for i, rgb in enumerate(_crops(n_images, size)):
        key = f'{i:04d}'
        bgr = rgb[..., ::-1]
        cv2.imwrite(str(gt_dir / f'{key}.png'), bgr)
        if scale > 1:
            lq = imresize(bgr.astype(np.float32) / 255.0, 1 / scale)
            cv2.imwrite(str(lq_dir / f'{key}.png'), (np.clip(lq, 0, 1) * 255.0).round().astype(np.uint8))
        keys.append(key)
        files.append(f'{key}.png')
    out = {'gt': str(tmp_path / f'{name}_GT.lmdb'), 'lq': None, 'scale': scale, 'keys': keys, 'size': size}
    make_lmdb_from_imgs(str(gt_dir), out['gt'], files, keys, map_size=1 << 26)
    if scale > 1:
        out['lq'] = str(tmp_path / f'{name}_LQx{scale}.lmdb')
        make_lmdb_from_imgs(str(lq_dir), out['lq'], files, keys, map_size=1 << 26)
    return out


def dataset_options(data: Dict[str, Any], phase: str, name: str, **overrides) -> Dict[str, Any]:
    """A dataset block on ``data`` (from :func:`make_lmdb`): paired LMDBs for SR, on-the-fly
    Gaussian noise (``GaussianNoiseDataset``, sigma 15) on the GT LMDB for scale 1."""
    if data['lq'] is not None:
        ds = dict(name=name, type='PairedImageDataset', dataroot_gt=data['gt'], dataroot_lq=data['lq'],
                  io_backend=dict(type='lmdb'))
    else:
        ds = dict(name=name, type='GaussianNoiseDataset', dataroot_gt=data['gt'], sigma=15,
                  io_backend=dict(type='lmdb'))
    if phase == 'train':
        ds.update(gt_size=16, use_hflip=True, use_rot=True, num_worker_per_gpu=0, batch_size_per_gpu=2,
                  dataset_enlarge_ratio=1, prefetch_mode=None)
    ds.update(overrides)
    return ds


def deep_update(base: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Recursively merge ``overrides`` into ``base`` (dicts merge, everything else replaces)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def default_model_type() -> str:
    """``GRLModel`` (the plugin's model) when it is registered, else BasicSR's ``SRModel``."""
    import grl_plugin  # noqa: F401 - registration
    from basicsr.utils.registry import MODEL_REGISTRY
    return 'GRLModel' if 'GRLModel' in MODEL_REGISTRY else 'SRModel'


def train_options(data: Dict[str, Any], name: str = 'grl_tiny_cli', **overrides) -> Dict[str, Any]:
    """Minimal valid train options for the tiny GRL on ``data`` (dict; see :func:`write_options`)."""
    scale = data['scale']
    opt = dict(
        name=name, model_type=default_model_type(), scale=scale, num_gpu=0, manual_seed=10,
        datasets=dict(train=dataset_options(data, 'train', 'tiny_train'),
                      val=dataset_options(data, 'val', 'tiny_val')),
        network_g=tiny_grl(scale),
        path=dict(pretrain_network_g=None, strict_load_g=True, resume_state=None),
        train=dict(ema_decay=0,
                   optim_g=dict(type='AdamW', lr=2e-4, weight_decay=0, betas=[0.9, 0.99]),
                   scheduler=dict(type='MultiStepLR', milestones=[1000], gamma=0.5),
                   total_iter=4, warmup_iter=-1,
                   pixel_opt=dict(type='L1Loss', loss_weight=1.0, reduction='mean')),
        val=dict(val_freq=2, save_img=False,
                 metrics=dict(psnr=dict(type='calculate_psnr', crop_border=scale, test_y_channel=False),
                              ssim=dict(type='calculate_ssim', crop_border=scale, test_y_channel=False))),
        logger=dict(print_freq=1, save_checkpoint_freq=2, use_tb_logger=False, wandb=dict(project=None)),
    )
    return deep_update(opt, overrides)


def write_options(tmp_path, data: Optional[Dict[str, Any]] = None, filename: str = 'train.yml',
                  **overrides) -> Path:
    """Write a minimal train YAML into ``tmp_path``; returns its path.

    ``data`` is the result of :func:`make_lmdb` (made here with 4 images 32x32, x2, if None).
    Keyword ``overrides`` are top-level option keys deep-merged into the defaults, e.g.
    ``write_options(tmp, data, name='run2', train={'total_iter': 6}, val=None)``.
    """
    tmp_path = Path(tmp_path)
    if data is None:
        data = make_lmdb(tmp_path)
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(train_options(data, **overrides), sort_keys=False), encoding='utf-8')
    return path


def write_test_options(tmp_path, data: Dict[str, Any], pretrain: str, name: str = 'grl_tiny_test',
                       filename: str = 'test.yml', **overrides) -> Path:
    """Write a minimal test YAML (``grl-test``) evaluating ``pretrain`` on ``data``."""
    scale = data['scale']
    opt = dict(
        name=name, model_type=default_model_type(), scale=scale, num_gpu=0, manual_seed=10,
        datasets=dict(test_1=dataset_options(data, 'test', 'tiny_test')),
        network_g=tiny_grl(scale),
        path=dict(pretrain_network_g=str(pretrain), strict_load_g=True, param_key_g='params'),
        val=dict(save_img=True, suffix=None,
                 metrics=dict(psnr=dict(type='calculate_psnr', crop_border=scale, test_y_channel=False),
                              ssim=dict(type='calculate_ssim', crop_border=scale, test_y_channel=False))),
    )
    deep_update(opt, overrides)
    path = Path(tmp_path) / filename
    path.write_text(yaml.safe_dump(opt, sort_keys=False), encoding='utf-8')
    return path


def subprocess_env(extra_pythonpath: Sequence[str] = (), **env) -> Dict[str, str]:
    """Environment for CLI subprocesses: the repo importable, few threads, no GPU probing noise."""
    out = dict(os.environ)
    paths = [str(p) for p in extra_pythonpath] + [str(REPO_ROOT)]
    if out.get('PYTHONPATH'):
        paths.append(out['PYTHONPATH'])
    out['PYTHONPATH'] = os.pathsep.join(paths)
    out.setdefault('OMP_NUM_THREADS', '1')
    out.setdefault('MKL_NUM_THREADS', '1')
    out.update({k: str(v) for k, v in env.items()})
    return out


def run_cli(args: Sequence[str], cwd, timeout: float = 300, extra_pythonpath: Sequence[str] = (),
            **env) -> subprocess.CompletedProcess:
    """Run ``python <args>`` (e.g. ``['-m', 'grl_plugin.train', '-opt', ...]``) in ``cwd``."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(extra_pythonpath, **env))


def run_benchmark(script: str, args: Sequence[str], out_dir, timeout: float = 900):
    """Run ``benchmarks/<script> ARGS --json FILE`` from the repo root: (stdout, the JSON it
    wrote). A failed run fails the calling test with the tail of its stderr."""
    out = Path(out_dir) / 'rows.json'
    res = subprocess.run([sys.executable, str(REPO_ROOT / 'benchmarks' / script), *map(str, args), '--json', str(out)],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout, json.loads(out.read_text())


def read_logs(folder, pattern: str = '*.log') -> str:
    """Concatenated text of the log files directly in ``folder`` (sorted by name)."""
    return '\n'.join(p.read_text(encoding='utf-8', errors='replace') for p in sorted(Path(folder).glob(pattern)))


def state_hash(state_dict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors (sorted by name)."""
    import hashlib

    import torch
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f'{key}|{t.dtype}|{tuple(t.shape)}|'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def assert_same_training_step(ref, fast, x, tol: float, check_output=None) -> None:
    """One L1 training step of ``ref`` and ``fast`` (same weights) on ``x``: equal losses and,
    parameter by parameter, gradients within ``tol`` relative to the reference's largest
    (at least 1). ``check_output(model, out)`` is called on each forward's output."""
    losses = []
    for m in (ref, fast):
        out = m(x)
        if check_output is not None:
            check_output(m, out)
        loss = out.abs().mean()
        loss.backward()
        losses.append(float(loss.detach()))
    assert abs(losses[0] - losses[1]) <= tol
    fast_params = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        g, gf = p.grad, fast_params[name].grad
        assert gf is not None and (g - gf).abs().max() <= tol * max(1.0, float(g.abs().max())), name
