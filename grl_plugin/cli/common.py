"""What the command-line tools share: Ctrl-C handling, one-line argument errors, atomic writes.

* :func:`exits_on_interrupt` wraps a tool's ``main``: a KeyboardInterrupt (Ctrl-C) ends it with
  one line ``<prog>: interrupted`` on stderr and exit status 130 (128 + SIGINT), no traceback.
  Raise :class:`Interrupted` (a KeyboardInterrupt) with a short note to say how far it got.
* :class:`ArgumentParser` reports a bad command line as one line ``<prog>: error: ...``
  (exit status 2) instead of argparse's usage block.
* :func:`write_atomic` writes a file under a temporary name in the same folder and renames it
  into place, so an interrupt never leaves a half-written file under the final name.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

#: Exit status of a command ended by Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130
#: Name part of the temporary files :func:`write_atomic` creates (never an image extension).
TEMP_MARK = '.part'


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a note (e.g. ``after 3 of 10 image(s)``) for the one-line message."""


def interrupted_line(prog: str, err: BaseException) -> str:
    note = ' '.join(str(err).split()) if isinstance(err, Interrupted) else ''
    return f'{prog}: interrupted' + (f' {note}' if note else '')


def exits_on_interrupt(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator for ``main(argv=None) -> int``: Ctrl-C -> one line on stderr, exit status 130."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(argv: Optional[Sequence[str]] = None) -> int:
            try:
                return main(argv)
            except KeyboardInterrupt as err:
                try:
                    sys.stdout.flush()
                except Exception:  # a closed or broken stdout must not hide the message
                    pass
                print(interrupted_line(prog, err), file=sys.stderr, flush=True)
                return EXIT_INTERRUPTED
        return guarded
    return wrap


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``<prog>: error: <message>``, exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f'{self.prog}: error: {" ".join(str(message).split())} (see {self.prog} --help)\n')


def write_atomic(dst: Union[str, Path], data: bytes) -> Path:
    """Write ``data`` to ``dst`` through ``.<name>.<pid>.part`` in the same folder + ``os.replace``.

    The temporary file is removed if anything (an error, Ctrl-C) stops the write; the final name
    holds either its previous content or all of ``data``. Permissions follow the umask.
    """
    dst = Path(dst)
    tmp = dst.with_name(f'.{dst.name}.{os.getpid()}{TEMP_MARK}')
    if len(os.fsencode(tmp.name)) > 255:  # a long final name: a short temporary one (file names <= 255 bytes)
        tmp = dst.with_name(f'.tmp-{zlib.crc32(os.fsencode(dst.name)):08x}.{os.getpid()}{TEMP_MARK}')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, 'O_BINARY', 0), 0o666)
    try:
        try:
            f = os.fdopen(fd, 'wb')
        except BaseException:
            os.close(fd)
            raise
        with f:
            f.write(data)
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return dst
