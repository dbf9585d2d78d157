"""Workarounds for BasicSR 1.4.2 and torchvision on current PyTorch and on machines without CUDA.

Each workaround checks whether it is needed (a probe of the installed code, or the absence of
CUDA) and otherwise changes nothing; :func:`applied` lists those applied in this process.

===========================  ==================================================  ===========================
workaround                   what it changes                                     applied when
===========================  ==================================================  ===========================
fix_torchvision_import       re-imports torchvision with empty stand-ins for     ``import torchvision``
                             its two kernel-registration modules                 fails (CUDA wheel, CPU torch)
fix_functional_tensor        adds ``torchvision.transforms.functional_tensor``   the module is missing
                             (``rgb_to_grayscale``), imported by basicsr 1.4.2   (torchvision >= 0.17)
fix_dist_init_cpu            ``basicsr.utils.dist_util._init_dist_pytorch`` /    CUDA is unavailable
                             ``_init_dist_slurm``: gloo from the torchrun or
                             slurm environment
fix_ddp_cpu                  ``BaseModel.model_to_device``: DDP without          CUDA is unavailable
                             ``device_ids``
fix_optimizers               ``BaseModel.get_optimizer``: any ``torch.optim``    it rejects ``AdamW``
                             class by name                                       (probed)
fix_device_options           ``parse_options`` of ``basicsr.train`` / ``.test``  installed; it changes
                             post-processed by :func:`adjust_options_for_device` options only without CUDA
fix_lmdb_shared_env          ``LmdbBackend.__init__``: one environment per       py-lmdb refuses to open
                             LMDB file and process, closed with its last user    a file twice (probed)
fix_prefetch_errors          ``PrefetchGenerator.run`` / ``__next__``: a         the reading thread dies
                             reading error is raised in the training loop        silently (probed: a hang)
===========================  ==================================================  ===========================

basicsr's ``load_resume_state`` (it looks for states relative to the current folder and maps them
to CUDA) is replaced by :mod:`grl_plugin.models.checkpoint_io`, which also makes ``--auto_resume``
crash safe. :func:`finish_distributed` is not a patch: the CLIs call it after a pipeline returns.

This module imports neither basicsr nor the rest of the plugin at import time, and its import
workarounds (:func:`apply`) also work when the file is loaded on its own.
"""
import functools
import importlib
import os
import os.path as osp
import sys
import tempfile
import types
import weakref

try:
    from .patching import flush_warnings, is_patched, original, patch, warn_later
except ImportError:  # loaded by file path, outside the package: only apply() (torchvision) works
    pass

__all__ = ['apply', 'apply_basicsr', 'applied', 'original', 'CompatError', 'adjust_options_for_device',
           'finish_distributed']

_APPLIED = []
_BY = 'grl_plugin.compat'


class CompatError(RuntimeError):
    """A condition the patched BasicSR code cannot handle (one-line, user-facing message)."""


def _run(fixes):
    for fix in fixes:
        if fix() and fix.__name__ not in _APPLIED:
            _APPLIED.append(fix.__name__)
    return applied()


def applied():
    """Names of the workarounds applied in this process (a copy)."""
    return list(_APPLIED)


def _cuda_available():
    import torch
    return torch.cuda.is_available()


# --- torchvision --------------------------------------------------------------------------------

_TV_REGISTRATION_MODULES = ('torchvision._meta_registrations', 'torchvision._autograd_registrations')


def fix_torchvision_import():
    """``import torchvision`` with a CUDA torchvision wheel on CPU-only torch fails with
    ``RuntimeError: operator torchvision::nms does not exist`` (its C++ ops are not loaded, then
    fake kernels are registered for them). Drop the half-imported modules and import again with
    empty stand-ins for the two registration modules: transforms and models work,
    ``torchvision.ops`` does not. Returns True if applied."""
    try:
        import torchvision  # noqa: F401
        return False
    except ImportError:
        return False  # not installed: basicsr will say so
    except RuntimeError as err:
        if 'torchvision::nms' not in str(err):
            raise
    for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
        del sys.modules[name]
    for name in _TV_REGISTRATION_MODULES:
        sys.modules[name] = types.ModuleType(name)
    import torchvision  # noqa: F401,F811
    return True


def fix_functional_tensor():
    """basicsr 1.4.2 imports ``rgb_to_grayscale`` from ``torchvision.transforms.functional_tensor``
    (removed in torchvision 0.17): provide that module, re-exporting the function from
    ``torchvision.transforms.functional``, only when it is missing. Returns True if applied."""
    name = 'torchvision.transforms.functional_tensor'
    try:
        __import__(name)
        return False
    except ImportError:
        pass
    try:
        import torchvision.transforms
        from torchvision.transforms.functional import rgb_to_grayscale
    except (ImportError, RuntimeError):
        return False
    mod = types.ModuleType(name)
    mod.rgb_to_grayscale = rgb_to_grayscale
    sys.modules[name] = mod
    torchvision.transforms.functional_tensor = mod
    return True


def apply():
    """Apply the import workarounds that are needed (idempotent); returns :func:`applied`."""
    return _run((fix_torchvision_import, fix_functional_tensor))


# --- distributed training without CUDA ----------------------------------------------------------

_TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def _cpu_backend(backend, launcher, env, starter):
    """The backend a ``--launcher`` run uses without CUDA (gloo for nccl), after checking that
    the launcher's ``env`` variables are set and that torch.distributed has it."""
    import torch.distributed as dist
    missing = [k for k in env if k not in os.environ]
    if missing:
        raise CompatError(f"--launcher {launcher} needs {', '.join(missing)} in the environment: start the run "
                          f'with {starter}')
    backend = 'gloo' if backend == 'nccl' else backend
    if not dist.is_available() or (backend == 'gloo' and not dist.is_gloo_available()):
        raise CompatError(f'--launcher {launcher} without CUDA needs torch.distributed with the gloo backend')
    return backend


def _init_dist_pytorch_cpu(backend, **kwargs):
    import torch
    import torch.distributed as dist
    if torch.cuda.is_available():
        return original('basicsr.utils.dist_util', '_init_dist_pytorch')(backend, **kwargs)
    backend = _cpu_backend(backend, 'pytorch', _TORCHRUN_ENV, 'torchrun (e.g. torchrun --nproc_per_node=2 '
                           '-m grl_plugin.train ...)')
    dist.init_process_group(backend=backend, init_method='env://', rank=int(os.environ['RANK']),
                            world_size=int(os.environ['WORLD_SIZE']), **kwargs)


_SLURM_ENV = ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST')


def _slurm_master_addr(nodes):
    """First host of a slurm node list (``scontrol show hostnames``, as basicsr asks); without
    ``scontrol`` a plain host name is taken as it is, else 127.0.0.1."""
    import shutil
    import subprocess
    if shutil.which('scontrol'):
        res = subprocess.run(['scontrol', 'show', 'hostnames', nodes], capture_output=True, text=True, timeout=60)
        hosts = res.stdout.split() if res.returncode == 0 else []
        if hosts:
            return hosts[0]
    return nodes if nodes and not any(c in nodes for c in '[],') else '127.0.0.1'


def _init_dist_slurm_cpu(backend, port=None):
    import torch
    import torch.distributed as dist
    if torch.cuda.is_available():
        return original('basicsr.utils.dist_util', '_init_dist_slurm')(backend, port)
    backend = _cpu_backend(backend, 'slurm', _SLURM_ENV, 'srun (e.g. srun --ntasks=2 python -m grl_plugin.train '
                           '... --launcher slurm)')
    addr = _slurm_master_addr(os.environ['SLURM_NODELIST'])
    rank, world = int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS'])
    os.environ['MASTER_PORT'] = str(port) if port is not None else os.environ.get('MASTER_PORT', '29500')
    os.environ.update(MASTER_ADDR=addr, WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=os.environ.get('SLURM_LOCALID', '0'))
    dist.init_process_group(backend=backend, init_method='env://', rank=rank, world_size=world)


def fix_dist_init_cpu():
    """basicsr's ``_init_dist_pytorch`` and ``_init_dist_slurm`` call
    ``torch.cuda.set_device(rank % device_count())`` (ZeroDivisionError without GPUs) and use
    nccl: without CUDA, start gloo from the torchrun (slurm) environment instead. Returns True
    if applied."""
    if _cuda_available() or is_patched('basicsr.utils.dist_util', '_init_dist_pytorch'):
        return False
    patch('basicsr.utils.dist_util', '_init_dist_slurm', _init_dist_slurm_cpu, _BY)
    return patch('basicsr.utils.dist_util', '_init_dist_pytorch', _init_dist_pytorch_cpu, _BY)


def finish_distributed():
    """End the process group a ``--launcher pytorch`` run started (basicsr never does: a gloo rank
    exiting while the group's threads live can abort after a clean run). A barrier first, so every
    rank has finished. Returns True if a group was ended."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return True


def _model_to_device_cpu(self, net):
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    net = net.to(self.device)
    if self.opt['dist']:
        find_unused = self.opt.get('find_unused_parameters', False)
        if self.device.type == 'cuda':
            import torch
            return DistributedDataParallel(net, device_ids=[torch.cuda.current_device()],
                                           find_unused_parameters=find_unused)
        return DistributedDataParallel(net, find_unused_parameters=find_unused)
    if self.opt['num_gpu'] > 1:
        return DataParallel(net)
    return net


def fix_ddp_cpu():
    """basicsr's ``BaseModel.model_to_device`` passes ``device_ids=[torch.cuda.current_device()]``
    to DDP, which fails without CUDA: wrap without ``device_ids`` there. Returns True if applied."""
    if _cuda_available() or is_patched('basicsr.models.base_model', 'BaseModel.model_to_device'):
        return False
    return patch('basicsr.models.base_model', 'BaseModel.model_to_device', _model_to_device_cpu, _BY)


# --- optimizers ---------------------------------------------------------------------------------

def _get_optimizer(self, optim_type, params, lr, **kwargs):
    import torch
    cls = getattr(torch.optim, optim_type, None) if isinstance(optim_type, str) else None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer):
        raise NotImplementedError(f'optimizer {optim_type!r} is not supported: use the name of a torch.optim '
                                  'optimizer (e.g. Adam, AdamW, SGD)')
    return cls(params, lr, **kwargs)


def fix_optimizers():
    """basicsr 1.4.2's ``BaseModel.get_optimizer`` accepts only ``Adam`` (GRL trains with AdamW):
    accept every ``torch.optim`` optimizer by name; an unknown name still raises
    ``NotImplementedError``. Condition: probed with ``AdamW``. Returns True if applied."""
    if is_patched('basicsr.models.base_model', 'BaseModel.get_optimizer'):
        return False
    import torch
    from basicsr.models.base_model import BaseModel
    try:
        if isinstance(BaseModel.get_optimizer(None, 'AdamW', [torch.nn.Parameter(torch.zeros(1))], 1e-3),
                      torch.optim.AdamW):
            return False
    except NotImplementedError:
        pass
    return patch('basicsr.models.base_model', 'BaseModel.get_optimizer', _get_optimizer, _BY)


# --- options that need CUDA ---------------------------------------------------------------------

def adjust_options_for_device(opt, cuda_available=None):
    """Make parsed options runnable without CUDA; returns the warnings (strings). Without CUDA,
    ``datasets.<phase>.prefetch_mode: cuda`` becomes ``cpu`` (``CUDAPrefetcher`` creates a CUDA
    stream) and ``num_gpu > 0`` becomes 0. With CUDA nothing changes."""
    if cuda_available is None:
        cuda_available = _cuda_available()
    messages = []
    if cuda_available:
        return messages
    num_gpu = opt.get('num_gpu')
    if isinstance(num_gpu, int) and not isinstance(num_gpu, bool) and num_gpu > 0:
        opt['num_gpu'] = 0
        messages.append(f'num_gpu: {num_gpu} but CUDA is not available: running on the CPU (num_gpu: 0).')
    for phase, dataset in (opt.get('datasets') or {}).items():
        if isinstance(dataset, dict) and dataset.get('prefetch_mode') == 'cuda':
            dataset['prefetch_mode'] = 'cpu'
            messages.append(f'datasets.{phase}.prefetch_mode: cuda needs CUDA, which is not available: '
                            'using prefetch_mode: cpu.')
    return messages


def _parse_options_for_device(module):
    parse_options = original(module, 'parse_options')

    @functools.wraps(parse_options)
    def wrapper(*args, **kwargs):
        opt, parsed = parse_options(*args, **kwargs)
        for message in adjust_options_for_device(opt):
            warn_later(message)
        return opt, parsed
    return wrapper


def _logger_with_warnings(module):
    get_root_logger = original(module, 'get_root_logger')

    @functools.wraps(get_root_logger)
    def wrapper(*args, **kwargs):
        logger = get_root_logger(*args, **kwargs)
        flush_warnings(logger)
        return logger
    return wrapper


def fix_device_options():
    """Run :func:`adjust_options_for_device` on the options ``basicsr.train`` / ``basicsr.test``
    parse, and log its warnings (and those of :func:`grl_plugin.patching.warn_later`) once the
    pipeline creates its logger. Returns True if installed now."""
    done = False
    for module in ('basicsr.train', 'basicsr.test'):
        importlib.import_module(module)
        for attr, make in (('parse_options', _parse_options_for_device), ('get_root_logger', _logger_with_warnings)):
            if not is_patched(module, attr):
                done |= patch(module, attr, make(module), _BY)
    return done


# --- one LMDB read by two datasets --------------------------------------------------------------

_LMDB_ENVS = {}  # (pid, device, inode of the data file) -> [lmdb.Environment, users, real path]


def _lmdb_file_id(path, subdir=True):
    st = os.stat(osp.join(path, 'data.mdb') if subdir else path)
    return os.getpid(), st.st_dev, st.st_ino


def _lmdb_release(key):
    entry = _LMDB_ENVS.get(key)
    if entry is None or key[0] != os.getpid():
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _LMDB_ENVS[key]
        entry[0].close()


def _lmdb_backend_init(self, db_paths, client_keys='default', readonly=True, lock=False, readahead=False, **kwargs):
    import lmdb
    client_keys = [client_keys] if isinstance(client_keys, str) else client_keys
    self.db_paths = [str(v) for v in db_paths] if isinstance(db_paths, (list, tuple)) else [str(db_paths)]
    assert len(client_keys) == len(self.db_paths), ('client_keys and db_paths should have the same length, '
                                                    f'but received {len(client_keys)} and {len(self.db_paths)}.')
    self._client = {}
    for client, path in zip(client_keys, self.db_paths):
        try:
            key = _lmdb_file_id(path, kwargs.get('subdir', True))
        except OSError:
            key = None  # lmdb.open reports it as basicsr would
        entry = _LMDB_ENVS.get(key)
        if entry is None:
            real = osp.realpath(path)
            for old, (env, _, where) in list(_LMDB_ENVS.items()):
                if where == real and old[0] == os.getpid():  # the database there was replaced: the
                    del _LMDB_ENVS[old]  # old one is closed (py-lmdb may take the new files for it)
                    env.close()
            entry = [lmdb.open(path, readonly=readonly, lock=lock, readahead=readahead, **kwargs), 0, real]
            if key is not None:
                _LMDB_ENVS[key] = entry
        if key is not None:
            entry[1] += 1
            weakref.finalize(self, _lmdb_release, key)
        self._client[client] = entry[0]


def _lmdb_refuses_second_open():
    try:
        import lmdb
    except ImportError:
        return False
    try:
        with tempfile.TemporaryDirectory(prefix='grl_compat_probe_') as tmp:
            path = osp.join(tmp, 'probe.lmdb')
            lmdb.open(path, map_size=1 << 16).close()
            first = lmdb.open(path, readonly=True, lock=False, readahead=False)
            try:
                lmdb.open(path, readonly=True, lock=False, readahead=False).close()
                return False
            except lmdb.Error:
                return True
            finally:
                first.close()
    except OSError:
        return True


def fix_lmdb_shared_env():
    """py-lmdb >= 2 refuses to open an LMDB file that this process has open (``The environment ...
    is already open in this process``), and basicsr's ``LmdbBackend`` opens one per dataset: train
    and val on one LMDB fail without dataloader workers. Share one read-only environment per
    (process, LMDB data file): a database deleted and rebuilt at the same path is a new file and
    gets a new environment (the old one is closed: its files are gone); an environment is also
    closed when the last backend using it is garbage-collected. Condition: probed on a
    temporary LMDB. Returns True if applied."""
    if is_patched('basicsr.utils.file_client', 'LmdbBackend.__init__') or not _lmdb_refuses_second_open():
        return False
    return patch('basicsr.utils.file_client', 'LmdbBackend.__init__', _lmdb_backend_init, _BY)


# --- errors in basicsr's prefetch thread --------------------------------------------------------

class _PrefetchFailure:
    def __init__(self, error):
        self.error = error


def _prefetch_run(self):
    try:
        for item in self.generator:
            self.queue.put(item)
    except BaseException as err:  # noqa: BLE001 - raised again in the consumer's thread
        self.queue.put(_PrefetchFailure(err))
        return
    self.queue.put(None)


def _prefetch_next(self):
    item = self.queue.get()
    if item is None:
        raise StopIteration
    if isinstance(item, _PrefetchFailure):
        raise item.error
    return item


def _prefetch_error_is_lost(generator_cls):
    import threading

    def failing():
        raise ValueError('grl compat probe')
        yield  # noqa: unreachable - makes this a generator

    hook, threading.excepthook = threading.excepthook, lambda args: None
    try:
        gen = generator_cls(failing(), 1)
        gen.join(timeout=10)
        return not gen.is_alive() and gen.queue.empty()
    finally:
        threading.excepthook = hook


def fix_prefetch_errors():
    """basicsr 1.4.2's ``PrefetchGenerator`` (``prefetch_mode: cpu``) reads in a thread that dies
    on an error without its end marker: the training loop then waits forever. Hand the exception
    to the consumer, which raises it (same class). Condition: probed with a failing generator.
    Returns True if applied."""
    module = 'basicsr.data.prefetch_dataloader'
    if is_patched(module, 'PrefetchGenerator.run'):
        return False
    from basicsr.data.prefetch_dataloader import PrefetchGenerator
    if not _prefetch_error_is_lost(PrefetchGenerator):
        return False
    patch(module, 'PrefetchGenerator.__next__', _prefetch_next, _BY)
    return patch(module, 'PrefetchGenerator.run', _prefetch_run, _BY)


def apply_basicsr():
    """Apply every workaround that is needed, basicsr's included (idempotent; imports basicsr).
    Returns :func:`applied`."""
    apply()
    return _run((fix_dist_init_cpu, fix_ddp_cpu, fix_optimizers, fix_device_options, fix_lmdb_shared_env,
                 fix_prefetch_errors))
