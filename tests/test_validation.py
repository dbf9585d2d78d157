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
        opt['datasets']['train']['gt_size'] = 20  # a multiple of the scale
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


# ------------------------------------------------------------------ BasicSR's own option fields
def top(**values):
    """``mutate`` that sets top-level ``values``."""
    return lambda opt: opt.update(copy.deepcopy(values))


def _pop(section: str, key: str, rename: Optional[str] = None):
    """``mutate`` that removes ``opt[section][key]`` (dotted section; '' for the top level), or
    renames it to ``rename``."""
    def mutate(opt):
        node = opt
        for part in filter(None, section.split('.')):
            node = node[part]
        value = node.pop(key)
        if rename is not None:
            node[rename] = value
    return mutate


@pytest.mark.parametrize('mutate, expected', [
    (setter('train.optim_g', lr='2e-4'),
     'train.optim_g.lr=2e-4: is text, not a number: YAML reads exponents without a dot as strings; '
     'write 2.0e-4 or !!float 2e-4'),
    (setter('train', total_iter='5e5'), 'train.total_iter=5e5: is text, not an integer (YAML reads 5e5 as a '
                                        'string): write 500000'),
    (setter('val', val_freq='10k'), 'val.val_freq=10k: is text, not an integer (YAML reads 10k as a string): '
                                    'write 10000'),
    (setter('train.optim_g', lr='two'), "train.optim_g.lr=two: must be a number, got the text 'two'"),
    (setter('train.optim_g', lr=True), 'train.optim_g.lr=true: must be a number, not a boolean'),
    (setter('train', warmup_iter='-1'), "train.warmup_iter=-1: is the text '-1', not an integer: write -1 "
                                        'unquoted'),
    (setter('datasets.train', use_hflip='yes'), 'datasets.train.use_hflip=yes: must be true or false'),
    (top(manual_seed=1.5), 'manual_seed=1.5: must be an integer (or null: a random seed)'),
    (top(name=123), 'name=123: must be a non-empty string'),
], ids=['lr-2e-4', 'total_iter-5e5', 'val_freq-10k', 'lr-word', 'lr-bool', 'warmup-text', 'hflip-text',
        'seed-float', 'name-int'])
def test_basicsr_field_types(tmp_path, capsys, data, mutate, expected):
    assert expected in bad(tmp_path, capsys, data, mutate)


@pytest.mark.parametrize('mutate, expected', [
    (setter('train', total_iter=0), 'train.total_iter=0: must be a positive number of iterations'),
    (setter('train', total_iter=-10), 'train.total_iter=-10: must be a positive'),
    (setter('logger', print_freq=0), 'logger.print_freq=0: must be a positive number of iterations'),
    (setter('logger', save_checkpoint_freq=-1), 'logger.save_checkpoint_freq=-1: must be a positive'),
    (setter('val', val_freq=0), 'val.val_freq=0: must be a positive'),
    (setter('datasets.train', batch_size_per_gpu=0), 'datasets.train.batch_size_per_gpu=0: must be a positive'),
    (setter('datasets.train', num_worker_per_gpu=-1), 'datasets.train.num_worker_per_gpu=-1: must be an integer '
                                                      '>= 0'),
    (setter('datasets.train', gt_size=0), 'datasets.train.gt_size=0: must be a positive integer'),
    (setter('datasets.train', gt_size=15), 'datasets.train.gt_size=15: is not a multiple of scale 2'),
    (top(scale=9), 'scale=9: must be an integer in 1..8'),
    (top(scale=0), 'scale=0: must be an integer in 1..8'),
    (setter('train.optim_g', lr=0), 'train.optim_g.lr=0: must be a positive number'),
    (setter('train.optim_g', lr=-1e-4), 'train.optim_g.lr=-0.0001: must be a positive number'),
    (setter('train.optim_g', betas=[0.9, 1.5]), 'train.optim_g.betas=[0.9, 1.5]: must be two numbers in [0, 1)'),
    (setter('train.scheduler', milestones=[500, 100]), 'train.scheduler.milestones=[500, 100]: must be strictly '
                                                       'increasing'),
    (setter('train.scheduler', milestones=[100, 100]), 'must be strictly increasing'),
    (setter('train.scheduler', milestones=100), 'train.scheduler.milestones=100: must be a list'),
    (setter('train.scheduler', gamma=0), 'train.scheduler.gamma=0: must be a positive number'),
    (setter('train', warmup_iter=-2), 'train.warmup_iter=-2: must be an integer >= -1'),
    (setter('train', ema_decay=1), 'train.ema_decay=1: must be in [0, 1)'),
    (setter('train', ema_decay=-0.5), 'train.ema_decay=-0.5: must be in [0, 1)'),
    (top(num_gpu=-1), "num_gpu=-1: must be an integer >= 0 or 'auto'"),
    (top(manual_seed='abc'), 'manual_seed=abc: must be an integer'),
    (setter('logger', wandb={'project': 'p'}), 'logger.use_tb_logger=false: must be true when '
                                               'logger.wandb.project is set'),
])
def test_basicsr_field_ranges(tmp_path, capsys, data, mutate, expected):
    assert expected in bad(tmp_path, capsys, data, mutate)


@pytest.mark.parametrize('mutate, expected', [
    (_pop('train', 'total_iter'), "train.total_iter=<missing>: missing: BasicSR's train pipeline reads it"),
    (_pop('train', 'total_iter', 'total_iters'), "train.total_iters=4: unknown key (did you mean 'total_iter'?"),
    (_pop('logger', 'print_freq', 'print_frq'), "logger.print_frq=1: unknown key (did you mean 'print_freq'?"),
    (_pop('logger', 'use_tb_logger'), 'logger.use_tb_logger=<missing>: missing'),
    (_pop('train', 'scheduler', 'schedular'), "train.schedular={type: MultiStepLR, milestones: [1000], gamma: "
                                              "0.5}: unknown key (did you mean 'scheduler'?"),
    (_pop('train', 'optim_g'), 'train.optim_g=<missing>: missing'),
    (_pop('train', 'pixel_opt', 'pixl_opt'), "train.pixl_opt={type: L1Loss, loss_weight: 1.0, reduction: mean}: "
                                             "unknown key (did you mean 'pixel_opt'?)"),
    (_pop('train', 'pixel_opt'), 'train.pixel_opt=<missing>: GRLModel needs a loss'),
    (_pop('datasets.train', 'batch_size_per_gpu'), 'datasets.train.batch_size_per_gpu=<missing>: missing: the '
                                                   'training data loader of PairedImageDataset reads it'),
    (_pop('datasets.train', 'gt_size'), 'datasets.train.gt_size=<missing>: missing'),
    (_pop('datasets.train', 'use_rot', 'use_rott'), "datasets.train.use_rott=true: unknown key (did you mean "
                                                    "'use_rot'?"),
    (_pop('', 'path', 'paht'), "paht={pretrain_network_g: null, strict_load_g: true, resume_state: null}: "
                               "unknown key (did you mean 'path'?"),
    (_pop('', 'num_gpu'), 'num_gpu=<missing>: missing'),
    (_pop('', 'scale'), 'scale=<missing>: missing'),
    (_pop('val', 'save_img'), 'val.save_img=<missing>: missing'),
    (_pop('train', 'warmup_iter', 'warmup_itr'), "train.warmup_itr=-1: unknown key (did you mean 'warmup_iter'?)"),
    (setter('train.optim_g', type='Adamw'), "train.optim_g.type=Adamw: must name a torch.optim optimizer (e.g. "
                                            "Adam, AdamW) (did you mean 'AdamW'?)"),
    (setter('train.scheduler', type='MultiStepLr'), "train.scheduler.type=MultiStepLr: must be one of "
                                                    "MultiStepLR, MultiStepRestartLR, CosineAnnealingRestartLR "
                                                    "(did you mean 'MultiStepLR'?)"),
    (setter('train.scheduler', gama=0.5), "train.scheduler.gama=0.5: unknown key for MultiStepLR (did you mean "
                                          "'gamma'?)"),
    (lambda o: o['datasets'].update(test=o['datasets'].pop('val')),
     "datasets.test=tiny_val: BasicSR does not know the dataset phase 'test'"),
], ids=['total_iter', 'total_iters', 'print_frq', 'use_tb_logger', 'schedular', 'optim_g', 'pixl_opt', 'no-loss',
        'batch_size', 'gt_size', 'use_rott', 'paht', 'num_gpu', 'scale', 'save_img', 'warmup_itr', 'Adamw',
        'MultiStepLr', 'gama', 'phase-test'])
def test_basicsr_missing_or_misspelled_keys(tmp_path, capsys, data, mutate, expected):
    assert expected in bad(tmp_path, capsys, data, mutate)


def test_basicsr_fields_checked_in_dry_run(tmp_path, capsys, data):
    line = bad(tmp_path, capsys, data, setter('train.optim_g', lr='2e-4'), extra=('--dry-run', ))
    assert 'train.optim_g.lr=2e-4: is text' in line


@pytest.mark.parametrize('entry, expected', [
    ('train:optim_g:lr=2e-4', 'train.optim_g.lr=2e-4: is text, not a number'),
    ('train:total_iter=0', 'train.total_iter=0: must be a positive number of iterations'),
    ('logger:print_freq=-5', "logger.print_freq=-5: is the text '-5', not an integer"),
    ('train:ema_decay=1.5', 'train.ema_decay=1.5: must be in [0, 1)'),
])
def test_basicsr_fields_after_force_yml(tmp_path, capsys, data, entry, expected):
    path = write(tmp_path, data)
    assert expected in one_error('train', path, tmp_path, capsys, '--force_yml', entry)


def test_several_basicsr_problems_one_line_each(tmp_path, capsys, data):
    def mutate(opt):
        opt['train']['optim_g']['lr'] = '2e-4'
        opt['logger']['print_freq'] = 0
        opt['datasets']['train'].pop('gt_size')
    rc, _, err = run_cli('train', write(tmp_path, data, mutate=mutate), tmp_path, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 3, err
    assert [line.split(': ')[3].split('=')[0] for line in lines] == \
        ['logger.print_freq', 'datasets.train.gt_size', 'train.optim_g.lr']


@pytest.mark.parametrize('mutate, expected', [
    (lambda o: o['val'].pop('save_img'), "val.save_img=<missing>: missing: BasicSR's test pipeline reads it"),
    (lambda o: o.pop('val'), 'val=<missing>: missing'),
    (lambda o: o['datasets'].update(bench_1=o['datasets'].pop('test_1')),
     "datasets.bench_1=tiny_test: BasicSR does not know the dataset phase 'bench'"),
    (lambda o: o.update(scale=0), 'scale=0: must be an integer in 1..8'),
    (lambda o: o.pop('model_type'), "model_type=<missing>: missing: BasicSR's test pipeline reads it"),
], ids=['save_img', 'val', 'phase', 'scale', 'model_type'])
def test_grl_test_basicsr_fields(tmp_path, capsys, data, mutate, expected):
    weights = tmp_path / 'net_g.pth'
    weights.write_bytes(b'')
    path = write_test_options(tmp_path, data['sr'], str(weights))
    opt = yaml.safe_load(path.read_text(encoding='utf-8'))
    mutate(opt)
    path.write_text(yaml.safe_dump(opt, sort_keys=False), encoding='utf-8')
    assert expected in one_error('test', path, tmp_path, capsys, '--dry-run')


def test_valid_basicsr_spellings_pass(data):
    """What BasicSR accepts is not reported: !!float, 2.0e-4, num_gpu auto, a float iteration
    count (int() takes it), a null seed, warm-up -1, CosineAnnealingRestartLR, gt_size 16 at x2."""
    import grl_plugin  # noqa: F401
    from helpers import train_options

    from grl_plugin.cli import validate
    text = yaml.safe_dump(train_options(data['sr']), sort_keys=False)
    text = text.replace('lr: 0.0002', 'lr: !!float 2e-4').replace('num_gpu: 0', 'num_gpu: auto')
    text = text.replace('total_iter: 4', 'total_iter: 4.0e+0').replace('manual_seed: 10', 'manual_seed: ~')
    opt = yaml.safe_load(text)
    assert opt['train']['optim_g']['lr'] == 2e-4 and opt['num_gpu'] == 'auto' and opt['manual_seed'] is None
    assert validate.check_basicsr(opt, 'train') == []
    opt['train']['scheduler'] = {'type': 'CosineAnnealingRestartLR', 'periods': [2, 2], 'restart_weights': [1, 1],
                                 'eta_min': 1e-7}
    assert validate.check_basicsr(opt, 'train') == []
    opt['train']['scheduler']['restart_weights'] = [1]
    assert [p.key for p in validate.check_basicsr(opt, 'train')] == ['train.scheduler.restart_weights']
    del opt['train']['scheduler']['periods']
    assert 'train.scheduler.periods' in [p.key for p in validate.check_basicsr(opt, 'train')]


def test_number_text_helpers():
    from grl_plugin.cli.validate import _float_spelling, _number_text
    assert _number_text('2e-4') == 2e-4 and _number_text('300k') == 300000 and _number_text('1M') == 1e6
    assert _number_text('two') is None and _number_text('') is None
    assert _float_spelling('2e-4') == '2.0e-4' and _float_spelling('1.5e3') == '1.5e3'


# -------------------------------------------------------- non-GRL network vs scale (hybrid arch)
EDSR_X2 = dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, upscale=2)
INSERTED = dict(type='GRLInserted', backbone=EDSR_X2,
                insert=[dict(after='body.1', depth=2, window_size=8, stripe_size=[16, 16],
                             anchor_window_down_factor=2)])


@pytest.mark.parametrize('extra', [(), ('--dry-run', )], ids=['run', 'dry-run'])
def test_grl_inserted_x2_in_a_scale_1_file(tmp_path, capsys, data, extra):
    """The README's hybrid: an EDSR x2 backbone in a denoising (scale 1) file used to pass
    --dry-run and stop at iteration 1 with a tensor-size traceback."""
    line = bad(tmp_path, capsys, data, top(network_g=INSERTED), kind='dn', extra=extra)
    assert line.endswith("network_g.backbone.upscale=2: network_g (GRLInserted) outputs 64x64 for a 32x32 input "
                         "(x2) but the option file's scale is 1: make them equal")


def test_grl_unet_in_a_scale_2_file(tmp_path, capsys, data):
    net = dict(type='GRLUNet', in_channels=3, levels=[dict(dim=16, depth=1, grl=False),
                                                      dict(dim=16, depth=1, grl=True, window_size=4,
                                                           stripe_size=[8, 8], anchor_window_down_factor=2)])
    line = bad(tmp_path, capsys, data, top(network_g=net), kind='sr', extra=('--dry-run', ))
    assert "network_g.type=GRLUNet: network_g (GRLUNet) outputs 32x32 for a 32x32 input (x1) but the option " \
           "file's scale is 2" in line


def test_grl_inserted_at_its_scale_passes_dry_run(tmp_path, capsys, data):
    path = write(tmp_path, data, 'sr', top(network_g=INSERTED))
    rc, out, err = run_cli('train', path, tmp_path, capsys, '--dry-run')
    assert rc == 0 and 'dry run OK' in out and 'error' not in err, err


def test_network_probe_keeps_the_rng_and_skips_what_cannot_be_built():
    import torch

    import grl_plugin  # noqa: F401
    from grl_plugin.cli import validate
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    problems = validate.check_network_output({'scale': 1, 'network_g': INSERTED})
    assert torch.equal(torch.rand(3), expected)
    assert [p.key for p in problems] == ['network_g.backbone.upscale']
    assert validate.check_network_output({'scale': 2, 'network_g': INSERTED}) == []
    assert validate.check_network_output({'scale': 1, 'network_g': dict(INSERTED, insert=[])}) == []
    assert validate.check_network_output({'scale': 1, 'network_g': {'type': 'NoSuchArch'}}) == []
