"""BasicSR as it was: every BasicSR function the plugin patches keeps the contract BasicSR's own
callers rely on.

``basicsr_probe.py`` calls BasicSR's functions in two fresh processes, one with BasicSR as it is
(only the torchvision import workarounds, without which BasicSR 1.4.2 does not import here) and
one after ``import grl_plugin``. The results must be equal, except where the plugin's change is
the point: each such case is listed in :data:`DIFFERENCES` with the reason, and an exception the
plugin raises in place of BasicSR's is an instance of BasicSR's class. Also: ``grl_plugin.layers``
and ``grl_plugin.archs`` work where basicsr cannot be imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers import REPO_ROOT, make_lmdb, subprocess_env, write_options

PROBE = Path(__file__).resolve().parent / 'basicsr_probe.py'

#: probe -> why the plugin's result differs from BasicSR's (the test checks how).
DIFFERENCES = {
    'lmdb_get_missing_key': "BasicSR returns None and its datasets fail later on None; the plugin raises an "
                            "OSError naming the key and the LMDB (what BasicSR's retrying datasets catch)",
    'lmdb_second_backend_same_path': 'py-lmdb >= 2 refuses a second open of one LMDB in a process (workaround)',
    'imfrombytes_corrupt_float32': "BasicSR fails on None.astype (AttributeError); the plugin raises a ValueError "
                                   "naming the data; no BasicSR caller catches either",
    'imfrombytes_none': 'BasicSR fails in np.frombuffer (TypeError); the plugin raises an OSError (no data); '
                        'no BasicSR caller catches either',
    'resume_state_from_cwd': 'BasicSR maps the state to CUDA and fails without it (workaround)',
}


@pytest.fixture(scope='module')
def probe_results(tmp_path_factory):
    data = tmp_path_factory.mktemp('probe')
    lmdbs = make_lmdb(data, n_images=3, size=16, scale=2, name='probe')
    os.symlink(lmdbs['gt'], data / 'gt.lmdb')
    os.symlink(lmdbs['lq'], data / 'lq.lmdb')
    png = cv2.imread(str(Path(lmdbs['gt']).parent / 'probe_GT_png' / '0000.png'))
    cv2.imwrite(str(data / 'img.png'), png)
    cv2.imwrite(str(data / 'img.jpg'), png)
    (data / 'meta_realesrgan.txt').write_text('missing.png\n' + 'img.png\n' * 6)
    write_options(data, lmdbs, filename='train.yml', name='probe_opts', num_gpu=0)
    states = data / 'root' / 'experiments' / 'probe_run' / 'training_states'
    states.mkdir(parents=True)
    torch.save({'epoch': 0, 'iter': 3, 'optimizers': [], 'schedulers': []}, states / '3.state')
    out = {}
    for mode in ('plain', 'plugin'):
        path = data / f'{mode}.json'
        res = subprocess.run([sys.executable, str(PROBE), mode, str(data), str(path)], cwd=str(data),
                             capture_output=True, text=True, timeout=600, env=subprocess_env())
        assert res.returncode == 0, res.stderr[-4000:]
        out[mode] = json.loads(path.read_text())
    return out


def _error(result):
    return result.get('error') or []


def test_probes_ran_in_both_processes(probe_results):
    plain, plugin = probe_results['plain'], probe_results['plugin']
    assert set(plain) == set(plugin) and len(plain) >= 30
    # sanity of the probes themselves: real values where BasicSR works
    assert plain['disk_get_present']['value'].startswith('bytes:')
    assert plain['paired_dataset_lmdb']['value'][0] == 3
    assert plain['registries']['value']['arch']['MSRResNet'].startswith('basicsr.archs')


def test_same_results_where_the_plugin_changes_nothing(probe_results):
    plain, plugin = probe_results['plain'], probe_results['plugin']
    different = {name for name in plain if plain[name] != plugin[name] and  # errors: the next test
                 not (_error(plain[name]) and _error(plain[name])[0] in _error(plugin[name]))}
    assert different <= set(DIFFERENCES), {n: (plain[n], plugin[n]) for n in different - set(DIFFERENCES)}
    for name in set(DIFFERENCES) - different:  # a listed difference that is no longer one: update the list
        assert _error(plain[name]) and plain[name] != plugin[name], name


def test_errors_keep_basicsr_classes(probe_results):
    """Where both raise, the plugin's exception is an instance of BasicSR's class."""
    plain, plugin = probe_results['plain'], probe_results['plugin']
    for name in plain:
        if _error(plain[name]) and name not in DIFFERENCES:
            assert _error(plugin[name]), name
            assert _error(plain[name])[0] in _error(plugin[name]), (name, plain[name], plugin[name])
    missing = plugin['disk_get_missing']
    assert 'FileNotFoundError' in missing['error'] and 'DataError' in missing['error']
    assert 'missing.png' in missing['message'] and 'cannot read' in missing['message']
    # load_network is BasicSR's own for BasicSR's models: its RuntimeError, unchanged
    assert plugin['load_network_wrong_shapes']['error'][0] == plain['load_network_wrong_shapes']['error'][0]
    assert 'RuntimeError' in plain['load_network_wrong_shapes']['error']


def test_listed_differences_are_what_they_claim(probe_results):
    plain, plugin = probe_results['plain'], probe_results['plugin']
    assert plain['lmdb_get_missing_key'] == {'value': None}
    assert {'OSError', 'DataError'} <= set(plugin['lmdb_get_missing_key']['error'])
    assert "'9999'" in plugin['lmdb_get_missing_key']['message']
    assert 'Error' in plain['lmdb_second_backend_same_path']['error'][0]
    first, second = plugin['lmdb_second_backend_same_path']['value']
    assert first == second and first.startswith('bytes:')
    assert plain['imfrombytes_corrupt_float32']['error'][0] == 'AttributeError'
    assert {'ValueError', 'DataError'} <= set(plugin['imfrombytes_corrupt_float32']['error'])
    assert plain['imfrombytes_none']['error'][0] == 'TypeError'
    assert 'DataError' in plugin['imfrombytes_none']['error']
    assert _error(plain['resume_state_from_cwd'])
    assert plugin['resume_state_from_cwd'] == {'value': [3, True]}


def test_basicsr_callers_catch_none_of_the_changed_classes():
    """The listed differences replace AttributeError/TypeError/None: no BasicSR module catches
    those around file reading, and the ones that catch anything there catch OSError."""
    import basicsr
    root = Path(basicsr.__file__).parent
    for path in root.rglob('*.py'):
        text = path.read_text(encoding='utf-8', errors='replace')
        if 'imfrombytes' in text or 'file_client.get' in text:
            assert 'except AttributeError' not in text and 'except TypeError' not in text, path
    retry = (root / 'data' / 'realesrgan_dataset.py').read_text()
    assert 'except (IOError, OSError)' in retry


def test_realesrgan_dataset_still_retries_an_unreadable_file(probe_results):
    """BasicSR's RealESRGANDataset catches OSError from the file client and reads another image:
    with the plugin the same (an image, not an error), and the same image."""
    plain, plugin = probe_results['plain'], probe_results['plugin']
    assert 'value' in plain['realesrgan_dataset_retries_unreadable_file']
    assert plugin['realesrgan_dataset_retries_unreadable_file'] == plain['realesrgan_dataset_retries_unreadable_file']


def test_saved_networks_keep_keys_and_metadata(probe_results):
    value = probe_results['plugin']['save_network_keys_and_metadata']['value']
    assert value == probe_results['plain']['save_network_keys_and_metadata']['value']
    keys, params, metadata = value[0], value[1], value[2]
    assert keys == ['params'] and params and metadata  # BasicSR's file keeps the state dict's _metadata


def test_grl_model_saves_what_basicsr_saves(tmp_path):
    """GRLModel.save_network (atomic) writes the keys, tensors and ``_metadata`` BaseModel writes."""
    import grl_plugin  # noqa: F401
    from basicsr.models.base_model import BaseModel

    from grl_plugin.models.grl_model import GRLModel

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    for cls, folder in ((BaseModel, tmp_path / 'basicsr'), (GRLModel, tmp_path / 'grl')):
        folder.mkdir()
        model = object.__new__(cls)
        model.opt = {'path': {'models': str(folder)}, 'dist': False}
        cls.save_network(model, [net, net], 'net_g', -1, ['params', 'params_ema'])
    a = torch.load(tmp_path / 'basicsr' / 'net_g_latest.pth')
    b = torch.load(tmp_path / 'grl' / 'net_g_latest.pth')
    assert list(a) == list(b) == ['params', 'params_ema']
    for key in a:
        assert list(a[key]) == list(b[key]) and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        assert a[key]._metadata == b[key]._metadata and b[key]._metadata['1'] == {'version': 2}


def test_lmdb_rebuilt_at_the_same_path_is_read_anew(tmp_path):
    """The shared LMDB environment follows the file: a database deleted and rebuilt at the same
    path is read from the new file (the old environment is closed); an environment closes with
    its last user."""
    import gc
    import shutil

    import grl_plugin  # noqa: F401
    from basicsr.utils import FileClient

    from grl_plugin import compat
    if 'fix_lmdb_shared_env' not in compat.applied():
        pytest.skip('py-lmdb here opens one LMDB twice: no shared environments')
    first = make_lmdb(tmp_path / 'a', n_images=2, size=16, scale=2, name='db')['gt']
    other = make_lmdb(tmp_path / 'b', n_images=2, size=24, scale=2, name='db')['gt']
    old = FileClient('lmdb', db_paths=[first], client_keys=['gt'])
    before = old.get('0000', 'gt')
    shutil.rmtree(first)
    shutil.copytree(other, first)
    new = FileClient('lmdb', db_paths=[first], client_keys=['gt'])
    after = new.get('0000', 'gt')
    assert after == FileClient('lmdb', db_paths=[other], client_keys=['gt']).get('0000', 'gt') and after != before
    assert cv2.imdecode(np.frombuffer(after, np.uint8), cv2.IMREAD_COLOR).shape[0] == 24
    import lmdb
    with pytest.raises(lmdb.Error):  # the replaced database's environment was closed
        old.get('0000', 'gt')
    again = FileClient('lmdb', db_paths=[first], client_keys=['gt'])
    assert again.client._client['gt'] is new.client._client['gt']  # same file, one environment
    n = len(compat._LMDB_ENVS)
    key = next(k for k, e in compat._LMDB_ENVS.items() if e[0] is new.client._client['gt'])
    del new
    gc.collect()
    assert compat._LMDB_ENVS[key][1] == 1  # one user left
    del again
    gc.collect()
    assert len(compat._LMDB_ENVS) == n - 1 and key not in compat._LMDB_ENVS  # closed with its last user


BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == 'basicsr' or name.startswith('basicsr.'):
            raise ImportError('basicsr blocked for this test')
sys.meta_path.insert(0, Block())
"""


def test_layers_and_archs_work_without_basicsr(tmp_path):
    code = BLOCKED + """
import torch
import grl_plugin
from grl_plugin.layers import GRLBlock, WindowAttention
from grl_plugin.archs import GRL, grl_tiny
assert grl_plugin.BASICSR is False
assert not [m for m in sys.modules if m == 'basicsr' or m.startswith('basicsr.')]
net = GRL(embed_dim=16, depths=[2], num_heads_window=[1], num_heads_stripe=[1], window_size=4, stripe_size=[8, 8],
          anchor_window_down_factor=2, upsampler='pixelshuffle', upscale=2).eval()
with torch.no_grad():
    y = net(torch.rand(1, 3, 12, 20))
assert y.shape == (1, 3, 24, 40)
block = GRLBlock(16, 1, 1, window_size=4, stripe_size=[8, 8], anchor_window_down_factor=2)
print('OK', tuple(block(torch.rand(1, 16, 8, 8)).shape))
"""
    res = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=300, env=subprocess_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == 'OK (1, 16, 8, 8)'


def test_the_block_really_blocks_basicsr(tmp_path):
    res = subprocess.run([sys.executable, '-c', BLOCKED + 'import basicsr'], cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=120, env=subprocess_env())
    assert res.returncode != 0 and 'basicsr blocked' in res.stderr


def test_every_global_patch_is_listed_and_documented():
    import grl_plugin  # noqa: F401
    from grl_plugin import compat, patching
    owners = set(patching.patches().values())
    assert owners == {'grl_plugin.compat', 'grl_plugin.data.robust', 'grl_plugin.models.checkpoint_io',
                      'grl_plugin.models.exact_resume'}
    for fix in compat.applied():
        assert fix in (compat.__doc__ or ''), fix
    assert len((REPO_ROOT / 'grl_plugin' / 'compat.py').read_text().splitlines()) <= 500
