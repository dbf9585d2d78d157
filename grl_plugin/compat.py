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
  fix_data_errors           ``basicsr.utils.file_client.FileClient.get`` and   a missing LMDB key gives
                            ``imfrombytes`` in every ``basicsr.*`` module      None / bad bytes no clear
                            (errors name the file or LMDB key + path)          error (probed; 1.4.2)
  fix_skip_corrupt          ``build_dataset`` of ``basicsr.data``,             always installed; acts only
                            ``basicsr.train``, ``basicsr.test``                on ``skip_corrupt: true``
  fix_load_network          ``BaseModel.load_network`` (weights only unless    it calls ``torch.load``
                            ``path.trust_checkpoint``; one-line errors)        without ``weights_only``
                                                                               (source; 1.4.2)
  fix_atomic_checkpoints    ``BaseModel.save_network`` and                     it writes the final file
                            ``BaseModel.save_training_state`` (temp file +     in place (probed; 1.4.2)
                            fsync + ``os.replace``: :func:`atomic_save`)
  fix_exact_resume          ``EnlargedSampler``, ``CPUPrefetcher``,            always installed; acts only
                            ``CUDAPrefetcher`` of ``basicsr.train`` (resume    after a model called
                            inside an epoch, RNG states restored; the CPU      :func:`resume_progress`
                            prefetcher starts one reader thread, not two)
  fix_prefetch_errors       ``PrefetchGenerator.run`` / ``__next__`` of        a reading error kills the
                            ``basicsr.data.prefetch_dataloader`` (a reading    thread and the training
                            error is raised in the training loop)              loop waits forever (probed)
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
           'adjust_options_for_device', 'load_resume_state', 'resume_map_location',
           'fix_data_errors', 'fix_skip_corrupt', 'fix_load_network', 'trust_checkpoint',
           'fix_atomic_checkpoints', 'atomic_save', 'save_checkpoint_file', 'remove_temp_files', 'TEMP_SUFFIX',
           'fix_exact_resume', 'fix_prefetch_errors', 'get_rng_state', 'set_rng_state', 'training_progress', 'resume_progress']

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
    them to ``torch.cuda.current_device()``, which fails without CUDA), with ``weights_only=True``
    unless ``path.trust_checkpoint: true`` (a truncated or refused state: one-line ``CheckpointError``).

    Crash safety (``auto_resume``): only ``<digits>.state`` names are considered (the temporary
    files of :func:`atomic_save` are hidden and end in :data:`TEMP_SUFFIX`; left over by a crash,
    rank 0 deletes them here), newest first, and a state is skipped (warning in the log) when it
    cannot be read or when a network file it resumes (``models/net_<g|d|...>_<iter>.pth`` of every
    ``network_*`` not in ``path.ignore_resume_networks``) is missing or incomplete. If states exist
    but none is usable, a one-line :class:`CompatError` says why (basicsr would archive the run
    and start again at iteration 0).
    """
    from basicsr.utils import check_resume, scandir

    _RESUME['pending'] = None  # a new pipeline: nothing left from an earlier resume in this process
    resume_state_path = None
    if opt['auto_resume']:
        state_dir = _training_states_dir(opt)
        if osp.isdir(state_dir):
            models_dir = opt['path'].get('models') or osp.join(osp.dirname(state_dir), 'models')
            if opt.get('rank', 0) == 0:
                removed = remove_temp_files(state_dir) + remove_temp_files(models_dir)
                if removed:
                    _PENDING_WARNINGS.append(f'Removed {len(removed)} unfinished checkpoint file(s) left by an '
                                             f'interrupted save: {", ".join(sorted(removed))}')
            iters = []
            for name in scandir(state_dir, suffix='state', recursive=False, full_path=False):
                stem = name[:-len('.state')]
                if stem.isdigit():
                    iters.append(int(stem))
            problems = []
            for it in sorted(set(iters), reverse=True):
                path = osp.join(state_dir, f'{it}.state')
                state, problem = _resume_candidate(opt, path, models_dir, it)
                if state is not None:
                    if problems:
                        _PENDING_WARNINGS.append(f'Resuming from {path}; newer state(s) skipped: {"; ".join(problems)}')
                    opt['path']['resume_state'] = path
                    check_resume(opt, state['iter'])
                    return state
                problems.append(f'{it}.state: {problem}')
            if problems:
                raise CompatError(f'--auto_resume: no usable training state in {state_dir} ({"; ".join(problems)})')
    elif opt['path'].get('resume_state'):
        resume_state_path = opt['path']['resume_state']

    if resume_state_path is None:
        return None
    from grl_plugin.archs.checkpoint import torch_load  # weights only unless path.trust_checkpoint
    resume_state = torch_load(resume_state_path, trust=trust_checkpoint(opt), map_location=resume_map_location(opt))
    check_resume(opt, resume_state['iter'])
    return resume_state


def _complete_torch_file(path):
    """Cheap completeness check of a ``torch.save`` file: the zip directory at its end is there
    (a truncated file lacks it); files in torch's legacy format are read once."""
    import zipfile
    if zipfile.is_zipfile(path):
        return True
    from grl_plugin.archs.checkpoint import CheckpointError, torch_load
    try:
        torch_load(path)
    except CheckpointError:
        return False
    return True


def _resume_candidate(opt, state_path, models_dir, it):
    """``(state, None)`` if ``state_path`` can be resumed, else ``(None, reason)``."""
    from grl_plugin.archs.checkpoint import CheckpointError, torch_load
    ignored = opt['path'].get('ignore_resume_networks') or ()
    for network in sorted(k for k in opt if k.startswith('network_')):
        if network in ignored:
            continue
        net_path = osp.join(models_dir, f'net_{network[len("network_"):]}_{it}.pth')
        if not osp.isfile(net_path):
            return None, f'{net_path} is missing'
        if not _complete_torch_file(net_path):
            return None, f'{net_path} is incomplete'
    try:
        state = torch_load(state_path, trust=trust_checkpoint(opt), map_location=resume_map_location(opt))
    except CheckpointError as err:
        return None, ' '.join(str(err).split())
    if not isinstance(state, dict) or not isinstance(state.get('iter'), int):
        return None, 'not a BasicSR training state'
    return state, None


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


# --- 6. bad data and untrusted checkpoints ---------------------------------------------

def _file_client_get(self, filepath, client_key='default'):
    """``FileClient.get``: a key missing from an LMDB or an unreadable file raises ``DataError``
    naming it; the bytes carry their source for :func:`_imfrombytes`."""
    from grl_plugin.data.robust import fetch_bytes
    return fetch_bytes(self, filepath, client_key)


def _imfrombytes(content, flag='color', float32=False):
    """``imfrombytes``: empty, corrupt or truncated data raises ``DataError`` naming the file or
    LMDB key (same result as basicsr's for a valid image)."""
    from grl_plugin.data.robust import decode_image
    return decode_image(content, flag=flag, float32=float32)


def _data_errors_need_fix(get, imfrombytes):
    """Probe (no LMDB needed): does ``get`` return None for a key missing from an LMDB, or does
    ``imfrombytes`` fail on bytes that are no image with something else than a ValueError?"""
    from basicsr.utils.file_client import FileClient, LmdbBackend

    class _Txn:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def get(self, key):
            return None

    class _Env:
        def begin(self, write=False):
            return _Txn()

    backend = object.__new__(LmdbBackend)
    backend.db_paths, backend._client = ['probe.lmdb'], {'default': _Env()}
    client = object.__new__(FileClient)
    client.backend, client.client = 'lmdb', backend
    try:
        if get(client, 'grl_probe_key', 'default') is None:
            return True
    except Exception as err:  # noqa: BLE001
        if 'grl_probe_key' not in str(err):
            return True
    try:
        imfrombytes(b'not an image', float32=True)
    except ValueError:
        return False
    except Exception:  # noqa: BLE001 - AttributeError on None in basicsr 1.4.2
        return True
    return True  # decoded garbage into something


def fix_data_errors():
    """Name the file, or the LMDB key and path, when BasicSR's datasets meet bad data.

    basicsr 1.4.2's ``LmdbBackend.get`` returns None for a key that ``meta_info.txt`` lists but
    the LMDB lacks, and ``imfrombytes`` then fails with ``'NoneType' ...`` (``cv2.imdecode``
    returns None for a corrupt file; an empty one gives an OpenCV assertion) -- without saying
    which file. Condition: probed on a stand-in LMDB environment and on non-image bytes. Then
    ``FileClient.get`` and the ``imfrombytes`` name of every loaded ``basicsr.*`` module go through
    :mod:`grl_plugin.data.robust`: ``DataError`` (a ValueError, one line) naming the image file or
    the LMDB key and path; valid images decode exactly as before. Returns True if applied.
    """
    if _is_patched('basicsr.utils.file_client', 'FileClient.get'):
        return False
    import basicsr.data  # noqa: F401 - every dataset module (they import imfrombytes by name)
    from basicsr.utils import img_util
    from basicsr.utils.file_client import FileClient
    if not _data_errors_need_fix(FileClient.get, img_util.imfrombytes):
        return False
    plain = img_util.imfrombytes
    for name, mod in sorted(sys.modules.items()):
        if (name == 'basicsr' or name.startswith('basicsr.')) and getattr(mod, '__dict__', {}).get('imfrombytes') is plain:
            _patch(name, 'imfrombytes', _wrap(_imfrombytes))
    return _patch('basicsr.utils.file_client', 'FileClient.get', _wrap(_file_client_get))


def _wrap_build_dataset(build_dataset):
    @functools.wraps(build_dataset)
    def wrapper(dataset_opt):
        from grl_plugin.data.robust import with_skip_corrupt
        return with_skip_corrupt(build_dataset(dataset_opt), dataset_opt)
    return wrapper


def fix_skip_corrupt():
    """Honour ``skip_corrupt: true`` in the options of BasicSR's own datasets.

    The plugin's datasets skip unreadable samples themselves; basicsr's (``PairedImageDataset``...)
    know no such option. The ``build_dataset`` globals of ``basicsr.data``, ``basicsr.train`` and
    ``basicsr.test`` are wrapped: a dataset whose options set ``skip_corrupt: true`` and that does
    not handle it is returned inside :class:`grl_plugin.data.robust.SkipCorruptDataset`. Installed
    on every machine; it changes nothing without the option. Returns True if installed now.
    """
    done = False
    for module in ('basicsr.data', 'basicsr.train', 'basicsr.test'):
        mod = importlib.import_module(module)
        if not _is_patched(module, 'build_dataset'):
            done |= _patch(module, 'build_dataset', _wrap_build_dataset(mod.build_dataset))
    return done


def trust_checkpoint(opt):
    """``path.trust_checkpoint`` of an option dict: True only if set to ``true`` (default False).
    Lets checkpoints and training states that need arbitrary pickled globals be loaded."""
    path = (opt or {}).get('path') or {}
    return isinstance(path, dict) and path.get('trust_checkpoint') is True


def _load_network(self, net, load_path, strict=True, param_key='params'):
    """``BaseModel.load_network`` through :func:`grl_plugin.archs.checkpoint.torch_load` (weights
    only unless ``path.trust_checkpoint: true``); an unreadable file, a missing ``param_key`` or
    (strict) weights that do not fit ``net`` raise a one-line ``CheckpointError`` naming the file."""
    from basicsr.utils import get_root_logger

    from grl_plugin.archs.checkpoint import CheckpointError, check_fit, torch_load
    logger = get_root_logger()
    net = self.get_bare_model(net)
    load_net = torch_load(load_path, trust=trust_checkpoint(self.opt))
    if param_key is not None:
        if isinstance(load_net, dict) and param_key not in load_net and 'params' in load_net:
            param_key = 'params'
            logger.info('Loading: params_ema does not exist, use params.')
        if not isinstance(load_net, dict) or param_key not in load_net:
            top = ', '.join(map(str, list(load_net)[:6])) if isinstance(load_net, dict) else type(load_net).__name__
            raise CheckpointError(f'{load_path}: no {param_key!r} entry (top level: {top})')
        load_net = load_net[param_key]
    if not isinstance(load_net, dict):
        raise CheckpointError(f'{load_path}: not a state dict ({type(load_net).__name__})')
    logger.info(f'Loading {net.__class__.__name__} model from {load_path}, with param key: [{param_key}].')
    load_net = type(load_net)((k[len('module.'):] if k.startswith('module.') else k, v) for k, v in load_net.items())
    if strict:
        check_fit(net, load_net, path=load_path, what=f'the network ({type(net).__name__})')
    self._print_different_keys_loading(net, load_net, strict)
    net.load_state_dict(load_net, strict=strict)


def _load_network_needs_fix(fn):
    import inspect
    try:
        return 'weights_only' not in inspect.getsource(fn)
    except (OSError, TypeError):
        return True


def fix_load_network():
    """Load networks (``pretrain_network_*``) safely, with one-line errors.

    basicsr 1.4.2's ``BaseModel.load_network`` calls ``torch.load`` without ``weights_only``
    (safe only through torch's default, which was False before torch 2.6), and reports a
    truncated file, a refused pickle or weights of another architecture with torch's multi-line
    errors. Condition: its source passes no ``weights_only``. The replacement reads with
    ``weights_only=True`` (then the restricted reader; a full unpickle only with
    ``path.trust_checkpoint: true``) and raises a one-line ``CheckpointError`` naming the file and
    the first missing / unexpected / shape-mismatched keys. Returns True if applied.
    """
    if _is_patched('basicsr.models.base_model', 'BaseModel.load_network'):
        return False
    from basicsr.models.base_model import BaseModel
    if not _load_network_needs_fix(BaseModel.load_network):
        return False
    return _patch('basicsr.models.base_model', 'BaseModel.load_network', _wrap(_load_network))


# --- 7. crash-safe checkpoint files ----------------------------------------------------

#: Suffix of the temporary files :func:`atomic_save` writes next to their target
#: (``.<name>.<random>.grl-tmp``): hidden and never ending in ``.state`` or ``.pth``, so neither
#: basicsr's ``scandir`` (it skips hidden files; its ``load_resume_state`` parses every
#: ``*state`` name with ``float()``) nor :func:`load_resume_state` ever lists one.
TEMP_SUFFIX = '.grl-tmp'

_FILE_MODE = []  # 0o666 & ~umask, computed once


def _file_mode():
    if not _FILE_MODE:
        mask = os.umask(0)
        os.umask(mask)
        _FILE_MODE.append(0o666 & ~mask)
    return _FILE_MODE[0]


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """``torch.save(obj, path)`` that never leaves a partial ``path``; returns ``path``.

    Writes a hidden temporary file in the same folder (``.<name>.<random>`` + :data:`TEMP_SUFFIX`),
    flushes and fsyncs it, renames it over ``path`` with ``os.replace`` (atomic) and fsyncs the
    folder. A crash at any moment (``kill -9``, power loss) leaves the old ``path`` or the new one,
    at most plus a stray temporary file (:func:`remove_temp_files`). On an exception the
    temporary file is removed and the exception propagates; ``path`` is untouched.
    """
    import torch
    path = os.fspath(path)
    folder, base = osp.split(osp.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f'.{base}.', suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            if hasattr(os, 'fchmod'):
                os.fchmod(f.fileno(), _file_mode())  # mkstemp creates 0600; torch.save gives 0666 & ~umask
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
    return path


def remove_temp_files(folder):
    """Delete the temporary files of :func:`atomic_save` in ``folder`` (left by a crash during a
    save); returns their names. Nothing else is touched."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if name.startswith('.') and name.endswith(TEMP_SUFFIX):
            try:
                os.unlink(osp.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def save_checkpoint_file(obj, path, what='model'):
    """:func:`atomic_save` with basicsr's retry policy: 3 tries 1 s apart, then a warning and
    training goes on (as in basicsr; :func:`load_resume_state` never resumes a state whose
    network file is missing). Returns True if saved."""
    import time

    from basicsr.utils import get_root_logger
    for remaining in (2, 1, 0):
        try:
            atomic_save(obj, path)
            return True
        except Exception as err:  # noqa: BLE001 - basicsr: "avoid occasional writing errors"
            get_root_logger().warning(f'Save {what} error: {err}, remaining retry times: {remaining}')
            if remaining:
                time.sleep(1)
    get_root_logger().warning(f'Still cannot save {path}. Just ignore it.')
    return False


def _is_rank0():
    from basicsr.utils.dist_util import get_dist_info
    return get_dist_info()[0] == 0


def _save_network_atomic(self, net, net_label, current_iter, param_key='params'):
    """``BaseModel.save_network`` (rank 0 only) writing ``<net_label>_<iter>.pth`` atomically."""
    from collections import OrderedDict
    if not _is_rank0():
        return
    if current_iter == -1:
        current_iter = 'latest'
    save_path = osp.join(self.opt['path']['models'], f'{net_label}_{current_iter}.pth')
    nets = net if isinstance(net, list) else [net]
    keys = param_key if isinstance(param_key, list) else [param_key]
    assert len(nets) == len(keys), 'The lengths of net and param_key should be the same.'
    save_dict = {}
    for net_, key in zip(nets, keys):
        state_dict = self.get_bare_model(net_).state_dict()
        save_dict[key] = OrderedDict((k[len('module.'):] if k.startswith('module.') else k, v.cpu())
                                     for k, v in state_dict.items())
    save_checkpoint_file(save_dict, save_path, 'model')


def _save_training_state_atomic(self, epoch, current_iter):
    """``BaseModel.save_training_state`` (rank 0 only) writing ``<iter>.state`` atomically."""
    if current_iter == -1 or not _is_rank0():
        return
    state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
             'schedulers': [s.state_dict() for s in self.schedulers]}
    save_checkpoint_file(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'),
                         'training state')


def _writes_in_place(method, args, final_name):
    """Run basicsr's save ``method`` on a stand-in model in a temporary folder, recording where
    ``torch.save`` writes: True if it writes ``final_name`` itself (or the probe cannot tell)."""
    import torch

    import basicsr.models.base_model as base_model
    targets = []

    class _RecordingTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def save(obj, f, *a, **kw):
            targets.append(f)
            return torch.save(obj, f, *a, **kw)

    try:
        with tempfile.TemporaryDirectory(prefix='grl_compat_probe_') as folder:
            model = types.SimpleNamespace(opt={'path': {'models': folder, 'training_states': folder}},
                                          optimizers=[], schedulers=[], get_bare_model=lambda n: n)
            saved, base_model.torch = base_model.torch, _RecordingTorch()
            try:
                method(model, *args)
            finally:
                base_model.torch = saved
            final = osp.join(folder, final_name)
            return not targets or any(isinstance(t, (str, os.PathLike)) and osp.abspath(os.fspath(t)) == final
                                      for t in targets)
    except Exception:  # noqa: BLE001 - cannot tell: the atomic replacement does what basicsr does
        return True


def fix_atomic_checkpoints():
    """Write models and training states atomically (crash safety).

    basicsr 1.4.2's ``BaseModel.save_network`` / ``save_training_state`` ``torch.save`` straight
    into ``models/net_g_<iter>.pth`` / ``training_states/<iter>.state``: a crash or ``kill -9``
    during the write leaves a truncated file, and ``--auto_resume`` then picks the truncated
    newest state. Condition: each method is probed on a stand-in model in a temporary folder
    (``torch.save`` recorded): if it writes the final file in place, it is replaced by the same
    code writing through :func:`atomic_save` (temp file + fsync + ``os.replace``; basicsr's 3
    retries kept). Models whose ``save`` writes networks before the state (all of basicsr's)
    then never leave a state without its networks. Returns True if applied.
    """
    import torch
    done = False
    for attr, new, args, final in (
            ('BaseModel.save_network', _save_network_atomic, (torch.nn.Linear(1, 1), 'grl_probe', 1),
             'grl_probe_1.pth'),
            ('BaseModel.save_training_state', _save_training_state_atomic, (0, 1), '1.state')):
        if _is_patched('basicsr.models.base_model', attr):
            continue
        if _writes_in_place(_resolve('basicsr.models.base_model', attr)[2], args, final):
            done |= _patch('basicsr.models.base_model', attr, _wrap(new))
    return done


# --- 8. exact resume: position inside the epoch and RNG states -------------------------

def get_rng_state():
    """States of python ``random``, numpy's global RNG, torch's CPU RNG and (when CUDA is
    initialised) every CUDA device, as a dict that ``torch.load(weights_only=True)`` reads back
    (numpy's key as an int64 tensor)."""
    import random

    import numpy as np
    import torch
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {'python': random.getstate(),
             'numpy': {'kind': str(kind), 'key': torch.from_numpy(key.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'gauss': float(gauss)},
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what :func:`get_rng_state` returned (CUDA states only with as many devices)."""
    import random

    import numpy as np
    import torch
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state((n['kind'], n['key'].cpu().numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    torch.set_rng_state(state['torch'].cpu())
    cuda = state.get('cuda')
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# the train prefetcher created last (weak reference) and a resume waiting for its next reset()
_RESUME = {'prefetcher': None, 'pending': None}


def training_progress():
    """Where the training loop of ``basicsr.train.train_pipeline`` is: ``{'epoch', 'batches'
    (handed out in this epoch), 'batch_size', 'num_batches' (per epoch), 'rng_before_prefetch'
    (CUDAPrefetcher: RNG states before it drew the batch it holds, else None)}`` of the train
    prefetcher created last; None outside the pipeline or without :func:`fix_exact_resume`."""
    ref = _RESUME['prefetcher']
    prefetcher = ref() if ref is not None else None
    return prefetcher.grl_progress() if prefetcher is not None else None


def resume_progress(progress, rng=None):
    """Make the next train prefetcher ``reset()`` continue after ``progress`` (what
    :func:`training_progress` returned when the state was saved): it skips the batches already
    trained on without loading them and restores ``rng`` (:func:`get_rng_state` at save time)
    right before the next batch is drawn. Called by a model's ``resume_training``."""
    _RESUME['pending'] = {'progress': dict(progress), 'rng': rng}


def _progress_of(prefetcher):
    loader = prefetcher.ori_loader
    return {'epoch': getattr(getattr(loader, 'sampler', None), 'epoch', None), 'batches': prefetcher.grl_batches,
            'batch_size': getattr(loader, 'batch_size', None), 'num_batches': len(loader),
            'rng_before_prefetch': prefetcher.grl_rng_before_prefetch}


def _take_pending(prefetcher):
    """The pending resume if it fits this loader and epoch (logged), else None (warning)."""
    from basicsr.utils import get_root_logger
    pending, _RESUME['pending'] = _RESUME['pending'], None
    if pending is None:
        return None
    saved, now = pending['progress'], _progress_of(prefetcher)
    logger = get_root_logger()
    diffs = [f'{k} {saved.get(k)} -> {now[k]}' for k in ('epoch', 'batch_size', 'num_batches')
             if saved.get(k) != now[k]]
    if diffs or not 0 <= saved.get('batches', -1) <= now['num_batches']:
        why = ', '.join(diffs) or f'batches {saved.get("batches")}'
        logger.warning(f'Cannot resume inside the epoch ({why}): the epoch restarts from its first batch, '
                       'as in BasicSR.')
        return None
    logger.info(f'Resuming inside epoch {now["epoch"]}: skipping the {saved["batches"]} batch(es) already '
                f'trained on{"; RNG states restored" if pending["rng"] is not None else ""}.')
    return pending


def _skip_in_sampler(prefetcher, batches):
    """Let the sampler drop the first ``batches`` batches of its next pass; returns how many
    batches are left to skip by loading them (a sampler without ``grl_skip``)."""
    loader = prefetcher.ori_loader
    sampler = getattr(loader, 'sampler', None)
    if batches and hasattr(sampler, 'grl_skip') and getattr(loader, 'batch_sampler', None) is not None:
        sampler.grl_skip = batches * loader.batch_size
        return 0
    return batches


def _resumable_train_classes():
    """Subclasses of basicsr's ``EnlargedSampler``, ``CPUPrefetcher`` and ``CUDAPrefetcher`` for
    :func:`fix_exact_resume` (made on demand: this module does not import basicsr)."""
    import itertools
    import weakref

    from basicsr.data.data_sampler import EnlargedSampler
    from basicsr.data.prefetch_dataloader import CPUPrefetcher, CUDAPrefetcher

    class ResumableEnlargedSampler(EnlargedSampler):
        """``EnlargedSampler`` whose next pass can start ``grl_skip`` indices in."""
        grl_skip = 0

        def __iter__(self):
            skip, self.grl_skip = self.grl_skip, 0
            indices = super().__iter__()
            return itertools.islice(indices, skip, None) if skip else indices

    class _Counting:
        """Counts the batches handed out in the epoch (``grl_batches``) for the training state."""

        def grl_progress(self):
            return _progress_of(self)

        def next(self):
            batch = super().next()
            if batch is not None:
                self.grl_batches += 1
            return batch

    class ResumableCPUPrefetcher(_Counting, CPUPrefetcher):
        """``CPUPrefetcher`` counting the batches of the epoch; resumes inside an epoch."""

        def __init__(self, loader):  # noqa: super().__init__ not called: no iterator yet
            # basicsr's starts an iterator here and ``train_pipeline`` starts another one in
            # ``reset()`` before the first batch: with ``prefetch_mode: cpu`` that is two
            # prefetch threads reading the dataset at once (a race on its lazily opened file
            # client, KeyError 'type') and one thread left blocked forever. The iterator is
            # created on first use instead.
            self.ori_loader, self.loader = loader, None
            self.grl_batches, self.grl_rng_before_prefetch = 0, None
            _RESUME['prefetcher'] = weakref.ref(self)

        def next(self):
            if self.loader is None:
                self.loader = iter(self.ori_loader)
            return super().next()

        def reset(self):
            pending = _take_pending(self)
            skip = pending['progress']['batches'] if pending else 0
            left = _skip_in_sampler(self, skip)
            super().reset()  # a new DataLoader iterator (draws a seed from torch's RNG)
            for _ in range(left):
                next(self.loader)
            self.grl_batches = skip
            if pending and pending['rng'] is not None:
                set_rng_state(pending['rng'])  # as right after the save, before the next batch

    class ResumableCUDAPrefetcher(_Counting, CUDAPrefetcher):
        """``CUDAPrefetcher`` counting the batches of the epoch; resumes inside an epoch. It draws
        one batch ahead, so it keeps the RNG states from before that draw for the training state."""

        def __init__(self, loader, opt):
            self.grl_batches, self.grl_rng_before_prefetch = 0, None
            super().__init__(loader, opt)
            _RESUME['prefetcher'] = weakref.ref(self)

        def preload(self):
            self.grl_rng_before_prefetch = get_rng_state()
            return super().preload()

        def reset(self):
            pending = _take_pending(self)
            if pending is None:
                self.grl_batches = 0
                return super().reset()
            saved, rng = pending['progress'], pending['rng']
            left = _skip_in_sampler(self, saved['batches'])
            self.loader = iter(self.ori_loader)
            for _ in range(left):
                next(self.loader)
            self.grl_batches = saved['batches']
            if rng is not None:
                set_rng_state(saved.get('rng_before_prefetch') or rng)
            self.preload()
            if rng is not None:
                set_rng_state(rng)

    return ResumableEnlargedSampler, ResumableCPUPrefetcher, ResumableCUDAPrefetcher


def fix_exact_resume():
    """Resume inside an epoch with the RNG states of the interrupted run.

    basicsr 1.4.2 saves no RNG states (python ``random``, numpy, torch) and restarts the saved
    epoch from its first batch (``start_epoch`` is the epoch in progress), so a resumed run trains
    on other batches with other random crops/noise than an uninterrupted one. The module globals
    ``EnlargedSampler``, ``CPUPrefetcher`` and ``CUDAPrefetcher`` of ``basicsr.train`` (looked
    up by ``train_pipeline``) are replaced by subclasses that count the batches handed out in the
    epoch (:func:`training_progress`, saved by GRL models with :func:`get_rng_state` in their
    training state) and, after a model's ``resume_training`` called :func:`resume_progress`, skip
    the batches already trained on without loading them (the sampler starts further in) and
    restore the RNG states right before the next batch is drawn (after creating the DataLoader
    iterator, which itself draws from torch's RNG). Without a pending resume they behave exactly
    as basicsr's. Exact (same losses as an uninterrupted run) with ``num_worker_per_gpu: 0`` and
    ``prefetch_mode: null``/``cuda``; with worker processes or ``prefetch_mode: cpu`` the
    position is restored but the workers' random state is not. Installed on every machine.
    Returns True if installed now.
    """
    import basicsr.train  # noqa: F401
    names = ('EnlargedSampler', 'CPUPrefetcher', 'CUDAPrefetcher')
    if all(_is_patched('basicsr.train', name) for name in names):
        return False
    done = False
    for name, cls in zip(names, _resumable_train_classes()):
        if not _is_patched('basicsr.train', name):
            done |= _patch('basicsr.train', name, cls)
    return done


# --- 9. errors inside basicsr's prefetch thread ------------------------------------------

class _PrefetchFailure:
    """What the prefetch thread hands the consumer instead of a batch when reading failed."""

    def __init__(self, error):
        self.error = error


def _prefetch_run(self):
    """``PrefetchGenerator.run``: as basicsr's, but an exception while reading is handed to the
    consumer (raised from ``__next__``) instead of killing the thread silently."""
    try:
        for item in self.generator:
            self.queue.put(item)
    except BaseException as err:  # noqa: BLE001 - re-raised in the training loop's thread
        self.queue.put(_PrefetchFailure(err))
        return
    self.queue.put(None)


def _prefetch_next(self):
    """``PrefetchGenerator.__next__``: re-raises what :func:`_prefetch_run` caught."""
    item = self.queue.get()
    if item is None:
        raise StopIteration
    if isinstance(item, _PrefetchFailure):
        raise item.error
    return item


def _prefetch_error_is_lost(generator_cls):
    """Probe: after the prefetch thread met an error, is its queue left empty (so that the
    consumer's ``queue.get()`` would block forever)?"""
    import threading

    def failing():
        raise ValueError('grl compat probe')
        yield  # noqa: unreachable - makes this a generator

    hook, threading.excepthook = threading.excepthook, lambda args: None  # no traceback on stderr
    try:
        gen = generator_cls(failing(), 1)
        gen.join(timeout=10)
        return not gen.is_alive() and gen.queue.empty()
    finally:
        threading.excepthook = hook


def fix_prefetch_errors():
    """Raise data errors from ``prefetch_mode: cpu`` in the training loop instead of hanging.

    basicsr 1.4.2's ``PrefetchGenerator`` reads batches in a thread; when reading raises (an
    unreadable image, a missing LMDB key), the thread dies with a traceback on stderr and never
    puts its end marker, so the training loop waits in ``queue.get()`` forever. Condition:
    probed with a generator that raises (the queue stays empty). Then ``run``/``__next__`` hand
    the exception to the consumer, where it is raised (and reported in one line by
    ``grl-train``). Returns True if applied.
    """
    module = 'basicsr.data.prefetch_dataloader'
    if _is_patched(module, 'PrefetchGenerator.run'):
        return False
    from basicsr.data.prefetch_dataloader import PrefetchGenerator
    if not _prefetch_error_is_lost(PrefetchGenerator):
        return False
    _patch(module, 'PrefetchGenerator.__next__', _wrap(_prefetch_next))
    return _patch(module, 'PrefetchGenerator.run', _wrap(_prefetch_run))


def _wrap(fn):
    """A fresh function object for ``fn`` (so marking it as a patch never touches ``fn``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


_BASICSR_FIXES = (fix_resume_state, fix_dist_init_cpu, fix_ddp_cpu, fix_optimizers, fix_device_options,
                  fix_lmdb_shared_env, fix_data_errors, fix_skip_corrupt, fix_load_network,
                  fix_atomic_checkpoints, fix_exact_resume, fix_prefetch_errors)


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
