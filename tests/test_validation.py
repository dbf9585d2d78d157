"""Option validation before any work starts (``grl_plugin.cli.validate``): through ``grl-train``,
``grl-test`` (also ``--dry-run``) and ``grl-infer --opt``, every bad input ends in one line
``<prog>: error: <file>: <dotted.key>=<value>: <what>`` (with the closest valid key or value where
there is one) and exit status 2; valid files -- every file under ``options/``, the helpers' tiny
files -- pass. Everything runs in-process on a tiny GRL (no network is trained).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml

from helpers import REPO_ROOT, make_lmdb, train_options, write_test_options

OPTIONS = REPO_ROOT / 'options'


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """Tiny LMDBs: x2 pairs (PairedImageDataset) and GT only (GaussianNoiseDataset, scale 1)."""
    base = tmp_path_factory.mktemp('valdata')
    return {'sr': make_lmdb(base, n_images=2, size=32, scale=2, name='sr'),
            'dn': make_lmdb(base, n_images=2, size=32, scale=1, name='dn'),
            'base': base}


def write(tmp_path: Path, data, kind: str = 'sr', mutate: Optional[Callable[[dict], None]] = None,
          name: str = 'opt.yml') -> Path:
    """The helpers' tiny train options on ``data[kind]``, changed by ``mutate(opt)``."""
    opt = train_options(data[kind])
    if mutate is not None:
        mutate(opt)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(opt, sort_keys=False), encoding='utf-8')
    return path


def run_cli(mode: str, path: Path, tmp_path: Path, capsys, *extra: str):
    """``grl-train`` / ``grl-test`` in-process; returns (rc, stdout, stderr)."""
    from grl_plugin.cli.train import run
    capsys.readouterr()
    rc = run(mode, ['-opt', str(path), '--root', str(tmp_path / 'root'), *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error(mode: str, path: Path, tmp_path: Path, capsys, *extra: str) -> str:
    """Run the CLI on a bad file: exit 2, nothing started, exactly one ``error:`` line naming the file."""
    rc, out, err = run_cli(mode, path, tmp_path, capsys, *extra)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    assert len(lines) == 1, err
    assert lines[0].startswith(f'grl-{mode}: error: {path}: '), err
    assert 'Traceback' not in err
    assert not (tmp_path / 'root').exists()  # nothing was started or written
    return lines[0]


def bad(tmp_path, capsys, data, mutate, kind='sr', mode='train', extra=()):
    return one_error(mode, write(tmp_path, data, kind, mutate), tmp_path, capsys, *extra)


def setter(section: str, **values):
    """``mutate`` that sets ``values`` in ``opt[section]`` (dotted sections allowed)."""
    def mutate(opt):
        node = opt
        for key in section.split('.'):
            node = node.setdefault(key, {})
        node.update(copy.deepcopy(values))
    return mutate


# ---------------------------------------------------------------------------- unknown keys
def test_unknown_network_key_suggests_closest(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, lambda o: o['network_g'].update(stripe_sise=[8, 8]))
    assert "network_g.stripe_sise=[8, 8]: unknown key for GRL (did you mean 'stripe_size'?)" in line


def test_unknown_key_of_a_preset_network(tmp_path, capsys, data):
    def mutate(opt):
        opt['network_g'] = dict(type='GRL_T', upscale=2, windw_size=8)
    line = bad(tmp_path, capsys, data, mutate)
    assert "network_g.windw_size=8: unknown key for GRL_T (did you mean 'window_size'?)" in line


def test_unknown_network_type_suggests_preset(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('network_g', type='GRL_Tiny'))
    assert 'network_g.type=GRL_Tiny: not a registered architecture' in line
    assert "(did you mean 'GRL_T'?)" in line


def test_unknown_key_of_basicsr_paired_dataset(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('datasets.train', gt_szie=16))
    assert "datasets.train.gt_szie=16: unknown key for PairedImageDataset (did you mean 'gt_size'?)" in line


def test_unknown_key_of_plugin_noise_dataset(tmp_path, capsys, data):
    def mutate(opt):
        opt['datasets']['train']['sigmaa'] = opt['datasets']['train'].pop('sigma')
    line = bad(tmp_path, capsys, data, mutate, kind='dn')
    assert "datasets.train.sigmaa=15: unknown key for GaussianNoiseDataset (did you mean 'sigma'?)" in line


def test_unknown_key_of_validation_dataset(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('datasets.val', colour=False), kind='dn')
    assert "datasets.val.colour=false: unknown key for GaussianNoiseDataset (did you mean 'color'?)" in line


def test_misspelled_dataset_type(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('datasets.train', type='GausianNoiseDataset'), kind='dn')
    assert "datasets.train.type=GausianNoiseDataset: not a registered dataset " \
           "(did you mean 'GaussianNoiseDataset'?)" in line


def test_misspelled_upsampler_value(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('network_g', upsampler='pixelshufle'))
    assert "network_g.upsampler=pixelshufle: must be one of" in line and "(did you mean 'pixelshuffle'?)" in line


def test_unknown_tile_key(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('val', tile={'size': 16, 'overlpa': 4}))
    assert "val.tile.overlpa=4: unknown key (did you mean 'overlap'?)" in line


def test_misspelled_tile_blend(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('val', tile={'size': 16, 'overlap': 4, 'blend': 'linaer'}))
    assert "val.tile.blend=linaer: must be one of 'linear', 'uniform' (did you mean 'linear'?)" in line


# ---------------------------------------------------------------------- invalid combinations
def test_stripe_not_divisible_by_down_factor(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('network_g', stripe_size=[8, 6], anchor_window_down_factor=4))
    assert 'network_g.stripe_size=[8, 6]: stripe size 6 is not divisible by anchor_window_down_factor 4' in line


def test_stripe_axis_without_size_or_groups(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('network_g', stripe_size=[8, None]))
    assert 'network_g.stripe_size=[8, null]: axis 1 has neither a stripe size nor a stripe group count' in line


def test_heads_do_not_divide_the_window_half(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('network_g', num_heads_window=[3]))
    assert 'network_g.num_heads_window=[3]: 3 heads (stage 0) do not divide the 8 channels of the window ' \
           'attention half (embed_dim 16 / 2)' in line


def test_heads_do_not_divide_the_stripe_half(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('network_g', embed_dim=20, num_heads_stripe=[4]))
    assert 'network_g.num_heads_stripe=[4]: 4 heads (stage 0) do not divide the 10 channels of the stripe' in line


def test_odd_embed_dim(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('network_g', embed_dim=15))
    assert 'network_g.embed_dim=15: must be even' in line


def test_stage_lists_of_different_lengths(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('network_g', depths=[2, 2], num_heads_stripe=[1, 1]))
    assert 'network_g.num_heads_window=[1]: has 1 entries but depths [2, 2] has 2 stages' in line


def test_pixelshuffle_unsupported_upscale(tmp_path, capsys, data):
    def mutate(opt):
        opt['scale'] = 5
        opt['network_g']['upscale'] = 5
    line = bad(tmp_path, capsys, data, mutate)
    assert "network_g.upscale=5: upsampler 'pixelshuffle' supports upscale 2, 3, 4, 8" in line


def test_scale_differs_from_upscale(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('network_g', upscale=4))
    assert "network_g.upscale=4: differs from the option file's scale 2" in line


def test_no_upsampler_needs_upscale_one(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('network_g', upscale=2), kind='dn')
    assert "network_g.upscale=2: upsampler '' (no upsampling" in line and 'needs upscale 1' in line


def test_in_channels_vs_gray_noise_dataset(tmp_path, capsys, data):
    def mutate(opt):
        for ds in opt['datasets'].values():
            ds['color'] = False
    line = bad(tmp_path, capsys, data, mutate, kind='dn')
    assert 'network_g.in_channels=3: datasets.train (GaussianNoiseDataset, color: false) gives 1-channel ' \
           'inputs' in line


def _dual_pixel(tmp_path, data, in_channels, out_channels=None):
    import shutil
    roots = {}
    for view in ('sharp', 'left', 'right'):
        roots[view] = tmp_path / 'dp' / view
        shutil.copytree(data['base'] / 'dn_GT_png', roots[view])

    def mutate(opt):
        ds = dict(name='dp', type='DualPixelDataset', dataroot_gt=str(roots['sharp']),
                  dataroot_lq_left=str(roots['left']), dataroot_lq_right=str(roots['right']),
                  io_backend={'type': 'disk'})
        opt['datasets'] = {'train': dict(ds, gt_size=16, use_hflip=True, use_rot=True, num_worker_per_gpu=0,
                                         batch_size_per_gpu=1, dataset_enlarge_ratio=1, prefetch_mode=None),
                           'val': dict(ds)}
        opt['network_g'].update(in_channels=in_channels)
        if out_channels is not None:
            opt['network_g']['out_channels'] = out_channels
    return mutate


def test_in_channels_vs_dual_pixel_dataset(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, _dual_pixel(tmp_path, data, 3), kind='dn')
    assert 'network_g.in_channels=3: datasets.train (DualPixelDataset, left + right views) gives 6-channel ' \
           'inputs' in line


def test_out_channels_vs_dual_pixel_ground_truth(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, _dual_pixel(tmp_path, data, 6), kind='dn')
    assert 'network_g.out_channels=null: the network outputs 6 channels but datasets.train (DualPixelDataset, ' \
           'left + right views) has 3-channel ground truth' in line


def test_tile_smaller_than_pad_size(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('val', tile={'size': 4, 'overlap': 0}))
    assert "val.tile.size=4: smaller than the network's padding size 8" in line


def test_tile_overlap_too_large(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('val', tile={'size': 16, 'overlap': 16}))
    assert 'val.tile.overlap=16: must be an integer in [0, 16)' in line


# ---------------------------------------------------------------------------- missing files
def test_missing_dataroot(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('datasets.val', dataroot_gt=str(tmp_path / 'nope.lmdb')))
    assert f'datasets.val.dataroot_gt={tmp_path / "nope.lmdb"}: no such file or directory' in line


def test_missing_meta_info_file(tmp_path, capsys, data):
    missing = tmp_path / 'meta.txt'
    line = bad(tmp_path, capsys, data, setter('datasets.val', io_backend={'type': 'disk'},
                                              dataroot_gt=str(data['base'] / 'dn_GT_png'),
                                              meta_info_file=str(missing)), kind='dn')
    assert f'datasets.val.meta_info_file={missing}: no such file' in line


def test_missing_pretrained_weights(tmp_path, capsys, data):
    missing = tmp_path / 'net_g.pth'
    line = bad(tmp_path, capsys, data, setter('path', pretrain_network_g=str(missing)))
    assert f'path.pretrain_network_g={missing}: no such file' in line


def test_missing_resume_state(tmp_path, capsys, data):
    missing = tmp_path / 'states' / '4.state'
    line = bad(tmp_path, capsys, data, setter('path', resume_state=str(missing)))
    assert f'path.resume_state={missing}: no such file' in line


def test_grl_test_missing_weights(tmp_path, capsys, data):
    missing = tmp_path / 'models' / 'net_g_latest.pth'
    path = write_test_options(tmp_path, data['sr'], str(missing))
    line = one_error('test', path, tmp_path, capsys)
    assert f'path.pretrain_network_g={missing}: no such file' in line


# ------------------------------------------------------------------- --force_yml, --dry-run
def test_force_yml_is_checked_too(tmp_path, capsys, data):
    path = write(tmp_path, data)
    line = one_error('train', path, tmp_path, capsys, '--force_yml', 'network_g:stripe_sise=[8,8]')
    assert "network_g.stripe_sise=[8, 8]: unknown key for GRL (did you mean 'stripe_size'?)" in line


def test_force_yml_into_missing_section(tmp_path, capsys, data):
    path = write(tmp_path, data)
    line = one_error('train', path, tmp_path, capsys, '--force_yml', 'network_h:embed_dim=8')
    assert "network_h.embed_dim=8: --force_yml: no section 'network_h' in the option file" in line


def test_dry_run_reports_option_problems(tmp_path, capsys, data):
    path = write(tmp_path, data, mutate=setter('network_g', stripe_sise=[8, 8]))
    line = one_error('train', path, tmp_path, capsys, '--dry-run')
    assert "network_g.stripe_sise=[8, 8]: unknown key for GRL (did you mean 'stripe_size'?)" in line


def test_dry_run_keeps_reporting_missing_files_as_notes(tmp_path, capsys, data):
    """--dry-run is for checking files before their data exists: missing roots stay non-fatal."""
    path = write(tmp_path, data, mutate=setter('datasets.val', dataroot_gt=str(tmp_path / 'nope.lmdb')))
    rc, out, err = run_cli('train', path, tmp_path, capsys, '--dry-run')
    assert rc == 0, err
    assert 'not built, missing dataroot_gt' in out and 'dry run OK' in out


def test_several_problems_one_line_each(tmp_path, capsys, data):
    def mutate(opt):
        opt['network_g']['stripe_sise'] = [8, 8]
        opt['datasets']['train']['gt_szie'] = 16
    rc, _, err = run_cli('train', write(tmp_path, data, mutate=mutate), tmp_path, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 2, err
    assert all(line.startswith('grl-train: error: ') for line in lines)
    assert any('stripe_sise' in line for line in lines) and any('gt_szie' in line for line in lines)


# ----------------------------------------------------------------------------- grl-infer --opt
@pytest.fixture(scope='module')
def tiny_weights(tmp_path_factory):
    import torch

    import grl_plugin  # noqa: F401
    from grl_plugin.archs import GRL
    from helpers import tiny_grl
    kwargs = tiny_grl(1)
    kwargs.pop('type')
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('valweights') / 'net_g.pth'
    torch.save({'params': GRL(**kwargs).state_dict()}, path)
    return path


def _infer(tmp_path, capsys, weights, opt: dict):
    from grl_plugin.cli import infer
    path = tmp_path / 'infer.yml'
    path.write_text(yaml.safe_dump(opt, sort_keys=False), encoding='utf-8')
    (tmp_path / 'in').mkdir(exist_ok=True)
    import cv2
    import numpy as np
    cv2.imwrite(str(tmp_path / 'in' / 'a.png'), np.random.RandomState(0).randint(0, 256, (12, 12, 3), np.uint8))
    capsys.readouterr()
    rc = infer.main(['--checkpoint', str(weights), '--opt', str(path), '--input', str(tmp_path / 'in'),
                     '--output', str(tmp_path / 'out'), '--quiet'])
    return rc, capsys.readouterr().err, path


def test_infer_opt_unknown_network_key(tmp_path, capsys, tiny_weights):
    from helpers import tiny_grl
    net = dict(tiny_grl(1), window_sise=4)
    rc, err, path = _infer(tmp_path, capsys, tiny_weights, {'network_g': net})
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0] == f"grl-infer: error: {path}: network_g.window_sise=4: unknown key for GRL " \
                       "(did you mean 'window_size'?)"
    assert not (tmp_path / 'out').exists()


def test_infer_opt_bad_geometry(tmp_path, capsys, tiny_weights):
    from helpers import tiny_grl
    net = dict(tiny_grl(1), stripe_size=[8, 6], anchor_window_down_factor=4)
    rc, err, path = _infer(tmp_path, capsys, tiny_weights, {'network_g': net})
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert f'{path}: network_g.stripe_size=[8, 6]: stripe size 6 is not divisible by ' \
           'anchor_window_down_factor 4' in lines[0]


def test_infer_opt_valid_file_passes(tmp_path, capsys, tiny_weights):
    from helpers import tiny_grl
    opt = {'network_g': dict(tiny_grl(1), stripe_shift=True), 'val': {'tile': {'size': 16, 'overlap': 4}}}
    rc, err, _ = _infer(tmp_path, capsys, tiny_weights, opt)
    assert rc == 0 and 'error' not in err, err
    assert (tmp_path / 'out' / 'a_grl.png').is_file()


# ------------------------------------------------------------------------------ valid files
def _option_files():
    return sorted(p.relative_to(OPTIONS).as_posix() for p in OPTIONS.rglob('*.yml'))


@pytest.mark.parametrize('rel', _option_files())
def test_repository_option_files_pass(rel):
    """Every option file under options/ (train, test, fine-tune, demo, hybrid) is valid."""
    import grl_plugin  # noqa: F401
    from basicsr.utils.options import ordered_yaml

    from grl_plugin.cli import validate
    with open(OPTIONS / rel, encoding='utf-8') as f:
        opt = yaml.load(f, Loader=ordered_yaml()[0])
    mode = 'test' if Path(rel).name.startswith('test_') else 'train'
    assert [p.format(rel) for p in validate.validate_options(opt, mode, paths=False)] == []
    assert [p.format(rel) for p in validate.validate_network_file(opt)] == []


def test_helpers_files_pass_and_dry_run(tmp_path, capsys, data):
    for kind in ('sr', 'dn'):
        rc, out, err = run_cli('train', write(tmp_path, data, kind, name=f'{kind}.yml'), tmp_path, capsys,
                               '--dry-run')
        assert rc == 0 and 'dry run OK' in out, err


def test_official_no_op_keys_are_accepted():
    """Keys that official configs carry and GRL swallows on purpose are not 'unknown'."""
    import grl_plugin  # noqa: F401
    from grl_plugin.cli import validate
    from helpers import tiny_grl
    net = dict(tiny_grl(2), name='grl_tiny', img_size=64, double_window=False, stripe_square=False,
               separable_conv_act=True, use_buffer=True, use_efficient_buffer=True, out_proj_type='linear',
               pretrained_window_size=[0, 0], pretrained_stripe_size=[0, 0], offload_to_cpu=False,
               fairscale_checkpoint=False, init_method='n')
    assert validate.check_network(net) == []


def test_resume_and_auto_resume_skip_weight_checks(tmp_path):
    """With a training state BasicSR loads the networks saved next to it, not pretrain_network_g;
    with --auto_resume BasicSR finds the state itself."""
    import grl_plugin  # noqa: F401
    from grl_plugin.cli import validate
    state = tmp_path / '4.state'
    state.write_bytes(b'')
    opt = {'path': {'pretrain_network_g': str(tmp_path / 'gone.pth'), 'resume_state': str(state)}}
    assert validate.check_paths(opt) == []
    opt['path']['resume_state'] = str(tmp_path / 'gone.state')
    assert [p.key for p in validate.check_paths(opt)] == ['path.resume_state']
    assert validate.check_paths(opt, auto_resume=True) == []


def test_dataset_keys_come_from_the_dataset_code():
    import grl_plugin  # noqa: F401
    from grl_plugin.cli import validate
    noise = validate.dataset_known_keys('GaussianNoiseDataset')
    assert {'dataroot_gt', 'io_backend', 'sigma', 'sigma_range', 'color', 'gt_size', 'use_hflip',
            'modulo', 'meta_info_file', 'batch_size_per_gpu'} <= noise
    assert 'quality' not in noise
    assert {'dataroot_lq_left', 'dataroot_lq_right'} <= validate.dataset_known_keys('DualPixelDataset')
    assert {'dataroot_lq', 'filename_tmpl', 'meta_info_file'} <= validate.dataset_known_keys('PairedImageDataset')
    assert validate.dataset_known_keys('NoSuchDataset') is None


def test_format_value_and_closest():
    from grl_plugin.cli.validate import closest, format_value
    assert format_value(None) == 'null' and format_value(True) == 'true' and format_value([8, None]) == '[8, null]'
    assert format_value('') == "''" and format_value('a b') == "'a b'" and format_value({'a': 1}) == '{a: 1}'
    assert len(format_value(list(range(100)))) == 80
    assert closest('stripe_sise', ['stripe_size', 'window_size']) == 'stripe_size'
    assert closest('grl_t', ['GRL_T', 'GRL_S']) == 'GRL_T'
    assert closest('zzz', ['stripe_size']) is None


def test_user_dataset_subclass_keys_are_not_checked():
    """A dataset defined outside grl_plugin.data / basicsr.data (e.g. registered through
    --import) may read keys of its own: only its type is checked."""
    import grl_plugin  # noqa: F401
    from basicsr.data.paired_image_dataset import PairedImageDataset
    from basicsr.utils.registry import DATASET_REGISTRY

    from grl_plugin.cli import validate
    if 'ValidationTestPairs' not in DATASET_REGISTRY:
        DATASET_REGISTRY.register(type('ValidationTestPairs', (PairedImageDataset,), {}))
    opt = {'datasets': {'train': {'type': 'ValidationTestPairs', 'my_own_key': 1}}}
    assert validate.check_datasets(opt) == []
    assert validate.dataset_known_keys('ValidationTestPairs') is None


def test_preset_embed_dim_is_blamed_when_heads_come_from_the_preset():
    import grl_plugin  # noqa: F401
    from grl_plugin.cli import validate
    problems = validate.check_network({'type': 'GRL_T', 'embed_dim': 66})  # 33 channels per half, 2 heads
    assert [(p.key, p.value) for p in problems] == [('network_g.embed_dim', 66), ('network_g.embed_dim', 66)]
    assert 'do not divide the 33 channels of the window attention half' in problems[0].message
