"""grl-train / grl-test end to end on a tiny GRL and a tiny real-image LMDB (CPU).

One training run (module fixture: 4 iterations, validation every 2, checkpoints every 2) is
shared by the train, resume and test checks. Every CLI runs in a subprocess whose current
directory is a scratch folder different from ``--root``, so anything written relative to the
CWD (instead of under ``--root``) is caught.
"""
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import (VENV_BIN, make_lmdb, read_logs, state_hash, subprocess_env, write_options,
                     write_test_options)

NAME = 'grl_tiny_cli'


def _script_or_module(script, module):
    """``[path/to/grl-train]`` if the console script is installed next to this python, else ``-m``."""
    path = VENV_BIN / script
    return [str(path)] if path.exists() else [sys.executable, '-m', module]


def _run(cmd, cwd, timeout=300, extra_pythonpath=(), **env):
    return subprocess.run([str(c) for c in cmd], cwd=str(cwd), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(extra_pythonpath, **env))


def _fail_msg(res):
    return f'rc={res.returncode}\n--- stdout ---\n{res.stdout[-4000:]}\n--- stderr ---\n{res.stderr[-4000:]}'


def _psnr_values(log_text):
    return [float(v) for v in re.findall(r'# psnr: ([0-9.]+)', log_text)]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_lmdb(tmp_path_factory.mktemp('data'), n_images=4, size=32, scale=2)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data):
    """``grl-train`` for 4 iterations; train and val read the same LMDB."""
    base = tmp_path_factory.mktemp('train')
    cwd, root = base / 'cwd', base / 'root'
    cwd.mkdir()
    opt = write_options(base, data, name=NAME)
    res = _run(_script_or_module('grl-train', 'grl_plugin.train') + ['-opt', opt, '--root', root], cwd)
    return dict(res=res, cwd=cwd, root=root, opt=opt, exp=root / 'experiments' / NAME)


def test_train_cli_trains_validates_and_checkpoints(trained):
    res, exp = trained['res'], trained['exp']
    assert res.returncode == 0, _fail_msg(res)
    log = read_logs(exp)
    assert 'Model [SRModel] is created.' in log or 'Model [GRLModel] is created.' in log
    assert 'Start training from epoch: 0, iter: 0' in log
    assert log.count('Validation tiny_val') == 3  # iters 2 and 4, and after training
    assert len(_psnr_values(log)) == 3 and log.count('# ssim:') == 3
    for name in ('net_g_2.pth', 'net_g_4.pth', 'net_g_latest.pth'):
        assert (exp / 'models' / name).is_file(), name
    assert (exp / 'training_states' / '4.state').is_file()
    assert (exp / 'train.yml').is_file()  # copy of the option file
    # nothing relative to the CWD, nothing in the installed packages
    assert list(trained['cwd'].iterdir()) == []
    import basicsr
    site = Path(basicsr.__file__).resolve().parents[1]
    assert not (site / 'experiments').exists() and not (site / 'tb_logger').exists()
    # the saved weights load into the network the options describe
    from basicsr.archs import build_network
    import yaml
    net = build_network(yaml.safe_load(trained['opt'].read_text())['network_g'])
    net.load_state_dict(torch.load(exp / 'models' / 'net_g_4.pth')['params'], strict=True)


def test_auto_resume_from_another_directory(trained, tmp_path):
    assert trained['res'].returncode == 0, _fail_msg(trained['res'])
    root = tmp_path / 'root'
    shutil.copytree(trained['root'], root)  # keep the shared run untouched
    exp = root / 'experiments' / NAME
    before = set(exp.glob('*.log'))
    cwd = tmp_path / 'elsewhere'
    cwd.mkdir()
    res = _run(_script_or_module('grl-train', 'grl_plugin.train')
               + ['-opt', trained['opt'], '--root', root, '--auto_resume', '--force_yml', 'train:total_iter=6'], cwd)
    assert res.returncode == 0, _fail_msg(res)
    new_logs = set(exp.glob('*.log')) - before
    assert len(new_logs) == 1, new_logs
    log = new_logs.pop().read_text()
    assert 'Resuming training from epoch: 1, iter: 4.' in log
    assert 'Start training from epoch: 1, iter: 4' in log
    iters = [int(v) for v in re.findall(r'iter:\s+(\d+), lr', log)]
    assert iters == [5, 6], iters
    assert (exp / 'models' / 'net_g_6.pth').is_file() and (exp / 'training_states' / '6.state').is_file()
    assert not [p for p in (root / 'experiments').iterdir() if '_archived_' in p.name]
    assert list(cwd.iterdir()) == []


def test_test_cli_evaluates_checkpoint(trained, data, tmp_path):
    assert trained['res'].returncode == 0, _fail_msg(trained['res'])
    ckpt = trained['exp'] / 'models' / 'net_g_4.pth'
    opt = write_test_options(tmp_path, data, ckpt, name='grl_tiny_eval')
    root, cwd = tmp_path / 'root', tmp_path / 'cwd'
    cwd.mkdir()
    res = _run(_script_or_module('grl-test', 'grl_plugin.test') + ['-opt', opt, '--root', root], cwd)
    assert res.returncode == 0, _fail_msg(res)
    results = root / 'results' / 'grl_tiny_eval'
    log = read_logs(results)
    assert 'Testing tiny_test...' in log and 'Validation tiny_test' in log and '# ssim:' in log
    assert len(list((results / 'visualization' / 'tiny_test').glob('*.png'))) == len(data['keys'])
    assert list(cwd.iterdir()) == []
    # same weights, same images: the PSNR of the training run's validation at iter 4
    train_psnr = _psnr_values(read_logs(trained['exp']))[1]
    assert _psnr_values(log) == [pytest.approx(train_psnr, abs=1e-4)]


# --- command-line errors -----------------------------------------------------------------

def _assert_one_line_error(rc, err, prog, *fragments):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f'{prog}: error: '), err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_missing_option_file_subprocess(tmp_path):
    res = _run([sys.executable, '-m', 'grl_plugin.train', '-opt', tmp_path / 'nope.yml'], tmp_path)
    _assert_one_line_error(res.returncode, res.stderr, 'grl-train', 'option file not found', 'nope.yml')
    assert 'Traceback' not in res.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('prog', ['train', 'test'])
def test_option_file_errors_in_process(prog, tmp_path, capsys, monkeypatch):
    from grl_plugin.cli import test as cli_test
    from grl_plugin.cli import train as cli_train
    main = cli_train.main if prog == 'train' else cli_test.main
    name = f'grl-{prog}'
    monkeypatch.chdir(tmp_path)

    def check(argv, *fragments):
        rc = main(argv)
        _assert_one_line_error(rc, capsys.readouterr().err, name, *fragments)

    check(['-opt', 'missing.yml'], 'option file not found: missing.yml')
    check([], 'required', '-opt')
    check(['-opt'], '-opt', 'expected one argument')
    check(['-opt', str(tmp_path)], 'is a directory')
    bad = tmp_path / 'bad.yml'
    bad.write_text('name: [unclosed\n')
    check(['-opt', str(bad)], 'not valid YAML')
    scalar = tmp_path / 'scalar.yml'
    scalar.write_text('just a string\n')
    check(['-opt', str(scalar)], 'mapping')
    partial = tmp_path / 'partial.yml'
    partial.write_text('name: x\nnum_gpu: 0\n')
    rc = main(['-opt', str(partial)])  # one line per missing key (grl_plugin.cli.validate)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and all(line.startswith(f'{name}: error: {partial}: ') for line in lines), lines
    assert any(line.endswith("path=<missing>: missing: BasicSR's " + prog + ' pipeline reads it') for line in lines)
    assert any('datasets=<missing>: missing' in line for line in lines)
    check(['-opt', str(partial), '--root'], '--root', 'expected one argument')
    check(['-opt', 'missing.yml', '--bogus'], 'unrecognized arguments: --bogus')
    check(['-opt', 'missing.yml', '--launcher', 'mpi'], '--launcher', 'invalid choice')
    check(['-opt', 'missing.yml', '--force_yml', 'train:total_iter'], '--force_yml', 'KEY=VALUE')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.yml', 'partial.yml', 'scalar.yml']


def test_launcher_pytorch_outside_torchrun(trained, capsys, monkeypatch):
    from grl_plugin.cli.train import main
    for var in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(var, raising=False)
    rc = main(['-opt', str(trained['opt']), '--launcher', 'pytorch', '--root', str(trained['cwd'])])
    _assert_one_line_error(rc, capsys.readouterr().err, 'grl-train', 'torchrun')
    assert list(trained['cwd'].iterdir()) == []


def test_split_args():
    from grl_plugin.cli.train import split_args
    root, imports, rest, want_help = split_args(
        ['-opt', 'a.yml', '--root=R', '--import', 'm1', '--import=m2', '--local-rank=3', '--auto_resume',
         '--local-rank', '1', '--force_yml', 'train:total_iter=6'])
    assert (root, imports, want_help) == ('R', ['m1', 'm2'], False)
    assert rest == ['-opt', 'a.yml', '--local_rank=3', '--auto_resume', '--local_rank=1', '--force_yml',
                    'train:total_iter=6']
    assert split_args(['-h'])[3] is True


def test_help(capsys):
    res = _run(_script_or_module('grl-train', 'grl_plugin.train') + ['--help'], Path.cwd(), timeout=120)
    assert res.returncode == 0, _fail_msg(res)
    assert 'usage: grl-train -opt OPTION_FILE' in res.stdout and '--root DIR' in res.stdout
    from grl_plugin.cli.test import main
    assert main(['-h']) == 0
    assert 'usage: grl-test -opt OPTION_FILE' in capsys.readouterr().out


def test_console_scripts_declared(repo_root):
    text = (repo_root / 'setup.py').read_text()
    assert "'grl-train=grl_plugin.cli.train:main'" in text and "'grl-test=grl_plugin.cli.test:main'" in text


# --- 2 processes with torchrun (gloo on CPU) ---------------------------------------------

HASHING_MODEL = textwrap.dedent('''
    """Registers HashingSRModel: the plugin's SR model that also writes, on every rank, the
    SHA-256 of its network weights after construction and at every save."""
    import os.path as osp

    import torch.distributed as dist
    from basicsr.utils.registry import MODEL_REGISTRY

    from grl_plugin.patching import register
    from helpers import state_hash

    if 'GRLModel' in MODEL_REGISTRY:
        Base = MODEL_REGISTRY.get('GRLModel')
    else:
        from basicsr.models.sr_model import SRModel as Base


    class HashingSRModel(Base):
        def __init__(self, opt):
            super().__init__(opt)
            self._write_hash('init')

        def _write_hash(self, tag):
            rank = dist.get_rank() if dist.is_initialized() else 0
            digest = state_hash(self.get_bare_model(self.net_g).state_dict())
            path = osp.join(self.opt['path']['experiments_root'], f'hash_rank{rank}_{tag}.txt')
            with open(path, 'w') as f:
                f.write(digest)

        def save(self, epoch, current_iter):
            super().save(epoch, current_iter)
            self._write_hash('latest' if current_iter == -1 else str(current_iter))


    register(MODEL_REGISTRY, HashingSRModel)
''')


def _gloo_torchrun_available():
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        return 'torch.distributed with gloo is not available'
    try:
        import torch.distributed.run  # noqa: F401
    except ImportError as err:
        return f'torch.distributed.run (torchrun) cannot be imported: {err}'
    return None


@pytest.mark.skipif(_gloo_torchrun_available() is not None, reason=str(_gloo_torchrun_available()))
def test_torchrun_two_processes_keep_identical_weights(data, tmp_path):
    """torchrun -m grl_plugin.train --launcher pytorch with 2 CPU processes (gloo).

    The ranks' weights are compared through ``--import``: a small module (written here)
    registers ``HashingSRModel``, which every rank uses (``model_type``) and which writes its
    weights' hash per rank after construction and at each save. basicsr saves checkpoints on
    rank 0 only, so the hashes of both ranks are compared with each other and with the saved
    ``net_g_latest.pth``.
    """
    plugins = tmp_path / 'plugins'
    plugins.mkdir()
    (plugins / 'grl_test_hashing.py').write_text(HASHING_MODEL)
    root, cwd = tmp_path / 'root', tmp_path / 'cwd'
    cwd.mkdir()
    name = 'grl_tiny_ddp'
    opt = write_options(tmp_path, data, name=name, model_type='HashingSRModel')
    tests_dir = Path(__file__).resolve().parent
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           '-m', 'grl_plugin.train', '-opt', opt, '--launcher', 'pytorch', '--root', root,
           '--import', 'grl_test_hashing']
    res = _run(cmd, cwd, timeout=400, extra_pythonpath=[plugins, tests_dir])
    assert res.returncode == 0, _fail_msg(res)
    exp = root / 'experiments' / name
    log = read_logs(exp)
    assert 'World size (gpu number): 2' in log and 'Model [HashingSRModel] is created.' in log
    assert 'End of training.' in log
    assert log.count('Validation tiny_val') == 3 and len(_psnr_values(log)) == 3
    hashes = {}
    for tag in ('init', '2', '4', 'latest'):
        h0 = (exp / f'hash_rank0_{tag}.txt').read_text()
        h1 = (exp / f'hash_rank1_{tag}.txt').read_text()
        assert h0 == h1, f'ranks differ at {tag}'
        hashes[tag] = h0
    assert hashes['init'] != hashes['2'] != hashes['4']  # it trained
    assert hashes['4'] == hashes['latest']
    saved = torch.load(exp / 'models' / 'net_g_latest.pth')['params']
    assert state_hash(saved) == hashes['latest']
    assert list(cwd.iterdir()) == []


# --- -opt / --opt ----------------------------------------------------------------------------

@pytest.mark.parametrize('prog', ['train', 'test'])
@pytest.mark.parametrize('spelling', [['-opt', '{}'], ['--opt', '{}'], ['--opt={}'], ['-opt={}']])
def test_opt_spellings(prog, spelling, tmp_path, capsys):
    """BasicSR's -opt and --opt both name the option file (the error names the file read)."""
    from grl_plugin.cli.train import run
    path = tmp_path / 'partial.yml'
    path.write_text('name: x\n', encoding='utf-8')
    rc = run(prog, [a.format(path) for a in spelling] + ['--root', str(tmp_path / 'root')])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and lines and all(line.startswith(f'grl-{prog}: error: {path}: ') for line in lines), lines
    assert not (tmp_path / 'root').exists()


def test_opt_alias_in_split_args():
    from grl_plugin.cli.train import UsageError, split_args
    assert split_args(['--opt', 'a.yml', '--debug'])[2] == ['-opt', 'a.yml', '--debug']
    assert split_args(['--opt=b.yml'])[2] == ['-opt', 'b.yml']
    assert split_args(['-opt', 'c.yml'])[2] == ['-opt', 'c.yml']
    with pytest.raises(UsageError, match='--opt: expected one argument'):
        split_args(['--opt'])


@pytest.mark.parametrize('module', ['infer', 'export'])
@pytest.mark.parametrize('flag', ['-opt', '--opt'])
def test_infer_and_export_take_both_opt_spellings(module, flag):
    import importlib
    parser = importlib.import_module(f'grl_plugin.cli.{module}').build_parser()
    extra = ['--input', 'in', '--output', 'out'] if module == 'infer' else ['--output', 'm.onnx']
    args = parser.parse_args(['--checkpoint', 'w.pth', flag, 'o.yml'] + extra)
    assert args.opt == 'o.yml' and args.checkpoint == 'w.pth'


# --- Ctrl-C ------------------------------------------------------------------------------------

_INTERRUPTER = """
import os
import signal

from grl_plugin.models.grl_model import GRLModel

_step = GRLModel.optimize_parameters


def optimize_parameters(self, current_iter):
    _step(self, current_iter)
    if current_iter == 3:  # after the checkpoint of iteration 2
        os.kill(os.getpid(), signal.SIGINT)


GRLModel.optimize_parameters = optimize_parameters
"""


def test_ctrl_c_during_training_subprocess(data, tmp_path):
    """A real SIGINT in the middle of training: one line, exit status 130, no traceback; the
    checkpoint written before it loads."""
    (tmp_path / 'interrupter.py').write_text(_INTERRUPTER, encoding='utf-8')
    opt = write_options(tmp_path, data, name='interrupted', train={'total_iter': 8})
    root = tmp_path / 'root'
    res = _run(_script_or_module('grl-train', 'grl_plugin.train')
               + ['-opt', opt, '--root', root, '--import', 'interrupter'], tmp_path, extra_pythonpath=[tmp_path])
    assert res.returncode == 130, _fail_msg(res)
    assert res.stderr.strip().splitlines()[-1] == 'grl-train: interrupted', _fail_msg(res)
    assert 'Traceback' not in res.stderr and 'KeyboardInterrupt' not in res.stderr
    models = root / 'experiments' / 'interrupted' / 'models'
    assert (models / 'net_g_2.pth').is_file() and not (models / 'net_g_4.pth').exists()
    assert 'params' in torch.load(models / 'net_g_2.pth', map_location='cpu', weights_only=True)


@pytest.mark.parametrize('prog, where', [('train', 'basicsr.train.train_pipeline'),
                                         ('test', 'basicsr.test.test_pipeline'),
                                         ('train', 'grl_plugin.cli.validate.validate_file'),
                                         ('test', 'grl_plugin.cli.train.dry_run_check')])
def test_ctrl_c_in_process(prog, where, data, tmp_path, capsys, monkeypatch):
    import importlib

    from grl_plugin.cli.train import run

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    module, _, attr = where.rpartition('.')
    monkeypatch.setattr(importlib.import_module(module), attr, interrupt)
    weights = tmp_path / 'net_g.pth'
    weights.write_bytes(b'')
    opt = write_options(tmp_path, data) if prog == 'train' else write_test_options(tmp_path, data, str(weights))
    extra = ['--dry-run'] if attr == 'dry_run_check' else []
    capsys.readouterr()
    rc = run(prog, ['-opt', str(opt), '--root', str(tmp_path / 'root')] + extra)
    cap = capsys.readouterr()
    assert rc == 130
    assert cap.err.strip().splitlines() == [f'grl-{prog}: interrupted'], cap.err
