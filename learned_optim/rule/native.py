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
           "bucket_table", "check_bucket", "feature_rows", "kernel_threads", "native_constants",
           "native_step_kernel", "normalisation_args", "rule_scalars", "step_bucket_native",
           "step_rows_native", "step_rows_native_out"]

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

// One step of the rule for each of `tensors` parameters, one entry of `table` each: rows n,
// then the addresses of its feature-major state [h1 | c1 | f_pre | i_pre] x n in and out
// (features `stride_in` and `stride_out` floats apart), its gradient, theta in and out, and
// its gradient moments [m | v] x n (read when `normalise`, with its four numbers in
// `numbers`: the lerp weights of m and v, m's scale and v's bias correction). theta becomes
// sigmoid(f_pre) theta - sigmoid(i_pre) g, then lr and decoupled decay. In place where the
// addresses are the same: a tile reads all its inputs before it writes.
static constexpr int64_t kEntry = 7;

extern "C" void kernel(const float* weight, const float* bias, const float* meta_h,
                       const float* meta_small, const int64_t* table, const float* numbers,
                       const int64_t tensors, const int64_t hidden, const int64_t stride_in,
                       const int64_t stride_out, const int64_t threads, const float p,
                       const float threshold, const float exp_p, const float lr,
                       const float decay, const int64_t normalise)
{
    const Rule r{weight, bias, meta_h, meta_small, hidden, p, threshold, exp_p};
    const int64_t H = hidden;
    // The parameters' tiles numbered one after another: one loop shares them all between the
    // threads, however small each parameter (a model of many small tensors used one thread
    // a call, and paid a call each).
    std::vector<int64_t> first_tile(tensors + 1, 0);
    for (int64_t j = 0; j < tensors; ++j)
        first_tile[j + 1] = first_tile[j] + (table[j * kEntry] + V - 1) / V;
    const int64_t tiles = first_tile[tensors];
    #pragma omp parallel num_threads(threads)
    {
        Tile t;
        // Tiles handed out 64 at a time, not split in halves up front: with another process
        // on one of 2 cores, a static half waited a time slice for its thread (55,050 rows,
        // the EPYC: 15.9 against 12.1 ms; idle 7.0 against 6.7; 16 at a time: 13.3 and 6.7).
        // Tiles write disjoint rows and sum nothing: the result is the same whoever takes them.
        #pragma omp for schedule(dynamic, 64)
        for (int64_t tile = 0; tile < tiles; ++tile) {
            const int64_t j = std::upper_bound(first_tile.begin(), first_tile.end(), tile)
                              - first_tile.begin() - 1;
            const int64_t* entry = table + j * kEntry;
            const int64_t n = entry[0], start = (tile - first_tile[j]) * V;
            const int64_t m = std::min(V, n - start);
            const float* state_in = reinterpret_cast<const float*>(entry[1]);
            float* state_out = reinterpret_cast<float*>(entry[2]);
            const float* grad = reinterpret_cast<const float*>(entry[3]);
            const float* theta_in = reinterpret_cast<const float*>(entry[4]);
            float* theta_out = reinterpret_cast<float*>(entry[5]);
            load_tile(r, t, state_in, stride_in, grad, theta_in, start, m);
            if (normalise) {  // the rule reads the normalised gradient (scale_gradient's)
                const float* w = numbers + 4 * j;
                float* mean_at = reinterpret_cast<float*>(entry[6]) + start;
                float* square_at = mean_at + n;
                const Vec mean = lerp(load(mean_at, m), t.g, w[0]);
                const Vec square = lerp(load(square_at, m), t.g * t.g, w[1]);
                const Vec rms = (square / Vec(w[3])).sqrt();
                t.g = mean * Vec(w[2]) / (rms + Vec(1e-12f));
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

_ARGTYPES = (["const float*"] * 4 + ["const int64_t*", "const float*"] + ["const int64_t"] * 5
             + ["const float"] * 5 + ["const int64_t"])


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
    """Run the kernel once on two parameters of a few rows (raises if the build is unusable)."""
    state, grad = torch.zeros(4, 5), torch.ones(5)  # hidden size 1
    thetas = torch.zeros(3), torch.zeros(2)
    table = torch.tensor([[rows, state.data_ptr() + 4 * first, state.data_ptr() + 4 * first,
                           grad.data_ptr(), theta.data_ptr(), theta.data_ptr(), 0]
                          for first, rows, theta in ((0, 3, thetas[0]), (3, 2, thetas[1]))])
    kernel(torch.zeros(4, 3), torch.zeros(4), torch.zeros(2, 1), torch.zeros(6), table,
           torch.zeros(2, 4), 2, 1, 5, 5, 1, 10.0, math.exp(-10.0), math.exp(10.0), 1.0, 0.0, 0)
    if not torch.equal(torch.cat(thetas), torch.full((5,), -0.5)):  # sigmoid(0) (0 - 1)
        raise RuntimeError(f"the native step kernel computed {torch.cat(thetas).tolist()} on "
                           "its probe")


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
    ``gradient_scale``; without one, ``grad`` as it is). :func:`step_bucket_native` steps
    several parameters in one call.

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
    check_layout(state, grad, param, rows, constants.meta_weight_h.shape[0])
    _step_checked(constants, state, [grad], [param], [rows], lr, weight_decay, kernel_constants,
                  [normalisation])


def step_bucket_native(constants: StepConstants, buffer: Tensor, grads: list[Tensor | None],
                       params: list[Tensor], lr: float = 1.0, weight_decay: float = 0.0, *,
                       kernel_constants: tuple | None = None,
                       normalisations: list[Normalisation | None] | None = None) -> None:
    """:func:`step_rows_native` for several parameters in one kernel call: ``params`` (each
    ``[n_j]``, contiguous) whose state rows lie one after another in ``buffer`` (feature-major
    ``[sum n_j, 2H + 2]``, as the optimizer keeps a bucket's), their ``grads`` (a parameter
    whose gradient is ``None`` is not stepped) and, for a rule with ``gradient_scale``, their
    ``normalisations``. The threads share all the parameters' coordinates: a model of many
    small tensors pays one call, not one each, and uses every thread.

    >>> from learned_optim import MetaLearnerLSTM
    >>> from learned_optim.rule.math import initial_state, prepare_step, update_rows
    >>> constants = prepare_step(MetaLearnerLSTM().weights(), None, torch.float32)
    >>> buffer = initial_state(5, 20, feature_major=True)
    >>> params, grads = [torch.zeros(3), torch.ones(2)], [torch.ones(3), torch.ones(2)]
    >>> expected, _ = update_rows(constants, buffer, torch.ones(5), torch.cat(params))
    >>> if native_step_kernel() is not None:
    ...     step_bucket_native(constants, buffer, grads, params)
    ...     torch.testing.assert_close(torch.cat(params), expected)
    """
    rows = check_bucket(buffer, grads, params, constants.meta_weight_h.shape[0])
    _step_checked(constants, buffer, grads, params, rows, lr, weight_decay, kernel_constants,
                  normalisations)


def _step_checked(constants: StepConstants, buffer: Tensor, grads: list[Tensor | None],
                  params: list[Tensor], rows: list[int], lr: float, weight_decay: float,
                  kernel_constants: tuple | None,
                  normalisations: list[Normalisation | None] | None) -> None:
    """The kernel call of :func:`step_bucket_native` on inputs its caller has checked."""
    hidden = constants.meta_weight_h.shape[0]
    table, numbers, normalise = bucket_table(buffer, grads, params, rows, normalisations)
    if not table:
        return
    if kernel_constants is None:
        kernel_constants = native_constants(constants)
    stride = buffer.stride(1)
    in_place = [(n, state, state, grad, theta, theta, moments)
                for n, state, grad, theta, moments in table]
    native_step_kernel()(*kernel_constants, torch.tensor(in_place), torch.tensor(numbers),
                         len(table), hidden, stride, stride,
                         kernel_threads(sum(entry[0] for entry in table)),
                         *rule_scalars(constants.p), float(lr),
                         float(lr) * float(weight_decay), int(normalise))


def check_bucket(buffer: Tensor, grads: list[Tensor | None], params: list[Tensor], hidden: int,
                 *, device: str = "cpu", kernel: str = "the native step kernel") -> list[int]:
    """:func:`check_layout` for a bucket (``kernel`` on ``device`` names the one checked
    for): each parameter and gradient, then the state buffer once. Returns the parameters'
    lengths."""
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"{kernel} takes hidden sizes up to {MAX_HIDDEN}, got {hidden}")
    rows = [param.shape[0] if param.dim() == 1 else -1 for param in params]
    where = "CPU" if device == "cpu" else device
    for index, (grad, param, n) in enumerate(zip(grads, params, rows)):
        for name, tensor in (("param", param), ("grad", grad)):
            if tensor is not None and (tensor.dtype != torch.float32
                                       or tensor.device.type != device
                                       or tensor.shape != (n,) or not tensor.is_contiguous()):
                raise ValueError(f"{kernel} takes contiguous 1-D float32 {where} tensors: "
                                 f"{name} {index} is {tensor.dtype} of shape "
                                 f"{tuple(tensor.shape)} on {tensor.device}"
                                 + ("" if tensor.is_contiguous() else ", not contiguous"))
    total = sum(rows)
    if (buffer.dtype != torch.float32 or buffer.device.type != device
            or buffer.shape != (total, 2 * hidden + 2) or (total > 1 and buffer.stride(0) != 1)):
        raise ValueError(f"the state buffer must be a feature-major float32 {where} "
                         f"[{total}, {2 * hidden + 2}] view for parameters of {rows} rows, got "
                         f"{buffer.dtype} of shape {tuple(buffer.shape)}, strides "
                         f"{buffer.stride()} on {buffer.device}")
    return rows


def bucket_table(buffer: Tensor, grads: list[Tensor | None], params: list[Tensor],
                 rows: list[int], normalisations: list[Normalisation | None] | None,
                 device: str = "cpu", kernel: str = "the native step kernel"
                 ) -> tuple[list[tuple[int, ...]], list[list[float]], bool]:
    """The step kernels' description of a bucket: for each parameter stepped (a gradient,
    at least one row) its rows and the addresses of its state rows in ``buffer``, gradient,
    values and moments; the four numbers of its normalisation; and whether they normalise."""
    normalisations = normalisations or [None] * len(params)
    normalise = any(n is not None for n in normalisations)
    table, numbers, offset = [], [], 0
    address = buffer.data_ptr()
    for grad, param, normalised, n in zip(grads, params, normalisations, rows):
        if grad is not None and n:
            if normalise != (normalised is not None):
                raise ValueError("normalisations must be given for every parameter stepped "
                                 "or for none")
            moments, _, *weights = normalisation_args(normalised, n, device, kernel)
            table.append((n, address + 4 * offset, grad.data_ptr(), param.data_ptr(),
                          moments.data_ptr() if normalise else 0))
            numbers.append(weights)
        offset += n
    return table, numbers, normalise


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
    if rows:
        table = torch.tensor([(rows, columns.data_ptr(), new_columns.data_ptr(),
                               grad.data_ptr(), param.data_ptr(), new_param.data_ptr(), 0)])
        native_step_kernel()(*kernel_constants, table, _NO_NUMBERS, 1, hidden,
                             columns.stride(0), new_columns.stride(0), kernel_threads(rows),
                             *rule_scalars(p), 1.0, 0.0, 0)
    return new_param, new_columns


_NO_NUMBERS = torch.zeros(1, 4)
