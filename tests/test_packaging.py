"""Repository plumbing: .gitignore, CI entry point, Makefile, README, setup.py."""
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def read(rel):
    return (REPO_ROOT / rel).read_text(encoding='utf-8')


@pytest.mark.parametrize('pattern', [
    '.venv/', '__pycache__/', '*.egg-info/', 'experiments/', '/results/', 'tb_logger/', 'datasets/',
    '*.pth', '*.ckpt', '*.safetensors', '.pytest_cache/', 'build/', 'dist/', '.whl/', '.gl/'])
def test_gitignore_covers(pattern):
    lines = {line.strip() for line in read('.gitignore').splitlines()}
    assert pattern in lines


def test_ci_run_calls_make_test():
    path = REPO_ROOT / '.ci' / 'run'
    text = path.read_text()
    assert text.startswith('#!') and 'bash' in text.splitlines()[0]
    assert 'set -euo pipefail' in text
    assert re.search(r'^\s*make test\b', text, re.M)
    assert os.access(path, os.X_OK), '.ci/run must be executable'


def test_makefile_uses_constraints():
    text = read('Makefile')
    assert re.search(r'^export PIP_CONSTRAINT\s*:?=.*constraints\.txt', text, re.M)
    for target in ('venv', 'test', 'demo', 'clean'):
        assert re.search(rf'^{target}:', text, re.M), target
    constraints = read('constraints.txt')
    pinned = re.search(r'^torch==(\S+)', constraints, re.M).group(1)
    for pin in re.findall(r'torch==(\S+)', text):
        assert pin == pinned, 'Makefile and constraints.txt disagree on the torch version'


def test_readme_quick_start():
    text = read('README.md')
    assert 'make demo' in text and 'make test' in text
    assert not re.search(r'(?<![\w.])/(work|root|home|tmp)/', text), 'no absolute machine paths in README'


def test_setup_version_matches_package():
    init = read('grl_plugin/__init__.py')
    version = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", init, re.M).group(1)
    res = subprocess.run([sys.executable, 'setup.py', '--version'], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == version


def test_console_scripts_installed():
    try:
        dist = metadata.distribution('grl_plugin')
    except metadata.PackageNotFoundError:
        pytest.skip('grl_plugin is not installed (run `make venv`)')
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == 'console_scripts'}
    assert scripts.get('grl-convert') == 'grl_plugin.cli.convert:main'
    assert scripts.get('grl-demo') == 'grl_plugin.cli.demo:main'


def test_benchmark_results_are_tracked_not_ignored():
    """BasicSR's results/ folder (at the root) is ignored; benchmarks/results/ holds the JSON of
    the measured tables and is part of the tree."""
    import subprocess
    res = subprocess.run(['git', 'check-ignore', '-q', 'benchmarks/results/cpu_tricks.json'], cwd=REPO_ROOT)
    if res.returncode == 128:  # not a git checkout
        pytest.skip('not a git checkout')
    assert res.returncode == 1  # not ignored
    assert subprocess.run(['git', 'check-ignore', '-q', 'results/x.png'], cwd=REPO_ROOT).returncode == 0
