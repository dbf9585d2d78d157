"""Checkpoint files that survive crashes, and a ``--auto_resume`` that never picks a broken one.

* :func:`atomic_save` -- ``torch.save`` through a hidden temporary file, fsync and ``os.replace``:
  a crash or ``kill -9`` at any moment leaves the old file or the new one. ``GRLModel`` writes
  its networks and training states with it (:func:`save_checkpoint_file`, BasicSR's three
  tries kept).
* :func:`load_resume_state` replaces ``basicsr.train.load_resume_state`` (:func:`install`; the
  one global change of this module). BasicSR's looks for states in
  ``experiments/<name>/training_states`` relative to the current folder (from elsewhere it
  silently starts again at iteration 0) and maps them to CUDA (fails on the CPU). This one reads
  ``opt['path']['training_states']``, maps to the run's device, reads with ``weights_only``
  unless ``path.trust_checkpoint: true``, and with ``--auto_resume`` takes the newest state whose
  files are complete: temporary files left by a crash are removed (rank 0), a state that
  cannot be read or whose network files (``models/net_<label>_<iter>.pth`` of every
  ``network_*`` not in ``path.ignore_resume_networks``) are missing or incomplete is skipped
  with a warning; states that exist but none usable end the run with one line.
"""
from __future__ import annotations

import os
import os.path as osp
import tempfile
import time
import zipfile
from typing import Any, Optional, Tuple

import torch

__all__ = ['TEMP_SUFFIX', 'atomic_save', 'remove_temp_files', 'save_checkpoint_file', 'trust_checkpoint',
           'resume_map_location', 'load_resume_state', 'install']

#: Suffix of :func:`atomic_save`'s temporary files (``.<name>.<random>.grl-tmp``): hidden and not
#: ending in ``.state`` or ``.pth``, so no resume logic (BasicSR's or ours) ever lists one.
TEMP_SUFFIX = '.grl-tmp'


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save(obj, path)`` that never leaves a partial ``path``; returns ``path``. On an
    exception the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    folder, base = osp.split(osp.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f'.{base}.', suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            if hasattr(os, 'fchmod'):  # mkstemp creates 0600; torch.save would give 0666 & ~umask
                mask = os.umask(0)
                os.umask(mask)
                os.fchmod(f.fileno(), 0o666 & ~mask)
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


def remove_temp_files(folder: str) -> list:
    """Delete :func:`atomic_save`'s temporary files in ``folder``; returns their names."""
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


def save_checkpoint_file(obj: Any, path: str, what: str = 'model') -> bool:
    """:func:`atomic_save` with BasicSR's retry policy: 3 tries 1 s apart, then a warning and
    training goes on (a state whose network file is missing is never resumed). True if saved."""
    from basicsr.utils import get_root_logger
    for remaining in (2, 1, 0):
        try:
            atomic_save(obj, path)
            return True
        except Exception as err:  # noqa: BLE001 - BasicSR: "avoid occasional writing errors"
            get_root_logger().warning(f'Save {what} error: {err}, remaining retry times: {remaining}')
            if remaining:
                time.sleep(1)
    get_root_logger().warning(f'Still cannot save {path}. Just ignore it.')
    return False


def trust_checkpoint(opt: Optional[dict]) -> bool:
    """``path.trust_checkpoint`` of an option dict: True only if set to ``true``."""
    path = (opt or {}).get('path') or {}
    return isinstance(path, dict) and path.get('trust_checkpoint') is True


def resume_map_location(opt: dict) -> torch.device:
    """The current CUDA device if the run uses GPUs and CUDA works, else the CPU."""
    if opt.get('num_gpu', 0) != 0 and torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def _complete(path: str) -> bool:
    """A ``torch.save`` zip file has its directory at the end (a truncated one lacks it)."""
    if zipfile.is_zipfile(path):
        return True
    from ..archs.checkpoint import CheckpointError, torch_load
    try:
        torch_load(path)  # torch's legacy format: read it once
    except CheckpointError:
        return False
    return True


def _candidate(opt: dict, state_path: str, models_dir: str, it: int) -> Tuple[Optional[dict], Optional[str]]:
    """``(state, None)`` if ``state_path`` can be resumed, else ``(None, reason)``."""
    from ..archs.checkpoint import CheckpointError, torch_load
    ignored = opt['path'].get('ignore_resume_networks') or ()
    for network in sorted(k for k in opt if k.startswith('network_') and k not in ignored):
        net_path = osp.join(models_dir, f'net_{network[len("network_"):]}_{it}.pth')
        if not osp.isfile(net_path):
            return None, f'{net_path} is missing'
        if not _complete(net_path):
            return None, f'{net_path} is incomplete'
    try:
        state = torch_load(state_path, trust=trust_checkpoint(opt), map_location=resume_map_location(opt))
    except CheckpointError as err:
        return None, ' '.join(str(err).split())
    if not isinstance(state, dict) or not isinstance(state.get('iter'), int):
        return None, 'not a BasicSR training state'
    return state, None


def load_resume_state(opt: dict) -> Optional[dict]:
    """``basicsr.train.load_resume_state`` from any folder, on any device, crash safe (see the
    module docstring). Same contract: the state dict or None, ``opt['path']['resume_state']`` set
    when auto-resuming, ``check_resume`` called."""
    from basicsr.utils import check_resume, scandir

    from ..archs.checkpoint import CheckpointError, torch_load
    from ..patching import warn_later
    from .exact_resume import forget_pending_resume
    forget_pending_resume()  # a new pipeline: nothing left from an earlier one in this process
    if not opt['auto_resume']:
        path = opt['path'].get('resume_state')
        if not path:
            return None
        state = torch_load(path, trust=trust_checkpoint(opt), map_location=resume_map_location(opt))
        check_resume(opt, state['iter'])
        return state
    state_dir = opt['path'].get('training_states') or osp.join(
        opt.get('root_path') or os.getcwd(), 'experiments', opt['name'], 'training_states')
    if not osp.isdir(state_dir):
        return None
    models_dir = opt['path'].get('models') or osp.join(osp.dirname(state_dir), 'models')
    if opt.get('rank', 0) == 0:
        removed = remove_temp_files(state_dir) + remove_temp_files(models_dir)
        if removed:
            warn_later(f'Removed {len(removed)} unfinished checkpoint file(s) left by an interrupted save: '
                       f'{", ".join(sorted(removed))}')
    iters = {int(name[:-len('.state')]) for name in scandir(state_dir, suffix='state', recursive=False)
             if name[:-len('.state')].isdigit()}
    problems = []
    for it in sorted(iters, reverse=True):
        path = osp.join(state_dir, f'{it}.state')
        state, problem = _candidate(opt, path, models_dir, it)
        if state is not None:
            if problems:
                warn_later(f'Resuming from {path}; newer state(s) skipped: {"; ".join(problems)}')
            opt['path']['resume_state'] = path
            check_resume(opt, state['iter'])
            return state
        problems.append(f'{it}.state: {problem}')
    if problems:
        raise CheckpointError(f'--auto_resume: no usable training state in {state_dir} ({"; ".join(problems)})')
    return None


def install() -> bool:
    """Replace ``basicsr.train.load_resume_state`` by :func:`load_resume_state` (idempotent)."""
    import basicsr.train  # noqa: F401

    from ..patching import is_patched, patch
    if is_patched('basicsr.train', 'load_resume_state'):
        return False
    return patch('basicsr.train', 'load_resume_state', load_resume_state, 'grl_plugin.models.checkpoint_io')
