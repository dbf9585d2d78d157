"""grl-prepare: a folder of real photos -> split, sub-images, LMDBs, option files; then the README walkthrough.

The input folder holds six crops (128x160) of scikit-image photographs in several formats and
flavours (PNG, JPEG, BMP in a subfolder, RGBA, 16-bit, gray, a space in a name), one corrupt
``.png`` (random bytes) and a ``.txt`` file. The walkthrough test runs the commands of the
README section "Fine-tune on your own images" as written (paths relative to a scratch folder),
adding only tiny-size overrides (crop size, ``--force_yml`` shrinking the network).
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from helpers import REPO_ROOT, VENV_BIN, read_logs, subprocess_env

import grl_plugin  # noqa: F401 - import fixes before basicsr
from grl_plugin.cli import prepare

#: file -> LMDB key, for the usable images of the folder
KEYS = {'astronaut.png': 'astronaut', 'coffee.jpg': 'coffee', 'chelsea.png': 'chelsea',
        'sub/rocket.bmp': 'sub-rocket', 'ihc16.png': 'ihc16', 'camera gray.png': 'camera-gray'}
TINY_NET = ['network_g:embed_dim=16', 'network_g:depths=[1]', 'network_g:num_heads_window=[1]',
            'network_g:num_heads_stripe=[1]']
TINY_KW = dict(embed_dim=16, depths=[1], num_heads_window=[1], num_heads_stripe=[1])


def _crop(img, top=40, left=60, h=128, w=160):
    return np.ascontiguousarray(img[top:top + h, left:left + w])


def make_photos(folder: Path) -> Path:
    import skimage.data as d
    (folder / 'sub').mkdir(parents=True, exist_ok=True)
    bgr = lambda rgb: np.ascontiguousarray(_crop(rgb)[..., ::-1])  # noqa: E731
    cv2.imwrite(str(folder / 'astronaut.png'), bgr(d.astronaut()))
    cv2.imwrite(str(folder / 'coffee.jpg'), bgr(d.coffee()), [cv2.IMWRITE_JPEG_QUALITY, 95])
    chelsea = bgr(d.chelsea())
    cv2.imwrite(str(folder / 'chelsea.png'), np.dstack([chelsea, np.full(chelsea.shape[:2], 255, np.uint8)]))
    cv2.imwrite(str(folder / 'sub' / 'rocket.bmp'), bgr(d.rocket()))
    cv2.imwrite(str(folder / 'ihc16.png'), bgr(d.immunohistochemistry()).astype(np.uint16) * 257)
    cv2.imwrite(str(folder / 'camera gray.png'), _crop(d.camera()))
    (folder / 'broken.png').write_bytes(np.random.default_rng(0).bytes(600))
    (folder / 'notes.txt').write_text('not an image\n')
    return folder


def expected_bgr(folder: Path, rel: str) -> np.ndarray:
    """What the LMDB must hold for a source file: 8-bit, 3 channels (OpenCV's colour reader)."""
    return cv2.imread(str(folder / rel), cv2.IMREAD_COLOR)


def read_lmdb(path) -> dict:
    import lmdb
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False)
    try:
        with env.begin() as txn:
            return {k.decode(): cv2.imdecode(np.frombuffer(v, np.uint8), cv2.IMREAD_UNCHANGED)
                    for k, v in txn.cursor()}
    finally:
        env.close()


def meta_lines(lmdb_path) -> list:
    return (Path(lmdb_path) / 'meta_info.txt').read_text().splitlines()


def matlab_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    from basicsr.data.transforms import mod_crop
    from basicsr.utils.matlab_functions import imresize
    lr = imresize(mod_crop(hr, scale).astype(np.float32) / 255.0, 1 / scale)
    return (np.clip(lr, 0, 1) * 255.0).round().astype(np.uint8)


def run_prepare(capsys, argv):
    rc = prepare.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys, argv) -> str:
    rc, out, err = run_prepare(capsys, argv)
    lines = [line for line in err.splitlines() if line.strip() and 'it/s]' not in line and '%|' not in line]
    assert rc == 2, (out, err)
    assert len(lines) >= 1 and lines[-1].startswith('grl-prepare: error: '), err
    assert 'Traceback' not in err
    return lines[-1]


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp('photos') / 'my_photos')


@pytest.fixture(scope='module')
def sr_run(tmp_path_factory, photos):
    out = tmp_path_factory.mktemp('sr') / 'my_sr'
    argv = ['--input', photos, '--task', 'sr', '--scale', '2', '--size', 'T', '--out', out,
            '--crop-size', '128', '--step', '32', '--val-count', '2', '--iters', '10']
    return dict(out=out, argv=argv)


def test_sr_lmdbs_split_and_report(capsys, photos, sr_run):
    rc, stdout, stderr = run_prepare(capsys, sr_run['argv'])
    assert rc == 0, stderr
    out = sr_run['out']
    # skipped files are named, with the reason; conversions are reported
    assert re.search(r'warning: 2 file\(s\) skipped', stderr)
    assert re.search(r'broken\.png: cannot be decoded', stderr)
    assert re.search(r'notes\.txt: unsupported file type \.txt', stderr)
    assert re.search(r'warning: 16-bit, converted to 8 bits.*\n\s+ihc16\.png', stderr)
    assert 'grayscale, converted to 3 channels (1): camera gray.png' in stderr
    assert 'alpha channel dropped (1): chelsea.png' in stderr
    assert '8 found, 6 usable, 2 skipped' in stdout
    assert 'grl-train -opt ' + str(out / 'train_my_sr.yml') in stdout

    # split: 2 whole validation images, 4 training images, disjoint
    val_gt, val_lq = read_lmdb(out / 'val_gt.lmdb'), read_lmdb(out / 'val_lq.lmdb')
    train_gt, train_lq = read_lmdb(out / 'train_gt.lmdb'), read_lmdb(out / 'train_lq.lmdb')
    val_keys = set(val_gt)
    train_sources = {k.rsplit('_s', 1)[0] for k in train_gt}
    assert len(val_keys) == 2 and len(train_sources) == 4
    assert not val_keys & train_sources
    assert val_keys | train_sources == set(KEYS.values())
    by_key = {v: k for k, v in KEYS.items()}

    # validation: whole images; LR = MATLAB bicubic of the mod-cropped HR
    for key in val_keys:
        hr = expected_bgr(photos, by_key[key])
        assert np.array_equal(val_gt[key], hr)  # 128x160 is already a multiple of 2
        assert val_lq[key].shape == (64, 80, 3)
        assert np.array_equal(val_lq[key], matlab_lr(hr, 2))
        assert (out / 'val' / 'gt' / f'{key}.png').is_file() and (out / 'val' / 'lq' / f'{key}.png').is_file()

    # training sub-images, as extract_subimages: 128x160 -> offsets (0, 0) and (0, 32)
    expected_meta = []
    for key in sorted(train_sources):
        hr = expected_bgr(photos, by_key[key])
        lr = matlab_lr(hr, 2)
        for i, left in enumerate((0, 32), start=1):
            sub = f'{key}_s{i:03d}'
            assert np.array_equal(train_gt[sub], hr[:128, left:left + 128])
            assert train_lq[sub].shape == (64, 64, 3)  # HR / scale
            assert np.array_equal(train_lq[sub], lr[:64, left // 2:left // 2 + 64])
            expected_meta.append(f'{sub}.png (128,128,3) 1')
    assert meta_lines(out / 'train_gt.lmdb') == expected_meta
    assert meta_lines(out / 'train_lq.lmdb') == [m.replace('(128,128,3)', '(64,64,3)') for m in expected_meta]
    assert sorted(meta_lines(out / 'val_gt.lmdb')) == sorted(f'{k}.png (128,160,3) 1' for k in val_keys)
    assert not (out / 'train_sub').exists()  # sub-image PNGs removed after writing the LMDBs

    # the option files load with BasicSR's loader and name registered components
    from basicsr.utils.options import ordered_yaml
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY
    from grl_plugin.archs.tasks import task_kwargs
    for name in ('train_my_sr.yml', 'test_my_sr.yml'):
        opt = yaml.load((out / name).read_text(), Loader=ordered_yaml()[0])
        assert opt['model_type'] in MODEL_REGISTRY and opt['scale'] == 2 and opt['num_gpu'] == 'auto'
        net = dict(opt['network_g'])
        assert net.pop('type') in ARCH_REGISTRY
        expected = task_kwargs('sr', 'T', scale=2)
        expected.pop('img_size')
        assert net == dict(expected, drop_path_rate=0.1)
        for ds in opt['datasets'].values():
            assert ds['type'] in DATASET_REGISTRY and ds['type'] == 'PairedImageDataset'
            assert ds['io_backend'] == {'type': 'lmdb'} and Path(ds['dataroot_lq']).is_dir()
        for metric in opt['val']['metrics'].values():
            assert metric['type'] in METRIC_REGISTRY and metric['crop_border'] == 2
        assert opt['val']['tile']['size'] % 64 == 0
    train = yaml.load((out / 'train_my_sr.yml').read_text(), Loader=ordered_yaml()[0])
    assert train['train']['pixel_opt']['type'] in LOSS_REGISTRY
    assert train['datasets']['train']['gt_size'] == 128 and train['train']['total_iter'] == 10
    assert train['path']['pretrain_network_g'] is None
    assert train['train']['optim_g'] == {'type': 'AdamW', 'lr': 2e-4, 'weight_decay': 1e-4, 'betas': [0.9, 0.999]}
    assert train['train']['scheduler']['type'] == 'MultiStepLR'
    assert 'FROM SCRATCH' in (out / 'train_my_sr.yml').read_text()
    test = yaml.load((out / 'test_my_sr.yml').read_text(), Loader=ordered_yaml()[0])
    assert test['path']['pretrain_network_g'] == 'experiments/my_sr/models/net_g_latest.pth'


def test_rerun_replaces_cleanly(capsys, sr_run):
    out = sr_run['out']
    if not (out / 'train_my_sr.yml').exists():
        assert run_prepare(capsys, sr_run['argv'])[0] == 0
    before = {p: (out / p).read_bytes() for p in ('train_my_sr.yml', 'test_my_sr.yml', 'train_gt.lmdb/meta_info.txt')}
    lmdb_before = read_lmdb(out / 'train_lq.lmdb')
    (out / 'train_gt.lmdb' / 'stale.txt').write_text('from an earlier run')
    (out / 'val' / 'gt' / 'stale.png').write_bytes(b'')
    rc, _, err = run_prepare(capsys, sr_run['argv'])
    assert rc == 0, err
    assert not (out / 'train_gt.lmdb' / 'stale.txt').exists() and not (out / 'val' / 'gt' / 'stale.png').exists()
    for p, data in before.items():
        assert (out / p).read_bytes() == data, p
    after = read_lmdb(out / 'train_lq.lmdb')
    assert after.keys() == lmdb_before.keys() and all(np.array_equal(after[k], lmdb_before[k]) for k in after)


def test_dn_gray_split_by_seed(capsys, photos, tmp_path):
    base = ['--input', photos, '--task', 'dn', '--size', 'S', '--gray', '--crop-size', '128', '--step', '64',
            '--val-fraction', '0.34']
    rc, stdout, stderr = run_prepare(capsys, base + ['--out', tmp_path / 'a', '--sigma', '15'])
    assert rc == 0, stderr
    assert 'color, converted to gray (--gray) (5)' in stderr
    opt = yaml.safe_load((tmp_path / 'a' / 'train_a.yml').read_text())
    ds = opt['datasets']['train']
    assert ds['type'] == 'GaussianNoiseDataset' and ds['sigma'] == 15 and ds['color'] is False
    assert opt['network_g']['in_channels'] == 1 and opt['network_g']['embed_dim'] == 128
    assert not (tmp_path / 'a' / 'train_lq.lmdb').exists()
    val = set(read_lmdb(tmp_path / 'a' / 'val_gt.lmdb'))
    train = read_lmdb(tmp_path / 'a' / 'train_gt.lmdb')
    assert len(val) == 2 and all(img.ndim == 2 for img in train.values())
    assert not val & {k.rsplit('_s', 1)[0] for k in train}
    # another seed, another (still disjoint) split; the same seed, the same split
    run_prepare(capsys, base + ['--out', tmp_path / 'b', '--seed', '3'])
    run_prepare(capsys, base + ['--out', tmp_path / 'c'])
    assert set(read_lmdb(tmp_path / 'c' / 'val_gt.lmdb')) == val
    assert set(read_lmdb(tmp_path / 'b' / 'val_gt.lmdb')) != val


@pytest.mark.parametrize('argv, message', [
    (['--input', '{tmp}/nope'], 'folder not found'),
    (['--input', '{tmp}/empty'], 'no usable images'),
    (['--input', '{tmp}/one'], 'too few images for a validation split'),
    (['--input', '{photos}', '--val-count', '6'], 'too few images for a validation split'),
    (['--input', '{photos}', '--task', 'sr', '--scale', '5'], '--scale must be 2, 3 or 4'),
    (['--input', '{photos}', '--crop-size', '200'], 'is not a multiple of 128'),
    (['--input', '{photos}', '--task', 'db_motion'], 'needs --lq'),
    (['--input', '{photos}', '--sigma', '5', '--task', 'jpeg'], '--sigma applies to --task dn'),
    (['--input', '{photos}', '--pretrained', '{tmp}/missing.ckpt'], '--pretrained file not found'),
    (['--input', '{photos}', '--pretrained', '{photos}/notes.txt'], '--pretrained'),
    (['--input', '{photos}', '--task', 'nope'], "argument --task: invalid choice: 'nope'"),
    (['--input', '{photos}', '--crop-size', '512'], 'no training image is at least 512x512'),
])
def test_errors_are_one_line(capsys, tmp_path, photos, argv, message):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'junk.png').write_bytes(b'\x89PNG not really')
    (tmp_path / 'one').mkdir()
    cv2.imwrite(str(tmp_path / 'one' / 'a.png'), np.zeros((64, 64, 3), np.uint8))
    argv = [a.format(tmp=tmp_path, photos=photos) for a in argv]
    if '--task' not in argv:
        argv += ['--task', 'dn']
    line = one_line_error(capsys, argv + ['--size', 'T', '--out', tmp_path / 'out'])
    assert message in line, line


def test_pretrained_official_ckpt_is_checked_and_loads(capsys, tmp_path, photos):
    """A GRL-T colour-denoising checkpoint in the official Lightning layout fits the generated
    option file: no warning, and ``grl-train --dry-run`` builds the model loading it strictly."""
    from grl_plugin.archs.tasks import task_kwargs
    from grl_plugin.cli import train as train_cli
    kwargs = task_kwargs('dn', 'T')
    torch.manual_seed(0)
    net = grl_plugin.GRL(**kwargs)
    ckpt = tmp_path / 'dn_grl_tiny_c3s25.ckpt'
    torch.save({'state_dict': {'model.' + k: v for k, v in net.state_dict().items()},
                'hyper_parameters': {'model': kwargs}}, ckpt)
    rc, stdout, stderr = run_prepare(capsys, ['--input', photos, '--task', 'dn', '--size', 'T', '--out',
                                              tmp_path / 'ft', '--pretrained', ckpt, '--crop-size', '128',
                                              '--iters', '100'])
    assert rc == 0, stderr
    assert 'do not fit' not in stderr and 'fine-tunes' in stdout
    opt = yaml.safe_load((tmp_path / 'ft' / 'train_ft.yml').read_text())
    assert opt['path']['pretrain_network_g'] == str(ckpt)
    assert opt['train']['optim_g']['lr'] == 2e-5 and opt['train']['total_iter'] == 100
    assert opt['train']['scheduler']['milestones'] == [50, 80]
    assert train_cli.main(['-opt', str(tmp_path / 'ft' / 'train_ft.yml'), '--dry-run']) == 0
    out = capsys.readouterr().out
    assert 'found, loaded below' in out and 'dry run OK' in out
    # weights of another model are reported (strict loading would fail), not silently accepted
    rc, _, stderr = run_prepare(capsys, ['--input', photos, '--task', 'sr', '--scale', '2', '--size', 'T', '--out',
                                         tmp_path / 'wrong', '--pretrained', ckpt, '--crop-size', '128'])
    assert rc == 0 and 'do not fit the network' in stderr


# ------------------------------------------------------------------------------ walkthrough
def readme_commands():
    """The commands of the README's "Fine-tune on your own images" code block, tokenized."""
    text = (REPO_ROOT / 'README.md').read_text(encoding='utf-8')
    section = text.split('## Fine-tune on your own images', 1)[1].split('\n## ', 1)[0]
    block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.replace('\\\n', ' ').splitlines()
            if line.strip() and not line.lstrip().startswith('#')]


def _flags(tokens):
    return [t for t in tokens if t.startswith('-')]


def _run(cmd, cwd):
    res = subprocess.run([str(c) for c in cmd], cwd=str(cwd), capture_output=True, text=True, timeout=300,
                         env=subprocess_env())
    assert res.returncode == 0, f'{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}'
    return res


def _script(name):
    path = VENV_BIN / name
    module = {'grl-train': 'grl_plugin.train', 'grl-test': 'grl_plugin.test'}[name]
    return [str(path)] if path.exists() else [sys.executable, '-m', module]


def test_readme_walkthrough(capsys, tmp_path, monkeypatch):
    """prepare -> train 2 iterations (fine-tuning a tiny official-style checkpoint) -> test -> infer,
    with the README's commands; only tiny-size overrides are added."""
    commands = readme_commands()
    assert [c[0] for c in commands] == ['grl-prepare', 'grl-train', 'grl-test', 'grl-infer']
    prep, train, test, infer = commands
    # the files the README's commands name, relative to the folder they run in
    value = lambda cmd, flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    make_photos(tmp_path / value(prep, '--input'))
    from grl_plugin.archs.tasks import task_kwargs
    kwargs = task_kwargs(value(prep, '--task'), value(prep, '--size'), **TINY_KW)
    net = grl_plugin.GRL(**kwargs)
    ckpt = tmp_path / value(prep, '--pretrained')
    ckpt.parent.mkdir(parents=True)
    torch.save({'state_dict': {'model.' + k: v for k, v in net.state_dict().items()},
                'hyper_parameters': {'model': kwargs}}, ckpt)
    noisy = tmp_path / value(infer, '--input')
    noisy.mkdir()
    rng = np.random.default_rng(0)
    img = cv2.imread(str(tmp_path / value(prep, '--input') / 'astronaut.png')).astype(np.float32)
    noisy_img = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    cv2.imwrite(str(noisy / 'astronaut_noisy.png'), noisy_img)

    monkeypatch.chdir(tmp_path)
    tiny = ['--crop-size', '128', '--step', '32']
    assert set(_flags(prep)) <= set(_flags(prep[1:] + tiny))
    rc, stdout, stderr = run_prepare(capsys, prep[1:] + tiny)
    assert rc == 0, stderr
    assert 'broken.png: cannot be decoded' in stderr
    assert 'do not fit the network' in stderr  # the tiny checkpoint is not GRL-T: reported
    printed = [line.strip() for line in stdout.split('Next (from this folder):', 1)[1].splitlines() if line.strip()]
    assert [shlex.split(p) for p in printed[:2]] == [train, test]  # prepare prints the README's commands
    assert shlex.split(printed[2])[:5] == infer[:5]

    force = ['--force_yml', 'train:total_iter=2', 'datasets:train:batch_size_per_gpu=1', 'val:val_freq=2',
             'logger:save_checkpoint_freq=2', 'logger:print_freq=1'] + TINY_NET
    _run(_script('grl-train') + train[1:] + force, tmp_path)
    name = Path(value(train, '-opt')).stem[len('train_'):]
    exp = tmp_path / 'experiments' / name
    assert (exp / 'models' / 'net_g_latest.pth').is_file()
    log = read_logs(exp)
    assert f'Loading GRL weights from {ckpt}' in log and '# psnr:' in log

    _run(_script('grl-test') + test[1:] + ['--force_yml'] + TINY_NET, tmp_path)
    results = tmp_path / 'results' / f'test_{name}'
    assert '# psnr:' in read_logs(results)
    assert list((results / 'visualization').rglob('*.png'))

    infer_cli = pytest.importorskip('grl_plugin.cli.infer')
    assert infer_cli.main(infer[1:]) == 0
    capsys.readouterr()
    assert list((tmp_path / value(infer, '--output')).glob('astronaut_noisy*.png'))
    assert '--compare' in infer  # side-by-side pictures of input and output
    assert list((tmp_path / value(infer, '--output') / 'compare').glob('astronaut_noisy*.png'))


def test_paired_deblurring_matches_by_name(capsys, tmp_path, photos):
    """--lq pairs by path without extension; unmatched / mis-sized pairs are named and skipped."""
    lq = tmp_path / 'blurry'
    (lq / 'sub').mkdir(parents=True)
    for rel in ('astronaut.png', 'coffee.jpg', 'chelsea.png', 'sub/rocket.bmp'):
        blurred = cv2.GaussianBlur(expected_bgr(photos, rel), (7, 7), 2)
        cv2.imwrite(str(lq / (rel.rsplit('.', 1)[0] + '.png')), blurred)
    cv2.imwrite(str(lq / 'ihc16.png'), expected_bgr(photos, 'ihc16.png')[:100])  # wrong size
    cv2.imwrite(str(lq / 'extra.png'), expected_bgr(photos, 'ihc16.png'))      # no partner
    out = tmp_path / 'motion'
    rc, stdout, stderr = run_prepare(capsys, ['--input', photos, '--lq', lq, '--task', 'db_motion', '--size', 'T',
                                              '--out', out, '--crop-size', '96', '--step', '64', '--val-count', '1'])
    assert rc == 0, stderr
    assert 'broken.png: cannot be decoded' in stderr
    assert 'camera gray.png: no image with the same name in --lq' in stderr
    assert 'ihc16.png: size mismatch' in stderr
    assert 'extra.png (--lq): no image with the same name in --input' in stderr
    assert '16-bit' not in stderr  # conversions of skipped files are not reported
    assert '4 usable' in stdout
    gt, lqs = read_lmdb(out / 'train_gt.lmdb'), read_lmdb(out / 'train_lq.lmdb')
    assert gt.keys() == lqs.keys() and len(gt) == 3 * 4  # 128x160, crop 96, step 64: rows 0, 32 x columns 0, 64
    by_key = {v: k for k, v in KEYS.items()}
    for key in gt:
        src, index = key.rsplit('_s', 1)
        blurred = cv2.imread(str(lq / (by_key[src].rsplit('.', 1)[0] + '.png')))
        hr = expected_bgr(photos, by_key[src])
        tops, lefts = prepare.subimage_positions(128, 96, 64), prepare.subimage_positions(160, 96, 64)
        top, left = [(t, l_) for t in tops for l_ in lefts][int(index) - 1]
        assert np.array_equal(gt[key], hr[top:top + 96, left:left + 96])
        assert np.array_equal(lqs[key], blurred[top:top + 96, left:left + 96])
    opt = yaml.safe_load((out / 'train_motion.yml').read_text())
    assert opt['datasets']['val']['dataroot_lq'] == str(out / 'val_lq.lmdb')
    assert opt['train']['pixel_opt']['type'] == 'GRLCharbonnierLoss'
    assert opt['network_g']['window_size'] == 12 and opt['network_g']['upsampler'] == ''
