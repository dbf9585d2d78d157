"""The option files under ``options/``: in sync with ``options/generate.py``, loadable by BasicSR,
naming registered components, building their networks with the official kwargs
(``tests/data/official_tasks.json``), and -- shrunk to a tiny network and tiny real-image data -- training for
2 iterations through ``grl-train`` for every task. Also ``grl-train --dry-run``.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from grl_plugin.cli.zoo import RELEASES
from helpers import REPO_ROOT, make_lmdb, official, read_logs, run_cli

OPTIONS = REPO_ROOT / 'options'
OPTION_FILES = sorted(p.relative_to(OPTIONS).as_posix() for p in OPTIONS.rglob('*.yml')
                      if p.parent.name != 'hybrid')  # GRLUNet options: tests/test_blocks_in_archs.py

# Official task kwargs keys that have no effect (SPEC §1.1, B9) and are left out of the files.
NO_EFFECT = {'name', 'img_size', 'double_window', 'stripe_square', 'separable_conv_act', 'use_buffer',
             'use_efficient_buffer', 'offload_to_cpu', 'euclidean_dist'}
SIZE_KEYS = ('embed_dim', 'depths', 'num_heads_window', 'num_heads_stripe', 'local_connection')
SIZE_PRESET = {'T': 'GRL_T', 'S': 'GRL_S', 'B': 'GRL_B'}
SIZE_LONG = {'T': 'tiny', 'S': 'small', 'B': 'base'}

# Released checkpoints (SPEC §8, GitHub release v1.0.0).
RELEASED = {release.file for release in RELEASES.values()}  # the one table of names: grl_plugin.cli.zoo

# Official recipes (SPEC §10): optimizer, lr, weight decay, milestones, total_iter, warmup,
# batch per GPU (x 8 GPUs), patch (LR patch for SR), pixel loss.
RECIPES = {
    'sr': ('AdamW', 1e-4, 1e-4, [100000, 150000, 175000, 200000], 225000, -1, 1, 256, 'L1Loss'),
    'dn': ('AdamW', 1e-4, 1e-4, [100000, 150000, 175000, 200000], 225000, -1, 1, 256, 'L1Loss'),
    'jpeg': ('AdamW', 1e-4, 1e-4, [50000, 100000, 125000, 150000], 175000, -1, 1, 288, 'GRLCharbonnierLoss'),
    'dm': ('AdamW', 2e-4, 1e-4, [400000, 700000, 850000, 900000, 950000], 1000000, 50000, 4, 64,
           'GRLCharbonnierLoss'),
    'db_motion': ('AdamW', 1e-5, 1e-4, [40000, 80000], 40000, -1, 1, 480, 'GRLCharbonnierLoss'),
    'db_defocus': ('AdamW', 5e-5, 1e-4, [20000, 40000, 60000, 70000], 80000, -1, 1, 480, 'GRLCharbonnierLoss'),
    'bsr_psnr': ('Adam', 2e-4, 0, [500000, 800000, 900000, 950000], 1000000, -1, 4, None, 'L1Loss'),
    'bsr_gan': ('Adam', 1e-5, 0, [600000], 600000, -1, 1, None, 'L1Loss'),
}


# ------------------------------------------------------------------------------------ helpers
def load(rel: str):
    """An option file read the way BasicSR reads it (``ordered_yaml`` loader)."""
    import grl_plugin  # noqa: F401 - import fixes before basicsr
    from basicsr.utils.options import ordered_yaml
    with open(OPTIONS / rel, encoding='utf-8') as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def plain(obj):
    """OrderedDicts -> dicts (for comparison and safe_dump)."""
    return json.loads(json.dumps(obj))


def family(rel: str) -> str:
    task = rel.split('/')[1]
    if task == 'bsr':
        return 'bsr_gan' if ('gan' in rel or rel.startswith('test/')) else 'bsr_psnr'
    return task


@pytest.fixture(scope='module')
def task_configs():
    return official('tasks')


def expected_train_kwargs(rel: str, tasks) -> tuple:
    """(task_configs key, expected effective kwargs, exact) for a train/finetune file: the official
    task kwargs; sizes without an official entry take the preset's size keys on the task geometry."""
    from grl_plugin import PRESET_KWARGS
    name = Path(rel).stem
    fam = family(rel)
    size = re.search(r'GRL_([TSB])', name).group(1)
    overrides = {}
    if fam == 'sr':
        key = f'{SIZE_LONG[size]}@sr' if size != 'B' else 'tiny@sr'
        overrides['upscale'] = int(re.search(r'SRx(\d)', name).group(1))
    elif fam == 'dn':
        key = 'tiny@dn'
        overrides['in_channels'] = 1 if '_gray_' in name else 3
    elif fam == 'jpeg':
        key = 'small@jpeg'
        overrides['in_channels'] = 1 if '_gray_' in name else 3
    elif fam == 'dm':
        key = 'small@dm'
    elif fam == 'db_motion':
        key = 'base@db_motion'
    elif fam == 'db_defocus':
        key = 'base@db_defocus'
        if 'dual' in name:
            overrides.update(in_channels=6, out_channels=3)
    elif fam == 'bsr_psnr':
        key = 'base@bsr_psnr'
    else:
        key = 'base_bsr@bsr'
    kwargs = {k: v for k, v in tasks[key]['model_kwargs'].items() if k not in NO_EFFECT}
    exact = not overrides or all(kwargs.get(k) == v for k, v in overrides.items())
    if not key.startswith(SIZE_LONG[size]):
        preset = PRESET_KWARGS[SIZE_PRESET[size]]
        kwargs.update({k: preset[k] for k in SIZE_KEYS})
        if fam == 'sr':
            kwargs['upsampler'] = preset['upsampler']
        exact = False
    kwargs.update(overrides)
    return key, kwargs, exact


@contextlib.contextmanager
def fast_init():
    """Skip the (slow, ~4 s for GRL-B) truncated-normal init: only construction and shapes matter."""
    with mock.patch.object(torch.nn.init, 'trunc_normal_', lambda t, *a, **k: t):
        yield


_NETS = {}


def build(net_opt):
    """``basicsr.archs.build_network`` once per unique network config -> (parameter count, shapes)."""
    from basicsr.archs import build_network
    key = json.dumps(plain(net_opt), sort_keys=True)
    if key not in _NETS:
        with fast_init(), torch.no_grad():
            net = build_network(copy.deepcopy(plain(net_opt)))
        _NETS[key] = (sum(p.numel() for p in net.parameters()),
                      {k: tuple(v.shape) for k, v in net.state_dict().items()}, net)
    return _NETS[key]


# ----------------------------------------------------------------------------- static checks
def test_generated_files_in_sync():
    spec = importlib.util.spec_from_file_location('grl_options_generate', OPTIONS / 'generate.py')
    gen = importlib.util.module_from_spec(spec)
    with mock.patch.object(sys, 'dont_write_bytecode', True):  # no options/__pycache__
        spec.loader.exec_module(gen)
    assert gen.out_of_date() == [], 'run: python options/generate.py'
    files = gen.build()
    assert len(files) == 92
    assert sum(r.startswith('test/') for r in files) == 42  # one per released model
    assert {Path(r).name for r in files if r.startswith('train/') and '/finetune_' in r} == {
        'finetune_GRL_T_SRx4.yml', 'finetune_GRL_T_DN_color_s25.yml', 'finetune_GRL_S_JPEG_color_q10.yml',
        'finetune_GRL_S_DM.yml', 'finetune_GRL_B_GoPro.yml', 'finetune_GRL_B_DPDD_single.yml',
        'finetune_GRL_B_BSR_gan.yml'}


def test_every_released_model_has_a_test_file():
    ckpts = set()
    for rel in OPTION_FILES:
        if rel.startswith('test/'):
            ckpts.add(Path(load(rel)['path']['pretrain_network_g']).name)
    assert ckpts == RELEASED


def _types(opt):
    """(registry name, type) pairs named by an option file."""
    out = [('model', opt['model_type'])]
    out += [('dataset', d['type']) for d in opt['datasets'].values()]
    out += [('arch', opt[k]['type']) for k in ('network_g', 'network_d') if k in opt]
    out += [('loss', v['type']) for k, v in (opt.get('train') or {}).items() if k.endswith('_opt')]
    out += [('metric', m['type']) for m in ((opt.get('val') or {}).get('metrics') or {}).values()]
    return out


@pytest.mark.parametrize('rel', OPTION_FILES)
def test_option_file(rel, task_configs):
    """Loads, names registered components, builds its network(s); BasicSR keys are present."""
    import grl_plugin  # noqa: F401 - registration
    from basicsr.utils import registry
    registries = {'model': registry.MODEL_REGISTRY, 'dataset': registry.DATASET_REGISTRY,
                  'arch': registry.ARCH_REGISTRY, 'loss': registry.LOSS_REGISTRY,
                  'metric': registry.METRIC_REGISTRY}
    opt = load(rel)
    for kind, name in _types(opt):
        reg = registries[kind]
        assert name in reg or f'{name}_basicsr' in reg, f'{kind} {name!r} is not registered'
    for key in ('name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'network_g', 'path', 'val'):
        assert key in opt, key
    assert opt['num_gpu'] == 'auto'
    net = opt['network_g']
    assert net['type'] == 'GRL' or rel.startswith('demo/')  # generated files: explicit kwargs
    assert net['upscale'] == opt['scale']
    count, shapes, _ = build(net)
    assert shapes['conv_first.weight'][1] == net['in_channels']
    if 'network_d' in opt:
        build(opt['network_d'])

    if rel.startswith('demo/'):
        return  # hand-written demo files: loading, registration and building are checked above
    if rel.startswith('train/'):
        for key in ('train', 'logger', 'dist_params'):
            assert key in opt, key
        train_ds = opt['datasets']['train']
        for key in ('batch_size_per_gpu', 'num_worker_per_gpu', 'use_hflip', 'use_rot'):
            assert key in train_ds, key
        assert opt['logger']['print_freq'] == 100 and opt['logger']['save_checkpoint_freq'] == 5000
        assert opt['logger']['use_tb_logger'] is True and opt['logger']['wandb']['project'] is None
        assert opt['val']['val_freq'] == 5000 and opt['val']['save_img'] is False
        assert train_ds['io_backend']['type'] == 'lmdb'
        # network kwargs = the official ones (tests/data/official_tasks.json)
        key, expected, exact = expected_train_kwargs(rel, task_configs)
        got = {k: v for k, v in plain(net).items() if k not in ('type', 'drop_path_rate')}
        assert got == plain(expected), key
        assert net['drop_path_rate'] == 0.1
        if exact:
            assert count == task_configs[key]['num_params'], key
    else:
        assert not opt['path']['pretrain_network_g'].startswith('/')
        assert opt['val']['save_img'] is True and 'tile' in opt['val']
    for ds in opt['datasets'].values():  # the dataset's colour mode matches the network
        if 'color' in ds:
            assert (3 if ds['color'] else 1) == net['in_channels'], ds['name']


@pytest.mark.parametrize('rel', [r for r in OPTION_FILES if r.startswith('train/')])
def test_train_recipe(rel):
    """Official optimizer / schedule / batch / patch / loss (SPEC §10); fine-tunes start from a
    released checkpoint with a lower lr and fewer iterations."""
    opt = load(rel)
    kind, lr, wd, milestones, total, warmup, batch, patch, loss = RECIPES[family(rel)]
    train = opt['train']
    assert train['optim_g']['type'] == kind and train['optim_g']['weight_decay'] == wd
    assert train['scheduler']['type'] == 'MultiStepLR' and train['scheduler']['gamma'] == 0.5
    assert train['pixel_opt']['type'] == loss
    if loss == 'GRLCharbonnierLoss':
        assert train['pixel_opt']['eps'] == 1e-3
    ds = opt['datasets']['train']
    assert ds['batch_size_per_gpu'] == batch
    if patch is not None:
        assert ds['gt_size'] == patch * opt['scale']
    if Path(rel).name.startswith('finetune_'):
        assert Path(opt['path']['pretrain_network_g']).name in RELEASED
        assert train['optim_g']['lr'] < lr and train['total_iter'] < total
    else:
        assert train['optim_g']['lr'] == lr
        assert train['scheduler']['milestones'] == milestones
        assert train['total_iter'] == total and train['warmup_iter'] == warmup
        assert opt['path']['pretrain_network_g'] is None or family(rel) == 'bsr_gan'
    if family(rel) == 'bsr_gan':
        assert train['gan_opt']['type'] == 'GANLoss' and train['gan_opt']['gan_type'] == 'vanilla'
        assert train['gan_opt']['loss_weight'] == 0.1 and train['perceptual_opt']['type'] == 'GRLPerceptualLoss'
        assert dict(train['perceptual_opt']['layer_weights']) == {'conv1_2': 0.1, 'conv2_2': 0.1, 'conv3_4': 1,
                                                                  'conv4_4': 1, 'conv5_4': 1}
        assert plain(opt['network_d']) == {'type': 'UNetDiscriminatorSN', 'num_in_ch': 3, 'num_feat': 64,
                                           'skip_connection': True}


@pytest.mark.parametrize('rel', [r for r in OPTION_FILES if r.startswith('train/')])
def test_train_network_matches_task_kwargs(rel):
    """The same geometry as ``grl_plugin.archs.task_kwargs`` (the plugin's own task table)."""
    archs = pytest.importorskip('grl_plugin.archs')
    if not hasattr(archs, 'task_kwargs'):
        pytest.skip('grl_plugin.archs.task_kwargs not available')
    name = Path(rel).stem
    fam = family(rel)
    size = re.search(r'GRL_([TSB])', name).group(1)
    task = {'bsr_psnr': 'bsr', 'bsr_gan': 'bsr'}.get(fam, fam)
    if fam == 'db_defocus' and 'dual' in name:
        task = 'db_defocus_dual'
    kwargs = dict(color='_gray_' not in name)
    if fam == 'sr':
        kwargs['scale'] = int(re.search(r'SRx(\d)', name).group(1))
    if fam == 'bsr_psnr':
        kwargs['stripe_size'] = [64, 64]  # the PSNR stage; task 'bsr' is the released GAN stage
    expected = plain(archs.task_kwargs(task, size, **kwargs))
    net = plain(load(rel)['network_g'])
    assert {k: net[k] for k in expected if k != 'img_size'} == {k: v for k, v in expected.items() if k != 'img_size'}


def _train_file_for(rel: str) -> str:
    name = Path(rel).name.replace('test_', 'train_')
    if family(rel) == 'bsr_gan':
        name = 'train_GRL_B_BSR_gan.yml'
    return 'train/' + rel.split('/', 1)[1].rsplit('/', 1)[0] + '/' + name


@pytest.mark.parametrize('rel', [r for r in OPTION_FILES if r.startswith('test/')])
def test_test_geometry(rel):
    """A test file runs its released model with the training geometry, except the overrides of
    the released test commands for GRL-B (SPEC B10: df 2 for SR and DN, window 32 for DN)."""
    test_net = plain(load(rel)['network_g'])
    train_net = plain(load(_train_file_for(rel))['network_g'])
    name = Path(rel).stem
    if re.search(r'GRL_B_(SR|DN)', name):
        train_net['anchor_window_down_factor'] = 2
        if '_DN_' in name:
            train_net['window_size'] = 32
    test_net.pop('fairscale_checkpoint'), train_net.pop('fairscale_checkpoint')
    assert test_net == train_net
    assert build(test_net)[1] == build(train_net)[1]  # the same weights load into both


# ------------------------------------------------------------------------ 2-iteration training
TASKS = {
    'sr': 'train/sr/train_GRL_T_SRx4.yml',
    'dn_color': 'train/dn/train_GRL_T_DN_color_s25.yml',
    'dn_gray': 'train/dn/train_GRL_S_DN_gray_s50.yml',
    'jpeg': 'train/jpeg/train_GRL_S_JPEG_gray_q10.yml',
    'dm': 'train/dm/train_GRL_S_DM.yml',
    'db_motion': 'train/db_motion/train_GRL_B_GoPro.yml',
    'db_defocus_dual': 'train/db_defocus/train_GRL_B_DPDD_dual.yml',
    'bsr_psnr': 'train/bsr/train_GRL_B_BSR_psnr.yml',
    'bsr_gan': 'train/bsr/train_GRL_B_BSR_gan.yml',
}
TINY_NET = dict(embed_dim=16, depths=[1], num_heads_window=[1], num_heads_stripe=[1])


def _write_pairs(folder: Path, images, fn):
    import cv2
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images:
        cv2.imwrite(str(folder / name), fn(img))


def _blur(img):
    import cv2
    return cv2.GaussianBlur(img, (7, 7), 2.0)


def _shift(dx):
    import numpy as np

    def fn(img):
        return _blur(np.roll(img, dx, axis=1))
    return fn


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """Tiny real-image data (scikit-image photos): LMDBs for training, folders for validation."""
    import cv2
    base = tmp_path_factory.mktemp('optdata')
    out = {'base': base,
           'sr': make_lmdb(base, n_images=2, size=128, scale=4, name='sr'),
           'srval': make_lmdb(base, n_images=1, size=128, scale=4, name='srval'),
           'nrval': make_lmdb(base, n_images=1, size=256, scale=4, name='nrval'),  # NIQE: >= 2x2 96-px blocks
           'gt': make_lmdb(base, n_images=2, size=64, scale=1, name='gt'),
           'val': make_lmdb(base, n_images=1, size=48, scale=1, name='val')}
    for split, src in (('train', base / 'gt_GT_png'), ('val', base / 'val_GT_png')):
        images = [(p.name, cv2.imread(str(p))) for p in sorted(src.glob('*.png'))]
        _write_pairs(base / split / 'sharp', images, lambda x: x)
        _write_pairs(base / split / 'blur', images, _blur)
        _write_pairs(base / split / 'left', images, _shift(2))
        _write_pairs(base / split / 'right', images, _shift(-2))
    return out


def tiny_options(task: str, data, workdir: Path, pretrain=None) -> Path:
    """The task's option file with a tiny network, tiny data, 2 iterations and validation on 1 image."""
    opt = plain(load(TASKS[task]))
    base = data['base']
    opt['name'] = f'tiny_{task}'
    net = opt['network_g']
    net.update(TINY_NET, drop_path_rate=0.0)  # head, in/out channels and geometry stay the task's
    if 'network_d' in opt:
        opt['network_d']['num_feat'] = 8
    tr, va = opt['datasets']['train'], opt['datasets']['val']
    tr.update(batch_size_per_gpu=1, num_worker_per_gpu=0, dataset_enlarge_ratio=1, prefetch_mode=None)
    gt_lmdb, val_png = data['gt']['gt'], str(base / 'val_GT_png')
    if task == 'sr':
        tr.update(dataroot_gt=data['sr']['gt'], dataroot_lq=data['sr']['lq'], gt_size=128)  # LR patch 32
        va.update(dataroot_gt=str(base / 'srval_GT_png'), dataroot_lq=str(base / 'srval_LQx4_png'))
    elif task in ('dn_color', 'dn_gray', 'jpeg', 'dm'):
        tr.update(dataroot_gt=gt_lmdb, gt_size=32)
        va.update(dataroot_gt=val_png)
    elif task == 'db_motion':  # the folder variant
        tr.update(dataroot_gt=str(base / 'train/sharp'), dataroot_lq=str(base / 'train/blur'),
                  io_backend={'type': 'disk'}, gt_size=32)
        va.update(dataroot_gt=str(base / 'val/sharp'), dataroot_lq=str(base / 'val/blur'))
    elif task == 'db_defocus_dual':
        tr.update(dataroot_gt=str(base / 'train/sharp'), dataroot_lq_left=str(base / 'train/left'),
                  dataroot_lq_right=str(base / 'train/right'), io_backend={'type': 'disk'}, gt_size=32)
        va.update(dataroot_gt=str(base / 'val/sharp'), dataroot_lq_left=str(base / 'val/left'),
                  dataroot_lq_right=str(base / 'val/right'))
    elif task in ('bsr_psnr', 'bsr_gan'):
        tr.update(dataroot_gt=data['sr']['gt'], gt_size=128)
        opt['gt_size'] = 128  # HR crop after the degradation (LR 32)
        opt['queue_size'] = 2
        if task == 'bsr_psnr':
            va.update(dataroot_gt=str(base / 'srval_GT_png'), dataroot_lq=str(base / 'srval_LQx4_png'))
        else:
            va.update(dataroot_lq=str(base / 'nrval_LQx4_png'))
            opt['train']['perceptual_opt']['vgg_weights'] = 'random'  # no download in tests
    opt['path'].update(pretrain_network_g=pretrain, resume_state=None)
    opt['train'].update(total_iter=2, warmup_iter=1 if opt['train']['warmup_iter'] > 0 else -1)
    opt['train']['scheduler']['milestones'] = [1]
    opt['val'].update(val_freq=2)
    opt['logger'].update(print_freq=1, save_checkpoint_freq=2, use_tb_logger=False)
    path = workdir / f'tiny_{task}.yml'
    path.write_text(yaml.safe_dump(opt, sort_keys=False), encoding='utf-8')
    return path


class Runs:
    """Starts the selected tasks' training runs two at a time (2 cores, 1 thread each) and hands
    out their results; the BSR GAN run starts from the BSR PSNR run's generator."""

    def __init__(self, data, workdir: Path, selected):
        self.data, self.workdir = data, workdir
        self.futures = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=2)
        if 'bsr_gan' in selected:
            selected = set(selected) | {'bsr_psnr'}  # the GAN stage starts from the PSNR stage
        order = [t for t in TASKS if t in selected]
        order.sort(key=lambda t: t in ('bsr_psnr', 'bsr_gan'))  # the long chain last
        for task in order:
            self._submit(task)

    def _run(self, task):
        root = self.workdir / task
        cwd = root / 'cwd'
        cwd.mkdir(parents=True, exist_ok=True)
        pretrain = None
        if task == 'bsr_gan' and 'bsr_psnr' in self.futures:
            psnr = self.futures['bsr_psnr'].result()
            weights = psnr['exp'] / 'models' / 'net_g_latest.pth'
            pretrain = str(weights) if weights.is_file() else None
        opt = tiny_options(task, self.data, root, pretrain)
        res = run_cli(['-m', 'grl_plugin.train', '-opt', opt, '--root', root / 'out'], cwd, timeout=600)
        exp = root / 'out' / 'experiments' / f'tiny_{task}'
        return dict(res=res, exp=exp, cwd=cwd, pretrain=pretrain)

    def _submit(self, task):
        with self.lock:
            if task not in self.futures:
                self.futures[task] = self.pool.submit(self._run, task)
            return self.futures[task]

    def get(self, task):
        return self._submit(task).result()


@pytest.fixture(scope='module')
def runs(request, data, tmp_path_factory):
    from conftest import SELECTED
    selected = {item.callspec.params['task'] for item in request.config.stash[SELECTED]
                if getattr(item, 'originalname', None) == 'test_task_trains_two_iterations'}
    r = Runs(data, tmp_path_factory.mktemp('optruns'), selected)
    yield r
    r.pool.shutdown(wait=True)


@pytest.mark.parametrize('task', list(TASKS))
def test_task_trains_two_iterations(task, runs):
    out = runs.get(task)
    res, exp = out['res'], out['exp']
    msg = f'rc={res.returncode}\n--- stdout ---\n{res.stdout[-3000:]}\n--- stderr ---\n{res.stderr[-5000:]}'
    assert res.returncode == 0, msg
    log = read_logs(exp)
    assert 'End of training' in log, msg
    metric = 'niqe' if task == 'bsr_gan' else 'psnr'
    assert re.search(rf'# {metric}: [-0-9.]+', log), log[-3000:]
    weights = torch.load(exp / 'models' / 'net_g_latest.pth', map_location='cpu', weights_only=True)['params']
    opt = load(TASKS[task])
    assert weights['conv_first.weight'].shape[:2] == (16, opt['network_g']['in_channels'])
    if task == 'bsr_gan':
        assert (exp / 'models' / 'net_d_latest.pth').is_file()
        assert out['pretrain'] is not None and 'Loading GRL weights' in log  # from the PSNR stage
    assert list(out['cwd'].iterdir()) == []  # nothing written relative to the CWD


# ----------------------------------------------------------------------------------- --dry-run
def test_dry_run_without_data_reports_and_builds(tmp_path):
    """Missing dataset roots / weights are reported; the model is still built; nothing is written."""
    cwd, root = tmp_path / 'cwd', tmp_path / 'root'
    cwd.mkdir()
    res = run_cli(['-m', 'grl_plugin.train', '-opt', OPTIONS / 'train/bsr/train_GRL_B_BSR_gan.yml', '--dry-run',
                   '--root', root, '--force_yml', 'network_g:embed_dim=16', 'network_g:depths=[1]',
                   'network_g:num_heads_window=[1]', 'network_g:num_heads_stripe=[1]'], cwd, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "datasets.train: RealESRGANDataset 'LSDIR_OST_SCUT_FFHQ': not built, missing dataroot_gt" in out
    assert 'path.pretrain_network_g: experiments/GRL_B_BSR_psnr/models/net_g_latest.pth -- missing' in out
    assert 'vgg_weights: experiments/pretrained_models/vgg19-dcbb9e9d.pth -- missing' in out
    assert 'net_g: GRL' in out and 'net_d: UNetDiscriminatorSN' in out and 'dry run OK' in out
    assert 'optimizer 1: Adam lr 1e-05' in out
    assert not root.exists() and list(cwd.iterdir()) == []


def test_dry_run_with_data(tmp_path, data, capsys):
    """Existing datasets are built and counted (in-process); grl-test --dry-run works too."""
    from grl_plugin.cli.test import main as test_main
    from grl_plugin.cli.train import main as train_main
    opt = tiny_options('dn_gray', data, tmp_path)
    root = tmp_path / 'root'
    assert train_main(['-opt', str(opt), '--root', str(root), '--dry-run']) == 0
    out = capsys.readouterr().out
    assert "datasets.train: GaussianNoiseDataset 'DFWB': 2 images, patch 32, batch 1 per GPU x 1 = 1" in out
    assert "datasets.val: GaussianNoiseDataset 'Set12': 1 images" in out
    assert 'in_channels 1' in out and 'dry run OK' in out and not root.exists()

    test_opt = plain(load('test/dn/test_GRL_S_DN_gray_s50.yml'))
    test_opt['network_g'].update(TINY_NET)
    test_opt['datasets']['test_1']['dataroot_gt'] = str(data['base'] / 'val_GT_png')
    path = tmp_path / 'test.yml'
    path.write_text(yaml.safe_dump(test_opt, sort_keys=False))
    assert test_main(['-opt', str(path), '--root', str(root), '--dry-run']) == 0
    out = capsys.readouterr().out
    assert "datasets.test_1: GaussianNoiseDataset 'Set12': 1 images" in out
    assert "datasets.test_2: GaussianNoiseDataset 'BSD68': not built, missing dataroot_gt" in out
    assert 'dn_grl_small_c1s50.ckpt -- missing, not loaded' in out and not root.exists()


def test_dry_run_reports_build_errors(tmp_path, data, capsys):
    from grl_plugin.cli.train import main
    opt = yaml.safe_load(tiny_options('dn_color', data, tmp_path).read_text())
    del opt['datasets']['train']['sigma']
    opt['train']['optim_g']['nesterov'] = True  # not an AdamW argument: only building the model tells
    path = tmp_path / 'bad.yml'
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    assert main(['-opt', str(path), '--root', str(tmp_path / 'root'), '--dry-run']) == 1
    out = capsys.readouterr().out
    assert "datasets.train: GaussianNoiseDataset 'DFWB': ERROR" in out and 'sigma' in out
    assert 'model GRLModel: ERROR' in out and 'dry run FAILED (2 error(s))' in out


def test_take_dry_run():
    from grl_plugin.cli.train import take_dry_run
    assert take_dry_run(['-opt', 'a.yml', '--dry-run', '--debug']) == (['-opt', 'a.yml', '--debug'], True)
    assert take_dry_run(['-opt', 'a.yml', '--', '--dry-run']) == (['-opt', 'a.yml', '--', '--dry-run'], False)


def test_options_readme_lists_every_folder():
    text = (OPTIONS / 'README.md').read_text(encoding='utf-8')
    for folder in sorted({str(Path(r).parent) for r in OPTION_FILES}):
        assert f'{folder}/' in text, folder
    assert 'generate.py' in text and '--dry-run' in text
