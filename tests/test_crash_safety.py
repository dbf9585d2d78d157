"""Crash safety, exact resume and non-finite losses (issue 8).

* atomic checkpoints: a save that dies half-way leaves the old file intact and nothing that
  ``--auto_resume`` (ours or basicsr's listing) trips over; basicsr itself writes in place;
* ``--auto_resume`` never picks a state whose network file is missing or truncated;
* exact resume: ``grl-train`` killed with SIGKILL after a checkpoint, and again in the middle of
  writing one, then resumed with ``--auto_resume``, logs the same ``l_pix`` at every iteration
  (and ends with the same weights) as a run never interrupted;
* NaN/Inf losses: the step is skipped (weights, optimizer state and EMA unchanged), a warning names
  the iteration and the terms; ``train.nan_tolerance`` in a row stop ``grl-train`` with one line
  and leave the last good checkpoint as the newest.
"""
import copy
import io
import logging
import math
import os
import re
import signal
import textwrap
import types

import pytest
import torch

import grl_plugin  # noqa: F401 - registers, applies the compat fixes
from grl_plugin import patching
from grl_plugin.models import checkpoint_io, exact_resume
from grl_plugin.models.grl_model import GRLModel
from helpers import make_lmdb, read_logs, run_cli, state_hash, write_options


def _fail_msg(res):
    return f'rc={res.returncode}\n--- stdout ---\n{res.stdout[-3000:]}\n--- stderr ---\n{res.stderr[-5000:]}'


def _partial_torch_save(real_save, fraction=0.5):
    """A ``torch.save`` that writes the first part of the file and then fails (a crash mid-write)."""
    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()[:int(len(buf.getvalue()) * fraction)]
        if isinstance(f, (str, os.PathLike)):
            with open(f, 'wb') as out:
                out.write(data)
        else:
            f.write(data)
        raise OSError(28, 'No space left on device (simulated crash mid-write)')
    return save


# ----------------------------------------------------------------------------- atomic saves

def test_atomic_save_keeps_the_old_file_when_the_write_dies(tmp_path, monkeypatch):
    path = tmp_path / '4.state'
    checkpoint_io.atomic_save({'iter': 4, 'w': torch.arange(1000)}, path)
    assert torch.load(path)['iter'] == 4
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # same mode as torch.save
    monkeypatch.setattr(torch, 'save', _partial_torch_save(torch.save))
    with pytest.raises(OSError, match='simulated'):
        checkpoint_io.atomic_save({'iter': 4, 'w': torch.zeros(1000)}, path)
    assert torch.equal(torch.load(path)['w'], torch.arange(1000))  # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ['4.state']  # temporary file removed


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stand_in_model(folder):
    p = torch.nn.Parameter(torch.ones(3))
    optim = torch.optim.Adam([p], lr=1e-3)
    model = types.SimpleNamespace(opt={'path': {'models': str(folder), 'training_states': str(folder)}},
                                  optimizers=[optim], schedulers=[], get_bare_model=lambda n: n,
                                  _rank_world=lambda: (0, 1), _gather=lambda obj: [obj])
    model.training_state = lambda epoch, it: GRLModel.training_state(model, epoch, it)
    return model


def test_basicsr_writes_checkpoints_in_place_and_grl_model_does_not(tmp_path, monkeypatch):
    import basicsr.models.base_model as base_model
    from basicsr.models.base_model import BaseModel
    assert not [k for k in patching.patches() if k.startswith('basicsr.models.base_model:BaseModel.save')]
    monkeypatch.setattr(base_model.time, 'sleep', lambda s: None)  # basicsr retries 3 times, 1 s apart
    monkeypatch.setattr(checkpoint_io.time, 'sleep', lambda s: None)
    model, net = _stand_in_model(tmp_path), torch.nn.Linear(4, 4)
    for which, call in (('save_training_state', lambda f: f(model, 0, 2)),
                        ('save_network', lambda f: f(model, net, 'net_g', 2))):
        path = tmp_path / ('2.state' if which == 'save_training_state' else 'net_g_2.pth')
        original = getattr(BaseModel, which)
        call(original)
        good = path.read_bytes()
        real_save = torch.save
        monkeypatch.setattr(torch, 'save', _partial_torch_save(real_save))
        call(original)  # basicsr: torch.save into the final file -> truncated, "Just ignore it."
        assert 0 < path.stat().st_size < len(good)
        with pytest.raises(Exception):
            torch.load(path)
        monkeypatch.setattr(torch, 'save', real_save)
        call(getattr(GRLModel, which))  # GRLModel: a complete file again...
        good = path.read_bytes()
        monkeypatch.setattr(torch, 'save', _partial_torch_save(real_save))
        call(getattr(GRLModel, which))  # ...that a failing save never touches
        monkeypatch.setattr(torch, 'save', real_save)
        assert path.read_bytes() == good
        torch.load(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['2.state', 'net_g_2.pth']


# -------------------------------------------------------------- which state --auto_resume picks

def _run_folder(root, name='crash', iters=(2, 4, 6), networks=('g',)):
    exp = root / 'experiments' / name
    (exp / 'training_states').mkdir(parents=True)
    (exp / 'models').mkdir()
    for it in iters:
        for net in networks:
            torch.save({'params': {'w': torch.full((64,), float(it))}}, exp / 'models' / f'net_{net}_{it}.pth')
        torch.save({'epoch': 0, 'iter': it, 'optimizers': [], 'schedulers': []},
                   exp / 'training_states' / f'{it}.state')
    return exp


def _opt_for(root, exp, name='crash', **networks):
    opt = {'name': name, 'auto_resume': True, 'root_path': str(root), 'num_gpu': 0, 'is_train': True, 'rank': 0,
           'network_g': {'type': 'GRL'},
           'path': {'resume_state': None, 'pretrain_network_g': None, 'experiments_root': str(exp),
                    'models': str(exp / 'models'), 'training_states': str(exp / 'training_states')}}
    opt.update(networks)
    return opt


def test_stray_temp_files_never_break_auto_resume(tmp_path, monkeypatch):
    from basicsr.utils import scandir
    exp = _run_folder(tmp_path)
    states, models = exp / 'training_states', exp / 'models'
    # what a kill -9 during "save at 8" leaves: the network written, the state's temporary file
    (models / 'net_g_8.pth').write_bytes((models / 'net_g_6.pth').read_bytes())
    for folder, target in ((states, '8.state'), (models, 'net_g_10.pth')):
        with pytest.raises(OSError):
            with monkeypatch.context() as m:
                m.setattr(checkpoint_io, '_fsync_dir', lambda d: None)
                m.setattr(os, 'unlink', lambda p: None)  # as if killed before the cleanup
                m.setattr(torch, 'save', _partial_torch_save(torch.save))
                checkpoint_io.atomic_save({'iter': 8}, folder / target)
    stray = [p.name for p in states.iterdir() if p.name.endswith(checkpoint_io.TEMP_SUFFIX)]
    assert len(stray) == 1 and stray[0].startswith('.8.state.'), stray
    # basicsr's own listing (float() of every "*state" name) is not disturbed by it
    listed = [float(v.split('.state')[0]) for v in scandir(str(states), suffix='state', recursive=False)]
    assert sorted(listed) == [2.0, 4.0, 6.0]
    patching._PENDING.clear()
    opt = _opt_for(tmp_path, exp)
    state = checkpoint_io.load_resume_state(opt)
    assert state['iter'] == 6 and opt['path']['resume_state'] == str(states / '6.state')
    assert opt['path']['pretrain_network_g'] == str(models / 'net_g_6.pth')
    assert not [p for p in (*states.iterdir(), *models.iterdir()) if p.name.endswith(checkpoint_io.TEMP_SUFFIX)]
    assert any('Removed 2 unfinished checkpoint file(s)' in w for w in patching._PENDING)
    patching._PENDING.clear()


def test_auto_resume_skips_states_whose_networks_are_missing_or_truncated(tmp_path):
    exp = _run_folder(tmp_path, iters=(2, 4, 6, 8), networks=('g', 'd'))
    models = exp / 'models'
    (models / 'net_g_8.pth').unlink()  # missing
    data = (models / 'net_d_6.pth').read_bytes()
    (models / 'net_d_6.pth').write_bytes(data[:len(data) // 2])  # truncated (a non-atomic writer died)
    (exp / 'training_states' / '4.state').write_bytes(b'')  # unreadable state
    patching._PENDING.clear()
    opt = _opt_for(tmp_path, exp, network_d={'type': 'UNetDiscriminatorSN'})
    state = checkpoint_io.load_resume_state(opt)
    assert state['iter'] == 2
    assert opt['path']['pretrain_network_g'].endswith('net_g_2.pth')
    assert opt['path']['pretrain_network_d'].endswith('net_d_2.pth')
    warning = ' '.join(patching._PENDING)
    assert 'net_g_8.pth is missing' in warning and 'net_d_6.pth is incomplete' in warning and '4.state' in warning
    patching._PENDING.clear()
    # ignore_resume_networks: net_d is not resumed, so its file does not matter
    opt = _opt_for(tmp_path, exp, network_d={'type': 'UNetDiscriminatorSN'})
    opt['path']['ignore_resume_networks'] = ['network_d']
    assert checkpoint_io.load_resume_state(opt)['iter'] == 6
    patching._PENDING.clear()
    # states exist, none usable: one line instead of silently starting again at iteration 0
    for p in models.iterdir():
        p.unlink()
    with pytest.raises(grl_plugin.CheckpointError, match='no usable training state'):
        checkpoint_io.load_resume_state(_opt_for(tmp_path, exp))
    patching._PENDING.clear()


# ----------------------------------------------------------------- exact resume (in process)

class _CountingDataset(torch.utils.data.Dataset):
    """Items draw from torch's RNG (like random crops/noise); counts how many were loaded."""

    def __init__(self, n=10):
        self.n, self.loaded = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loaded += 1
        return {'i': torch.tensor(i), 'r': torch.rand(1)}


def _loader(dataset, sampler_cls):
    from basicsr.data import build_dataloader
    opt = {'phase': 'train', 'batch_size_per_gpu': 2, 'num_worker_per_gpu': 0}
    return build_dataloader(dataset, opt, num_gpu=0, dist=False, sampler=sampler_cls(dataset, 1, 0), seed=0)


def test_prefetcher_resumes_inside_the_epoch_without_loading(tmp_path):
    import basicsr.train
    assert patching.patches()['basicsr.train:CPUPrefetcher'] == 'grl_plugin.models.exact_resume'
    orig_sampler = patching.original('basicsr.train', 'EnlargedSampler')
    orig_prefetcher = patching.original('basicsr.train', 'CPUPrefetcher')
    assert basicsr.train.CPUPrefetcher is not orig_prefetcher

    def batches(prefetcher, n):
        out = []
        for _ in range(n):
            b = prefetcher.next()
            out.append(None if b is None else (b['i'].tolist(), b['r'].tolist()))
        return out

    # uninterrupted: 2 batches, "save", 3 more (the epoch has 5)
    torch.manual_seed(0)
    ds = _CountingDataset()
    loader = _loader(ds, basicsr.train.EnlargedSampler)
    pre = basicsr.train.CPUPrefetcher(loader)
    loader.sampler.set_epoch(3)
    pre.reset()
    batches(pre, 2)
    progress, rng = exact_resume.training_progress(), exact_resume.get_rng_state()
    assert progress['batches'] == 2 and progress['epoch'] == 3 and progress['num_batches'] == 5
    expected = batches(pre, 4)
    assert expected[-1] is None

    # basicsr: the resumed epoch starts again from its first batch, and a new iterator draws from torch's RNG
    torch.manual_seed(1)
    before = torch.get_rng_state()
    plain_loader = _loader(_CountingDataset(), orig_sampler)
    plain = orig_prefetcher(plain_loader)
    assert not torch.equal(before, torch.get_rng_state())
    plain_loader.sampler.set_epoch(3)
    plain.reset()
    assert batches(plain, 1)[0][0] != expected[0][0]

    # the fix: resumed after the 2 batches, RNG states restored before the next one
    torch.manual_seed(1234)  # whatever the resumed process did before
    ds2 = _CountingDataset()
    loader2 = _loader(ds2, basicsr.train.EnlargedSampler)
    pre2 = basicsr.train.CPUPrefetcher(loader2)
    exact_resume.resume_progress(progress, rng)
    loader2.sampler.set_epoch(3)
    ds2.loaded = 0
    pre2.reset()
    assert batches(pre2, 4) == expected
    assert ds2.loaded == 6  # the 3 remaining batches only: the skipped ones were never loaded
    assert exact_resume.training_progress()['batches'] == 5


@pytest.fixture
def cpu_cuda_streams(monkeypatch):
    """Lets basicsr's CUDAPrefetcher run on the CPU (its streams become no-ops; num_gpu 0 keeps
    the batches on the CPU), to test the resume logic without a GPU."""
    import contextlib

    class _Stream:
        def wait_stream(self, other):
            pass
    monkeypatch.setattr(torch.cuda, 'Stream', lambda *a, **k: _Stream())
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda *a, **k: _Stream())
    monkeypatch.setattr(torch.cuda, 'stream', lambda s: contextlib.nullcontext())


def test_cuda_prefetcher_resumes_with_the_rng_of_its_look_ahead(cpu_cuda_streams):
    """CUDAPrefetcher draws batch k+1 when it hands out batch k, before the training step of batch
    k draws its own random numbers: a resume must redraw batch k+1 from the RNG states of that
    moment, then continue from those of the save."""
    import basicsr.train

    def train(prefetcher, n):  # draw a batch, then a "training step" that draws from torch's RNG
        out = []
        for _ in range(n):
            b = prefetcher.next()
            out.append(None if b is None else (b['i'].tolist(), b['r'].tolist(), torch.rand(1).item()))
        return out

    torch.manual_seed(0)
    loader = _loader(_CountingDataset(), basicsr.train.EnlargedSampler)
    pre = basicsr.train.CUDAPrefetcher(loader, {'num_gpu': 0})
    loader.sampler.set_epoch(1)
    pre.reset()
    train(pre, 2)
    progress, rng = exact_resume.training_progress(), exact_resume.get_rng_state()
    assert progress['batches'] == 2 and progress['rng_before_prefetch'] is not None
    expected = train(pre, 4)
    assert expected[-1] is None

    torch.manual_seed(99)
    ds2 = _CountingDataset()
    loader2 = _loader(ds2, basicsr.train.EnlargedSampler)
    pre2 = basicsr.train.CUDAPrefetcher(loader2, {'num_gpu': 0})
    exact_resume.resume_progress(progress, rng)
    loader2.sampler.set_epoch(1)
    ds2.loaded = 0
    pre2.reset()
    assert train(pre2, 4) == expected
    assert ds2.loaded == 6


# -------------------------------------------------------------------- NaN losses (in process)

NET = dict(type='GRL', embed_dim=16, depths=[1], num_heads_window=[1], num_heads_stripe=[1], window_size=4,
           stripe_size=[8, 8], stripe_groups=[None, None], anchor_window_down_factor=2, mlp_ratio=2,
           upsampler='', upscale=1, drop_path_rate=0.0)


def _model_opt(tmp_path, **train):
    opt = {'name': 'nan', 'model_type': 'GRLModel', 'num_gpu': 0, 'dist': False, 'is_train': True, 'scale': 1,
           'rank': 0, 'world_size': 1, 'network_g': copy.deepcopy(NET),
           'path': {'pretrain_network_g': None, 'strict_load_g': True, 'models': str(tmp_path / 'models'),
                    'training_states': str(tmp_path / 'states'), 'visualization': str(tmp_path / 'vis')},
           'train': {'ema_decay': 0.9, 'optim_g': {'type': 'AdamW', 'lr': 1e-3},
                     'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5}, 'total_iter': 10,
                     'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}}}
    opt['train'].update(train)
    return opt


def _snapshot(*nets):
    """Parameters (not buffers: spectral norm updates its vectors in every training forward)."""
    return [{k: v.detach().clone() for k, v in net.named_parameters()} for net in nets]


def _same(snapshots, *nets):
    return all(torch.equal(s[k], v) for s, net in zip(snapshots, nets) for k, v in net.named_parameters())


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self):
        return '\n'.join(self.lines)


@pytest.fixture
def basicsr_log():
    """Messages of basicsr's logger (it does not propagate to the root logger)."""
    from basicsr.utils import get_root_logger
    logger = get_root_logger()
    handler = _Records()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _nan_on(cri, when):
    """Wrap a loss module: NaN (still differentiable) while ``when()`` is true."""
    def loss(*args, **kwargs):
        out = cri(*args, **kwargs)
        return out * float('nan') if when() else out
    return loss


def test_nan_loss_skips_the_step_and_stops_after_nan_tolerance(tmp_path, basicsr_log):
    from basicsr.models import build_model
    from grl_plugin.models.grl_model import NonFiniteLossError
    torch.manual_seed(0)
    model = build_model(_model_opt(tmp_path, nan_tolerance=3, grad_clip=1.0))
    assert model.nan_tolerance == 3
    batch = {'lq': torch.rand(2, 3, 16, 16), 'gt': torch.rand(2, 3, 16, 16)}
    model.feed_data(batch)
    model.optimize_parameters(1)  # one good step: optimizer state exists
    nan = {'on': True}
    model.cri_pix = _nan_on(model.cri_pix, lambda: nan['on'])
    before = _snapshot(model.net_g, model.net_g_ema)
    optim_before = copy.deepcopy(model.optimizer_g.state_dict())
    for it in (2, 3):
        model.optimize_parameters(it)
        assert _same(before, model.net_g, model.net_g_ema)  # no parameter or EMA update
        assert all(p.grad is None for p in model.net_g.parameters())  # gradients zeroed
        assert math.isnan(model.get_current_log()['l_pix'])
    assert str(model.optimizer_g.state_dict()) == str(optim_before)
    assert model.nonfinite_streak == 2
    text = basicsr_log.text
    assert 'Iteration 2: non-finite loss (l_pix=nan' in text and 'optimizer step skipped' in text
    assert '(2 in a row; train.nan_tolerance: 3)' in text
    # a checkpoint due during the streak is not written
    model.save(0, 3)
    assert not (tmp_path / 'models').exists() or not list((tmp_path / 'models').iterdir())
    # a good iteration ends the streak
    nan['on'] = False
    model.optimize_parameters(4)
    assert model.nonfinite_streak == 0 and not _same(before, model.net_g)
    nan['on'] = True
    model.optimize_parameters(5)
    model.optimize_parameters(6)
    with pytest.raises(NonFiniteLossError) as err:
        model.optimize_parameters(7)
    msg = str(err.value)
    assert '\n' not in msg and 'iteration 7: 3 iterations in a row with a non-finite loss (l_pix=nan)' in msg
    assert 'train.nan_tolerance: 3' in msg and isinstance(err.value, RuntimeError)

    with pytest.raises(ValueError, match='nan_tolerance'):
        build_model(_model_opt(tmp_path, nan_tolerance=0))
    assert build_model(_model_opt(tmp_path)).nan_tolerance == 5
    assert build_model(_model_opt(tmp_path, nan_tolerance=None)).nan_tolerance is None


def test_nan_discriminator_loss_skips_generator_and_discriminator(tmp_path, basicsr_log):
    from basicsr.models import build_model
    torch.manual_seed(0)
    opt = _model_opt(tmp_path, optim_d={'type': 'Adam', 'lr': 1e-3}, net_d_iters=1, net_d_init_iters=0,
                     gan_opt={'type': 'GANLoss', 'gan_type': 'vanilla', 'loss_weight': 0.1})
    opt.update(model_type='GRLRealESRGANModel', scale=2, high_order_degradation=False, queue_size=4,
               network_d={'type': 'UNetDiscriminatorSN', 'num_in_ch': 3, 'num_feat': 8, 'skip_connection': True})
    opt['network_g'].update(upscale=2, upsampler='pixelshuffle')
    model = build_model(opt)
    batch = {'lq': torch.rand(2, 3, 16, 16), 'gt': torch.rand(2, 3, 32, 32)}
    model.feed_data(batch)
    model.optimize_parameters(1)
    assert all(math.isfinite(v) for v in model.get_current_log().values())
    cri_gan = model.cri_gan
    model.cri_gan = lambda pred, target, is_disc=False: (cri_gan(pred, target, is_disc=is_disc)
                                                         * (float('nan') if is_disc and target else 1.0))
    before = _snapshot(model.net_g, model.net_g_ema, model.net_d)
    model.feed_data(batch)
    model.optimize_parameters(2)
    assert _same(before, model.net_g, model.net_g_ema, model.net_d)
    assert all(p.grad is None for p in [*model.net_g.parameters(), *model.net_d.parameters()])
    log = model.get_current_log()
    assert math.isnan(log['l_d_real']) and math.isfinite(log['l_g_gan'])
    assert 'Iteration 2: non-finite loss (l_d_real=nan)' in basicsr_log.text
    model.cri_gan = cri_gan
    model.optimize_parameters(3)
    assert not _same(before[:1], model.net_g) and not _same(before[2:], model.net_d)
    assert model.nonfinite_streak == 0


DEGRADATION = dict(
    high_order_degradation=True, gt_usm=True, resize_prob=[0.2, 0.7, 0.1], resize_range=[0.15, 1.5],
    gaussian_noise_prob=0.5, noise_range=[1, 30], poisson_scale_range=[0.05, 3], gray_noise_prob=0.4,
    jpeg_range=[30, 95], second_blur_prob=0.8, resize_prob2=[0.3, 0.4, 0.3], resize_range2=[0.3, 1.2],
    gaussian_noise_prob2=0.5, noise_range2=[1, 25], poisson_scale_range2=[0.05, 2.5], gray_noise_prob2=0.4,
    jpeg_range2=[30, 95], gt_size=64, queue_size=4)


def test_realesrnet_training_state_restores_the_training_pair_pool(tmp_path):
    """The Real-ESR models draw their batches from a pool (``queue_lr``/``queue_gt``) that BasicSR
    does not save: resuming from the training state (pool + RNG states) gives the same losses."""
    from basicsr.models import build_model

    def make_model(seed):
        torch.manual_seed(seed)
        opt = _model_opt(tmp_path)
        opt.update(model_type='GRLRealESRNetModel', scale=4, **copy.deepcopy(DEGRADATION))
        opt['network_g'].update(upscale=4, upsampler='nearest+conv')
        return build_model(opt)

    delta = torch.zeros(2, 21, 21)
    delta[:, 10, 10] = 1
    g = torch.Generator().manual_seed(0)
    batches = [{'gt': torch.rand(2, 3, 64, 64, generator=g), 'kernel1': delta, 'kernel2': delta,
                'sinc_kernel': delta} for _ in range(4)]

    def steps(model, its):
        out = []
        for it in its:
            model.feed_data(batches[it - 1])
            model.optimize_parameters(it)
            out.append(model.get_current_log()['l_pix'])
        return out

    a = make_model(0)
    steps(a, (1, 2))  # the pool (4 pairs) is full now; from step 3 on batches come out of it
    state = copy.deepcopy(a.training_state(0, 2))  # as saved (the optimizer state is updated in place)
    weights = _snapshot(a.net_g, a.net_g_ema)
    assert state['degradation_queue']['ptr'] == 4
    expected = steps(a, (3, 4))

    for restore_pool in (True, False):
        b = make_model(1)
        for net, snap in zip((b.net_g, b.net_g_ema), weights):
            net.load_state_dict(snap, strict=False)
        resumed = copy.deepcopy(state)
        if not restore_pool:
            del resumed['degradation_queue']  # what a BasicSR training state holds
        b.resume_training(resumed)
        exact_resume.forget_pending_resume()  # no train prefetcher here: restore the RNG states by hand
        exact_resume.set_rng_state(state['exact_resume'][0]['rng'])
        if restore_pool:
            assert steps(b, (3, 4)) == expected
        else:
            assert steps(b, (3, 4)) != expected


# ---------------------------------------------------------- grl-train: kill -9, NaN (subprocess)

CRASH_MODULE = '''
"""Imported by grl-train --import in the tests: a GRLModel that kills its own process (SIGKILL)
after saving iteration $GRL_KILL_AT, or in the middle of writing that iteration's training state,
and an L1 loss that turns NaN from its nan_from-th call on."""
import io
import os
import signal

import torch
import torch.nn.functional as F
from basicsr.utils.registry import LOSS_REGISTRY, MODEL_REGISTRY

from grl_plugin.patching import register
from grl_plugin.models import GRLModel


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


class CrashTestGRLModel(GRLModel):
    def save(self, epoch, current_iter):
        at, mode = int(os.environ.get('GRL_KILL_AT', '-2')), os.environ.get('GRL_KILL_MODE', '')
        if current_iter == at and mode == 'during_state':
            real_save = torch.save

            def dying_save(obj, f, *args, **kwargs):
                if isinstance(obj, dict) and 'optimizers' in obj:  # the training state
                    buf = io.BytesIO()
                    real_save(obj, buf, *args, **kwargs)
                    f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    _die()
                return real_save(obj, f, *args, **kwargs)
            torch.save = dying_save
        super().save(epoch, current_iter)
        if current_iter == at and mode == 'after_save':
            _die()


class NaNFromL1Loss(torch.nn.Module):
    def __init__(self, nan_from=1, loss_weight=1.0, reduction='mean'):
        super().__init__()
        self.nan_from, self.loss_weight, self.calls = nan_from, loss_weight, 0

    def forward(self, pred, target, weight=None, **kwargs):
        self.calls += 1
        loss = self.loss_weight * F.l1_loss(pred, target)
        return loss * float('nan') if self.calls >= self.nan_from else loss


register(MODEL_REGISTRY, CrashTestGRLModel)
register(LOSS_REGISTRY, NaNFromL1Loss)
'''

_ITER_LINE = re.compile(r'iter:\s*([\d,]+), lr:.*?l_pix: (\S+)')


def _losses(log_text):
    """[(iter, l_pix string), ...] in the order logged."""
    return [(int(m.group(1).replace(',', '')), m.group(2)) for m in _ITER_LINE.finditer(log_text)]


@pytest.fixture(scope='module')
def cli_data(tmp_path_factory):
    base = tmp_path_factory.mktemp('crash')
    (base / 'crash_helpers.py').write_text(textwrap.dedent(CRASH_MODULE), encoding='utf-8')
    # 6 images, batch 2: 3 iterations per epoch, so checkpoints (every 2) fall inside epochs.
    # Scale 1: GaussianNoiseDataset (random crops, flips and noise from python's and torch's RNGs).
    return dict(base=base, data=make_lmdb(base / 'data', n_images=6, size=32, scale=1))


def _train(cli_data, opt, root, *extra, **env):
    return run_cli(['-m', 'grl_plugin.train', '-opt', opt, '--root', root, '--import', 'crash_helpers', *extra],
                   cli_data['base'], timeout=600, extra_pythonpath=[cli_data['base']], **env)


def test_kill_9_then_auto_resume_logs_the_same_losses(cli_data, tmp_path):
    opt_kwargs = dict(model_type='CrashTestGRLModel', manual_seed=7,
                      train={'total_iter': 8, 'ema_decay': 0.9},
                      logger={'print_freq': 1, 'save_checkpoint_freq': 2})
    ref_opt = write_options(tmp_path, cli_data['data'], filename='ref.yml', name='crash_ref', **opt_kwargs)
    run_opt = write_options(tmp_path, cli_data['data'], filename='run.yml', name='crash_run', **opt_kwargs)
    ref_root, root = tmp_path / 'ref', tmp_path / 'run'

    ref = _train(cli_data, ref_opt, ref_root)
    assert ref.returncode == 0, _fail_msg(ref)
    ref_exp = ref_root / 'experiments' / 'crash_ref'
    reference = dict(_losses(read_logs(ref_exp)))
    assert sorted(reference) == list(range(1, 9)), reference

    exp = root / 'experiments' / 'crash_run'
    # 1. SIGKILL right after the checkpoint of iteration 4 (inside epoch 1: 1 of its 3 batches done)
    res = _train(cli_data, run_opt, root, GRL_KILL_AT=4, GRL_KILL_MODE='after_save')
    assert res.returncode == -signal.SIGKILL, _fail_msg(res)
    assert (exp / 'training_states' / '4.state').is_file() and (exp / 'models' / 'net_g_4.pth').is_file()
    # 2. resumed, then SIGKILL in the middle of writing 6.state (net_g_6.pth already written)
    res = _train(cli_data, run_opt, root, '--auto_resume', GRL_KILL_AT=6, GRL_KILL_MODE='during_state')
    assert res.returncode == -signal.SIGKILL, _fail_msg(res)
    assert (exp / 'models' / 'net_g_6.pth').is_file() and not (exp / 'training_states' / '6.state').exists()
    stray = [p.name for p in (exp / 'training_states').iterdir() if p.name.endswith(checkpoint_io.TEMP_SUFFIX)]
    assert len(stray) == 1 and stray[0].startswith('.6.state.'), stray
    # 3. resumed again (from 4: the interrupted 6.state never became a state) up to the end
    res = _train(cli_data, run_opt, root, '--auto_resume')
    assert res.returncode == 0, _fail_msg(res)

    logs = sorted(exp.glob('train_*.log'))
    assert len(logs) == 3, logs
    last = logs[-1].read_text()
    assert 'Resuming training from epoch: 1, iter: 4.' in last
    assert 'Resuming inside epoch 1: skipping the 1 batch(es) already trained on; RNG states restored.' in last
    assert 'Removed 1 unfinished checkpoint file(s)' in last
    assert [p.name for p in (exp / 'training_states').iterdir()] and \
        not [p for p in (exp / 'training_states').iterdir() if p.name.endswith(checkpoint_io.TEMP_SUFFIX)]
    runs = [_losses(p.read_text()) for p in logs]
    assert [it for it, _ in runs[0]] == [1, 2, 3, 4]
    assert [it for it, _ in runs[1]] == [5, 6]
    assert [it for it, _ in runs[2]] == [5, 6, 7, 8]
    for run in runs:
        for it, value in run:
            assert value == reference[it], (it, value, reference[it], runs, reference)
    # not only the printed losses: the final weights (and EMA) are bit-identical
    ref_w, run_w = (torch.load(e / 'models' / 'net_g_latest.pth') for e in (ref_exp, exp))
    for key in ('params', 'params_ema'):
        assert state_hash(ref_w[key]) == state_hash(run_w[key]), key


def test_nan_losses_in_a_row_stop_grl_train_with_one_line(cli_data, tmp_path):
    opt = write_options(tmp_path, cli_data['data'], name='nan_run', val=None,
                        train={'total_iter': 10, 'nan_tolerance': 3,
                               'pixel_opt': {'type': 'NaNFromL1Loss', 'nan_from': 5, 'loss_weight': 1.0}},
                        logger={'print_freq': 1, 'save_checkpoint_freq': 2})
    root = tmp_path / 'root'
    res = _train(cli_data, opt, root)
    assert res.returncode == 2, _fail_msg(res)
    assert 'Traceback' not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith('grl-train: error: iteration 7: 3 iterations in a row with a non-finite loss '
                           '(l_pix=nan); training stopped (train.nan_tolerance: 3)'), res.stderr[-2000:]
    assert 'the newest checkpoint is iteration 4' in last
    exp = root / 'experiments' / 'nan_run'
    log = read_logs(exp)
    for it in (5, 6, 7):
        assert f'Iteration {it}: non-finite loss (l_pix=nan): optimizer step skipped' in log
    assert 'Iteration 6: checkpoint not saved' in log
    assert sorted(p.name for p in (exp / 'models').iterdir()) == ['net_g_2.pth', 'net_g_4.pth']
    assert sorted(p.name for p in (exp / 'training_states').iterdir()) == ['2.state', '4.state']
    params = torch.load(exp / 'models' / 'net_g_4.pth')['params']
    assert all(torch.isfinite(v).all() for v in params.values())
    # the last good checkpoint is what --auto_resume picks
    state = checkpoint_io.load_resume_state({'name': 'nan_run', 'auto_resume': True, 'root_path': str(root), 'num_gpu': 0,
                                      'rank': 0, 'network_g': {}, 'path': {
                                          'resume_state': None, 'models': str(exp / 'models'),
                                          'training_states': str(exp / 'training_states')}})
    assert state['iter'] == 4
