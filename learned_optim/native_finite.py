"""Which of many CPU float32 tensors holds a NaN or an infinity, in one kernel call.

A drop-in ``step()`` refuses non-finite gradients before it changes any parameter. With
torch's operators that test is an ``aminmax`` a gradient and a stack: about 330 us on 2 cores
for a model of 98 small tensors, 7% of the whole step. Here it is one call: the tensors'
addresses in a table, their values in chunks that the threads take as they free up, each
vector tested with ``v - v`` (zero unless ``v`` is NaN or infinite).
"""

from __future__ import annotations

import torch
from torch import Tensor

from learned_optim.rule.native_build import VEC_PRELUDE, NativeKernel, native_allowed

__all__ = ["first_nonfinite", "nonfinite_applies"]

_CHUNK = 16384  # values a thread tests at a time
# Below this many values one thread: a scan of a few hundred kB is over before a second
# thread would wake, and a parallel region waits for a thread whose core is busy elsewhere
# (98 tensors of 59k values: 50 us on one thread, 100 on two, 2 ms beside another process).
_PARALLEL_MIN_VALUES = 1 << 20

_SOURCE = VEC_PRELUDE + r"""
// table: [count, 2] int64 (address, length). bad: [count] int64, zeroed; bad[i] becomes 1
// where tensor i holds a NaN or an infinity.
extern "C" void kernel(const int64_t* table, int64_t* bad, const int64_t count,
                       const int64_t chunk, const int64_t threads)
{
    std::vector<int64_t> owner, first;  // the chunks: whose, and where they start
    for (int64_t i = 0; i < count; ++i)
        for (int64_t s = 0; s < table[2 * i + 1]; s += chunk) {
            owner.push_back(i);
            first.push_back(s);
        }
    const int64_t chunks = (int64_t)owner.size();
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i = owner[c], end = std::min(table[2 * i + 1], first[c] + chunk);
        const float* x = reinterpret_cast<const float*>(table[2 * i]);
        Vec acc(0.f);  // a sum of zeros, NaN as soon as one v - v is
        for (int64_t s = first[c]; s < end; s += V) {
            const Vec v = load(x + s, std::min(V, end - s));
            acc = acc + (v - v);
        }
        alignas(64) float lanes[V];
        acc.store(lanes);
        bool finite = true;
        for (int64_t l = 0; l < V; ++l) finite = finite && lanes[l] == 0.f;
        if (!finite) {
            #pragma omp atomic write
            bad[i] = 1;
        }
    }
}
"""


def _probe(kernel) -> None:
    """Three tensors: finite, holding an infinity past the first vector, holding a NaN."""
    values = [torch.ones(5), torch.ones(40), torch.zeros(3)]
    values[1][37], values[2][0] = float("-inf"), float("nan")
    table = torch.tensor([[v.data_ptr(), v.numel()] for v in values])
    bad = torch.zeros(3, dtype=torch.int64)
    kernel(table, bad, 3, 16, 1)
    if bad.tolist() != [0, 1, 1]:
        raise RuntimeError(f"the non-finite test kernel flagged {bad.tolist()} on its probe")


_kernel = NativeKernel("the non-finite test kernel", ["const int64_t*", "int64_t*"]
                       + ["const int64_t"] * 3, _SOURCE, _probe,
                       "gradients are tested with torch's operators")


def nonfinite_applies(tensors: list[Tensor]) -> bool:
    """Whether :func:`first_nonfinite` takes ``tensors``: contiguous float32 CPU tensors (not
    ``torch.func``-wrapped), where the kernel builds and the native kernels are allowed.

    >>> nonfinite_applies([torch.zeros(3, 2)]), nonfinite_applies([torch.zeros(3).double()])
    (True, False)
    """
    return (native_allowed()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                    and not torch._C._functorch.is_functorch_wrapped_tensor(t)
                    for t in tensors)
            and _kernel() is not None)


def first_nonfinite(tensors: list[Tensor]) -> int | None:
    """The index of the first of ``tensors`` that holds a NaN or an infinity, or ``None``
    where all are finite; for tensors :func:`nonfinite_applies` accepts.

    >>> x = [torch.ones(3), torch.tensor([1.0, float("inf")]), torch.zeros(2)]
    >>> first_nonfinite(x) if nonfinite_applies(x) else 1
    1
    """
    if not tensors:
        return None
    table = torch.tensor([[t.data_ptr(), t.numel()] for t in tensors], dtype=torch.int64)
    bad = torch.zeros(len(tensors), dtype=torch.int64)
    values = sum(t.numel() for t in tensors)
    _kernel()(table, bad, len(tensors), _CHUNK,
              torch.get_num_threads() if values >= _PARALLEL_MIN_VALUES else 1)
    flags = bad.tolist()
    return flags.index(1) if 1 in flags else None
