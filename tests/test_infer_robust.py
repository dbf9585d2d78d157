"""grl-infer and the other tools under misuse and interruption; --skip-existing and --ensemble.

* every bad argument ends as one line ``grl-infer: error: ...`` naming the option and the value,
  exit status 2, nothing created;
* Ctrl-C (a KeyboardInterrupt raised from the network or from the file writer, or a real SIGINT
  in a subprocess) ends with one line and exit status 130; the images finished before it and
  their metrics.csv rows are there and complete, no temporary file is left;
* ``--skip-existing`` restores only the missing outputs (network calls counted) and keeps
  metrics.csv complete;
* ``--ensemble`` equals the mean of the 8 flipped/rotated outputs turned back (computed here with
  numpy), and the plain output for a network that commutes with flips and rotations.

Tiny GRLs with random weights are made here; ``main()`` runs in-process.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import grl_plugin  # noqa: F401  (before basicsr)
from grl_plugin import GRL
from grl_plugin.cli import common, convert, demo, export, infer, prepare, zoo
from grl_plugin.tiling import tiled_forward

from test_infer import make_model, photo, q8, save_lightning, tiny_kwargs

cv2 = pytest.importorskip('cv2')

SIZE = (20, 24)  # LR images: small, and not a multiple of the padding multiple (8)
NAMES = ('a', 'b', 'c', 'd')


@pytest.fixture(scope='module')
def kit(tmp_path_factory):
    """x2 and x1 tiny GRLs as Lightning checkpoints, 4 LR images and their HR ground truth."""
    root = tmp_path_factory.mktemp('robust')
    sr, dn = make_model(2, seed=3), make_model(1, seed=4)
    lr_dir, hr_dir = root / 'lr', root / 'hr'
    lr_dir.mkdir()
    hr_dir.mkdir()
    h, w = SIZE
    for i, name in enumerate(NAMES):
        hr = photo((2 * h, 2 * w), top=60 + 30 * i, left=140 + 20 * i)
        lr = cv2.resize(hr, (w, h), interpolation=cv2.INTER_AREA)
        assert cv2.imwrite(str(hr_dir / f'{name}.png'), hr[..., ::-1])
        assert cv2.imwrite(str(lr_dir / f'{name}.png'), lr[..., ::-1])
    return {'root': root, 'sr': sr, 'dn': dn, 'lr': lr_dir, 'hr': hr_dir,
            'sr_ckpt': save_lightning(sr, tiny_kwargs(2), root / 'sr_tiny_x2.ckpt'),
            'dn_ckpt': save_lightning(dn, tiny_kwargs(1), root / 'dn_tiny_x1.ckpt')}


def run(args, capsys):
    """(exit status, stdout, stderr) of grl-infer in-process; argparse's exit is a status too."""
    try:
        rc = infer.main([str(a) for a in args] + ['--quiet'])
    except SystemExit as stop:
        rc = stop.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img[..., ::-1]


def lr01(kit, name: str) -> np.ndarray:
    return read_rgb(kit['lr'] / f'{name}.png').astype(np.float32) / 255


def net(model: GRL, img: np.ndarray) -> np.ndarray:
    """The network on a float HxWxC numpy image (no clamping)."""
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
    with torch.no_grad():
        return model(x)[0].permute(1, 2, 0).numpy()


@pytest.fixture
def calls(monkeypatch):
    """Counts GRL forward calls; ``calls.stop_after = N`` raises KeyboardInterrupt on call N + 1
    (``calls.signal = True``: a real SIGINT to this process instead)."""
    class Counter:
        n = 0
        stop_after = None

    counter = Counter()
    real = GRL.forward

    def forward(self, x):
        if counter.stop_after is not None and counter.n >= counter.stop_after:
            raise KeyboardInterrupt
        counter.n += 1
        return real(self, x)

    monkeypatch.setattr(GRL, 'forward', forward)
    return counter


def no_temporaries(folder: Path) -> None:
    left = [p for p in folder.rglob('*') if common.TEMP_MARK in p.name or p.name.startswith('.')]
    assert not left, left


def metrics_rows(folder: Path):
    raw = (folder / 'metrics.csv').read_bytes()
    assert raw.endswith(b'\r\n')  # the last row is complete
    with open(folder / 'metrics.csv', newline='', encoding='utf-8') as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ bad arguments
def _one_error(rc, err) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith('grl-infer: error: '), (rc, err)
    assert 'Traceback' not in err
    return lines[0]


BAD = {  # case: (extra arguments, texts the line must hold); {root} and {file} are filled in
    'tile negative': (['--tile', '-1'], ['--tile -1']),
    'tile below padding multiple': (['--tile', '7'], ['--tile 7', 'padding multiple 8']),
    'overlap negative': (['--overlap', '-2'], ['--overlap -2']),
    'overlap = tile': (['--tile', '16', '--overlap', '16'], ['--overlap 16', '--tile 16']),
    'overlap > tile': (['--tile', '16', '--overlap', '40'], ['--overlap 40']),
    'scale zero': (['--task', 'sr', '--scale', '0'], ['--scale 0']),
    'scale negative': (['--task', 'sr', '--scale', '-3'], ['--scale -3']),
    'tile not a number': (['--tile', 'big'], ['--tile', "'big'"]),
    'overlap not a number': (['--overlap', '1.5'], ['--overlap', "'1.5'"]),
    'unknown blend': (['--blend', 'soft'], ['--blend', "'soft'"]),
    'suffix with a folder': (['--suffix', 'x/y'], ["--suffix 'x/y'"]),
    'gt missing': (['--gt', '{root}/nothing'], ['--gt {root}/nothing', 'no such folder']),
    'gt is a file': (['--gt', '{file}'], ['--gt {file}', 'not a folder']),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_argument_one_line(kit, tmp_path, capsys, calls, case):
    extra, needles = BAD[case]
    (tmp_path / 'notes.txt').write_text('x')
    fill = dict(root=tmp_path, file=tmp_path / 'notes.txt')
    out = tmp_path / 'out'
    args = ['--checkpoint', kit['sr_ckpt'], '--input', kit['lr'], '--output', out]
    line = _one_error(*run(args + [a.format(**fill) for a in extra], capsys)[::2])
    for needle in needles:
        assert needle.format(**fill) in line, (case, line)
    assert not out.exists() and calls.n == 0


def test_bad_paths_one_line(kit, tmp_path, capsys, calls):
    """--input / --output / --gt that cannot work: one line naming the option and the path, nothing written."""
    base = ['--checkpoint', kit['sr_ckpt']]
    a_file = tmp_path / 'taken.png'
    a_file.write_bytes(b'x')
    text = tmp_path / 'notes.txt'
    text.write_text('x')

    line = _one_error(*run(base + ['--input', tmp_path / 'missing', '--output', tmp_path / 'o'], capsys)[::2])
    assert f'--input {tmp_path / "missing"}' in line and 'no such file or folder' in line
    line = _one_error(*run(base + ['--input', text, '--output', tmp_path / 'o'], capsys)[::2])
    assert f'--input {text}' in line and 'not an image' in line
    # an existing file as --output (was a raw "[Errno 17] File exists")
    line = _one_error(*run(base + ['--input', kit['lr'], '--output', a_file], capsys)[::2])
    assert f'--output {a_file}' in line and 'is a file' in line and 'Errno' not in line
    line = _one_error(*run(base + ['--input', kit['lr'], '--output', a_file / 'sub'], capsys)[::2])
    assert f'--output {a_file / "sub"}' in line and 'is a file' in line
    # the input folder itself (also written differently), or inside it with --recursive
    for same in (kit['lr'], kit['lr'] / '.' / '..' / 'lr'):
        line = _one_error(*run(base + ['--input', kit['lr'], '--output', same], capsys)[::2])
        assert f'--output {same}' in line and 'is the --input folder' in line
    inside = kit['lr'] / 'restored'
    line = _one_error(*run(base + ['--input', kit['lr'], '--output', inside, '--recursive'], capsys)[::2])
    assert f'--output {inside}' in line and 'inside the --input folder' in line
    line = _one_error(*run(base + ['--input', kit['lr'], '--output', kit['hr'], '--gt', kit['hr']], capsys)[::2])
    assert f'--output {kit["hr"]}' in line and 'is the --gt folder' in line
    line = _one_error(*run(['--checkpoint', tmp_path, '--input', kit['lr'], '--output', tmp_path / 'o'], capsys)[::2])
    assert f'--checkpoint {tmp_path}' in line and 'is a folder' in line
    assert not inside.exists() and not (tmp_path / 'o').exists() and calls.n == 0
    assert sorted(p.name for p in kit['lr'].iterdir()) == [f'{n}.png' for n in NAMES]
    assert sorted(p.name for p in kit['hr'].iterdir()) == [f'{n}.png' for n in NAMES]


def test_good_neighbours_of_bad_arguments(kit, tmp_path, capsys, calls):
    """The limits are where they should be: tile = padding multiple, overlap = tile - 1, --output in
    the --input folder without --recursive, a single input file written next to itself."""
    single = tmp_path / 'one.png'
    single.write_bytes((kit['lr'] / 'a.png').read_bytes())
    rc, _, err = run(['--checkpoint', kit['sr_ckpt'], '--input', single, '--output', tmp_path, '--tile', 8,
                      '--overlap', 7], capsys)
    assert rc == 0, err
    assert (tmp_path / 'one_grl.png').is_file() and calls.n > 1  # tiled: several calls
    sub = tmp_path / 'lr'
    sub.mkdir()
    (sub / 'a.png').write_bytes(single.read_bytes())
    rc, _, err = run(['--checkpoint', kit['sr_ckpt'], '--input', sub, '--output', sub / 'out', '--tile', 0],
                     capsys)
    assert rc == 0, err
    assert (sub / 'out' / 'a_grl.png').is_file()


# ------------------------------------------------------------------------------ Ctrl-C
def _check_finished(kit, out: Path, done, with_metrics: bool = True) -> None:
    """Exactly the images in ``done`` are there, equal to the network's output, with complete rows."""
    from basicsr.metrics import calculate_psnr
    assert sorted(p.name for p in out.glob('*.png')) == [f'{n}_grl.png' for n in done]
    for name in done:
        got = read_rgb(out / f'{name}_grl.png')
        np.testing.assert_array_equal(got, q8(net(kit['sr'], lr01(kit, name))))
    no_temporaries(out)
    if not with_metrics:
        return
    rows = metrics_rows(out)
    assert [r['name'] for r in rows] == list(done)
    for row in rows:
        assert all(row[k] not in (None, '') for k in infer.CSV_FIELDS), row
        gt = cv2.imread(str(kit['hr'] / f'{row["name"]}.png'))
        restored = cv2.imread(str(out / f'{row["name"]}_grl.png'))
        assert float(row['psnr']) == pytest.approx(calculate_psnr(restored, gt, crop_border=2), abs=1e-3)
    assert sorted(p.name for p in (out / 'compare').glob('*.png')) == [f'{n}.png' for n in done]


def test_ctrl_c_in_the_network(kit, tmp_path, capsys, calls):
    out = tmp_path / 'out'
    args = ['--checkpoint', kit['sr_ckpt'], '--input', kit['lr'], '--output', out, '--tile', 0, '--gt', kit['hr']]
    calls.stop_after = 2
    rc, stdout, err = run(args, capsys)
    calls.stop_after = None
    assert rc == 130
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith('grl-infer: GRL x2'), err  # the settings, then the interrupt
    assert lines[1].startswith('grl-infer: interrupted after 2 of 4 image(s)') and '--skip-existing' in lines[1]
    assert 'Traceback' not in err and stdout == ''
    _check_finished(kit, out, NAMES[:2])

    # go on where it stopped: only the 2 missing images go through the network; the rows are complete
    calls.n = 0
    rc, _, err = run(args + ['--skip-existing'], capsys)
    assert rc == 0, err
    assert calls.n == 2 and 'restored 2 of 4 image(s)' in err and '2 already there' in err
    _check_finished(kit, out, NAMES)


def test_ctrl_c_while_writing(kit, tmp_path, capsys, calls, monkeypatch):
    """Interrupted between writing b's temporary file and renaming it: b is absent, not half-written."""
    out = tmp_path / 'out'
    real = os.replace
    seen = []

    def replace(src, dst):
        seen.append((Path(src).name, Path(dst).name))
        assert Path(src).parent == Path(dst).parent and common.TEMP_MARK in Path(src).name
        if Path(dst).name == 'b_grl.png':
            assert Path(src).stat().st_size > 100  # the whole PNG was in the temporary file
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(common.os, 'replace', replace)
    rc, _, err = run(['--checkpoint', kit['sr_ckpt'], '--input', kit['lr'], '--output', out, '--tile', 0,
                      '--gt', kit['hr']], capsys)
    assert rc == 130 and err.strip().splitlines()[-1].startswith('grl-infer: interrupted after 1 of 4'), err
    assert ('.a_grl.png.%d.part' % os.getpid(), 'a_grl.png') in seen
    assert calls.n == 2  # a finished, b restored but not in place
    _check_finished(kit, out, NAMES[:1])


def test_ctrl_c_without_metrics_and_in_subfolders(kit, tmp_path, capsys, calls):
    src = tmp_path / 'in'
    for i, name in enumerate(NAMES):
        (src / f'sub{i % 2}').mkdir(parents=True, exist_ok=True)
        (src / f'sub{i % 2}' / f'{name}.png').write_bytes((kit['lr'] / f'{name}.png').read_bytes())
    out = tmp_path / 'out'
    calls.stop_after = 3
    rc, _, err = run(['--checkpoint', kit['sr_ckpt'], '--input', src, '--output', out, '--tile', 0, '--recursive'],
                     capsys)
    calls.stop_after = None
    assert rc == 130 and 'interrupted after 3 of 4' in err.strip().splitlines()[-1]
    # sorted: sub0/a, sub0/c, sub1/b, sub1/d
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob('*.png')) == \
        ['sub0/a_grl.png', 'sub0/c_grl.png', 'sub1/b_grl.png']
    assert not (out / 'metrics.csv').exists()
    no_temporaries(out)


def test_sigint_subprocess(kit, tmp_path):
    """A real SIGINT in the middle of a folder: exit status 130, one line, no traceback."""
    out = tmp_path / 'out'
    script = textwrap.dedent(f'''
        import os, signal, sys
        import grl_plugin
        from grl_plugin import GRL
        from grl_plugin.cli import infer
        real, n = GRL.forward, [0]
        def forward(self, x):
            n[0] += 1
            if n[0] == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return real(self, x)
        GRL.forward = forward
        sys.exit(infer.main(['--checkpoint', {str(kit['sr_ckpt'])!r}, '--input', {str(kit['lr'])!r},
                             '--output', {str(out)!r}, '--tile', '0', '--gt', {str(kit['hr'])!r}]))
    ''')
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith('grl-infer: interrupted after 2 of 4'), proc.stderr
    assert 'Traceback' not in proc.stderr and 'KeyboardInterrupt' not in proc.stderr
    assert sorted(p.name for p in out.glob('*.png')) == ['a_grl.png', 'b_grl.png']
    assert [r['name'] for r in metrics_rows(out)] == ['a', 'b']
    no_temporaries(out)


@pytest.mark.parametrize('tool, module, target, argv', [
    ('grl-convert', convert, 'convert', ['in.ckpt', 'out.pth']),
    ('grl-export', export, 'export', ['--checkpoint', 'x.ckpt', '--output', 'x.onnx']),
    ('grl-zoo', zoo, '_select', []),
    ('grl-prepare', prepare, 'parse_args', ['--task', 'dn']),
    ('grl-demo', demo, 'parse_args', []),
    ('grl-infer', infer, 'run', []),
])
def test_ctrl_c_every_tool(tool, module, target, argv, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        print('partial output')
        raise KeyboardInterrupt

    monkeypatch.setattr(module, target, interrupted)
    if module is infer:
        argv = ['--checkpoint', 'x', '--input', 'y', '--output', 'z']
    assert module.main(argv) == 130
    cap = capsys.readouterr()
    assert cap.err == f'{tool}: interrupted\n'
    assert cap.out == 'partial output\n'


def test_interrupted_note_and_exit_status():
    @common.exits_on_interrupt('tool')
    def main(argv=None):
        raise common.Interrupted(f'after {argv[0]}  of\n9')

    assert common.EXIT_INTERRUPTED == 130
    assert common.interrupted_line('tool', common.Interrupted('after 1 of 2')) == 'tool: interrupted after 1 of 2'
    assert common.interrupted_line('tool', KeyboardInterrupt('ignored')) == 'tool: interrupted'
    assert main(['3']) == 130


def test_write_atomic(tmp_path, monkeypatch):
    dst = tmp_path / 'x.bin'
    dst.write_bytes(b'old')
    common.write_atomic(dst, b'new content')
    assert dst.read_bytes() == b'new content' and sorted(p.name for p in tmp_path.iterdir()) == ['x.bin']
    mask = os.umask(0)
    os.umask(mask)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600

    class Stop(KeyboardInterrupt):
        pass

    def broken(src, dst):
        raise Stop

    long = tmp_path / ('n' * 250 + '.png')  # no room for the usual temporary name
    common.write_atomic(long, b'long')
    assert long.read_bytes() == b'long'
    long.unlink()

    monkeypatch.setattr(common.os, 'replace', broken)
    with pytest.raises(Stop):
        common.write_atomic(dst, b'never')
    assert dst.read_bytes() == b'new content' and sorted(p.name for p in tmp_path.iterdir()) == ['x.bin']


# ------------------------------------------------------------------------------ --skip-existing
def test_skip_existing(kit, tmp_path, capsys, calls):
    from basicsr.metrics import calculate_psnr
    out = tmp_path / 'out'
    args = ['--checkpoint', kit['sr_ckpt'], '--input', kit['lr'], '--output', out, '--tile', 0, '--gt', kit['hr']]
    rc, _, err = run(args, capsys)
    assert rc == 0 and calls.n == 4, err
    first = {r['name']: r for r in metrics_rows(out)}

    # a: kept as it is (replaced by a different, valid picture: it must not be restored again),
    # b: deleted, c: unreadable, d: from another scale -> b, c, d restored
    inverted = 255 - cv2.imread(str(out / 'a_grl.png'))
    cv2.imwrite(str(out / 'a_grl.png'), inverted)
    (out / 'b_grl.png').unlink()
    (out / 'c_grl.png').write_bytes(b'\x89PNG\r\n\x1a\ntruncated')
    cv2.imwrite(str(out / 'd_grl.png'), np.zeros(SIZE + (3, ), np.uint8))
    calls.n = 0
    rc, _, err = run(args + ['--skip-existing'], capsys)
    assert rc == 0, err
    assert calls.n == 3 and 'restored 3 of 4 image(s)' in err and '1 already there' in err
    assert 'c_grl.png' in err and 'restoring it again' in err and 'd_grl.png is 24x20' in err
    np.testing.assert_array_equal(cv2.imread(str(out / 'a_grl.png')), inverted)
    for name in 'bcd':
        np.testing.assert_array_equal(read_rgb(out / f'{name}_grl.png'), q8(net(kit['sr'], lr01(kit, name))))
    rows = metrics_rows(out)
    assert [r['name'] for r in rows] == list(NAMES)
    gt_a = cv2.imread(str(kit['hr'] / 'a.png'))
    assert float(rows[0]['psnr']) == pytest.approx(calculate_psnr(inverted, gt_a, crop_border=2), abs=1e-3)
    assert abs(float(rows[0]['psnr']) - float(first['a']['psnr'])) > 1  # recomputed from the kept (inverted) file
    assert rows[0]['seconds'] == first['a']['seconds']  # the time it took when it was restored
    for row in rows[1:]:
        assert row['psnr'] == first[row['name']]['psnr'] and row['ssim'] == first[row['name']]['ssim']

    # all there: nothing goes through the network; without the option everything is restored again
    calls.n = 0
    rc, _, err = run(args + ['--skip-existing'], capsys)
    assert rc == 0 and calls.n == 0 and 'restored 0 of 4' in err and '4 already there' in err
    assert [r['name'] for r in metrics_rows(out)] == list(NAMES)
    rc, _, err = run(args, capsys)
    assert rc == 0 and calls.n == 4
    np.testing.assert_array_equal(read_rgb(out / 'a_grl.png'), q8(net(kit['sr'], lr01(kit, 'a'))))
    no_temporaries(out)


# ------------------------------------------------------------------------------ --ensemble
def dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """The test's own x8 transforms of an HxWxC array: k & 4 mirrors, k & 3 counter-clockwise turns."""
    if k & 4:
        img = img[:, ::-1]
    return np.ascontiguousarray(np.rot90(img, k & 3, axes=(0, 1)))


def undo_dihedral(img: np.ndarray, k: int) -> np.ndarray:
    img = np.rot90(img, -(k & 3), axes=(0, 1))
    return np.ascontiguousarray(img[:, ::-1] if k & 4 else img)


def hand_ensemble(fn, img: np.ndarray) -> np.ndarray:
    outs = [undo_dihedral(fn(dihedral(img, k)), k) for k in range(8)]
    assert len({o.tobytes() for o in outs}) == 8  # 8 different outputs: a test that can fail
    acc = outs[0]
    for o in outs[1:]:
        acc = acc + o
    return acc / 8


def test_dihedral_transforms_match_the_test_s_own():
    x = torch.rand(1, 3, 5, 7)
    img = x[0].permute(1, 2, 0).numpy()
    seen = set()
    for k in range(8):
        t = infer.transform(x, k)
        np.testing.assert_array_equal(t[0].permute(1, 2, 0).numpy(), dihedral(img, k))
        assert torch.equal(infer.untransform(t, k), x)
        seen.add(t.numpy().tobytes())
    assert len(seen) == 8


def test_ensemble_grl(kit, tmp_path, capsys, calls):
    img = lr01(kit, 'b')
    rc, _, err = run(['--checkpoint', kit['sr_ckpt'], '--input', kit['lr'] / 'b.png', '--output', tmp_path / 'x8',
                      '--tile', 0, '--ensemble'], capsys)
    assert rc == 0, err
    assert calls.n == 8 and 'x8 self-ensemble' in err
    expected = q8(hand_ensemble(lambda a: net(kit['sr'], a), img))
    got = read_rgb(tmp_path / 'x8' / 'b_grl.png')
    np.testing.assert_array_equal(got, expected)
    plain = q8(net(kit['sr'], img))
    assert np.mean(got != plain) > 0.2  # a random GRL is no equivariant network: the ensemble shows

    # with tiles: each transformed image is restored tile by tile (tiles 8, overlap 3, linear blend)
    calls.n = 0
    rc, _, err = run(['--checkpoint', kit['sr_ckpt'], '--input', kit['lr'] / 'b.png', '--output', tmp_path / 't',
                      '--tile', 8, '--overlap', 3, '--ensemble'], capsys)
    assert rc == 0, err

    def tiled(a):
        x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]
        with torch.no_grad():
            y = tiled_forward(kit['sr'], x, 8, 3, scale=2, multiple=8, blend='linear')
        return y[0].permute(1, 2, 0).numpy()

    assert calls.n == 8 * 4 * 5  # 20x24 in 8-pixel tiles with stride 5: 4 x 5 (5 x 4 when turned)
    got_tiled = read_rgb(tmp_path / 't' / 'b_grl.png')
    np.testing.assert_array_equal(got_tiled, q8(hand_ensemble(tiled, img)))
    assert np.mean(got_tiled != got) > 0.1  # the tiles did change the result


class Pointwise(torch.nn.Module):
    """A network that commutes with flips and rotations: 1x1 convolution then nearest x2 (or a 3x3
    convolution, which does not)."""

    def __init__(self, kernel: int = 1, scale: int = 2):
        super().__init__()
        torch.manual_seed(5)
        self.conv = torch.nn.Conv2d(3, 3, kernel, padding=kernel // 2)
        self.upscale, self.pad_size, self.in_channels = scale, 1, 3

    def forward(self, x):
        y = torch.sigmoid(self.conv(x))
        return torch.nn.functional.interpolate(y, scale_factor=self.upscale, mode='nearest') if self.upscale > 1 else y


@pytest.mark.parametrize('tile, overlap', [(None, 0), (8, 2), (7, 0)])
def test_ensemble_of_an_equivariant_network_is_the_plain_output(kit, tile, overlap):
    img = lr01(kit, 'c')
    point = Pointwise(1)
    plain = infer.Restorer(point, 'cpu', 'fp32', None, 0, 'linear').restore(img)
    x8 = infer.Restorer(point, 'cpu', 'fp32', tile, overlap, 'linear', ensemble=True).restore(img)
    np.testing.assert_allclose(x8, plain, atol=1e-6)
    # the same check on a 3x3 convolution (not equivariant: zero padding and an asymmetric kernel) fails
    conv = Pointwise(3)
    plain3 = infer.Restorer(conv, 'cpu', 'fp32', None, 0, 'linear').restore(img)
    x8_3 = infer.Restorer(conv, 'cpu', 'fp32', tile, overlap, 'linear', ensemble=True).restore(img)
    assert np.abs(x8_3 - plain3).max() > 1e-3
    if tile is None:  # and equals the mean of its 8 turned-back outputs
        np.testing.assert_allclose(x8_3, np.clip(hand_ensemble(lambda a: net(conv, a), img), 0, 1), atol=1e-6)
