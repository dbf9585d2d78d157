"""grl-prepare: turn a folder of your own images into BasicSR LMDBs and ready GRL option files.

Usage::

    grl-prepare --input FOLDER [--lq FOLDER] --task {sr,dn,jpeg,dm,db_motion,db_defocus}
                --size {T,S,B} --out DIR [--scale 2|3|4] [--sigma 25] [--quality 40] [--gray]
                [--val-fraction 0.1 | --val-count N] [--crop-size C --step S --thresh-size 0]
                [--pretrained CKPT] [--iters N] [--batch-size N] [--name NAME] [--seed 0]
                [--keep-subimages]

What it does, in order:

1. **Scan** ``--input`` (and ``--lq``; subfolders too, hidden files ignored). Every file is
   decoded; files with an unknown extension, empty, unreadable or undecodable files are listed
   in a warning block and skipped (never used). 16-bit images are converted to 8 bits (warning:
   BasicSR LMDBs hold 8-bit PNGs); gray images become 3-channel for color tasks and color images
   gray for ``--gray`` (a note); an alpha channel is dropped (a note). With ``--lq`` (required
   for ``db_motion``/``db_defocus``, optional for ``sr``) inputs are matched to ``--input``
   images by their path without extension; unmatched or mis-sized pairs are skipped (warning).
2. **Split** the usable images into training and validation images (``--val-fraction`` or
   ``--val-count``), deterministically for a ``--seed``; validation images are never trained on.
3. **Cut** training images into overlapping sub-images like BasicSR's
   ``scripts/data_preparation/extract_subimages.py`` (``--crop-size``, ``--step``,
   ``--thresh-size``). For ``sr`` the HR image is first cropped to a multiple of the scale
   (``basicsr.data.transforms.mod_crop``) and the LR image is its MATLAB-bicubic reduction
   (``basicsr.utils.matlab_functions.imresize``, unless ``--lq`` gives real LR images); LR
   sub-images are cut at the same places (offsets / scale). Validation images stay whole.
4. **Write** LMDBs with ``basicsr.utils.lmdb_util.make_lmdb_from_imgs`` (``meta_info.txt``
   inside): ``DIR/train_gt.lmdb`` (+ ``train_lq.lmdb`` for sr / paired tasks),
   ``DIR/val_gt.lmdb`` (+ ``val_lq.lmdb``), and the validation images as PNGs in
   ``DIR/val/gt/`` (+ ``DIR/val/lq/``). LMDB keys are the file paths with every character other
   than letters, digits and ``-`` replaced by ``-`` (sub-images: ``<key>_s001``...).
5. **Options**: ``DIR/train_<name>.yml`` (GRLModel, ``type: GRL`` with the task's official
   kwargs, the task's dataset, AdamW, MultiStepLR, validation on ``val_*.lmdb`` with PSNR/SSIM,
   fine-tuning ``--pretrained`` when given) and ``DIR/test_<name>.yml`` (grl-test on the
   validation images with ``experiments/<name>/models/net_g_latest.pth``), then the commands to
   run next.

The training patch (``gt_size``) is the crop size, which must be a multiple of the network's
padding size (times the scale for sr): by default the smallest such multiple >= 256. Re-running
with the same arguments rebuilds the same files (LMDB folders are replaced). Errors are one line
``grl-prepare: error: ...`` with exit status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import os.path as osp
import random
import re
import shlex
import shutil
import sys
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from grl_plugin.cli.common import exits_on_interrupt

PROG = 'grl-prepare'
TASKS = ('sr', 'dn', 'jpeg', 'dm', 'db_motion', 'db_defocus')
PAIRED_TASKS = ('db_motion', 'db_defocus')  # --lq required
GRAY_TASKS = ('dn', 'jpeg')
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm', '.pnm')
TASK_TITLES = {'sr': 'classical super-resolution', 'dn': 'Gaussian denoising', 'jpeg': 'JPEG artefact removal',
               'dm': 'RGGB demosaicking', 'db_motion': 'motion deblurring',
               'db_defocus': 'single-image defocus deblurring'}
DEFAULT_CROP = 256          # default crop size: the smallest valid one >= this
MIN_SIDE = 16               # smaller images (LR side for sr) are skipped: SSIM needs 11x11
PNG_LEVEL = 1               # PNG compression inside the LMDBs (BasicSR's default)
#: (scratch, fine-tune) learning rates per task (fine-tune: the options/train/*/finetune_* files).
LR = {'sr': (2e-4, 2e-5), 'dn': (2e-4, 2e-5), 'jpeg': (2e-4, 2e-5), 'dm': (2e-4, 4e-5),
      'db_motion': (1e-4, 5e-6), 'db_defocus': (1e-4, 1e-5)}
DEFAULT_ITERS = (200000, 20000)   # (scratch, fine-tune)
DEFAULT_BATCH = {'T': 8, 'S': 4, 'B': 2}
MAX_LISTED = 20             # names listed per note kind (warnings list every file)
#: Paths under --out that grl-prepare owns (replaced on every run).
OWNED = ('train_gt.lmdb', 'train_lq.lmdb', 'val_gt.lmdb', 'val_lq.lmdb', 'val', 'train_sub')


class PrepareError(Exception):
    """A one-line error that ends the command (exit status 2)."""


class _Unusable(Exception):
    """A file that cannot be used (the reason is the message)."""


def _one_line(err: BaseException) -> str:
    return ' '.join(str(err).split()) or type(err).__name__


# ------------------------------------------------------------------------------ arguments
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message + SystemExit
        raise PrepareError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                description='Prepare your own images for GRL training with BasicSR: split train/val, cut\n'
                            'sub-images, write LMDBs and ready option files (train + test).',
                epilog='example:\n  grl-prepare --input my_photos/ --task dn --sigma 25 --size T --out datasets/my_dn '
                       '\\\n      --pretrained experiments/pretrained_models/dn_grl_tiny_c3s25.ckpt\n'
                       'then run the grl-train / grl-test / grl-infer commands it prints.')
    g = p.add_argument_group('data')
    g.add_argument('--input', required=True, metavar='FOLDER',
                   help='your images (ground truth / sharp / HR), subfolders included')
    g.add_argument('--lq', metavar='FOLDER',
                   help='degraded inputs with the same file names (required for db_motion / db_defocus; '
                        'optional for sr: real LR images instead of bicubic ones)')
    g.add_argument('--out', required=True, metavar='DIR', help='output folder (LMDBs, option files)')
    g = p.add_argument_group('task and model')
    g.add_argument('--task', required=True, choices=TASKS, help='restoration task (official settings)')
    g.add_argument('--size', required=True, type=str.upper, choices=('T', 'S', 'B'),
                   help='GRL model size: T(iny), S(mall), B(ase)')
    g.add_argument('--scale', type=int, metavar='N', help='sr: upscaling factor 2, 3 or 4 (default 4)')
    g.add_argument('--sigma', type=float, metavar='SIGMA', help='dn: noise level on the 0-255 scale (default 25)')
    g.add_argument('--quality', type=int, metavar='Q', help='jpeg: JPEG quality 1-100 (default 40)')
    g.add_argument('--gray', action='store_true', help='dn / jpeg: grayscale (1-channel) model')
    g = p.add_argument_group('split and sub-images')
    v = g.add_mutually_exclusive_group()
    v.add_argument('--val-fraction', type=float, metavar='F',
                   help='share of the images held out for validation (default 0.1)')
    v.add_argument('--val-count', type=int, metavar='N', help='number of images held out for validation')
    g.add_argument('--crop-size', type=int, metavar='C',
                   help='sub-image (and training patch) side in HR pixels; a multiple of the padding size '
                        '(x scale for sr); default: the smallest such multiple >= 256')
    g.add_argument('--step', type=int, metavar='S', help='stride between sub-images (default: crop size / 2)')
    g.add_argument('--thresh-size', type=int, metavar='T', default=0,
                   help='keep a last sub-image flush with the border when more than this many pixels '
                        'would be left out (default 0, as BasicSR)')
    g.add_argument('--seed', type=int, metavar='N', default=0,
                   help='seed of the train/val split and of training (default 0)')
    g.add_argument('--keep-subimages', action='store_true',
                   help='keep the training sub-images as PNGs in DIR/train_sub/ (deleted by default)')
    g = p.add_argument_group('training options')
    g.add_argument('--pretrained', metavar='CKPT',
                   help='weights to fine-tune (official .ckpt, BasicSR .pth or .safetensors); '
                        'without it the option file trains from scratch')
    g.add_argument('--iters', type=int, metavar='N',
                   help='total iterations (default 20000 fine-tuning, 200000 from scratch)')
    g.add_argument('--batch-size', type=int, metavar='N', help='patches per GPU and iteration (default 8 T, 4 S, 2 B)')
    g.add_argument('--name', help='run name: option files train_<name>.yml / test_<name>.yml, '
                                  'experiments/<name>/ (default: the name of --out)')
    return p


def _slug(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9_-]+', '_', text).strip('_')


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and check the command line; raises :class:`PrepareError` (one line)."""
    args = build_parser().parse_args(list(argv))
    task = args.task
    for flag, value, tasks in (('--scale', args.scale, ('sr',)), ('--sigma', args.sigma, ('dn',)),
                               ('--quality', args.quality, ('jpeg',))):
        if value is not None and task not in tasks:
            raise PrepareError(f'{flag} applies to --task {"/".join(tasks)} only, not {task}')
    if args.gray and task not in GRAY_TASKS:
        raise PrepareError(f'--gray applies to --task dn / jpeg only, not {task}')
    if task == 'sr':
        args.scale = 4 if args.scale is None else args.scale
        if args.scale not in (2, 3, 4):
            raise PrepareError(f'--scale must be 2, 3 or 4 for sr (official models), got {args.scale}')
    else:
        args.scale = 1
    if task == 'dn':
        args.sigma = 25.0 if args.sigma is None else args.sigma
        if not 0 < args.sigma <= 255:
            raise PrepareError(f'--sigma must be in (0, 255], got {args.sigma:g}')
        if args.sigma == int(args.sigma):
            args.sigma = int(args.sigma)
    if task == 'jpeg':
        args.quality = 40 if args.quality is None else args.quality
        if not 1 <= args.quality <= 100:
            raise PrepareError(f'--quality must be in 1..100, got {args.quality}')
    if task in PAIRED_TASKS and not args.lq:
        raise PrepareError(f'--task {task} needs --lq FOLDER: the blurry inputs, same file names as --input')
    if args.lq and task not in PAIRED_TASKS + ('sr',):
        raise PrepareError(f'--lq is for sr / db_motion / db_defocus; {task} makes its degraded inputs on the fly')
    if args.val_count is None and args.val_fraction is None:
        args.val_fraction = 0.1
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise PrepareError(f'--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction:g}')
    if args.val_count is not None and args.val_count < 1:
        raise PrepareError(f'--val-count must be at least 1, got {args.val_count}')
    for flag, value in (('--crop-size', args.crop_size), ('--step', args.step), ('--iters', args.iters),
                        ('--batch-size', args.batch_size)):
        if value is not None and value < 1:
            raise PrepareError(f'{flag} must be a positive integer, got {value}')
    if args.thresh_size < 0:
        raise PrepareError(f'--thresh-size must be >= 0, got {args.thresh_size}')
    # folders
    for flag, folder in (('--input', args.input), ('--lq', args.lq)):
        if folder is None:
            continue
        if not osp.exists(folder):
            raise PrepareError(f'{flag} folder not found: {folder}')
        if not osp.isdir(folder):
            raise PrepareError(f'{flag} {folder} is not a folder')
    if osp.exists(args.out) and not osp.isdir(args.out):
        raise PrepareError(f'--out {args.out} exists and is not a folder')
    out = osp.realpath(args.out)
    for flag, folder in (('--input', args.input), ('--lq', args.lq)):
        if folder is None:
            continue
        src = osp.realpath(folder)
        if _inside(out, src):
            raise PrepareError(f'--out {args.out} must not be inside {flag} {folder} (it is scanned for images)')
        for owned in OWNED:
            if _inside(src, osp.join(out, owned)):
                raise PrepareError(f'{flag} {folder} is inside {osp.join(args.out, owned)}, which grl-prepare '
                                   'replaces: choose another --out')
    if args.lq and (_inside(osp.realpath(args.lq), osp.realpath(args.input))
                    or _inside(osp.realpath(args.input), osp.realpath(args.lq))):
        raise PrepareError('--input and --lq must be separate folders (neither inside the other)')
    if args.pretrained is not None:
        if not osp.isfile(args.pretrained):
            raise PrepareError(f'--pretrained file not found: {args.pretrained}')
    # name
    if args.name is None:
        args.name = _slug(osp.basename(osp.normpath(osp.abspath(args.out))))
        if not args.name:
            raise PrepareError(f'cannot make a run name from --out {args.out}: give --name')
    if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_.-]*', args.name):
        raise PrepareError(f'--name {args.name!r}: use letters, digits, "_", "-" and "." only')
    if 'debug' in args.name:
        raise PrepareError(f'--name {args.name!r}: BasicSR switches to debug mode for names containing "debug"; '
                           'choose another --name')
    return args


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or inside it (both real paths)."""
    try:
        return osp.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


# ------------------------------------------------------------------------------- geometry
def geometry(args: argparse.Namespace) -> Dict[str, Any]:
    """Network kwargs, padding size, crop size / step / training patch and validation tile."""
    from grl_plugin.archs.tasks import task_kwargs
    from grl_plugin.layers.geometry import pad_multiple

    kwargs = task_kwargs(args.task, args.size, scale=args.scale, color=not args.gray)
    kwargs.pop('img_size', None)  # accepted and ignored by GRL
    kwargs.setdefault('drop_path_rate', 0.1)
    pad = pad_multiple(kwargs['window_size'], kwargs['stripe_size'], kwargs['stripe_groups'],
                       kwargs['anchor_window_down_factor'])
    unit = pad * args.scale
    what = (f'the padding size {pad} of GRL-{args.size} for {args.task} x scale {args.scale}' if args.scale > 1
            else f'the padding size of GRL-{args.size} for {args.task}')
    if args.crop_size is None:
        crop = unit * max(1, math.ceil(DEFAULT_CROP / unit))
    else:
        crop = args.crop_size
        if crop % unit:
            low, high = (crop // unit) * unit, (crop // unit + 1) * unit
            choices = f'{low} or {high}' if low else f'{high}'
            raise PrepareError(f'--crop-size {crop} is not a multiple of {unit} ({what}; window '
                               f'{kwargs["window_size"]}, stripes {kwargs["stripe_size"]}): use {choices}')
    step = args.step if args.step is not None else crop // 2
    if step % args.scale:
        raise PrepareError(f'--step {step} must be a multiple of the scale {args.scale} (LR sub-images are cut '
                           'at offset / scale)')
    tile = pad * max(1, math.ceil(256 / pad))  # validation tile, input (LQ) pixels
    return dict(kwargs=kwargs, pad=pad, unit=unit, crop=crop, step=step, thresh=args.thresh_size,
                gt_size=crop, tile=tile, overlap=min(32, tile // 4))


def subimage_positions(length: int, crop_size: int, step: int, thresh_size: int = 0) -> List[int]:
    """Offsets along one axis as BasicSR's ``extract_subimages`` computes them (a last crop flush
    with the border when more than ``thresh_size`` pixels would be left out); [] if too short."""
    if length < crop_size:
        return []
    space = list(range(0, length - crop_size + 1, step))
    if length - (space[-1] + crop_size) > thresh_size:
        space.append(length - crop_size)
    return space


# ---------------------------------------------------------------------------------- report
class Report:
    """Skipped files (warnings, every name listed), other warnings and notes (grouped)."""

    def __init__(self):
        self.skipped: List[Tuple[str, str]] = []
        self.warnings: Dict[str, List[str]] = OrderedDict()
        self.notes: Dict[str, List[str]] = OrderedDict()

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append((name, reason))

    def warn(self, kind: str, name: str) -> None:
        self.warnings.setdefault(kind, []).append(name)

    def note(self, kind: str, name: str) -> None:
        self.notes.setdefault(kind, []).append(name)

    def merge(self, other: 'Report') -> None:
        for name, reason in other.skipped:
            self.skip(name, reason)
        for kind, names in other.warnings.items():
            for name in names:
                self.warn(kind, name)
        for kind, names in other.notes.items():
            for name in names:
                self.note(kind, name)

    def print(self, file=None) -> None:
        file = file or sys.stderr
        if self.skipped:
            print(f'{PROG}: warning: {len(self.skipped)} file(s) skipped, not used:', file=file)
            for name, reason in self.skipped:
                print(f'  {name}: {reason}', file=file)
        for kind, names in self.warnings.items():
            print(f'{PROG}: warning: {kind}:', file=file)
            for name in names:
                print(f'  {name}', file=file)
        for kind, names in self.notes.items():
            listed = ', '.join(names[:MAX_LISTED]) + (f' and {len(names) - MAX_LISTED} more'
                                                      if len(names) > MAX_LISTED else '')
            print(f'{PROG}: note: {kind} ({len(names)}): {listed}', file=file)


# ----------------------------------------------------------------------------------- images
def list_files(folder: str) -> List[str]:
    """Paths relative to ``folder`` of every non-hidden file below it, sorted."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for f in files:
            if not f.startswith('.'):
                out.append(osp.relpath(osp.join(root, f), folder))
    return sorted(out, key=lambda p: p.replace(os.sep, '/'))


def _decode(path: str) -> np.ndarray:
    """The file's pixels as OpenCV decodes them (BGR[A] / gray, 8 or 16 bits); raises _Unusable."""
    import cv2
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise _Unusable(f'unreadable ({err.strerror or _one_line(err)})') from None
    if data.size == 0:
        raise _Unusable('empty file (0 bytes)')
    # JPEG: apply the EXIF orientation, as BasicSR's reader (IMREAD_COLOR) does
    ext = osp.splitext(path)[1].lower()
    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR if ext in ('.jpg', '.jpeg') else cv2.IMREAD_UNCHANGED
    log = getattr(getattr(cv2, 'utils', None), 'logging', None)
    level = log.getLogLevel() if log else None
    try:
        if log:
            log.setLogLevel(log.LOG_LEVEL_SILENT)
        img = cv2.imdecode(data, flags)
    except cv2.error:
        img = None
    finally:
        if log:
            log.setLogLevel(level)
    if img is None or img.size == 0:
        raise _Unusable('cannot be decoded (corrupt or not an image)')
    return img


def convert(img: np.ndarray, gray: bool, name: str, report: Optional[Report]) -> np.ndarray:
    """8-bit BGR (or gray HxW for ``gray``) from a decoded image; conversions reported."""
    import cv2
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
        if report:
            report.warn('16-bit, converted to 8 bits (BasicSR LMDBs store 8-bit PNGs)', name)
    elif img.dtype != np.uint8:
        raise _Unusable(f'unsupported pixel type {img.dtype} (8- or 16-bit images only)')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[2] in (2, 4):
        if report:
            report.note('alpha channel dropped', name)
        img = img[..., 0] if img.shape[2] == 2 else img[..., :3]
    if img.ndim == 3 and img.shape[2] != 3:
        raise _Unusable(f'unsupported number of channels ({img.shape[2]})')
    if gray and img.ndim == 3:
        if report:
            report.note('color, converted to gray (--gray)', name)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    elif not gray and img.ndim == 2:
        if report:
            report.note('grayscale, converted to 3 channels', name)
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(img)


class Source:
    """One usable image (and its degraded input): name shown to the user, LMDB key, paths."""

    def __init__(self, name: str, key: str, path: str, lq_path: Optional[str], shape: Tuple[int, int]):
        self.name, self.key, self.path, self.lq_path, self.shape = name, key, path, lq_path, shape


def load(src: Source, args: argparse.Namespace, report: Optional[Report] = None
         ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(HR, LQ or None) of ``src`` as 8-bit arrays; for sr the HR is mod-cropped to the scale and the
    LQ checked against it. Raises _Unusable."""
    from basicsr.data.transforms import mod_crop

    hr = convert(_decode(src.path), args.gray, src.name, report)
    if args.scale > 1:
        hr = mod_crop(hr, args.scale)
    lq = None
    if src.lq_path:
        lq_name = f'{src.name} (--lq)'
        try:
            lq = convert(_decode(src.lq_path), args.gray, lq_name, report)
        except _Unusable as err:
            raise _Unusable(f'its --lq image: {err}') from None
        want = (hr.shape[0] // args.scale, hr.shape[1] // args.scale)
        if lq.shape[:2] != want:
            got = f'{lq.shape[1]}x{lq.shape[0]}'
            hr_txt = f'{hr.shape[1]}x{hr.shape[0]}' + (f' after cropping to a multiple of {args.scale}'
                                                      if args.scale > 1 else '')
            raise _Unusable(f'size mismatch: HR {hr_txt}, --lq image {got} (expected {want[1]}x{want[0]})')
    return hr, lq


def _make_key(rel: str, used: set) -> str:
    """LMDB key of ``rel``: letters, digits and ``-`` only (BasicSR splits meta_info names at ``.``
    and spaces; the denoising validation seed stops at ``_``), unique (``-2``, ``-3``... appended)."""
    stem = osp.splitext(rel.replace(os.sep, '/'))[0]
    base = re.sub(r'[^A-Za-z0-9-]+', '-', stem).strip('-') or 'img'
    key, n = base, 1
    while key in used:
        n += 1
        key = f'{base}-{n}'
    used.add(key)
    return key


def scan(args: argparse.Namespace, report: Report) -> Tuple[List[Source], int]:
    """Usable images of --input (paired with --lq); (sources, number of files seen)."""
    from tqdm import tqdm

    files = list_files(args.input)
    lq_by_stem: Dict[str, List[str]] = {}
    n_files = len(files)
    if args.lq:
        lq_files = list_files(args.lq)
        n_files += len(lq_files)
        for rel in lq_files:
            if osp.splitext(rel)[1].lower() in IMAGE_EXTS:
                lq_by_stem.setdefault(osp.splitext(rel)[0], []).append(rel)
            else:
                report.skip(f'{rel} (--lq)', f'unsupported file type {osp.splitext(rel)[1] or "(no extension)"}')
    hr_stems: Dict[str, int] = {}
    for rel in files:
        hr_stems[osp.splitext(rel)[0]] = hr_stems.get(osp.splitext(rel)[0], 0) + 1
    sources, used, paired_with = [], set(), set()
    min_side = MIN_SIDE * args.scale
    for rel in tqdm(files, desc=f'{PROG}: scan', unit='file', dynamic_ncols=True):
        ext = osp.splitext(rel)[1].lower()
        if ext not in IMAGE_EXTS:
            report.skip(rel, f'unsupported file type {ext or "(no extension)"} '
                             f'(images: {" ".join(e[1:] for e in IMAGE_EXTS)})')
            continue
        stem = osp.splitext(rel)[0]
        src = Source(rel, '', osp.join(args.input, rel), None, (0, 0))
        if args.lq:
            matches = lq_by_stem.get(stem, [])
            paired_with.update(matches)
            problem = None
            if hr_stems[stem] > 1 or len(matches) > 1:
                problem = f'ambiguous pair: several files named {stem!r} in --input / --lq'
            elif not matches:
                problem = f'no image with the same name in --lq {args.lq}'
            if problem:
                try:  # a corrupt file is reported as such
                    _decode(src.path)
                except _Unusable as err:
                    problem = str(err)
                report.skip(rel, problem)
                continue
            src.lq_path = osp.join(args.lq, matches[0])
        found = Report()  # conversions of this file, kept only if it is used
        try:
            hr, _ = load(src, args, found)
        except _Unusable as err:
            report.skip(rel, str(err))
            continue
        h, w = hr.shape[:2]
        if min(h, w) < min_side:
            report.skip(rel, f'too small ({w}x{h}; at least {min_side}x{min_side} pixels'
                             + (f' for x{args.scale}' if args.scale > 1 else '') + ')')
            continue
        report.merge(found)
        src.shape = (h, w)
        src.key = _make_key(rel, used)
        sources.append(src)
    for stem, rels in sorted(lq_by_stem.items()):
        for rel in rels:
            if rel not in paired_with:
                report.skip(f'{rel} (--lq)', f'no image with the same name in --input {args.input}')
    return sources, n_files


def split(sources: List[Source], args: argparse.Namespace) -> Tuple[List[Source], List[Source]]:
    """(train, val): a seeded shuffle of the sources sorted by key; val never overlaps train."""
    n = len(sources)
    if n == 0:
        raise PrepareError(f'no usable images in {args.input} (see the warnings above)')
    if n < 2:
        raise PrepareError(f'too few images for a validation split: {n} usable image; need at least 2 '
                           '(one to train on, one held out)')
    n_val = args.val_count if args.val_count is not None else max(1, round(n * args.val_fraction))
    if n_val >= n:
        raise PrepareError(f'too few images for a validation split: {n} usable images, {n_val} held out for '
                           'validation leaves none to train on (lower --val-count / --val-fraction)')
    order = sorted(sources, key=lambda s: s.key)
    random.Random(args.seed).shuffle(order)
    val = sorted(order[:n_val], key=lambda s: s.key)
    train = sorted(order[n_val:], key=lambda s: s.key)
    return train, val


# ---------------------------------------------------------------------------------- writing
def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB-bicubic 1/``scale`` reduction (``basicsr.utils.matlab_functions.imresize``), 8 bits."""
    from basicsr.utils.matlab_functions import imresize
    lr = imresize(hr.astype(np.float32) / 255.0, 1 / scale)
    return (np.clip(lr, 0, 1) * 255.0).round().astype(np.uint8)


def _imwrite(path: str, img: np.ndarray) -> None:
    import cv2
    ok, buf = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
    if not ok:
        raise OSError(f'could not encode {path}')
    buf.tofile(path)


def _remove(path: str) -> None:
    if osp.isdir(path) and not osp.islink(path):
        shutil.rmtree(path)
    elif osp.lexists(path):
        os.remove(path)


def write_lmdb(png_dir: str, lmdb_path: str, names: List[str], keys: List[str]) -> None:
    """``make_lmdb_from_imgs`` (BasicSR) of the PNGs ``names`` in ``png_dir``; replaces ``lmdb_path``."""
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs
    _remove(lmdb_path)
    total = sum(osp.getsize(osp.join(png_dir, n)) for n in names)
    make_lmdb_from_imgs(png_dir, lmdb_path, names, keys, compress_level=PNG_LEVEL,
                        map_size=max(total * 4, 1 << 26))


def write_data(train: List[Source], val: List[Source], args: argparse.Namespace, geo: Dict[str, Any],
               report: Report) -> Dict[str, Any]:
    """Sub-images of ``train`` and whole ``val`` images -> PNG folders -> LMDBs; returns a summary."""
    from tqdm import tqdm

    out = args.out
    paired = args.task == 'sr' or bool(args.lq)
    for owned in OWNED:
        _remove(osp.join(out, owned))
    sub = {'gt': osp.join(out, 'train_sub', 'gt'), 'lq': osp.join(out, 'train_sub', 'lq')}
    os.makedirs(sub['gt'])
    if paired:
        os.makedirs(sub['lq'])
    crop, step, s = geo['crop'], geo['step'], args.scale
    names, keys, used_train = [], [], []
    for src in tqdm(train, desc=f'{PROG}: crop', unit='image', dynamic_ncols=True):
        hr, lq = load(src, args)
        if paired and lq is None:
            lq = bicubic_lr(hr, s)
        h, w = hr.shape[:2]
        tops, lefts = subimage_positions(h, crop, step, geo['thresh']), subimage_positions(w, crop, step, geo['thresh'])
        if not tops or not lefts:
            report.warn(f'smaller than the crop size {crop}x{crop}, not used for training (a smaller '
                        '--crop-size uses them)', f'{src.name} ({w}x{h})')
            continue
        used_train.append(src)
        index = 0
        for top in tops:
            for left in lefts:
                index += 1
                key = f'{src.key}_s{index:03d}'
                _imwrite(osp.join(sub['gt'], f'{key}.png'), hr[top:top + crop, left:left + crop])
                if paired:
                    t, l_, c = top // s, left // s, crop // s
                    _imwrite(osp.join(sub['lq'], f'{key}.png'), lq[t:t + c, l_:l_ + c])
                names.append(f'{key}.png')
                keys.append(key)
    if not names:
        raise PrepareError(f'no training image is at least {crop}x{crop} pixels: give a smaller --crop-size '
                           f'(a multiple of {geo["unit"]})')
    vdir = {'gt': osp.join(out, 'val', 'gt'), 'lq': osp.join(out, 'val', 'lq')}
    os.makedirs(vdir['gt'])
    if paired:
        os.makedirs(vdir['lq'])
    val_names = []
    for src in tqdm(val, desc=f'{PROG}: val', unit='image', dynamic_ncols=True):
        hr, lq = load(src, args)
        if paired and lq is None:
            lq = bicubic_lr(hr, s)
        _imwrite(osp.join(vdir['gt'], f'{src.key}.png'), hr)
        if paired:
            _imwrite(osp.join(vdir['lq'], f'{src.key}.png'), lq)
        val_names.append(f'{src.key}.png')
    lmdbs = {'train_gt': osp.abspath(osp.join(out, 'train_gt.lmdb')),
             'val_gt': osp.abspath(osp.join(out, 'val_gt.lmdb'))}
    write_lmdb(sub['gt'], lmdbs['train_gt'], names, keys)
    if paired:
        lmdbs['train_lq'] = osp.abspath(osp.join(out, 'train_lq.lmdb'))
        write_lmdb(sub['lq'], lmdbs['train_lq'], names, keys)
    val_keys = [osp.splitext(n)[0] for n in val_names]
    write_lmdb(vdir['gt'], lmdbs['val_gt'], val_names, val_keys)
    if paired:
        lmdbs['val_lq'] = osp.abspath(osp.join(out, 'val_lq.lmdb'))
        write_lmdb(vdir['lq'], lmdbs['val_lq'], val_names, val_keys)
    if not args.keep_subimages:
        _remove(osp.join(out, 'train_sub'))
    return dict(lmdbs=lmdbs, n_sub=len(names), train_used=used_train, paired=paired,
                val_dirs={k: v for k, v in vdir.items() if k == 'gt' or paired})


# ------------------------------------------------------------------------------ pretrained
def check_pretrained(path: str, kwargs: Dict[str, Any], report: Report) -> str:
    """Read ``path`` as GRLModel will and compare it with the network of the option file.
    Returns the checkpoint format; a mismatch is a warning (strict loading would fail)."""
    import warnings

    import grl_plugin
    from grl_plugin.archs.checkpoint import CheckpointWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', CheckpointWarning)
            sd, ck = grl_plugin.load_checkpoint(path, require_geometry=False)  # network_g gives it
    except grl_plugin.CheckpointError as err:
        raise PrepareError(f'--pretrained {path}: {_one_line(err)}') from None
    net = grl_plugin.GRL(**kwargs)
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    problems = []
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = [k for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    if missing:
        problems.append(f'{len(missing)} weight(s) missing (e.g. {missing[0]})')
    if extra:
        problems.append(f'{len(extra)} unexpected weight(s) (e.g. {extra[0]})')
    if shapes:
        problems.append(f'{len(shapes)} shape mismatch(es) (e.g. {shapes[0]}: {have[shapes[0]]} in the '
                        f'checkpoint, {want[shapes[0]]} in network_g)')
    if problems:
        differ = [f'{k} {ck[k]!r} vs {kwargs.get(k)!r}' for k in
                  ('in_channels', 'embed_dim', 'depths', 'upscale', 'upsampler', 'local_connection')
                  if k in ck and _as_list(ck[k]) != _as_list(kwargs.get(k))]
        report.warn('the --pretrained weights do not fit the network of the option file ('
                    + '; '.join(problems) + (': checkpoint vs option file ' + ', '.join(differ) if differ else '')
                    + '); strict loading will fail unless network_g is edited to match', path)
    else:
        origin = getattr(ck, 'origin', {})
        for k in ('window_size', 'stripe_size', 'stripe_groups', 'anchor_window_down_factor'):
            if k in ck and origin.get(k) not in (None, 'assumed') and _as_list(ck[k]) != _as_list(kwargs[k]):
                report.note(f'--pretrained was trained with {k} {ck[k]!r}; the option file uses {kwargs[k]!r} '
                            '(the task geometry: weights load, outputs change until fine-tuned)', path)
    return getattr(ck, 'format', 'checkpoint')


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------- options
_SECTION = object()


def _fmt(value: Any) -> str:
    """A YAML scalar / flow list that reads back as ``value``."""
    import yaml
    if value is None:
        return '~'
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            mant, exp = f'{value:e}'.split('e')
            mant = mant.rstrip('0').rstrip('.')
            return f'!!float {mant}e{int(exp)}'
        return repr(value)
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(_fmt(v) for v in value) + ']'
    text = str(value)
    try:
        plain_ok = text != '' and yaml.safe_load(text) == text and not re.search(r'[:#\[\]{},&*!|>\'"%@`]', text)
    except yaml.YAMLError:
        plain_ok = False
    return text if plain_ok else "'" + text.replace("'", "''") + "'"


class _Doc:
    """YAML text with comments, built line by line; ``data`` holds what it must load back as."""

    def __init__(self):
        self.lines: List[str] = []
        self.data: Dict[str, Any] = OrderedDict()
        self._stack: List[Tuple[int, dict]] = [(-1, self.data)]

    def comment(self, text: str, ind: int = 0) -> None:
        for line in text.split('\n'):
            self.lines.append((' ' * ind + '# ' + line).rstrip())

    def blank(self) -> None:
        self.lines.append('')

    def kv(self, ind: int, key: str, value: Any = _SECTION, comment: Optional[str] = None) -> None:
        while self._stack[-1][0] >= ind:
            self._stack.pop()
        parent = self._stack[-1][1]
        text = ' ' * ind + f'{key}:'
        if value is _SECTION:
            parent[key] = OrderedDict()
            self._stack.append((ind, parent[key]))
        else:
            parent[key] = list(value) if isinstance(value, tuple) else value
            text += ' ' + _fmt(value)
        if comment:
            text = text.ljust(31) + ' # ' + comment
        self.lines.append(text)

    def text(self) -> str:
        return '\n'.join(self.lines).rstrip('\n') + '\n'


def _check_doc(doc: _Doc) -> str:
    """The YAML text of ``doc``, verified to load (BasicSR's loader) exactly as intended."""
    import yaml
    from basicsr.utils.options import ordered_yaml
    text = doc.text()
    loaded = yaml.load(text, Loader=ordered_yaml()[0])
    if _plain(loaded) != _plain(doc.data):
        raise RuntimeError('grl-prepare: internal error: the option file does not read back as written')
    return text


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


NET_ORDER = ('upscale', 'upsampler', 'in_channels', 'out_channels', 'img_range', 'embed_dim', 'depths',
             'num_heads_window', 'num_heads_stripe', 'mlp_ratio', 'local_connection', 'window_size',
             'stripe_size', 'stripe_groups', 'stripe_shift', 'anchor_window_down_factor', 'qkv_proj_type',
             'anchor_proj_type', 'anchor_one_stage', 'out_proj_type', 'conv_type', 'init_method',
             'drop_path_rate')
NET_NOTES = {'upscale': 'output = input size x upscale',
             'window_size': 'official geometry of the task', 'stripe_size': '[height, width] of a stripe',
             'drop_path_rate': 'class default, as in every official run'}


def _task_tag(args) -> str:
    if args.task == 'sr':
        return f'x{args.scale}'
    if args.task == 'dn':
        return f'{"gray" if args.gray else "color"}, sigma {args.sigma}'
    if args.task == 'jpeg':
        return f'{"gray" if args.gray else "color"}, quality {args.quality}'
    return ''


def _dataset(doc: _Doc, ind: int, args, name: str, gt: str, lq: Optional[str], train: bool,
             geo: Dict[str, Any]) -> None:
    task = args.task
    doc.kv(ind, 'name', name)
    if task in ('sr',) + PAIRED_TASKS:
        doc.kv(ind, 'type', 'PairedImageDataset', 'pairs read from the LMDBs, same keys')
        doc.kv(ind, 'dataroot_gt', gt)
        doc.kv(ind, 'dataroot_lq', lq)
    else:
        kind = {'dn': ('GaussianNoiseDataset', 'lq = gt + N(0, sigma/255), made on the fly'),
                'jpeg': ('JPEGDataset', 'lq = OpenCV JPEG round trip of the gt, on the fly'),
                'dm': ('DemosaicDataset', 'lq = Malvar demosaicking of the RGGB mosaic of the gt')}[task]
        note = kind[1] if train else ('validation noise fixed per image (seeded by its name)'
                                      if task == 'dn' else None)
        doc.kv(ind, 'type', kind[0], note)
        doc.kv(ind, 'dataroot_gt', gt)
    doc.kv(ind, 'io_backend')
    doc.kv(ind + 2, 'type', 'lmdb', 'made by grl-prepare (basicsr.utils.lmdb_util, meta_info.txt inside)')
    if task == 'dn':
        doc.kv(ind, 'sigma', args.sigma, 'noise level, 0-255 scale')
        doc.kv(ind, 'color', not args.gray)
    elif task == 'jpeg':
        doc.kv(ind, 'quality', args.quality, 'JPEG quality')
        doc.kv(ind, 'color', not args.gray)
    if train:
        doc.kv(ind, 'gt_size', geo['gt_size'], f'training patch = the sub-images (a multiple of {geo["unit"]})')
        doc.kv(ind, 'use_hflip', True, '+ rotations: the 8 flips/transposes')
        doc.kv(ind, 'use_rot', True)
        doc.kv(ind, 'use_shuffle', True)
        workers = 4 if _cuda() else 0
        doc.kv(ind, 'num_worker_per_gpu', workers,
               'data loading processes (0: in the main process, best on CPU)' if not workers else
               'data loading processes')
        doc.kv(ind, 'batch_size_per_gpu', geo['batch'], 'patches per GPU and iteration (lower it if out of memory)')
        doc.kv(ind, 'dataset_enlarge_ratio', geo['enlarge'], 'one "epoch" = this many passes over the sub-images')
        doc.kv(ind, 'prefetch_mode', None)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _network(doc: _Doc, kwargs: Dict[str, Any], args) -> None:
    doc.kv(0, 'network_g')
    doc.kv(2, 'type', 'GRL', f'GRL-{args.size}, official kwargs of the task (grl_plugin.archs.tasks.task_kwargs)')
    keys = [k for k in NET_ORDER if k in kwargs] + [k for k in kwargs if k not in NET_ORDER]
    notes = dict(NET_NOTES, in_channels='1: gray' if args.gray else 'RGB',
                 upsampler=None if args.task == 'sr' else "'': no upsampling, output = input + residual")
    for k in keys:
        doc.kv(2, k, kwargs[k], notes.get(k))


def _metrics(doc: _Doc, ind: int, args) -> None:
    doc.kv(ind, 'metrics')
    sr = args.task == 'sr'
    crop, y = (args.scale, True) if sr else (0, False)
    what = 'on Y, border of `scale` pixels removed' if sr else ('gray' if args.gray else 'RGB')
    doc.kv(ind + 2, 'psnr', comment=f'PSNR {what}')
    doc.kv(ind + 4, 'type', 'calculate_psnr')
    doc.kv(ind + 4, 'crop_border', crop)
    doc.kv(ind + 4, 'test_y_channel', y)
    doc.kv(ind + 2, 'ssim', comment=f"BasicSR's SSIM {what}")
    doc.kv(ind + 4, 'type', 'calculate_ssim')
    doc.kv(ind + 4, 'crop_border', crop)
    doc.kv(ind + 4, 'test_y_channel', y)


def _tile(doc: _Doc, ind: int, geo: Dict[str, Any]) -> None:
    doc.kv(ind, 'tile', comment='tiled validation (any image size, bounded memory); size 0: whole images')
    doc.kv(ind + 2, 'size', geo['tile'], 'input pixels per tile (rounded up to the padding size)')
    doc.kv(ind + 2, 'overlap', geo['overlap'])
    doc.kv(ind + 2, 'blend', 'linear', 'weights ramp across overlaps: no seams')


def _header(doc: _Doc, args, what: str, lines: Sequence[str]) -> None:
    tag = _task_tag(args)
    doc.comment(f'GRL-{args.size}, {TASK_TITLES[args.task]}{" (" + tag + ")" if tag else ""}: {what}')
    doc.comment('Written by grl-prepare:')
    doc.comment('  ' + ' '.join(shlex.quote(a) for a in [PROG] + list(args.argv)))
    for line in lines:
        doc.comment(line)


def train_options(args, geo: Dict[str, Any], data: Dict[str, Any], commands: Dict[str, str]) -> str:
    """Text of ``train_<name>.yml``."""
    finetune = args.pretrained is not None
    lr = LR[args.task][1 if finetune else 0]
    iters = geo['iters']
    val_freq = max(1, min(5000, iters // 10))
    doc = _Doc()
    what = (f'FINE-TUNING {osp.basename(args.pretrained)} on your images' if finetune else
            'trained FROM SCRATCH on your images (no --pretrained given: random initial weights)')
    n_train, n_val = len(data['train_used']), len(data['val'])
    _header(doc, args, what, [
        f'Data: {n_train} training images -> {data["n_sub"]} sub-images {geo["crop"]}x{geo["crop"]} (step '
        f'{geo["step"]}) in train_gt.lmdb{" + train_lq.lmdb" if data["paired"] else ""};',
        f'{n_val} validation image(s) (held out, never trained on) in val_gt.lmdb'
        f'{" + val_lq.lmdb" if data["paired"] else ""} and val/.',
        '',
        f'  {commands["train"]}',
        f'  {commands["train"]} --dry-run     # check: builds data + model, trains nothing',
        f'  {commands["test"]}',
        '',
        'Run grl-train and grl-test from the same folder: experiments/<name>/ is created there (or under',
        'grl-train --root). Dataset and weight paths below are absolute.',
    ])
    doc.blank()
    doc.kv(0, 'name', args.name, 'run folder: experiments/<name>/')
    doc.kv(0, 'model_type', 'GRLModel', 'BasicSR SRModel + tiled validation, AMP, grad clip, .ckpt loading')
    doc.kv(0, 'scale', args.scale)
    doc.kv(0, 'num_gpu', 'auto', 'all visible CUDA devices (0 = CPU)')
    doc.kv(0, 'manual_seed', args.seed)
    doc.blank()
    doc.kv(0, 'datasets')
    doc.kv(2, 'train')
    L = data['lmdbs']
    _dataset(doc, 4, args, f'{args.name}_train', L['train_gt'], L.get('train_lq'), True, geo)
    doc.kv(2, 'val')
    _dataset(doc, 4, args, f'{args.name}_val', L['val_gt'], L.get('val_lq'), False, geo)
    doc.blank()
    _network(doc, geo['kwargs'], args)
    doc.blank()
    doc.kv(0, 'path')
    if finetune:
        doc.kv(2, 'pretrain_network_g', osp.abspath(args.pretrained), 'the weights to fine-tune')
    else:
        doc.comment('No --pretrained: training starts from random weights (from scratch). To fine-tune, set', 2)
        doc.comment('an official .ckpt, a BasicSR .pth or a .safetensors file here.', 2)
        doc.kv(2, 'pretrain_network_g', None)
    doc.kv(2, 'param_key_g', 'params', 'BasicSR .pth key; official .ckpt files are recognised')
    doc.kv(2, 'strict_load_g', True, 'the weights must fit network_g exactly')
    doc.kv(2, 'resume_state', None)
    doc.blank()
    doc.kv(0, 'train')
    doc.kv(2, 'ema_decay', 0, 'no EMA copy (as the official runs)')
    doc.kv(2, 'optim_g')
    doc.kv(4, 'type', 'AdamW')
    doc.kv(4, 'lr', lr, 'low: fine-tuning' if finetune else 'from scratch')
    doc.kv(4, 'weight_decay', 1e-4)
    doc.kv(4, 'betas', [0.9, 0.999])
    doc.kv(2, 'scheduler')
    doc.kv(4, 'type', 'MultiStepLR', 'lr x gamma at each milestone (iterations)')
    doc.kv(4, 'milestones', [max(1, iters // 2), max(1, iters * 4 // 5)])
    doc.kv(4, 'gamma', 0.5)
    doc.kv(2, 'total_iter', iters)
    doc.kv(2, 'warmup_iter', -1, 'no warm-up')
    doc.kv(2, 'pixel_opt')
    if args.task in ('sr', 'dn'):
        doc.kv(4, 'type', 'L1Loss', 'as the official runs')
    else:
        doc.kv(4, 'type', 'GRLCharbonnierLoss', 'the official Charbonnier loss of this task')
        doc.kv(4, 'eps', 1e-3)
    doc.kv(4, 'loss_weight', 1.0)
    doc.kv(4, 'reduction', 'mean')
    doc.comment('GRLModel extras: amp: bf16 (mixed precision), grad_clip: 0.5, activation_checkpointing: true', 2)
    doc.blank()
    doc.kv(0, 'val')
    doc.kv(2, 'val_freq', val_freq, 'iterations between validations on the held-out images')
    doc.kv(2, 'save_img', False)
    _tile(doc, 2, geo)
    _metrics(doc, 2, args)
    doc.blank()
    doc.kv(0, 'logger')
    doc.kv(2, 'print_freq', max(1, min(100, iters // 100)))
    doc.kv(2, 'save_checkpoint_freq', val_freq)
    doc.kv(2, 'use_tb_logger', False, 'true: TensorBoard logs in tb_logger/ (needs tensorboard)')
    doc.kv(2, 'wandb')
    doc.kv(4, 'project', None, 'a project name turns on wandb (pip install wandb)')
    doc.kv(4, 'resume_id', None)
    doc.blank()
    doc.kv(0, 'dist_params', comment='used by --launcher slurm')
    doc.kv(2, 'backend', 'nccl')
    doc.kv(2, 'port', 29500)
    return _check_doc(doc)


def model_path(name: str) -> str:
    """Where grl-train leaves the final weights (relative to the folder it runs in)."""
    return f'experiments/{name}/models/net_g_latest.pth'


def test_options(args, geo: Dict[str, Any], data: Dict[str, Any], commands: Dict[str, str]) -> str:
    """Text of ``test_<name>.yml`` (grl-test on the validation images)."""
    doc = _Doc()
    _header(doc, args, f'test the model trained with train_{args.name}.yml on the held-out validation images', [
        '',
        f'  {commands["test"]}        # after {commands["train"]}',
        '',
        f'Weights: {model_path(args.name)}, relative to the folder grl-train ran in (run',
        'grl-test there too). Restored images and the log: results/<name>/.',
    ])
    doc.blank()
    doc.kv(0, 'name', f'test_{args.name}', 'results/<name>/')
    doc.kv(0, 'model_type', 'GRLModel')
    doc.kv(0, 'scale', args.scale)
    doc.kv(0, 'num_gpu', 'auto', 'all visible CUDA devices (0 = CPU)')
    doc.kv(0, 'manual_seed', args.seed)
    doc.blank()
    doc.kv(0, 'datasets')
    doc.kv(2, 'test_1')
    L = data['lmdbs']
    _dataset(doc, 4, args, f'{args.name}_val', L['val_gt'], L.get('val_lq'), False, geo)
    doc.blank()
    _network(doc, geo['kwargs'], args)
    doc.blank()
    doc.kv(0, 'path')
    doc.kv(2, 'pretrain_network_g', model_path(args.name), 'written by grl-train')
    doc.kv(2, 'param_key_g', 'params')
    doc.kv(2, 'strict_load_g', True)
    doc.blank()
    doc.kv(0, 'val')
    doc.kv(2, 'save_img', True, 'results/<name>/visualization/<dataset>/')
    doc.kv(2, 'suffix', None, 'file name suffix (~: the run name)')
    _tile(doc, 2, geo)
    _metrics(doc, 2, args)
    return _check_doc(doc)


# ------------------------------------------------------------------------------------- main
def next_commands(args, train_yml: str, test_yml: str, data: Dict[str, Any]) -> Dict[str, str]:
    q = shlex.quote
    if data.get('paired'):
        infer_in = q(osp.join(args.out, 'val', 'lq'))
    else:
        infer_in = {'dn': 'NOISY_IMAGES/', 'jpeg': 'JPEG_IMAGES/', 'dm': 'MOSAICKED_IMAGES/'}.get(args.task, 'IMAGES/')
    return {
        'train': f'grl-train -opt {q(train_yml)}',
        'test': f'grl-test -opt {q(test_yml)}',
        'infer': f'grl-infer --checkpoint {q(model_path(args.name))} --opt {q(train_yml)} --input {infer_in} '
                 f'--output {q("results/" + args.name + "_restored/")}',
    }


def run(args: argparse.Namespace) -> int:
    import grl_plugin  # noqa: F401 - import fixes before basicsr, registration

    report = Report()
    geo = geometry(args)
    finetune = args.pretrained is not None
    geo['iters'] = args.iters or DEFAULT_ITERS[1 if finetune else 0]
    geo['batch'] = args.batch_size or DEFAULT_BATCH[args.size]
    tag = _task_tag(args)
    print(f'{PROG}: {args.task} ({TASK_TITLES[args.task]}{", " + tag if tag else ""}), GRL-{args.size}; '
          f'sub-images {geo["crop"]}x{geo["crop"]} step {geo["step"]} (padding size {geo["pad"]}'
          f'{", scale " + str(args.scale) if args.scale > 1 else ""})', flush=True)
    fmt = None
    if finetune:
        fmt = check_pretrained(args.pretrained, geo['kwargs'], report)
    sources, n_files = scan(args, report)
    try:
        train, val = split(sources, args)
        os.makedirs(args.out, exist_ok=True)
        try:
            data = write_data(train, val, args, geo, report)
        except BaseException:  # no half-written sub-image folder left behind
            if not args.keep_subimages:
                _remove(osp.join(args.out, 'train_sub'))
            raise
    except _Unusable as err:  # a file changed between the scan and now
        report.print()
        raise PrepareError(f'an input file changed while preparing: {err}') from None
    except (PrepareError, OSError):
        report.print()
        raise
    data['val'] = val
    geo['enlarge'] = max(1, math.ceil(1000 / data['n_sub']))
    name = args.name
    train_yml, test_yml = osp.join(args.out, f'train_{name}.yml'), osp.join(args.out, f'test_{name}.yml')
    commands = next_commands(args, train_yml, test_yml, data)
    texts = {train_yml: train_options(args, geo, data, commands), test_yml: test_options(args, geo, data, commands)}
    from grl_plugin.cli.validate import validate_option_text  # what grl-train / grl-test will check
    for path, text in texts.items():
        problems = validate_option_text(text, 'train' if path == train_yml else 'test')
        if problems:
            raise PrepareError(f'internal error: the option file would be invalid: {problems[0].format(path)}')
    for path, text in texts.items():
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
    report.print()

    n_conv = len({n for names in list(report.notes.values()) + list(report.warnings.values()) for n in names})
    L = data['lmdbs']
    print(f'\n{PROG}: done.')
    print(f'  files: {n_files} found, {len(sources)} usable, {len(report.skipped)} skipped'
          + (f', {n_conv} with warnings/notes' if n_conv else ''))
    listed = ', '.join(s.name for s in val[:MAX_LISTED]) + (f' and {len(val) - MAX_LISTED} more'
                                                            if len(val) > MAX_LISTED else '')
    print(f'  validation: {len(val)} held-out image(s), never trained on: {listed}')
    print(f'  training: {len(data["train_used"])} image(s) -> {data["n_sub"]} sub-images '
          f'{geo["crop"]}x{geo["crop"]}' + (f' (LR {geo["crop"] // args.scale}x{geo["crop"] // args.scale}, '
                                              + ('--lq images' if args.lq else 'MATLAB bicubic') + ')'
                                              if args.scale > 1 else ''))
    print('  LMDBs: ' + ', '.join(f'{osp.basename(p)}' for p in L.values()) + f' in {args.out}')
    weights = f'fine-tunes {args.pretrained} [{fmt}]' if finetune else 'from scratch'
    print(f'  options: {train_yml} ({weights}'
          f', {geo["iters"]} iterations), {test_yml}')
    print('\nNext (from this folder):')
    print(f'  {commands["train"]}')
    print(f'  {commands["test"]}')
    print(f'  {commands["infer"]}')
    return 0


@exits_on_interrupt(PROG)
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``grl-prepare``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ('-h', '--help') for a in argv):
        build_parser().print_help()
        return 0
    try:
        args = parse_args(argv)
        args.argv = argv
        return run(args)
    except PrepareError as err:
        print(f'{PROG}: error: {err}', file=sys.stderr)
        return 2
    except OSError as err:
        where = f' ({err.filename})' if getattr(err, 'filename', None) else ''
        print(f'{PROG}: error: {err.strerror or _one_line(err)}{where}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
