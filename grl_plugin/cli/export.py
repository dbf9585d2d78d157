"""grl-export: export a GRL checkpoint to ONNX for one fixed input tile size.

The model is built as ``grl-infer`` builds it (checkpoint kwargs completed by ``--task`` or
``--opt``, neither needed for a file that stores its kwargs; a geometry contradicting the file's
is an error unless ``--force``; ``--checkpoint`` may name a released model,
:mod:`grl_plugin.cli.zoo`) and traced
with PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``). GRL's
attention tables, indices and masks depend on the input size only: for a fixed ``--tile`` they
are computed once and stored in the graph as constants, so the graph is static (input ``input``
of shape (1, C, tile, tile), output ``output`` of shape (1, C_out, tile * scale, tile * scale)).
``--tile`` must be a multiple of the model's padding multiple (the network pads other sizes
inside; an exported graph does not). Larger images are restored tile by tile around the exported
graph (as ``grl-infer`` does).

``--check`` validates the file with ``onnx.checker`` and runs it with onnxruntime on CPU on a
random input, printing the largest absolute difference to PyTorch (exit status 1 above 1e-3).
Needs ``pip install onnx onnxruntime``. Errors: one line ``grl-export: error: ...``, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from grl_plugin.cli.common import exits_on_interrupt
from grl_plugin.cli.infer import InferError, _one_line, add_model_arguments, load_model

TOLERANCE = 1e-3
_INSTALL = 'pip install onnx onnxruntime (or the package extra: pip install -e ".[onnx]")'


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='grl-export', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Export a GRL checkpoint to ONNX for a fixed input tile size.',
        epilog='examples:\n'
        '  grl-export --checkpoint sr_grl_tiny_c3x4 --tile 64 --output grl_tiny_x4_64.onnx --check\n'
        '  grl-export --checkpoint net_g.pth --task dn --size T --tile 128 --output dn.onnx')
    add_model_arguments(p)
    g = p.add_argument_group('export')
    g.add_argument('--tile', type=int, default=64,
                   help='input height and width of the graph (multiple of the padding multiple; default 64)')
    g.add_argument('--channels', type=int, default=None,
                   help='input channels (default: the model\'s; must match it)')
    g.add_argument('--output', required=True, metavar='MODEL.onnx', help='ONNX file to write')
    g.add_argument('--opset', type=int, default=17, help='ONNX opset (default 17)')
    g.add_argument('--check', action='store_true',
                   help='onnx.checker + compare with PyTorch under onnxruntime (CPU) on a random input')
    return p


def _require(module: str, why: str):
    try:
        return __import__(module)
    except ImportError:
        raise InferError(f'{why} needs the {module} package: {_INSTALL}') from None


def export(args: argparse.Namespace) -> int:
    import torch

    onnx = _require('onnx', 'grl-export')
    ort = _require('onnxruntime', '--check') if args.check else None
    model, kwargs, _ = load_model(args, 'grl-export')
    model = model.float().cpu().eval()
    pad = model.pad_size
    if args.tile <= 0 or args.tile % pad:
        lo, hi = max(args.tile // pad, 1) * pad, -(-max(args.tile, 1) // pad) * pad
        hint = f'{lo}' if lo == hi else f'{lo} or {hi}'
        raise InferError(f'--tile {args.tile} is not a multiple of the model\'s padding multiple {pad}; use {hint}')
    channels = args.channels if args.channels is not None else model.in_channels
    if channels != model.in_channels:
        raise InferError(f'--channels {channels}: the model takes {model.in_channels} input channels')
    out = Path(args.output)
    if out.parent and not out.parent.is_dir():
        raise InferError(f'--output {out}: folder {out.parent} does not exist')
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, channels, args.tile, args.tile, generator=gen)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TracerWarnings: the size-dependent tables are constants on purpose
        try:
            torch.onnx.export(model, (x, ), str(out), opset_version=args.opset, dynamo=False,
                              input_names=['input'], output_names=['output'], do_constant_folding=True)
        except Exception as err:  # unsupported opset, exporter failure
            raise InferError(f'ONNX export failed ({type(err).__name__}: {_one_line(err)[:300]})') \
                from None
        ref = model(x)
    proto = onnx.load(str(out))
    for key, value in (('grl_kwargs', json.dumps({k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in kwargs.items()}, default=str)),
                       ('tile', str(args.tile)), ('scale', str(model.upscale)), ('pad_size', str(pad)),
                       ('input_range', '[0, 1] RGB (or gray), NCHW float32')):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    size_mb = out.stat().st_size / 2**20
    print(f'grl-export: {args.checkpoint} -> {out} ({size_mb:.1f} MiB, opset {args.opset}): '
          f'input (1, {channels}, {args.tile}, {args.tile}) -> output {tuple(ref.shape)}')
    if not args.check:
        return 0
    try:
        onnx.checker.check_model(str(out))
    except Exception as err:
        raise InferError(f'onnx.checker rejects {out} ({_one_line(err)[:300]})') from None
    runner = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    y = runner.run(None, {'input': x.numpy()})[0]
    if tuple(y.shape) != tuple(ref.shape):
        print(f'grl-export: check FAILED: onnxruntime output {tuple(y.shape)} vs PyTorch {tuple(ref.shape)}')
        return 1
    delta = float(abs(y - ref.numpy()).max())
    ok = delta <= TOLERANCE
    print(f'grl-export: onnxruntime (CPU) vs PyTorch on a random input: max |delta| = {delta:.3g} '
          f'({"ok" if ok else "FAILED"}, tolerance {TOLERANCE:g})')
    return 0 if ok else 1


@exits_on_interrupt('grl-export')
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return export(args)
    except (InferError, OSError) as err:
        print(f'grl-export: error: {_one_line(err)}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
