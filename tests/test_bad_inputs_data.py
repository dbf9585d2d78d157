"""Bad inputs: unreadable images, missing LMDB keys, ``skip_corrupt``, untrusted / truncated /
wrong-architecture checkpoints -- each must give one line naming the file (or the LMDB key and
path), never an obscure OpenCV / NoneType error, a silently wrong sample or a bare traceback.

Data are crops of the photographs bundled with scikit-image (``helpers.make_lmdb``); networks are
tiny GRLs (embed_dim 8-16, one stage) and a tiny MSRResNet.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import grl_plugin  # noqa: F401 - import fixes + registration before basicsr
from basicsr.data import build_dataset
from basicsr.models import build_model

from grl_plugin import patching
from grl_plugin.archs.checkpoint import CheckpointError, check_fit, load_checkpoint, torch_load
from grl_plugin.cli import convert as convert_cli
from grl_plugin.cli import infer as infer_cli
from grl_plugin.data import DualPixelDataset, GaussianNoiseDataset, JPEGDataset
from grl_plugin.data.robust import DataError, SkipCorruptDataset, decode_image, error_line
from grl_plugin.models.checkpoint_io import load_resume_state

from helpers import make_lmdb, run_cli, write_test_options

NET = dict(in_channels=3, embed_dim=16, depths=[1], num_heads_window=[1], num_heads_stripe=[1], window_size=4,
           stripe_size=[8, 8], stripe_groups=[None, None], stripe_shift=True, anchor_window_down_factor=2,
           mlp_ratio=2, upsampler='', upscale=1, drop_path_rate=0.0)


def _one_line(msg: str, *names) -> str:
    msg = str(msg)
    assert '\n' not in msg, msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


@pytest.fixture
def warnings_log():
    """Records the warnings of BasicSR's logger (which may not propagate to pytest's caplog)."""
    records = []

    class _Handler(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger('basicsr')
    handler, level = _Handler(logging.WARNING), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level or logging.WARNING, logging.WARNING))
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope='module')
def lmdb_data(tmp_path_factory):
    """4 GT/LQ x2 crops: PNG folders (``tiny_GT_png``, ``tiny_LQx2_png``) and their LMDBs."""
    return make_lmdb(tmp_path_factory.mktemp('bad_data'), n_images=4, size=16, scale=2)


def _copy_gt_folder(data, tmp_path) -> Path:
    src = Path(data['gt']).parent / 'tiny_GT_png'
    return Path(shutil.copytree(src, tmp_path / 'GT'))


def _noise_opt(root, **kw):
    return dict(dict(name='noisy', type='GaussianNoiseDataset', dataroot_gt=str(root), sigma=15,
                     io_backend=dict(type='disk'), phase='val'), **kw)


def _copy_lmdb(path, tmp_path, extra_keys=()):
    """A copy of an LMDB whose meta_info.txt also lists ``extra_keys`` (absent from the database)."""
    dst = Path(shutil.copytree(path, tmp_path / Path(path).name))
    with open(dst / 'meta_info.txt', 'a') as f:
        for key in extra_keys:
            f.write(f'{key}.png (16,16,3) 1\n')
    return str(dst)


# ------------------------------------------------------------------------------------------ data

def test_corrupt_png_in_folder_dataset_names_the_file(lmdb_data, tmp_path):
    folder = _copy_gt_folder(lmdb_data, tmp_path)
    bad = folder / '0001.png'
    bad.write_bytes(bad.read_bytes()[:40])  # PNG signature + part of the header
    ds = GaussianNoiseDataset(_noise_opt(folder))
    assert ds[0]['gt'].shape == (3, 16, 16)
    with pytest.raises(DataError) as info:
        ds[1]
    msg = _one_line(info.value, bad)
    assert 'cannot decode' in msg and 'NoneType' not in msg


def test_zero_byte_and_non_image_files(lmdb_data, tmp_path):
    folder = _copy_gt_folder(lmdb_data, tmp_path)
    (folder / '0002.png').write_bytes(b'')
    (folder / '0003.png').write_text('this is a text file, not a picture')
    ds = JPEGDataset(dict(_noise_opt(folder, type='JPEGDataset'), quality=20))
    with pytest.raises(DataError, match='is empty') as info:
        ds[2]
    _one_line(info.value, folder / '0002.png')
    with pytest.raises(DataError, match='cannot decode') as info:
        ds[3]
    _one_line(info.value, folder / '0003.png')


def test_file_listed_in_meta_info_but_missing(lmdb_data, tmp_path):
    folder = _copy_gt_folder(lmdb_data, tmp_path)
    meta = tmp_path / 'meta.txt'
    meta.write_text('0000.png (16,16,3)\nghost.png (16,16,3)\n')
    ds = GaussianNoiseDataset(_noise_opt(folder, meta_info_file=str(meta)))
    with pytest.raises(DataError, match='cannot read') as info:
        ds[1]
    _one_line(info.value, folder / 'ghost.png')


def test_missing_lmdb_key_plugin_dataset(lmdb_data, tmp_path):
    gt = _copy_lmdb(lmdb_data['gt'], tmp_path, ['9999'])
    ds = GaussianNoiseDataset(_noise_opt(gt, io_backend=dict(type='lmdb')))
    assert len(ds) == 5 and ds[0]['gt_path'] == '0000'
    with pytest.raises(DataError) as info:
        ds[4]
    msg = _one_line(info.value, "'9999'", gt)
    assert 'not found' in msg


def test_missing_lmdb_key_basicsr_paired_dataset(lmdb_data, tmp_path):
    """BasicSR's LmdbBackend.get returns None for the missing key; robust.install names it."""
    assert patching.patches()['basicsr.utils.file_client:FileClient.get'] == 'grl_plugin.data.robust'
    gt = _copy_lmdb(lmdb_data['gt'], tmp_path, ['9999'])
    lq = _copy_lmdb(lmdb_data['lq'], tmp_path, ['9999'])
    opt = dict(name='pairs', type='PairedImageDataset', dataroot_gt=gt, dataroot_lq=lq, io_backend=dict(type='lmdb'),
               phase='val', scale=2)
    ds = build_dataset(copy.deepcopy(opt))
    assert type(ds).__name__ == 'PairedImageDataset' and len(ds) == 5
    assert ds[0]['gt'].shape == (3, 16, 16)
    with pytest.raises(DataError) as info:
        ds[4]
    _one_line(info.value, "'9999'", gt)
    # what basicsr itself does: None, which imfrombytes then trips over
    plain_get = patching.original('basicsr.utils.file_client', 'FileClient.get')
    assert plain_get(ds.file_client, '9999', 'gt') is None


def test_corrupt_png_basicsr_paired_folder_dataset(lmdb_data, tmp_path):
    root = Path(lmdb_data['gt']).parent
    gt = Path(shutil.copytree(root / 'tiny_GT_png', tmp_path / 'gt'))
    lq = Path(shutil.copytree(root / 'tiny_LQx2_png', tmp_path / 'lq'))
    (lq / '0002.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 64)
    ds = build_dataset(dict(name='pairs', type='PairedImageDataset', dataroot_gt=str(gt), dataroot_lq=str(lq),
                            io_backend=dict(type='disk'), phase='val', scale=2))
    with pytest.raises(DataError) as info:
        ds[2]
    _one_line(info.value, lq / '0002.png')


def test_decode_image_matches_basicsr_and_follows_the_decoder(lmdb_data):
    png = (Path(lmdb_data['gt']).parent / 'tiny_GT_png' / '0000.png').read_bytes()
    plain = patching.original('basicsr.utils.img_util', 'imfrombytes')
    from basicsr.utils import imfrombytes  # the patched one
    for flag in ('color', 'grayscale', 'unchanged'):
        for f32 in (False, True):
            assert np.array_equal(imfrombytes(png, flag, f32), plain(png, flag, f32))
    rgb = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    ok, jpg = cv2.imencode('.jpg', cv2.resize(rgb, (64, 64)))
    jpg = jpg.tobytes()
    assert decode_image(jpg, 'x.jpg').shape == (64, 64, 3)
    # a "motion photo": a video appended after the JPEG's end-of-image marker decodes as the JPEG
    motion = jpg + b'\x00\x00\x00\x18ftypmp42' + bytes(range(256)) * 8
    assert np.array_equal(decode_image(motion, 'motion.jpg'), decode_image(jpg, 'x.jpg'))
    assert np.array_equal(imfrombytes(motion, 'color', True), plain(motion, 'color', True))
    cut = jpg[:-40]  # cut inside the image data: refused when (and only when) OpenCV refuses it
    if cv2.imdecode(np.frombuffer(cut, np.uint8), cv2.IMREAD_COLOR) is None:
        with pytest.raises(DataError, match='x.jpg'):
            decode_image(cut, 'x.jpg')
    else:
        assert decode_image(cut, 'x.jpg').shape == (64, 64, 3)
    with pytest.raises(DataError, match='image data is empty'):
        imfrombytes(b'')


def test_skip_corrupt_plugin_dataset_warns_with_count(lmdb_data, tmp_path, warnings_log):
    folder = _copy_gt_folder(lmdb_data, tmp_path)
    (folder / '0001.png').write_bytes(b'')
    (folder / '0002.png').write_bytes(b'GIF89a broken')
    ds = GaussianNoiseDataset(_noise_opt(folder, skip_corrupt=True))
    item = ds[1]  # 1 and 2 are bad: the next readable sample, 3, comes back, named by its own path
    assert item['gt_path'] == str(folder / '0003.png')
    reference = GaussianNoiseDataset(_noise_opt(folder))[3]
    assert torch.equal(item['gt'], reference['gt']) and torch.equal(item['lq'], reference['lq'])
    assert len(warnings_log) == 2
    assert '0001.png' in warnings_log[0] and '1 corrupt sample(s)' in warnings_log[0]
    assert '0002.png' in warnings_log[1] and '2 corrupt sample(s)' in warnings_log[1]
    assert ds[2]['gt_path'].endswith('0003.png') and ds[0]['gt_path'].endswith('0000.png')
    assert len(warnings_log) == 2  # known-bad samples are skipped without reading them again


def test_skip_corrupt_basicsr_dataset_and_dual_pixel(lmdb_data, tmp_path, warnings_log):
    gt = _copy_lmdb(lmdb_data['gt'], tmp_path, ['9999'])
    lq = _copy_lmdb(lmdb_data['lq'], tmp_path, ['9999'])
    ds = build_dataset(dict(name='pairs', type='PairedImageDataset', dataroot_gt=gt, dataroot_lq=lq,
                            io_backend=dict(type='lmdb'), phase='train', scale=2, gt_size=8, use_hflip=False,
                            use_rot=False, skip_corrupt=True))
    assert isinstance(ds, SkipCorruptDataset) and len(ds) == 5 and ds.paths[4]['gt_path'] == '9999'
    assert ds[4]['gt_path'] == '0000'  # wraps around to the first sample
    assert len(warnings_log) == 1 and "'9999'" in warnings_log[0] and '1 corrupt sample(s)' in warnings_log[0]
    # dual pixel: a corrupt right view
    root = Path(lmdb_data['gt']).parent / 'tiny_GT_png'
    for sub in ('target', 'left', 'right'):
        shutil.copytree(root, tmp_path / 'dp' / sub)
    bad = tmp_path / 'dp' / 'right' / '0000.png'
    bad.write_bytes(bad.read_bytes()[:100])
    opt = dict(name='dp', dataroot_gt=str(tmp_path / 'dp' / 'target'), dataroot_lq_left=str(tmp_path / 'dp' / 'left'),
               dataroot_lq_right=str(tmp_path / 'dp' / 'right'), io_backend=dict(type='disk'), phase='val')
    with pytest.raises(DataError) as info:
        DualPixelDataset(dict(opt))[0]
    _one_line(info.value, bad)
    item = DualPixelDataset(dict(opt, skip_corrupt=True))[0]
    assert item['gt_path'].endswith('0001.png') and item['lq'].shape == (6, 16, 16)
    assert str(bad) in warnings_log[-1]


def test_all_corrupt_dataset_stops_with_clear_error(tmp_path, warnings_log):
    folder = tmp_path / 'broken'
    folder.mkdir()
    for i in range(3):
        (folder / f'{i}.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes([i]) * 10)
    ds = GaussianNoiseDataset(_noise_opt(folder, skip_corrupt=True))
    with pytest.raises(DataError, match=r'noisy: none of the 3 samples can be read \(skip_corrupt: true\)') as info:
        ds[1]
    _one_line(info.value)
    assert len(warnings_log) == 3
    with pytest.raises(DataError, match='none of the 3 samples'):  # again, without re-reading
        ds[0]
    assert len(warnings_log) == 3


def test_error_from_dataloader_worker_is_one_line(lmdb_data, tmp_path):
    """A DataError raised in a DataLoader worker comes back with the worker's traceback in its
    message; ``error_line`` (used by grl-train/grl-test) keeps the original line."""
    from torch._utils import ExceptionWrapper
    try:
        raise DataError('cannot decode image file /data/x.png: corrupt, truncated or not an image')
    except DataError:
        wrapped = ExceptionWrapper(where='in DataLoader worker process 0')
    with pytest.raises(DataError) as info:
        wrapped.reraise()
    assert '\n' in str(info.value)
    assert error_line(info.value) == 'cannot decode image file /data/x.png: corrupt, truncated or not an image'


# ----------------------------------------------------------------------------------- checkpoints

def _grl(**kw):
    from grl_plugin import GRL
    torch.manual_seed(0)
    return GRL(**dict(NET, **kw)).eval()


def _model_opt(tmp_path, pretrain, network=None, **path):
    return {'name': 't', 'model_type': 'GRLModel', 'num_gpu': 0, 'dist': False, 'is_train': False, 'scale': 1,
            'rank': 0, 'world_size': 1, 'network_g': network or dict(NET, type='GRL'),
            'path': dict(dict(pretrain_network_g=str(pretrain), strict_load_g=True, param_key_g='params',
                              visualization=str(tmp_path / 'vis')), **path),
            'val': {}}


class _Payload:
    """Unpickling calls ``os.system('touch MARKER')`` -- a malicious global."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


def test_malicious_pickle_refused_through_grl_model(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'params': _grl().state_dict(), 'x': _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r'refusing to unpickle posix\.system') as info:
        build_model(_model_opt(tmp_path, path))
    msg = _one_line(info.value, path)
    assert 'trust_checkpoint' in msg and not marker.exists()


def test_unknown_global_needs_trust_checkpoint(tmp_path):
    mod = types.ModuleType('grl_bad_inputs_thirdparty')

    class Note:
        pass

    Note.__module__, Note.__qualname__, mod.Note = mod.__name__, 'Note', Note
    sys.modules[mod.__name__] = mod
    try:
        src = _grl()
        path = tmp_path / 'with_note.pth'
        torch.save({'params': src.state_dict(), 'note': Note()}, path)
        with pytest.raises(CheckpointError, match='grl_bad_inputs_thirdparty.Note') as info:
            build_model(_model_opt(tmp_path, path))
        _one_line(info.value, path)
        model = build_model(_model_opt(tmp_path, path, trust_checkpoint=True))
        for k, v in src.state_dict().items():
            assert torch.equal(model.net_g.state_dict()[k], v), k
        # the same rule for training states (resume) and plain torch files
        state = tmp_path / '7.state'
        torch.save({'iter': 7, 'epoch': 0, 'optimizers': [], 'schedulers': [], 'note': Note()}, state)
        opt = {'auto_resume': False, 'name': 't', 'num_gpu': 0, 'path': {'resume_state': str(state)}}
        with pytest.raises(CheckpointError, match='grl_bad_inputs_thirdparty.Note'):
            load_resume_state(copy.deepcopy(opt))
        opt['path'].update(trust_checkpoint=True, models=str(tmp_path / 'models'))
        assert load_resume_state(opt)['iter'] == 7
    finally:
        del sys.modules[mod.__name__]


def test_truncated_pth_everywhere(tmp_path, capsys):
    good = tmp_path / 'good.pth'
    torch.save({'params': _grl().state_dict()}, good)
    path = tmp_path / 'half.pth'
    path.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    for load in (lambda: load_checkpoint(path), lambda: torch_load(path),
                 lambda: build_model(_model_opt(tmp_path, path))):
        with pytest.raises(CheckpointError, match='corrupt or truncated') as info:
            load()
        _one_line(info.value, path)
    assert convert_cli.main([str(path), str(tmp_path / 'out.pth')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('grl-convert: error: ') and err.count('\n') == 1 and str(path) in err
    img = tmp_path / 'in.png'
    cv2.imwrite(str(img), np.full((8, 8, 3), 128, np.uint8))
    assert infer_cli.main(['--checkpoint', str(path), '--task', 'dn', '--input', str(img),
                           '--output', str(tmp_path / 'o'), '--quiet']) == 2
    err = capsys.readouterr().err
    assert err.startswith('grl-infer: error: ') and err.count('\n') == 1 and str(path) in err
    # a truncated training state
    state = tmp_path / '5.state'
    torch.save({'iter': 5, 'epoch': 0, 'optimizers': [], 'schedulers': []}, state)
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(CheckpointError, match='corrupt or truncated') as info:
        load_resume_state({'auto_resume': False, 'num_gpu': 0, 'path': {'resume_state': str(state)}})
    _one_line(info.value, state)


def test_wrong_architecture_through_grl_model(tmp_path):
    other = tmp_path / 'embed8.pth'
    torch.save({'params': _grl(embed_dim=8).state_dict()}, other)
    with pytest.raises(CheckpointError) as info:
        build_model(_model_opt(tmp_path, other))
    msg = _one_line(info.value, other, 'weights do not fit network_g')
    assert 'shape mismatch' in msg and 'conv_first.weight: checkpoint (8, 3, 3, 3) vs network (16, 3, 3, 3)' in msg
    deeper = tmp_path / 'depth2.pth'
    torch.save({'params': _grl(depths=[2]).state_dict()}, deeper)
    with pytest.raises(CheckpointError, match=r'unexpected \(layers\.0\.blocks\.1\.') as info:
        build_model(_model_opt(tmp_path, deeper))
    _one_line(info.value, deeper)
    # strict_load_g: false keeps BasicSR's behaviour: matching keys load, the rest is reported
    model = build_model(_model_opt(tmp_path, deeper, strict_load_g=False))
    assert torch.equal(model.net_g.conv_first.weight, _grl(depths=[2]).conv_first.weight)
    # another architecture entirely (BasicSR's MSRResNet)
    from basicsr.archs.srresnet_arch import MSRResNet
    msr = tmp_path / 'msrresnet.pth'
    torch.save({'params': MSRResNet(num_feat=8, num_block=1, upscale=2).state_dict()}, msr)
    with pytest.raises(CheckpointError) as info:
        build_model(_model_opt(tmp_path, msr))
    _one_line(info.value, msr)


def test_wrong_architecture_basicsr_network_and_check_fit(tmp_path):
    """Non-GRL networks in GRLModel load safely with one-line errors; BasicSR's own SRModel keeps
    BasicSR's load_network (not patched), whose errors are RuntimeErrors like CheckpointError."""
    assert 'basicsr.models.base_model:BaseModel.load_network' not in patching.patches()
    from basicsr.archs.srresnet_arch import MSRResNet
    path = tmp_path / 'msr_feat8.pth'
    torch.save({'params': MSRResNet(num_feat=8, num_block=1, upscale=2).state_dict()}, path)
    net = dict(type='MSRResNet', num_feat=16, num_block=1, upscale=2)
    opt = dict(_model_opt(tmp_path, path, network=net), model_type='GRLModel', scale=2)
    with pytest.raises(CheckpointError) as info:
        build_model(opt)
    msg = _one_line(info.value, path, 'weights do not fit the network (MSRResNet)')
    assert 'conv_first.weight: checkpoint (8, 3, 3, 3) vs network (16, 3, 3, 3)' in msg
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(RuntimeError, match='size mismatch') as plain:  # BasicSR's own model, as BasicSR has it
        build_model(dict(opt, model_type='SRModel'))
    assert not isinstance(plain.value, CheckpointError)
    good = dict(_model_opt(tmp_path, path, network=dict(net, num_feat=8)), model_type='GRLModel', scale=2)
    model = build_model(good)  # weights_only load of a plain BasicSR file works
    assert model.net_g.conv_first.weight.shape == (8, 3, 3, 3)
    other_key = tmp_path / 'weights_key.pth'
    torch.save({'weights': MSRResNet(num_feat=8, num_block=1, upscale=2).state_dict()}, other_key)
    with pytest.raises(CheckpointError, match="no 'params' entry") as info:
        build_model(dict(good, path=dict(good['path'], pretrain_network_g=str(other_key))))
    _one_line(info.value, other_key)
    # check_fit on its own: missing + unexpected + shapes, first 3 of each
    sd = dict(_grl().state_dict())
    ref = _grl(embed_dim=8).state_dict()
    sd['extra.weight'] = torch.zeros(1)
    del sd['conv_last.bias']
    with pytest.raises(CheckpointError) as info:
        check_fit(ref, sd, path='x.pth')
    msg = _one_line(info.value, 'x.pth: weights do not fit')
    assert '1 missing (conv_last.bias)' in msg and '1 unexpected (extra.weight)' in msg and ', ...' in msg


def test_wrong_architecture_through_grl_infer_and_convert(tmp_path, capsys):
    img = tmp_path / 'in.png'
    cv2.imwrite(str(img), np.full((8, 8, 3), 128, np.uint8))

    def infer(ckpt):
        rc = infer_cli.main(['--checkpoint', str(ckpt), '--task', 'dn', '--input', str(img),
                             '--output', str(tmp_path / 'out'), '--quiet'])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith('grl-infer: error: ') and err.count('\n') == 1, err
        return _one_line(err.strip(), ckpt)

    # GRL weights with one tensor of another model (an edited / mixed-up checkpoint)
    sd = dict(_grl().state_dict())
    sd['layers.0.blocks.0.mlp.fc2.weight'] = _grl(mlp_ratio=4).state_dict()['layers.0.blocks.0.mlp.fc2.weight']
    mixed = tmp_path / 'mixed.pth'
    torch.save({'params': sd}, mixed)
    assert 'layers.0.blocks.0.mlp.fc2.weight: checkpoint (16, 64) vs network (16, 32)' in infer(mixed)
    # another architecture entirely
    from basicsr.archs.srresnet_arch import MSRResNet
    msr = tmp_path / 'msrresnet.pth'
    torch.save({'params': MSRResNet(num_feat=8, num_block=1, upscale=2).state_dict()}, msr)
    assert 'not a GRL state dict' in infer(msr)
    # grl-convert --set of a size the weights do not have: the file is named too
    small = tmp_path / 'net_g_embed8.pth'
    torch.save({'params': _grl(embed_dim=8).state_dict()}, small)
    rc = convert_cli.main([str(small), str(tmp_path / 'c.pth'), '--set', 'embed_dim=16', '--set', 'window_size=4',
                           '--set', 'stripe_size=[8, 8]', '--set', 'stripe_groups=[null, null]',
                           '--set', 'stripe_shift=true', '--set', 'anchor_window_down_factor=2'])
    err = capsys.readouterr().err
    assert rc == 2 and err.count('\n') == 1 and str(small) in err and 'vs network' in err, err


def test_grl_test_cli_bad_checkpoint_and_missing_key_one_line(lmdb_data, tmp_path):
    """grl-test: a wrong-architecture pretrain_network_g and a missing LMDB key end the run with one
    line ``grl-test: error: ...`` naming the file / key, exit status 2, no traceback."""
    data = dict(lmdb_data, gt=_copy_lmdb(lmdb_data['gt'], tmp_path, ['9999']),
                lq=_copy_lmdb(lmdb_data['lq'], tmp_path, ['9999']))
    from grl_plugin import GRL
    from helpers import tiny_grl
    kwargs = {k: v for k, v in tiny_grl(2).items() if k != 'type'}
    wrong = tmp_path / 'wrong.pth'
    torch.save({'params': GRL(**dict(kwargs, embed_dim=8)).state_dict()}, wrong)
    opt = write_test_options(tmp_path, data, wrong, name='bad_ckpt', filename='bad_ckpt.yml')
    res = run_cli(['-m', 'grl_plugin.test', '-opt', opt, '--root', tmp_path / 'run'], cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith('grl-test: error: ') and str(wrong) in last and 'vs network' in last, res.stderr[-3000:]
    assert 'Traceback' not in res.stderr
    good = tmp_path / 'good.pth'
    torch.save({'params': GRL(**kwargs).state_dict()}, good)
    opt = write_test_options(tmp_path, data, good, name='bad_key', filename='bad_key.yml')
    res = run_cli(['-m', 'grl_plugin.test', '-opt', opt, '--root', tmp_path / 'run'], cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith('grl-test: error: ') and "'9999'" in last and data['gt'] in last, res.stderr[-3000:]
    assert 'Traceback' not in res.stderr
    # skip_corrupt: true on BasicSR's PairedImageDataset: the run completes, the log names the key
    opt = write_test_options(tmp_path, data, good, name='skip_key', filename='skip_key.yml',
                             datasets={'test_1': {'skip_corrupt': True}})
    res = run_cli(['-m', 'grl_plugin.test', '-opt', opt, '--root', tmp_path / 'run'], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping corrupt sample 4: LMDB key '9999'" in res.stderr and '1 corrupt sample(s)' in res.stderr
