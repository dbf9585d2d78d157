"""grl-convert: turn a GRL checkpoint into a BasicSR ``.pth`` or a ``.safetensors`` file.

Reads an official Lightning ``.ckpt`` (any engine), a BasicSR ``.pth`` (``params`` /
``params_ema``), a bare state dict or a ``.safetensors`` file; checks that the weights load
strictly into ``GRL(**kwargs)``; writes DST plus ``<DST stem>.yml`` (``network_g: {type: GRL, ...}``).
Window/stripe settings that the file does not store must be given with ``--set key=value``; a
``--set`` of a window/stripe setting that contradicts the one the file stores is an error (key,
the file's value, the given value) unless ``--force``.
SRC may also be the name of a released model (:mod:`grl_plugin.cli.zoo`), downloaded once.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

import yaml

from grl_plugin.archs.checkpoint import (GEOMETRY_KEYS, GRL_KWARGS, CheckpointError, _one_line, _same, check_fit,
                                         save_converted)
from grl_plugin.cli.common import exits_on_interrupt
from grl_plugin.cli.zoo import open_checkpoint


def _parse_set(items: Sequence[str]) -> dict:
    """``key=value`` pairs; values are parsed as YAML (``[64, 64]``, ``null``, ``true``, ``16``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        key = key.strip()
        if not sep or key not in GRL_KWARGS:
            raise CheckpointError(f'--set {item!r}: expected KEY=VALUE with KEY a GRL argument (e.g. window_size=16)')
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise CheckpointError(f'--set {item!r}: value is not valid YAML ({_one_line(err)})') from None
    return out


def _check_fit(model, sd: dict) -> None:
    """Raise a one-line CheckpointError describing why ``sd`` does not load strictly into ``model``."""
    check_fit(model, sd, what='GRL(**kwargs)')
    model.load_state_dict(sd, strict=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='grl-convert', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Convert GRL weights (official Lightning .ckpt, BasicSR .pth, state dict, .safetensors)\n'
        'to a BasicSR .pth or a .safetensors file, plus <DST stem>.yml with the network_g kwargs.',
        epilog='examples:\n  grl-convert sr_grl_tiny_c3x4.ckpt grl_tiny_x4.safetensors\n'
        '  grl-convert sr_grl_tiny_c3x4 grl_tiny_x4.pth  (released model, by name: downloaded once)\n'
        '  grl-convert weights.pth out.pth --set window_size=32 --set "stripe_size=[64, 64]" \\\n'
        '      --set "stripe_groups=[null, null]" --set stripe_shift=true --set anchor_window_down_factor=4')
    parser.add_argument('src', help='.ckpt / .pth / .safetensors with GRL weights, or the name of a released model '
                        '(e.g. sr_grl_tiny_c3x4; downloaded once into $GRL_HOME, default ~/.cache/grl_plugin; '
                        'grl-zoo lists them)')
    parser.add_argument('dst', help='output: .pth (BasicSR {"params": ...}) or .safetensors')
    parser.add_argument('--trust', action='store_true',
                        help='allow a full (unsafe) unpickle if the restricted reader refuses the file')
    parser.add_argument('--key', choices=('params', 'params_ema'),
                        help='entry of a BasicSR file to use (default: params_ema if present)')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='GRL argument the file lacks or to override (YAML value), repeatable')
    parser.add_argument('--force', action='store_true',
                        help='let --set replace a window/stripe setting the file stores (default: an error)')
    return parser


def convert(args: argparse.Namespace) -> str:
    """Run the conversion; returns the summary text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        sd, kwargs, src = open_checkpoint(args.src, trust=args.trust, key=args.key, prog='grl-convert',
                                          require_geometry=False)
    for w in caught:  # missing geometry is checked below, after --set
        if 'not stored in the file' not in str(w.message):
            print(f'grl-convert: warning: {w.message}', file=sys.stderr)
    stored = ('config', 'metadata', 'sidecar', 'buffers')  # what the file itself records
    for key, value in _parse_set(args.overrides).items():
        if key in GEOMETRY_KEYS and kwargs.origin.get(key) in stored and not _same(value, kwargs.get(key)):
            if not getattr(args, 'force', False):
                raise CheckpointError(f'{src}: --set {key}={value!r} but the file stores {key}={kwargs[key]!r}; '
                                      'leave it out or add --force to use the given value')
            print(f'grl-convert: warning: using {key}={value!r} from --set (the file stores {kwargs[key]!r}) '
                  'because of --force', file=sys.stderr)
        kwargs[key], kwargs.origin[key] = value, 'given'
    missing = [k for k in kwargs.missing if k not in kwargs]
    if missing:
        raise CheckpointError(f'{src}: {", ".join(missing)} not stored in the file; pass them with --set '
                              'KEY=VALUE (e.g. --set window_size=32 --set "stripe_size=[64, 64]")')
    from grl_plugin.cli.validate import check_network  # a stored or --set geometry GRL cannot run with
    problems = check_network(dict(kwargs, type='GRL'), prefix='kwargs', shape_keys=False)
    if problems:
        raise CheckpointError(problems[0].format(src))
    from grl_plugin.archs.grl_arch import GRL  # lazy: heavy import, only needed for the check
    try:
        model = GRL(**kwargs)
    except Exception as err:  # bad values from --set or the config
        raise CheckpointError(f'cannot build GRL from these kwargs ({_one_line(err)})') from None
    try:
        _check_fit(model, sd)
    except CheckpointError as err:
        raise CheckpointError(f'{src}: {err}') from None
    dst, yml = save_converted(sd, kwargs, args.dst)
    lines = [f'{src} -> {dst} (+ {yml.name})', f'  format: {kwargs.format}',
             f'  params: {sum(v.numel() for v in sd.values()):,} in {len(sd)} tensors', '  kwargs:']
    lines += [f'    {k}: {v!r}  [{kwargs.origin.get(k, "?")}]' for k, v in kwargs.items()]
    return '\n'.join(lines)


@exits_on_interrupt('grl-convert')
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(convert(args))
    except (CheckpointError, OSError) as err:
        print(f'grl-convert: error: {" ".join(str(err).split())}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
