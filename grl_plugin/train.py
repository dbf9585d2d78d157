"""``python -m grl_plugin.train``: same as ``grl-train`` (see :mod:`grl_plugin.cli.train`)."""
import sys

from .cli.train import main

if __name__ == '__main__':
    sys.exit(main())
