"""Demo: train GRL-T for color denoising (sigma 25) on real photographs and test it on held-out ones.

Usage: ``python -m grl_plugin.cli.demo [--iters N] [--root DIR] ...`` (or ``grl-demo``, or
``make demo``). Four stages, each announced with ``[demo k/4]``:

1. **Data.** Photographs bundled with scikit-image (the ones that load offline) are split into
   training photos and held-out photos that training never sees. Training photos are cut into
   overlapping sub-images (as BasicSR's ``scripts/data_preparation/extract_subimages.py``
   does) and written with ``basicsr.utils.lmdb_util.make_lmdb_from_imgs`` to
   ``datasets/demo/train_gt.lmdb`` (``meta_info.txt`` inside); the held-out photos, centre
   cropped, go to ``datasets/demo/val_gt.lmdb`` (and as PNGs to ``datasets/demo/val_gt/``).
   Existing data whose ``meta_info.txt`` matches is reused.
2. **Train** with ``grl-train`` (BasicSR's ``train_pipeline``) and
   ``options/demo/train_grl_t_denoise_c25.yml``: GRL-T, ``GaussianNoiseDataset`` (sigma 25),
   ``GRLModel``, AdamW, cosine schedule. The network starts from random weights unless
   ``--pretrained`` is given. Output: ``ROOT/experiments/<name>/`` (``net_g_latest.pth``).
3. **Test** with ``grl-test`` (BasicSR's ``test_pipeline``) and
   ``options/demo/test_grl_t_denoise_c25.yml`` on the held-out photos (deterministic noise per
   image); restored PNGs in ``ROOT/results/<test name>/visualization/``.
4. **Evaluate:** PSNR/SSIM (``basicsr.metrics``, 8-bit RGB, no border crop) of the noisy input
   (the baseline) and of the restored image against the ground truth, per held-out image and
   on average, and whether GRL beats the baseline; side-by-side pictures
   (noisy | restored | ground truth) in ``ROOT/results/demo/``.

The option files are used as they are; only what the command line changes (``--iters``,
``--data``, ``--root``, ``--pretrained``) is passed on with BasicSR's ``--force_yml``.
Exit status 0 when the restored images beat the noisy input on average PSNR, else 1.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from grl_plugin.cli.common import exits_on_interrupt

TRAIN_OPT = 'train_grl_t_denoise_c25.yml'
TEST_OPT = 'test_grl_t_denoise_c25.yml'

# Color photographs bundled in scikit-image's wheel (no download needed). ``skimage.data.cat``
# is the same picture as ``chelsea`` and is therefore never used; the stereo pair's two views
# are near duplicates, so only the left one is used.
TRAIN_PHOTOS: Tuple[str, ...] = ('astronaut', 'rocket', 'motorcycle', 'immunohistochemistry')
HELDOUT_PHOTOS: Tuple[str, ...] = ('chelsea', 'coffee')
PHOTO_LOADERS: Dict[str, Callable[[], np.ndarray]] = {
    'astronaut': lambda: _skd().astronaut(),
    'rocket': lambda: _skd().rocket(),
    'motorcycle': lambda: _skd().stereo_motorcycle()[0],
    'immunohistochemistry': lambda: _skd().immunohistochemistry(),
    'chelsea': lambda: _skd().chelsea(),
    'coffee': lambda: _skd().coffee(),
    'hubble_deep_field': lambda: _skd().hubble_deep_field(),
    'retina': lambda: _skd().retina(),
}

CROP_SIZE, STEP, HELDOUT_SIZE = 96, 48, 128  # training sub-images, their stride, held-out crop
COMPRESS_LEVEL = 1  # PNG compression inside the LMDB (BasicSR's default)


def _skd():
    import skimage.data
    return skimage.data


def _say(msg: str) -> None:
    print(f'[demo] {msg}', flush=True)


# ----------------------------------------------------------------------------------- data
def load_photo(name: str) -> np.ndarray:
    """``name`` from :data:`PHOTO_LOADERS` as an RGB uint8 (H, W, 3) array."""
    if name not in PHOTO_LOADERS:
        raise KeyError(f'unknown photo {name!r}; choose from {sorted(PHOTO_LOADERS)}')
    img = np.asarray(PHOTO_LOADERS[name]())
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f'{name}: expected an 8-bit color photograph, got {img.dtype} {img.shape}')
    return np.ascontiguousarray(img[..., :3])


def subimage_positions(length: int, crop_size: int, step: int, thresh_size: int = 0) -> List[int]:
    """Start offsets along one axis, as BasicSR's ``extract_subimages`` computes them (the last
    crop is flush with the border when more than ``thresh_size`` pixels would be left out)."""
    if length < crop_size:
        return []
    space = list(range(0, length - crop_size + 1, step))
    if length - (space[-1] + crop_size) > thresh_size:
        space.append(length - crop_size)
    return space


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    size = min(size, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(img[top:top + size, left:left + size])


def _plan(train_photos, heldout_photos, crop_size, step, heldout_size):
    """What the data folders should hold: {split: [(key, image-producing fn, shape)]}."""
    plan = {'train': [], 'val': []}
    for name in train_photos:
        img = load_photo(name)
        h, w = img.shape[:2]
        idx = 0
        for top in subimage_positions(h, crop_size, step):
            for left in subimage_positions(w, crop_size, step):
                idx += 1
                crop = img[top:top + crop_size, left:left + crop_size]
                plan['train'].append((f'{name}_s{idx:03d}', crop, crop.shape))
        if idx == 0:
            raise ValueError(f'{name} ({w}x{h}) is smaller than the crop size {crop_size}')
    for name in heldout_photos:
        crop = center_crop(load_photo(name), heldout_size)
        plan['val'].append((name, crop, crop.shape))
    return plan


def _meta_lines(entries) -> List[str]:
    return [f'{key}.png ({s[0]},{s[1]},{s[2]}) {COMPRESS_LEVEL}' for key, _, s in entries]


def _lmdb_matches(lmdb_path: str, expected: List[str]) -> bool:
    meta = osp.join(lmdb_path, 'meta_info.txt')
    if not (osp.isfile(meta) and osp.isfile(osp.join(lmdb_path, 'data.mdb'))):
        return False
    with open(meta) as f:
        return [line.rstrip('\n') for line in f if line.strip()] == expected


def _write_lmdb(entries, png_dir: str, lmdb_path: str) -> None:
    """PNG folder (what ``extract_subimages`` leaves) -> LMDB via ``make_lmdb_from_imgs``."""
    import cv2
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs

    for path in (png_dir, lmdb_path):
        if osp.exists(path):
            shutil.rmtree(path)
    os.makedirs(png_dir)
    names = []
    for key, rgb, _ in entries:
        name = f'{key}.png'
        if not cv2.imwrite(osp.join(png_dir, name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, 3]):
            raise OSError(f'could not write {osp.join(png_dir, name)}')
        names.append(name)
    make_lmdb_from_imgs(png_dir, lmdb_path, names, [k for k, _, _ in entries],
                        compress_level=COMPRESS_LEVEL)


def build_dataset(data_root: str = osp.join('datasets', 'demo'),
                  train_photos: Sequence[str] = TRAIN_PHOTOS,
                  heldout_photos: Sequence[str] = HELDOUT_PHOTOS, crop_size: int = CROP_SIZE,
                  step: int = STEP, heldout_size: int = HELDOUT_SIZE, rebuild: bool = False) -> dict:
    """Build (or reuse) the demo data under ``data_root``; returns a summary dict.

    ``data_root/train_gt.lmdb``: ``crop_size`` sub-images of ``train_photos`` (keys
    ``<photo>_s<NNN>``, PNG sources in ``train_sub/``); ``data_root/val_gt.lmdb``: the centre
    ``heldout_size`` crop of each of ``heldout_photos`` (key = photo name, PNGs in
    ``val_gt/``). A split is rebuilt only if its ``meta_info.txt`` differs from what these
    settings produce (or ``rebuild``).
    """
    overlap = set(train_photos) & set(heldout_photos)
    if overlap:
        raise ValueError(f'photos both in training and held out: {sorted(overlap)}')
    plan = _plan(train_photos, heldout_photos, crop_size, step, heldout_size)
    os.makedirs(data_root, exist_ok=True)
    out = {'data_root': data_root, 'reused': []}
    for split, lmdb_name, png_name in (('train', 'train_gt.lmdb', 'train_sub'), ('val', 'val_gt.lmdb', 'val_gt')):
        lmdb_path = osp.join(data_root, lmdb_name)
        expected = _meta_lines(plan[split])
        if not rebuild and _lmdb_matches(lmdb_path, expected):
            out['reused'].append(split)
        else:
            _write_lmdb(plan[split], osp.join(data_root, png_name), lmdb_path)
            if not _lmdb_matches(lmdb_path, expected):
                raise RuntimeError(f'{lmdb_path}: meta_info.txt does not list the images written')
        out[f'{split}_lmdb'] = lmdb_path
        out[f'{split}_png'] = osp.join(data_root, png_name)
        out[f'n_{split}'] = len(expected)
    out['train_photos'], out['heldout_photos'] = list(train_photos), list(heldout_photos)
    return out


# --------------------------------------------------------------------------- options / runs
def find_options_dir() -> str:
    """``options/demo`` in the current directory, else next to the package (source checkout)."""
    here = osp.join('options', 'demo')
    if osp.isfile(osp.join(here, TRAIN_OPT)):
        return here
    repo = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    return osp.join(repo, 'options', 'demo')


def read_yaml(path: str) -> dict:
    import yaml
    with open(path, encoding='utf-8') as f:
        return yaml.safe_load(f)


def apply_overrides(opt: dict, overrides: Dict[str, object]) -> dict:
    """Apply ``{'a:b:c': value}`` to ``opt`` in place, as ``--force_yml a:b:c=value`` does."""
    for dotted, value in overrides.items():
        node = opt
        keys = dotted.split(':')
        for k in keys[:-1]:
            node = node[k]
        if keys[-1] not in node:
            raise KeyError(f'--force_yml cannot create new keys: {dotted}')
        node[keys[-1]] = value
    return opt


def force_yml_args(overrides: Dict[str, object]) -> List[str]:
    """``--force_yml`` arguments for ``overrides`` (values as BasicSR parses them back)."""
    if not overrides:
        return []
    args = ['--force_yml']
    for dotted, value in overrides.items():
        text = '~' if value is None else str(value)
        if isinstance(value, str) and ('=' in value or ':' in value or value.strip() != value):
            raise ValueError(f'{dotted}: {value!r} cannot be passed with --force_yml '
                             "(contains '=' or ':'); choose another path")
        args.append(f'{dotted}={text}')
    return args


_TIMESTAMP = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ')


def _structure_line(line: str) -> bool:
    """A line of the network's ``repr`` (as BasicSR logs it after ``Network: ...``)."""
    text = line.rstrip('\n')
    return text[:1] in (' ', '\t') or text.rstrip() in (')', '') or text.rstrip().endswith('(')


def filter_network_structure(lines: Iterable[str]) -> Iterator[str]:
    """``lines`` without the network ``repr`` that BasicSR logs after ``Network: ...`` (a
    thousand lines for GRL; it stays in the log file)."""
    skipping = False
    for line in lines:
        if skipping:
            # the repr is its own log record, "<time> INFO: GRL(", followed by indented lines
            if line.rstrip().endswith('(') or (_structure_line(line) and not _TIMESTAMP.match(line)):
                continue
            skipping = False
        yield line
        if 'INFO: Network: ' in line:
            skipping = True
            yield '                          (network structure left out here: see the log file)\n'


def run_cli(module: str, opt_path: str, root: str, overrides: Dict[str, object], verbose: bool = False) -> None:
    """Run ``python -m <module> -opt <opt_path> --root <root> [--force_yml ...]``, echoing its
    output (without the network structure unless ``verbose``)."""
    cmd = [sys.executable, '-m', module, '-opt', opt_path, '--root', root] + force_yml_args(overrides)
    _say('$ ' + ' '.join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=dict(os.environ, PYTHONUNBUFFERED='1'))
    for line in (proc.stdout if verbose else filter_network_structure(proc.stdout)):
        sys.stdout.write(line)
        sys.stdout.flush()
    rc = proc.wait()
    if rc != 0:
        raise SystemExit(f'[demo] {module} failed with exit status {rc}')


# ----------------------------------------------------------------------------- evaluation
def _labelled(img_bgr: np.ndarray, text: str, zoom: int) -> np.ndarray:
    """``img_bgr`` enlarged ``zoom`` times (nearest) under a black bar holding ``text``."""
    import cv2
    if zoom > 1:
        img_bgr = cv2.resize(img_bgr, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    w = img_bgr.shape[1]
    scale = 0.45 if w >= 200 else 0.35
    (_, th), base = cv2.getTextSize('Ayg', cv2.FONT_HERSHEY_SIMPLEX, scale, 1)  # same bar for every label
    bar = np.zeros((th + base + 10, w, 3), np.uint8)
    cv2.putText(bar, text, (5, th + 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([bar, img_bgr], axis=0)


def evaluate(test_opt: dict, vis_dir: str, out_dir: str, zoom: int = 2) -> List[dict]:
    """Per held-out image: metrics of the noisy input and of the restored PNG; writes the
    side-by-side pictures. The noisy input is rebuilt with the dataset of ``test_opt`` (its
    validation noise is fixed per image), exactly as ``grl-test`` fed it to the network."""
    import cv2
    from basicsr.metrics import calculate_psnr, calculate_ssim
    from basicsr.utils import tensor2img

    import grl_plugin  # noqa: F401  (registers the dataset)
    from basicsr.utils.registry import DATASET_REGISTRY

    (ds_key, ds_opt), = [(k, v) for k, v in test_opt['datasets'].items() if k.startswith('test')][:1]
    ds_opt = dict(ds_opt, phase=ds_key.split('_')[0])
    dataset = DATASET_REGISTRY.get(ds_opt['type'])(ds_opt)
    vis_dir = osp.join(vis_dir, ds_opt['name'])
    suffix = test_opt['val'].get('suffix') or test_opt['name']
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(len(dataset)):
        item = dataset[i]
        name = osp.splitext(osp.basename(item['gt_path']))[0]
        gt = tensor2img(item['gt'])        # BGR uint8, as BasicSR saves images
        noisy = tensor2img(item['lq'])     # clipped to [0, 1] and rounded to 8 bits
        restored_path = osp.join(vis_dir, f'{name}_{suffix}.png')
        restored = cv2.imread(restored_path, cv2.IMREAD_COLOR)
        if restored is None:
            raise FileNotFoundError(f'grl-test wrote no {restored_path}')
        row = {'name': name, 'size': f'{gt.shape[1]}x{gt.shape[0]}'}
        for tag, img in (('noisy', noisy), ('grl', restored)):
            row[f'{tag}_psnr'] = float(calculate_psnr(img, gt, crop_border=0, input_order='HWC'))
            row[f'{tag}_ssim'] = float(calculate_ssim(img, gt, crop_border=0, input_order='HWC'))
        sigma = item.get('sigma', '')
        panels = [_labelled(noisy, f'noisy s={sigma:g} {row["noisy_psnr"]:.2f}dB' if sigma != '' else
                            f'noisy {row["noisy_psnr"]:.2f}dB', zoom),
                  _labelled(restored, f'GRL-T {row["grl_psnr"]:.2f}dB', zoom),
                  _labelled(gt, 'ground truth', zoom)]
        sep = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
        row['picture'] = osp.join(out_dir, f'{name}_noisy_grl_gt.png')
        if not cv2.imwrite(row['picture'], np.concatenate([panels[0], sep, panels[1], sep, panels[2]], axis=1)):
            raise OSError(f'could not write {row["picture"]}')
        rows.append(row)
    return rows


def format_table(rows: List[dict]) -> str:
    head = f'{"image":<12}{"size":>9} | {"noisy PSNR":>10} {"SSIM":>7} | {"GRL-T PSNR":>10} {"SSIM":>7} | {"gain dB":>7}'
    lines = [head, '-' * len(head)]
    for r in rows:
        lines.append(f'{r["name"]:<12}{r["size"]:>9} | {r["noisy_psnr"]:10.2f} {r["noisy_ssim"]:7.4f} | '
                     f'{r["grl_psnr"]:10.2f} {r["grl_ssim"]:7.4f} | {r["grl_psnr"] - r["noisy_psnr"]:+7.2f}')
    m = {k: float(np.mean([r[k] for r in rows])) for k in ('noisy_psnr', 'noisy_ssim', 'grl_psnr', 'grl_ssim')}
    lines.append('-' * len(head))
    lines.append(f'{"mean":<12}{"":>9} | {m["noisy_psnr"]:10.2f} {m["noisy_ssim"]:7.4f} | '
                 f'{m["grl_psnr"]:10.2f} {m["grl_ssim"]:7.4f} | {m["grl_psnr"] - m["noisy_psnr"]:+7.2f}')
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------ main
def parse_args(argv):
    p = argparse.ArgumentParser(prog='grl-demo', description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='Stages: data -> grl-train -> grl-test -> PSNR/SSIM table + pictures.')
    p.add_argument('--iters', type=int, default=None,
                   help='training iterations (default: train.total_iter of the option file); the cosine '
                        'period and the validation interval follow')
    p.add_argument('--root', default='.',
                   help='folder for experiments/ and results/ (default: current directory)')
    p.add_argument('--data', default=osp.join('datasets', 'demo'),
                   help='folder of the demo LMDBs (default datasets/demo; reused when present)')
    p.add_argument('--out', default=None, help='folder of the side-by-side pictures (default ROOT/results/demo)')
    p.add_argument('--options', default=None,
                   help=f'folder holding {TRAIN_OPT} and {TEST_OPT} (default options/demo)')
    p.add_argument('--pretrained', default=None,
                   help='start from these weights (official .ckpt, BasicSR .pth or .safetensors)')
    p.add_argument('--skip-train', action='store_true',
                   help="reuse ROOT/experiments/<name>/models/net_g_latest.pth instead of training")
    p.add_argument('--rebuild-data', action='store_true', help='rebuild the LMDBs even if they match')
    p.add_argument('--zoom', type=int, default=2, help='enlargement of the side-by-side pictures (default 2)')
    p.add_argument('--verbose', action='store_true', help='also show the network structure BasicSR logs')
    return p.parse_args(argv)


@exits_on_interrupt('grl-demo')
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    t_all = time.perf_counter()
    root = osp.abspath(args.root)
    out_dir = args.out or osp.join(root, 'results', 'demo')
    opt_dir = args.options or find_options_dir()
    train_path, test_path = osp.join(opt_dir, TRAIN_OPT), osp.join(opt_dir, TEST_OPT)
    for path in (train_path, test_path):
        if not osp.isfile(path):
            raise SystemExit(f'[demo] option file not found: {path} (use --options)')
    train_opt, test_opt = read_yaml(train_path), read_yaml(test_path)

    # ---- 1: data
    t0 = time.perf_counter()
    times = {}
    _say(f'1/4 data: photos from scikit-image -> {args.data}')
    info = build_dataset(args.data, rebuild=args.rebuild_data)
    _say(f'    train: {info["n_train"]} sub-images {CROP_SIZE}x{CROP_SIZE} (step {STEP}) of '
         f'{", ".join(info["train_photos"])} -> {info["train_lmdb"]}')
    _say(f'    held out (never trained on): {", ".join(info["heldout_photos"])}, centre '
         f'{HELDOUT_SIZE}x{HELDOUT_SIZE} -> {info["val_lmdb"]}')
    _say(f'    {"reused " + " and ".join(info["reused"]) if info["reused"] else "built"} '
         f'in {time.perf_counter() - t0:.1f}s')
    times['data'] = time.perf_counter() - t0

    # What the command line changes in the option files (passed as --force_yml).
    train_over: Dict[str, object] = {}
    test_over: Dict[str, object] = {}
    test_key = [k for k in test_opt['datasets'] if k.startswith('test')][0]
    for opt, over, key, lmdb_path in ((train_opt, train_over, 'train', info['train_lmdb']),
                                      (train_opt, train_over, 'val', info['val_lmdb']),
                                      (test_opt, test_over, test_key, info['val_lmdb'])):
        if osp.normpath(opt['datasets'][key]['dataroot_gt']) != osp.normpath(lmdb_path):
            over[f'datasets:{key}:dataroot_gt'] = lmdb_path
    if args.iters is not None:
        if args.iters < 1:
            raise SystemExit('[demo] --iters must be >= 1')
        train_over['train:total_iter'] = args.iters
        train_over['train:scheduler:periods'] = [args.iters]
        train_over['val:val_freq'] = max(args.iters // 4, 1)
        train_over['logger:print_freq'] = max(min(train_opt['logger']['print_freq'], args.iters // 10), 1)
    if args.pretrained:
        train_over['path:pretrain_network_g'] = osp.abspath(args.pretrained)
    apply_overrides(train_opt, train_over)
    name = train_opt['name']
    weights = osp.join(root, 'experiments', name, 'models', 'net_g_latest.pth')
    test_over['path:pretrain_network_g'] = weights
    apply_overrides(test_opt, test_over)

    # ---- 2: train
    t0 = time.perf_counter()
    tr = train_opt['train']
    ds = train_opt['datasets']['train']
    if args.skip_train:
        _say(f'2/4 train: skipped (--skip-train), using {weights}')
        if not osp.isfile(weights):
            raise SystemExit(f'[demo] {weights} does not exist: run without --skip-train first')
    else:
        _say(f'2/4 train: {train_opt["network_g"]["type"]} from '
             f'{"random weights" if not train_opt["path"].get("pretrain_network_g") else train_opt["path"]["pretrain_network_g"]}, '
             f'{tr["total_iter"]} iterations, batch {ds["batch_size_per_gpu"]} x {ds["gt_size"]}x{ds["gt_size"]} '
             f'patches, sigma {ds.get("sigma", ds.get("sigma_range"))}, {tr["optim_g"]["type"]} lr {tr["optim_g"]["lr"]}')
        if osp.isdir(osp.join(root, 'experiments', name)):
            _say(f'    (BasicSR renames the previous experiments/{name} to {name}_archived_<time>)')
        run_cli('grl_plugin.train', train_path, root, train_over, args.verbose)
        _say(f'    training took {time.perf_counter() - t0:.0f}s; weights: {weights}')
    times['train'] = time.perf_counter() - t0

    # ---- 3: test
    t0 = time.perf_counter()
    _say(f'3/4 test: grl-test on the held-out photos with {weights}')
    run_cli('grl_plugin.test', test_path, root, test_over, args.verbose)
    vis_dir = osp.join(root, 'results', test_opt['name'], 'visualization')
    _say(f'    testing took {time.perf_counter() - t0:.0f}s; restored images in {vis_dir}')
    times['test'] = time.perf_counter() - t0

    # ---- 4: evaluate
    t0 = time.perf_counter()
    _say('4/4 evaluate: PSNR/SSIM on 8-bit RGB, no border crop (basicsr.metrics)')
    rows = evaluate(test_opt, vis_dir, out_dir, zoom=args.zoom)
    print()
    print(format_table(rows))
    print()
    noisy = float(np.mean([r['noisy_psnr'] for r in rows]))
    grl = float(np.mean([r['grl_psnr'] for r in rows]))
    d_ssim = float(np.mean([r['grl_ssim'] - r['noisy_ssim'] for r in rows]))
    beats = grl > noisy
    verdict = 'BEATS' if beats else 'does NOT beat'
    print(f'RESULT: the trained GRL-T {verdict} the noisy baseline on {len(rows)} held-out photos: '
          f'{grl:.2f} dB vs {noisy:.2f} dB ({grl - noisy:+.2f} dB PSNR, {d_ssim:+.4f} SSIM)')
    for r in rows:
        print(f'  picture (noisy | GRL-T | ground truth): {r["picture"]}')
    times['evaluate'] = time.perf_counter() - t0
    print(f'[demo] wall time {time.perf_counter() - t_all:.0f}s ('
          + ', '.join(f'{k} {v:.0f}s' for k, v in times.items()) + ')')
    return 0 if beats else 1


if __name__ == '__main__':
    sys.exit(main())
