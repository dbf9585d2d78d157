"""grl-export: the tiny GRL exported to ONNX at 32x32 runs under onnxruntime like PyTorch."""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch

import grl_plugin  # noqa: F401
from grl_plugin import GRL
from grl_plugin.cli import export

TINY = dict(in_channels=3, embed_dim=16, num_heads_window=[1], num_heads_stripe=[1], window_size=4,
            stripe_size=[8, 8], stripe_groups=[None, None], stripe_shift=True, anchor_window_down_factor=2,
            mlp_ratio=2, upscale=2, upsampler='pixelshuffle')


def _ckpt(tmp_path, depth: int):
    kwargs = dict(TINY, depths=[depth])
    torch.manual_seed(depth)
    model = GRL(**kwargs).eval()
    path = tmp_path / f'sr_grl_tiny_c3x2_d{depth}.ckpt'
    torch.save({'state_dict': {'model.' + k: v for k, v in model.state_dict().items()},
                'hyper_parameters': {'model': kwargs}}, path)
    return path, model


@pytest.mark.parametrize('depth, tile', [(1, 32), (4, 32), (1, 64)])  # 4 blocks: shifted windows and stripes
def test_export_matches_pytorch(tmp_path, capsys, depth, tile):
    """grl-export as docs/checkpoints.md runs it (tile 64), and at 32x32."""
    ort = pytest.importorskip('onnxruntime', reason='onnxruntime is not available on this platform')
    pytest.importorskip('onnx', reason='onnx is not installed')
    ckpt, model = _ckpt(tmp_path, depth)
    out = tmp_path / 'grl_tiny_x2.onnx'
    rc = export.main(['--checkpoint', str(ckpt), '--tile', str(tile), '--output', str(out), '--check'])
    text = capsys.readouterr().out
    assert rc == 0, text
    delta = float(re.search(r'max \|delta\| = (\S+)', text).group(1))
    print(f'ONNX max |delta| (depth {depth}, tile {tile}): {delta:.3g}', file=sys.__stderr__)
    assert delta <= 1e-4
    # an independent run on a real-looking input
    x = torch.linspace(0, 1, 3 * tile * tile).reshape(1, 3, tile, tile).flip(-1)
    runner = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    (inp, ), (outp, ) = runner.get_inputs(), runner.get_outputs()
    assert inp.name == 'input' and list(inp.shape) == [1, 3, tile, tile]
    assert list(outp.shape) == [1, 3, 2 * tile, 2 * tile]
    y = runner.run(None, {'input': x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(y - ref).max() <= 1e-4
    meta = {p.key: p.value for p in __import__('onnx').load(str(out)).metadata_props}
    assert meta['tile'] == str(tile) and meta['scale'] == '2' and '"window_size": 4' in meta['grl_kwargs']


def test_export_errors(tmp_path, capsys, monkeypatch):
    ckpt, _ = _ckpt(tmp_path, 1)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, 'onnx', None)  # as if not installed
        rc = export.main(['--checkpoint', str(ckpt), '--tile', '32', '--output', str(tmp_path / 'a.onnx')])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith('grl-export: error:')
    assert 'pip install onnx onnxruntime' in err[0]
    pytest.importorskip('onnx', reason='onnx is not installed')
    rc = export.main(['--checkpoint', str(ckpt), '--tile', '30', '--output', str(tmp_path / 'a.onnx')])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and 'multiple 8' in err[0] and '24 or 32' in err[0]
    assert not (tmp_path / 'a.onnx').exists()


def _released_ckpt(tmp_path, task: str, depth: int = 4):
    """GRL-T at a released task geometry with one stage of ``depth`` blocks (blocks 2 and 3
    shift their windows and stripes), saved as BasicSR weights."""
    from grl_plugin.archs.tasks import task_kwargs
    kwargs = task_kwargs(task, 'T', scale=2, depths=[depth], num_heads_window=[2], num_heads_stripe=[2])
    torch.manual_seed(1)
    model = GRL(**kwargs).eval()
    path = tmp_path / f'{task}_grl_t_d{depth}.pth'
    torch.save({'params': model.state_dict()}, path)
    return path, model


@pytest.mark.parametrize('task, tile', [('sr', 64), ('dn', 128), ('sr', 128)])
def test_export_tile_equal_to_the_stripe_with_shifted_stripes(tmp_path, capsys, task, tile):
    """A tile as long as a stripe leaves the first region of the shifted-stripe masks empty;
    building the masks wrote into that empty slice and the ONNX exporter's shape inference
    failed with an internal assertion (GRL-T x2 at tile 64; denoising at 128)."""
    ort = pytest.importorskip('onnxruntime', reason='onnxruntime is not available on this platform')
    pytest.importorskip('onnx', reason='onnx is not installed')
    from grl_plugin.layers import geometry
    geometry.stripe_masks.cache_clear()  # masks are built inside the trace, as on a fresh model
    ckpt, model = _released_ckpt(tmp_path, task)
    assert tile % model.pad_size == 0  # the padding multiple (64 for sr, 128 for dn)
    out = tmp_path / f'{task}.onnx'
    argv = ['--checkpoint', str(ckpt), '--task', task, '--size', 'T', '--tile', str(tile), '--output', str(out)]
    rc = export.main(argv + (['--scale', '2'] if task == 'sr' else []))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    x = torch.rand(1, 3, tile, tile, generator=torch.Generator().manual_seed(3))
    runner = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    y = runner.run(None, {'input': x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    scale = 2 if task == 'sr' else 1
    assert y.shape == (1, 3, scale * tile, scale * tile)
    assert np.abs(y - ref).max() <= 1e-4


@pytest.mark.parametrize('size, stripe, shift', [((64, 64), (64, 64), (32, 32)), ((128, 128), (64, 128), (32, 64)),
                                                  ((32, 64), (8, 64), (4, 32))])
def test_region_labels_when_a_stripe_spans_the_axis(size, stripe, shift):
    """Labels of the shifted layout, also where the region [0, -stripe) is empty: equal labels
    exactly for pixels in the same region (rows < H - stripe, < H - shift, rest; same for columns)."""
    from grl_plugin.layers.geometry import _region_labels
    labels = _region_labels(size, stripe, shift, torch.device('cpu'))
    h, w = size
    rows = torch.arange(h)
    cols = torch.arange(w)
    band = lambda i, n, s, t: (i >= n - s).long() + (i >= n - t).long()  # noqa: E731
    expect = band(rows, h, stripe[0], shift[0])[:, None] * 3 + band(cols, w, stripe[1], shift[1])[None, :]
    from einops import rearrange
    expect = rearrange(expect.float(), '(nh a) (nw b) -> (nh nw) (a b)', a=stripe[0], b=stripe[1])
    same = labels[:, :, None] == labels[:, None, :]
    assert torch.equal(same, expect[:, :, None] == expect[:, None, :])
    assert len(labels.unique()) == len(expect.unique())
