"""The in-place step's update rule as one hand-fused C++ kernel for the CPU.

:func:`~learned_optim.rule.math.update_rows` is a matrix product ``[n, 2 + H] x [2 + H, 4H]``
followed by elementwise passes over the ``[n, 4H]`` gates. Run as separate kernels (eager, or
the loops ``torch.compile`` fuses around MKL's product), the gates make a round trip through
memory: 320 bytes a coordinate at the paper's hidden size, written by the product and read back
by the sigmoid, which at 55,000 coordinates falls out of cache. This kernel instead takes 16
coordinates at a time (one AVX-512 vector; 8 with AVX2) through the whole rule in registers
and L1: the layer-1 product as broadcast FMAs over four gates at once (independent
accumulators hide the FMA latency), the sigmoids, the cell, the meta-gates and the new
parameter, which it writes in place with the param group's ``lr`` and ``weight_decay``. What
is left is the rule's arithmetic, mostly its 4H + H + 2 sigmoids a coordinate.

It is the same rule as ``update_rows`` to float32 rounding (tested against it), without
autograd: only :meth:`learned_optim.LSTMMetaOptimizer.step` runs it. It is built through
inductor's C++ toolchain (``torch._inductor.codecache``, the one ``torch.compile`` uses on the
CPU: the vector ISA it detects, at::vec's vectorised exp and log), once per machine and
cached, in a few seconds. Where building fails (no C++ compiler, a torch without that
module), a warning says so once and ``step()`` takes its other paths;
``LEARNED_OPTIM_COMPILE=0`` skips it.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from learned_optim.rule.math import StepConstants

__all__ = ["MAX_HIDDEN", "native_constants", "native_step_kernel", "step_rows_native"]

MAX_HIDDEN = 64  # the kernel's per-thread tile buffers are sized for this hidden size
# Below this many rows one thread: waking a second costs more than it saves.
_PARALLEL_MIN_ROWS = 4096

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>

using Vec = at::vec::Vectorized<float>;
static constexpr int64_t kMaxHidden = @MAX_HIDDEN@;
static constexpr int64_t kLanes = Vec::size();

static inline Vec sigmoid(Vec x) { return (Vec(1.0f) + x.neg().exp()).reciprocal(); }

// One step of the update rule for n coordinates, in place: the feature-major state
// [h1 | c1 | f_pre | i_pre] x n (its features `stride` floats apart) and theta. weight
// [4H, 2 + H] (gates i, f, o, 2g; inputs log|g|/p, sign, h1), bias [4H], meta_h [2, H]
// (f_pre, i_pre), meta_small: theta, previous and bias weights of (f_pre, i_pre).
extern "C" void kernel(const float* weight, const float* bias, const float* meta_h,
                       const float* meta_small, float* state, const float* grad,
                       float* theta_out, const int64_t n, const int64_t hidden,
                       const int64_t stride, const int64_t threads, const float p,
                       const float threshold, const float exp_p, const float lr,
                       const float decay)
{
    const int64_t H = hidden, G = 4 * H, K = 2 + H, V = kLanes;
    const int64_t tiles = (n + V - 1) / V;
    #pragma omp parallel num_threads(threads)
    {
        // A tile: V coordinates, feature-major, so every feature is one vector.
        alignas(64) float x[(2 + kMaxHidden) * kLanes];
        alignas(64) float c_prev[kMaxHidden * kLanes];
        alignas(64) float gates[4 * kMaxHidden * kLanes];
        alignas(64) float h_new[kMaxHidden * kLanes];
        alignas(64) float c_new[kMaxHidden * kLanes];
        // prev f, prev i, theta, grad, f_pre, i_pre, new theta
        alignas(64) float lanes[7 * kLanes];
        #pragma omp for schedule(static)
        for (int64_t tile = 0; tile < tiles; ++tile) {
            const int64_t start = tile * V;
            const int64_t m = std::min(V, n - start);
            // Feature f of coordinate r is state[f * stride + r]: a full tile loads vectors.
            if (m == V) {
                for (int64_t h = 0; h < H; ++h) {
                    Vec::loadu(state + h * stride + start).store(x + (2 + h) * V);
                    Vec::loadu(state + (H + h) * stride + start).store(c_prev + h * V);
                }
                Vec::loadu(state + 2 * H * stride + start).store(lanes);
                Vec::loadu(state + (2 * H + 1) * stride + start).store(lanes + V);
                Vec::loadu(theta_out + start).store(lanes + 2 * V);
                Vec::loadu(grad + start).store(lanes + 3 * V);
            } else {  // the last tile: element by element, zeros past the end
                for (int64_t l = 0; l < V; ++l) {
                    const bool in = l < m;
                    const float* column = state + start + l;
                    for (int64_t h = 0; h < H; ++h) {
                        x[(2 + h) * V + l] = in ? column[h * stride] : 0.f;
                        c_prev[h * V + l] = in ? column[(H + h) * stride] : 0.f;
                    }
                    lanes[l] = in ? column[2 * H * stride] : 0.f;
                    lanes[V + l] = in ? column[(2 * H + 1) * stride] : 0.f;
                    lanes[2 * V + l] = in ? theta_out[start + l] : 0.f;
                    lanes[3 * V + l] = in ? grad[start + l] : 0.f;
                }
            }
            // Preprocessed gradient: (log|g| / p, sign g) if |g| >= e^-p, else (-1, e^p g).
            const Vec g = Vec::loadu(lanes + 3 * V);
            const Vec magnitude = g.abs();
            const Vec large = magnitude >= Vec(threshold);
            const Vec log_part = at::vec::maximum(magnitude, Vec(threshold)).log() / Vec(p);
            const Vec sign = Vec::blendv(Vec::blendv(Vec(0.f), Vec(-1.f), g < Vec(0.f)),
                                         Vec(1.f), g > Vec(0.f));
            Vec::blendv(Vec(-1.f), log_part, large).store(x);
            Vec::blendv(g * Vec(exp_p), sign, large).store(x + V);
            // Layer 1, four gates at a time (independent accumulators hide the FMA latency).
            for (int64_t j = 0; j < G; j += 4) {
                const float* w = weight + j * K;
                Vec a0(bias[j]), a1(bias[j + 1]), a2(bias[j + 2]), a3(bias[j + 3]);
                for (int64_t k = 0; k < K; ++k) {
                    const Vec xk = Vec::loadu(x + k * V);
                    a0 = at::vec::fmadd(Vec(w[k]), xk, a0);
                    a1 = at::vec::fmadd(Vec(w[K + k]), xk, a1);
                    a2 = at::vec::fmadd(Vec(w[2 * K + k]), xk, a2);
                    a3 = at::vec::fmadd(Vec(w[3 * K + k]), xk, a3);
                }
                sigmoid(a0).store(gates + j * V);
                sigmoid(a1).store(gates + (j + 1) * V);
                sigmoid(a2).store(gates + (j + 2) * V);
                sigmoid(a3).store(gates + (j + 3) * V);
            }
            // The cell; tanh(x) = 2 sigmoid(2x) - 1 (the g gate's factor 2 is in the weights).
            Vec f_pre(meta_small[4]), i_pre(meta_small[5]);
            for (int64_t h = 0; h < H; ++h) {
                const Vec in_gate = Vec::loadu(gates + h * V);
                const Vec forget_gate = Vec::loadu(gates + (H + h) * V);
                const Vec out_gate = Vec::loadu(gates + (2 * H + h) * V);
                const Vec cell_gate = Vec::loadu(gates + (3 * H + h) * V) * Vec(2.f) - Vec(1.f);
                const Vec c = forget_gate * Vec::loadu(c_prev + h * V) + in_gate * cell_gate;
                const Vec h1 = out_gate * (sigmoid(c * Vec(2.f)) * Vec(2.f) - Vec(1.f));
                c.store(c_new + h * V);
                h1.store(h_new + h * V);
                f_pre = at::vec::fmadd(Vec(meta_h[h]), h1, f_pre);
                i_pre = at::vec::fmadd(Vec(meta_h[H + h]), h1, i_pre);
            }
            // Layer 2 and theta_t = sigmoid(f_pre) theta - sigmoid(i_pre) g, then lr, decay.
            const Vec theta = Vec::loadu(lanes + 2 * V);
            f_pre = f_pre + theta * Vec(meta_small[0]) + Vec::loadu(lanes) * Vec(meta_small[2]);
            i_pre = i_pre + theta * Vec(meta_small[1]) + Vec::loadu(lanes + V) * Vec(meta_small[3]);
            Vec proposed = sigmoid(f_pre) * theta - sigmoid(i_pre) * g;
            if (lr != 1.f) {  // torch.lerp(theta, proposed, lr)
                proposed = lr < 0.5f ? theta + Vec(lr) * (proposed - theta)
                                     : proposed - (proposed - theta) * Vec(1.f - lr);
            }
            if (decay != 0.f) proposed = proposed - Vec(decay) * theta;
            if (m == V) {
                for (int64_t h = 0; h < H; ++h) {
                    Vec::loadu(h_new + h * V).store(state + h * stride + start);
                    Vec::loadu(c_new + h * V).store(state + (H + h) * stride + start);
                }
                f_pre.store(state + 2 * H * stride + start);
                i_pre.store(state + (2 * H + 1) * stride + start);
                proposed.store(theta_out + start);
            } else {
                f_pre.store(lanes + 4 * V);
                i_pre.store(lanes + 5 * V);
                proposed.store(lanes + 6 * V);
                for (int64_t l = 0; l < m; ++l) {
                    float* column = state + start + l;
                    for (int64_t h = 0; h < H; ++h) {
                        column[h * stride] = h_new[h * V + l];
                        column[(H + h) * stride] = c_new[h * V + l];
                    }
                    column[2 * H * stride] = lanes[4 * V + l];
                    column[(2 * H + 1) * stride] = lanes[5 * V + l];
                    theta_out[start + l] = lanes[6 * V + l];
                }
            }
        }
    }
}
""".replace("@MAX_HIDDEN@", str(MAX_HIDDEN))

_ARGTYPES = (["const float*"] * 4 + ["float*", "const float*", "float*"]
             + ["const int64_t"] * 4 + ["const float"] * 5)
_kernel = None  # the loaded kernel, once built
_failure: str | None = None  # why building failed, once it has


def native_step_kernel():
    """The built kernel (a callable on tensors and numbers), or ``None`` where building
    failed (warned once).

    The first call builds it (a few seconds; cached on disk by inductor afterwards). Its
    failure is its own: the ``torch.compile`` paths of :mod:`learned_optim.rule.compiled` do
    not depend on the private inductor module it is built with, and stay on.
    """
    global _kernel, _failure
    if _kernel is None and _failure is None:
        try:
            from torch._inductor.codecache import CppPythonBindingsCodeCache

            kernel = CppPythonBindingsCodeCache.load_pybinding(_ARGTYPES, _SOURCE)
            _probe(kernel)
            _kernel = kernel
        except Exception as error:  # noqa: BLE001 - any build failure means: the chunk paths
            first_line = str(error).splitlines()[0] if str(error) else ""
            _failure = f"{type(error).__name__}: {first_line}"
            warnings.warn(
                f"learned_optim: building the native step kernel failed ({_failure}); "
                "step() takes the chunk paths (set LEARNED_OPTIM_COMPILE=0 to skip the attempt)",
                RuntimeWarning, stacklevel=2)
    return _kernel


def _probe(kernel) -> None:
    """Run the kernel once on a few rows (raises if the build is unusable)."""
    state, grad, theta = torch.zeros(4, 3), torch.ones(3), torch.zeros(3)  # hidden size 1
    weight, bias = torch.zeros(4, 3), torch.zeros(4)
    kernel(weight, bias, torch.zeros(2, 1), torch.zeros(6), state, grad, theta, 3, 1, 3, 1,
           10.0, math.exp(-10.0), math.exp(10.0), 1.0, 0.0)
    if not torch.equal(theta, torch.full((3,), -0.5)):  # sigmoid(0) * 0 - sigmoid(0) * 1
        raise RuntimeError(f"the native step kernel computed {theta.tolist()} on its probe")


def native_constants(constants: StepConstants) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A step's constants as the kernel reads them (contiguous), for
    :func:`step_rows_native`'s ``kernel_constants``: one layout for all of a step's calls."""
    meta_small = torch.cat((constants.meta_weight_theta, constants.meta_weight_prev,
                            constants.meta_bias))
    return (constants.input_weight.t().contiguous(), constants.gate_bias.contiguous(),
            constants.meta_weight_h.t().contiguous(), meta_small.contiguous())


def _check_layout(state: Tensor, grad: Tensor, param: Tensor, rows: int, hidden: int) -> None:
    """The kernel reads raw pointers: refuse what it would misread."""
    if hidden > MAX_HIDDEN:
        raise ValueError(f"the native step kernel takes hidden sizes up to {MAX_HIDDEN}, "
                         f"got {hidden}")
    for name, tensor in (("state", state), ("grad", grad), ("param", param)):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise ValueError(f"the native step kernel takes float32 CPU tensors, got {name} "
                             f"{tensor.dtype} on {tensor.device}")
    if grad.shape != (rows,) or param.shape != (rows,) or not (grad.is_contiguous()
                                                                and param.is_contiguous()):
        raise ValueError(f"grad and param must be contiguous [{rows}] tensors, got "
                         f"{tuple(grad.shape)} and {tuple(param.shape)}")
    if state.shape != (rows, 2 * hidden + 2) or (rows > 1 and state.stride(0) != 1):
        raise ValueError(f"state must be a feature-major [{rows}, {2 * hidden + 2}] view "
                         "(unit row stride, as initial_state(..., feature_major=True) makes), "
                         f"got shape {tuple(state.shape)}, strides {state.stride()}")


def step_rows_native(constants: StepConstants, state: Tensor, grad: Tensor, param: Tensor,
                     lr: float = 1.0, weight_decay: float = 0.0,
                     kernel_constants: tuple | None = None) -> None:
    """One step of the rule for ``n`` coordinates, in place: ``state`` (``[n, 2H + 2]``,
    feature-major: a transposed view whose rows are one float apart, as
    ``initial_state(n, H, feature_major=True)`` or a row slice of it) becomes the next state
    and ``param`` (``[n]``, contiguous) ``theta_t``, scaled by ``lr`` with decoupled
    ``weight_decay`` as :func:`~learned_optim.rule.math.apply_group_options` does. float32 on
    the CPU, hidden size at most :data:`MAX_HIDDEN`; the caller checks
    :func:`native_step_kernel` is not ``None``.
    ``kernel_constants`` (:func:`native_constants` of the same constants) saves laying them
    out again for each call of one step.

    >>> from learned_optim import MetaLearnerLSTM
    >>> from learned_optim.rule.math import initial_state, prepare_step, update_rows
    >>> constants = prepare_step(MetaLearnerLSTM().weights(), torch.tensor(1.0), torch.float32)
    >>> state = initial_state(3, 20, feature_major=True)
    >>> grad, theta = torch.ones(3), torch.zeros(3)
    >>> expected, _ = update_rows(constants, state, grad, theta)
    >>> if native_step_kernel() is not None:
    ...     step_rows_native(constants, state, grad, theta)
    ...     torch.testing.assert_close(theta, expected)
    """
    rows = grad.shape[0]
    hidden = constants.meta_weight_h.shape[0]
    _check_layout(state, grad, param, rows, hidden)
    if kernel_constants is None:
        kernel_constants = native_constants(constants)
    threads = torch.get_num_threads() if rows >= _PARALLEL_MIN_ROWS else 1
    p = constants.p
    native_step_kernel()(*kernel_constants, state, grad, param, rows, hidden, state.stride(1),
                         threads, p, math.exp(-p), math.exp(p), float(lr),
                         float(lr) * float(weight_decay))
