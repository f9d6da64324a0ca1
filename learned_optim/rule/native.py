"""The update rule as hand-fused C++ kernels for the CPU: the in-place step's, and the
forward of the meta-training tape's node (its backward is :mod:`learned_optim.rule.native_tape`).

:func:`~learned_optim.rule.math.update_rows` is a matrix product ``[n, 2 + H] x [2 + H, 4H]``
followed by elementwise passes over the ``[n, 4H]`` gates. Run as separate kernels (eager, or
the loops ``torch.compile`` fuses around MKL's product), the gates make a round trip through
memory: 320 bytes a coordinate at the paper's hidden size, written by the product and read back
by the sigmoid, which at 55,000 coordinates falls out of cache. These kernels instead take 16
coordinates at a time (one AVX-512 vector; 8 with AVX2) through the whole rule in registers
and L1: the layer-1 product as broadcast FMAs over four gates at once (independent
accumulators hide the FMA latency), the sigmoids, the cell, the meta-gates and the new
parameter. What is left is the rule's arithmetic, mostly its 4H + H + 2 sigmoids a coordinate.

:data:`RULE_TILE_SOURCE` is that tile's forward, written once in C++ and shared by the step
kernel here and the tape's backward kernel (which recomputes a tile's gates rather than
storing them). It is the same rule as ``update_rows`` to float32 rounding (tested against
it). The kernels are built through inductor's C++ toolchain
(:mod:`learned_optim.rule.native_build`), once per machine and cached, in a few seconds.
Where building fails (no C++ compiler, a torch without that module), a warning says so once
and the callers take their other paths; ``LEARNED_OPTIM_COMPILE=0`` skips them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from learned_optim.rule.math import Normalisation, StepConstants
from learned_optim.rule.native_build import VEC_PRELUDE, NativeKernel

__all__ = ["MAX_HIDDEN", "PARALLEL_MIN_ROWS", "RULE_TILE_SOURCE", "STEP_KERNEL", "check_layout",
           "feature_rows", "kernel_threads", "native_constants",
           "native_step_kernel", "normalisation_args", "rule_scalars", "step_rows_native",
           "step_rows_native_out"]

MAX_HIDDEN = 64  # the kernels' per-thread tile buffers are sized for this hidden size
# Below this many rows one thread: waking a second costs more than it saves.
PARALLEL_MIN_ROWS = 4096

RULE_TILE_SOURCE = VEC_PRELUDE + r"""
static constexpr int64_t kMaxHidden = @MAX_HIDDEN@;

// 1 / (1 + e^-x) without Sleef's exp (1 ulp, with special cases), which with the division
// was most of the rule's time, on AVX-512 and AVX2: e^-x = 2^n e^r, with what both share
// below; -x is clamped first so that no infinity reaches the reciprocal (NaN stays NaN: the
// clamps return their second operand when it is NaN).
// e^z's reduced part: n = round(z / ln 2) (into `n`), r = z - n ln 2 in two parts
// (Cody-Waite), and e^r by Moshier's (Cephes') degree-6 polynomial; the caller scales by 2^n.
static inline Vec exp_reduced(Vec z, Vec& n) {
    n = (z * Vec(1.44269504088896341f)).round();
    Vec r = at::vec::fmadd(n, Vec(-0.693359375f), z);
    r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
    Vec e(1.9875691500e-4f);
    e = at::vec::fmadd(e, r, Vec(1.3981999507e-3f));
    e = at::vec::fmadd(e, r, Vec(8.3334519073e-3f));
    e = at::vec::fmadd(e, r, Vec(4.1665795894e-2f));
    e = at::vec::fmadd(e, r, Vec(1.6666665459e-1f));
    e = at::vec::fmadd(e, r, Vec(5.0000001201e-1f));
    return at::vec::fmadd(e, r * r, r + Vec(1.f));
}

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
// -x clamped to [-88, 87], 2^n by scalef, the reciprocal from rcp14 refined by one Newton
// step. Within 3 ulp of the exact sigmoid (1.4x faster).
static inline Vec sigmoid(Vec xv) {
    __m512 z = _mm512_sub_ps(_mm512_setzero_ps(), __m512(xv));
    z = _mm512_max_ps(_mm512_set1_ps(-88.f), _mm512_min_ps(_mm512_set1_ps(87.f), z));
    Vec n;
    const __m512 e = __m512(exp_reduced(Vec(z), n));
    const __m512 d = _mm512_add_ps(_mm512_scalef_ps(e, __m512(n)), _mm512_set1_ps(1.f));
    const __m512 y = _mm512_rcp14_ps(d);
    return Vec(_mm512_mul_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(2.f))));
}
#elif defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
// AVX2 has no scalef: -x is clamped to [-87, 87], so n is in [-126, 126] and 2^n is built as
// a normal float's bits. The reciprocal is a division here: rcp's 12 bits and a Newton step
// gave sigmoid(0) = 0.49999997 at the same speed. Within 3.1 ulp of the float64 sigmoid from
// -100 to 100 (at::vec: 2.5), 1.9x faster in a loop over 2.3M inputs (AMD EPYC, one thread).
static inline Vec sigmoid(Vec xv) {
    __m256 z = _mm256_sub_ps(_mm256_setzero_ps(), __m256(xv));
    z = _mm256_max_ps(_mm256_set1_ps(-87.f), _mm256_min_ps(_mm256_set1_ps(87.f), z));
    Vec n;
    const __m256 e = __m256(exp_reduced(Vec(z), n));
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(__m256(n)),
                                            _mm256_set1_epi32(127));
    const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
    const __m256 d = _mm256_fmadd_ps(e, two_n, _mm256_set1_ps(1.f));
    return Vec(_mm256_div_ps(_mm256_set1_ps(1.f), d));
}
#else
static inline Vec sigmoid(Vec x) { return (Vec(1.0f) + x.neg().exp()).reciprocal(); }
#endif

// A step's constants as native_constants() lays them out: weight [4H, 2 + H] (gates i, f, o,
// 2g; inputs log|g|/p, sign, h1), bias [4H], meta_h [2, H] (f_pre, i_pre), meta_small [6]:
// theta, previous and bias weights of (f_pre, i_pre).
struct Rule {
    const float* weight; const float* bias; const float* meta_h; const float* meta_small;
    int64_t H; float p, threshold, exp_p;
};

// One tile: V coordinates, feature-major (feature f of lane l at [f * V + l]), so that every
// feature is one vector.
struct Tile {
    alignas(64) float x[(2 + kMaxHidden) * V];  // layer-1 input: log|g|/p, sign g, h1 before
    alignas(64) float c_prev[kMaxHidden * V];
    alignas(64) float gates[4 * kMaxHidden * V];  // sigmoids of i, f, o and of 2g
    alignas(64) float c[kMaxHidden * V];
    alignas(64) float tanh_c[kMaxHidden * V];
    alignas(64) float h1[kMaxHidden * V];
    Vec f_prev, i_prev, theta, g, large, f_pre, i_pre;
};

// The tile's inputs from the feature-major state (features `stride` floats apart), the
// gradient and theta, at coordinates start .. start + m; zeros past the end.
static inline void load_tile(const Rule& r, Tile& t, const float* state, int64_t stride,
                             const float* grad, const float* theta, int64_t start, int64_t m) {
    const int64_t H = r.H;
    for (int64_t h = 0; h < H; ++h) {
        load(state + h * stride + start, m).store(t.x + (2 + h) * V);
        load(state + (H + h) * stride + start, m).store(t.c_prev + h * V);
    }
    t.f_prev = load(state + 2 * H * stride + start, m);
    t.i_prev = load(state + (2 * H + 1) * stride + start, m);
    t.theta = load(theta + start, m);
    t.g = load(grad + start, m);
}

// Layer 1's gates j .. j + Q of a tile (its input in t.x), their sigmoids into t.gates.
template <int Q>
static inline void gate_block(const Rule& r, Tile& t, int64_t j, int64_t K) {
    const float* w = r.weight + j * K;
    Vec a[Q];
    for (int q = 0; q < Q; ++q) a[q] = Vec(r.bias[j + q]);
    for (int64_t k = 0; k < K; ++k) {
        const Vec xk = Vec::loadu(t.x + k * V);
        for (int q = 0; q < Q; ++q) a[q] = at::vec::fmadd(Vec(w[q * K + k]), xk, a[q]);
    }
    for (int q = 0; q < Q; ++q) sigmoid(a[q]).store(t.gates + (j + q) * V);
}

// The rule's forward on a loaded tile, up to the meta-gates' pre-activations.
static inline void forward_tile(const Rule& r, Tile& t) {
    const int64_t H = r.H, G = 4 * H, K = 2 + H;
    // Preprocessed gradient: (log|g| / p, sign g) if |g| >= e^-p, else (-1, e^p g).
    const Vec g = t.g;
    const Vec magnitude = g.abs();
    t.large = magnitude >= Vec(r.threshold);
    const Vec log_part = at::vec::maximum(magnitude, Vec(r.threshold)).log() / Vec(r.p);
    const Vec sign = Vec::blendv(Vec::blendv(Vec(0.f), Vec(-1.f), g < Vec(0.f)),
                                 Vec(1.f), g > Vec(0.f));
    Vec::blendv(Vec(-1.f), log_part, t.large).store(t.x);
    Vec::blendv(g * Vec(r.exp_p), sign, t.large).store(t.x + V);
    // Layer 1, twelve gates at a time (independent accumulators: the FMAs' latency, not
    // their throughput, bounds fewer; twelve and the input fit AVX2's 16 registers and took
    // the tape's backward, which recomputes this, 1.04-1.06x faster than eight on the EPYC),
    // then eight or four for the rest (4H is a multiple of 4).
    int64_t j = 0;
    for (; j + 12 <= G; j += 12) gate_block<12>(r, t, j, K);
    for (; j + 8 <= G; j += 8) gate_block<8>(r, t, j, K);
    for (; j < G; j += 4) gate_block<4>(r, t, j, K);
    // The cell; tanh(x) = 2 sigmoid(2x) - 1 (the g gate's factor 2 is in the weights).
    const float* ms = r.meta_small;
    Vec f_pre(ms[4]), i_pre(ms[5]);
    for (int64_t h = 0; h < H; ++h) {
        const Vec in_gate = Vec::loadu(t.gates + h * V);
        const Vec forget_gate = Vec::loadu(t.gates + (H + h) * V);
        const Vec out_gate = Vec::loadu(t.gates + (2 * H + h) * V);
        const Vec cell_gate = Vec::loadu(t.gates + (3 * H + h) * V) * Vec(2.f) - Vec(1.f);
        const Vec c = forget_gate * Vec::loadu(t.c_prev + h * V) + in_gate * cell_gate;
        const Vec tanh_c = sigmoid(c * Vec(2.f)) * Vec(2.f) - Vec(1.f);
        const Vec h1 = out_gate * tanh_c;
        c.store(t.c + h * V);
        tanh_c.store(t.tanh_c + h * V);
        h1.store(t.h1 + h * V);
        f_pre = at::vec::fmadd(Vec(r.meta_h[h]), h1, f_pre);
        i_pre = at::vec::fmadd(Vec(r.meta_h[H + h]), h1, i_pre);
    }
    // Layer 2's pre-activations.
    t.f_pre = f_pre + t.theta * Vec(ms[0]) + t.f_prev * Vec(ms[2]);
    t.i_pre = i_pre + t.theta * Vec(ms[1]) + t.i_prev * Vec(ms[3]);
}
""".replace("@MAX_HIDDEN@", str(MAX_HIDDEN))

_STEP_SOURCE = RULE_TILE_SOURCE + r"""
// torch.lerp(start, end, w) as ATen's vectorised CPU kernel computes it (one FMA, the form
// chosen by |w| < 1/2), so that the normalised gradient is the eager one's to the bit.
static inline Vec lerp(Vec start, Vec end, float w) {
    return std::abs(w) < 0.5f ? at::vec::fmadd(Vec(w), end - start, start)
                              : at::vec::fmadd(Vec(w - 1.f), end - start, end);
}

// One step of the rule for n coordinates: the feature-major state [h1 | c1 | f_pre | i_pre] x n
// (features `stride_in` floats apart) and theta_in become state_out (`stride_out`) and
// theta_out = sigmoid(f_pre) theta - sigmoid(i_pre) g, then lr and decoupled decay. In place
// when the pointers are the same: a tile reads all its inputs before it writes.
extern "C" void kernel(const float* weight, const float* bias, const float* meta_h,
                       const float* meta_small, const float* state_in, float* state_out,
                       const float* grad, const float* theta_in, float* theta_out,
                       const int64_t n, const int64_t hidden, const int64_t stride_in,
                       const int64_t stride_out, const int64_t threads, const float p,
                       const float threshold, const float exp_p, const float lr,
                       const float decay, float* moments, const int64_t normalise,
                       const float mean_weight, const float square_weight,
                       const float mean_scale, const float square_debias)
{
    const Rule r{weight, bias, meta_h, meta_small, hidden, p, threshold, exp_p};
    const int64_t H = hidden, tiles = (n + V - 1) / V;
    #pragma omp parallel num_threads(threads)
    {
        Tile t;
        // Tiles handed out 64 at a time, not split in halves up front: with another process
        // on one of 2 cores, a static half waited a time slice for its thread (55,050 rows,
        // the EPYC: 15.9 against 12.1 ms; idle 7.0 against 6.7; 16 at a time: 13.3 and 6.7).
        // Tiles write disjoint rows and sum nothing: the result is the same whoever takes them.
        #pragma omp for schedule(dynamic, 64)
        for (int64_t tile = 0; tile < tiles; ++tile) {
            const int64_t start = tile * V, m = std::min(V, n - start);
            load_tile(r, t, state_in, stride_in, grad, theta_in, start, m);
            if (normalise) {  // the rule reads the normalised gradient (scale_gradient's)
                float* mean_at = moments + start;
                float* square_at = moments + n + start;
                const Vec mean = lerp(load(mean_at, m), t.g, mean_weight);
                const Vec square = lerp(load(square_at, m), t.g * t.g, square_weight);
                const Vec rms = (square / Vec(square_debias)).sqrt();
                t.g = mean * Vec(mean_scale) / (rms + Vec(1e-12f));
                store(mean, mean_at, m);
                store(square, square_at, m);
            }
            forward_tile(r, t);
            Vec proposed = sigmoid(t.f_pre) * t.theta - sigmoid(t.i_pre) * t.g;
            if (lr != 1.f) {  // torch.lerp(theta, proposed, lr)
                proposed = lr < 0.5f ? t.theta + Vec(lr) * (proposed - t.theta)
                                     : proposed - (proposed - t.theta) * Vec(1.f - lr);
            }
            if (decay != 0.f) proposed = proposed - Vec(decay) * t.theta;
            for (int64_t h = 0; h < H; ++h) {
                store(Vec::loadu(t.h1 + h * V), state_out + h * stride_out + start, m);
                store(Vec::loadu(t.c + h * V), state_out + (H + h) * stride_out + start, m);
            }
            store(t.f_pre, state_out + 2 * H * stride_out + start, m);
            store(t.i_pre, state_out + (2 * H + 1) * stride_out + start, m);
            store(proposed, theta_out + start, m);
        }
    }
}
"""

_ARGTYPES = (["const float*"] * 4 + ["const float*", "float*", "const float*", "const float*",
                                     "float*"]
             + ["const int64_t"] * 5 + ["const float"] * 5 + ["float*", "const int64_t"]
             + ["const float"] * 4)


def normalisation_args(normalisation: Normalisation | None, rows: int, device: str = "cpu",
                       kernel: str = "the native step kernel") -> tuple:
    """The step kernels' last six arguments: ``normalisation``'s moments (refused unless
    ``[2, *shape]`` of ``rows`` coordinates, contiguous float32 on ``device``: the kernels
    write them through a raw pointer), a flag and its four numbers; without one, an empty
    tensor the kernels never touch, 0 and neutral numbers.

    >>> from learned_optim.rule.math import normalisation
    >>> normalisation_args(normalisation(torch.zeros(2, 3), 1, 0.9, 0.99, 0.1), 3)[1:3]
    (1, 0.09999999999999998)
    >>> normalisation_args(None, 3)[1:]
    (0, 0.0, 0.0, 1.0, 1.0)
    """
    if normalisation is None:
        return (_NO_MOMENTS, 0, 0.0, 0.0, 1.0, 1.0)
    moments = normalisation.moments
    if (moments.dtype != torch.float32 or moments.device.type != device
            or moments.numel() != 2 * rows or moments.shape[:1] != (2,)
            or not moments.is_contiguous()):
        raise ValueError(f"{kernel} takes the gradient's moments as a contiguous float32 "
                         f"[2, {rows}] tensor on {device}, got {moments.dtype} "
                         f"{tuple(moments.shape)} on {moments.device}"
                         + ("" if moments.is_contiguous() else ", not contiguous"))
    return (moments, 1, *normalisation[1:])


_NO_MOMENTS = torch.empty(0)


def _probe(kernel) -> None:
    """Run the kernel once on a few rows (raises if the build is unusable)."""
    state, grad, theta = torch.zeros(4, 3), torch.ones(3), torch.zeros(3)  # hidden size 1
    weight, bias = torch.zeros(4, 3), torch.zeros(4)
    kernel(weight, bias, torch.zeros(2, 1), torch.zeros(6), state, state, grad, theta, theta,
           3, 1, 3, 3, 1, 10.0, math.exp(-10.0), math.exp(10.0), 1.0, 0.0,
           *normalisation_args(None, 3))
    if not torch.equal(theta, torch.full((3,), -0.5)):  # sigmoid(0) * 0 - sigmoid(0) * 1
        raise RuntimeError(f"the native step kernel computed {theta.tolist()} on its probe")


STEP_KERNEL = NativeKernel("the native step kernel", _ARGTYPES, _STEP_SOURCE, _probe,
                           "step() takes the chunk paths")


def native_step_kernel():
    """The built step kernel (a callable on tensors and numbers), or ``None`` where building
    failed (warned once).

    The first call builds it (a few seconds; cached on disk by inductor afterwards). Its
    failure is its own: the ``torch.compile`` paths of :mod:`learned_optim.rule.compiled` do
    not depend on the private inductor module it is built with, and stay on.
    """
    return STEP_KERNEL()


def native_constants(constants: StepConstants) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A step's constants as the kernels read them (contiguous, detached: the kernels read
    raw pointers, and the tape nodes record the constants themselves), for
    :func:`step_rows_native`'s ``kernel_constants``: one layout for all of a step's calls."""
    c = constants._replace(**{name: getattr(constants, name).detach()
                              for name in constants._fields if name != "p"})
    meta_small = torch.cat((c.meta_weight_theta, c.meta_weight_prev, c.meta_bias))
    return (c.input_weight.t().contiguous(), c.gate_bias.contiguous(),
            c.meta_weight_h.t().contiguous(), meta_small.contiguous())


def rule_scalars(p: float) -> tuple[float, float, float]:
    """The kernels' ``p, threshold, exp_p``: the preprocessing's exponent, ``e^-p``, ``e^p``."""
    return p, math.exp(-p), math.exp(p)


def check_layout(state: Tensor, grad: Tensor, param: Tensor, rows: int, hidden: int, *,
                 device: str = "cpu", kernel: str = "the native step kernel") -> None:
    """The kernels read raw pointers: refuse what they would misread (``kernel`` on ``device``,
    its device type, names the one checked for)."""
    if hidden > MAX_HIDDEN:
        raise ValueError(f"{kernel} takes hidden sizes up to {MAX_HIDDEN}, got {hidden}")
    for name, tensor in (("state", state), ("grad", grad), ("param", param)):
        if tensor.dtype != torch.float32 or tensor.device.type != device:
            raise ValueError(f"{kernel} takes float32 {'CPU' if device == 'cpu' else device} "
                             f"tensors, got {name} {tensor.dtype} on {tensor.device}")
    if grad.shape != (rows,) or param.shape != (rows,) or not (grad.is_contiguous()
                                                                and param.is_contiguous()):
        raise ValueError(f"grad and param must be contiguous [{rows}] tensors, got "
                         f"{tuple(grad.shape)} and {tuple(param.shape)}")
    if state.shape != (rows, 2 * hidden + 2) or (rows > 1 and state.stride(0) != 1):
        raise ValueError(f"state must be a feature-major [{rows}, {2 * hidden + 2}] view "
                         "(unit row stride, as initial_state(..., feature_major=True) makes), "
                         f"got shape {tuple(state.shape)}, strides {state.stride()}")


def feature_rows(features: int, rows: int) -> Tensor:
    """An uninitialised feature-major ``[features, rows]`` float32 tensor whose features start
    64 bytes apart (a multiple of 16 floats; a view of a wider one where ``rows`` is not): the
    kernels load and store each feature 16 coordinates at a time, and a vector that straddles
    two cache lines made the tape's out-of-place step 1.7x slower at 28,485 rows.

    >>> columns = feature_rows(42, 28485)
    >>> columns.shape, columns.stride()
    (torch.Size([42, 28485]), (28496, 1))
    """
    return torch.empty(features, -(-rows // 16) * 16, dtype=torch.float32)[:, :rows]


def kernel_threads(rows: int) -> int:
    """Threads for a kernel call on ``rows`` rows: torch's, or one below
    :data:`PARALLEL_MIN_ROWS`."""
    return torch.get_num_threads() if rows >= PARALLEL_MIN_ROWS else 1


def step_rows_native(constants: StepConstants, state: Tensor, grad: Tensor, param: Tensor,
                     lr: float = 1.0, weight_decay: float = 0.0,
                     kernel_constants: tuple | None = None,
                     normalisation: Normalisation | None = None) -> None:
    """One step of the rule for ``n`` coordinates, in place: ``state`` (``[n, 2H + 2]``,
    feature-major: a transposed view whose rows are one float apart, as
    ``initial_state(n, H, feature_major=True)`` or a row slice of it) becomes the next state
    and ``param`` (``[n]``, contiguous) ``theta_t``, scaled by ``lr`` with decoupled
    ``weight_decay`` as :func:`~learned_optim.rule.math.apply_group_options` does. float32 on
    the CPU, hidden size at most :data:`MAX_HIDDEN`; the caller checks
    :func:`native_step_kernel` is not ``None``.
    ``kernel_constants`` (:func:`native_constants` of the same constants) saves laying them
    out again for each call of one step. ``normalisation``: the rule reads and applies
    :func:`~learned_optim.rule.math.scale_gradient`'s gradient instead of ``grad``, computed
    here from ``grad`` and its moments, which are updated in place (the rules with
    ``gradient_scale``; without one, ``grad`` as it is).

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
    check_layout(state, grad, param, rows, hidden)
    if kernel_constants is None:
        kernel_constants = native_constants(constants)
    stride = state.stride(1)
    native_step_kernel()(*kernel_constants, state, state, grad, param, param, rows, hidden,
                         stride, stride, kernel_threads(rows), *rule_scalars(constants.p),
                         float(lr), float(lr) * float(weight_decay),
                         *normalisation_args(normalisation, rows))


def step_rows_native_out(kernel_constants: tuple, p: float, columns: Tensor, grad: Tensor,
                         param: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the rule out of place, without autograd: ``(theta_t, columns_t)`` from the
    feature-major state ``columns`` (``[2H + 2, n]``, each feature contiguous), ``grad`` and
    ``param`` (``[n]``, contiguous float32 on the CPU), as ``update_rows(...,
    feature_major=True)`` returns them; ``columns_t``'s features are 64 bytes apart
    (:func:`feature_rows`). ``kernel_constants``: :func:`native_constants`.
    The forward of the tape's native node (:mod:`learned_optim.rule.native_tape`).

    >>> from learned_optim import MetaLearnerLSTM
    >>> from learned_optim.rule.math import prepare_step, update_rows
    >>> constants = prepare_step(MetaLearnerLSTM().weights(), torch.tensor(1.0), torch.float32)
    >>> columns, grad, theta = torch.zeros(42, 3), torch.ones(3), torch.zeros(3)
    >>> if native_step_kernel() is not None:
    ...     new_theta, new_columns = step_rows_native_out(native_constants(constants),
    ...                                                   constants.p, columns, grad, theta)
    ...     torch.testing.assert_close(new_theta, update_rows(constants, columns.t(), grad,
    ...                                                       theta)[0])
    """
    rows = grad.shape[0]
    hidden = kernel_constants[2].shape[1]
    check_layout(columns.t(), grad, param, rows, hidden)
    new_columns = feature_rows(columns.shape[0], rows)
    new_param = torch.empty_like(param)
    native_step_kernel()(*kernel_constants, columns, new_columns, grad, param, new_param, rows,
                         hidden, columns.stride(0), new_columns.stride(0), kernel_threads(rows),
                         *rule_scalars(p), 1.0, 0.0, *normalisation_args(None, rows))
    return new_param, new_columns
