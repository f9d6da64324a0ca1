"""Hand-written C++ kernels, built once per process through inductor's C++ toolchain.

``torch._inductor.codecache`` is what ``torch.compile`` itself uses on the CPU: it detects the
vector ISA, compiles with OpenMP and ``at::vec`` (note: with ``-fno-tree-loop-vectorize``, so
a kernel vectorises explicitly through ``at::vec::Vectorized``), and caches the library on
disk. A :class:`NativeKernel` builds its source on first use and probes it; where that fails
(no C++ compiler, a torch without that module) it warns once and answers ``None``, and its
caller takes its eager path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = ["VEC_PRELUDE", "NativeKernel", "native_allowed", "partial_sums"]

# The start of a kernel source that vectorises over a channel dimension: ``at::vec`` floats
# (16 lanes with AVX-512, 8 with AVX2), partial loads and stores for the channels' last
# vector, a lane select, the channel count padded to whole vectors, and how many rows are
# summed in float before the sum joins a double one.
VEC_PRELUDE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>
#include <cmath>
#include <vector>

using Vec = at::vec::Vectorized<float>;
static constexpr int64_t V = Vec::size();
static constexpr int64_t kFlush = 64;

static inline Vec load(const float* p, int64_t count) {
    return count == V ? Vec::loadu(p) : Vec::loadu(p, count);
}
static inline void store(Vec v, float* p, int64_t count) {
    if (count == V) v.store(p); else v.store(p, count);
}
static inline Vec select(Vec mask, Vec yes, Vec no) { return Vec::blendv(no, yes, mask); }
static inline int64_t padded(int64_t C) { return (C + V - 1) / V * V; }
"""


def native_allowed() -> bool:
    """Whether compiled and hand-fused kernels may be used: not where the environment sets
    ``LEARNED_OPTIM_COMPILE`` to ``0``, ``false`` or ``no``.

    >>> isinstance(native_allowed(), bool)
    True
    """
    return os.environ.get("LEARNED_OPTIM_COMPILE", "1").strip().lower() not in ("0", "false",
                                                                                 "no")


class NativeKernel:
    """One C++ entry function (``extern "C" void kernel(...)``), built on first call.

    Parameters
    ----------
    name:
        What the warning calls it, e.g. ``"the fused conv-block kernels"``.
    argtypes:
        The C types of ``kernel``'s arguments (``"const float*"``, ``"const int64_t"``,
        ``"const float"``...): a tensor is passed for a pointer, a Python number otherwise.
    source:
        The C++ source.
    probe:
        Called with the built kernel; raises if the build is unusable.
    fallback:
        What happens instead, for the warning (e.g. ``"the eager operators run"``).
    """

    def __init__(self, name: str, argtypes: Sequence[str], source: str,
                 probe: Callable[[Callable], None], fallback: str) -> None:
        self.name, self.argtypes, self.source = name, list(argtypes), source
        self.probe, self.fallback = probe, fallback
        self.kernel: Callable | None = None
        self.failure: str | None = None  # why building failed, once it has

    def __call__(self) -> Callable | None:
        """The built kernel, or ``None`` where building failed (warned once)."""
        if self.kernel is None and self.failure is None:
            try:
                from torch._inductor.codecache import CppPythonBindingsCodeCache

                kernel = CppPythonBindingsCodeCache.load_pybinding(self.argtypes, self.source)
                # The probes build their tensors at the default dtype; the kernels read float.
                default = torch.get_default_dtype()
                torch.set_default_dtype(torch.float32)
                try:
                    self.probe(kernel)
                finally:
                    torch.set_default_dtype(default)
                self.kernel = kernel
            except Exception as error:  # noqa: BLE001 - any build failure means: stay eager
                first_line = str(error).splitlines()[0] if str(error) else ""
                self.failure = f"{type(error).__name__}: {first_line}"
                warnings.warn(f"learned_optim: building {self.name} failed ({self.failure}); "
                              f"{self.fallback} (set LEARNED_OPTIM_COMPILE=0 to skip the attempt)",
                              RuntimeWarning, stacklevel=3)
        return self.kernel


def partial_sums(threads: int, width: int) -> torch.Tensor:
    """A kernel's double sums, a row per thread (or per block of work), zeroed: OpenMP may run
    fewer threads than asked (nested in another parallel region, ``OMP_THREAD_LIMIT``), and
    the rows of threads that never ran are still added up.

    >>> partial_sums(2, 3).shape, partial_sums(2, 3).dtype
    (torch.Size([2, 3]), torch.float64)
    """
    return torch.zeros(threads, width, dtype=torch.float64)
