"""Shared pytest setup: keep CPU runs predictable on small machines."""
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)


@pytest.fixture
def repo_root():
    """Root of the repository (the folder holding setup.py)."""
    return REPO_ROOT


#: The test items selected for this run (after -k / -m deselection), for fixtures that prepare
#: work only for the tests that will run.
SELECTED = pytest.StashKey[list]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    config.stash[SELECTED] = items
