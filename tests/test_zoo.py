"""Released GRL models by name (grl_plugin.cli.zoo): download, cache, resume, errors, listing.

A local HTTP server on 127.0.0.1 (``http.server`` in a thread, with byte ranges) plays the GitHub
release: ``GRL_RELEASE_URL`` points at it and ``GRL_HOME`` at a temporary cache folder. What it
serves are tiny GRLs saved in the official Lightning layout (``model.*`` weights, the 13 official
buffers, engine entries and the Hydra config, as tests/test_checkpoint.py writes them) under the
released file names. The server records every request and, while it streams, whether the final
file already exists in the cache.
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import grl_plugin  # noqa: F401  (before basicsr)
from grl_plugin import GRL
from grl_plugin.archs.checkpoint import load_checkpoint
from grl_plugin.cli import convert, infer, zoo
from helpers import REPO_ROOT, free_port, subprocess_env
from test_checkpoint import hydra_config, lightning_ckpt, official_sd

cv2 = pytest.importorskip('cv2')

# the geometry of test_checkpoint.fake_buffers (window 4, stripes 8x8, anchor factor 2, 16x16)
TINY = dict(img_size=16, embed_dim=16, depths=[1], num_heads_window=[1], num_heads_stripe=[1], window_size=4,
            stripe_size=[8, 8], stripe_groups=[None, None], stripe_shift=True, anchor_window_down_factor=2,
            mlp_ratio=2)
VARIANTS = {  # (upscale, in_channels)
    'x2': (2, 3), 'x4': (4, 3), 'rgb': (1, 3), 'gray': (1, 1),
}


def tiny_kwargs(variant: str) -> dict:
    scale, channels = VARIANTS[variant]
    return dict(TINY, upscale=scale, in_channels=channels, upsampler='pixelshuffle' if scale > 1 else '')


def tiny_model(variant: str, seed: int = 0) -> GRL:
    torch.manual_seed(seed)
    model = GRL(**tiny_kwargs(variant)).eval()
    with torch.no_grad():  # every weight moved away from its init, residual kept small
        for p in model.parameters():
            p.mul_(0.5).add_(0.01 * torch.randn_like(p))
    return model


@pytest.fixture(scope='module')
def models():
    """variant -> (model, bytes of its official-layout .ckpt)."""
    out = {}
    for i, variant in enumerate(VARIANTS):
        model = tiny_model(variant, seed=i)
        buf = io.BytesIO()
        torch.save(lightning_ckpt(official_sd(model), hydra_config(dict(tiny_kwargs(variant), name='grl_tiny'))),
                   buf)
        out[variant] = (model, buf.getvalue())
    return out


# ------------------------------------------------------------------------------------ server
class Release:
    """What the local release server holds and what it saw."""

    def __init__(self, home: Path):
        self.files = {}            # file name -> bytes
        self.requests = []         # (path, Range header or None)
        self.ranges = True         # answer Range requests with 206 (False: always the whole file)
        self.cut_after = None      # close the connection after this many bytes of the body
        self.home = home
        self.dest_seen = []        # while streaming: did <home>/<file> exist?
        self.part_seen = []        # ... and <home>/<file>.part?

    def watch(self, name: str) -> None:
        self.dest_seen.append((self.home / name).exists())
        self.part_seen.append((self.home / (name + '.part')).exists())


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.0'  # one request per connection: closing it ends a cut body

    def log_message(self, *args):
        pass

    def do_GET(self):
        rel: Release = self.server.release
        rng = self.headers.get('Range')
        rel.requests.append((self.path, rng))
        if self.path.startswith('/redirect/'):  # as GitHub sends release assets to another host
            self.send_response(302)
            self.send_header('Location', self.path[len('/redirect'):])
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        name = self.path.rsplit('/', 1)[-1]
        data = rel.files.get(name) if self.path.startswith('/v1/') else None
        if data is None:
            self.send_error(404, 'Not Found')
            return
        start = 0
        match = re.fullmatch(r'bytes=(\d+)-', rng or '')
        if match and rel.ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header('Content-Range', f'bytes */{len(data)}')
                self.send_header('Content-Length', '0')
                self.end_headers()
                return
            self.send_response(206)
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header('Content-Type', 'application/octet-stream')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        limit = len(body) if rel.cut_after is None else min(rel.cut_after, len(body))
        for i in range(0, limit, 2048):
            self.wfile.write(body[i:min(i + 2048, limit)])
            self.wfile.flush()
            rel.watch(name)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test: a fresh cache folder, and a release URL nothing listens on (no real network)."""
    home = tmp_path / 'grl_home'
    monkeypatch.setenv('GRL_HOME', str(home))
    monkeypatch.setenv('GRL_RELEASE_URL', f'http://127.0.0.1:{free_port()}/v1')
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')
    return home


@pytest.fixture
def server(cache, monkeypatch):
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    httpd.release = Release(cache)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv('GRL_RELEASE_URL', f'http://127.0.0.1:{httpd.server_address[1]}/v1/')
    yield httpd.release
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def serve(server: Release, models, **names) -> None:
    """serve(server, models, sr_grl_small_c3x2='x2'): that name holds that variant's checkpoint."""
    for name, variant in names.items():
        server.files[f'{name}.ckpt'] = models[variant][1]


def one_error(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f'{prog}: error: ') and 'Traceback' not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------ download
@pytest.mark.parametrize('spec', ['sr_grl_small_c3x2', 'sr_grl_small_c3x2.ckpt'])
def test_download_by_name(server, models, cache, spec):
    serve(server, models, sr_grl_small_c3x2='x2')
    path, release = zoo.resolve_checkpoint(spec, quiet=True)
    assert Path(path) == cache / 'sr_grl_small_c3x2.ckpt' and release is zoo.RELEASES['sr_grl_small_c3x2']
    assert Path(path).read_bytes() == models['x2'][1]
    assert server.requests == [('/v1/sr_grl_small_c3x2.ckpt', None)]
    assert sorted(p.name for p in cache.iterdir()) == ['sr_grl_small_c3x2.ckpt']  # no .part left
    sd, kwargs = load_checkpoint(path)
    assert kwargs['upscale'] == 2 and kwargs['in_channels'] == 3 and kwargs['window_size'] == 4
    model = models['x2'][0]
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items()) and len(sd) == len(model.state_dict())


@pytest.mark.parametrize('name, variant', [('dn_grl_tiny_c1s25', 'gray'), ('jpeg_grl_small_c3q40', 'rgb'),
                                           ('bsr_grl_base', 'x4')])
def test_open_checkpoint_other_tasks(server, models, cache, name, variant):
    serve(server, models, **{name: variant})
    sd, kwargs, path = zoo.open_checkpoint(name, quiet=True)
    assert Path(path) == cache / f'{name}.ckpt' and Path(path).read_bytes() == models[variant][1]
    assert kwargs['in_channels'] == VARIANTS[variant][1] and kwargs['upscale'] == VARIANTS[variant][0]
    assert len(server.requests) == 1


def test_second_use_hits_the_cache(server, models, cache, tmp_path, capsys):
    serve(server, models, dn_grl_tiny_c3s25='rgb')
    first, _ = zoo.resolve_checkpoint('dn_grl_tiny_c3s25', quiet=True)
    assert len(server.requests) == 1
    server.files.clear()  # the server could not serve it again
    for spec in ('dn_grl_tiny_c3s25', 'dn_grl_tiny_c3s25.ckpt'):
        again, release = zoo.resolve_checkpoint(spec)
        assert again == first and release.name == 'dn_grl_tiny_c3s25'
    assert convert.main(['dn_grl_tiny_c3s25', str(tmp_path / 'dn.pth')]) == 0
    cap = capsys.readouterr()
    assert 'downloaded' not in cap.err and str(cache / 'dn_grl_tiny_c3s25.ckpt') in cap.out
    assert len(server.requests) == 1  # not contacted again
    assert (cache / 'dn_grl_tiny_c3s25.ckpt').read_bytes() == models['rgb'][1]


@pytest.mark.parametrize('fraction', [0.0005, 0.5, 0.999])
def test_resume_partial_file(server, models, cache, fraction):
    data = models['x2'][1]
    have = max(1, int(len(data) * fraction))
    cache.mkdir()
    (cache / 'sr_grl_tiny_c3x2.ckpt.part').write_bytes(data[:have])
    serve(server, models, sr_grl_tiny_c3x2='x2')
    path, _ = zoo.resolve_checkpoint('sr_grl_tiny_c3x2', quiet=True)
    assert server.requests == [('/v1/sr_grl_tiny_c3x2.ckpt', f'bytes={have}-')]
    assert Path(path).read_bytes() == data
    assert not (cache / 'sr_grl_tiny_c3x2.ckpt.part').exists()


def test_resume_through_a_redirect(server, models, cache, monkeypatch):
    """The Range header survives the redirect from the release URL to the file's real address."""
    monkeypatch.setenv('GRL_RELEASE_URL', os.environ['GRL_RELEASE_URL'].replace('/v1', '/redirect/v1'))
    data = models['x4'][1]
    cache.mkdir()
    (cache / 'sr_grl_base_c3x4.ckpt.part').write_bytes(data[:5000])
    serve(server, models, sr_grl_base_c3x4='x4')
    path, _ = zoo.resolve_checkpoint('sr_grl_base_c3x4', quiet=True)
    assert server.requests == [('/redirect/v1/sr_grl_base_c3x4.ckpt', 'bytes=5000-'),
                               ('/v1/sr_grl_base_c3x4.ckpt', 'bytes=5000-')]
    assert Path(path).read_bytes() == data


def test_resume_of_a_complete_partial_file(server, models, cache):
    """A .part that already holds every byte: the server answers 416 and it is simply renamed."""
    data = models['gray'][1]
    cache.mkdir()
    (cache / 'dn_grl_small_c1s50.ckpt.part').write_bytes(data)
    serve(server, models, dn_grl_small_c1s50='gray')
    path, _ = zoo.resolve_checkpoint('dn_grl_small_c1s50', quiet=True)
    assert server.requests == [('/v1/dn_grl_small_c1s50.ckpt', f'bytes={len(data)}-')]
    assert Path(path).read_bytes() == data and not server.dest_seen  # nothing was streamed


def test_server_without_ranges_restarts_from_zero(server, models, cache):
    data = models['x2'][1]
    cache.mkdir()
    (cache / 'sr_grl_base_c3x2.ckpt.part').write_bytes(data[:1000])
    server.ranges = False
    serve(server, models, sr_grl_base_c3x2='x2')
    path, _ = zoo.resolve_checkpoint('sr_grl_base_c3x2', quiet=True)
    assert server.requests == [('/v1/sr_grl_base_c3x2.ckpt', 'bytes=1000-')]
    assert Path(path).read_bytes() == data  # not the first 1000 bytes twice


def test_cut_connection_keeps_the_part_and_resumes(server, models, cache):
    data = models['x4'][1]
    cut = len(data) // 3
    serve(server, models, bsr_grl_base='x4')
    server.cut_after = cut
    url = f'{os.environ["GRL_RELEASE_URL"].rstrip("/")}/bsr_grl_base.ckpt'
    with pytest.raises(zoo.ZooError) as info:
        zoo.resolve_checkpoint('bsr_grl_base', quiet=True)
    msg = str(info.value)
    assert '\n' not in msg and url in msg and str(cache / 'bsr_grl_base.ckpt') in msg
    assert f'{cut} of {len(data)} bytes' in msg or 'connection closed' in msg
    assert not (cache / 'bsr_grl_base.ckpt').exists()
    assert (cache / 'bsr_grl_base.ckpt.part').read_bytes() == data[:cut]
    server.cut_after = None
    path, _ = zoo.resolve_checkpoint('bsr_grl_base', quiet=True)
    assert server.requests[-1] == ('/v1/bsr_grl_base.ckpt', f'bytes={cut}-')
    assert Path(path).read_bytes() == data and not (cache / 'bsr_grl_base.ckpt.part').exists()


def test_final_name_never_holds_a_partial_file(server, models, cache):
    """While bytes arrive, only the .part file exists; the final name appears once it is complete."""
    serve(server, models, dm_grl_small='rgb')
    zoo.resolve_checkpoint('dm_grl_small', quiet=True)
    assert len(server.dest_seen) >= len(models['rgb'][1]) // 2048  # watched at every chunk
    assert not any(server.dest_seen) and all(server.part_seen)
    assert (cache / 'dm_grl_small.ckpt').read_bytes() == models['rgb'][1]


def test_not_a_checkpoint_is_not_kept(server, cache):
    server.files['db_motion_grl_base_gopro.ckpt'] = b'<html><body>Rate limited</body></html>\n' * 50
    with pytest.raises(zoo.ZooError, match='not a PyTorch checkpoint') as info:
        zoo.resolve_checkpoint('db_motion_grl_base_gopro', quiet=True)
    assert str(cache / 'db_motion_grl_base_gopro.ckpt') in str(info.value)
    assert not cache.exists() or list(cache.iterdir()) == []


@pytest.mark.skipif(os.name != 'posix', reason='POSIX file locks')
def test_concurrent_download_refused(server, models, cache):
    import fcntl
    cache.mkdir()
    part = cache / 'sr_grl_tiny_c3x3.ckpt.part'
    part.write_bytes(b'PK\x03\x04 first bytes')
    serve(server, models, sr_grl_tiny_c3x3='x2')
    with open(part, 'ab') as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(zoo.ZooError, match='another process is downloading'):
            zoo.resolve_checkpoint('sr_grl_tiny_c3x3', quiet=True)
    assert part.read_bytes() == b'PK\x03\x04 first bytes' and server.requests == []


def test_progress_bar_on_a_terminal(server, models, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, 'stderr', term)
    serve(server, models, sr_grl_tiny_c3x4='x4')
    zoo.resolve_checkpoint('sr_grl_tiny_c3x4', prog='grl-test-prog')
    text = term.getvalue()
    assert 'sr_grl_tiny_c3x4.ckpt' in text and '100%' in text  # tqdm's bar
    assert 'grl-test-prog: downloaded ' in text
    quiet = Terminal()
    monkeypatch.setattr(sys, 'stderr', quiet)
    serve(server, models, sr_grl_small_c3x4='x4')
    zoo.resolve_checkpoint('sr_grl_small_c3x4', quiet=True)
    assert quiet.getvalue() == ''


# ------------------------------------------------------------------------------------ failures
def _infer_args(spec, tmp_path):
    img = tmp_path / 'in.png'
    cv2.imwrite(str(img), np.full((16, 16, 3), 128, np.uint8))
    return ['--checkpoint', spec, '--input', str(img), '--output', str(tmp_path / 'out'), '--quiet']


@pytest.mark.parametrize('tool', ['infer', 'convert', 'export'])
def test_offline_one_line_with_url_and_destination(tool, cache, tmp_path, capsys):
    """Nothing listens at GRL_RELEASE_URL: one line naming the URL to fetch and where to put it."""
    if tool == 'export':
        pytest.importorskip('onnx', reason='onnx is not installed')
    from grl_plugin.cli import export
    name = 'sr_grl_base_c3x4'
    argv = {'infer': _infer_args(name, tmp_path), 'convert': [name, str(tmp_path / 'o.pth')],
            'export': ['--checkpoint', name, '--output', str(tmp_path / 'o.onnx')]}[tool]
    rc = {'infer': infer.main, 'convert': convert.main, 'export': export.main}[tool](argv)
    line = one_error(capsys.readouterr().err, f'grl-{tool}')
    assert rc == 2
    url = f'{os.environ["GRL_RELEASE_URL"]}/{name}.ckpt'
    assert f'fetch {url} by hand and save it as {cache / (name + ".ckpt")}' in line, line
    assert 'refused' in line.lower(), line
    assert not cache.exists() or list(cache.iterdir()) == []  # no empty .part left behind


def test_http_error_then_file_put_by_hand(server, models, cache, tmp_path, capsys):
    """404 from the server: the line says where the file goes; a file put there is then used."""
    rc = infer.main(_infer_args('dn_grl_base_c3s15', tmp_path))
    line = one_error(capsys.readouterr().err, 'grl-infer')
    assert rc == 2 and 'HTTP 404' in line and server.requests == [('/v1/dn_grl_base_c3s15.ckpt', None)]
    dest = Path(re.search(r'save it as (\S+)$', line).group(1))
    assert dest == cache / 'dn_grl_base_c3s15.ckpt'
    dest.write_bytes(models['rgb'][1])
    assert infer.main(_infer_args('dn_grl_base_c3s15', tmp_path)) == 0, capsys.readouterr().err
    assert len(server.requests) == 1 and (tmp_path / 'out' / 'in_grl.png').is_file()


def test_offline_subprocess_exit_status(cache, tmp_path):
    env = subprocess_env(GRL_HOME=str(cache), GRL_RELEASE_URL=os.environ['GRL_RELEASE_URL'])
    res = subprocess.run([sys.executable, '-m', 'grl_plugin.cli.convert', 'jpeg_grl_small_c1q10',
                          str(tmp_path / 'o.pth')], capture_output=True, text=True, env=env, timeout=300,
                         cwd=str(tmp_path))
    assert res.returncode == 2, res.stderr
    line = one_error(res.stderr, 'grl-convert')
    assert 'jpeg_grl_small_c1q10.ckpt by hand' in line and str(cache / 'jpeg_grl_small_c1q10.ckpt') in line


@pytest.mark.parametrize('spec, suggestion', [('sr_grl_tiny_x4', 'sr_grl_tiny_c3x4'),
                                              ('jpeg_grl_base_c3q10.ckpt', 'jpeg_grl_small_c3q10'),
                                              ('dn_grl_small_c3_s25', 'dn_grl_small_c3s25'),
                                              ('db_motion_grl_base_realblur', 'db_motion_grl_base_realblur_')])
def test_unknown_name_did_you_mean(server, spec, suggestion, tmp_path, capsys):
    rc = infer.main(_infer_args(spec, tmp_path))
    line = one_error(capsys.readouterr().err, 'grl-infer')
    assert rc == 2 and f'{spec}: no such file, and not a released GRL model name' in line
    assert f'did you mean {suggestion}' in line, line
    assert server.requests == []


def test_unknown_name_without_suggestion(server, tmp_path, capsys):
    assert convert.main(['my_weights.pth', str(tmp_path / 'o.pth')]) == 2
    line = one_error(capsys.readouterr().err, 'grl-convert')
    assert 'my_weights.pth: no such file' in line and 'did you mean' not in line and 'grl-zoo' in line
    missing = str(tmp_path / 'weights' / 'sr_grl_tiny_c3x4.ckpt')  # a path, not a name
    assert convert.main([missing, str(tmp_path / 'o.pth')]) == 2
    line = one_error(capsys.readouterr().err, 'grl-convert')
    assert f'{missing}: no such file' in line and 'bare name: sr_grl_tiny_c3x4' in line
    other = str(tmp_path / 'sr_grl_tiny_x4.pth')  # a missing path: no guessing among the names
    assert convert.main([other, str(tmp_path / 'o.pth')]) == 2
    line = one_error(capsys.readouterr().err, 'grl-convert')
    assert line == f'grl-convert: error: {other}: no such file'
    assert server.requests == []


def test_existing_file_wins_over_the_name(server, models, tmp_path, monkeypatch):
    """A local file called like a release is read as it is: no download, no check against the name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'sr_grl_tiny_c3x4.ckpt').write_bytes(models['x2'][1])  # an x2 model under an x4 name
    sd, kwargs, path = zoo.open_checkpoint('sr_grl_tiny_c3x4.ckpt')
    assert path == 'sr_grl_tiny_c3x4.ckpt' and kwargs['upscale'] == 2 and server.requests == []


@pytest.mark.parametrize('name, variant, key, got, want', [
    ('sr_grl_small_c3x4', 'x2', 'upscale', 2, 4),
    ('sr_grl_tiny_c3x2', 'rgb', 'upscale', 1, 2),
    ('dn_grl_tiny_c1s15', 'rgb', 'in_channels', 3, 1),
    ('jpeg_grl_small_c3q20', 'gray', 'in_channels', 1, 3),
    ('db_defocus_dual_pixel_grl_base', 'rgb', 'in_channels', 3, 6),
])
def test_kwargs_mismatch(server, models, cache, tmp_path, capsys, name, variant, key, got, want):
    serve(server, models, **{name: variant})
    with pytest.raises(zoo.ZooError) as info:
        zoo.open_checkpoint(name, quiet=True)
    msg = str(info.value)
    path = cache / f'{name}.ckpt'
    assert '\n' not in msg and msg.startswith(f'{path}: {key}={got} but {name} ') and f'has {key}={want}' in msg
    assert convert.main([name, str(tmp_path / 'o.pth')]) == 2
    line = one_error(capsys.readouterr().err, 'grl-convert')
    assert f'{path}: {key}={got}' in line and not (tmp_path / 'o.pth').exists()


def test_matching_kwargs_pass(server, models):
    serve(server, models, sr_grl_base_c3x4='x4', dn_grl_base_c1s25='gray', dn_grl_small_c3s50='rgb')
    for name in ('sr_grl_base_c3x4', 'dn_grl_base_c1s25', 'dn_grl_small_c3s50'):
        zoo.open_checkpoint(name, quiet=True)
    assert len(server.requests) == 3


def test_check_release_direct():
    release = zoo.RELEASES['db_defocus_dual_pixel_grl_base']
    assert release.expected() == {'in_channels': 6, 'out_channels': 3, 'upscale': 1}
    zoo.check_release(release, {'in_channels': 6, 'out_channels': 3, 'upscale': 1}, 'f.ckpt')
    with pytest.raises(zoo.ZooError, match=r'^f\.ckpt: out_channels=6 but '):
        zoo.check_release(release, {'in_channels': 6, 'upscale': 1}, 'f.ckpt')  # no out_channels: = in_channels
    zoo.check_release(zoo.RELEASES['dn_grl_tiny_c1s25'], {'in_channels': 1, 'out_channels': None}, 'g.ckpt')


# ------------------------------------------------------------------------------------ listing
def _listed(text: str) -> dict:
    rows = [line.split() for line in text.splitlines() if line and not line.startswith(('#', 'NAME '))]
    return {row[0]: row for row in rows}


def test_table_matches_the_option_files():
    """One entry per released checkpoint that options/generate.py wrote a test file for, with that file."""
    names = {}
    for path in sorted((REPO_ROOT / 'options' / 'test').glob('*/*.yml')):
        opt = yaml.safe_load(path.read_text(encoding='utf-8'))
        names[Path(opt['path']['pretrain_network_g']).stem] = (path.relative_to(REPO_ROOT).as_posix(), opt)
    assert len(zoo.RELEASES) == 42 and set(zoo.RELEASES) == set(names)
    for name, release in zoo.RELEASES.items():
        option, opt = names[name]
        assert release.option == option, name
        net = opt['network_g']
        exp = release.expected()
        assert exp['in_channels'] == net['in_channels'] and exp['upscale'] == net['upscale'] == opt['scale'], name
        assert exp['out_channels'] == (net.get('out_channels') or net['in_channels']), name
        kw = release.task_kwargs()  # the size and head (the test geometry may differ from the task's)
        assert kw['embed_dim'] == net['embed_dim'] and list(kw['depths']) == list(net['depths']), name
        assert kw['upsampler'] == net['upsampler'] and kw['local_connection'] == net['local_connection'], name
    for name in ('sr_grl_base_c3x4', 'dn_grl_tiny_c1s50', 'jpeg_grl_small_c3q30', 'dm_grl_small', 'bsr_grl_base',
                 'db_motion_grl_base_realblur_r', 'db_defocus_single_pixel_grl_base'):
        assert name in zoo.RELEASES


def test_grl_zoo_listing(server, models, capsys):
    assert zoo.main([]) == 0
    rows = _listed(capsys.readouterr().out)
    assert list(rows) == list(zoo.RELEASES)
    for name, row in rows.items():
        assert (REPO_ROOT / row[-1]).is_file(), row[-1]
        assert row[-1] == zoo.RELEASES[name].option and row[-2] == 'no'
    assert rows['sr_grl_tiny_c3x3'][-4:-2] == ['3->3', 'x3']
    assert rows['dn_grl_small_c1s25'][-4:-2] == ['1->1', 'x1'] and 'sigma' in rows['dn_grl_small_c1s25']
    assert rows['db_defocus_dual_pixel_grl_base'][-4] == '6->3'
    assert '25' in rows['dn_grl_small_c1s25'] and '30' in rows['jpeg_grl_small_c1q30']
    serve(server, models, dn_grl_small_c1s25='gray')
    zoo.resolve_checkpoint('dn_grl_small_c1s25', quiet=True)
    assert zoo.main(['dn_grl_small']) == 0
    rows = _listed(capsys.readouterr().out)
    assert sorted(rows) == sorted(n for n in zoo.RELEASES if n.startswith('dn_grl_small'))
    assert [n for n, r in rows.items() if r[-2] == 'yes'] == ['dn_grl_small_c1s25']


@pytest.mark.parametrize('patterns, expected', [
    (['dn_*_c1*'], [f'dn_grl_{s}_c1s{n}' for s in ('tiny', 'small', 'base') for n in (15, 25, 50)]),
    (['jpeg'], [f'jpeg_grl_small_c{c}q{q}' for c in (1, 3) for q in (10, 20, 30, 40)]),
    (['db_motion', 'dm'], ['dm_grl_small', 'db_motion_grl_base_gopro', 'db_motion_grl_base_realblur_j',
                           'db_motion_grl_base_realblur_r']),
])
def test_grl_zoo_filters(patterns, expected, capsys):
    assert zoo.main(patterns) == 0
    assert sorted(_listed(capsys.readouterr().out)) == sorted(expected)


def test_grl_zoo_errors(capsys):
    assert zoo.main(['sr_grl_huge']) == 2
    assert 'no released model matches sr_grl_huge' in one_error(capsys.readouterr().err, 'grl-zoo')
    assert zoo.main(['--download', 'dn_grl_tiny_c3s20']) == 2
    assert 'did you mean dn_grl_tiny_c3s' in one_error(capsys.readouterr().err, 'grl-zoo')
    assert zoo.main(['--download']) == 2
    assert 'needs the NAMEs' in one_error(capsys.readouterr().err, 'grl-zoo')


def test_grl_zoo_download(server, models, cache, capsys):
    serve(server, models, sr_grl_tiny_c3x2='x2', dn_grl_tiny_c1s15='gray')
    assert zoo.main(['--download', 'sr_grl_tiny_c3x2', 'dn_grl_tiny_c1s15.ckpt', '--quiet']) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(cache / 'sr_grl_tiny_c3x2.ckpt'), str(cache / 'dn_grl_tiny_c1s15.ckpt')]
    assert (cache / 'dn_grl_tiny_c1s15.ckpt').read_bytes() == models['gray'][1]
    assert zoo.main(['--download', 'sr_grl_tiny_c3x2']) == 0
    assert len(server.requests) == 2  # the second call used the cache


def test_list_models_and_module_entry_point(cache, capsys):
    with pytest.raises(SystemExit) as info:
        infer.main(['--list-models'])  # before --checkpoint/--input/--output are required
    assert info.value.code == 0
    assert list(_listed(capsys.readouterr().out)) == list(zoo.RELEASES)
    res = subprocess.run([sys.executable, '-m', 'grl_plugin.cli.zoo', 'bsr'], capture_output=True, text=True,
                         env=subprocess_env(GRL_HOME=str(cache)), timeout=300)
    assert res.returncode == 0, res.stderr
    assert list(_listed(res.stdout)) == ['bsr_grl_base'] and f'cache folder: {cache}' in res.stdout
    setup = (REPO_ROOT / 'setup.py').read_text(encoding='utf-8')
    assert "'grl-zoo=grl_plugin.cli.zoo:main'" in setup


# ------------------------------------------------------------------------------------ end to end
def _forward(model: GRL, img_rgb01: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(img_rgb01.transpose(2, 0, 1).copy()).float()[None]
    with torch.no_grad():
        y = model(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    return (np.clip(y, 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize('spec, variant', [('dn_grl_tiny_c3s25', 'rgb'), ('sr_grl_small_c3x2.ckpt', 'x2')])
def test_grl_infer_by_name(server, models, cache, tmp_path, capsys, spec, variant):
    name = spec.replace('.ckpt', '')
    serve(server, models, **{name: variant})
    rng = np.random.default_rng(3)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (21, 27, 3), dtype=np.uint8), (5, 5), 0)
    cv2.imwrite(str(tmp_path / 'photo.png'), rgb[..., ::-1])
    rc = infer.main(['--checkpoint', spec, '--input', str(tmp_path / 'photo.png'), '--output', str(tmp_path / 'out'),
                     '--tile', '0'])
    err = capsys.readouterr().err
    assert rc == 0, err
    url = f'{os.environ["GRL_RELEASE_URL"].rstrip("/")}/{name}.ckpt'
    assert f'grl-infer: downloaded {url} -> {cache / (name + ".ckpt")}' in err
    got = cv2.imread(str(tmp_path / 'out' / 'photo_grl.png'))[..., ::-1]
    scale = VARIANTS[variant][0]
    assert got.shape == (21 * scale, 27 * scale, 3)
    np.testing.assert_array_equal(got, _forward(models[variant][0], rgb.astype(np.float32) / 255))
    assert server.requests == [(f'/v1/{name}.ckpt', None)]


def test_grl_export_by_name(server, models, tmp_path, capsys):
    pytest.importorskip('onnx', reason='onnx is not installed')
    pytest.importorskip('onnxruntime', reason='onnxruntime is not available')
    from grl_plugin.cli import export
    serve(server, models, sr_grl_small_c3x2='x2')
    rc = export.main(['--checkpoint', 'sr_grl_small_c3x2', '--tile', '16', '--output', str(tmp_path / 'm.onnx'),
                      '--check'])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert 'input (1, 3, 16, 16) -> output (1, 3, 32, 32)' in cap.out and 'ok' in cap.out
    assert len(server.requests) == 1
