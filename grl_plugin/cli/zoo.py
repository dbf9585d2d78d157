"""grl-zoo: the released GRL models (GRL v1.0.0) by name, downloaded on first use.

``grl-infer``, ``grl-export`` (``--checkpoint NAME``) and ``grl-convert`` (``NAME DST``) accept
the file name of any released checkpoint, with or without ``.ckpt`` (``sr_grl_base_c3x4``,
``dn_grl_tiny_c1s25.ckpt``, ...) where they accept a path. An existing file always wins over a
name. A name is looked up in the cache folder (``$GRL_HOME``, else ``~/.cache/grl_plugin``) and,
when it is not there, downloaded from the official release (``$GRL_RELEASE_URL`` replaces
:data:`RELEASE_URL`, e.g. for a mirror) with a progress bar on stderr (when stderr is a
terminal). The download goes to ``<name>.ckpt.part``, is resumed from there (HTTP Range) when a
previous one was cut off, and is renamed to ``<name>.ckpt`` only once complete, so the cache never
holds a partial file under the final name. basicsr's ``load_file_from_url`` is not used: it
neither resumes nor keeps a partial file.

A file fetched by name is read with :func:`grl_plugin.archs.checkpoint.load_checkpoint` and its
input/output channels and scale are checked against the name's task before use.

:data:`RELEASES` is the one table of released names; each entry knows its task, model size,
setting (scale, noise level, JPEG quality, data set) and the test option file under
``options/test/`` that evaluates it. ``grl-zoo`` (or ``python -m grl_plugin.cli.zoo``, or
``grl-infer --list-models``) prints it; ``grl-zoo --download NAME ...`` fills the cache.
Errors are one line ``<prog>: error: ...`` with exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import fnmatch
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from grl_plugin.archs.checkpoint import CheckpointError, load_checkpoint
from grl_plugin.cli.common import exits_on_interrupt

__all__ = ['RELEASE_URL', 'RELEASE_PAGE', 'RELEASES', 'Release', 'ZooError', 'cache_dir', 'release_url',
           'find_release', 'suggest', 'fetch', 'resolve_checkpoint', 'check_release', 'open_checkpoint',
           'listing', 'ListModelsAction', 'main']

RELEASE_URL = 'https://github.com/ofsoundof/GRL-Image-Restoration/releases/download/v1.0.0'
RELEASE_PAGE = 'https://github.com/ofsoundof/GRL-Image-Restoration/releases/tag/v1.0.0'
URL_ENV, HOME_ENV = 'GRL_RELEASE_URL', 'GRL_HOME'
TIMEOUT = 30  # seconds without data before a download gives up
_CHUNK = 1 << 16
_SIZE_NAMES = {'T': 'tiny', 'S': 'small', 'B': 'base'}
_TASK_TITLES = {'sr': 'super-resolution', 'dn': 'denoising', 'jpeg': 'JPEG artifact removal',
                'dm': 'demosaicking', 'bsr': 'real-world SR', 'db_motion': 'motion deblurring',
                'db_defocus': 'defocus deblurring', 'db_defocus_dual': 'defocus deblurring'}
#: Kwargs a released name fixes; a downloaded file must agree on each.
CHECKED_KEYS = ('in_channels', 'out_channels', 'upscale')


class ZooError(CheckpointError):
    """A released model cannot be found, fetched or used (one-line message)."""


@dataclass(frozen=True)
class Release:
    """One released checkpoint: ``task`` is a key of :data:`grl_plugin.archs.tasks.TASKS`,
    ``size`` T/S/B, ``scale`` the SR factor (1 for restoration), ``gray`` a 1-channel model,
    ``setting`` the variant in words and ``option`` its test option file (repository-relative)."""
    name: str
    task: str
    size: str
    scale: int
    gray: bool
    setting: str
    option: str

    @property
    def file(self) -> str:
        return f'{self.name}.ckpt'

    @property
    def title(self) -> str:
        return _TASK_TITLES[self.task]

    def task_kwargs(self) -> Dict[str, Any]:
        """GRL kwargs of this model's task and size (:func:`grl_plugin.archs.tasks.task_kwargs`):
        the shape-determining ones are the release's; the window/stripe geometry is the training
        experiment's (some released models were evaluated with another one: see :attr:`option`)."""
        from grl_plugin.archs.tasks import task_kwargs
        return task_kwargs(self.task, self.size, scale=self.scale, color=not self.gray)

    def expected(self) -> Dict[str, Any]:
        """Values of :data:`CHECKED_KEYS` that a file with this name must have."""
        kw = self.task_kwargs()
        return {'in_channels': kw['in_channels'], 'out_channels': kw.get('out_channels') or kw['in_channels'],
                'upscale': kw['upscale']}


def _table() -> Dict[str, Release]:
    rows: List[Release] = []
    for size, long in _SIZE_NAMES.items():
        for x in (2, 3, 4):
            rows.append(Release(f'sr_grl_{long}_c3x{x}', 'sr', size, x, False, f'x{x}',
                                f'options/test/sr/test_GRL_{size}_SRx{x}.yml'))
    for size, long in _SIZE_NAMES.items():
        for channels, mode in ((1, 'gray'), (3, 'color')):
            for sigma in (15, 25, 50):
                rows.append(Release(f'dn_grl_{long}_c{channels}s{sigma}', 'dn', size, 1, channels == 1,
                                    f'{mode}, sigma {sigma}',
                                    f'options/test/dn/test_GRL_{size}_DN_{mode}_s{sigma}.yml'))
    for channels, mode in ((1, 'gray'), (3, 'color')):
        for q in (10, 20, 30, 40):
            rows.append(Release(f'jpeg_grl_small_c{channels}q{q}', 'jpeg', 'S', 1, channels == 1,
                                f'{mode}, quality {q}', f'options/test/jpeg/test_GRL_S_JPEG_{mode}_q{q}.yml'))
    rows.append(Release('dm_grl_small', 'dm', 'S', 1, False, 'RGGB Bayer', 'options/test/dm/test_GRL_S_DM.yml'))
    rows.append(Release('bsr_grl_base', 'bsr', 'B', 4, False, 'x4', 'options/test/bsr/test_GRL_B_BSR.yml'))
    for key, data in (('gopro', 'GoPro'), ('realblur_j', 'RealBlur_J'), ('realblur_r', 'RealBlur_R')):
        rows.append(Release(f'db_motion_grl_base_{key}', 'db_motion', 'B', 1, False, data.replace('_', '-'),
                            f'options/test/db_motion/test_GRL_B_{data}.yml'))
    rows.append(Release('db_defocus_single_pixel_grl_base', 'db_defocus', 'B', 1, False, 'DPDD, single view',
                        'options/test/db_defocus/test_GRL_B_DPDD_single.yml'))
    rows.append(Release('db_defocus_dual_pixel_grl_base', 'db_defocus_dual', 'B', 1, False, 'DPDD, dual pixel',
                        'options/test/db_defocus/test_GRL_B_DPDD_dual.yml'))
    return {r.name: r for r in rows}


#: Every released checkpoint by name (file name without ``.ckpt``), in listing order.
RELEASES: Dict[str, Release] = _table()


# ------------------------------------------------------------------------------------ names
def cache_dir() -> Path:
    """Where downloaded checkpoints live: ``$GRL_HOME``, else ``~/.cache/grl_plugin``."""
    home = os.environ.get(HOME_ENV)
    return (Path(home).expanduser() if home else Path.home() / '.cache' / 'grl_plugin').absolute()


def release_url(name: str) -> str:
    """Download URL of ``name`` (``$GRL_RELEASE_URL`` replaces the official base URL)."""
    base = os.environ.get(URL_ENV) or RELEASE_URL
    return f'{base.rstrip("/")}/{name}.ckpt'


def _bare(spec: str) -> str:
    return spec[:-len('.ckpt')] if spec.endswith('.ckpt') else spec


def find_release(spec: str) -> Optional[Release]:
    """The release called ``spec`` (``NAME`` or ``NAME.ckpt``, no folder part), or None."""
    if '/' in spec or os.sep in spec:
        return None
    return RELEASES.get(_bare(spec))


def suggest(spec: str) -> Optional[str]:
    """The released name closest to ``spec``'s file name, if any is close."""
    stem = _bare(re.sub(r'\.(pth|pt|safetensors)$', '', Path(spec).name))
    match = difflib.get_close_matches(stem, list(RELEASES), n=1, cutoff=0.6)
    return match[0] if match else None


# ------------------------------------------------------------------------------------ download
class _DownloadError(Exception):
    pass


def _reason(err: BaseException) -> str:
    if isinstance(err, _DownloadError):
        return str(err)
    if isinstance(err, urllib.error.HTTPError):
        return f'HTTP {err.code} {err.reason}'.strip()
    if isinstance(err, urllib.error.URLError):
        inner = err.reason
        return _reason(inner) if isinstance(inner, BaseException) else str(inner)
    if isinstance(err, http.client.IncompleteRead):
        return f'connection closed after {len(err.partial)} more bytes'
    text = ' '.join(str(getattr(err, 'strerror', None) or err).split())
    return f'{type(err).__name__}: {text}' if text else type(err).__name__


def _content_range(value: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """(first byte, total size) of a ``Content-Range`` header (None where not given)."""
    match = re.fullmatch(r'\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*', value or '')
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != '*' else None)


def _lock(f: Any) -> None:
    """Exclusive lock on the partial file (POSIX), so two processes never append to it at once."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise _DownloadError('another process is downloading it right now; wait for it to finish') from None


def _transfer(url: str, f: Any, quiet: bool, desc: str) -> bool:
    """Append the rest of ``url`` to ``f`` (open for appending); False if ``f`` was reset and the
    transfer must start again. Raises on network errors (what arrived stays in ``f``)."""
    from tqdm import tqdm

    from grl_plugin import __version__
    offset = os.fstat(f.fileno()).st_size
    request = urllib.request.Request(url, headers={'User-Agent': f'grl_plugin/{__version__}'})
    if offset:
        request.add_header('Range', f'bytes={offset}-')
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        if _content_range(err.headers.get('Content-Range'))[1] == offset:
            return True  # the previous attempt had received everything
        f.truncate(0)  # a partial file that does not belong to this file
        return False
    with response:
        total = None
        if response.status == 206:
            start, total = _content_range(response.headers.get('Content-Range'))
            if start != offset:
                f.truncate(0)
                return False
        elif response.status == 200:
            if offset:  # the server ignored the range: start from the first byte
                f.truncate(0)
                offset = 0
            length = response.headers.get('Content-Length')
            total = int(length) if length and length.isdigit() else None
        else:
            raise _DownloadError(f'unexpected HTTP status {response.status}')
        with tqdm(total=total, initial=offset, desc=desc, unit='B', unit_scale=True, unit_divisor=1024,
                  file=sys.stderr, disable=True if quiet else None, dynamic_ncols=True) as bar:
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
    f.flush()
    size = os.fstat(f.fileno()).st_size
    if total is not None and size != total:
        raise _DownloadError(f'connection closed after {size} of {total} bytes')
    return True


def _looks_like_checkpoint(path: Path) -> bool:
    with open(path, 'rb') as f:
        head = f.read(4)
    return head == b'PK\x03\x04' or head[:1] == b'\x80'  # torch zip container, or a legacy pickle


def _download(url: str, dest: Path, quiet: bool) -> None:
    """``url`` -> ``dest`` through ``dest.part`` (resumed when present; renamed when complete)."""
    part = dest.with_name(dest.name + '.part')
    with open(part, 'ab') as f:
        _lock(f)
        try:
            if dest.is_file():  # another process finished it while we waited for the lock
                return
            for _ in range(3):
                if _transfer(url, f, quiet, dest.name):
                    break
            else:
                raise _DownloadError('the server does not answer byte-range requests consistently')
            os.fsync(f.fileno())
            if not _looks_like_checkpoint(part):
                f.truncate(0)
                raise _DownloadError('the server sent something that is not a PyTorch checkpoint')
            if os.name != 'nt':  # POSIX: rename while still holding the lock
                os.replace(part, dest)
        finally:  # nothing arrived (or it was useless): leave no empty partial file behind
            with contextlib.suppress(OSError):
                f.flush()
                if part.is_file() and os.fstat(f.fileno()).st_size == 0:
                    part.unlink()
    if os.name == 'nt' and part.is_file():  # Windows cannot rename an open file
        os.replace(part, dest)


def fetch(release: Release, *, quiet: bool = False, prog: str = 'grl-zoo') -> Path:
    """The cached file of ``release``, downloaded first if needed. Raises a one-line
    :class:`ZooError` with the URL and the destination when the download fails."""
    dest = cache_dir() / release.file
    if dest.is_file():
        return dest
    url = release_url(release.name)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _download(url, dest, quiet)
    except (_DownloadError, OSError, http.client.HTTPException, ValueError) as err:
        raise ZooError(f'cannot download {release.file} ({_reason(err)}): fetch {url} by hand and save it as '
                       f'{dest}') from None
    if not quiet:
        print(f'{prog}: downloaded {url} -> {dest} ({dest.stat().st_size / 2**20:.1f} MiB)', file=sys.stderr)
    return dest


def _unknown(spec: str) -> ZooError:
    if '/' in spec or os.sep in spec:  # a path: names have no folder part
        release = find_release(Path(spec).name)
        hint = f' (to download the released model, give its bare name: {release.name})' if release else ''
        return ZooError(f'{spec}: no such file{hint}')
    match = suggest(spec)
    hint = f'; did you mean {match}?' if match else ''
    return ZooError(f'{spec}: no such file, and not a released GRL model name{hint} (grl-zoo lists them)')


def resolve_checkpoint(spec: str, *, quiet: bool = False, prog: str = 'grl-zoo') -> Tuple[str, Optional[Release]]:
    """(path to read, the release or None) for a ``--checkpoint`` value: an existing path as it
    is, a released name from the cache (downloaded if needed)."""
    spec = str(spec)
    if os.path.exists(spec):
        return spec, None
    release = find_release(spec)
    if release is None:
        raise _unknown(spec)
    return str(fetch(release, quiet=quiet, prog=prog)), release


def check_release(release: Release, kwargs: Mapping[str, Any], path: str) -> None:
    """Raise a one-line :class:`ZooError` naming ``path`` and the key when the loaded ``kwargs``
    do not have the channels / scale that ``release``'s name promises."""
    got = dict(kwargs)
    if got.get('out_channels') is None and 'in_channels' in got:
        got['out_channels'] = got['in_channels']
    for key, want in release.expected().items():
        if key in got and got[key] != want:
            raise ZooError(f'{path}: {key}={got[key]!r} but {release.name} ({release.title}, {release.setting}) '
                           f'has {key}={want!r}; this file is not that model (delete it to download it again)')


def open_checkpoint(spec: str, *, trust: bool = False, key: Optional[str] = None, quiet: bool = False,
                    prog: str = 'grl-zoo', require_geometry: bool = True) -> Tuple[dict, Any, str]:
    """:func:`load_checkpoint` of a path or a released name: ``(state_dict, kwargs, path)``.
    A released file is checked with :func:`check_release`. Raises one-line CheckpointErrors
    (geometry the file lacks too, unless ``require_geometry=False``: the CLIs complete it)."""
    path, release = resolve_checkpoint(spec, quiet=quiet, prog=prog)
    sd, kwargs = load_checkpoint(path, trust=trust, key=key, require_geometry=require_geometry)
    if release is not None:
        check_release(release, kwargs, path)
    return sd, kwargs, path


# ------------------------------------------------------------------------------------ listing
def _select(patterns: Sequence[str]) -> List[Release]:
    if not patterns:
        return list(RELEASES.values())
    out = []
    for r in RELEASES.values():
        for p in patterns:
            p = _bare(p)
            if fnmatch.fnmatchcase(r.name, p) if any(c in p for c in '*?[') else (p in r.name or p == r.task):
                out.append(r)
                break
    return out


def listing(releases: Optional[Iterable[Release]] = None) -> str:
    """The table printed by ``grl-zoo`` / ``grl-infer --list-models``."""
    releases = list(RELEASES.values()) if releases is None else list(releases)
    home = cache_dir()
    rows = [('NAME', 'MODEL', 'TASK', 'SETTING', 'CHANNELS', 'SCALE', 'CACHED', 'TEST OPTION FILE')]
    for r in releases:
        exp = r.expected()
        rows.append((r.name, f'GRL-{r.size}', r.title, r.setting, f'{exp["in_channels"]}->{exp["out_channels"]}',
                     f'x{exp["upscale"]}', 'yes' if (home / r.file).is_file() else 'no', r.option))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [f'# GRL v1.0.0 released models ({RELEASE_PAGE}); cache folder: {home}']
    lines += ['  '.join(cell.ljust(w) for cell, w in zip(row, widths)) + '  ' + row[-1] for row in rows]
    lines.append('# use: grl-infer --checkpoint NAME --input IMG_OR_FOLDER --output DIR  (downloads NAME once)')
    return '\n'.join(lines)


class ListModelsAction(argparse.Action):
    """``--list-models``: print :func:`listing` and exit (before required arguments are checked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault('help', 'list the released GRL models that --checkpoint accepts by name, and exit')
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None):
        print(listing())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='grl-zoo', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='List the released GRL models (names usable as grl-infer/grl-export --checkpoint and as\n'
        'grl-convert SRC) and download them into the cache folder ($GRL_HOME, else ~/.cache/grl_plugin).',
        epilog='examples:\n  grl-zoo\n  grl-zoo sr_grl_tiny "dn_*_c1*"\n'
        '  grl-zoo --download sr_grl_base_c3x4 dn_grl_small_c3s25\n'
        f'environment: {HOME_ENV} (cache folder), {URL_ENV} (base URL instead of\n  {RELEASE_URL})')
    p.add_argument('names', nargs='*', metavar='NAME',
                   help='list only names containing NAME or matching it (wildcards *?[]) or of task NAME; '
                        'with --download: exact names')
    p.add_argument('--download', action='store_true',
                   help='download the named models (if not cached) and print their paths')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    return p


@exits_on_interrupt('grl-zoo')
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if not args.download:
            selected = _select(args.names)
            if not selected:
                raise ZooError(f'no released model matches {" ".join(args.names)}'
                               + (f'; did you mean {m}?' if (m := suggest(args.names[0])) else ''))
            print(listing(selected))
            return 0
        if not args.names:
            raise ZooError('--download needs the NAMEs of the models to download')
        releases = []
        for name in args.names:
            release = find_release(name)
            if release is None:
                match = suggest(name)
                raise ZooError(f'{name}: not a released GRL model name' + (f'; did you mean {match}?' if match else ''))
            releases.append(release)
        for release in releases:
            print(fetch(release, quiet=args.quiet, prog='grl-zoo'))
    except ZooError as err:
        print(f'grl-zoo: error: {" ".join(str(err).split())}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
