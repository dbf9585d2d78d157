"""The repository stands alone: no file of the project reads anything beside the repository root.

A user's clone has nothing beside it, so every path a file names must stay inside the checkout:
relative paths that climb out (``../<x>`` resolved from where the file is used), ``__file__``
parents beyond the root, the parent of the root folder. The official reference facts the tests check
against live in ``tests/data``.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from helpers import OFFICIAL_DATA, REPO_ROOT, official

TEXT_SUFFIXES = {'.py', '.md', '.yml', '.yaml', '.txt', '.cfg', '.toml', '.json', '.sh', ''}
CLIMB = re.compile(r'(?<![\w.])((?:\.\./)+)([\w.-]+)')
PARENTS = re.compile(r'__file__\)?(?:\.resolve\(\))?\.parents\[(\d+)\]')
ROOT_PARENT = re.compile(r'\b(?:REPO_ROOT|ROOT|REPO)\.parent\b')


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO_ROOT, capture_output=True, check=True)
        names = [n for n in out.stdout.decode().split('\0') if n]
    except (OSError, subprocess.CalledProcessError):  # an exported tree without git
        skip = {'.git', '.venv', 'experiments', 'results', 'tb_logger', 'datasets', '__pycache__'}
        names = [p.relative_to(REPO_ROOT).as_posix() for p in REPO_ROOT.rglob('*')
                 if p.is_file() and not skip & set(p.relative_to(REPO_ROOT).parts)]
    return [Path(n) for n in names if Path(n).suffix in TEXT_SUFFIXES]


def outside(rel_file: Path, text: str) -> list[str]:
    """Paths in ``text`` (the content of ``rel_file``) that lead out of the repository."""
    root = REPO_ROOT.resolve()
    bad = []
    for m in CLIMB.finditer(text):
        path = m.group(1) + m.group(2)
        from_folder = (root / rel_file.parent / path).resolve()
        if rel_file.suffix == '.md':  # a link: from the document's folder, to a file of the tree
            if root not in from_folder.parents or not from_folder.exists():
                bad.append(m.group(0))
        elif any(root not in t.parents for t in (from_folder, (root / path).resolve())):
            bad.append(m.group(0))  # code and commands may run from the root or their folder
    if rel_file.suffix == '.py':
        depth = len(rel_file.parent.parts)  # parents[depth] of a file is the folder above the root
        bad += [m.group(0) for m in PARENTS.finditer(text) if int(m.group(1)) >= depth + 1]
        bad += ROOT_PARENT.findall(text)
    return bad


def test_no_file_names_a_path_beside_the_repository():
    found = {}
    for rel in tracked_files():
        try:
            text = (REPO_ROOT / rel).read_text(encoding='utf-8')
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        bad = outside(rel, text)
        if bad:
            found[rel.as_posix()] = bad
    assert not found, found


@pytest.mark.parametrize('rel,text,escapes', [  # {up} is '../' (this file must pass the check)
    ('tests/x.py', "REF = Path(__file__).resolve().{parents}[2] / 'data'", True),
    ('tests/x.py', "REF = Path(__file__).resolve().{parents}[1] / 'data'", False),
    ('x.py', "p = Path(__file__).{parents}[1]", True),
    ('tests/x.py', "p = {root}.parent / 'other'", True),
    ('tests/x.py', "open('{up}elsewhere/facts.json')", True),
    ('tests/x.py', "open('{up}README.md')", True),  # from the root it climbs out
    ('docs/guide.md', "see [the README]({up}README.md)", False),
    ('docs/guide.md', "see [there]({up}{up}elsewhere.md)", True),
    ('benchmarks/README.md', "in `{up}shared/facts.md`", True),  # not a file of the tree
    ('README.md', "run `python {up}x.py`", True),
])
def test_the_check_finds_paths_that_climb_out(rel, text, escapes):
    text = text.format(up='../', parents='parents', root='REPO_ROOT')
    assert bool(outside(Path(rel), text)) == escapes


def test_official_facts_are_in_the_repository():
    assert OFFICIAL_DATA.resolve().parent == (REPO_ROOT / 'tests').resolve()
    state_dicts, tasks, flops = official('state_dicts'), official('tasks'), official('flops')
    assert set(state_dicts) == {'tiny', 'small', 'base', 'base_sr_w32'}
    assert state_dicts['tiny']['num_params_total'] == sum(
        _numel(shape) for _, shape in state_dicts['tiny']['params'])
    assert len(tasks) >= 9 and len(flops) >= 12
    total = sum(p.stat().st_size for p in OFFICIAL_DATA.glob('official_*.json'))
    assert total < 512 * 1024  # reduced to what the tests use


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
