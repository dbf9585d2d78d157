"""grl-test: BasicSR's ``test_pipeline`` with GRL registered and the compat fixes applied.

Usage::

    grl-test -opt options/test_grl.yml [--root DIR] [--import MODULE ...] [basicsr flags]
    python -m grl_plugin.test -opt ...

Results (``results/<name>/``: log and ``visualization/``) go under ``--root`` (default: the
current directory). Flags and error handling are those of ``grl-train``
(:mod:`grl_plugin.cli.train`).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from .train import run


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``grl-test`` / ``python -m grl_plugin.test``."""
    return run('test', argv)


if __name__ == '__main__':
    sys.exit(main())
