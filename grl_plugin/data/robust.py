"""Reading samples robustly: one-line errors for bad data, and ``skip_corrupt``.

An unreadable, empty, corrupt or truncated image file, or a key that ``meta_info.txt`` lists but
the LMDB does not hold, raises :class:`DataError` whose one-line message names the file, or the
LMDB key and the LMDB path -- never an obscure OpenCV / ``NoneType`` error, never a wrong sample.

* :func:`fetch_bytes` / :func:`decode_image` / :func:`read_image` read through a BasicSR
  ``FileClient`` (disk or LMDB); the plugin's datasets use them, and
  :func:`grl_plugin.compat.fix_data_errors` routes BasicSR's own ``FileClient.get`` and
  ``imfrombytes`` through them (so ``PairedImageDataset`` & co. report bad files the same way).
* ``skip_corrupt: true`` in a dataset's options: a sample that raises :class:`DataError` is
  skipped -- a warning on BasicSR's logger names it and gives the running count of corrupt
  samples (per process: each DataLoader worker counts its own) -- and the next readable index
  is returned instead. Known-bad samples are not read again. If no sample can be read, a
  :class:`DataError` says so. Default (``false``): the error is raised. The plugin's datasets
  handle the option themselves (:func:`get_item`); other datasets built by BasicSR's
  ``build_dataset`` are wrapped in :class:`SkipCorruptDataset` (:func:`with_skip_corrupt`,
  installed by :func:`grl_plugin.compat.fix_skip_corrupt`). In validation/test the replacement
  image is evaluated in place of the bad one (the warning says which), so prefer fixing the data.

Only ``DataError`` is skipped: any other exception (a bug, a bad option) is raised as it is.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import cv2
import numpy as np
from torch.utils import data

__all__ = ['DataError', 'SourcedBytes', 'describe', 'fetch_bytes', 'decode_image', 'read_image', 'get_item',
           'SkipCorruptDataset', 'with_skip_corrupt', 'error_line']

#: BasicSR's logger (``get_root_logger()``); used without initialising it.
LOGGER_NAME = 'basicsr'

_IMREAD_FLAGS = {'color': cv2.IMREAD_COLOR, 'grayscale': cv2.IMREAD_GRAYSCALE, 'unchanged': cv2.IMREAD_UNCHANGED}


class DataError(ValueError):
    """A sample cannot be read; the one-line message names the file, or the LMDB key and path."""


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
        raise DataError(f'cannot read {source}: {err.strerror or err}') from None
    except UnicodeEncodeError:
        raise DataError(f'{source}: LMDB keys must be ASCII') from None
    if buf is None:
        if lmdb:
            raise DataError(f'{source} not found: the key is listed (meta_info.txt) but not stored in the LMDB')
        raise DataError(f'cannot read {source}: the storage backend returned nothing')
    out = SourcedBytes(buf)
    out.source = source
    return out


def _truncated_jpeg(buf: bytes) -> bool:
    """A JPEG whose last scan (``FFDA``) is not followed by the end-of-image marker (``FFD9``).

    Inside entropy-coded data ``FF`` bytes are stuffed, so neither marker can occur there: a file
    cut inside its image data has no ``FFD9`` after the last ``FFDA``. (OpenCV < 5 decodes such
    files partially, with grey rows, instead of failing.)"""
    if not isinstance(buf, (bytes, bytearray)) or buf[:2] != b'\xff\xd8':
        return False
    sos = buf.rfind(b'\xff\xda')
    return sos >= 0 and buf.find(b'\xff\xd9', sos) < 0


def decode_image(content: Any, source: Optional[str] = None, flag: str = 'color', float32: bool = False) -> np.ndarray:
    """``basicsr.utils.imfrombytes`` (same result for a valid image: HWC BGR, or HW for
    ``grayscale``, uint8 or float32 / 255) that raises :class:`DataError` naming ``source`` (default:
    ``content.source``) for missing, empty, undecodable or truncated data."""
    source = source or getattr(content, 'source', None) or 'image data'
    if content is None:
        raise DataError(f'no data for {source}')
    if len(content) == 0:
        raise DataError(f'{source} is empty (0 bytes)')
    if _truncated_jpeg(content):
        raise DataError(f'cannot decode {source}: truncated JPEG (no end-of-image marker)')
    try:
        img = cv2.imdecode(np.frombuffer(content, np.uint8), _IMREAD_FLAGS[flag])
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        raise DataError(f'cannot decode {source}: corrupt, truncated or not an image')
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
    raise DataError(f'{name}: none of the {n} samples can be read (skip_corrupt: true); {why}')


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
