"""Fixtures for the data tests: the shared data folder and a once-per-session Omniglot cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from learned_optim.data.omniglot import load_omniglot_characters

# /work/shared/data for a clone at /work/main (CI puts `shared` beside the clone the same way).
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared, read-only data folder (the tests fail clearly if it is missing)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(scope="session")
def omniglot_root(data_dir: Path) -> Path:
    """The folder with the two Omniglot zips."""
    return data_dir / "omniglot"


@pytest.fixture(scope="session")
def omniglot_cache(omniglot_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the decoded 28 x 28 Omniglot (decoded once per session)."""
    cache_dir = tmp_path_factory.mktemp("omniglot-cache")
    start = time.perf_counter()
    load_omniglot_characters(omniglot_root, image_size=28, cache_dir=cache_dir)
    print(f"decoded Omniglot in {time.perf_counter() - start:.1f} s")
    return cache_dir
