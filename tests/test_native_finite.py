"""The one-call non-finite test of many CPU float32 tensors finds what torch's operators find."""

from __future__ import annotations

import pytest
import torch

from learned_optim.native_finite import first_nonfinite, nonfinite_applies

pytestmark = pytest.mark.skipif(not nonfinite_applies([torch.zeros(1)]),
                                reason="the non-finite test kernel did not build here")

# Lengths that fill no vector, one value, several chunks of the kernel's (16,384 values), and
# enough values in all for the threads to share them (2^20).
SIZES = [1, 7, 16, 33, 16384, 50_001, 1_100_000]


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["first", "last", "middle"])
@pytest.mark.parametrize("thread_count", [1, 2])
def test_the_first_tensor_holding_a_non_finite_value_is_named(bad_value, where, thread_count,
                                                              threads):
    threads(thread_count)
    generator = torch.Generator().manual_seed(0)
    for bad in range(len(SIZES)):
        tensors = [torch.randn(n, generator=generator) * 1e30 for n in SIZES]  # large, finite
        n = SIZES[bad]
        position = {"first": 0, "last": n - 1, "middle": n // 2}[where]
        tensors[bad][position] = bad_value
        assert first_nonfinite(tensors) == bad
        tensors[-1][-1] = bad_value  # a later one too: still the first is named
        assert first_nonfinite(tensors) == bad


def test_finite_tensors_of_any_shape_pass():
    tensors = [torch.full((3, 5), 3e38), torch.zeros(0), torch.randn(2, 3, 4),
               torch.tensor(-1e-45)]
    assert first_nonfinite(tensors) is None
    assert first_nonfinite([]) is None


def test_only_contiguous_float32_cpu_tensors_are_taken(monkeypatch):
    x = torch.zeros(4, 4)
    assert nonfinite_applies([x, x[0]])
    assert not nonfinite_applies([x, x.t()])  # not contiguous
    assert not nonfinite_applies([x.double()])
    assert not nonfinite_applies([x.half()])
    monkeypatch.setenv("LEARNED_OPTIM_COMPILE", "0")
    assert not nonfinite_applies([x])
