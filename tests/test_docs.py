"""Every code block of README.md and docs/*.md runs, as written, in a test; the docs stay short and
hold no run diary.

Each fenced block is found by (document, section heading, position in the section) and listed in
:data:`COVERAGE` with what executes it:

* ``run`` -- a test of this module runs it: shell blocks with ``bash -e`` in a scratch folder
  (tiny option files, images and checkpoints made here; released names resolved from a scratch
  ``$GRL_HOME``), Python blocks in one subprocess (each block in a fresh namespace, printed
  ``torch.Size`` comments compared), YAML blocks merged into a tiny option file and checked by
  the option validator (networks are built and run once);
* ``mapped`` -- another test runs it; this module checks that the test still reads this block;
* ``ci`` -- ``make demo`` / ``make test``: ``.ci/run`` runs ``make test`` on a fresh clone, and the
  demo's job is covered by ``tests/test_demo.py`` (data, option files) -- running either inside
  the test suite would be recursive or too long;
* ``text`` -- not a command (the citation).

A block that is added, moved or changed without an entry here fails
:func:`test_every_block_is_executed`. Commands run through the console scripts of ``setup.py``
(wrappers calling the same ``main``), ``torchrun`` on CPU (gloo) and a stand-in ``srun`` /
``scontrol`` that starts the tasks on this machine as slurm would.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from helpers import REPO_ROOT, deep_update, free_port, make_lmdb, subprocess_env, train_options, write_test_options

DOCS = ['README.md'] + sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / 'docs').glob('*.md'))
README_MAX_LINES = 250
BENCHMARKS_README_MAX_LINES = 200


# ------------------------------------------------------------------------------------ blocks
@dataclass(frozen=True)
class Block:
    doc: str
    section: str
    index: int  # position among the blocks of its section
    lang: str
    text: str
    line: int

    @property
    def key(self) -> str:
        return f'{self.doc} > {self.section} > {self.index}'


def code_blocks(doc: str) -> List[Block]:
    """The fenced code blocks of ``doc`` (indented fences included)."""
    lines = (REPO_ROOT / doc).read_text(encoding='utf-8').splitlines()
    out, section, counts, i = [], '', {}, 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r'^(\s*)(```+)\s*([\w+-]*)', line)
        if not fence and line.startswith('#'):
            section = line.lstrip('#').strip()
        elif fence:
            indent, ticks, lang = fence.groups()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(ticks):
                j += 1
            body = '\n'.join(ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:j]) + '\n'
            index = counts.get(section, 0)
            counts[section] = index + 1
            out.append(Block(doc, section, index, lang.lower(), body, i + 1))
            i = j
        i += 1
    return out


def all_blocks() -> List[Block]:
    return [b for doc in DOCS for b in code_blocks(doc)]


def block(doc: str, section: str, index: int = 0) -> Block:
    for b in code_blocks(doc):
        if (b.section, b.index) == (section, index):
            return b
    raise AssertionError(f'{doc}: no block {index} under "{section}"')


README = 'README.md'
S_SETUP, S_TRAIN, S_RESTORE = 'Set up', 'Train and test with BasicSR', 'Restore images with a checkpoint'
S_FINETUNE, S_OWN, S_API, S_CITE = ('Fine-tune on your own images', 'GRL blocks in your own network', 'Python API',
                                    'Citation and license')

#: (doc, section, index) -> (kind, what runs it)
COVERAGE: Dict[tuple, tuple] = {
    (README, S_SETUP, 0): ('ci', 'make demo / make test: .ci/run, tests/test_demo.py (test_setup_block)'),
    (README, S_TRAIN, 0): ('run', 'test_train_blocks'),
    (README, S_TRAIN, 1): ('run', 'test_train_blocks'),
    (README, S_RESTORE, 0): ('run', 'test_restore_block'),
    (README, S_FINETUNE, 0): ('mapped', 'tests/test_prepare.py::test_readme_walkthrough'),
    (README, S_OWN, 0): ('run', 'test_python_blocks'),
    (README, S_OWN, 1): ('run', 'test_yaml_blocks'),
    (README, S_API, 0): ('run', 'test_python_blocks'),
    (README, S_CITE, 0): ('text', 'BibTeX entry'),
    ('docs/checkpoints.md', 'Converting: `grl-convert`', 0): ('run', 'test_checkpoint_blocks'),
    ('docs/checkpoints.md', 'In Python: `load_checkpoint`', 0): ('run', 'test_checkpoint_blocks'),
    ('docs/checkpoints.md', 'ONNX: `grl-export`', 0): ('run', 'test_checkpoint_blocks'),
    ('docs/options.md', '`GRLModel`', 0): ('run', 'test_yaml_blocks'),
    ('docs/options.md', 'Datasets', 0): ('run', 'test_yaml_blocks'),
    ('docs/options.md', 'Hybrid networks', 0): ('run', 'test_yaml_blocks'),
    ('docs/robustness.md', 'Bad data', 0): ('run', 'test_yaml_blocks'),
    ('docs/speed.md', 'Settings', 0): ('run', 'test_python_blocks'),
}

SHELL = ('bash', 'sh', 'shell', 'console', '')
LANGS = {'run': SHELL + ('python', 'yaml'), 'mapped': SHELL, 'ci': SHELL, 'text': ('bibtex', )}


def covered(kind: str, runner: str = '') -> List[Block]:
    return [b for b in all_blocks() if COVERAGE.get((b.doc, b.section, b.index), ('', ''))[0] == kind
            and (not runner or COVERAGE[(b.doc, b.section, b.index)][1] == runner)]


def test_every_block_is_executed():
    blocks = all_blocks()
    assert blocks, 'no code blocks found'
    found = {(b.doc, b.section, b.index): b for b in blocks}
    missing = [b.key + f' (line {b.line})' for key, b in found.items() if key not in COVERAGE]
    assert not missing, 'code blocks no test executes; add them to COVERAGE in tests/test_docs.py:\n' + \
        '\n'.join(missing)
    stale = [' > '.join(map(str, key)) for key in COVERAGE if key not in found]
    assert not stale, 'COVERAGE names blocks the docs no longer have:\n' + '\n'.join(stale)
    for key, (kind, runner) in COVERAGE.items():
        b = found[key]
        assert b.lang in LANGS[kind], f'{b.key}: a ```{b.lang} block cannot be "{kind}"'
        if kind == 'run':  # the test exists and reads this block (all of its blocks, or this section's)
            func = globals().get(runner)
            assert callable(func) and runner.startswith('test_'), f'{b.key}: no test {runner} in this module'
            source = inspect.getsource(func)
            names = [repr(b.section)] + [n for n, v in globals().items() if v == b.section and n.isupper()]
            assert f"covered('run', '{runner}')" in source or any(n in source for n in names), \
                f'{b.key}: {runner} does not read this block'


# ------------------------------------------------------------------------- scratch machinery
def console_scripts() -> Dict[str, str]:
    """``{'grl-train': 'grl_plugin.cli.train:main', ...}`` from setup.py."""
    text = (REPO_ROOT / 'setup.py').read_text(encoding='utf-8')
    return dict(re.findall(r"'(grl-[\w-]+)=([\w.]+:\w+)'", text))


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text, encoding='utf-8')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


SRUN = r'''#!/usr/bin/env bash
# stand-in for slurm's srun on one machine: --ntasks=N copies of the command, SLURM_* set as srun does
set -u
n=1
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in --ntasks=*) n=${1#--ntasks=} ;; -n) shift; n=$1 ;; esac
  shift
done
export SLURM_NTASKS=$n SLURM_NODELIST=localhost MASTER_PORT=${MASTER_PORT:-29500}
pids=()
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
'''


def shims(folder: Path) -> Path:
    """A bin folder: the console scripts of setup.py, ``python``, ``torchrun`` (if the environment
    lacks it), ``srun`` and ``scontrol`` stand-ins."""
    bin_dir = folder / 'bin'
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in console_scripts().items():
        module, func = target.split(':')
        _write_exe(bin_dir / name, f'#!/usr/bin/env bash\nexec "{sys.executable}" -c '
                                   f'"import sys; from {module} import {func}; sys.exit({func}())" "$@"\n')
    _write_exe(bin_dir / 'python', f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    if not (Path(sys.executable).parent / 'torchrun').exists():
        _write_exe(bin_dir / 'torchrun', f'#!/usr/bin/env bash\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
    _write_exe(bin_dir / 'srun', SRUN)
    _write_exe(bin_dir / 'scontrol', '#!/usr/bin/env bash\necho 127.0.0.1\n')
    return bin_dir


def scratch_env(bin_dir: Path, **extra) -> Dict[str, str]:
    env = subprocess_env(**extra)
    env['PATH'] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get('PATH', '')])
    return env


def run_shell(b: Block, cwd: Path, env: Dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``bash -e`` on the block's text, in ``cwd``; fails the test with the output tail."""
    res = subprocess.run(['bash', '-e', '-c', b.text], cwd=str(cwd), env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f'{b.key} failed ({res.returncode}):\n{b.text}\n{res.stdout[-3000:]}\n{res.stderr[-4000:]}'
    return res


def fake_venv(cwd: Path, bin_dir: Path) -> None:
    """``.venv/bin/activate`` in ``cwd``: what ``source .venv/bin/activate`` needs after ``make``."""
    venv = cwd / '.venv' / 'bin'
    venv.mkdir(parents=True)
    (venv / 'activate').write_text(f'export PATH="{bin_dir}:{Path(sys.executable).parent}:$PATH"\n')


# ---------------------------------------------------------------------- tiny models and data
TINY = dict(in_channels=3, embed_dim=16, depths=[1], num_heads_window=[1], num_heads_stripe=[1], window_size=4,
            stripe_size=[8, 8], stripe_groups=[None, None], stripe_shift=True, anchor_window_down_factor=2,
            mlp_ratio=2)


def tiny_kwargs(scale: int) -> dict:
    return dict(TINY, upscale=scale, upsampler='pixelshuffle' if scale > 1 else '')


def save_official(path: Path, scale: int) -> Path:
    """A tiny model as an official-style Lightning .ckpt (weights + hyper_parameters)."""
    import torch

    import grl_plugin
    torch.manual_seed(scale)
    model = grl_plugin.GRL(**tiny_kwargs(scale))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'state_dict': {'model.' + k: v for k, v in model.state_dict().items()},
                'hyper_parameters': {'model': tiny_kwargs(scale)}}, path)
    return path


@pytest.fixture(scope='module')
def grl_home(tmp_path_factory):
    """``$GRL_HOME`` holding tiny stand-ins for the released names the docs use."""
    home = tmp_path_factory.mktemp('grl_home')
    for name, scale in (('dn_grl_tiny_c3s25', 1), ('sr_grl_tiny_c3x2', 2), ('sr_grl_tiny_c3x4', 4)):
        save_official(home / f'{name}.ckpt', scale)
    return home


def write_images(folder: Path, size=(40, 48), names=('astronaut', 'coffee')) -> None:
    import cv2
    import skimage.data
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        img = getattr(skimage.data, name)()[100 + 10 * i:100 + 10 * i + size[0], 150:150 + size[1], ::-1]
        cv2.imwrite(str(folder / f'{name}.png'), img)


# ------------------------------------------------------------------------------ the blocks
def test_setup_block():
    """``make demo`` / ``make test``: the Makefile has both, CI runs ``make test``, the demo's job
    is tested by tests/test_demo.py (its data, option files and helpers)."""
    b = block(README, S_SETUP)
    commands = [line.split('#')[0].strip() for line in b.text.splitlines() if line.split('#')[0].strip()]
    assert commands == ['make demo', 'make test']
    makefile = (REPO_ROOT / 'Makefile').read_text(encoding='utf-8')
    assert re.search(r'^demo: venv\n\t\$\(VPY\) -m grl_plugin\.cli\.demo', makefile, re.M)
    assert re.search(r'^test: venv\n\t\$\(VPY\) -m pytest', makefile, re.M)
    assert re.search(r'^\s*make test\b', (REPO_ROOT / '.ci' / 'run').read_text(), re.M)
    demo_test = (REPO_ROOT / 'tests' / 'test_demo.py').read_text(encoding='utf-8')
    assert 'from grl_plugin.cli import demo' in demo_test
    for name in ('train_grl_t_denoise_c25.yml', 'test_grl_t_denoise_c25.yml'):
        assert (REPO_ROOT / 'options' / 'demo' / name).is_file()


def test_train_blocks(tmp_path):
    """``grl-train`` / ``grl-test`` on ``train.yml`` / ``test.yml`` (a tiny GRL on four 32x32 photo
    crops, 2 iterations), then the torchrun and slurm lines (2 processes, gloo) on a fresh folder."""
    bin_dir = shims(tmp_path)
    env = scratch_env(bin_dir)
    for run_dir in ('single', 'multi'):
        cwd = tmp_path / run_dir
        cwd.mkdir()
        data = make_lmdb(cwd / 'data')
        opt = train_options(data, name='docs_run', train={'total_iter': 2},
                            logger={'save_checkpoint_freq': 2}, val={'val_freq': 2})
        (cwd / 'train.yml').write_text(yaml.safe_dump(opt, sort_keys=False))
        write_test_options(cwd, data, 'experiments/docs_run/models/net_g_latest.pth', name='docs_test')

    run_shell(block(README, S_TRAIN, 0), tmp_path / 'single', env)
    assert (tmp_path / 'single' / 'experiments' / 'docs_run' / 'models' / 'net_g_latest.pth').is_file()
    assert list((tmp_path / 'single' / 'results' / 'docs_test' / 'visualization').rglob('*.png'))

    multi = block(README, S_TRAIN, 1)
    assert [line.split()[0] for line in multi.text.splitlines() if line.strip()] == ['torchrun', 'srun']
    run_shell(multi, tmp_path / 'multi', scratch_env(bin_dir, MASTER_PORT=free_port()), timeout=400)
    logs = sorted((tmp_path / 'multi' / 'experiments' / 'docs_run').glob('*.log'))
    text = '\n'.join(p.read_text() for p in logs)
    assert text.count('world_size: 2') == 2, text[-2000:]  # both lines ran 2 processes
    assert 'Resuming training from epoch' in text, text[-2000:]  # the slurm line continued the torchrun run
    assert (tmp_path / 'multi' / 'experiments' / 'docs_run' / 'models' / 'net_g_latest.pth').is_file()


def test_restore_block(tmp_path, grl_home):
    """The README's restore commands on photo crops, released names from a scratch ``$GRL_HOME``."""
    bin_dir = shims(tmp_path / 'tools')
    fake_venv(tmp_path, bin_dir)
    write_images(tmp_path / 'noisy')
    write_images(tmp_path / 'hr', size=(48, 64))
    import cv2
    (tmp_path / 'lr').mkdir()
    for p in (tmp_path / 'hr').iterdir():
        img = cv2.imread(str(p))
        cv2.imwrite(str(tmp_path / 'lr' / p.name), cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2),
                                                               interpolation=cv2.INTER_AREA))
    res = run_shell(block(README, S_RESTORE), tmp_path, scratch_env(bin_dir, GRL_HOME=grl_home))
    assert 'dn_grl_tiny_c3s25' in res.stdout
    assert sorted(p.name for p in (tmp_path / 'restored').glob('*.png')) == ['astronaut_grl.png', 'coffee_grl.png']
    assert cv2.imread(str(tmp_path / 'restored_x2' / 'coffee_grl.png')).shape == (48, 64, 3)
    rows = (tmp_path / 'restored_x2' / 'metrics.csv').read_text().splitlines()
    assert rows[0].startswith('name,psnr') and len(rows) == 3
    assert list((tmp_path / 'restored_x2' / 'compare').glob('*.png'))


def test_finetune_block_is_the_one_test_prepare_runs():
    """tests/test_prepare.py::test_readme_walkthrough runs this block's commands (tiny overrides)."""
    import test_prepare
    b = block(README, S_FINETUNE)
    commands = [shlex.split(line, comments=True) for line in b.text.replace('\\\n', ' ').splitlines()
                if line.strip()]
    assert test_prepare.readme_commands() == commands
    assert callable(getattr(test_prepare, 'test_readme_walkthrough', None))


def test_checkpoint_blocks(tmp_path, grl_home):
    """docs/checkpoints.md: grl-convert (a released name and grl-train's weights), the Python
    load_checkpoint lines on the converted file, grl-export with --check."""
    import torch

    import grl_plugin
    bin_dir = shims(tmp_path / 'tools')
    env = scratch_env(bin_dir, GRL_HOME=grl_home)
    model = grl_plugin.GRL(**tiny_kwargs(1))
    net = tmp_path / 'experiments' / 'my_dn' / 'models' / 'net_g_latest.pth'
    net.parent.mkdir(parents=True)
    torch.save({'params': model.state_dict(), 'grl_kwargs': tiny_kwargs(1)}, net)

    run_shell(block('docs/checkpoints.md', 'Converting: `grl-convert`'), tmp_path, env)
    assert (tmp_path / 'grl_tiny_x4.pth').is_file() and (tmp_path / 'grl_tiny_x4.yml').is_file()
    assert (tmp_path / 'my_dn.safetensors').is_file()
    out = run_python([block('docs/checkpoints.md', 'In Python: `load_checkpoint`')], tmp_path)
    assert 'not stored in the file' in out and "['window_size'" in out
    pytest.importorskip('onnxruntime')
    res = run_shell(block('docs/checkpoints.md', 'ONNX: `grl-export`'), tmp_path, env)
    assert (tmp_path / 'grl_tiny_x2.onnx').is_file() and 'max |delta|' in res.stdout


# ------------------------------------------------------------------------------ Python blocks
RUNNER = r'''
import json, sys, traceback
for key, code in json.load(open(sys.argv[1])):
    print(f"=== {key}", flush=True)
    exec(compile(code, key, "exec"), {"__name__": "__main__"})
print("=== done")
'''


def run_python(blocks: List[Block], cwd: Path) -> str:
    """Run the blocks one after another in one fresh interpreter (each in its own namespace);
    printed ``torch.Size(...)`` comments must match what the line prints."""
    cwd.mkdir(parents=True, exist_ok=True)
    spec = cwd / '_blocks.json'
    spec.write_text(json.dumps([[b.key, b.text] for b in blocks]))
    res = subprocess.run([sys.executable, '-c', RUNNER, str(spec)], cwd=str(cwd), capture_output=True, text=True,
                         timeout=300, env=subprocess_env())
    assert res.returncode == 0 and '=== done' in res.stdout, f'{res.stdout[-3000:]}\n{res.stderr[-4000:]}'
    for b in blocks:
        for expected in re.findall(r'^print\(.*#\s*(torch\.Size\(\[[\d, ]+\]\))\s*$', b.text, re.M):
            assert expected in res.stdout, f'{b.key}: expected {expected} in the output:\n{res.stdout[-2000:]}'
    return res.stdout


def test_python_blocks(tmp_path):
    """Every ```python block mapped to this test, as written."""
    blocks = covered('run', 'test_python_blocks')
    assert blocks and all(b.lang == 'python' for b in blocks)
    run_python(blocks, tmp_path)


# ------------------------------------------------------------------------------- YAML blocks
def test_yaml_blocks(tmp_path):
    """Option snippets merged into a tiny, valid option file pass the option checks; ``network_g``
    snippets also build and run on a 32x32 input."""
    import torch

    import grl_plugin  # noqa: F401
    from basicsr.archs import build_network
    from grl_plugin.cli.validate import check_network, validate_options

    blocks = covered('run', 'test_yaml_blocks')
    assert blocks and all(b.lang == 'yaml' for b in blocks)
    data = make_lmdb(tmp_path, scale=1)
    for b in blocks:
        snippet = yaml.safe_load(b.text)
        assert isinstance(snippet, dict), b.key
        opt = train_options(data)
        for key, value in snippet.items():
            if key == 'datasets':
                opt['datasets'].update(value)  # a dataset is replaced, not merged
            elif key == 'network_g':
                opt['network_g'] = value
            else:
                deep_update(opt, {key: value})
        if 'network_g' in snippet:
            assert check_network(snippet['network_g']) == [], b.key
            net = build_network(dict(snippet['network_g'])).eval()
            with torch.no_grad():
                net(torch.rand(1, 3, 32, 32))
        else:
            problems = validate_options(opt, 'train', paths=False)
            assert problems == [], f'{b.key}: ' + '; '.join(f'{p.key}: {p.message}' for p in problems)


# ------------------------------------------------------------------------------ size, links
def test_readme_is_short():
    lines = (REPO_ROOT / 'README.md').read_text(encoding='utf-8').splitlines()
    assert len(lines) <= README_MAX_LINES, f'README.md has {len(lines)} lines (at most {README_MAX_LINES})'
    bench = (REPO_ROOT / 'benchmarks' / 'README.md').read_text(encoding='utf-8').splitlines()
    assert len(bench) <= BENCHMARKS_README_MAX_LINES, f'benchmarks/README.md has {len(bench)} lines'


def test_readme_names_paper_code_citation():
    text = (REPO_ROOT / 'README.md').read_text(encoding='utf-8')
    for needle in ('arxiv.org/abs/2303.00748', 'github.com/ofsoundof/GRL-Image-Restoration', '@inproceedings',
                   '## Released models', 'MIT license', 'torch 2.13.0+cpu'):
        assert needle in text, needle


def test_released_models_table_matches_the_registry():
    """Every released name is in the README's table (brace groups expanded), with its option file."""
    from grl_plugin.cli.zoo import RELEASES
    text = (REPO_ROOT / 'README.md').read_text(encoding='utf-8')
    section = text.split('## Released models', 1)[1].split('\n## ', 1)[0]
    names, options = set(), set()

    def expand(s):
        m = re.search(r'\{([^}]*)\}', s)
        return [s] if not m else [x for v in m.group(1).split(',') for x in expand(s[:m.start()] + v + s[m.end():])]

    for row in re.findall(r'^\| `([^`]+)` \|.*\| `([^`]+)` \|$', section, re.M):
        # brace groups of a row run in step (sr_..._x{2,3,4} <-> test_..._SRx{2,3,4}.yml)
        names.update(expand(row[0]))
        options.update('options/test/' + o for o in expand(row[1]))
    assert names == set(RELEASES)
    assert options == {r.option for r in RELEASES.values()}
    for option in options:
        assert (REPO_ROOT / option).is_file(), option


@pytest.mark.parametrize('doc', DOCS + ['benchmarks/README.md', 'options/README.md'])
def test_relative_links_resolve(doc):
    path = REPO_ROOT / doc
    text = path.read_text(encoding='utf-8')
    for target in re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', text):
        if re.match(r'[a-z]+:', target):
            continue
        assert (path.parent / target).exists(), f'{doc}: link to {target} does not resolve'


@pytest.mark.parametrize('doc', DOCS + ['benchmarks/README.md'])
def test_docs_point_only_to_what_users_have(doc):
    text = (REPO_ROOT / doc).read_text(encoding='utf-8')
    assert not re.search(r'\bSPEC\b|BASELINE\.md', text), f'{doc} refers to documents that are not in the tree'
    assert not re.search(r'(?<![\w.~])/(work|root|home|tmp)/', text), f'{doc}: absolute machine path'


def test_speed_tables_are_the_results_file():
    """The README's and benchmarks/README.md's CPU tables hold the figures of
    benchmarks/results/cpu_attention.json (the run they name), nothing typed by hand."""
    data = json.loads((REPO_ROOT / 'benchmarks' / 'results' / 'cpu_attention.json').read_text())
    assert {'date', 'device', 'torch', 'threads', 'command'} <= set(data['meta'])
    want = [[f"{r[m][i]:.3f}" for m in ('fwd', 'train') for i in ('reference', 'fast')] for r in data['rows']]
    for doc, first_col in (('README.md', 'GRL-'), ('benchmarks/README.md', ('tiny@sr', 'small@sr', 'base'))):
        text = (REPO_ROOT / doc).read_text(encoding='utf-8')
        rows = [[c.strip() for c in line.strip('|').split('|')] for line in text.splitlines()
                if line.startswith('| ') and line[2:].startswith(first_col) and ' | ' in line]
        got = [[c for c in cells[1:] if re.fullmatch(r'\d+\.\d{3}', c)] for cells in rows][:len(want)]
        assert got == want, (doc, got, want)
        assert data['meta']['date'] in text and data['meta']['torch'] in text


# ------------------------------------------------------------------------------ no run diary
#: Words that mark a run diary (numbered runs, anecdotes about the machine and when things were tried).
DIARY = [r'\bse[s]sions?\b', r'\bruns? #?\d+\b', r'\bround \d+ of\b', r'\bstop \d+\b', r'\battempt #?\d+\b',
         r'\bthis (?:VM|box)\b', r'\bVMs?\b', r'\bour (?:machine|VM)\b', r'\bshared VMs?\b', r'\bthe VM\b',
         r'\byesterday\b', r'\blast (?:night|week)\b', r'\bthis morning\b', r'\bearlier today\b',
         r'\bwe (?:tried|saw|noticed)\b', r'\bI (?:tried|saw|noticed|ran)\b', r'\bday \d+\b']


def _tracked_text_files():
    res = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO_ROOT, capture_output=True)
    if res.returncode != 0:
        pytest.skip('not a git checkout')
    for rel in res.stdout.decode().split('\0'):
        if not rel or rel.startswith('tests/data/') or rel == 'tests/test_docs.py':
            continue
        path = REPO_ROOT / rel
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        if b'\0' in raw[:8192]:
            continue
        yield rel, raw.decode('utf-8', errors='replace')


def test_no_run_diary_in_the_tree():
    found = []
    pattern = re.compile('|'.join(DIARY), re.I)
    for rel, text in _tracked_text_files():
        for n, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                found.append(f'{rel}:{n}: {line.strip()[:160]}')
    assert not found, 'run-diary wording (results belong in tables, history in git):\n' + '\n'.join(found)


@pytest.mark.parametrize('line, diary', [
    ('Run 3: eval 0.42 s, then the VM stalled', True),
    ('measured yesterday on our machine', True),
    ('round 2 of 5 was slower', True),
    ('2026-12-07, CPU: 2-core AMD EPYC (AVX2) virtual machine, torch 2.13.0+cpu', False),
    ('grl-train resumes the run from the newest state', False),
    ('medians of 3 interleaved rounds', False),
])
def test_diary_words_are_recognised(line, diary):
    assert bool(re.search('|'.join(DIARY), line, re.I)) is diary
