"""grl-infer: restoring files and folders with a tiny GRL (official-style .ckpt and bare .pth).

Inputs are crops of scikit-image photographs written as 8-bit RGB, gray, RGBA and 16-bit PNGs,
plus one corrupt file. The options are those ``grl-infer --help`` and the README describe (the
README's commands themselves run as written in tests/test_docs.py); ``main()`` runs in-process
to keep the suite fast.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import grl_plugin  # noqa: F401  (before basicsr)
from grl_plugin import GRL
from grl_plugin.cli import infer

cv2 = pytest.importorskip('cv2')

TINY = dict(in_channels=3, embed_dim=16, depths=[1], num_heads_window=[1], num_heads_stripe=[1], window_size=4,
            stripe_size=[8, 8], stripe_groups=[None, None], stripe_shift=True, anchor_window_down_factor=2,
            mlp_ratio=2)
H, W = 37, 45  # odd sizes: padded inside the model


def tiny_kwargs(scale: int, channels: int = 3) -> dict:
    return dict(TINY, in_channels=channels, upscale=scale, upsampler='pixelshuffle' if scale > 1 else '')


def make_model(scale: int, channels: int = 3, seed: int = 0) -> GRL:
    torch.manual_seed(seed)
    model = GRL(**tiny_kwargs(scale, channels)).eval()
    with torch.no_grad():  # a visible, smooth residual for the restoration model
        for p in model.parameters():
            p.mul_(0.5)
    return model


def save_lightning(model: GRL, kwargs: dict, path: Path) -> Path:
    """Official-style Lightning checkpoint: ``model.``-prefixed weights + hyper_parameters.model."""
    torch.save({'state_dict': {'model.' + k: v for k, v in model.state_dict().items()},
                'hyper_parameters': {'model': kwargs}}, path)
    return path


def photo(size=(H, W), top=120, left=160) -> np.ndarray:
    import skimage.data
    return np.ascontiguousarray(skimage.data.astronaut()[top:top + size[0], left:left + size[1]])  # RGB uint8


def write_inputs(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rgb = photo()
    alpha = np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1))
    alpha[: H // 2, : W // 3] = 0
    files = {
        'rgb': (rgb[..., ::-1], rgb),
        'gray': (cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), None),
        'rgba': (np.dstack([rgb[..., ::-1], alpha]), None),
        'deep': ((rgb[..., ::-1].astype(np.uint16) * 257 + 91), None),  # 16-bit, not a multiple of 257
    }
    for name, (img, _) in files.items():
        assert cv2.imwrite(str(folder / f'{name}.png'), img)
    (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 4)
    (folder / 'notes.txt').write_text('not an image: ignored')
    return {'rgb': rgb, 'alpha': alpha}


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp('infer')
    sr, dn = make_model(2), make_model(1, seed=1)
    gray = make_model(1, channels=1, seed=2)
    out = {'root': root, 'sr': sr, 'dn': dn, 'gray': gray,
           'sr_ckpt': save_lightning(sr, tiny_kwargs(2), root / 'sr_grl_tiny_c3x2.ckpt'),
           'dn_pth': root / 'net_g_latest.pth', 'gray_pth': root / 'net_g_gray.pth',
           'opt': root / 'test_tiny_dn.yml', 'in': root / 'photos'}
    torch.save({'params': dn.state_dict()}, out['dn_pth'])
    torch.save({'params_ema': gray.state_dict()}, out['gray_pth'])
    out['opt'].write_text(yaml.safe_dump({'name': 'tiny', 'network_g': dict(type='GRL', **tiny_kwargs(1)),
                                          'val': {'tile': {'size': 16, 'overlap': 4, 'blend': 'linear'}}}))
    out.update(write_inputs(out['in']))
    return out


def run(args, capsys):
    rc = infer.main([str(a) for a in args] + ['--quiet'])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def forward(model: GRL, img_rgb01: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(img_rgb01.transpose(2, 0, 1).copy()).float()[None]
    with torch.no_grad():
        return model(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()


def q8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def test_folder_with_official_ckpt(work, tmp_path, capsys):
    """SR x2 from a Lightning .ckpt that stores the geometry: every kind of image, corrupt skipped."""
    out = tmp_path / 'restored'
    rc, _, err = run(['--checkpoint', work['sr_ckpt'], '--input', work['in'], '--output', out], capsys)
    assert rc == 1, err  # the corrupt file failed
    assert 'skipped' in err and 'corrupt.png' in err and err.count('grl-infer: warning') == 1
    files = {p.name: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in out.glob('*.png')}
    assert sorted(files) == ['deep_grl.png', 'gray_grl.png', 'rgb_grl.png', 'rgba_grl.png']
    assert files['rgb_grl.png'].shape == (2 * H, 2 * W, 3) and files['rgb_grl.png'].dtype == np.uint8
    assert files['gray_grl.png'].shape == (2 * H, 2 * W) and files['gray_grl.png'].dtype == np.uint8
    rgba = files['rgba_grl.png']
    assert rgba.shape == (2 * H, 2 * W, 4) and rgba.dtype == np.uint8
    expected_alpha = cv2.resize(work['alpha'], (2 * W, 2 * H), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(rgba[..., 3], expected_alpha)
    np.testing.assert_array_equal(rgba[..., :3], files['rgb_grl.png'])  # same colour content as the RGB file
    deep = files['deep_grl.png']
    assert deep.shape == (2 * H, 2 * W, 3) and deep.dtype == np.uint16
    assert np.any(deep % 257 != 0)  # real 16-bit values, not 8-bit ones scaled
    # 16-bit input = the 8-bit picture (+91/65535): the outputs agree to 8-bit precision
    assert np.abs(deep / 65535.0 - files['rgb_grl.png'] / 255.0).max() < 3 / 255


def test_tiled_equals_untiled(work, tmp_path, capsys):
    """One tile covering the image = the model on the whole image; overlapping tiles are close.
    (--tile 256 --overlap 32, with tiles scaled down to the small test images.)"""
    src = work['in'] / 'rgb.png'
    rgb01 = work['rgb'].astype(np.float32) / 255
    ref_sr = forward(work['sr'], rgb01)
    rc, _, err = run(['--checkpoint', work['sr_ckpt'], '--input', src, '--output', tmp_path / 'one', '--tile', 64,
                      '--overlap', 8, '--blend', 'uniform'], capsys)
    assert rc == 0, err
    got = cv2.imread(str(tmp_path / 'one' / 'rgb_grl.png'))[..., ::-1]
    np.testing.assert_array_equal(got, q8(ref_sr))

    ref_dn = forward(work['dn'], rgb01)
    for blend in ('linear', 'uniform'):
        dst = tmp_path / blend
        rc, _, err = run(['--checkpoint', work['dn_pth'], '--opt', work['opt'], '--input', src, '--output', dst,
                          '--tile', 16, '--overlap', 8, '--blend', blend, '--suffix', ''], capsys)
        assert rc == 0, err
        assert 'tiles 16 overlap 8 ' + blend in err
        got = cv2.imread(str(dst / 'rgb.png'))[..., ::-1].astype(np.float32) / 255
        diff = np.abs(got - ref_dn)
        assert diff.mean() < 0.015 and diff.max() < 0.15, (blend, diff.mean(), diff.max())
        assert not np.array_equal(q8(got), q8(ref_dn))  # tiling did happen


def test_bare_pth_geometry_from_opt_and_task(work, tmp_path, capsys):
    """A bare .pth needs --opt (network_g) or --task; gray images through a 3-channel model stay gray."""
    dst = tmp_path / 'opt'
    rc, _, err = run(['--checkpoint', work['dn_pth'], '--opt', work['opt'], '--input', work['in'],
                      '--output', dst], capsys)
    assert rc == 1 and 'corrupt.png' in err
    assert 'tiles 16 overlap 4 linear' in err  # val.tile of the option file
    gray = cv2.imread(str(dst / 'gray_grl.png'), cv2.IMREAD_UNCHANGED)
    assert gray.shape == (H, W) and gray.dtype == np.uint8
    # replicated to 3 channels, restored, averaged back
    g01 = cv2.imread(str(work['in'] / 'gray.png'), cv2.IMREAD_UNCHANGED).astype(np.float32) / 255
    model_out = forward(work['dn'], np.repeat(g01[..., None], 3, axis=2))
    assert np.abs(gray / 255.0 - model_out.mean(axis=2)).max() < 0.2

    # --task dn --size T: official denoising geometry from the task table
    dst = tmp_path / 'task'
    rc, _, err = run(['--checkpoint', work['dn_pth'], '--task', 'dn', '--size', 'T', '--input',
                      work['in'] / 'rgb.png', '--output', dst, '--precision', 'bf16'], capsys)
    assert rc == 0, err
    assert 'the weights need' in err  # GRL-T shapes vs the tiny weights: a note, the weights win
    assert 'window 16, stripes [64, 128]' in err and 'cpu bf16' in err
    got = cv2.imread(str(dst / 'rgb_grl.png'))
    assert got.shape == (H, W, 3)

    # 1-channel model (--task dn --gray): colour input converted to gray, gray output
    dst = tmp_path / 'gray_model'
    rc, _, err = run(['--checkpoint', work['gray_pth'], '--task', 'dn', '--gray', '--input', work['in'],
                      '--output', dst, '--tile', 0], capsys)
    assert rc == 1, err
    for name in ('rgb', 'gray', 'deep'):
        img = cv2.imread(str(dst / f'{name}_grl.png'), cv2.IMREAD_UNCHANGED)
        assert img.shape == (H, W), name
    rgba = cv2.imread(str(dst / 'rgba_grl.png'), cv2.IMREAD_UNCHANGED)
    assert rgba.shape == (H, W, 4) and np.array_equal(rgba[..., 3], work['alpha'])  # alpha copied (x1)
    assert np.array_equal(rgba[..., 0], rgba[..., 1])  # gray content


def test_bayer_mosaic(work, tmp_path, capsys):
    """--bayer: a 1-channel RGGB mosaic is Malvar-interpolated, then restored (demosaicking input)."""
    from grl_plugin.data.demosaic_dataset import bayer_mosaic, malvar_demosaic
    mosaic = bayer_mosaic(work['rgb'])
    cv2.imwrite(str(tmp_path / 'mosaic.png'), mosaic)
    rc, _, err = run(['--checkpoint', work['dn_pth'], '--opt', work['opt'], '--input', tmp_path / 'mosaic.png',
                      '--output', tmp_path / 'out', '--bayer', '--tile', 0], capsys)
    assert rc == 0, err
    got = cv2.imread(str(tmp_path / 'out' / 'mosaic_grl.png'))[..., ::-1]
    ref = forward(work['dn'], malvar_demosaic(mosaic.astype(np.float32) / 255, 'RGGB', clip=True))
    np.testing.assert_array_equal(got, q8(ref))


def test_compare_with_gt(work, tmp_path, capsys):
    """--compare --gt: side-by-side pictures, metrics.csv rows for every image (metrics where GT exists)."""
    from basicsr.metrics import calculate_psnr
    hr = photo((2 * H, 2 * W), top=100, left=150)
    lr_dir, gt_dir = tmp_path / 'lr', tmp_path / 'hr'
    lr_dir.mkdir()
    gt_dir.mkdir()
    lr = cv2.resize(hr, (W, H), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(lr_dir / 'face.png'), lr[..., ::-1])
    cv2.imwrite(str(lr_dir / 'nogt.png'), lr[..., ::-1])
    cv2.imwrite(str(gt_dir / 'face.png'), np.pad(hr, ((0, 1), (0, 1), (0, 0)))[..., ::-1])  # modcrop-able
    out = tmp_path / 'restored'
    rc, _, err = run(['--checkpoint', work['sr_ckpt'], '--input', lr_dir, '--output', out, '--compare',
                      '--gt', gt_dir], capsys)
    assert rc == 0, err
    assert 'no ground truth for nogt.png' in err
    assert 'mean over 1 image(s) with ground truth' in err
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert [r['name'] for r in rows] == ['face', 'nogt']
    assert list(rows[0]) == ['name', 'psnr', 'ssim', 'input_psnr', 'input_ssim', 'seconds']
    face, nogt = rows
    restored = cv2.imread(str(out / 'face_grl.png'))
    expected = calculate_psnr(restored, hr[..., ::-1], crop_border=2, input_order='HWC')
    assert float(face['psnr']) == pytest.approx(expected, abs=1e-3)
    assert 0 < float(face['ssim']) <= 1 and float(face['input_psnr']) > 15 and float(face['seconds']) > 0
    assert nogt['psnr'] == '' and float(nogt['seconds']) > 0
    pic = cv2.imread(str(out / 'compare' / 'face.png'))
    pic_nogt = cv2.imread(str(out / 'compare' / 'nogt.png'))
    zoom = -(-256 // (2 * W))
    assert pic.shape[1] == 3 * 2 * W * zoom + 2 * 4  # input | output | GT, 4-pixel separators
    assert pic_nogt.shape[1] == 2 * 2 * W * zoom + 4  # input | output
    assert pic.shape[0] > 2 * H * zoom  # label bar on top


def _one_error(rc, err):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith('grl-infer: error: '), err
    return lines[0]


def test_errors_one_line(work, tmp_path, capsys):
    line = _one_error(*run(['--checkpoint', work['dn_pth'], '--input', work['in'], '--output', tmp_path], capsys)[::2])
    assert 'window_size' in line and '--task' in line and '--opt' in line
    line = _one_error(*run(['--checkpoint', work['sr_ckpt'], '--input', work['in'], '--output', tmp_path,
                            '--device', 'cpu', '--precision', 'fp16'], capsys)[::2])
    assert 'fp16' in line and 'CUDA' in line
    line = _one_error(*run(['--checkpoint', work['sr_ckpt'], '--input', tmp_path / 'missing', '--output',
                            tmp_path / 'o'], capsys)[::2])
    assert 'no such file or folder' in line
    line = _one_error(*run(['--checkpoint', tmp_path / 'nope.ckpt', '--input', work['in'], '--output',
                            tmp_path / 'o'], capsys)[::2])
    assert 'no such file' in line
    line = _one_error(*run(['--checkpoint', work['sr_ckpt'], '--input', work['in'], '--output', tmp_path / 'o',
                            '--tile', 16, '--overlap', 16], capsys)[::2])
    assert '--overlap' in line
    assert not (tmp_path / 'o').exists()


def test_console_script(work, tmp_path):
    """The installed ``grl-infer`` (or ``python -m``) as a user runs it."""
    exe = Path(sys.executable).parent / 'grl-infer'
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'grl_plugin.cli.infer']
    proc = subprocess.run(cmd + ['--checkpoint', str(work['sr_ckpt']), '--input', str(work['in']),
                                 '--output', str(tmp_path / 'restored')],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # the corrupt file
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith('grl-infer: 1 image(s) could not be restored') and 'corrupt.png' in lines[-1]
    assert not any('ERROR' in line for line in lines)  # OpenCV's decoder messages are silenced
    assert cv2.imread(str(tmp_path / 'restored' / 'rgb_grl.png')).shape == (2 * H, 2 * W, 3)
    assert len(list((tmp_path / 'restored').glob('*.png'))) == 4
