"""Reading samples robustly: one-line errors for bad data, and ``skip_corrupt``.

An unreadable, empty, corrupt or truncated image file, or a key that ``meta_info.txt`` lists but
the LMDB does not hold, raises :class:`DataError` whose one-line message names the file, or the
LMDB key and the LMDB path -- never an obscure OpenCV / ``NoneType`` error, never a wrong sample.

* :func:`fetch_bytes` / :func:`decode_image` / :func:`read_image` read through a BasicSR
  ``FileClient`` (disk or LMDB); the plugin's datasets use them, and :func:`install` routes
  BasicSR's own ``FileClient.get`` and ``imfrombytes`` through them (so ``PairedImageDataset`` &
  co. report bad files the same way).
* The error classes keep what BasicSR's callers catch: a file or LMDB key that cannot be read
  raises :class:`DataReadError`, an ``OSError`` like the one BasicSR's file client raises (its
  ``RealESRGANDataset`` retries another image on ``OSError``); data the decoder refuses raises
  :class:`DataDecodeError`, a ``ValueError``. Both are :class:`DataError`. Whether an image is
  readable is the decoder's decision (OpenCV's ``imdecode``): bytes after the end of a JPEG (a
  video appended by phones to "motion photos") are fine when OpenCV decodes the image.
* ``skip_corrupt: true`` in a dataset's options: a sample that raises :class:`DataError` is
  skipped -- a warning on BasicSR's logger names it and gives the running count of corrupt
  samples (per process: each DataLoader worker counts its own) -- and the next readable index
  is returned instead. Known-bad samples are not read again. If no sample can be read, a
  :class:`DataError` says so. Default (``false``): the error is raised. The plugin's datasets
  handle the option themselves (:func:`get_item`); other datasets built by BasicSR's
  ``build_dataset`` are wrapped in :class:`SkipCorruptDataset` (:func:`with_skip_corrupt`,
  installed by :func:`install`). In validation/test the replacement
  image is evaluated in place of the bad one (the warning says which), so prefer fixing the data.

Only ``DataError`` is skipped: any other exception (a bug, a bad option) is raised as it is.

:func:`install` (called by ``import grl_plugin``) is the one global change this module makes to
BasicSR: its ``FileClient.get``, the ``imfrombytes`` of its modules and its ``build_dataset``.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Optional

import cv2
import numpy as np
from torch.utils import data

__all__ = ['DataError', 'DataReadError', 'DataDecodeError', 'SourcedBytes', 'install', 'describe', 'fetch_bytes', 'decode_image', 'read_image', 'get_item',
           'SkipCorruptDataset', 'with_skip_corrupt', 'error_line']

#: BasicSR's logger (``get_root_logger()``); used without initialising it.
LOGGER_NAME = 'basicsr'

_IMREAD_FLAGS = {'color': cv2.IMREAD_COLOR, 'grayscale': cv2.IMREAD_GRAYSCALE, 'unchanged': cv2.IMREAD_UNCHANGED}


class DataError(Exception):
    """A sample cannot be read; the one-line message names the file, or the LMDB key and path."""


class DataReadError(DataError, OSError):
    """The stored bytes cannot be read: a missing or unreadable file, a key missing from an LMDB."""


class DataDecodeError(DataError, ValueError):
    """The bytes are empty, or not an image the decoder accepts."""


_READ_ERRORS = {OSError: DataReadError}


def _read_error(cause: OSError, message: str) -> DataReadError:
    """A :class:`DataReadError` that is also an instance of ``cause``'s class (e.g. a
    ``FileNotFoundError`` where BasicSR's file client raised one)."""
    cls = type(cause)
    if cls not in _READ_ERRORS:
        _READ_ERRORS[cls] = type(f'Data{cls.__name__}', (DataReadError, cls), {'__module__': __name__})
    return _READ_ERRORS[cls](message)


class SourcedBytes(bytes):
    """The bytes of one stored image plus ``source`` (``"image file PATH"`` or
    ``"LMDB key 'KEY' of PATH"``), so that a decoding error can name them."""

    source: Optional[str] = None


def describe(file_client: Any, path: Any, client_key: str = 'default') -> str:
    """``"LMDB key 'KEY' of DB_PATH"`` for an LMDB ``FileClient``, else ``"image file PATH"``."""
    if getattr(file_client, 'backend', None) == 'lmdb':
        backend = file_client.client
        clients = list(getattr(backend, '_client', None) or ())
        db_paths = list(getattr(backend, 'db_paths', None) or ())
        i = clients.index(client_key) if client_key in clients else -1
        db = db_paths[i] if 0 <= i < len(db_paths) else f'LMDB client {client_key!r}'
        return f'LMDB key {str(path)!r} of {db}'
    return f'image file {path}'


def fetch_bytes(file_client: Any, path: Any, client_key: str = 'default') -> SourcedBytes:
    """The stored bytes of ``path`` (a file, or an LMDB key of the ``client_key`` LMDB).

    Same as ``FileClient.get`` (it calls the storage backend directly), but a missing key, an
    unreadable file or a backend that returns nothing raise :class:`DataError` naming them.
    """
    source = describe(file_client, path, client_key)
    lmdb = getattr(file_client, 'backend', None) == 'lmdb'
    backend = file_client.client
    try:
        buf = backend.get(path, client_key) if lmdb else backend.get(path)
    except OSError as err:
        raise _read_error(err, f'cannot read {source}: {err.strerror or err}') from None
    except UnicodeEncodeError as err:  # the class py-lmdb raises, with a message naming the key
        raise UnicodeEncodeError(err.encoding, err.object, err.start, err.end,
                                 f'{source}: LMDB keys must be ASCII') from None
    if buf is None:
        if lmdb:
            raise DataReadError(f'{source} not found: the key is listed (meta_info.txt) but not stored in the LMDB')
        raise DataReadError(f'cannot read {source}: the storage backend returned nothing')
    out = SourcedBytes(buf)
    out.source = source
    return out


def decode_image(content: Any, source: Optional[str] = None, flag: str = 'color', float32: bool = False) -> np.ndarray:
    """``basicsr.utils.imfrombytes`` (same result for a valid image: HWC BGR, or HW for
    ``grayscale``, uint8 or float32 / 255) that raises :class:`DataError` naming ``source`` (default:
    ``content.source``) for missing or empty data and for data OpenCV does not decode."""
    source = source or getattr(content, 'source', None) or 'image data'
    if content is None:
        raise DataReadError(f'no data for {source}')
    if len(content) == 0:
        raise DataDecodeError(f'{source} is empty (0 bytes)')
    try:
        img = cv2.imdecode(np.frombuffer(content, np.uint8), _IMREAD_FLAGS[flag])
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        raise DataDecodeError(f'cannot decode {source}: corrupt, truncated or not an image')
    if float32:
        img = img.astype(np.float32) / 255.
    return img


def read_image(file_client: Any, path: Any, client_key: str = 'default', flag: str = 'color',
               float32: bool = False) -> np.ndarray:
    """:func:`fetch_bytes` + :func:`decode_image`."""
    return decode_image(fetch_bytes(file_client, path, client_key), flag=flag, float32=float32)


# ----------------------------------------------------------------------------------------------
# skip_corrupt


def _name(dataset: Any) -> str:
    opt = getattr(dataset, 'opt', None) or {}
    return str(opt.get('name') or type(getattr(dataset, 'dataset', dataset)).__name__)


def get_item(dataset: Any, index: int, load: Callable[[int], Any], name: Optional[str] = None) -> Any:
    """``load(index)``; with ``dataset.opt['skip_corrupt']`` a :class:`DataError` skips to the
    next index (wrapping around) whose sample can be read, with a warning naming the bad sample
    and the number of corrupt samples met so far. Raises :class:`DataError` if none can be read."""
    opt = getattr(dataset, 'opt', None) or {}
    if not opt.get('skip_corrupt'):
        return load(index)
    n = len(dataset)
    bad = dataset.__dict__.setdefault('_grl_corrupt', set())  # indices known to be unreadable
    name = name or _name(dataset)
    last = None
    for step in range(n):
        i = (index + step) % n
        if i in bad:
            continue
        try:
            return load(i)
        except DataError as err:
            bad.add(i)
            last = err
            note = '; another sample is evaluated in its place' if opt.get('phase') not in (None, 'train') else ''
            logging.getLogger(LOGGER_NAME).warning(
                f'{name}: skipping corrupt sample {i}: {err} [{len(bad)} corrupt sample(s) skipped so far, '
                f'skip_corrupt: true{note}]')
    why = f'last error: {last}' if last is not None else 'see the warnings above'
    raise (type(last) if last is not None else DataReadError)(
        f'{name}: none of the {n} samples can be read (skip_corrupt: true); {why}')


class SkipCorruptDataset(data.Dataset):
    """``skip_corrupt`` for a dataset that does not handle it itself (e.g. BasicSR's
    ``PairedImageDataset``): ``__getitem__`` goes through :func:`get_item`; everything else
    (``opt``, ``paths``, ...) is the wrapped dataset's."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.opt = getattr(dataset, 'opt', {})

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return get_item(self, index, self.dataset.__getitem__)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith('__') or attr == 'dataset':
            raise AttributeError(attr)
        return getattr(self.dataset, attr)

    def __repr__(self) -> str:
        return f'SkipCorruptDataset({self.dataset!r})'


def with_skip_corrupt(dataset: Any, opt: Optional[dict] = None) -> Any:
    """``dataset`` wrapped in :class:`SkipCorruptDataset` when its options (``opt`` or
    ``dataset.opt``) set ``skip_corrupt: true`` and it does not handle the option itself
    (class attribute ``handles_skip_corrupt``); otherwise ``dataset`` unchanged."""
    opt = opt if opt is not None else getattr(dataset, 'opt', None) or {}
    if not opt.get('skip_corrupt') or getattr(dataset, 'handles_skip_corrupt', False) \
            or isinstance(dataset, SkipCorruptDataset):
        return dataset
    wrapped = SkipCorruptDataset(dataset)
    if not wrapped.opt.get('skip_corrupt'):  # a dataset that keeps no (or other) options
        wrapped.opt = dict(wrapped.opt, skip_corrupt=True)
    return wrapped


# ----------------------------------------------------------------------------------------------
# BasicSR's own datasets

_BY = 'grl_plugin.data.robust'


def _file_client_get(self: Any, filepath: Any, client_key: str = 'default') -> SourcedBytes:
    return fetch_bytes(self, filepath, client_key)


def _imfrombytes(content: Any, flag: str = 'color', float32: bool = False) -> np.ndarray:
    return decode_image(content, flag=flag, float32=float32)


def _build_dataset_with_skip(module: str) -> Callable[[dict], Any]:
    from ..patching import original
    build_dataset = original(module, 'build_dataset')

    def build(dataset_opt: dict) -> Any:
        return with_skip_corrupt(build_dataset(dataset_opt), dataset_opt)
    return build


def install() -> bool:
    """Make BasicSR's own datasets read like the plugin's (idempotent; imports basicsr):
    ``FileClient.get`` and the ``imfrombytes`` name of every loaded ``basicsr.*`` module go through
    :func:`fetch_bytes` / :func:`decode_image` (a missing LMDB key, which BasicSR returns as None,
    and an unreadable file raise :class:`DataReadError`, an ``OSError``; a valid image decodes
    exactly as before), and ``build_dataset`` of ``basicsr.data`` / ``.train`` / ``.test`` honours
    ``skip_corrupt: true``. Returns True if anything was installed now."""
    import basicsr.data  # noqa: F401 - every dataset module (they import imfrombytes by name)
    import basicsr.test  # noqa: F401
    import basicsr.train  # noqa: F401

    from ..patching import is_patched, original, patch
    done = False
    if not is_patched('basicsr.utils.file_client', 'FileClient.get'):
        done |= patch('basicsr.utils.file_client', 'FileClient.get', _file_client_get, _BY)
    plain = original('basicsr.utils.img_util', 'imfrombytes')
    for name, mod in sorted(sys.modules.items()):
        if (name == 'basicsr' or name.startswith('basicsr.')) and getattr(mod, '__dict__', {}).get('imfrombytes') is plain:
            done |= patch(name, 'imfrombytes', _imfrombytes, _BY)
    for module in ('basicsr.data', 'basicsr.train', 'basicsr.test'):
        if not is_patched(module, 'build_dataset'):
            done |= patch(module, 'build_dataset', _build_dataset_with_skip(module), _BY)
    return done


def error_line(err: BaseException) -> str:
    """One line for ``err``; for an error re-raised from a DataLoader worker (whose message holds
    the worker's traceback) the original message."""
    text = str(err)
    if '\nOriginal Traceback' in text:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else text
        head, sep, tail = last.partition(': ')
        text = tail if sep and head.split('.')[-1] == type(err).__name__ else last
    return ' '.join(text.split()) or type(err).__name__
