"""Shared fixtures: keep this file small (per-module fixtures live in their test files).

One torch thread per test process, and (through OMP_NUM_THREADS) per subprocess a test spawns: torchrun ranks,
notebook kernels; so parallel test processes and CI runners do not oversubscribe the cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from h3fusion.config import Profile, load_profile

torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture()
def smoke_profile(tmp_path: Path) -> Profile:
    """profiles/smoke.yaml with its artifacts in a fresh temporary folder."""
    return load_profile("smoke", {"runs_dir": str(tmp_path / "runs")})
