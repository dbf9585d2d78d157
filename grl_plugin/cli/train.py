"""grl-train: BasicSR's ``train_pipeline`` with GRL registered and the CPU/resume fixes applied.

Usage::

    grl-train -opt options/train_grl.yml [--root DIR] [--import MODULE ...] [basicsr flags]
    python -m grl_plugin.train -opt ...
    torchrun --nproc_per_node=2 -m grl_plugin.train -opt ... --launcher pytorch

Our own flags (removed before basicsr parses ``sys.argv``):

``--root DIR``       where ``experiments/``, ``results/`` and ``tb_logger/`` go (default: the
                     current directory; never the installed package). ``--auto_resume`` looks
                     for training states under it.
``--import MODULE``  import a module before the pipeline starts, e.g. one that registers a
                     custom model, dataset or loss in BasicSR's registries (repeatable).
``--local-rank=N``   accepted and passed on as ``--local_rank=N``.

BasicSR's flags are passed through: ``-opt FILE`` (required), ``--launcher none|pytorch|slurm``,
``--auto_resume``, ``--debug``, ``--local_rank N``, ``--force_yml key:sub=value ...``.
Errors in the command line or the option file: one line ``grl-train: error: ...`` on stderr,
exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import os.path as osp
import sys
from typing import List, Optional, Sequence, Tuple

_HELP = """usage: {prog} -opt OPTION_FILE [--root DIR] [--import MODULE] [--launcher {{none,pytorch,slurm}}]
       {spaces} [--auto_resume] [--debug] [--local_rank N] [--force_yml KEY=VALUE [KEY=VALUE ...]]

{what} with the GRL plugin (BasicSR {pipeline}).

options:
  -opt OPTION_FILE      BasicSR option YAML (required)
  --root DIR            folder for experiments/, results/, tb_logger/ (default: current directory)
  --import MODULE       import MODULE first, e.g. to register custom components (repeatable)
  --launcher {{none,pytorch,slurm}}
                        job launcher (pytorch: start with torchrun; gloo is used without CUDA)
  --auto_resume         resume from the newest state in ROOT/experiments/<name>/training_states
  --debug               debug mode (prefixes the run name with debug_)
  --local_rank N, --local-rank N
                        set by launchers; accepted and ignored by BasicSR
  --force_yml KEY=VALUE [KEY=VALUE ...]
                        override existing options, e.g. train:total_iter=1000
  -h, --help            show this help and exit
"""

# Keys the BasicSR pipelines read unconditionally (KeyError otherwise). Model- and
# dataset-specific keys (optim_g, gt_size, ...) are left to the model/dataset to report.
_REQUIRED = {
    'train': ('name', 'num_gpu', 'path', 'datasets', 'datasets.train', 'datasets.train.batch_size_per_gpu',
              'datasets.train.num_worker_per_gpu', 'logger', 'logger.use_tb_logger', 'logger.print_freq',
              'logger.save_checkpoint_freq', 'train', 'train.total_iter'),
    'test': ('name', 'num_gpu', 'path', 'datasets', 'val'),
}


class UsageError(Exception):
    """A command-line or option-file problem reported as one line, exit status 2."""


def _one_line(err: BaseException) -> str:
    text = ' '.join(str(err).split())
    return text or type(err).__name__


def split_args(argv: Sequence[str]) -> Tuple[Optional[str], List[str], List[str], bool]:
    """Take our flags out of ``argv``: returns (root, imports, basicsr_argv, help_requested)."""
    root, imports, rest, want_help = None, [], [], False
    args = list(argv)
    i = 0

    def value(flag: str) -> str:
        nonlocal i
        if i + 1 >= len(args) or (args[i + 1].startswith('-') and args[i + 1] != '-'):
            raise UsageError(f'argument {flag}: expected one argument')
        i += 1
        return args[i]

    while i < len(args):
        arg = args[i]
        if arg == '--':
            rest.extend(args[i:])
            break
        name, eq, val = arg.partition('=')
        if name == '--root':
            root = val if eq else value('--root')
        elif name == '--import':
            imports.append(val if eq else value('--import'))
        elif name == '--local-rank':
            rest.append(f'--local_rank={val if eq else value("--local-rank")}')
        elif arg in ('-h', '--help'):
            want_help = True
        else:
            rest.append(arg)
        i += 1
    if root is not None and not root:
        raise UsageError('argument --root: empty path')
    return root, imports, rest, want_help


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message + SystemExit
        raise UsageError(message)


def parse_basicsr_args(args: Sequence[str]) -> argparse.Namespace:
    """Check ``args`` against the flags of ``basicsr.utils.options.parse_options`` (same
    definitions), so that mistakes are reported in one line before anything starts."""
    parser = _Parser(add_help=False)
    parser.add_argument('-opt', type=str, required=True)
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none')
    parser.add_argument('--auto_resume', action='store_true')
    parser.add_argument('--debug', action='store_true')
    parser.add_argument('--local_rank', type=int, default=0)
    parser.add_argument('--force_yml', nargs='+', default=None)
    parsed = parser.parse_args(list(args))
    for entry in parsed.force_yml or ():
        if entry.count('=') != 1 or not entry.split('=')[0].strip():
            raise UsageError(f'argument --force_yml: expected KEY=VALUE (e.g. train:total_iter=1000), got {entry!r}')
    return parsed


def _get(opt, dotted: str):
    node = opt
    for key in dotted.split('.'):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(dotted)
        node = node[key]
    return node


def check_option_file(path: Optional[str], mode: str) -> dict:
    """Read and sanity-check the option file; raises :class:`UsageError` with one line."""
    import yaml
    if not path:
        raise UsageError('argument -opt: expected an option file')
    if not osp.exists(path):
        raise UsageError(f'option file not found: {path}')
    if osp.isdir(path):
        raise UsageError(f'option file is a directory: {path}')
    try:
        with open(path, encoding='utf-8') as f:
            opt = yaml.safe_load(f)
    except OSError as err:
        raise UsageError(f'cannot read option file {path}: {err.strerror or _one_line(err)}') from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UsageError(f'option file {path} is not valid YAML: {_one_line(err)}') from None
    if not isinstance(opt, dict):
        raise UsageError(f'option file {path} must hold a mapping of options, got {type(opt).__name__}')
    missing = []
    for key in _REQUIRED[mode]:
        try:
            _get(opt, key)
        except KeyError:
            missing.append(key)
    if missing:
        raise UsageError(f'option file {path} lacks required option(s): {", ".join(missing)}')
    return opt


def _check_launcher(launcher: str) -> None:
    if launcher == 'pytorch':
        missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if k not in os.environ]
        if missing:
            raise UsageError(f'--launcher pytorch needs {", ".join(missing)} in the environment: start with '
                             'torchrun, e.g. torchrun --nproc_per_node=2 -m grl_plugin.train -opt FILE '
                             '--launcher pytorch')


def run(mode: str, argv: Optional[Sequence[str]] = None) -> int:
    """Shared body of ``grl-train`` (mode ``'train'``) and ``grl-test`` (mode ``'test'``)."""
    prog = f'grl-{mode}'
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        root, imports, rest, want_help = split_args(argv)
        if want_help:
            print(_HELP.format(prog=prog, spaces=' ' * len(prog), what='Train' if mode == 'train' else 'Test',
                               pipeline='train_pipeline' if mode == 'train' else 'test_pipeline'))
            return 0
        parsed = parse_basicsr_args(rest)
        check_option_file(parsed.opt, mode)
        _check_launcher(parsed.launcher)
        root = osp.abspath(osp.expanduser(root if root is not None else os.getcwd()))
        if osp.exists(root) and not osp.isdir(root):
            raise UsageError(f'--root {root} is not a directory')

        import grl_plugin  # noqa: F401 - registration + import fixes
        from grl_plugin import compat
        compat.apply_basicsr()
        for module in imports:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise UsageError(f'--import {module}: {_one_line(err)}') from None
    except UsageError as err:
        print(f'{prog}: error: {err}', file=sys.stderr)
        return 2

    os.makedirs(root, exist_ok=True)
    if mode == 'train':
        import basicsr.train
        pipeline = basicsr.train.train_pipeline
    else:
        import basicsr.test
        pipeline = basicsr.test.test_pipeline

    saved_argv = sys.argv
    sys.argv = [prog] + rest
    try:
        pipeline(root)
    except compat.CompatError as err:
        print(f'{prog}: error: {err}', file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``grl-train`` / ``python -m grl_plugin.train``."""
    return run('train', argv)


if __name__ == '__main__':
    sys.exit(main())
