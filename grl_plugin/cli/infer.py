"""grl-infer: restore images (one file or a folder) with a GRL checkpoint.

The network is built from what the checkpoint stores (:func:`grl_plugin.load_checkpoint`; a
released model can be given by name, :mod:`grl_plugin.cli.zoo`, and is downloaded once),
completed or overridden by ``--task``/``--size``/``--scale``/``--gray`` (the official task table,
:func:`grl_plugin.archs.tasks.task_kwargs`) or by the ``network_g`` of a BasicSR option file
(``--opt``; ``type: GRL`` or a preset such as ``GRL_T``). Shape-determined kwargs (channels,
depths, heads, head type) always come from the weights; window/stripe geometry comes from the
checkpoint when it stores it (a Lightning config, the ``grl_kwargs`` of a GRLModel
``net_g_<iter>.pth`` or of a converted file, a ``<stem>.yml`` sidecar, the official buffers),
else from ``--opt``/``--task``. A geometry from ``--opt``/``--task`` that contradicts the
checkpoint's is an error naming the key and both values, unless ``--force`` (the given value is
then used, with a warning).

Images are restored tile by tile (:func:`grl_plugin.tiling.tiled_forward`, tiles rounded up to
the model's padding multiple, overlapping tiles blended) and written as ``<stem><suffix>.png``:
8-bit inputs give 8-bit PNGs, 16-bit PNG/TIFF inputs give 16-bit PNGs. Gray images go through a
3-channel model replicated and come back gray; an alpha channel is kept (resized bicubically for
super-resolution). Denoising, JPEG and deblurring models take the degraded image as it is;
demosaicking models take the 3-channel Malvar-interpolated image (``--bayer`` makes it from a
1-channel mosaic). ``--ensemble`` averages the x8 self-ensemble (the 8 flips/rotations of the
input, each restored and turned back).

Each output is written under a temporary name in its folder and renamed into place as soon as
it is done, and ``metrics.csv`` (``--compare``/``--gt``) gets each image's row as it finishes
(one complete line per write), so an interrupted run leaves only complete files; with
``--skip-existing`` a rerun restores only the images whose output is missing (the rows of the
others are computed again from their outputs). Unreadable images are reported and skipped
(exit status 1); Ctrl-C ends the run with one line ``grl-infer: interrupted ...`` (exit status
130); every other error, a bad argument included, is one line ``grl-infer: error: ...`` naming
the option or file, with exit status 2.

``grl_plugin.cli.export`` (grl-export) reuses :func:`add_model_arguments` / :func:`load_model`.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from grl_plugin.cli.common import ArgumentParser, Interrupted, exits_on_interrupt, write_atomic
# the x8 self-ensemble (shared with GRLModel's val.self_ensemble); still importable from here
from grl_plugin.tiling import ENSEMBLE, self_ensemble, transform, untransform  # noqa: F401

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm', '.pnm')
#: Keys of the task table that the size preset (T/S/B) decides; weights decide them too.
_SIZE_KEYS = ('embed_dim', 'depths', 'num_heads_window', 'num_heads_stripe', 'mlp_ratio', 'local_connection',
              'upsampler')
CSV_FIELDS = ('name', 'psnr', 'ssim', 'input_psnr', 'input_ssim', 'seconds')


class InferError(Exception):
    """A one-line error that ends the command (exit status 2)."""


def _one_line(err: BaseException) -> str:
    text = ' '.join(str(err).split())
    return text or type(err).__name__


# ------------------------------------------------------------------------------------ model
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--list-models``, ``--task``/``--size``/``--scale``/``--gray``, ``--opt``, ``--trust``,
    ``--force``."""
    from grl_plugin.cli.zoo import ListModelsAction
    g = parser.add_argument_group('model (the geometry the checkpoint does not store comes from --task or --opt)')
    g.add_argument('--checkpoint', required=True, metavar='CKPT',
                   help='GRL weights: official Lightning .ckpt, BasicSR .pth, state dict or .safetensors; or '
                        'the name of a released model (e.g. sr_grl_base_c3x4), downloaded once into $GRL_HOME '
                        '(default ~/.cache/grl_plugin)')
    g.add_argument('--list-models', action=ListModelsAction)
    src = g.add_mutually_exclusive_group()
    src.add_argument('--task', metavar='TASK',
                     help='official task settings: sr, dn, jpeg, dm, db_motion, db_defocus, bsr')
    src.add_argument('--opt', '-opt', metavar='OPTION_FILE', help='BasicSR option file whose network_g describes the model')
    g.add_argument('--size', choices=('T', 'S', 'B', 't', 's', 'b'),
                   help='model size of the task preset (default: taken from the weights)')
    g.add_argument('--scale', type=int,
                   help='super-resolution factor for --task sr (default: from the weights, else 4)')
    g.add_argument('--gray', action='store_true', help='1-channel model (gray denoising / JPEG) for --task')
    g.add_argument('--trust', action='store_true',
                   help='allow a full (unsafe) unpickle if the restricted reader refuses the checkpoint')
    g.add_argument('--force', action='store_true',
                   help='use the window/stripe geometry of --task/--opt even where the checkpoint stores another '
                        '(default: that is an error)')


def read_option_network(path: str) -> Tuple[dict, dict]:
    """(GRL kwargs of ``network_g``, whole option dict) of a BasicSR option file."""
    import yaml

    import grl_plugin  # noqa: F401  (import fixes before basicsr)
    from basicsr.utils.options import ordered_yaml

    from grl_plugin.archs.presets import PRESET_KWARGS, preset_kwargs

    try:
        with open(path, encoding='utf-8') as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
    except OSError as err:
        raise InferError(f'--opt {path}: {err.strerror or _one_line(err)}') from None
    except yaml.YAMLError as err:
        raise InferError(f'--opt {path}: not valid YAML ({_one_line(err)})') from None
    net = opt.get('network_g') if isinstance(opt, dict) else None
    if not isinstance(net, dict):
        raise InferError(f'--opt {path}: no network_g section')
    from grl_plugin.cli.validate import validate_network_file  # unknown keys, geometry, val.tile
    problems = validate_network_file(opt)
    if problems:
        more = f' (and {len(problems) - 1} more problem(s))' if len(problems) > 1 else ''
        raise InferError(problems[0].format(path) + more)
    net = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in net.items()}
    kind = net.pop('type', 'GRL')
    if kind == 'GRL':
        kwargs = net
    elif kind in PRESET_KWARGS:
        kwargs = preset_kwargs(kind, **net)
    else:
        raise InferError(f'--opt {path}: network_g type {kind!r} is not GRL or a preset '
                         f'({", ".join(sorted(PRESET_KWARGS))})')
    return kwargs, dict(opt)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


#: Origins of checkpoint kwargs that the file itself records (see ``ModelKwargs.origin``).
STORED_ORIGINS = ('config', 'metadata', 'sidecar', 'buffers')


def resolve_kwargs(ckpt_kwargs: Any, given: Optional[dict], source: str, explicit: Sequence[str] = (),
                   ckpt: str = 'checkpoint', force: bool = False) -> Tuple[dict, List[Tuple[str, str]]]:
    """Checkpoint kwargs completed/overridden by ``given`` (from ``source``): returns (kwargs,
    messages), each message ``('note' | 'warning', text)``.

    Values the weights determine win (a note when an ``explicit`` key disagrees). A window/stripe
    geometry key (``GEOMETRY_KEYS``) that the checkpoint stores and ``given`` contradicts raises
    :class:`InferError` (key, the file's value, the given value) unless ``force``: then the given
    value wins with a warning. Other stored values are overridden by ``given`` with a note.
    Raises :class:`InferError` naming what is still missing.
    """
    from grl_plugin.archs.checkpoint import GEOMETRY_KEYS
    origin = getattr(ckpt_kwargs, 'origin', {})
    kwargs, notes = dict(ckpt_kwargs), []
    for key, value in (given or {}).items():
        if origin.get(key) == 'weights':
            if key in explicit and not _same(value, kwargs[key]):
                notes.append(('note', f'{source} says {key}={value!r} but the weights need {kwargs[key]!r}; '
                                      'using the weights'))
            continue
        if key in kwargs and origin.get(key) in STORED_ORIGINS and not _same(value, kwargs[key]):
            if key in GEOMETRY_KEYS and not force:
                raise InferError(f'{ckpt}: {source} gives {key}={value!r} but the checkpoint stores '
                                 f'{key}={kwargs[key]!r}; leave out {source.split()[0]} (the checkpoint describes '
                                 'the model) or add --force to use the given value')
            notes.append(('warning' if key in GEOMETRY_KEYS else 'note',
                          f'using {key}={value!r} from {source} (the checkpoint stores {kwargs[key]!r})'
                          + (' because of --force' if key in GEOMETRY_KEYS else '')))
        kwargs[key] = value
    missing = [k for k in getattr(ckpt_kwargs, 'missing', []) if k not in kwargs]
    if 'upscale' in kwargs and 'out_channels' in missing:
        missing.remove('out_channels')  # pixelshuffledirect: out_channels defaults to in_channels
    if missing:
        raise InferError(f'{ckpt}: {", ".join(missing)} not stored in the checkpoint; give --task TASK '
                         '(with --size T|S|B, --scale N, --gray as needed) or --opt OPTION_FILE')
    return kwargs, notes


def load_model(args: argparse.Namespace, prog: str) -> Tuple[Any, dict, dict]:
    """Build GRL from ``args`` and load the weights (CPU, eval). Returns (model, kwargs, option dict)."""
    import grl_plugin  # noqa: F401
    from grl_plugin.archs.checkpoint import CheckpointError, CheckpointWarning
    from grl_plugin.archs.grl_arch import GRL
    from grl_plugin.archs.tasks import task_kwargs
    from grl_plugin.cli.convert import _check_fit
    from grl_plugin.cli.zoo import open_checkpoint

    if args.scale is not None and args.scale < 1:
        raise InferError(f'--scale {args.scale}: must be a positive integer (the super-resolution factor)')
    if args.task is None and (args.size or args.scale or args.gray):
        raise InferError('--size, --scale and --gray go with --task')
    if Path(args.checkpoint).is_dir():
        raise InferError(f'--checkpoint {args.checkpoint}: is a folder; give the weights file in it '
                         '(.ckpt, .pth or .safetensors) or the name of a released model')
    opt: dict = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            sd, ckpt_kwargs, ckpt = open_checkpoint(args.checkpoint, trust=args.trust, require_geometry=False,
                                                    quiet=getattr(args, 'quiet', False), prog=prog)
    except CheckpointError as err:
        raise InferError(_one_line(err)) from None
    for w in caught:
        if not issubclass(w.category, CheckpointWarning) or 'not stored in the file' not in str(w.message):
            print(f'{prog}: warning: {_one_line(w.message)}', file=sys.stderr)
    given, source, explicit = None, '', ()
    if args.opt:
        given, opt = read_option_network(args.opt)
        source, explicit = f'--opt {Path(args.opt).name}', tuple(given)
    elif args.task:
        scale = args.scale if args.scale else (ckpt_kwargs.get('upscale') or 4)
        color = not args.gray and ckpt_kwargs.get('in_channels', 3) != 1
        try:
            given = task_kwargs(args.task, (args.size or 'T').upper(), scale=scale, color=color)
        except ValueError as err:
            raise InferError(f'--task: {_one_line(err)}') from None
        source = f'--task {args.task}'
        explicit = (_SIZE_KEYS if args.size else ()) + (('upscale', ) if args.scale else ()) + \
            (('in_channels', ) if args.gray else ())
    kwargs, notes = resolve_kwargs(ckpt_kwargs, given, source, explicit, ckpt=ckpt,
                                   force=getattr(args, 'force', False))
    for kind, note in notes:
        print(f'{prog}: {kind}: {note}', file=sys.stderr)
    from grl_plugin.cli.validate import check_network  # geometry stored in a file is checked as --opt's is
    problems = check_network(dict(kwargs, type='GRL'), prefix='kwargs', shape_keys=False)
    if problems:
        raise InferError(problems[0].format(ckpt))
    try:
        model = GRL(**kwargs)
    except Exception as err:  # bad values in the option file
        raise InferError(f'cannot build GRL from these kwargs ({_one_line(err)})') from None
    try:
        _check_fit(model, sd)
    except CheckpointError as err:
        raise InferError(f'{ckpt}: {_one_line(err)}') from None
    return model.eval(), kwargs, opt


# ------------------------------------------------------------------------------------ images
def list_inputs(path: Path, recursive: bool) -> List[Tuple[Path, Path]]:
    """(file, path relative to the input folder) of every image, sorted."""
    if path.is_file():
        return [(path, Path(path.name))]
    if not path.is_dir():
        raise InferError(f'--input {path}: no such file or folder')
    pattern = '**/*' if recursive else '*'
    files = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise InferError(f'--input {path}: no images ({", ".join(IMAGE_EXTS)}) found'
                         + ('' if recursive else ' (use --recursive for subfolders)'))
    return [(p, p.relative_to(path)) for p in files]


def read_image(path: Path) -> Tuple[np.ndarray, Optional[np.ndarray], int]:
    """(float32 HxWxC RGB or gray in [0, 1], alpha in the file's dtype or None, bit depth 8/16)."""
    import cv2
    log = getattr(getattr(cv2, 'utils', None), 'logging', None)  # OpenCV's own decoder messages: ours instead
    level = log.getLogLevel() if log is not None else None
    if log is not None:
        log.setLogLevel(log.LOG_LEVEL_SILENT)
    try:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    finally:
        if log is not None:
            log.setLogLevel(level)
    if img is None or img.size == 0:
        raise ValueError('cannot read image (corrupt or unsupported format)')
    if img.dtype == np.uint8:
        bits, peak = 8, 255.0
    elif img.dtype == np.uint16:
        bits, peak = 16, 65535.0
    else:
        raise ValueError(f'unsupported pixel type {img.dtype} (8- or 16-bit images only)')
    if img.ndim == 2:
        img = img[..., None]
    alpha = None
    if img.shape[2] in (2, 4):
        alpha, img = img[..., -1].copy(), img[..., :-1]
    if img.shape[2] == 3:
        img = img[..., ::-1]  # BGR -> RGB
    elif img.shape[2] != 1:
        raise ValueError(f'unsupported channel count {img.shape[2]}')
    return np.ascontiguousarray(img, dtype=np.float32) / peak, alpha, bits


def quantize(img: np.ndarray, bits: int) -> np.ndarray:
    peak, dtype = (255.0, np.uint8) if bits == 8 else (65535.0, np.uint16)
    return (np.clip(img, 0, 1) * peak).round().astype(dtype)


def to_file_layout(rgb_or_gray: np.ndarray, alpha: Optional[np.ndarray] = None) -> np.ndarray:
    """HxWxC RGB/gray (quantized) + alpha -> what cv2.imwrite expects (BGR, BGRA or HxW)."""
    if alpha is not None:
        color = rgb_or_gray if rgb_or_gray.shape[2] == 3 else np.repeat(rgb_or_gray, 3, axis=2)
        return np.ascontiguousarray(np.concatenate([color[..., ::-1], alpha[..., None]], axis=2))
    if rgb_or_gray.shape[2] == 1:
        return np.ascontiguousarray(rgb_or_gray[..., 0])
    return np.ascontiguousarray(rgb_or_gray[..., ::-1])


def _match_channels(img: np.ndarray, channels: int) -> np.ndarray:
    if img.shape[2] == channels:
        return img
    return np.repeat(img, channels, axis=2) if img.shape[2] == 1 else img.mean(axis=2, keepdims=True)


def find_gt(gt_dir: Path, rel: Path) -> Optional[Path]:
    """The file in ``gt_dir`` (same subfolder first, then top level) with the stem of ``rel``."""
    for folder in dict.fromkeys((gt_dir / rel.parent, gt_dir)):
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.stem == rel.stem and p.suffix.lower() in IMAGE_EXTS and p.is_file():
                    return p
    return None


def _labelled(img_bgr: np.ndarray, text: str, zoom: int = 1) -> np.ndarray:
    """8-bit BGR ``img_bgr`` (enlarged ``zoom`` times, nearest) under a black bar with ``text``."""
    import cv2
    if zoom > 1:
        img_bgr = cv2.resize(img_bgr, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    w = img_bgr.shape[1]
    scale = 0.45 if w >= 200 else 0.35
    (_, th), base = cv2.getTextSize('Ayg', cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    bar = np.zeros((th + base + 10, w, 3), np.uint8)
    cv2.putText(bar, text, (5, th + 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([bar, img_bgr], axis=0)


def _display(img: np.ndarray) -> np.ndarray:
    """float HxWxC RGB/gray in [0, 1] -> 8-bit BGR."""
    return np.ascontiguousarray(quantize(_match_channels(img, 3), 8)[..., ::-1])


def _metrics(out: np.ndarray, ref: np.ndarray, crop: int) -> Tuple[float, float]:
    """basicsr PSNR/SSIM of float [0, 1] images, on the 0..255 scale."""
    from basicsr.metrics import calculate_psnr, calculate_ssim
    a, b = out.astype(np.float64) * 255.0, ref.astype(np.float64) * 255.0
    return (float(calculate_psnr(a, b, crop_border=crop, input_order='HWC')),
            float(calculate_ssim(a, b, crop_border=crop, input_order='HWC')))


# ------------------------------------------------------------------------------------ running
class Restorer:
    """Model + device + precision + tiling (+ x8 self-ensemble); ``restore(img)`` maps a float
    HxWxC image to the output."""

    def __init__(self, model, device: str, precision: str, tile: Optional[int], overlap: int, blend: str,
                 ensemble: bool = False):
        import torch
        self.torch = torch
        self.model = model.to(device)
        self.device = torch.device(device)
        self.dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)
        self.tile, self.overlap, self.blend = tile, overlap, blend
        self.ensemble = ensemble
        self.scale = int(model.upscale)

    def _fn(self, x):
        return self.model(x)

    def restore(self, img: np.ndarray) -> np.ndarray:
        import contextlib
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].to(self.device)
        autocast = (torch.autocast(device_type=self.device.type, dtype=self.dtype) if self.dtype is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            # x8: mean of the 8 outputs, each turned back to the input's orientation
            y = self_ensemble(self._tiled, x) if self.ensemble else self._tiled(x).float()
        return y[0].clamp_(0, 1).permute(1, 2, 0).cpu().numpy()

    def _tiled(self, x):
        from grl_plugin.tiling import tiled_forward
        return tiled_forward(self._fn, x, self.tile, self.overlap, scale=self.scale,
                             multiple=getattr(self.model, 'pad_size', 1), blend=self.blend)

    def sync(self) -> None:
        if self.device.type == 'cuda':
            self.torch.cuda.synchronize()


def _pick_device(name: str) -> str:
    import torch
    try:
        torch.device(name if name != 'auto' else 'cpu')
    except RuntimeError as err:
        raise InferError(f'--device {name}: {_one_line(err)}') from None
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise InferError(f'--device {name}: CUDA is not available on this machine (use --device cpu or auto)')
    return name


def _check_precision(precision: str, device: str) -> None:
    import torch
    if precision == 'fp16' and not device.startswith('cuda'):
        raise InferError('--precision fp16 needs a CUDA device; on CPU use bf16 or fp32')
    if precision == 'bf16' and device.startswith('cuda') and not torch.cuda.is_bf16_supported():
        raise InferError('--precision bf16: this GPU does not support bfloat16; use fp16 or fp32')


def model_input(path: Path, args, model_channels: int) -> Tuple[np.ndarray, Optional[np.ndarray], int, bool]:
    """(the image as the model sees it, alpha, bit depth, whether the output is gray) of ``path``."""
    import cv2
    img, alpha, bits = read_image(path)
    if args.bayer:
        from grl_plugin.data.demosaic_dataset import malvar_demosaic
        if img.shape[2] != 1:
            raise ValueError(f'--bayer expects a 1-channel mosaic, got {img.shape[2]} channels')
        img = malvar_demosaic(img[..., 0], args.bayer, clip=True).astype(np.float32)
    gray_out = img.shape[2] == 1
    if model_channels == 1 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None]
        gray_out = True
    elif model_channels == 3 and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif model_channels != img.shape[2]:
        raise ValueError(f'the model takes {model_channels} channels, the image has {img.shape[2]}')
    return img, alpha, bits, gray_out


def output_path(args, rel: Path) -> Path:
    return Path(args.output) / rel.parent / f'{rel.stem}{args.suffix}.png'


def write_png(dst: Path, img: np.ndarray) -> None:
    """``img`` (cv2 layout) as PNG at ``dst``, atomically (:func:`grl_plugin.cli.common.write_atomic`)."""
    import cv2
    ok, buf = cv2.imencode('.png', img)
    if not ok:
        raise OSError(f'could not encode {dst} as PNG')
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dst, buf.tobytes())


def _existing_output(dst: Path, src: np.ndarray, scale: int, gray_out: bool) -> Optional[np.ndarray]:
    """The output already at ``dst`` (float [0, 1], as written) if it is a readable image of the
    size this model gives ``src``; else None (with a warning when the file is there but unusable)."""
    if not dst.is_file():
        return None
    try:
        out, _, _ = read_image(dst)
    except ValueError as err:
        _warn(f'--skip-existing: {dst}: {_one_line(err)}; restoring it again')
        return None
    want = (src.shape[0] * scale, src.shape[1] * scale)
    if out.shape[:2] != want:
        _warn(f'--skip-existing: {dst} is {out.shape[1]}x{out.shape[0]}, this model gives {want[1]}x{want[0]}; '
              'restoring it again')
        return None
    if gray_out and out.shape[2] == 3:
        out = out[..., :1]  # a gray output with alpha is stored as equal B, G, R
    return out


def process_one(restorer: Restorer, path: Path, rel: Path, args, model_channels: int,
                skip_existing: bool = False) -> Tuple[dict, bool]:
    """Restore ``path``; write the output (and the comparison picture). Returns (CSV row, whether the
    model ran): with ``skip_existing``, a usable output already there is kept (and compared)."""
    import cv2
    img, alpha, bits, gray_out = model_input(path, args, model_channels)
    scale = restorer.scale
    dst = output_path(args, rel)
    row: Dict[str, Any] = {'name': rel.with_suffix('').as_posix(), 'seconds': ''}
    kept = _existing_output(dst, img, scale, gray_out) if skip_existing else None
    if kept is not None:
        if args.compare:
            _compare(row, img, kept, rel, scale, args)
        return row, False
    t0 = time.perf_counter()
    out = restorer.restore(img)
    restorer.sync()
    seconds = time.perf_counter() - t0
    if gray_out and out.shape[2] == 3:
        out = out.mean(axis=2, keepdims=True)
    q = quantize(out, bits)
    if alpha is not None and scale != 1:
        alpha = cv2.resize(alpha, (q.shape[1], q.shape[0]), interpolation=cv2.INTER_CUBIC)
    write_png(dst, to_file_layout(q, alpha))
    row['seconds'] = f'{seconds:.3f}'
    if args.compare:
        # the input as the model saw it (Malvar-interpolated, gray-converted or replicated)
        _compare(row, img, q.astype(np.float32) / (255.0 if bits == 8 else 65535.0), rel, scale, args)
    return row, True


def _compare(row: dict, src: np.ndarray, out: np.ndarray, rel: Path, scale: int, args) -> None:
    """Side-by-side picture input | output | GT, and the metrics in ``row`` when GT exists."""
    import cv2
    h, w = out.shape[:2]
    shown_in = src if scale == 1 else cv2.resize(src, (w, h), interpolation=cv2.INTER_NEAREST)
    if shown_in.ndim == 2:
        shown_in = shown_in[..., None]
    gt = None
    if args.gt:
        gt_path = find_gt(Path(args.gt), rel)
        if gt_path is None:
            _warn(f'no ground truth for {rel} in {args.gt}')
        else:
            try:
                gt, _, _ = read_image(gt_path)
            except ValueError as err:
                _warn(f'ground truth {gt_path}: {_one_line(err)}')
            if gt is not None:
                gh, gw = gt.shape[:2]
                if h <= gh < h + scale and w <= gw < w + scale:
                    gt = gt[:h, :w]  # modcrop-style: the input was cropped to a multiple of the scale
                if gt.shape[:2] != (h, w):
                    _warn(f'ground truth {gt_path} is {gw}x{gh}, the output is {w}x{h}: no metrics')
                    gt = None
    labels = ['input', 'GRL', 'ground truth']
    if gt is not None:
        gt = _match_channels(gt, out.shape[2])
        crop = scale if scale > 1 else 0
        row['psnr'], row['ssim'] = _metrics(out, gt, crop)
        base = src if scale == 1 else cv2.resize(src, (w, h), interpolation=cv2.INTER_CUBIC)
        base = _match_channels(base if base.ndim == 3 else base[..., None], out.shape[2])
        row['input_psnr'], row['input_ssim'] = _metrics(np.clip(base, 0, 1), gt, crop)
        labels[0] = (f'input (bicubic x{scale}: {row["input_psnr"]:.2f} dB)' if scale > 1 else
                     f'input {row["input_psnr"]:.2f} dB')
        labels[1] = f'GRL {row["psnr"]:.2f} dB'
        for key in ('psnr', 'ssim', 'input_psnr', 'input_ssim'):
            row[key] = f'{row[key]:.4f}' if 'ssim' in key else f'{row[key]:.3f}'
    elif scale > 1:
        labels[0] = f'input x{scale}'
    zoom = min(4, -(-256 // w)) if w < 256 else 1  # small images: enlarged (nearest) to read them
    shown = [shown_in, out] + ([gt] if gt is not None else [])
    panels = [_labelled(_display(img), label, zoom) for img, label in zip(shown, labels)]
    sep = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
    parts = [panels[0]]
    for p in panels[1:]:
        parts += [sep, p]
    write_png(Path(args.output) / 'compare' / rel.parent / f'{rel.stem}.png', np.concatenate(parts, axis=1))


def _warn(msg: str) -> None:
    from tqdm import tqdm
    tqdm.write(f'grl-infer: warning: {msg}', file=sys.stderr)


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog='grl-infer', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Restore an image or a folder of images with a GRL checkpoint (tiled, any size).',
        epilog='examples:\n'
        '  grl-infer --checkpoint sr_grl_tiny_c3x4 --input photos/ --output out/  (released model, by name)\n'
        '  grl-infer --list-models\n'
        '  grl-infer --checkpoint net_g.pth --task dn --size T --input noisy.png --output out/ --tile 256\n'
        '  grl-infer --checkpoint net_g.pth --opt options/test/sr/test_GRL_T_SRx2.yml --input lr/ \\\n'
        '      --output out/ --compare --gt hr/\n'
        '  grl-infer --checkpoint net_g.pth --task sr --input lr/ --output out/ --skip-existing  (go on after Ctrl-C)\n'
        '  grl-infer --checkpoint sr_grl_tiny_c3x4 --input lr/ --output out/ --ensemble  (x8 self-ensemble)')
    add_model_arguments(p)
    g = p.add_argument_group('images')
    g.add_argument('--input', required=True, metavar='IMG_OR_FOLDER', help='an image or a folder of images')
    g.add_argument('--output', required=True, metavar='DIR', help='folder for <stem><suffix>.png')
    g.add_argument('--recursive', action='store_true', help='also restore images in subfolders (layout mirrored)')
    g.add_argument('--suffix', default='_grl', help='output file name suffix (default _grl)')
    g.add_argument('--skip-existing', action='store_true',
                   help='keep outputs that are already there (a run stopped by Ctrl-C goes on where it ended); '
                        'their metrics.csv rows are computed again from the kept files')
    g.add_argument('--bayer', nargs='?', const='RGGB', choices=('RGGB', 'BGGR', 'GRBG', 'GBRG'), metavar='PATTERN',
                   help='inputs are 1-channel Bayer mosaics (default RGGB): Malvar-interpolate them first '
                        '(demosaicking models)')
    g = p.add_argument_group('running')
    g.add_argument('--tile', type=int, default=None,
                   help='tile side in input pixels, at least the model\'s padding multiple and rounded up to '
                        'a multiple of it; 0: whole image (default: val.tile of --opt, else 256)')
    g.add_argument('--overlap', type=int, default=None,
                   help='overlap of neighbouring tiles in input pixels, 0 to --tile - 1 (default 32)')
    g.add_argument('--blend', choices=('linear', 'uniform'), default=None,
                   help='linear ramps across overlaps (default) or plain average (official)')
    g.add_argument('--ensemble', action='store_true',
                   help='x8 self-ensemble: restore the 8 flips/rotations of each image, turn the outputs back '
                        'and average them (8 times slower)')
    g.add_argument('--device', default='auto', help='auto (CUDA when available), cpu, cuda or cuda:N')
    g.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default='fp32',
                   help='autocast precision (fp16: CUDA only)')
    g.add_argument('--quiet', action='store_true', help='no progress bar')
    g = p.add_argument_group('comparison')
    g.add_argument('--compare', action='store_true',
                   help='also write compare/<stem>.png (input | output | GT) and metrics.csv')
    g.add_argument('--gt', metavar='FOLDER', help='ground-truth images with the same stems (implies --compare)')
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse values that are wrong whatever the model, before anything is loaded or written.

    Raises :class:`InferError` (one line naming the option and the value).
    """
    if args.tile is not None and args.tile < 0:
        raise InferError(f'--tile {args.tile}: must be 0 (whole images) or a positive tile side in pixels')
    if args.overlap is not None and args.overlap < 0:
        raise InferError(f'--overlap {args.overlap}: must be 0 or more pixels')
    if args.tile and args.overlap is not None and args.overlap >= args.tile:
        raise InferError(f'--overlap {args.overlap}: must be smaller than --tile {args.tile}')
    if args.scale is not None and args.scale < 1:
        raise InferError(f'--scale {args.scale}: must be a positive integer (the super-resolution factor)')
    if any(c in args.suffix for c in ('/', '\\', os.sep, '\0')):
        raise InferError(f'--suffix {args.suffix!r}: must be part of a file name (no folder separators)')
    src, out = Path(args.input), Path(args.output)
    if not src.exists():
        raise InferError(f'--input {src}: no such file or folder')
    if src.is_file():
        if src.suffix.lower() not in IMAGE_EXTS:
            raise InferError(f'--input {src}: not an image file name ({", ".join(IMAGE_EXTS)})')
    elif not src.is_dir():
        raise InferError(f'--input {src}: not a file or a folder')
    if out.exists() and not out.is_dir():
        raise InferError(f'--output {out}: is a file, not a folder')
    for parent in out.absolute().parents:  # the nearest existing folder above it
        if parent.exists():
            if not parent.is_dir():
                raise InferError(f'--output {out}: {parent} is a file, not a folder')
            break
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise InferError(f'--output {out}: folder is not writable')
    if src.is_dir():
        if out.resolve() == src.resolve():
            raise InferError(f'--output {out} is the --input folder: a rerun would restore the restored images; '
                             'choose another folder')
        if args.recursive and src.resolve() in out.resolve().parents:
            raise InferError(f'--output {out} is inside the --input folder {src} and --recursive would restore '
                             'the restored images on a rerun; choose a folder outside it')
    if args.gt:
        gt = Path(args.gt)
        if not gt.exists():
            raise InferError(f'--gt {gt}: no such folder')
        if not gt.is_dir():
            raise InferError(f'--gt {gt}: not a folder')
        if gt.resolve() == out.resolve():
            raise InferError(f'--output {out} is the --gt folder: outputs could replace ground-truth images; '
                             'choose another folder')


def _tile_settings(args, opt: dict, pad: int = 1) -> Tuple[Optional[int], int, str]:
    """(tile or None for whole images, overlap, blend) from the options, else ``val.tile`` of --opt,
    else 256 / 32 / linear. A --tile below the model's padding multiple ``pad`` is refused."""
    tile_opt = (opt.get('val') or {}).get('tile') if isinstance(opt.get('val'), dict) else None
    if isinstance(tile_opt, int):
        tile_opt = {'size': tile_opt}
    tile_opt = tile_opt if isinstance(tile_opt, dict) else {}
    where = f'val.tile of --opt {args.opt}'
    tile_src = '--tile' if args.tile is not None else (f'{where}: size' if 'size' in tile_opt else 'default tile')
    overlap_src = '--overlap' if args.overlap is not None else (f'{where}: overlap' if 'overlap' in tile_opt
                                                                else 'default overlap')
    tile = args.tile if args.tile is not None else tile_opt.get('size', 256)
    overlap = args.overlap if args.overlap is not None else tile_opt.get('overlap', 32)
    blend = args.blend or tile_opt.get('blend', 'linear')
    if not isinstance(tile, int) or tile < 0:
        raise InferError(f'{tile_src} {tile}: must be 0 (whole images) or a positive tile side in pixels')
    if not tile:
        return None, 0, blend
    if args.tile is not None and tile < pad:
        raise InferError(f"--tile {tile}: smaller than the model's padding multiple {pad} (tiles are rounded up "
                         f'to it); use 0 for whole images or a tile of at least {pad}')
    if not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise InferError(f'{overlap_src} {overlap}: must be in [0, {tile_src} {tile})')
    return tile, overlap, blend


def _read_seconds(path: Path) -> Dict[str, str]:
    """name -> seconds of the rows of an earlier metrics.csv (for the outputs --skip-existing keeps)."""
    try:
        with open(path, newline='', encoding='utf-8') as f:
            return {r['name']: r.get('seconds') or '' for r in csv.DictReader(f) if r.get('name')}
    except (OSError, ValueError, csv.Error, KeyError):
        return {}


class MetricsWriter:
    """``metrics.csv``: the header at once, then each row as the image finishes, appended in one
    ``write`` of a whole line (an interrupt leaves complete rows only)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = -1
        write_atomic(path, self._line(None))
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, 'O_BINARY', 0))

    @staticmethod
    def _line(row: Optional[dict]) -> bytes:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, restval='')
        if row is None:
            writer.writeheader()
        else:
            writer.writerow(row)
        return buf.getvalue().encode('utf-8')

    def add(self, row: dict) -> None:
        data = memoryview(self._line(row))
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    args.compare = args.compare or bool(args.gt)
    check_arguments(args)
    files = list_inputs(Path(args.input), args.recursive)
    targets: Dict[Path, Path] = {}
    for path, rel in files:
        dst = rel.parent / f'{rel.stem}{args.suffix}.png'
        if dst in targets:
            raise InferError(f'{targets[dst]} and {path} would both be written to {dst}; rename one or use '
                             'separate runs')
        if (Path(args.output) / dst).resolve() == path.resolve():
            raise InferError(f'{path} would be overwritten; choose another --output or --suffix')
        targets[dst] = path
    device = _pick_device(args.device)
    _check_precision(args.precision, device)
    model, kwargs, opt = load_model(args, 'grl-infer')
    if model.in_channels not in (1, 3):
        raise InferError(f'the model takes {model.in_channels} input channels; grl-infer handles 1- and '
                         '3-channel models (dual-pixel models need both views: use grl-test)')
    tile, overlap, blend = _tile_settings(args, opt, model.pad_size)
    try:
        restorer = Restorer(model, device, args.precision, tile, overlap, blend, ensemble=args.ensemble)
    except RuntimeError as err:  # e.g. cuda:7 on a one-GPU machine, or an unknown device name
        raise InferError(f'--device {args.device}: {_one_line(err)}') from None
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f'grl-infer: GRL x{model.upscale} ({model.in_channels} channels, window {model.window_size}, '
          f'stripes {model.stripe_size}, padding multiple {model.pad_size}) on {device} {args.precision}, '
          + (f'tiles {-(-tile // model.pad_size) * model.pad_size} overlap {overlap} {blend}' if tile
             else 'whole images') + (', x8 self-ensemble' if args.ensemble else ''), file=sys.stderr)
    earlier = _read_seconds(out_dir / 'metrics.csv') if args.compare and args.skip_existing else {}
    metrics = MetricsWriter(out_dir / 'metrics.csv') if args.compare else None
    rows, failed, restored = [], [], 0
    t0 = time.perf_counter()
    try:
        with tqdm(files, desc='grl-infer', unit='img', file=sys.stderr, disable=args.quiet,
                  dynamic_ncols=True) as bar:
            for path, rel in bar:
                try:
                    row, ran = process_one(restorer, path, rel, args, model.in_channels, args.skip_existing)
                except (ValueError, OSError, RuntimeError) as err:  # this image only (corrupt, unsupported, OOM)
                    failed.append(path)
                    _warn(f'skipped {path}: {_one_line(err)}')
                    continue
                restored += ran
                if not ran:
                    row['seconds'] = earlier.get(row['name'], '')
                rows.append(row)
                if metrics is not None:
                    metrics.add(row)
    except KeyboardInterrupt:
        done = len(rows) + len(failed)
        raise Interrupted(f'after {done} of {len(files)} image(s) ({len(rows)} in {args.output}); '
                          'rerun with --skip-existing to go on') from None
    finally:
        if metrics is not None:
            metrics.close()
    kept = len(rows) - restored
    print(f'grl-infer: restored {restored} of {len(files)} image(s) into {args.output} '
          f'in {time.perf_counter() - t0:.1f}s' + (f' ({kept} already there, kept)' if kept else ''),
          file=sys.stderr)
    scored = [r for r in rows if r.get('psnr') not in (None, '')]
    if scored:
        mean = {k: float(np.mean([float(r[k]) for r in scored])) for k in ('psnr', 'ssim', 'input_psnr', 'input_ssim')}
        print(f'grl-infer: mean over {len(scored)} image(s) with ground truth: PSNR {mean["psnr"]:.2f} dB '
              f'(input {mean["input_psnr"]:.2f} dB), SSIM {mean["ssim"]:.4f} (input {mean["input_ssim"]:.4f})',
              file=sys.stderr)
    if failed:
        print(f'grl-infer: {len(failed)} image(s) could not be restored: {", ".join(map(str, failed))}',
              file=sys.stderr)
        return 1
    return 0


def _os_error(err: OSError) -> str:
    """``<file>: <reason>`` of an OSError (instead of ``[Errno N] ...``)."""
    if err.strerror and err.filename is not None:
        return f'{err.filename}: {err.strerror}'
    return err.strerror or _one_line(err)


@exits_on_interrupt('grl-infer')
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InferError as err:
        print(f'grl-infer: error: {_one_line(err)}', file=sys.stderr)
        return 2
    except OSError as err:
        print(f'grl-infer: error: {" ".join(_os_error(err).split())}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
