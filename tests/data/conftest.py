"""Fixtures for the data tests: the Omniglot folder and a once-per-session Omniglot cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from learned_optim.data.omniglot import load_omniglot_characters


@pytest.fixture(scope="session")
def omniglot_root(shared_data: Path) -> Path:
    """The folder with the two Omniglot zips (``shared_data`` comes from tests/conftest.py)."""
    return shared_data / "omniglot"


@pytest.fixture(scope="session")
def omniglot_cache(omniglot_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the decoded 28 x 28 Omniglot (decoded once per session)."""
    cache_dir = tmp_path_factory.mktemp("omniglot-cache")
    start = time.perf_counter()
    load_omniglot_characters(omniglot_root, image_size=28, cache_dir=cache_dir)
    print(f"decoded Omniglot in {time.perf_counter() - start:.1f} s")
    return cache_dir
