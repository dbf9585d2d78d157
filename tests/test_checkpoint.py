"""Checkpoint loading and conversion: grl_plugin.archs.checkpoint and grl-convert.

Every "official" file is built here from a tiny GRL: Lightning checkpoints with the engine
prefixes, engine buffers, the 13 GRL buffers (right shapes, zero contents -- only the shapes are
read) and the Hydra config as a plain dict or as pickled omegaconf-like objects (fake
``omegaconf.*`` modules that exist only while saving).
"""
import contextlib
import dataclasses
import os
import subprocess
import sys
import types
import typing
import warnings
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path

import pytest
import torch
import yaml

import grl_plugin

from grl_plugin.archs.checkpoint import (BUFFER_KEYS, GEOMETRY_KEYS, CheckpointError, CheckpointWarning,
                                         infer_geometry, infer_kwargs, load_checkpoint, save_converted)
from grl_plugin.cli.convert import main as convert_main

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=16, embed_dim=16, depths=[2], num_heads_window=[1], num_heads_stripe=[1], window_size=4,
            stripe_size=[8, 8], stripe_groups=[None, None], stripe_shift=True, anchor_window_down_factor=2,
            mlp_ratio=2, upsampler='pixelshuffle', upscale=2)
GEOMETRY = {k: TINY[k] for k in GEOMETRY_KEYS}
IGNORED = dict(name='grl_tiny', double_window=False, stripe_square=False, separable_conv_act=True, use_buffer=True,
               use_efficient_buffer=True)


@pytest.fixture(scope='module')
def GRL():
    return pytest.importorskip('grl_plugin.archs.grl_arch').GRL


def make_model(GRL, seed=0, **overrides):
    torch.manual_seed(seed)
    model = GRL(**dict(TINY, **overrides)).eval()
    with torch.no_grad():  # move every parameter away from its init so outputs depend on all of them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def run(model, channels=3):
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.rand(1, channels, 16, 16))


def buffer_shapes(ws, stripe, df, img):
    """Shapes of the 13 official buffers built for an img x img input (SPEC section 6)."""
    (s0, s1), (a0, a1) = stripe, (stripe[0] // df, stripe[1] // df)
    n1, n2, nw, ns = s0 * s1, a0 * a1, (img // ws)**2, (img // s0) * (img // s1)
    return dict(table_w=(1, 2 * ws - 1, 2 * ws - 1, 2), table_sh=(1, s0 + a0 - 1, s1 + a1 - 1, 2),
                table_sv=(1, s1 + a1 - 1, s0 + a0 - 1, 2), index_w=(ws * ws, ws * ws), index_sh_a2w=(n2, n1),
                index_sh_w2a=(n1, n2), index_sv_a2w=(n2, n1), index_sv_w2a=(n1, n2), mask_w=(nw, ws * ws, ws * ws),
                mask_sh_a2w=(ns, n2, n1), mask_sh_w2a=(ns, n1, n2), mask_sv_a2w=(ns, n2, n1), mask_sv_w2a=(ns, n1, n2))


def fake_buffers(ws=4, stripe=(8, 8), df=2, img=16):
    """Zero tensors of the right shapes; expanded from one element so they stay tiny on disk."""
    return {k: torch.zeros(1, dtype=torch.int64 if k.startswith('index') else torch.float32).expand(shape)
            for k, shape in buffer_shapes(ws, stripe, df, img).items()}


def official_sd(model, prefixes=('model.', ), buffers=True, engine=True):
    sd = OrderedDict()
    for prefix in prefixes:  # buffers are registered first on the official GRL
        entries = {**(fake_buffers() if buffers else {}), **model.state_dict()}
        sd.update((prefix + k, v) for k, v in entries.items())
    if engine:
        sd.update(current_val_metric=torch.tensor(30.5), best_val_metric=torch.tensor(31.0), best_iter=torch.tensor(7))
    return sd


def hydra_config(model_cfg):
    return {'experiment': 'sr', 'model': model_cfg, 'data_module': {'name': 'sr', 'scale': 2, 'patch_size': 64},
            'optimizer': {'lr': 2e-4, 'betas': [0.9, 0.99]}, 'trainer': {'max_steps': 10, 'precision': 32}}


def lightning_ckpt(state_dict, hyper_parameters):
    opt = {'state': {0: {'step': torch.tensor(3.), 'exp_avg': torch.zeros(2)}},
           'param_groups': [{'lr': 2e-4, 'betas': (0.9, 0.99), 'params': [0], 'foreach': None}]}
    return {'epoch': 1, 'global_step': 10, 'pytorch-lightning_version': '1.6.5', 'state_dict': state_dict,
            'optimizer_states': [opt], 'lr_schedulers': [{'milestones': Counter({5: 1}), '_last_lr': [2e-4]}],
            'callbacks': {"ModelCheckpoint{'monitor': 'psnr'}": {'best_model_score': torch.tensor(31.),
                                                                 'best_k_models': {'a.ckpt': torch.tensor(31.)}}},
            'loops': {'fit_loop': {'state_dict': {}, 'epoch_progress': {'total': {'ready': 1}}}},
            'hparams_name': 'config', 'hyper_parameters': hyper_parameters}


@contextlib.contextmanager
def fake_omegaconf():
    """Yield ``wrap(obj) -> DictConfig`` built from classes living in fake ``omegaconf.*`` modules.

    They mimic omegaconf's pickled layout: containers with ``_metadata`` (dataclass), ``_parent``
    (a cycle), ``_content``; leaf nodes with ``_val``; ``__getstate__``/``__setstate__``.
    """
    names = ('omegaconf', 'omegaconf.base', 'omegaconf.nodes', 'omegaconf.dictconfig', 'omegaconf.listconfig')
    mods = {n: types.ModuleType(n) for n in names}

    def place(module, cls):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(mods[module], cls.__name__, cls)
        return cls

    @dataclasses.dataclass
    class Metadata:
        ref_type: typing.Any
        object_type: typing.Any
        optional: bool
        key: typing.Any
        flags: typing.Optional[dict] = None
        flags_root: bool = False
        resolver_cache: dict = dataclasses.field(default_factory=lambda: defaultdict(dict))

    @dataclasses.dataclass
    class ContainerMetadata(Metadata):
        key_type: typing.Any = None
        element_type: typing.Any = None

    class Node:
        def __getstate__(self):
            state = dict(self.__dict__)
            state.pop('_flags_cache', None)
            return state

        def __setstate__(self, state):
            self.__dict__.update(state)
            self._flags_cache = None

    place('omegaconf.base', Metadata), place('omegaconf.base', ContainerMetadata), place('omegaconf.base', Node)
    container = place('omegaconf.base', type('Container', (Node, ), {}))
    value_node = place('omegaconf.nodes', type('ValueNode', (Node, ), {}))
    leaf = {t: place('omegaconf.nodes', type(n, (value_node, ), {}))
            for t, n in ((str, 'StringNode'), (int, 'IntegerNode'), (float, 'FloatNode'), (bool, 'BooleanNode'))}
    any_node = place('omegaconf.nodes', type('AnyNode', (value_node, ), {}))
    dict_config = place('omegaconf.dictconfig', type('DictConfig', (container, ), {}))
    list_config = place('omegaconf.listconfig', type('ListConfig', (container, ), {}))
    mods['omegaconf'].DictConfig, mods['omegaconf'].ListConfig = dict_config, list_config

    def wrap(value, parent=None, key=None, typed=False):
        if isinstance(value, (dict, list)):
            node = (dict_config if isinstance(value, dict) else list_config)()
            node._metadata = ContainerMetadata(typing.Any, type(value), True, key, key_type=typing.Any,
                                               element_type=typing.Any, flags={'readonly': False})
            items = value.items() if isinstance(value, dict) else enumerate(value)
            content = {k: wrap(v, node, k, not typed) for k, v in items}
            node._content = content if isinstance(value, dict) else list(content.values())
        else:  # alternate typed nodes and AnyNode
            node = leaf.get(type(value), any_node)() if typed else any_node()
            node._metadata, node._val = Metadata(typing.Any, None, True, key), value
        node._parent, node._flags_cache = parent, {}
        return node

    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(mods)
    try:
        yield wrap, dict_config
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old


def load_quiet(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # nothing may be missing / conflicting in these files
        return load_checkpoint(path, **kw)


def check_same_outputs(GRL, model, sd, kwargs):
    loaded = GRL(**kwargs).eval()
    loaded.load_state_dict(sd, strict=True)
    assert torch.equal(run(loaded), run(model))


def expected_config_kwargs(cfg):
    return {k: v for k, v in cfg.items() if k not in IGNORED}


# ----------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize('omega', [False, True], ids=['plain-dict', 'omegaconf'])
@pytest.mark.parametrize('protocol', [2, 4])
def test_lightning_base_engine(GRL, tmp_path, omega, protocol):
    model = make_model(GRL)
    cfg = dict(TINY, **IGNORED)
    path = tmp_path / 'sr_grl.ckpt'
    if omega:
        with fake_omegaconf() as (wrap, dict_config):
            ckpt = lightning_ckpt(official_sd(model), wrap(hydra_config(cfg)))
            ckpt['hparams_type'] = dict_config
            torch.save(ckpt, path, pickle_protocol=protocol)
        assert 'omegaconf' not in sys.modules
    else:
        torch.save(lightning_ckpt(official_sd(model), hydra_config(cfg)), path, pickle_protocol=protocol)
    sd, kwargs = load_quiet(path)
    assert list(sd) == list(model.state_dict())
    assert kwargs.format == 'lightning (BaseEngine, model.*)' and kwargs.missing == []
    assert {k: kwargs[k] for k in expected_config_kwargs(cfg)} == expected_config_kwargs(cfg)
    assert not set(IGNORED) & set(kwargs)
    assert kwargs.origin['window_size'] == 'config' and kwargs.origin['qkv_bias'] == 'weights'
    check_same_outputs(GRL, model, sd, kwargs)


@pytest.mark.parametrize('zipfile', [True, False], ids=['zip', 'legacy'])
def test_omegaconf_protocol1_reconstructor(GRL, tmp_path, zipfile):
    """Protocol 0/1 pickles rebuild objects with copyreg._reconstructor; also the pre-1.6 format."""
    model = make_model(GRL)
    with fake_omegaconf() as (wrap, _):
        torch.save(lightning_ckpt(official_sd(model), wrap(hydra_config(dict(TINY)))), tmp_path / 'p1.ckpt',
                   pickle_protocol=1, _use_new_zipfile_serialization=zipfile)
    sd, kwargs = load_quiet(tmp_path / 'p1.ckpt')
    assert kwargs['stripe_size'] == [8, 8] and kwargs['stripe_groups'] == [None, None]
    check_same_outputs(GRL, model, sd, kwargs)


def test_real_omegaconf_pickle(GRL, tmp_path, monkeypatch):
    """Runs only where omegaconf is installed; loading must not import it."""
    omegaconf = pytest.importorskip('omegaconf')
    model = make_model(GRL)
    cfg = omegaconf.OmegaConf.create(hydra_config(dict(TINY, **IGNORED, upscale='${data_module.scale}')))
    ckpt = lightning_ckpt(official_sd(model), cfg)
    ckpt['hparams_type'] = type(cfg)
    torch.save(ckpt, tmp_path / 'real.ckpt')
    monkeypatch.setitem(sys.modules, 'omegaconf', None)  # any import of it would now fail
    sd, kwargs = load_quiet(tmp_path / 'real.ckpt')
    assert kwargs['upscale'] == 2 and kwargs.origin['window_size'] == 'config'
    check_same_outputs(GRL, model, sd, kwargs)


def test_lightning_psnr_engine_double_prefix(GRL, tmp_path):
    model = make_model(GRL)
    path = tmp_path / 'bsr_psnr.ckpt'
    torch.save(lightning_ckpt(official_sd(model, ('model.', 'model_g.')), hydra_config(dict(TINY))), path)
    sd, kwargs = load_quiet(path)
    assert kwargs.format == 'lightning (PSNREngine, model_g.*)'
    assert set(sd) == set(model.state_dict())
    check_same_outputs(GRL, model, sd, kwargs)


def test_lightning_gan_engine(GRL, tmp_path):
    model = make_model(GRL)
    sd = official_sd(model, ('model_g.', ))
    sd.update({'model_d.conv0.weight': torch.zeros(4, 3, 3, 3), 'model_d.conv0.bias': torch.zeros(4)})
    with fake_omegaconf() as (wrap, _):
        hp = wrap(hydra_config({'model_g': dict(TINY, **IGNORED), 'model_d': {'num_in_ch': 3, 'num_feat': 4}}))
        torch.save(lightning_ckpt(sd, hp), tmp_path / 'bsr.ckpt')
    sd, kwargs = load_quiet(tmp_path / 'bsr.ckpt')
    assert kwargs.format == 'lightning (GANEngine, model_g.*)'
    assert not any(k.startswith(('model_d', 'conv0')) for k in sd)
    assert kwargs['window_size'] == 4 and kwargs.origin['window_size'] == 'config'
    check_same_outputs(GRL, model, sd, kwargs)


def test_interpolations_resolved_and_conflicts_use_weights(GRL, tmp_path):
    model = make_model(GRL)
    cfg = dict(TINY, upscale='${data_module.scale}', in_channels=1, img_range='${nowhere.x}')
    torch.save(lightning_ckpt(official_sd(model), hydra_config(cfg)), tmp_path / 'i.ckpt')
    with pytest.warns(CheckpointWarning, match='in_channels=1 but the weights need 3'):
        sd, kwargs = load_checkpoint(tmp_path / 'i.ckpt')
    assert kwargs['upscale'] == 2 and kwargs['in_channels'] == 3 and 'img_range' not in kwargs
    check_same_outputs(GRL, model, sd, kwargs)


def test_bare_state_dict_with_buffers_infers_everything(GRL, tmp_path):
    model = make_model(GRL)
    torch.save(official_sd(model, ('', ), engine=False), tmp_path / 'bare.pth')
    sd, kwargs = load_quiet(tmp_path / 'bare.pth')
    assert set(fake_buffers()) == set(BUFFER_KEYS) and not set(BUFFER_KEYS) & set(sd)
    assert kwargs.format == 'state_dict' and kwargs.missing == []
    assert {k: kwargs[k] for k in TINY} == TINY
    assert kwargs.origin['window_size'] == 'buffers' and kwargs.origin['stripe_groups'] == 'assumed'
    check_same_outputs(GRL, model, sd, kwargs)


def test_bare_state_dict_without_geometry(GRL, tmp_path):
    """No geometry in the file: an error by default (never GRL's default window/stripe sizes);
    ``require_geometry=False`` opts in to a warning and ``kwargs.missing``."""
    model = make_model(GRL)
    path = tmp_path / 'weights_only.pth'
    torch.save(model.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # an error, not a warning first
        with pytest.raises(CheckpointError, match='weights_only.pth: window_size, stripe_size') as info:
            load_checkpoint(path)
    _assert_one_line(info, path)
    assert 'geometry=' in str(info.value) and 'require_geometry=False' in str(info.value)
    with pytest.raises(CheckpointError, match='window_size'):  # the package-level name is the same function
        grl_plugin.load_checkpoint(path)
    with pytest.warns(CheckpointWarning) as record:
        sd, kwargs = load_checkpoint(path, require_geometry=False)
    msg = str(record[0].message)
    assert str(path) in msg and 'window_size' in msg and 'stripe_size' in msg and '\n' not in msg
    assert kwargs.missing == list(GEOMETRY_KEYS) and not set(GEOMETRY_KEYS) & set(kwargs)
    check_same_outputs(GRL, model, sd, dict(kwargs, **GEOMETRY))


def test_geometry_given_to_load_checkpoint(GRL, tmp_path):
    """``geometry=`` fills what the file lacks (origin 'given'); part of it still raises, naming
    only what is left; a value contradicting the file is a one-line error."""
    model = make_model(GRL)
    path = tmp_path / 'weights_only.pth'
    torch.save(model.state_dict(), path)
    sd, kwargs = load_quiet(path, geometry=GEOMETRY)
    assert kwargs.missing == [] and all(kwargs.origin[k] == 'given' for k in GEOMETRY)
    check_same_outputs(GRL, model, sd, kwargs)
    with pytest.raises(CheckpointError, match=r'weights_only.pth: stripe_groups, stripe_shift not stored') as info:
        load_checkpoint(path, geometry={k: GEOMETRY[k] for k in ('window_size', 'stripe_size',
                                                                 'anchor_window_down_factor')})
    _assert_one_line(info, path)
    with pytest.raises(CheckpointError, match=r'geometry= gives embed_dim=32 but the file \(weights\) stores '
                                              r'embed_dim=16') as info:
        load_checkpoint(path, geometry=dict(GEOMETRY, embed_dim=32))
    _assert_one_line(info, path)
    with pytest.raises(CheckpointError, match="geometry= key 'window' is not a GRL argument"):
        load_checkpoint(path, geometry=dict(GEOMETRY, window=4))
    with pytest.raises(CheckpointError, match='geometry= must be a mapping'):
        load_checkpoint(path, geometry=[('window_size', 4)])
    # a file that stores its geometry: an equal value is fine, a different one is an error
    stored = tmp_path / 'stored.pth'
    torch.save({'params': model.state_dict(), 'grl_kwargs': dict(TINY)}, stored)
    assert load_quiet(stored, geometry={'window_size': 4})[1].origin['window_size'] == 'metadata'
    with pytest.raises(CheckpointError, match=r'geometry= gives window_size=8 but the file \(metadata\) stores '
                                              r'window_size=4') as info:
        load_checkpoint(stored, geometry={'window_size': 8})
    _assert_one_line(info, stored)
    # a malformed grl_kwargs entry is named
    torch.save({'params': model.state_dict(), 'grl_kwargs': [4, 8]}, stored)
    with pytest.raises(CheckpointError, match="'grl_kwargs' entry is a list") as info:
        load_checkpoint(stored)
    _assert_one_line(info, stored)


def test_basicsr_params_and_params_ema(GRL, tmp_path):
    ema, plain = make_model(GRL, seed=0), make_model(GRL, seed=1)
    path = tmp_path / 'net_g_1000.pth'
    torch.save({'params': plain.state_dict(), 'params_ema': ema.state_dict()}, path)
    for key, model in ((None, ema), ('params_ema', ema), ('params', plain)):
        sd, kwargs = load_quiet(path, key=key, geometry=GEOMETRY)
        assert kwargs.format == f'basicsr ({key or "params_ema"})'
        check_same_outputs(GRL, model, sd, kwargs)
    # BasicSR's rule: a missing params_ema falls back to params
    torch.save({'params': plain.state_dict()}, path)
    with pytest.warns(CheckpointWarning):
        sd, kwargs = load_checkpoint(path, key='params_ema', require_geometry=False)
    assert kwargs.format == 'basicsr (params)'
    check_same_outputs(GRL, plain, sd, dict(kwargs, **GEOMETRY))
    # a key that is nowhere in a dict that holds no GRL weights is an error
    torch.save({'weights': plain.state_dict()}, path)
    with pytest.raises(CheckpointError, match="no 'params_ema' entry"):
        load_checkpoint(path, key='params_ema')


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_save_converted_round_trip(GRL, tmp_path, suffix):
    model = make_model(GRL)
    torch.save(lightning_ckpt(official_sd(model), hydra_config(dict(TINY, **IGNORED))), tmp_path / 'src.ckpt')
    sd, kwargs = load_quiet(tmp_path / 'src.ckpt')
    dst, yml = save_converted(sd, kwargs, tmp_path / f'out{suffix}')
    assert yml == tmp_path / 'out.yml'
    net = yaml.safe_load(yml.read_text())['network_g']
    assert net.pop('type') == 'GRL' and net == dict(kwargs)
    if suffix == '.pth':  # BasicSR layout plus the kwargs, readable with weights_only
        stored = torch.load(dst, weights_only=True)
        assert list(stored) == ['params', 'grl_kwargs'] and stored['grl_kwargs'] == net
    sd2, kwargs2 = load_quiet(dst)
    assert kwargs2 == kwargs and kwargs2.format == ('safetensors' if suffix == '.safetensors' else 'basicsr (params)')
    assert kwargs2.origin['window_size'] == 'metadata'
    check_same_outputs(GRL, model, sd2, kwargs2)
    yml.unlink()  # both keep their kwargs in the file itself
    assert load_quiet(dst)[1] == kwargs
    if suffix == '.pth':  # an older converted .pth ({'params': sd} only) falls back to the sidecar
        torch.save({'params': sd}, dst)
        with pytest.raises(CheckpointError, match='window_size'):
            load_checkpoint(dst)
        save_converted(sd, kwargs, tmp_path / 'again.safetensors')[1].rename(tmp_path / 'out.yml')
        assert load_quiet(dst)[1].origin['window_size'] == 'sidecar'


# ----------------------------------------------------------------------------------------------
# inference of the shape-determined kwargs


@pytest.mark.parametrize('over', [
    dict(upsampler='pixelshuffle', upscale=2),
    dict(upsampler='pixelshuffle', upscale=3),
    dict(upsampler='pixelshuffle', upscale=4, depths=[2, 1], num_heads_window=[2, 1], num_heads_stripe=[1, 2]),
    dict(upsampler='pixelshuffledirect', upscale=2),
    dict(upsampler='pixelshuffledirect', upscale=3, in_channels=1),
    dict(upsampler='nearest+conv', upscale=4),
    dict(upsampler='', upscale=1, in_channels=1),
    dict(upsampler='', upscale=1, in_channels=6),
    dict(upsampler='', upscale=1, in_channels=6, out_channels=3),
    dict(upsampler='pixelshuffle', upscale=2, in_channels=6, out_channels=3),
    dict(conv_type='3conv'), dict(conv_type='1conv1x1'), dict(conv_type='linear'),
    dict(local_connection=True, embed_dim=36), dict(mlp_ratio=1.5), dict(mlp_ratio=2.5, embed_dim=20),
    dict(qkv_bias=False),
], ids=lambda d: '-'.join(f'{k}={v}' for k, v in d.items()))
def test_infer_kwargs(GRL, over):
    kw = dict(TINY, **over)
    inferred = infer_kwargs(GRL(**kw).state_dict())
    effective = dict(kw, out_channels=kw.get('out_channels') or kw.get('in_channels', 3))
    for key, value in dict(inferred, out_channels=inferred.get('out_channels', inferred['in_channels'])).items():
        assert value == effective.get(key, {'in_channels': 3, 'qkv_bias': True, 'local_connection': False,
                                            'conv_type': '1conv'}.get(key)), key
    assert {'in_channels', 'embed_dim', 'depths', 'num_heads_window', 'num_heads_stripe', 'mlp_ratio', 'upsampler',
            'upscale', 'conv_type', 'local_connection', 'qkv_bias'} <= set(inferred)
    GRL(**dict(kw, **inferred)).load_state_dict(GRL(**kw).state_dict(), strict=True)


def test_pixelshuffledirect_ambiguous_scale_is_reported(GRL, tmp_path):
    model = make_model(GRL, upsampler='pixelshuffledirect', upscale=4, in_channels=3, out_channels=1)
    torch.save(official_sd(model, ('', ), engine=False), tmp_path / 'amb.pth')  # 16 = 4*4*1 = 2*2*4
    with pytest.warns(CheckpointWarning, match='upscale, out_channels'):
        _, kwargs = load_checkpoint(tmp_path / 'amb.pth', require_geometry=False)
    assert kwargs.missing == ['upscale', 'out_channels'] and 'upscale' not in kwargs
    with pytest.raises(CheckpointError, match='amb.pth: upscale, out_channels not stored'):
        load_checkpoint(tmp_path / 'amb.pth')
    sd, kwargs = load_quiet(tmp_path / 'amb.pth', geometry={'upscale': 4})  # out_channels: 16 / 4^2
    assert kwargs.missing == [] and kwargs['out_channels'] == 1 and kwargs.origin['upscale'] == 'given'
    check_same_outputs(GRL, model, sd, kwargs)


# ----------------------------------------------------------------------------------------------
# geometry from the official buffer shapes (task_configs.json)

TASKS = {  # name: ((window, stripe, df, pad size), shapes from task_configs.json)
    'tiny@sr': ((32, [64, 64], 4, 64), {'table_w': (1, 63, 63, 2), 'table_sh': (1, 79, 79, 2),
                                       'index_sh_a2w': (256, 4096), 'mask_w': (4, 1024, 1024)}),
    'small@sr': ((32, [64, 64], 4, 64), {'table_sh': (1, 79, 79, 2), 'mask_sh_w2a': (1, 4096, 256)}),
    'base_bsr@bsr': ((16, [32, 64], 4, 64), {'table_w': (1, 31, 31, 2), 'table_sh': (1, 39, 79, 2),
                                            'table_sv': (1, 79, 39, 2), 'index_sh_a2w': (128, 2048),
                                            'mask_w': (16, 256, 256), 'mask_sh_a2w': (2, 128, 2048)}),
    'base@bsr_psnr': ((16, [64, 64], 4, 64), {'index_sh_w2a': (4096, 256), 'mask_sv_a2w': (1, 256, 4096)}),
    'base@db_defocus': ((16, [48, 96], 4, 96), {'table_sh': (1, 59, 119, 2), 'index_sv_a2w': (288, 4608),
                                               'mask_w': (36, 256, 256)}),
    'base@db_motion': ((12, [48, 96], 4, 96), {'table_w': (1, 23, 23, 2), 'index_w': (144, 144),
                                              'mask_w': (64, 144, 144), 'mask_sh_w2a': (2, 4608, 288)}),
    'small@dm': ((8, [32, 32], 4, 32), {'table_sh': (1, 39, 39, 2), 'index_sh_a2w': (64, 1024)}),
    'small@jpeg': ((36, [72, 144], 4, 144), {'table_w': (1, 71, 71, 2), 'table_sh': (1, 89, 179, 2),
                                            'table_sv': (1, 179, 89, 2), 'index_w': (1296, 1296),
                                            'index_sh_a2w': (648, 10368), 'mask_w': (16, 1296, 1296)}),
    'tiny@dn': ((16, [64, 128], 4, 128), {'table_w': (1, 31, 31, 2), 'table_sh': (1, 79, 159, 2),
                                         'index_sh_a2w': (512, 8192), 'mask_w': (64, 256, 256),
                                         'mask_sh_a2w': (2, 512, 8192)}),
}


@pytest.mark.parametrize('task', sorted(TASKS))
def test_infer_geometry_task_configs(task):
    (ws, stripe, df, pad), known = TASKS[task]
    shapes = buffer_shapes(ws, stripe, df, pad)
    assert {k: shapes[k] for k in known} == known  # the helper reproduces the official shapes
    assert infer_geometry(shapes) == dict(window_size=ws, stripe_size=stripe, stripe_groups=[None, None],
                                          stripe_shift=True, anchor_window_down_factor=df, img_size=pad)


@pytest.mark.parametrize('task', ['tiny@sr', 'base_bsr@bsr', 'tiny@dn', 'small@jpeg'])
def test_geometry_from_official_file(GRL, tmp_path, task):
    (ws, stripe, df, pad), _ = TASKS[task]
    model = make_model(GRL)
    sd = OrderedDict(('model.' + k, v) for k, v in fake_buffers(ws, stripe, df, pad).items())
    sd.update(('model.' + k, v) for k, v in model.state_dict().items())
    torch.save(lightning_ckpt(sd, {}), tmp_path / f'{task}.ckpt')
    sd, kwargs = load_quiet(tmp_path / f'{task}.ckpt')
    assert (kwargs['window_size'], kwargs['stripe_size'], kwargs['anchor_window_down_factor']) == (ws, stripe, df)
    assert kwargs['img_size'] == pad and set(sd) == set(model.state_dict())


def test_geometry_of_model_yaml_buffers_and_inconsistent_shapes():
    # grl_tiny.yaml buffers @64 (stripe [8, None], groups [None, 4]): the same stripes as 8x16 at 64x64
    shapes = {'table_w': (1, 15, 15, 2), 'table_sh': (1, 9, 19, 2), 'index_w': (64, 64), 'index_sh_a2w': (8, 128),
              'mask_w': (64, 64, 64)}
    assert infer_geometry(shapes)['stripe_size'] == [8, 16]
    assert infer_geometry(dict(shapes, index_sh_a2w=(8, 100))) is None
    assert infer_geometry(dict(shapes, table_w=(1, 15, 13, 2))) is None
    assert infer_geometry({'table_w': (1, 15, 15, 2)}) is None


# ----------------------------------------------------------------------------------------------
# safety and errors


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg, )


@pytest.mark.parametrize('where', ['callbacks', 'hyper_parameters', 'state_dict'])
@pytest.mark.parametrize('func', ['os.system', 'eval'])
def test_malicious_pickle_refused_and_not_executed(GRL, tmp_path, capsys, where, func):
    marker = tmp_path / 'pwned'
    payload = (_Evil(os.system, f'touch {marker}') if func == 'os.system' else
               _Evil(eval, f'open({str(marker)!r}, "w").close()'))
    ckpt = lightning_ckpt(official_sd(make_model(GRL)), hydra_config(dict(TINY)))
    ckpt[where] = {**ckpt[where], 'x': payload}
    path = tmp_path / 'evil.ckpt'
    torch.save(ckpt, path)
    refused = r'refusing to unpickle (posix\.system|builtins\.eval) .*trust=True'
    with pytest.raises(CheckpointError, match=refused) as info:
        load_checkpoint(path)
    _assert_one_line(info, path)
    assert convert_main([str(path), str(tmp_path / 'o.pth')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('grl-convert: error: ') and err.count('\n') == 1 and '--trust' in err
    assert not marker.exists() and not (tmp_path / 'o.pth').exists()


def test_unknown_class_needs_trust(GRL, tmp_path):
    mod = types.ModuleType('grl_test_thirdparty')

    class Thing:
        pass

    Thing.__module__, Thing.__qualname__, mod.Thing = mod.__name__, 'Thing', Thing
    sys.modules[mod.__name__] = mod
    try:
        model = make_model(GRL)
        ckpt = lightning_ckpt(official_sd(model), hydra_config(dict(TINY)))
        ckpt['callbacks'] = {'thing': Thing()}
        torch.save(ckpt, tmp_path / 't.ckpt')
        with pytest.raises(CheckpointError, match='grl_test_thirdparty.Thing'):
            load_checkpoint(tmp_path / 't.ckpt')
        sd, kwargs = load_quiet(tmp_path / 't.ckpt', trust=True)
        check_same_outputs(GRL, model, sd, kwargs)
    finally:
        del sys.modules[mod.__name__]


def _assert_one_line(exc_info, path):
    msg = str(exc_info.value)
    assert '\n' not in msg and str(path) in msg, msg


def test_error_messages(GRL, tmp_path):
    model = make_model(GRL)
    good = tmp_path / 'good.ckpt'
    torch.save(lightning_ckpt(official_sd(model), {}), good)
    cases = {
        'text.ckpt': (b'hello, this is not a checkpoint\n', 'not a PyTorch checkpoint'),
        'empty.pth': (b'', 'empty file'),
        'truncated.ckpt': (good.read_bytes()[:len(good.read_bytes()) // 2], 'corrupt or truncated'),
        'junk.safetensors': (b'\x20\x00\x00\x00\x00\x00\x00\x00{"a": 1', 'not a readable safetensors'),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
    objects = {
        'nokeys.pth': ({'foo': torch.zeros(2)}, 'no GRL keys found'),
        'list.pth': ([1, 2], 'unknown format'),
        'noconvfirst.pth': ({k: v for k, v in model.state_dict().items() if k != 'conv_first.weight'},
                            'conv_first.weight is missing'),
        'nolast.pth': ({k: v for k, v in model.state_dict().items() if not k.startswith('conv_last')},
                       'missing conv_last.weight'),
        'extra.pth': (dict(model.state_dict(), optimizer=torch.zeros(1)), "unexpected entry 'optimizer'"),
    }
    for name, (obj, match) in objects.items():
        torch.save(obj, tmp_path / name)
        cases[name] = (None, match)
    torch.save(lightning_ckpt(official_sd(model), {}), tmp_path / 'legacy.ckpt', _use_new_zipfile_serialization=False)
    data = (tmp_path / 'legacy.ckpt').read_bytes()
    (tmp_path / 'legacy.ckpt').write_bytes(data[:len(data) // 2])
    cases['legacy.ckpt'] = (None, 'corrupt or truncated')
    for name, (_, match) in cases.items():
        with pytest.raises(CheckpointError, match=match) as info:
            load_checkpoint(tmp_path / name)
        _assert_one_line(info, tmp_path / name)
    with pytest.raises(CheckpointError, match='no such file'):
        load_checkpoint(tmp_path / 'missing.ckpt')


# ----------------------------------------------------------------------------------------------
# grl-convert


def test_cli_convert(GRL, tmp_path, capsys):
    model = make_model(GRL)
    src = tmp_path / 'sr.ckpt'
    torch.save(lightning_ckpt(official_sd(model), hydra_config(dict(TINY, **IGNORED))), src)
    assert convert_main([str(src), str(tmp_path / 'grl.safetensors')]) == 0
    out = capsys.readouterr().out
    assert 'lightning (BaseEngine, model.*)' in out and f'{sum(p.numel() for p in model.parameters()):,}' in out
    assert 'window_size: 4  [config]' in out
    sd, kwargs = load_quiet(tmp_path / 'grl.safetensors')
    check_same_outputs(GRL, model, sd, kwargs)


def test_cli_missing_geometry_and_set(GRL, tmp_path, capsys):
    model = make_model(GRL)
    src = tmp_path / 'bare.pth'
    torch.save(model.state_dict(), src)
    assert convert_main([str(src), str(tmp_path / 'o.pth')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('grl-convert: error: ') and err.count('\n') == 1 and '--set' in err
    assert not (tmp_path / 'o.pth').exists()
    sets = ['--set', 'window_size=4', '--set', 'stripe_size=[8, 8]', '--set', 'stripe_groups=[null, null]',
            '--set', 'stripe_shift=true', '--set', 'anchor_window_down_factor=2']
    assert convert_main([str(src), str(tmp_path / 'o.pth'), *sets]) == 0
    assert 'window_size: 4  [given]' in capsys.readouterr().out
    sd, kwargs = load_quiet(tmp_path / 'o.pth')  # kwargs from the file's grl_kwargs entry
    check_same_outputs(GRL, model, sd, kwargs)
    for bad, match in ((['--set', 'embed_dim=32'], 'weights do not fit'), (['--set', 'nonsense=1'], 'KEY=VALUE'),
                       (['--set', 'window_size=[1'], 'not valid YAML')):
        assert convert_main([str(src), str(tmp_path / 'p.pth'), *sets, *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith('grl-convert: error: ') and err.count('\n') == 1 and match in err, err
    assert convert_main([str(src), str(tmp_path / 'p.ckpt'), *sets]) == 2
    assert 'unsupported output type' in capsys.readouterr().err


def test_cli_subprocess(GRL, tmp_path):
    model = make_model(GRL)
    torch.save(official_sd(model, ('', ), engine=False), tmp_path / 'bare.pth')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')]))
    res = subprocess.run([sys.executable, '-m', 'grl_plugin.cli.convert', str(tmp_path / 'bare.pth'),
                          str(tmp_path / 'out.safetensors')], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert 'Traceback' not in res.stderr and 'format: state_dict' in res.stdout
    sd, kwargs = load_quiet(tmp_path / 'out.safetensors')
    check_same_outputs(GRL, model, sd, kwargs)
