"""``python -m grl_plugin.test``: same as ``grl-test`` (see :mod:`grl_plugin.cli.test`)."""
import sys

from .cli.test import main

if __name__ == '__main__':
    sys.exit(main())
