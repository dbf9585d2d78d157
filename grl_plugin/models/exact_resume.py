"""Resuming inside an epoch with the random states of the interrupted run.

BasicSR 1.4.2 saves no random states and restarts the saved epoch from its first batch, so a
resumed run trains on other batches, crops and noise than an uninterrupted one. ``GRLModel``
saves :func:`get_rng_state` and :func:`training_progress` in its training states and, when
resuming, hands them to :func:`resume_progress`; the train prefetcher then skips the batches
already trained on (the sampler starts further in, nothing is loaded) and restores the random
states right before the next batch is drawn. With a fixed seed, ``num_worker_per_gpu: 0`` and
``prefetch_mode: null``/``cuda`` the resumed run logs the same losses as an uninterrupted one;
with worker processes or ``prefetch_mode: cpu`` the position is restored, the workers' random
states are not.

:func:`install` is this module's one global change: the ``EnlargedSampler``, ``CPUPrefetcher``
and ``CUDAPrefetcher`` names of ``basicsr.train`` (``train_pipeline`` creates them) become
subclasses that count the batches of the epoch and act on a pending resume; without one they
behave exactly as BasicSR's (the CPU prefetcher also starts one reading thread instead of two).
"""
from __future__ import annotations

import itertools
import random
import weakref
from typing import Any, Optional

import numpy as np
import torch

__all__ = ['get_rng_state', 'set_rng_state', 'training_progress', 'resume_progress', 'forget_pending_resume',
           'install']

# the train prefetcher created last (weak reference) and a resume waiting for its next reset()
_RESUME: dict = {'prefetcher': None, 'pending': None}


def get_rng_state() -> dict:
    """States of python ``random``, numpy's global generator, torch's CPU generator and (when CUDA
    is initialised) every CUDA device, in a form ``torch.load(weights_only=True)`` reads back."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {'python': random.getstate(),
             'numpy': {'kind': str(kind), 'key': torch.from_numpy(key.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'gauss': float(gauss)},
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA states only with as many devices)."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state((n['kind'], n['key'].cpu().numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    torch.set_rng_state(state['torch'].cpu())
    cuda = state.get('cuda')
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def training_progress() -> Optional[dict]:
    """Where the training loop is: ``{'epoch', 'batches' (handed out in this epoch), 'batch_size',
    'num_batches', 'rng_before_prefetch'}`` of the train prefetcher created last; None outside
    BasicSR's training pipeline or without :func:`install`."""
    ref = _RESUME['prefetcher']
    prefetcher = ref() if ref is not None else None
    return _progress_of(prefetcher) if prefetcher is not None else None


def resume_progress(progress: dict, rng: Optional[dict] = None) -> None:
    """Make the next train prefetcher ``reset()`` continue after ``progress`` and restore ``rng``
    right before the next batch is drawn (called by a model's ``resume_training``)."""
    _RESUME['pending'] = {'progress': dict(progress), 'rng': rng}


def forget_pending_resume() -> None:
    """Drop a resume that no prefetcher took (a new pipeline starts)."""
    _RESUME['pending'] = None


def _progress_of(prefetcher: Any) -> dict:
    loader = prefetcher.ori_loader
    return {'epoch': getattr(getattr(loader, 'sampler', None), 'epoch', None), 'batches': prefetcher.grl_batches,
            'batch_size': getattr(loader, 'batch_size', None), 'num_batches': len(loader),
            'rng_before_prefetch': prefetcher.grl_rng_before_prefetch}


def _take_pending(prefetcher: Any) -> Optional[dict]:
    """The pending resume if it fits this loader and epoch (logged), else None (warning)."""
    from basicsr.utils import get_root_logger
    pending, _RESUME['pending'] = _RESUME['pending'], None
    if pending is None:
        return None
    saved, now = pending['progress'], _progress_of(prefetcher)
    logger = get_root_logger()
    diffs = [f'{k} {saved.get(k)} -> {now[k]}' for k in ('epoch', 'batch_size', 'num_batches') if saved.get(k) != now[k]]
    if diffs or not 0 <= saved.get('batches', -1) <= now['num_batches']:
        why = ', '.join(diffs) or f'batches {saved.get("batches")}'
        logger.warning(f'Cannot resume inside the epoch ({why}): the epoch restarts from its first batch, '
                       'as in BasicSR.')
        return None
    logger.info(f'Resuming inside epoch {now["epoch"]}: skipping the {saved["batches"]} batch(es) already '
                f'trained on{"; RNG states restored" if pending["rng"] is not None else ""}.')
    return pending


def _skip_in_sampler(prefetcher: Any, batches: int) -> int:
    """Let the sampler drop the first ``batches`` batches of its next pass; returns how many are
    left to skip by loading them (a sampler that cannot)."""
    loader = prefetcher.ori_loader
    sampler = getattr(loader, 'sampler', None)
    if batches and hasattr(sampler, 'grl_skip') and getattr(loader, 'batch_sampler', None) is not None:
        sampler.grl_skip = batches * loader.batch_size
        return 0
    return batches


def _resumable_classes():
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
        def next(self):
            batch = super().next()
            if batch is not None:
                self.grl_batches += 1
            return batch

    class ResumableCPUPrefetcher(_Counting, CPUPrefetcher):
        """``CPUPrefetcher`` counting the batches of the epoch. BasicSR's starts an iterator in
        ``__init__`` and ``train_pipeline`` another in ``reset()``: with ``prefetch_mode: cpu``
        two threads read the dataset at once. Here the iterator starts on first use."""

        def __init__(self, loader):  # noqa: super().__init__ not called: no iterator yet
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
        """``CUDAPrefetcher`` counting the batches of the epoch; it draws one batch ahead, so it
        keeps the random states from before that draw for the training state."""

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


def install() -> bool:
    """Put the resumable sampler and prefetchers into ``basicsr.train`` (idempotent)."""
    import basicsr.train  # noqa: F401

    from ..patching import is_patched, patch
    names = ('EnlargedSampler', 'CPUPrefetcher', 'CUDAPrefetcher')
    if all(is_patched('basicsr.train', name) for name in names):
        return False
    done = False
    for name, cls in zip(names, _resumable_classes()):
        if not is_patched('basicsr.train', name):
            done |= patch('basicsr.train', name, cls, 'grl_plugin.models.exact_resume')
    return done
