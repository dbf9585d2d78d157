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
