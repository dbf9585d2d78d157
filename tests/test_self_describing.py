"""Checkpoints that describe themselves, geometry contradictions, and val.self_ensemble.

* A tiny GRLModel training run writes ``models/net_g_<iter>.pth`` with a ``grl_kwargs`` entry
  (the network's constructor kwargs): grl-infer, grl-convert and grl-export build the model from
  it with neither ``--opt`` nor ``--task``; BasicSR's own ``BaseModel.load_network`` still loads it.
* A window/stripe geometry from ``--opt`` / ``--task`` / ``--set`` that contradicts the file is
  one error line (exit status 2) unless ``--force``.
* ``val.self_ensemble: true`` makes ``GRLModel.test`` the mean of the 8 flipped/rotated outputs
  turned back (the helpers grl-infer ``--ensemble`` uses).
"""
from __future__ import annotations

import copy
import importlib.util
import warnings

import numpy as np
import pytest
import torch
import yaml

import grl_plugin  # noqa: F401  (registers, before basicsr)
from basicsr.data import build_dataloader, build_dataset
from basicsr.models import build_model

from grl_plugin.archs.checkpoint import CheckpointError, load_checkpoint
from grl_plugin.cli import convert, export, infer
from grl_plugin.tiling import ENSEMBLE, tiled_forward, transform, untransform

from helpers import dataset_options, make_lmdb, tiny_grl, write_options

cv2 = pytest.importorskip('cv2')


def model_opt(tmp_path, data, val=None, is_train=True, ema=0.9):
    """GRLModel options for the tiny x2 GRL on ``data`` (in-process, no CLI)."""
    return {
        'name': 'selfdesc', 'model_type': 'GRLModel', 'num_gpu': 0, 'dist': False, 'is_train': is_train,
        'scale': data['scale'], 'rank': 0, 'world_size': 1, 'manual_seed': 3, 'network_g': tiny_grl(data['scale']),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'models': str(tmp_path / 'models'),
                 'training_states': str(tmp_path / 'training_states'), 'visualization': str(tmp_path / 'vis')},
        'train': {'ema_decay': ema, 'optim_g': {'type': 'Adam', 'lr': 2e-3},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5}, 'total_iter': 4,
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}},
        'val': dict({'metrics': {}}, **(val or {})),
    }


def _loader(data, phase):
    opt = dict(dataset_options(data, phase, f'tiny_{phase}'), phase=phase, scale=data['scale'])
    return build_dataloader(build_dataset(opt), opt, num_gpu=0, dist=False, sampler=None)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Two iterations of a tiny GRLModel x2 (EMA on), saved as BasicSR saves: models/net_g_2.pth."""
    root = tmp_path_factory.mktemp('selfdesc')
    data = make_lmdb(root, n_images=4, size=32, scale=2)
    (root / 'models').mkdir()
    (root / 'training_states').mkdir()
    torch.manual_seed(0)
    model = build_model(model_opt(root, data))
    loader = _loader(data, 'train')
    for it, batch in zip((1, 2), loader):
        model.feed_data(batch)
        model.optimize_parameters(it)
    model.save(0, 2)
    img = cv2.imread(str(root / 'tiny_LQx2_png' / '0000.png'))
    cv2.imwrite(str(root / 'lq.png'), img)
    return {'root': root, 'data': data, 'model': model, 'ckpt': root / 'models' / 'net_g_2.pth',
            'opt': write_options(root, data), 'img': root / 'lq.png'}


def run_infer(args, capsys):
    rc = infer.main([str(a) for a in args] + ['--quiet'])
    return rc, capsys.readouterr().err


def one_error(rc, err, prog='grl-infer'):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f'{prog}: error: '), err
    return lines[0]


# ------------------------------------------------------------------------ the file describes itself
def test_saved_network_file_holds_plain_kwargs(trained):
    stored = torch.load(trained['ckpt'], map_location='cpu', weights_only=True)  # plain values only
    assert list(stored) == ['params', 'params_ema', 'grl_kwargs']
    net = trained['model'].get_bare_model(trained['model'].net_g)
    assert stored['grl_kwargs'] == net.init_kwargs
    assert stored['grl_kwargs']['window_size'] == 4 and stored['grl_kwargs']['stripe_size'] == [8, 8]
    assert stored['grl_kwargs']['upscale'] == 2 and stored['grl_kwargs']['embed_dim'] == 16
    assert 'init_kwargs' not in ''.join(net.state_dict())  # the state dict is unchanged
    assert stored['params']._metadata and stored['params_ema']._metadata  # BasicSR keeps it
    for key, ref in (('params', net), ('params_ema', trained['model'].net_g_ema)):
        assert all(torch.equal(stored[key][k], v) for k, v in ref.state_dict().items())


def test_load_checkpoint_reads_the_kwargs(trained):
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # nothing missing, nothing contradicting
        sd, kwargs = load_checkpoint(trained['ckpt'])
    assert kwargs.missing == [] and kwargs.format == 'basicsr (params_ema)'
    assert kwargs.origin['window_size'] == 'metadata' and kwargs.origin['embed_dim'] == 'weights'
    want = {k: v for k, v in tiny_grl(2).items() if k != 'type'}
    assert {k: kwargs[k] for k in want} == want
    ema = trained['model'].net_g_ema
    assert all(torch.equal(sd[k], v) for k, v in ema.state_dict().items())


def test_basicsr_base_model_still_loads_it(trained):
    from basicsr.models.base_model import BaseModel
    from grl_plugin import GRL
    base = object.__new__(BaseModel)
    base.opt = {'dist': False, 'num_gpu': 0}
    for key, ref in (('params', trained['model'].net_g), ('params_ema', trained['model'].net_g_ema)):
        net = GRL(**{k: v for k, v in tiny_grl(2).items() if k != 'type'})
        BaseModel.load_network(base, net, str(trained['ckpt']), strict=True, param_key=key)
        assert all(torch.equal(net.state_dict()[k], v) for k, v in ref.state_dict().items()), key


def test_infer_without_opt_or_task_equals_with_opt(trained, tmp_path, capsys):
    rc, err = run_infer(['--checkpoint', trained['ckpt'], '--input', trained['img'], '--output', tmp_path / 'a',
                         '--tile', 0], capsys)
    assert rc == 0, err
    assert 'window 4, stripes [8, 8]' in err and 'note' not in err and 'warning' not in err
    rc, err = run_infer(['--checkpoint', trained['ckpt'], '--opt', trained['opt'], '--input', trained['img'],
                         '--output', tmp_path / 'b', '--tile', 0], capsys)
    assert rc == 0, err
    a = cv2.imread(str(tmp_path / 'a' / 'lq_grl.png'))
    b = cv2.imread(str(tmp_path / 'b' / 'lq_grl.png'))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)  # x2 of the 16x16 input
    # and it is the EMA network's output
    x = torch.from_numpy(cv2.imread(str(trained['img']))[..., ::-1].astype(np.float32).transpose(2, 0, 1) / 255)[None]
    with torch.no_grad():
        ref = trained['model'].net_g_ema.eval()(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    assert np.array_equal(a[..., ::-1], (ref * 255).round().astype(np.uint8))


def test_convert_and_export_without_geometry_options(trained, tmp_path, capsys):
    assert convert.main([str(trained['ckpt']), str(tmp_path / 'g.safetensors')]) == 0
    out = capsys.readouterr().out
    assert 'window_size: 4  [metadata]' in out
    assert load_checkpoint(tmp_path / 'g.safetensors')[1]['stripe_size'] == [8, 8]
    args = export.build_parser().parse_args(['--checkpoint', str(trained['ckpt']), '--tile', '8',
                                             '--output', str(tmp_path / 'g.onnx')])
    model, kwargs, _ = infer.load_model(args, 'grl-export')
    assert model.window_size == 4 and model.stripe_size == [8, 8] and kwargs['upscale'] == 2
    assert capsys.readouterr().err == ''


# -------------------------------------------------------------- contradicting geometry: exit 2 / --force
def _opt_with(tmp_path, trained, **net):
    opt = yaml.safe_load(trained['opt'].read_text())
    opt['network_g'].update(net)
    path = tmp_path / 'other.yml'
    path.write_text(yaml.safe_dump(opt))
    return path


def test_infer_contradicting_geometry_is_an_error_unless_force(trained, tmp_path, capsys):
    other = _opt_with(tmp_path, trained, window_size=8)
    base = ['--checkpoint', trained['ckpt'], '--input', trained['img'], '--tile', 0]
    line = one_error(*run_infer(base + ['--opt', other, '--output', tmp_path / 'x'], capsys))
    assert 'net_g_2.pth' in line and 'window_size=8' in line and 'window_size=4' in line and '--force' in line
    assert not (tmp_path / 'x').exists()
    line = one_error(*run_infer(base + ['--task', 'sr', '--scale', '2', '--output', tmp_path / 'x'], capsys))
    assert '--task sr gives window_size=' in line and 'stores window_size=4' in line
    # --force: the given value wins, with a warning naming it
    rc, err = run_infer(base + ['--opt', other, '--output', tmp_path / 'f', '--force'], capsys)
    assert rc == 0, err
    assert 'grl-infer: warning: using window_size=8 from --opt other.yml (the checkpoint stores 4)' in err
    assert 'window 8,' in err
    # --task with --force: its geometry, but the shapes (embed_dim, depths, head...) stay the weights'
    rc, err = run_infer(base + ['--task', 'sr', '--scale', '2', '--output', tmp_path / 't', '--force'], capsys)
    assert rc == 0, err
    assert 'warning: using window_size=32 from --task sr' in err and 'window 32,' in err
    assert 'embed_dim' not in err and 'upsampler' not in err
    rc, err = run_infer(base + ['--output', tmp_path / 'plain'], capsys)
    assert rc == 0, err
    forced = cv2.imread(str(tmp_path / 'f' / 'lq_grl.png'))
    plain = cv2.imread(str(tmp_path / 'plain' / 'lq_grl.png'))
    assert forced.shape == plain.shape and not np.array_equal(forced, plain)  # another geometry, another output
    # a value the file stores that is not geometry (img_size) stays a note
    rc, err = run_infer(base + ['--opt', _opt_with(tmp_path, trained, img_size=48), '--output', tmp_path / 'n'],
                        capsys)
    assert rc == 0 and 'grl-infer: note: using img_size=48' in err, err


def test_convert_and_export_contradicting_geometry(trained, tmp_path, capsys):
    src, dst = str(trained['ckpt']), str(tmp_path / 'o.pth')
    assert convert.main([src, dst, '--set', 'stripe_size=[16, 16]']) == 2
    line = one_error(2, capsys.readouterr().err, 'grl-convert')
    assert 'stripe_size=[16, 16]' in line and 'stripe_size=[8, 8]' in line and '--force' in line
    assert not (tmp_path / 'o.pth').exists()
    assert convert.main([src, dst, '--set', 'window_size=4']) == 0  # the same value: fine
    capsys.readouterr()
    assert convert.main([src, dst, '--set', 'window_size=8', '--force']) == 0
    cap = capsys.readouterr()
    assert 'grl-convert: warning: using window_size=8' in cap.err and 'window_size: 8  [given]' in cap.out
    assert load_checkpoint(dst)[1]['window_size'] == 8
    rc = export.main(['--checkpoint', src, '--task', 'sr', '--scale', '2', '--tile', '8',
                      '--output', str(tmp_path / 'e.onnx')])
    line = one_error(rc, capsys.readouterr().err, 'grl-export')
    if importlib.util.find_spec('onnx') is None:  # without onnx, that error comes first
        assert 'needs the onnx package' in line
    else:
        assert '--task sr gives window_size=' in line and 'stores window_size=4' in line
    assert not (tmp_path / 'e.onnx').exists()


# ------------------------------------------------------------------------------- val.self_ensemble
def _hand_ensemble(net, lq, tile=None, overlap=0):
    outs = []
    with torch.no_grad():
        for k in ENSEMBLE:
            y = tiled_forward(net, transform(lq, k).contiguous(), tile, overlap, scale=2, multiple=net.pad_size)
            outs.append(untransform(y, k))
    return torch.stack(outs).mean(0)


@pytest.mark.parametrize('tile', [None, 8])
def test_self_ensemble_in_grl_model_test(trained, tmp_path, tile):
    val = {'self_ensemble': True}
    if tile:
        val['tile'] = {'size': tile, 'overlap': 2}
    opt = model_opt(tmp_path, trained['data'], val=val, is_train=False)
    opt['path']['pretrain_network_g'] = str(trained['ckpt'])
    model = build_model(opt)
    batch = next(iter(_loader(trained['data'], 'val')))
    model.feed_data(batch)
    model.test()
    net = model.get_bare_model(model.net_g)
    expected = _hand_ensemble(net, model.lq, tile, 2 if tile else 0)
    assert model.output.shape == expected.shape == (1, 3, 32, 32)
    assert torch.allclose(model.output, expected, atol=1e-6)
    model.lq = model.lq[..., :12].contiguous()  # not square: the quarter turns swap the sides
    model.test()
    wide = _hand_ensemble(net, model.lq, tile, 2 if tile else 0)
    assert model.output.shape == wide.shape == (1, 3, 32, 24)
    assert torch.allclose(model.output, wide, atol=1e-6)
    model.feed_data(batch)
    model.opt['val']['self_ensemble'] = False
    model.test()
    plain = model.output
    assert (plain - expected).abs().max() > 1e-3  # a trained GRL is not equivariant: the ensemble shows
    with torch.no_grad():
        assert torch.allclose(plain, tiled_forward(net, model.lq, tile, 2 if tile else 0, scale=2,
                                                   multiple=net.pad_size), atol=1e-6)


def test_self_ensemble_option_is_checked(trained, tmp_path):
    from grl_plugin.cli.validate import validate_options
    opt = model_opt(tmp_path, trained['data'], val={'self_ensemble': 'yes'}, is_train=False)
    model = build_model(copy.deepcopy(dict(opt, val={'metrics': {}})))
    model.opt['val']['self_ensemble'] = 'yes'
    model.feed_data(next(iter(_loader(trained['data'], 'val'))))
    with pytest.raises(ValueError, match="val.self_ensemble must be true .* got 'yes'"):
        model.test()
    problems = [p for p in validate_options(opt, 'test', paths=False) if p.key.startswith('val.self')]
    assert len(problems) == 1 and 'true' in problems[0].message and problems[0].value == 'yes'
    opt['val']['self_ensemble'] = True
    assert not [p for p in validate_options(opt, 'test', paths=False) if p.key.startswith('val.self')]
    opt['val']['self_ensembel'] = opt['val'].pop('self_ensemble')  # a misspelling of the known key
    assert any('self_ensemble' in p.message for p in validate_options(opt, 'test', paths=False)
               if p.key == 'val.self_ensembel')


def test_stored_geometry_is_checked_before_use(trained, tmp_path, capsys):
    """A file whose grl_kwargs hold a geometry GRL cannot run with: one line, nothing written."""
    stored = torch.load(trained['ckpt'], weights_only=True)
    bad = tmp_path / 'bad.pth'
    torch.save({'params': stored['params'], 'grl_kwargs': dict(stored['grl_kwargs'], window_size=0)}, bad)
    line = one_error(*run_infer(['--checkpoint', bad, '--input', trained['img'], '--output', tmp_path / 'o'],
                                capsys))
    assert 'bad.pth' in line and 'window_size=0' in line and not (tmp_path / 'o').exists()
    assert convert.main([str(bad), str(tmp_path / 'c.pth')]) == 2
    line = one_error(2, capsys.readouterr().err, 'grl-convert')
    assert 'window_size=0' in line and not (tmp_path / 'c.pth').exists()


def test_grl_model_loads_bare_weights_with_geometry_from_network_g(trained, tmp_path):
    """The public API refuses bare weights; GRLModel (network_g gives the geometry) does not."""
    bare = tmp_path / 'bare.pth'
    torch.save(torch.load(trained['ckpt'], weights_only=True)['params'], bare)
    with pytest.raises(CheckpointError, match='window_size'):
        load_checkpoint(bare)
    opt = model_opt(tmp_path, trained['data'], is_train=False)
    opt['path']['pretrain_network_g'] = str(bare)
    model = build_model(opt)
    ref = trained['model'].net_g.state_dict()
    assert all(torch.equal(model.net_g.state_dict()[k], v) for k, v in ref.items())
