"""Shared fixtures: the real data sets beside the repository, small real models."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (read-only)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits(shared_data) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits: 1,797 images of 8x8 as float32 [n, 64] in [0, 1] and int64 labels."""
    with gzip.open(shared_data / "sklearn_digits" / "digits.csv.gz", "rt") as stream:
        table = np.loadtxt(stream, delimiter=",", dtype=np.float32)
    inputs = torch.from_numpy(table[:, :64] / 16.0)
    labels = torch.from_numpy(table[:, 64].astype(np.int64))
    return inputs, labels


@pytest.fixture
def threads():
    """Set torch's thread count for one test (the suite runs on one); restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def default_dtype():
    """Set torch's default dtype for one test (as ``torch.set_default_dtype``); restored
    after."""
    before = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(before)


@pytest.fixture
def no_cpp_compiler(monkeypatch):
    """Make building C++ kernels fail ("no C++ compiler found"); call it with the
    ``NativeKernel`` objects to forget their earlier build."""
    from torch._inductor import codecache

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(codecache.CppPythonBindingsCodeCache, "load_pybinding", no_compiler)

    def unbuild(*kernels) -> None:
        for kernel in kernels:
            monkeypatch.setattr(kernel, "kernel", None)
            monkeypatch.setattr(kernel, "failure", None)

    return unbuild


# The test models are tiny: intra-op threads only add scheduling overhead, and on a loaded
# machine they make small kernels wait for descheduled workers.
torch.set_num_threads(1)
