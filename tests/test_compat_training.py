"""grl_plugin.compat pipeline fixes: each one shows basicsr's original misbehaving under the
condition the fix is for, then the patched code working. Parts whose condition cannot occur
on this machine (e.g. "no CUDA" on a GPU machine) skip with the reason.
"""
import logging
import os
import re
import sys
import types

import pytest
import torch

from helpers import make_lmdb, read_logs, run_cli, write_options

CUDA = torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(CUDA, reason='CUDA is available here: the CPU-only failure cannot occur')


@pytest.fixture(scope='module')
def compat():
    import grl_plugin  # noqa: F401
    from grl_plugin import compat
    compat.apply_basicsr()
    return compat


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_lmdb(tmp_path_factory.mktemp('data'), n_images=2, size=16, scale=2)


@pytest.fixture
def process_group(monkeypatch):
    """A 1-process gloo group in this process (destroyed afterwards)."""
    import torch.distributed as dist
    from helpers import free_port
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip('torch.distributed with gloo is not available')
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


# --- apply_basicsr ------------------------------------------------------------------------

def test_apply_basicsr_is_idempotent_and_recorded(compat):
    import basicsr.train
    from basicsr.models.base_model import BaseModel
    first = compat.apply_basicsr()
    objs = (basicsr.train.load_resume_state, basicsr.train.parse_options, BaseModel.get_optimizer)
    assert compat.apply_basicsr() == first == compat.applied()
    assert objs == (basicsr.train.load_resume_state, basicsr.train.parse_options, BaseModel.get_optimizer)
    assert len(first) == len(set(first))
    for name in ('fix_optimizers', 'fix_device_options'):  # needed with basicsr 1.4.2
        assert name in first
    if not CUDA:
        assert 'fix_dist_init_cpu' in first and 'fix_ddp_cpu' in first
    # every patch remembers what it replaced
    assert compat.original('basicsr.train', 'load_resume_state').__module__ == 'basicsr.train'
    assert compat.original('basicsr.train', 'parse_options').__module__ == 'basicsr.utils.options'
    assert compat.original('basicsr.models.base_model', 'BaseModel.get_optimizer').__module__ == \
        'basicsr.models.base_model'


def test_package_import_applies_pipeline_fixes():
    res = run_cli(['-c', 'import grl_plugin, basicsr.train\nfrom grl_plugin import compat, patching\n'
                   'print(sorted(set(patching.patches().values())), "fix_optimizers" in compat.applied())'],
                  os.getcwd(), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == ("['grl_plugin.compat', 'grl_plugin.data.robust', 'grl_plugin.models.checkpoint_io', "
                                  "'grl_plugin.models.exact_resume'] True")


# --- 1. resume ----------------------------------------------------------------------------

def _saved_run(root, name='resume_run', it=2):
    """A run folder as basicsr leaves it: training_states/<it>.state with an AdamW state."""
    exp = root / 'experiments' / name
    (exp / 'training_states').mkdir(parents=True)
    (exp / 'models').mkdir()
    p = torch.nn.Parameter(torch.ones(3))
    optim = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(3)
    optim.step()
    state = {'epoch': 1, 'iter': it, 'optimizers': [optim.state_dict()], 'schedulers': []}
    torch.save(state, exp / 'training_states' / f'{it}.state')
    torch.save(state, exp / 'training_states' / '1.state')  # older one: the newest must win
    for i in (1, it):  # the network files each state resumes (a state without them is skipped)
        torch.save({'params': {}}, exp / 'models' / f'net_g_{i}.pth')
    return exp


def _resume_opt(root, exp, name='resume_run'):
    return {'name': name, 'auto_resume': True, 'root_path': str(root), 'num_gpu': 0, 'is_train': True,
            'network_g': {'type': 'GRL'},
            'path': {'resume_state': None, 'pretrain_network_g': None, 'experiments_root': str(exp),
                     'models': str(exp / 'models'), 'training_states': str(exp / 'training_states')}}


def test_resume_from_another_directory(compat, tmp_path, monkeypatch):
    import basicsr.train
    root = tmp_path / 'root'
    exp = _saved_run(root)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    orig = compat.original('basicsr.train', 'load_resume_state')
    assert orig is not basicsr.train.load_resume_state
    opt = _resume_opt(root, exp)
    assert orig(opt) is None  # basicsr: silently starts again at iteration 0
    assert opt['path']['resume_state'] is None

    state = basicsr.train.load_resume_state(opt)
    assert state['iter'] == 2 and state['epoch'] == 1
    assert opt['path']['resume_state'] == str(exp / 'training_states' / '2.state')
    assert opt['path']['pretrain_network_g'] == str(exp / 'models' / 'net_g_2.pth')  # check_resume ran
    exp_avg = state['optimizers'][0]['state'][0]['exp_avg']
    assert exp_avg.device.type == ('cuda' if CUDA and opt['num_gpu'] else 'cpu')
    assert list(elsewhere.iterdir()) == []


@needs_no_cuda
def test_resume_on_cpu(compat, tmp_path, monkeypatch):
    import basicsr.train
    exp = _saved_run(tmp_path)
    monkeypatch.chdir(tmp_path)  # where basicsr looks: it finds the state, then needs CUDA
    orig = compat.original('basicsr.train', 'load_resume_state')
    with pytest.raises((AssertionError, RuntimeError), match='CUDA'):
        orig(_resume_opt(tmp_path, exp))
    opt = _resume_opt(tmp_path, exp)
    opt['num_gpu'] = 1  # even a GPU option file resumes on the CPU when there is no CUDA
    state = basicsr.train.load_resume_state(opt)
    assert state['optimizers'][0]['state'][0]['exp_avg'].device.type == 'cpu'


def test_resume_explicit_state_and_nothing_to_resume(compat, tmp_path):
    import basicsr.train
    exp = _saved_run(tmp_path)
    opt = _resume_opt(tmp_path, exp)
    opt['auto_resume'] = False
    assert basicsr.train.load_resume_state(opt) is None
    opt['path']['resume_state'] = str(exp / 'training_states' / '1.state')
    assert basicsr.train.load_resume_state(opt)['iter'] == 2  # (both files hold iter 2)
    empty = _resume_opt(tmp_path / 'none', tmp_path / 'none' / 'experiments' / 'x')
    assert basicsr.train.load_resume_state(empty) is None


# --- 2. distributed on CPU ----------------------------------------------------------------

@needs_no_cuda
def test_dist_init_on_cpu(compat, monkeypatch):
    import torch.distributed as dist
    from basicsr.utils import dist_util
    from helpers import free_port
    if not dist.is_gloo_available():
        pytest.skip('gloo backend not available')
    for key, value in dict(RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()),
                           LOCAL_RANK='0').items():
        monkeypatch.setenv(key, value)
    orig = compat.original('basicsr.utils.dist_util', '_init_dist_pytorch')
    assert orig is not dist_util._init_dist_pytorch
    with pytest.raises(ZeroDivisionError):  # rank % torch.cuda.device_count()
        orig('nccl')
    assert not dist.is_initialized()

    dist_util._init_dist_pytorch('nccl')  # what init_dist('pytorch') calls
    try:
        assert dist.is_initialized() and dist.get_backend() == 'gloo'
        assert dist_util.get_dist_info() == (0, 1)
    finally:
        dist.destroy_process_group()


@needs_no_cuda
def test_dist_init_outside_torchrun_names_torchrun(compat, monkeypatch):
    from basicsr.utils import dist_util
    for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(compat.CompatError, match='torchrun'):
        dist_util._init_dist_pytorch('nccl')


@needs_no_cuda
def test_slurm_dist_init_on_cpu(compat, monkeypatch):
    """--launcher slurm without CUDA: gloo from the SLURM_* variables (README's srun line; the
    end-to-end run with two tasks is tests/test_docs.py::test_train_blocks)."""
    import torch.distributed as dist
    from basicsr.utils import dist_util
    from helpers import free_port
    if not dist.is_gloo_available():
        pytest.skip('gloo backend not available')
    for key in ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST'):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(compat.CompatError, match='srun'):
        dist_util._init_dist_slurm('nccl')
    for key, value in dict(SLURM_PROCID='0', SLURM_NTASKS='1', SLURM_NODELIST='localhost',
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr('shutil.which', lambda name: None)  # no scontrol here: the node name is used
    for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'LOCAL_RANK'):
        monkeypatch.delenv(key, raising=False)
    dist_util._init_dist_slurm('nccl')
    try:
        assert dist.is_initialized() and dist.get_backend() == 'gloo'
        assert dist_util.get_dist_info() == (0, 1)
    finally:
        dist.destroy_process_group()


@needs_no_cuda
def test_ddp_wrap_on_cpu(compat, process_group):
    from basicsr.models.base_model import BaseModel
    from torch.nn.parallel import DistributedDataParallel
    fake = types.SimpleNamespace(opt={'dist': True, 'num_gpu': 0}, device=torch.device('cpu'))
    orig = compat.original('basicsr.models.base_model', 'BaseModel.model_to_device')
    with pytest.raises((AssertionError, RuntimeError), match='CUDA'):  # device_ids=[torch.cuda.current_device()]
        orig(fake, torch.nn.Linear(2, 2))

    net = BaseModel.model_to_device(fake, torch.nn.Linear(2, 2))
    assert isinstance(net, DistributedDataParallel) and net.device_ids is None
    net(torch.ones(4, 2)).sum().backward()  # gradients all-reduced through gloo
    assert net.module.weight.grad is not None
    plain = BaseModel.model_to_device(types.SimpleNamespace(opt={'dist': False, 'num_gpu': 0},
                                                            device=torch.device('cpu')), torch.nn.Linear(2, 2))
    assert isinstance(plain, torch.nn.Linear)


# --- 3. optimizers ------------------------------------------------------------------------

def test_optimizers_by_name(compat):
    from basicsr.models.base_model import BaseModel
    params = [torch.nn.Parameter(torch.zeros(2))]
    orig = compat.original('basicsr.models.base_model', 'BaseModel.get_optimizer')
    if orig is BaseModel.get_optimizer:
        pytest.skip('the installed basicsr accepts AdamW: fix not needed')
    with pytest.raises(NotImplementedError):
        orig(None, 'AdamW', params, 1e-3)

    adamw = BaseModel.get_optimizer(None, 'AdamW', params, 2e-4, weight_decay=0.01, betas=[0.9, 0.99])
    assert type(adamw) is torch.optim.AdamW and adamw.defaults['weight_decay'] == 0.01
    assert type(BaseModel.get_optimizer(None, 'Adam', params, 1e-3)) is torch.optim.Adam
    sgd = BaseModel.get_optimizer(None, 'SGD', params, 0.1, momentum=0.9)
    assert type(sgd) is torch.optim.SGD and sgd.defaults['momentum'] == 0.9
    for bad in ('Adamm', 'lr_scheduler', 'Optimizer'):
        with pytest.raises(NotImplementedError) as info:
            BaseModel.get_optimizer(None, bad, params, 1e-3)
        msg = str(info.value)
        assert f"'{bad}'" in msg and '\n' not in msg


# --- 4. per-device options ----------------------------------------------------------------

def test_adjust_options_for_device(compat):
    def opts():
        return {'num_gpu': 2, 'datasets': {'train': {'prefetch_mode': 'cuda', 'pin_memory': True},
                                           'val': {'prefetch_mode': None}}}
    opt = opts()
    assert compat.adjust_options_for_device(opt, cuda_available=True) == [] and opt == opts()
    messages = compat.adjust_options_for_device(opt, cuda_available=False)
    assert opt['num_gpu'] == 0 and opt['datasets']['train']['prefetch_mode'] == 'cpu'
    assert opt['datasets']['val']['prefetch_mode'] is None
    assert len(messages) == 2 and 'prefetch_mode' in messages[1] and 'num_gpu' in messages[0]
    auto = {'num_gpu': 0, 'datasets': {}}
    assert compat.adjust_options_for_device(auto, cuda_available=False) == []


@needs_no_cuda
def test_cuda_prefetcher_fails_without_cuda():
    import grl_plugin  # noqa: F401
    from basicsr.data.prefetch_dataloader import CUDAPrefetcher
    loader = torch.utils.data.DataLoader([{'x': torch.zeros(1)}], batch_size=1)
    with pytest.raises((AssertionError, RuntimeError)):
        CUDAPrefetcher(loader, {'num_gpu': 0})


def test_parse_options_wrapper(compat, data, tmp_path, monkeypatch):
    import basicsr.test
    import basicsr.train
    yml = write_options(tmp_path, data, name='wrapped', num_gpu=1,
                        datasets={'train': {'prefetch_mode': 'cuda', 'pin_memory': True}})
    monkeypatch.setattr(sys, 'argv', ['grl-train', '-opt', str(yml)])
    from grl_plugin import patching
    monkeypatch.setattr(patching, '_PENDING', [])
    opt, _ = basicsr.train.parse_options(str(tmp_path), is_train=True)
    expected = ('cuda', 1) if CUDA else ('cpu', 0)
    assert (opt['datasets']['train']['prefetch_mode'], opt['num_gpu']) == expected
    assert len(patching._PENDING) == (0 if CUDA else 2)
    assert patching.is_patched('basicsr.test', 'parse_options')

    # the warnings go to basicsr's logger once the pipeline has created it
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger('grl_compat_test_logger')
    logger.addHandler(handler)
    assert basicsr.train.get_root_logger(logger_name='grl_compat_test_logger') is logger
    assert len(records) == (0 if CUDA else 2) and patching._PENDING == []


@needs_no_cuda
def test_gpu_option_file_trains_on_cpu(data, tmp_path):
    """End to end: num_gpu 1 + prefetch_mode cuda (a GPU option file) trains on this CPU machine."""
    yml = write_options(tmp_path, data, name='gpu_opts', num_gpu=1, val=None,
                        train={'total_iter': 1}, logger={'save_checkpoint_freq': 100},
                        datasets={'train': {'prefetch_mode': 'cuda', 'pin_memory': True}})
    res = run_cli(['-m', 'grl_plugin.train', '-opt', yml, '--root', tmp_path / 'root'], tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    log = read_logs(tmp_path / 'root' / 'experiments' / 'gpu_opts')
    assert re.search(r'WARNING: num_gpu: 1 but CUDA is not available', log)
    assert re.search(r'WARNING: datasets\.train\.prefetch_mode: cuda needs CUDA', log)
    assert (tmp_path / 'root' / 'experiments' / 'gpu_opts' / 'models' / 'net_g_latest.pth').is_file()


# --- 5. one LMDB, two datasets ------------------------------------------------------------

def test_lmdb_shared_between_datasets(compat, tmp_path):
    import lmdb
    from basicsr.data.paired_image_dataset import PairedImageDataset
    from basicsr.utils.file_client import LmdbBackend
    fresh = make_lmdb(tmp_path, n_images=2, size=16, scale=2, name='fresh')
    orig = compat.original('basicsr.utils.file_client', 'LmdbBackend.__init__')
    if orig is LmdbBackend.__init__:
        pytest.skip('lmdb here opens one path twice in a process: fix not needed')
    first, second = LmdbBackend.__new__(LmdbBackend), LmdbBackend.__new__(LmdbBackend)
    orig(first, [fresh['gt']], ['gt'])
    try:
        with pytest.raises(lmdb.Error, match='already open'):
            orig(second, [fresh['gt']], ['gt'])
    finally:
        first._client['gt'].close()

    a = LmdbBackend([fresh['lq'], fresh['gt']], ['lq', 'gt'])
    b = LmdbBackend([fresh['gt']], ['gt'])
    assert a._client['gt'] is b._client['gt']
    assert a.get('0000', 'gt') == b.get('0000', 'gt') is not None

    def dataset(phase):
        opt = dict(name=phase, type='PairedImageDataset', dataroot_gt=fresh['gt'], dataroot_lq=fresh['lq'],
                   io_backend=dict(type='lmdb'), phase=phase, scale=2, gt_size=16, use_hflip=False, use_rot=False)
        return PairedImageDataset(opt)
    train, val = dataset('train'), dataset('val')
    assert train[0]['gt'].shape == (3, 16, 16) and val[1]['lq'].shape == (3, 8, 8)


# --- 6. the CPU prefetch thread -----------------------------------------------------------

def test_prefetch_thread_error_reaches_the_training_loop(compat):
    """basicsr's prefetch thread dies on a reading error and leaves the loop waiting forever;
    patched, the error is raised where the loop asks for the next batch."""
    from basicsr.data.prefetch_dataloader import PrefetchGenerator

    def failing():
        yield 1
        raise ValueError('unreadable sample 7')

    original = type('Original', (PrefetchGenerator,), {
        'run': compat.original('basicsr.data.prefetch_dataloader', 'PrefetchGenerator.run'),
        '__next__': compat.original('basicsr.data.prefetch_dataloader', 'PrefetchGenerator.__next__')})
    if not compat._prefetch_error_is_lost(original):
        pytest.skip('this basicsr hands prefetch errors to the consumer itself')
    assert 'fix_prefetch_errors' in compat.applied()
    gen = PrefetchGenerator(failing(), 1)
    assert next(gen) == 1
    with pytest.raises(ValueError, match='unreadable sample 7'):
        next(gen)
    assert list(PrefetchGenerator(iter([1, 2]), 1)) == [1, 2]  # normal end unchanged


def test_cpu_prefetcher_starts_one_reader(compat):
    """basicsr's CPUPrefetcher starts an iterator in __init__ and train_pipeline another in
    reset(): two prefetch threads race on the dataset (KeyError 'type'). One iterator now."""
    import basicsr.train
    from basicsr.data.prefetch_dataloader import PrefetchDataLoader
    made = []

    class Loader(PrefetchDataLoader):
        def __iter__(self):
            made.append(1)
            return super().__iter__()

    loader = Loader(num_prefetch_queue=1, dataset=list(range(4)), batch_size=2)
    prefetcher = basicsr.train.CPUPrefetcher(loader)
    prefetcher.reset()
    batches = []
    while (b := prefetcher.next()) is not None:
        batches.append(b.tolist())
    assert batches == [[0, 1], [2, 3]] and len(made) == 1
    made.clear()
    original = compat.original('basicsr.train', 'CPUPrefetcher')
    original(loader).reset()
    assert len(made) == 2  # what basicsr does
