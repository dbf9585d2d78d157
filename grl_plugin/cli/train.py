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
``--dry-run``        check the option file and stop: parse it as BasicSR does, build the
                     datasets whose files exist (missing dataset roots, weights and VGG files are
                     reported, not fatal), the model with its network(s), losses and optimizers,
                     print a summary and exit 0 -- nothing is trained or tested and no folder is
                     created. Exit status 1 if building fails (the error is printed).

BasicSR's flags are passed through: ``-opt FILE`` (required; ``--opt FILE`` is accepted too and
passed on as ``-opt``), ``--launcher none|pytorch|slurm``,
``--auto_resume``, ``--debug``, ``--local_rank N``, ``--force_yml key:sub=value ...``.
Errors in the command line or the option file: one line ``grl-train: error: ...`` on stderr,
exit status 2; so are a checkpoint or training state that cannot be read or does not fit
(``CheckpointError``) and an unreadable image or missing LMDB key (``DataError``).
Before anything starts, the option file (with the ``--force_yml`` overrides) is checked by
:mod:`grl_plugin.cli.validate` -- unknown keys (with the closest valid one), invalid GRL /
dataset / tile combinations, missing files (``--dry-run`` lists missing files without failing)
-- one line ``grl-train: error: FILE: KEY=VALUE: what`` per problem. Ctrl-C: one line
``grl-train: interrupted``, exit status 130.
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
       {spaces} [--dry-run]

{what} with the GRL plugin (BasicSR {pipeline}).

options:
  -opt OPTION_FILE, --opt OPTION_FILE
                        BasicSR option YAML (required)
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
  --dry-run             build datasets (those that exist), model and network(s), print a
                        summary and exit: nothing runs, no folder is created
  -h, --help            show this help and exit
"""

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
        elif name == '--opt':  # BasicSR spells it -opt
            rest += ['-opt', val if eq else value('--opt')]
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
    parser.add_argument('-opt', type=str, required=True)  # (--opt: rewritten by split_args)
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
    return opt  # required keys, types, ranges: grl_plugin.cli.validate (one line per problem)


def _check_launcher(launcher: str) -> None:
    if launcher == 'pytorch':
        missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if k not in os.environ]
        if missing:
            raise UsageError(f'--launcher pytorch needs {", ".join(missing)} in the environment: start with '
                             'torchrun, e.g. torchrun --nproc_per_node=2 -m grl_plugin.train -opt FILE '
                             '--launcher pytorch')


def take_dry_run(argv: Sequence[str]) -> Tuple[List[str], bool]:
    """Remove ``--dry-run`` (before a ``--``) from ``argv``; returns (rest, found)."""
    args = list(argv)
    end = args.index('--') if '--' in args else len(args)
    found = '--dry-run' in args[:end]
    return [a for i, a in enumerate(args) if i >= end or a != '--dry-run'], found


#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def run(mode: str, argv: Optional[Sequence[str]] = None) -> int:
    """Shared body of ``grl-train`` (mode ``'train'``) and ``grl-test`` (mode ``'test'``).

    Ctrl-C (``KeyboardInterrupt``) anywhere -- checks, dry run, training, testing -- ends with
    one line ``<prog>: interrupted`` and exit status 130, no traceback (checkpoints and
    training states are written atomically, so the last complete one stays usable).
    """
    prog = f'grl-{mode}'
    try:
        return _run(mode, prog, argv)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f'{prog}: interrupted', file=sys.stderr, flush=True)
        return INTERRUPTED


def _run(mode: str, prog: str, argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, dry_run = take_dry_run(argv)
        root, imports, rest, want_help = split_args(argv)
        if want_help:
            print(_HELP.format(prog=prog, spaces=' ' * len(prog), what='Train' if mode == 'train' else 'Test',
                               pipeline='train_pipeline' if mode == 'train' else 'test_pipeline'))
            return 0
        parsed = parse_basicsr_args(rest)
        opt = check_option_file(parsed.opt, mode)
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
        from . import validate  # unknown keys, invalid combinations, missing files: one line each
        problems = validate.validate_file(opt, mode, parsed.force_yml, paths=not dry_run,
                                          auto_resume=parsed.auto_resume, prog=prog)
        if problems:
            return validate.report(prog, parsed.opt, problems)
    except UsageError as err:
        print(f'{prog}: error: {err}', file=sys.stderr)
        return 2

    if dry_run:
        return dry_run_check(mode, prog, root, rest)
    os.makedirs(root, exist_ok=True)
    if mode == 'train':
        import basicsr.train
        pipeline = basicsr.train.train_pipeline
    else:
        import basicsr.test
        pipeline = basicsr.test.test_pipeline

    from grl_plugin.archs.checkpoint import CheckpointError
    from grl_plugin.data.robust import DataError, error_line
    from grl_plugin.models import NonFiniteLossError
    saved_argv = sys.argv
    sys.argv = [prog] + rest
    try:
        pipeline(root)
        compat.finish_distributed()
    except (compat.CompatError, NonFiniteLossError) as err:
        print(f'{prog}: error: {err}', file=sys.stderr)
        return 2
    except (CheckpointError, DataError) as err:  # bad weights/state or data file: one line naming it
        print(f'{prog}: error: {error_line(err)}', file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    return 0


# ------------------------------------------------------------------------------- --dry-run
_PATH_KEYS = ('meta_info_file', 'meta_info')


def _missing_dataset_files(dataset_opt: dict) -> List[str]:
    """``key: path`` for every dataset root / file list the dataset options name that does not exist."""
    missing = []
    for key, value in dataset_opt.items():
        if (key.startswith('dataroot') or key in _PATH_KEYS) and isinstance(value, str) and value:
            if not osp.exists(value):
                missing.append(f'{key}: {value}')
    return missing


def _count(n: float) -> str:
    return f'{n / 1e6:.3f} M' if n >= 1e5 else f'{int(n):,}'


def _describe_network(bare) -> str:
    n = sum(p.numel() for p in bare.parameters())
    text = f'{type(bare).__name__}, {_count(n)} parameters'
    if hasattr(bare, 'pad_size'):
        geom = [f'{k} {getattr(bare, k)}' for k in ('upscale', 'in_channels', 'embed_dim', 'window_size',
                                                      'stripe_size', 'anchor_window_down_factor', 'pad_size')
                if hasattr(bare, k)]
        text += ' (' + ', '.join(geom) + ')'
    return text


def dry_run_check(mode: str, prog: str, root: str, rest: Sequence[str]) -> int:
    """``--dry-run``: parse the options like BasicSR, build what can be built, print a summary.

    Datasets whose roots (``dataroot_*``, ``meta_info_file``, ``meta_info``) are missing are
    reported and skipped; missing ``pretrain_network_*`` / ``resume_state`` files are reported and
    not loaded; a missing ``vgg_weights`` file of a loss is reported and replaced by random VGG
    weights for the check. Nothing is written (no experiments/ or results/ folder, no log file).
    """
    import torch
    from basicsr.data import build_dataset
    from basicsr.models import build_model
    from basicsr.utils import get_root_logger
    from basicsr.utils.options import parse_options

    from grl_plugin import compat

    is_train = mode == 'train'
    saved_argv = sys.argv
    sys.argv = [prog] + list(rest)
    try:
        opt, args = parse_options(root, is_train=is_train)
    except Exception as err:  # noqa: BLE001 - report any option problem in one line
        print(f'{prog}: error: {_one_line(err)}', file=sys.stderr)
        return 1
    finally:
        sys.argv = saved_argv
    notes = compat.adjust_options_for_device(opt)
    get_root_logger()  # no log file: BasicSR's INFO messages (network dumps) stay quiet

    out = [f'{prog} --dry-run: {args.opt}',
           f'  name: {opt["name"]}, model_type: {opt.get("model_type")}, scale: {opt.get("scale")}, '
           f'num_gpu: {opt["num_gpu"]}, device: {"cuda" if opt["num_gpu"] else "cpu"}, '
           f'world_size: {opt.get("world_size", 1)}']
    out += [f'  note: {n}' for n in notes]
    problems = 0

    def fail(where: str, err: BaseException) -> None:
        nonlocal problems
        problems += 1
        out.append(f'  {where}: ERROR {_one_line(err)}')

    for phase, dataset_opt in (opt.get('datasets') or {}).items():
        label = f'datasets.{phase}: {dataset_opt.get("type")} {dataset_opt.get("name")!r}'
        missing = _missing_dataset_files(dataset_opt)
        if missing:
            out.append(f'  {label}: not built, missing {"; ".join(missing)}')
            continue
        try:
            dataset = build_dataset(dict(dataset_opt))
        except Exception as err:  # noqa: BLE001
            fail(label, err)
            continue
        line = f'  {label}: {len(dataset)} images'
        if phase == 'train':
            per_gpu = dataset_opt.get('batch_size_per_gpu')
            gpus = max(int(opt['num_gpu'] or 0), 1) if not opt.get('dist') else opt.get('world_size', 1)
            line += (f', patch {dataset_opt.get("gt_size")}, batch {per_gpu} per GPU x {gpus} = '
                     f'{per_gpu * gpus if isinstance(per_gpu, int) else "?"} per iteration')
        out.append(line)

    path_opt = opt.get('path') or {}
    for key in list(path_opt):
        value = path_opt[key]
        if (key.startswith('pretrain_network') or key == 'resume_state') and isinstance(value, str) and value:
            if osp.isfile(value):
                out.append(f'  path.{key}: {value} (found, loaded below)' if key != 'resume_state' else
                           f'  path.resume_state: {value} (found; not resumed by --dry-run)')
            else:
                out.append(f'  path.{key}: {value} -- missing, not loaded')
            if key == 'resume_state' or not osp.isfile(value):
                path_opt[key] = None
    for key, loss_opt in (opt.get('train') or {}).items() if is_train else ():
        vgg = loss_opt.get('vgg_weights') if isinstance(loss_opt, dict) else None
        if isinstance(vgg, str) and vgg.strip().lower() not in ('random', 'none', 'null', '~', ''):
            if not osp.isfile(osp.expandvars(osp.expanduser(vgg))):
                out.append(f'  train.{key}.vgg_weights: {vgg} -- missing (random VGG weights for this check)')
                loss_opt['vgg_weights'] = 'random'

    model = None
    try:
        model = build_model(opt)
    except Exception as err:  # noqa: BLE001
        fail(f'model {opt.get("model_type")}', err)
    if model is not None:
        out.append(f'  model: {type(model).__name__} on {model.device}')
        for attr in ('net_g', 'net_d', 'net_g_ema'):
            net = getattr(model, attr, None)
            if isinstance(net, torch.nn.Module):
                out.append(f'    {attr}: {_describe_network(model.get_bare_model(net))}')
        if is_train:
            train_opt = opt.get('train') or {}
            losses = [f'{k[:-4]} {v.get("type")}' + (f' x{v["loss_weight"]}' if 'loss_weight' in v else '')
                      for k, v in train_opt.items() if k.endswith('_opt') and isinstance(v, dict)]
            out.append(f'    losses: {", ".join(losses) or "none"}')
            for i, optimizer in enumerate(getattr(model, 'optimizers', [])):
                group = optimizer.param_groups[0]
                out.append(f'    optimizer {i}: {type(optimizer).__name__} lr {group["lr"]:g}, '
                           f'weight_decay {group.get("weight_decay", 0):g}')
            sched = train_opt.get('scheduler') or {}
            out.append(f'    schedule: {sched.get("type")} {dict((k, v) for k, v in sched.items() if k != "type")}, '
                       f'total_iter {train_opt.get("total_iter")}, warmup_iter {train_opt.get("warmup_iter", -1)}')
    val_opt = opt.get('val') or {}
    if val_opt:
        tile = val_opt.get('tile')
        if isinstance(tile, dict):
            tile = ', '.join(f'{k} {v}' for k, v in tile.items())
        out.append(f'  val: every {val_opt.get("val_freq")} iterations, ' if is_train and val_opt.get('val_freq')
                   else '  val: ')
        out[-1] += (f'metrics {", ".join(val_opt.get("metrics") or {}) or "none"}, tile {tile or "none"}, '
                    f'save_img {val_opt.get("save_img", False)}')
    out.append(f'  dry run {"OK" if not problems else f"FAILED ({problems} error(s))"}: nothing was '
               f'{"trained" if is_train else "tested"}, no folder was created.')
    print('\n'.join(out), flush=True)
    return 1 if problems else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``grl-train`` / ``python -m grl_plugin.train``."""
    return run('train', argv)


if __name__ == '__main__':
    sys.exit(main())
