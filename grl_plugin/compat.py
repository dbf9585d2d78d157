"""Workarounds for BasicSR 1.4.2 / torchvision on current PyTorch.

Every fix is a small function that checks whether it is needed and does nothing
otherwise (e.g. on a GPU machine with a matching torch/torchvision pair).

Two groups:

* import fixes -- :func:`apply` runs them; it is idempotent and is called by
  ``grl_plugin/__init__.py`` before anything imports ``basicsr``;
* training/test-pipeline fixes -- :func:`apply_basicsr` runs them once ``basicsr`` can be
  imported (``grl_plugin/__init__.py`` calls it right after :func:`apply`; the ``grl-train``
  and ``grl-test`` CLIs call it as well). Each one patches a module global or a method of
  basicsr 1.4.2 that ``basicsr.train.train_pipeline`` / ``basicsr.test.test_pipeline`` look up
  at call time:

  ========================  =================================================  ==========================
  fix                       patches                                            applied when
  ========================  =================================================  ==========================
  fix_resume_state          ``basicsr.train.load_resume_state``                it ignores ``root_path``
                                                                               or cannot load on CPU
                                                                               (probed; every basicsr
                                                                               release so far)
  fix_dist_init_cpu         ``basicsr.utils.dist_util._init_dist_pytorch``     CUDA is unavailable
  fix_ddp_cpu               ``basicsr.models.base_model.BaseModel``            CUDA is unavailable
                            ``.model_to_device``
  fix_optimizers            ``BaseModel.get_optimizer``                        it rejects ``AdamW``
                                                                               (probed)
  fix_device_options        ``basicsr.train.parse_options`` and                always installed; it only
                            ``basicsr.test.parse_options`` (wrapped: options   changes options when CUDA
                            post-processed by :func:`adjust_options_for_device`) is unavailable
  fix_lmdb_shared_env       ``basicsr.utils.file_client.LmdbBackend``          lmdb refuses to open one
                            ``.__init__`` (one environment per path+process)   path twice (probed;
                                                                               py-lmdb 3.0 here)
  ========================  =================================================  ==========================

:func:`finish_distributed` is not a patch: the CLIs call it after a pipeline returns, to end the
process group basicsr leaves open (gloo ranks could otherwise abort at exit).

:func:`applied` lists the fixes that were actually applied in this process;
:func:`original` returns the basicsr object a fix replaced (for tests and debugging).

This module must not import ``basicsr`` at import time.
"""
import functools
import importlib
import os
import os.path as osp
import sys
import tempfile
import types

__all__ = ['apply', 'apply_basicsr', 'applied', 'original', 'register', 'CompatError',
           'fix_torchvision_import', 'fix_functional_tensor', 'fix_resume_state', 'fix_dist_init_cpu',
           'fix_ddp_cpu', 'fix_optimizers', 'finish_distributed', 'fix_device_options', 'fix_lmdb_shared_env',
           'adjust_options_for_device', 'load_resume_state', 'resume_map_location']

_APPLIED = []

# Modules of torchvision that register fake/autograd kernels for its C++ ops.
_TV_REGISTRATION_MODULES = ('torchvision._meta_registrations', 'torchvision._autograd_registrations')


def fix_torchvision_import():
    """Make ``import torchvision`` work with a CUDA torchvision wheel on CPU-only torch.

    Symptom: ``RuntimeError: operator torchvision::nms does not exist`` -- the C++
    extension needs ``libtorch_cuda.so`` and is not loaded, then
    ``torchvision/_meta_registrations.py`` tries to register kernels for its ops.
    Fix: drop the partially imported torchvision modules and import again with empty
    stand-ins for the two registration modules. The pure-Python parts (transforms,
    models) then work; ``torchvision.ops`` stays unusable.

    Returns True if the fix was applied.
    """
    try:
        import torchvision  # noqa: F401
        return False
    except ImportError:
        return False  # not installed: nothing to fix here, basicsr will report it
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
    """Provide ``torchvision.transforms.functional_tensor`` (removed in torchvision 0.17).

    basicsr 1.4.2 (``basicsr/data/degradations.py``) does
    ``from torchvision.transforms.functional_tensor import rgb_to_grayscale``.
    Registers a module of that name re-exporting ``rgb_to_grayscale`` from
    ``torchvision.transforms.functional``, only if the real one is missing.

    Returns True if the fix was applied.
    """
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
        return False  # torchvision unusable; nothing this fix can do
    mod = types.ModuleType(name)
    mod.__doc__ = 'Shim created by grl_plugin.compat for basicsr 1.4.2.'
    mod.rgb_to_grayscale = rgb_to_grayscale
    sys.modules[name] = mod
    torchvision.transforms.functional_tensor = mod
    return True


_FIXES = (fix_torchvision_import, fix_functional_tensor)


def apply():
    """Run every fix that is needed (idempotent). Returns :func:`applied`."""
    for fix in _FIXES:
        if fix() and fix.__name__ not in _APPLIED:
            _APPLIED.append(fix.__name__)
    return applied()


def applied():
    """Names of the fixes actually applied in this process (a copy)."""
    return list(_APPLIED)


# =====================================================================================
# basicsr training/test pipeline fixes
# =====================================================================================

class CompatError(RuntimeError):
    """A condition the patched basicsr code cannot handle (one-line, user-facing message)."""


_PATCH_MARK = '_grl_compat_patch'
_ORIGINAL_ATTR = '_grl_compat_original'


def original(module, attr):
    """The basicsr object that a fix replaced (``original('basicsr.train', 'load_resume_state')``,
    ``original('basicsr.models.base_model', 'BaseModel.get_optimizer')``); the current one if
    nothing was replaced."""
    current = _resolve(module, attr)[2]
    return getattr(current, _ORIGINAL_ATTR, current)


def _resolve(module, attr):
    owner = importlib.import_module(module)
    *parents, name = attr.split('.')
    for p in parents:
        owner = getattr(owner, p)
    return owner, name, owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name)


def _patch(module, attr, new):
    """Replace ``module.attr`` by ``new``, which remembers the original. False if already patched."""
    owner, name, current = _resolve(module, attr)
    if getattr(current, _PATCH_MARK, False):
        return False
    setattr(new, _PATCH_MARK, True)
    setattr(new, _ORIGINAL_ATTR, current)
    setattr(owner, name, new)
    return True


def _is_patched(module, attr):
    return bool(getattr(_resolve(module, attr)[2], _PATCH_MARK, False))


def _cuda_available():
    import torch
    return torch.cuda.is_available()


# --- 1. resume ------------------------------------------------------------------------

def resume_map_location(opt):
    """Device for resume states: the current CUDA device if the run uses GPUs and CUDA
    works, else the CPU."""
    import torch
    if opt.get('num_gpu', 0) != 0 and torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def _training_states_dir(opt):
    path = opt.get('path', {}).get('training_states')
    if path:
        return path
    return osp.join(opt.get('root_path') or os.getcwd(), 'experiments', opt['name'], 'training_states')


def load_resume_state(opt):
    """Replacement for ``basicsr.train.load_resume_state``.

    With ``auto_resume`` it takes the newest ``<iter>.state`` in ``opt['path']['training_states']``
    (``<root_path>/experiments/<name>/training_states``, set by ``parse_options``) instead of
    ``experiments/<name>/training_states`` relative to the current directory; otherwise it uses
    ``path.resume_state``. States are loaded onto :func:`resume_map_location` (basicsr maps
    them to ``torch.cuda.current_device()``, which fails without CUDA).
    """
    import torch
    from basicsr.utils import check_resume, scandir

    resume_state_path = None
    if opt['auto_resume']:
        state_dir = _training_states_dir(opt)
        if osp.isdir(state_dir):
            iters = []
            for name in scandir(state_dir, suffix='state', recursive=False, full_path=False):
                stem = name[:-len('.state')]
                if stem.isdigit():
                    iters.append(int(stem))
            if iters:
                resume_state_path = osp.join(state_dir, f'{max(iters)}.state')
                opt['path']['resume_state'] = resume_state_path
    elif opt['path'].get('resume_state'):
        resume_state_path = opt['path']['resume_state']

    if resume_state_path is None:
        return None
    resume_state = torch.load(resume_state_path, map_location=resume_map_location(opt))
    check_resume(opt, resume_state['iter'])
    return resume_state


def _resume_needs_fix(fn):
    """Probe ``fn``: can it auto-resume, on this machine, a run stored under ``root_path``
    (which is not the current directory)? If the probe itself cannot run (no writable
    temporary directory), the fix is applied: the replacement also covers basicsr's cases."""
    try:
        return _probe_resume(fn)
    except OSError:
        return True


def _probe_resume(fn):
    import torch
    with tempfile.TemporaryDirectory(prefix='grl_compat_probe_') as root:
        name = 'grl_compat_resume_probe'
        state_dir = osp.join(root, 'experiments', name, 'training_states')
        os.makedirs(state_dir)
        torch.save({'epoch': 0, 'iter': 1, 'optimizers': [], 'schedulers': []}, osp.join(state_dir, '1.state'))
        opt = {'name': name, 'auto_resume': True, 'root_path': root, 'num_gpu': 0, 'is_train': True,
               'path': {'resume_state': None, 'training_states': state_dir,
                        'models': osp.join(root, 'experiments', name, 'models')}}
        try:
            state = fn(opt)
        except Exception:  # noqa: BLE001 - e.g. torch.cuda.current_device() without CUDA
            return True
        return not (isinstance(state, dict) and state.get('iter') == 1)


def fix_resume_state():
    """Make ``--auto_resume`` / ``path.resume_state`` work from any directory and on CPU.

    basicsr 1.4.2's ``load_resume_state`` (a module global of ``basicsr.train``, looked up by
    ``train_pipeline``) searches ``experiments/<name>/training_states`` relative to the current
    directory -- from elsewhere it silently restarts at iteration 0 and archives the old run --
    and maps storages with ``torch.cuda.current_device()``, which fails without CUDA.
    Condition: the installed function is probed on a temporary run under a root that is not
    the current directory; if it does not find/load it (true of basicsr 1.4.2 on every
    machine: the CWD issue does not depend on the device), it is replaced by
    :func:`load_resume_state`. Returns True if the fix was applied.
    """
    if _is_patched('basicsr.train', 'load_resume_state'):
        return False
    import basicsr.train
    if not _resume_needs_fix(basicsr.train.load_resume_state):
        return False
    return _patch('basicsr.train', 'load_resume_state', _wrap(load_resume_state))


# --- 2. distributed on CPU ------------------------------------------------------------

_TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def _init_dist_pytorch_cpu(backend, **kwargs):
    """``--launcher pytorch`` without CUDA: a ``gloo`` process group from the torchrun
    environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)."""
    import torch
    import torch.distributed as dist
    if torch.cuda.is_available():  # e.g. CUDA appeared after import (unlikely): basicsr's way
        return original('basicsr.utils.dist_util', '_init_dist_pytorch')(backend, **kwargs)
    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise CompatError(f"--launcher pytorch needs {', '.join(missing)} in the environment: "
                          'start the run with torchrun (e.g. torchrun --nproc_per_node=2 -m grl_plugin.train ...)')
    if backend == 'nccl':
        backend = 'gloo'
    if not dist.is_available() or (backend == 'gloo' and not dist.is_gloo_available()):
        raise CompatError('--launcher pytorch without CUDA needs torch.distributed with the gloo backend')
    dist.init_process_group(backend=backend, init_method='env://', rank=int(os.environ['RANK']),
                            world_size=int(os.environ['WORLD_SIZE']), **kwargs)


def fix_dist_init_cpu():
    """Let ``--launcher pytorch`` (torchrun) train on CPU with the gloo backend.

    basicsr's ``_init_dist_pytorch`` does ``torch.cuda.set_device(rank % torch.cuda.device_count())``
    (ZeroDivisionError without GPUs) and uses nccl (CUDA only). Condition: CUDA is unavailable
    (with CUDA basicsr's nccl path is left unchanged). Patches the module global in
    ``basicsr.utils.dist_util`` that ``init_dist`` calls. Returns True if applied.
    """
    if _cuda_available() or _is_patched('basicsr.utils.dist_util', '_init_dist_pytorch'):
        return False
    return _patch('basicsr.utils.dist_util', '_init_dist_pytorch', _wrap(_init_dist_pytorch_cpu))


def finish_distributed():
    """End the process group a ``--launcher pytorch`` run started (after the pipeline returns).

    basicsr's pipelines never destroy their process group. With gloo, a rank that exits while
    the group's threads are still alive can abort in the C++ runtime ("terminate called without
    an active exception", SIGABRT) after training finished cleanly, and torchrun then reports
    the run as failed. A barrier lets every rank reach the end first; then the group is
    destroyed. Does nothing when no group was started. Returns True if one was ended.
    """
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return True


def _model_to_device_cpu(self, net):
    """``BaseModel.model_to_device`` for CPU-only torch: DDP without ``device_ids``."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    net = net.to(self.device)
    if self.opt['dist']:
        find_unused_parameters = self.opt.get('find_unused_parameters', False)
        if self.device.type == 'cuda':
            import torch
            net = DistributedDataParallel(net, device_ids=[torch.cuda.current_device()],
                                          find_unused_parameters=find_unused_parameters)
        else:
            net = DistributedDataParallel(net, find_unused_parameters=find_unused_parameters)
    elif self.opt['num_gpu'] > 1:
        net = DataParallel(net)
    return net


def fix_ddp_cpu():
    """Wrap models in DDP without ``device_ids`` on CPU.

    basicsr's ``BaseModel.model_to_device`` passes ``device_ids=[torch.cuda.current_device()]``,
    which fails without CUDA. Condition: CUDA is unavailable. Returns True if applied.
    """
    if _cuda_available() or _is_patched('basicsr.models.base_model', 'BaseModel.model_to_device'):
        return False
    return _patch('basicsr.models.base_model', 'BaseModel.model_to_device', _wrap(_model_to_device_cpu))


# --- 3. optimizers --------------------------------------------------------------------

def _get_optimizer(self, optim_type, params, lr, **kwargs):
    """``BaseModel.get_optimizer`` accepting any ``torch.optim`` optimizer by class name."""
    import torch
    cls = getattr(torch.optim, optim_type, None) if isinstance(optim_type, str) else None
    valid = isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    if not valid:
        raise NotImplementedError(f'optimizer {optim_type!r} is not supported: use the name of a torch.optim '
                                  'optimizer (e.g. Adam, AdamW, SGD)')
    return cls(params, lr, **kwargs)


def _optimizer_needs_fix(get_optimizer):
    import torch
    try:
        opt = get_optimizer(None, 'AdamW', [torch.nn.Parameter(torch.zeros(1))], 1e-3)
    except Exception:  # noqa: BLE001 - NotImplementedError in basicsr 1.4.2
        return True
    return not isinstance(opt, torch.optim.AdamW)


def fix_optimizers():
    """Accept every ``torch.optim`` optimizer in ``train.optim_*.type`` (GRL trains with AdamW).

    basicsr 1.4.2's ``BaseModel.get_optimizer`` accepts only ``Adam``. Condition: it rejects
    ``AdamW`` when probed with a dummy parameter (basicsr master / basicsr-fixed accept it).
    Unknown names raise a one-line ``NotImplementedError`` naming the type. Returns True if applied.
    """
    if _is_patched('basicsr.models.base_model', 'BaseModel.get_optimizer'):
        return False
    from basicsr.models.base_model import BaseModel
    if not _optimizer_needs_fix(BaseModel.get_optimizer):
        return False
    return _patch('basicsr.models.base_model', 'BaseModel.get_optimizer', _wrap(_get_optimizer))


# --- 4. per-device options (prefetch_mode, num_gpu) -----------------------------------

_PENDING_WARNINGS = []  # logged through basicsr's logger once the pipeline has created it


def adjust_options_for_device(opt, cuda_available=None):
    """Make a parsed option dict runnable on this machine; returns the warnings (strings).

    Without CUDA: ``datasets.<phase>.prefetch_mode: cuda`` becomes ``cpu`` (``CUDAPrefetcher``
    needs CUDA) and ``num_gpu > 0`` becomes 0 (``BaseModel`` would put the nets on ``cuda``).
    With CUDA nothing changes. ``num_gpu: auto`` is resolved by basicsr itself.
    """
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


def _wrap_parse_options(parse_options):
    @functools.wraps(parse_options)
    def wrapper(*args, **kwargs):
        opt, parsed = parse_options(*args, **kwargs)
        _PENDING_WARNINGS.extend(adjust_options_for_device(opt))
        return opt, parsed
    return wrapper


def _wrap_get_root_logger(get_root_logger):
    @functools.wraps(get_root_logger)
    def wrapper(*args, **kwargs):
        logger = get_root_logger(*args, **kwargs)
        while _PENDING_WARNINGS:
            logger.warning(_PENDING_WARNINGS.pop(0))
        return logger
    return wrapper


def fix_device_options():
    """Post-process options per device in ``basicsr.train`` and ``basicsr.test``.

    ``prefetch_mode: cuda`` fails without CUDA (``CUDAPrefetcher`` creates a CUDA stream).
    The ``parse_options`` module globals of ``basicsr.train`` and ``basicsr.test`` (looked up
    by the pipelines) are wrapped so that :func:`adjust_options_for_device` runs on the parsed
    options; its warnings are logged by basicsr's logger as soon as the pipeline creates it
    (``get_root_logger`` must not be initialised earlier, so those module globals are wrapped
    to flush them). Installed on every machine; it changes options only when CUDA is
    unavailable. Returns True if it was installed now.
    """
    done = False
    for module in ('basicsr.train', 'basicsr.test'):
        mod = importlib.import_module(module)
        if not _is_patched(module, 'parse_options'):
            done |= _patch(module, 'parse_options', _wrap_parse_options(mod.parse_options))
        if not _is_patched(module, 'get_root_logger'):
            done |= _patch(module, 'get_root_logger', _wrap_get_root_logger(mod.get_root_logger))
    return done


# --- 5. one LMDB opened by two datasets (recent py-lmdb refuses) -----------------------

_LMDB_ENVS = {}  # (pid, real path) -> lmdb.Environment shared by LmdbBackends of this process


def _lmdb_backend_init(self, db_paths, client_keys='default', readonly=True, lock=False, readahead=False,
                       **kwargs):
    """``LmdbBackend.__init__`` sharing one ``lmdb.Environment`` per path and process."""
    import lmdb
    if isinstance(client_keys, str):
        client_keys = [client_keys]
    if isinstance(db_paths, (list, tuple)):
        self.db_paths = [str(v) for v in db_paths]
    else:
        self.db_paths = [str(db_paths)]
    assert len(client_keys) == len(self.db_paths), ('client_keys and db_paths should have the same length, '
                                                    f'but received {len(client_keys)} and {len(self.db_paths)}.')
    self._client = {}
    for client, path in zip(client_keys, self.db_paths):
        key = (os.getpid(), osp.realpath(path))
        env = _LMDB_ENVS.get(key)
        if env is None:
            env = lmdb.open(path, readonly=readonly, lock=lock, readahead=readahead, **kwargs)
            _LMDB_ENVS[key] = env
        self._client[client] = env


def _lmdb_refuses_second_open():
    try:
        import lmdb
    except ImportError:
        return False
    try:
        return _probe_lmdb(lmdb)
    except OSError:  # no writable temporary directory: sharing environments is harmless
        return True


def _probe_lmdb(lmdb):
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


def fix_lmdb_shared_env():
    """Let two datasets of one process read the same LMDB (e.g. train and val on one LMDB).

    Recent py-lmdb (3.0.0 here) raises ``lmdb.Error: The environment ... is already open in
    this process`` when a path is opened twice; basicsr's ``LmdbBackend`` opens one environment per dataset,
    so with ``num_worker_per_gpu: 0`` (or in ``test_pipeline``) a second dataset on the same
    LMDB fails. Condition: probing a temporary LMDB shows that lmdb refuses a second open.
    Then ``basicsr.utils.file_client.LmdbBackend.__init__`` shares one read-only environment
    per (process id, real path) -- forked dataloader workers open their own. Returns True if applied.
    """
    if _is_patched('basicsr.utils.file_client', 'LmdbBackend.__init__') or not _lmdb_refuses_second_open():
        return False
    return _patch('basicsr.utils.file_client', 'LmdbBackend.__init__', _wrap(_lmdb_backend_init))


def _wrap(fn):
    """A fresh function object for ``fn`` (so marking it as a patch never touches ``fn``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


_BASICSR_FIXES = (fix_resume_state, fix_dist_init_cpu, fix_ddp_cpu, fix_optimizers, fix_device_options,
                  fix_lmdb_shared_env)


def apply_basicsr():
    """Run every basicsr pipeline fix that is needed (idempotent; imports basicsr).
    Call after :func:`apply`. Returns :func:`applied`."""
    apply()
    for fix in _BASICSR_FIXES:
        if fix() and fix.__name__ not in _APPLIED:
            _APPLIED.append(fix.__name__)
    return applied()


def _same(a, b):
    if a is b:
        return True
    key = lambda o: (getattr(o, '__module__', None), getattr(o, '__qualname__', None))  # noqa: E731
    return key(a)[1] is not None and key(a) == key(b)


def _describe(o):
    return f"{getattr(o, '__module__', '?')}.{getattr(o, '__qualname__', repr(o))}"


def register(registry, obj, name=None):
    """Idempotently register ``obj`` into a basicsr ``Registry`` under ``name``.

    ``name`` defaults to ``obj.__name__``. If the name already holds the same object,
    nothing happens; if it holds one with the same ``__module__`` and ``__qualname__``
    (a module reload), the new object replaces it. If an unrelated object holds the
    name, a ``ValueError`` naming both is raised. Returns ``obj``.
    """
    name = name or obj.__name__
    if name in registry:
        existing = registry._obj_map[name]
        if _same(existing, obj):
            registry._obj_map[name] = obj
            return obj
        raise ValueError(f"Cannot register {_describe(obj)} as '{name}' in the '{registry._name}' "
                         f"registry: the name is already taken by {_describe(existing)}")
    registry._do_register(name, obj)
    return obj
