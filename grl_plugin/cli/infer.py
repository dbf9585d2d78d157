"""grl-infer: restore images (one file or a folder) with a GRL checkpoint.

The network is built from what the checkpoint stores (:func:`grl_plugin.load_checkpoint`; a
released model can be given by name, :mod:`grl_plugin.cli.zoo`, and is downloaded once),
completed or overridden by ``--task``/``--size``/``--scale``/``--gray`` (the official task table,
:func:`grl_plugin.archs.tasks.task_kwargs`) or by the ``network_g`` of a BasicSR option file
(``--opt``; ``type: GRL`` or a preset such as ``GRL_T``). Shape-determined kwargs (channels,
depths, heads, head type) always come from the weights; window/stripe geometry comes from
``--opt``/``--task`` when given, else from the checkpoint.

Images are restored tile by tile (:func:`grl_plugin.tiling.tiled_forward`, tiles rounded up to
the model's padding multiple, overlapping tiles blended) and written as ``<stem><suffix>.png``:
8-bit inputs give 8-bit PNGs, 16-bit PNG/TIFF inputs give 16-bit PNGs. Gray images go through a
3-channel model replicated and come back gray; an alpha channel is kept (resized bicubically for
super-resolution). Denoising, JPEG and deblurring models take the degraded image as it is;
demosaicking models take the 3-channel Malvar-interpolated image (``--bayer`` makes it from a
1-channel mosaic). Unreadable images are reported and skipped (exit status 1); every other
error is one line ``grl-infer: error: ...`` with exit status 2.

``grl_plugin.cli.export`` (grl-export) reuses :func:`add_model_arguments` / :func:`load_model`.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

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
    """``--checkpoint``, ``--list-models``, ``--task``/``--size``/``--scale``/``--gray``, ``--opt``, ``--trust``."""
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


def resolve_kwargs(ckpt_kwargs: Any, given: Optional[dict], source: str, explicit: Sequence[str] = (),
                   ckpt: str = 'checkpoint') -> Tuple[dict, List[str]]:
    """Checkpoint kwargs completed/overridden by ``given`` (from ``source``): returns (kwargs, notes).

    Values the weights determine win (a note when an ``explicit`` key disagrees); everything else
    from ``given`` wins over the checkpoint's stored config. Raises :class:`InferError` naming
    what is still missing.
    """
    origin = getattr(ckpt_kwargs, 'origin', {})
    kwargs, notes = dict(ckpt_kwargs), []
    for key, value in (given or {}).items():
        if origin.get(key) == 'weights':
            if key in explicit and not _same(value, kwargs[key]):
                notes.append(f'{source} says {key}={value!r} but the weights need {kwargs[key]!r}; using the weights')
            continue
        if key in kwargs and origin.get(key) in ('config', 'metadata', 'sidecar', 'buffers') \
                and not _same(value, kwargs[key]):
            notes.append(f'using {key}={value!r} from {source} (the checkpoint stores {kwargs[key]!r})')
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

    if args.task is None and (args.size or args.scale or args.gray):
        raise InferError('--size, --scale and --gray go with --task')
    opt: dict = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            sd, ckpt_kwargs, ckpt = open_checkpoint(args.checkpoint, trust=args.trust,
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
    kwargs, notes = resolve_kwargs(ckpt_kwargs, given, source, explicit, ckpt=ckpt)
    for note in notes:
        print(f'{prog}: note: {note}', file=sys.stderr)
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
    """Model + device + precision + tiling; ``restore(img)`` maps a float HxWxC image to the output."""

    def __init__(self, model, device: str, precision: str, tile: Optional[int], overlap: int, blend: str):
        import torch
        self.torch = torch
        self.model = model.to(device)
        self.device = torch.device(device)
        self.dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)
        self.tile, self.overlap, self.blend = tile, overlap, blend
        self.scale = int(model.upscale)

    def _fn(self, x):
        return self.model(x)

    def restore(self, img: np.ndarray) -> np.ndarray:
        import contextlib

        from grl_plugin.tiling import tiled_forward
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].to(self.device)
        autocast = (torch.autocast(device_type=self.device.type, dtype=self.dtype) if self.dtype is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            y = tiled_forward(self._fn, x, self.tile, self.overlap, scale=self.scale,
                              multiple=self.model.pad_size, blend=self.blend)
        return y[0].float().clamp_(0, 1).permute(1, 2, 0).cpu().numpy()

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


def process_one(restorer: Restorer, path: Path, rel: Path, args, model_channels: int) -> dict:
    """Restore ``path``; write the output (and the comparison picture). Returns a CSV row."""
    import cv2
    img, alpha, bits = read_image(path)
    scale = restorer.scale
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
    t0 = time.perf_counter()
    out = restorer.restore(img)
    restorer.sync()
    seconds = time.perf_counter() - t0
    if gray_out and out.shape[2] == 3:
        out = out.mean(axis=2, keepdims=True)
    q = quantize(out, bits)
    if alpha is not None and scale != 1:
        alpha = cv2.resize(alpha, (q.shape[1], q.shape[0]), interpolation=cv2.INTER_CUBIC)
    dst = Path(args.output) / rel.parent / f'{rel.stem}{args.suffix}.png'
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(dst), to_file_layout(q, alpha)):
        raise OSError(f'could not write {dst}')
    row: Dict[str, Any] = {'name': rel.with_suffix('').as_posix(), 'seconds': f'{seconds:.3f}'}
    if args.compare:
        # the input as the model saw it (Malvar-interpolated, gray-converted or replicated)
        _compare(row, img, q.astype(np.float32) / (255.0 if bits == 8 else 65535.0), rel, scale, args)
    return row


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
    dst = Path(args.output) / 'compare' / rel.parent / f'{rel.stem}.png'
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(dst), np.concatenate(parts, axis=1)):
        raise OSError(f'could not write {dst}')


def _warn(msg: str) -> None:
    from tqdm import tqdm
    tqdm.write(f'grl-infer: warning: {msg}', file=sys.stderr)


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='grl-infer', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Restore an image or a folder of images with a GRL checkpoint (tiled, any size).',
        epilog='examples:\n'
        '  grl-infer --checkpoint sr_grl_tiny_c3x4 --input photos/ --output out/  (released model, by name)\n'
        '  grl-infer --list-models\n'
        '  grl-infer --checkpoint net_g.pth --task dn --size T --input noisy.png --output out/ --tile 256\n'
        '  grl-infer --checkpoint net_g.pth --opt options/test/sr/test_GRL_T_SRx2.yml --input lr/ \\\n'
        '      --output out/ --compare --gt hr/')
    add_model_arguments(p)
    g = p.add_argument_group('images')
    g.add_argument('--input', required=True, metavar='IMG_OR_FOLDER', help='an image or a folder of images')
    g.add_argument('--output', required=True, metavar='DIR', help='folder for <stem><suffix>.png')
    g.add_argument('--recursive', action='store_true', help='also restore images in subfolders (layout mirrored)')
    g.add_argument('--suffix', default='_grl', help='output file name suffix (default _grl)')
    g.add_argument('--bayer', nargs='?', const='RGGB', choices=('RGGB', 'BGGR', 'GRBG', 'GBRG'), metavar='PATTERN',
                   help='inputs are 1-channel Bayer mosaics (default RGGB): Malvar-interpolate them first '
                        '(demosaicking models)')
    g = p.add_argument_group('running')
    g.add_argument('--tile', type=int, default=None,
                   help='tile side in input pixels, rounded up to the padding multiple; 0: whole image '
                        '(default: val.tile of --opt, else 256)')
    g.add_argument('--overlap', type=int, default=None, help='overlap of neighbouring tiles (default 32)')
    g.add_argument('--blend', choices=('linear', 'uniform'), default=None,
                   help='linear ramps across overlaps (default) or plain average (official)')
    g.add_argument('--device', default='auto', help='auto (CUDA when available), cpu, cuda or cuda:N')
    g.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default='fp32',
                   help='autocast precision (fp16: CUDA only)')
    g.add_argument('--quiet', action='store_true', help='no progress bar')
    g = p.add_argument_group('comparison')
    g.add_argument('--compare', action='store_true',
                   help='also write compare/<stem>.png (input | output | GT) and metrics.csv')
    g.add_argument('--gt', metavar='FOLDER', help='ground-truth images with the same stems (implies --compare)')
    return p


def _tile_settings(args, opt: dict) -> Tuple[Optional[int], int, str]:
    tile_opt = (opt.get('val') or {}).get('tile') if isinstance(opt.get('val'), dict) else None
    if isinstance(tile_opt, int):
        tile_opt = {'size': tile_opt}
    tile_opt = tile_opt if isinstance(tile_opt, dict) else {}
    tile = args.tile if args.tile is not None else tile_opt.get('size', 256)
    overlap = args.overlap if args.overlap is not None else tile_opt.get('overlap', 32)
    blend = args.blend or tile_opt.get('blend', 'linear')
    if tile and tile > 0:
        if overlap < 0 or overlap >= tile:
            raise InferError(f'--overlap {overlap} must be in [0, --tile {tile})')
    else:
        tile, overlap = None, 0
    return tile, overlap, blend


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    args.compare = args.compare or bool(args.gt)
    if args.gt and not Path(args.gt).is_dir():
        raise InferError(f'--gt {args.gt}: no such folder')
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
    tile, overlap, blend = _tile_settings(args, opt)
    try:
        restorer = Restorer(model, device, args.precision, tile, overlap, blend)
    except RuntimeError as err:  # e.g. cuda:7 on a one-GPU machine, or an unknown device name
        raise InferError(f'--device {args.device}: {_one_line(err)}') from None
    Path(args.output).mkdir(parents=True, exist_ok=True)
    print(f'grl-infer: GRL x{model.upscale} ({model.in_channels} channels, window {model.window_size}, '
          f'stripes {model.stripe_size}, padding multiple {model.pad_size}) on {device} {args.precision}, '
          + (f'tiles {-(-tile // model.pad_size) * model.pad_size} overlap {overlap} {blend}' if tile
             else 'whole images'), file=sys.stderr)
    rows, failed = [], []
    t0 = time.perf_counter()
    for path, rel in tqdm(files, desc='grl-infer', unit='img', file=sys.stderr, disable=args.quiet,
                          dynamic_ncols=True):
        try:
            rows.append(process_one(restorer, path, rel, args, model.in_channels))
        except (ValueError, OSError, RuntimeError) as err:  # this image only (corrupt, unsupported, OOM)
            failed.append(path)
            _warn(f'skipped {path}: {_one_line(err)}')
    if args.compare:
        with open(Path(args.output) / 'metrics.csv', 'w', newline='', encoding='utf-8') as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval='')
            writer.writeheader()
            writer.writerows(rows)
    print(f'grl-infer: restored {len(rows)} of {len(files)} image(s) into {args.output} '
          f'in {time.perf_counter() - t0:.1f}s', file=sys.stderr)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (InferError, OSError) as err:
        print(f'grl-infer: error: {_one_line(err)}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
