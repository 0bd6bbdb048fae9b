"""Shared fixtures: keep this file small (per-module fixtures live in their test files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from h3fusion.config import Profile, load_profile


@pytest.fixture()
def smoke_profile(tmp_path: Path) -> Profile:
    """profiles/smoke.yaml with its artifacts in a fresh temporary folder."""
    return load_profile("smoke", {"runs_dir": str(tmp_path / "runs")})
