"""The meta-training tape's step as one node of hand-fused C++ kernels on the CPU.

The forward is the step kernel of :mod:`learned_optim.rule.native`, out of place. The
backward is one more kernel over the same tiles of 16 coordinates (8 with AVX2): it recomputes
a tile's gates from the step's inputs with the shared tile forward
(:data:`~learned_optim.rule.native.RULE_TILE_SOURCE`), then pulls the output gradients back
through the meta-gates, the cell and the gate sigmoids in registers and L1, and through
layer 1 by broadcast FMAs. What leaves a tile: the gradients of the state, theta and the
gradient input. The rule's weight gradients are sums in the kernel (16 tiles at a time,
each sum in a register through them, so the gates' gradient, 320 bytes a coordinate, never
goes to memory), in double, one row per block of coordinates (:func:`block_rows`), added in
block order: the blocks go to whichever thread is free, and the sums do not depend on the
threads. The node saves only its inputs, like :mod:`learned_optim.rule.compiled`'s, and
serves first and second order alike; a gradient *of* its backward (``create_graph=True``
through the update) takes the eager ``torch.func.vjp`` of ``update_rows``, which autograd
records.

:func:`learned_optim.rule.policy.tape_path` gives it float32 steps on a CPU where the kernels
build (else the compiled node, else the eager paths).
"""

from __future__ import annotations

import torch
from torch import Tensor

from learned_optim.rule.compiled import feature_major_step_vjp
from learned_optim.rule.math import StepConstants
from learned_optim.rule.native import (
    MAX_HIDDEN,
    RULE_TILE_SOURCE,
    feature_rows,
    kernel_threads,
    native_constants,
    native_step_kernel,
    rule_scalars,
    step_rows_native_out,
)
from learned_optim.rule.native_build import NativeKernel, partial_sums

__all__ = ["BACKWARD_KERNEL", "block_rows", "native_tape_applies", "node_backward",
           "node_forward", "partial_width", "step_rows_backward_native", "unit_rows",
           "update_rows_native"]

_BACKWARD_SOURCE = RULE_TILE_SOURCE + r"""

// Tiles stashed between two passes of the parameter gradients' sums. Each sum stays in a
// register through a pass: added to memory tile by tile (the bias's 80 rows, meta_h's 40),
// they made the whole backward 1.16x slower (2 threads, the AMD EPYC, 28,485 rows).
static constexpr int64_t kStash = 16;

// dw[(j K + k) V + l] += sum over `tiles` stashed tiles s of
// d_a[(s G + j) V + l] x[(s K + k) V + l], for gates j .. j + 4 and inputs k .. k + KB: the
// 4 x KB accumulators stay in registers while the tiles stream through L1.
template <int KB>
static inline void weight_block(const float* d_a, const float* x, int64_t tiles, int64_t G,
                                int64_t K, int64_t j, int64_t k, float* dw) {
    Vec acc[4][KB];
    for (int jj = 0; jj < 4; ++jj)
        for (int kk = 0; kk < KB; ++kk) acc[jj][kk] = Vec(0.f);
    for (int64_t s = 0; s < tiles; ++s) {
        const float* a = d_a + (s * G + j) * V;
        const float* xs = x + (s * K + k) * V;
        const Vec a0 = Vec::loadu(a), a1 = Vec::loadu(a + V), a2 = Vec::loadu(a + 2 * V),
                  a3 = Vec::loadu(a + 3 * V);
        for (int kk = 0; kk < KB; ++kk) {
            const Vec xk = Vec::loadu(xs + kk * V);
            acc[0][kk] = at::vec::fmadd(a0, xk, acc[0][kk]);
            acc[1][kk] = at::vec::fmadd(a1, xk, acc[1][kk]);
            acc[2][kk] = at::vec::fmadd(a2, xk, acc[2][kk]);
            acc[3][kk] = at::vec::fmadd(a3, xk, acc[3][kk]);
        }
    }
    for (int jj = 0; jj < 4; ++jj)
        for (int kk = 0; kk < KB; ++kk) {
            float* d = dw + ((j + jj) * K + k + kk) * V;
            (Vec::loadu(d) + acc[jj][kk]).store(d);
        }
}

// Inputs a weight block takes: its 4 x kInputBlock accumulators, 4 gradients and one input
// fit AVX-512's 32 registers at 4 and AVX2's 16 at 2 (at 4 they spilled: 10% slower).
static constexpr int kInputBlock = V >= 16 ? 4 : 2;

// db[j V + l] += sum over `tiles` stashed tiles s of d_a[(s G + j) V + l], gates j .. j + 4.
static inline void bias_block(const float* d_a, int64_t tiles, int64_t G, int64_t j,
                              float* db) {
    Vec acc[4];
    for (int q = 0; q < 4; ++q) acc[q] = Vec(0.f);
    for (int64_t s = 0; s < tiles; ++s)
        for (int q = 0; q < 4; ++q) acc[q] = acc[q] + Vec::loadu(d_a + (s * G + j + q) * V);
    for (int q = 0; q < 4; ++q) {
        float* d = db + (j + q) * V;
        (Vec::loadu(d) + acc[q]).store(d);
    }
}

// Layer 1's weight and bias gradients' share of `tiles` stashed tiles (G is a multiple of 4).
// Out of line, as meta_gradient: inlined into the kernel's loop, they ran short of registers
// and kept the tile counter in memory (the backward 1.03x slower).
__attribute__((noinline)) static void gate_gradient(const float* d_a, const float* x,
                                                    int64_t tiles, int64_t G, int64_t K,
                                                    float* dw, float* db) {
    for (int64_t j = 0; j < G; j += 4) {
        bias_block(d_a, tiles, G, j, db);
        int64_t k = 0;
        for (; k + kInputBlock <= K; k += kInputBlock)
            weight_block<kInputBlock>(d_a, x, tiles, G, K, j, k, dw);
        switch (K - k) {
            case 3: weight_block<3>(d_a, x, tiles, G, K, j, k, dw); break;
            case 2: weight_block<2>(d_a, x, tiles, G, K, j, k, dw); break;
            case 1: weight_block<1>(d_a, x, tiles, G, K, j, k, dw); break;
            default: break;
        }
    }
}

// Rows a stashed tile keeps for the meta-gates' gradients: d_f_pre, d_i_pre, theta, f_prev,
// i_prev, then h1 (H rows).
static constexpr int64_t kMetaRows = 5;

// The meta-gates' gradients' share of `tiles` stashed tiles `m` ([tiles, kMetaRows + H, V]):
// meta_h's [2, H] and meta_small's six (theta's, the previous value's and the bias's weight
// of f_pre and of i_pre).
__attribute__((noinline)) static void meta_gradient(const float* m, int64_t tiles, int64_t H,
                                                    float* meta_h_sums, float* small_sums) {
    const int64_t R = kMetaRows + H;
    Vec small[6];
    for (int q = 0; q < 6; ++q) small[q] = Vec(0.f);
    for (int64_t s = 0; s < tiles; ++s) {
        const float* row = m + s * R * V;
        const Vec d_f = Vec::loadu(row), d_i = Vec::loadu(row + V);
        const Vec theta = Vec::loadu(row + 2 * V);
        small[0] = at::vec::fmadd(d_f, theta, small[0]);
        small[1] = at::vec::fmadd(d_i, theta, small[1]);
        small[2] = at::vec::fmadd(d_f, Vec::loadu(row + 3 * V), small[2]);
        small[3] = at::vec::fmadd(d_i, Vec::loadu(row + 4 * V), small[3]);
        small[4] = small[4] + d_f;
        small[5] = small[5] + d_i;
    }
    for (int q = 0; q < 6; ++q)
        (Vec::loadu(small_sums + q * V) + small[q]).store(small_sums + q * V);
    for (int64_t h = 0; h < H; h += 4) {
        const int64_t count = std::min<int64_t>(4, H - h);
        Vec f[4], i[4];
        for (int q = 0; q < 4; ++q) f[q] = i[q] = Vec(0.f);
        for (int64_t s = 0; s < tiles; ++s) {
            const float* row = m + s * R * V;
            const Vec d_f = Vec::loadu(row), d_i = Vec::loadu(row + V);
            for (int q = 0; q < 4; ++q) {
                if (q < count) {
                    const Vec h1 = Vec::loadu(row + (kMetaRows + h + q) * V);
                    f[q] = at::vec::fmadd(d_f, h1, f[q]);
                    i[q] = at::vec::fmadd(d_i, h1, i[q]);
                }
            }
        }
        for (int q = 0; q < count; ++q) {
            float* at_f = meta_h_sums + (h + q) * V;
            float* at_i = meta_h_sums + (H + h + q) * V;
            (Vec::loadu(at_f) + f[q]).store(at_f);
            (Vec::loadu(at_i) + i[q]).store(at_i);
        }
    }
}

// Inputs whose gradient (weight^T d_a) one pass over a tile's d_a rows sums: as many
// independent accumulators, each row loaded once and each weight broadcast once (pairs of
// inputs over four interleaved sums took 1.1x as long in the whole backward on the EPYC).
static constexpr int kInputGradientBlock = 11;

// Layer 1's input gradient for inputs k .. k + KB of one tile; out(k, value) takes each.
template <int KB, typename Out>
static inline void input_gradient_block(const float* weight, const float* d_a, int64_t G,
                                        int64_t K, int64_t k, Out&& out) {
    Vec acc[KB];
    for (int kk = 0; kk < KB; ++kk) acc[kk] = Vec(0.f);
    for (int64_t j = 0; j < G; ++j) {
        const Vec d = Vec::loadu(d_a + j * V);
        const float* w = weight + j * K + k;
        for (int kk = 0; kk < KB; ++kk) acc[kk] = at::vec::fmadd(Vec(w[kk]), d, acc[kk]);
    }
    for (int kk = 0; kk < KB; ++kk) out(k + kk, acc[kk]);
}

template <typename Out>
static inline void input_gradient(const float* weight, const float* d_a, int64_t G, int64_t K,
                                  Out&& out) {
    int64_t k = 0;
    for (; k + kInputGradientBlock <= K; k += kInputGradientBlock)
        input_gradient_block<kInputGradientBlock>(weight, d_a, G, K, k, out);
    switch (K - k) {
        case 10: input_gradient_block<10>(weight, d_a, G, K, k, out); break;
        case 9: input_gradient_block<9>(weight, d_a, G, K, k, out); break;
        case 8: input_gradient_block<8>(weight, d_a, G, K, k, out); break;
        case 7: input_gradient_block<7>(weight, d_a, G, K, k, out); break;
        case 6: input_gradient_block<6>(weight, d_a, G, K, k, out); break;
        case 5: input_gradient_block<5>(weight, d_a, G, K, k, out); break;
        case 4: input_gradient_block<4>(weight, d_a, G, K, k, out); break;
        case 3: input_gradient_block<3>(weight, d_a, G, K, k, out); break;
        case 2: input_gradient_block<2>(weight, d_a, G, K, k, out); break;
        case 1: input_gradient_block<1>(weight, d_a, G, K, k, out); break;
        default: break;
    }
}

// Gradients of one step (the forward kernel's) for n coordinates, given those of its outputs:
// d_theta [n] and d_state, feature-major (`d_stride`). The step's inputs: state (`stride`),
// grad, theta. Written: d_state_in (feature-major, `d_in_stride`), d_theta_in, d_grad and, per
// block of `block_rows` coordinates (a multiple of 64), the block's sums
// [blocks, 4H + 2H + 6 + 4H (2 + H)] of the gradients of bias, meta_h, meta_small and weight.
// Blocks go to threads as they free up (a static half waited a time slice for a thread whose
// core another process held); the caller adds the rows in block order, so the sums are the
// same whichever thread ran each block, and for any number of threads.
extern "C" void kernel(const float* weight, const float* bias, const float* meta_h,
                       const float* meta_small, const float* state, const float* grad,
                       const float* theta, const float* d_theta, const float* d_state,
                       float* d_state_in, float* d_theta_in, float* d_grad, double* partials,
                       const int64_t n, const int64_t hidden, const int64_t stride,
                       const int64_t d_stride, const int64_t d_in_stride,
                       const int64_t threads, const int64_t block_rows, const float p,
                       const float threshold, const float exp_p)
{
    const Rule r{weight, bias, meta_h, meta_small, hidden, p, threshold, exp_p};
    const int64_t H = hidden, G = 4 * H, K = 2 + H, P = G + 2 * H + 6 + G * K;
    const int64_t tiles = (n + V - 1) / V, block_tiles = block_rows / V;
    const int64_t blocks = (tiles + block_tiles - 1) / block_tiles;
    const float* ms = meta_small;
    const Vec one(1.f), two(2.f);
    #pragma omp parallel num_threads(threads)
    {
        Tile t;
        // Of kStash tiles, for the parameter gradients' sums: the gate pre-activations'
        // gradient and layer 1's input (never written out: 320 bytes a coordinate at H = 20),
        // and the meta-gates' rows (meta_gradient).
        std::vector<float> stash_a(kStash * G * V), stash_x(kStash * K * V);
        std::vector<float> stash_m(kStash * (kMetaRows + H) * V);
        int64_t stashed = 0;
        // Per lane: [bias | meta_h | meta_small | weight], summed in float over kFlush tiles
        // at most, then, lanes added, into double (28,485 rows on one thread would otherwise
        // lose 1e-6). Double per lane too took 1.06x as long (three times the memory).
        std::vector<float> sums(P * V, 0.f);
        std::vector<double> totals(P, 0.0);
        int64_t pending = 0;
        float* meta_h_sums = sums.data() + G * V;
        float* small_sums = sums.data() + (G + 2 * H) * V;
        float* weight_sums = sums.data() + (G + 2 * H + 6) * V;
        auto sum_stash = [&]() {
            gate_gradient(stash_a.data(), stash_x.data(), stashed, G, K, weight_sums,
                          sums.data());
            meta_gradient(stash_m.data(), stashed, H, meta_h_sums, small_sums);
            stashed = 0;
        };
        auto flush = [&]() {
            for (int64_t f = 0; f < P; ++f) {
                double lanes = 0.0;
                for (int64_t l = 0; l < V; ++l) {
                    lanes += sums[f * V + l];
                    sums[f * V + l] = 0.f;
                }
                totals[f] += lanes;
            }
            pending = 0;
        };
        #pragma omp for schedule(dynamic, 1)
        for (int64_t block = 0; block < blocks; ++block) {
            const int64_t last = std::min(tiles, (block + 1) * block_tiles);
            for (int64_t tile = block * block_tiles; tile < last; ++tile) {
                const int64_t start = tile * V, m = std::min(V, n - start);
                load_tile(r, t, state, stride, grad, theta, start, m);
                forward_tile(r, t);
                float* d_a = stash_a.data() + stashed * G * V;
                std::copy(t.x, t.x + K * V, stash_x.data() + stashed * K * V);
                // theta_t = F theta - I g, F = sigmoid(f_pre), I = sigmoid(i_pre).
                const Vec F = sigmoid(t.f_pre), I = sigmoid(t.i_pre);
                const Vec dt = load(d_theta + start, m);
                const Vec d_f_pre = load(d_state + 2 * H * d_stride + start, m)
                                    + dt * t.theta * F * (one - F);
                const Vec d_i_pre = load(d_state + (2 * H + 1) * d_stride + start, m)
                                    - dt * t.g * I * (one - I);
                store(dt * F + d_f_pre * Vec(ms[0]) + d_i_pre * Vec(ms[1]), d_theta_in + start, m);
                store(d_f_pre * Vec(ms[2]), d_state_in + 2 * H * d_in_stride + start, m);
                store(d_i_pre * Vec(ms[3]), d_state_in + (2 * H + 1) * d_in_stride + start, m);
                float* meta_rows = stash_m.data() + stashed * (kMetaRows + H) * V;
                d_f_pre.store(meta_rows);
                d_i_pre.store(meta_rows + V);
                t.theta.store(meta_rows + 2 * V);
                t.f_prev.store(meta_rows + 3 * V);
                t.i_prev.store(meta_rows + 4 * V);
                std::copy(t.h1, t.h1 + H * V, meta_rows + kMetaRows * V);
                // The cell: h1 = o tanh(c), c = f c_prev + i (2 s_g - 1).
                for (int64_t h = 0; h < H; ++h) {
                    const Vec tanh_c = Vec::loadu(t.tanh_c + h * V);
                    const Vec in_gate = Vec::loadu(t.gates + h * V);
                    const Vec forget_gate = Vec::loadu(t.gates + (H + h) * V);
                    const Vec out_gate = Vec::loadu(t.gates + (2 * H + h) * V);
                    const Vec sigmoid_g = Vec::loadu(t.gates + (3 * H + h) * V);
                    const Vec d_h1 = load(d_state + h * d_stride + start, m)
                                     + Vec(meta_h[h]) * d_f_pre + Vec(meta_h[H + h]) * d_i_pre;
                    const Vec d_c = load(d_state + (H + h) * d_stride + start, m)
                                    + d_h1 * out_gate * (one - tanh_c * tanh_c);
                    const Vec cell_gate = sigmoid_g * two - one;
                    (d_c * cell_gate * in_gate * (one - in_gate)).store(d_a + h * V);
                    (d_c * Vec::loadu(t.c_prev + h * V) * forget_gate * (one - forget_gate))
                        .store(d_a + (H + h) * V);
                    (d_h1 * tanh_c * out_gate * (one - out_gate)).store(d_a + (2 * H + h) * V);
                    (d_c * in_gate * two * sigmoid_g * (one - sigmoid_g))
                        .store(d_a + (3 * H + h) * V);
                    store(d_c * forget_gate, d_state_in + (H + h) * d_in_stride + start, m);
                }
                // Layer 1's input gradient: h1 before, and the gradient features.
                Vec d_log(0.f), d_sign(0.f);
                input_gradient(weight, d_a, G, K, [&](int64_t k, Vec d_x) {
                    if (k >= 2) store(d_x, d_state_in + (k - 2) * d_in_stride + start, m);
                    else if (k == 0) d_log = d_x;
                    else d_sign = d_x;
                });
                // Through the preprocessing: (log|g|/p)' = 1/(p g), sign' = 0 when large; else
                // the features are (-1, e^p g), with derivatives (0, e^p).
                const Vec safe = Vec::blendv(one, t.g, t.large);
                const Vec d_features = Vec::blendv(d_sign * Vec(exp_p), d_log / (Vec(p) * safe),
                                                   t.large);
                store(d_features - dt * I, d_grad + start, m);
                // Lanes past n hold zero gradients: they add nothing to the sums.
                if (++stashed == kStash) sum_stash();
                if (++pending == kFlush) flush();
            }
            if (stashed) sum_stash();
            flush();
            double* row = partials + block * P;
            for (int64_t f = 0; f < P; ++f) {
                row[f] = totals[f];
                totals[f] = 0.0;
            }
        }
    }
}
"""

_ARGTYPES = (["const float*"] * 9 + ["float*"] * 3 + ["double*"] + ["const int64_t"] * 7
             + ["const float"] * 3)


def _probe(kernel) -> None:
    """Run the kernel once on a few rows (raises if the build is unusable): at zero weights,
    theta_t = theta / 2 - g / 2, so d theta_t / d theta = 1/2 and d / d g = -1/2."""
    rows, hidden = 3, 1
    zeros = torch.zeros
    d_state_in, d_theta_in, d_grad = zeros(4, rows), zeros(rows), zeros(rows)
    kernel(zeros(4, 3), zeros(4), zeros(2, 1), zeros(6), zeros(4, rows), torch.ones(rows),
           zeros(rows), torch.ones(rows), zeros(4, rows), d_state_in, d_theta_in, d_grad,
           partial_sums(1, partial_width(hidden)), rows, hidden, rows, rows, rows, 1,
           block_rows(rows), *rule_scalars(10.0))
    if not (torch.equal(d_theta_in, torch.full((rows,), 0.5))
            and torch.equal(d_grad, torch.full((rows,), -0.5))):
        raise RuntimeError(f"the native rule backward kernel computed {d_theta_in.tolist()}, "
                           f"{d_grad.tolist()} on its probe")


BACKWARD_KERNEL = NativeKernel("the native rule backward kernel", _ARGTYPES, _BACKWARD_SOURCE,
                               _probe, "the tape takes the compiled or eager steps")


# The backward's blocks of coordinates (see its kernel): at least this many rows, and at most
# MAX_BLOCKS a call, so that their rows of sums stay small (64 x 1,886 doubles at H = 20).
MIN_BLOCK_ROWS, MAX_BLOCKS = 1024, 64


def block_rows(rows: int) -> int:
    """Coordinates of one block of the backward kernel for ``rows`` rows: a multiple of 64
    (whole vectors of any width), chosen by the size alone so that the sums do not depend on
    the threads.

    >>> block_rows(28_485), block_rows(262_144)
    (1024, 4096)
    """
    per_block = -(-rows // MAX_BLOCKS)
    return max(MIN_BLOCK_ROWS, -(-per_block // 64) * 64)


def partial_width(hidden: int) -> int:
    """Floats of the backward's sums of one block: the gradients of the gate bias (4H), meta_h
    (2H), meta_small (6) and the gate weight (4H (2 + H))."""
    return 4 * hidden + 2 * hidden + 6 + 4 * hidden * (2 + hidden)


def unit_rows(columns: Tensor) -> Tensor:
    """``columns`` (``[features, n]``) as the kernels read it, each feature contiguous (any
    distance between features, so :func:`~learned_optim.rule.native.feature_rows`' padded
    outputs pass as they are); a copy only where a feature is not contiguous.

    >>> from learned_optim.rule.native import feature_rows
    >>> padded = feature_rows(4, 3)
    >>> unit_rows(padded) is padded, unit_rows(torch.zeros(3, 4).t()).is_contiguous()
    (True, True)
    """
    if columns.dim() == 2 and (columns.stride(1) == 1 or columns.shape[1] == 1):
        return columns
    return columns.contiguous()


def native_tape_applies(grad: Tensor, hidden: int) -> bool:
    """Whether a tape step on ``grad``'s rows may take the native node: float32 on the CPU,
    hidden size within the kernels' bound, and both kernels built (each warns once if not).

    >>> native_tape_applies(torch.ones(3, dtype=torch.float64), 20)
    False
    """
    return (grad.dtype == torch.float32 and grad.device.type == "cpu" and hidden <= MAX_HIDDEN
            and native_step_kernel() is not None and BACKWARD_KERNEL() is not None)


def step_rows_backward_native(kernel_constants: tuple, p: float, columns: Tensor, grad: Tensor,
                              param: Tensor, d_param: Tensor, d_columns: Tensor
                              ) -> tuple[Tensor, ...]:
    """Gradients of :func:`~learned_optim.rule.native.step_rows_native_out`, without autograd.

    ``kernel_constants`` and the step's inputs as for the forward; ``d_param`` (``[n]``) and
    ``d_columns`` (``[2H + 2, n]``) the gradients of its outputs. Returns the gradients of
    ``input_weight`` (``[2 + H, 4H]``), ``gate_bias``, ``meta_weight_h`` (``[H, 2]``),
    ``meta_weight_theta``, ``meta_weight_prev``, ``meta_bias``, then of ``columns``, ``grad``
    and ``param``: the order of :class:`~learned_optim.rule.math.StepConstants` and the inputs.
    """
    rows = grad.shape[0]
    hidden = kernel_constants[2].shape[1]
    gates, inputs = 4 * hidden, 2 + hidden
    d_param, d_columns = d_param.contiguous(), unit_rows(d_columns)
    d_state_in = feature_rows(2 * hidden + 2, rows)
    d_theta_in, d_grad = torch.empty_like(param), torch.empty_like(grad)
    block = block_rows(rows)
    partials = partial_sums(-(-rows // block), partial_width(hidden))  # a row a block
    BACKWARD_KERNEL()(*kernel_constants, columns, grad, param, d_param, d_columns, d_state_in,
                      d_theta_in, d_grad, partials, rows, hidden, columns.stride(0),
                      d_columns.stride(0), d_state_in.stride(0), kernel_threads(rows), block,
                      *rule_scalars(p))
    sums = partials.sum(0).float()
    d_bias, d_meta_h, d_small, d_weight = sums.split((gates, 2 * hidden, 6, gates * inputs))
    return (d_weight.view(gates, inputs).t(), d_bias, d_meta_h.view(2, hidden).t(),
            d_small[0:2], d_small[2:4], d_small[4:6], d_state_in, d_grad, d_theta_in)


def node_forward(ctx, step_out, p: float, columns: Tensor, grad: Tensor, param: Tensor,
                 constant_tensors) -> tuple[Tensor, Tensor]:
    """The forward of a tape node made of a pair of kernels (this module's, or the Triton ones
    of :mod:`learned_optim.rule.triton_tape`): saves the inputs alone and runs ``step_out``
    (``step_rows_native_out``'s signature) out of place."""
    ctx.p = p
    ctx.save_for_backward(*constant_tensors, columns, grad, param)
    # the constants as the kernels read them, kept for the backward (a few kB)
    ctx.laid_out = native_constants(StepConstants(*constant_tensors, p=p))
    return step_out(ctx.laid_out, p, columns.detach(), grad.detach(), param.detach())


def node_backward(ctx, step_backward, d_param: Tensor, d_columns: Tensor) -> tuple:
    """The backward of such a node: ``step_backward`` (``step_rows_backward_native``'s
    signature), or the eager vjp where the gradient itself is recorded."""
    inputs = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the eager vjp, which autograd records
        grads = feature_major_step_vjp(ctx.p, d_param, d_columns, *inputs)
    else:
        columns, grad, param = (t.detach() for t in inputs[-3:])
        grads = step_backward(ctx.laid_out, ctx.p, columns, grad, param, d_param, d_columns)
    *constant_grads, d_columns_in, d_grad, d_param_in = grads
    return (None, d_columns_in, d_grad, d_param_in, *constant_grads)


class _NativeStep(torch.autograd.Function):
    """One step as one node: native forward, native recomputing backward."""

    @staticmethod
    def forward(ctx, p: float, columns, grad, param, *constant_tensors):
        return node_forward(ctx, step_rows_native_out, p, columns, grad, param,
                            constant_tensors)

    @staticmethod
    def backward(ctx, d_param, d_columns):
        return node_backward(ctx, step_rows_backward_native, d_param, d_columns)


def update_rows_native(constants: StepConstants, state: Tensor, grad: Tensor, param: Tensor
                       ) -> tuple[Tensor, Tensor]:
    """:func:`~learned_optim.rule.math.update_rows` on the tape, as one native node.

    First or second order, as :func:`~learned_optim.rule.compiled.update_rows_compiled`:
    returns ``(theta_t, state_t)``, ``state_t`` a ``[n, 2H + 2]`` transposed view of a
    feature-major tensor. The caller checks :func:`native_tape_applies`.

    >>> from learned_optim import MetaLearnerLSTM
    >>> from learned_optim.rule.math import initial_state, prepare_step
    >>> constants = prepare_step(MetaLearnerLSTM().weights(), torch.tensor(1.0), torch.float32)
    >>> grad = torch.ones(3)
    >>> if native_tape_applies(grad, 20):
    ...     theta, state = update_rows_native(constants, initial_state(3, 20), grad,
    ...                                       torch.zeros(3, requires_grad=True))
    ...     assert theta.grad_fn.name() == "_NativeStepBackward"
    """
    columns = unit_rows(state.t())  # free when ``state`` is a previous step's output
    new_param, new_columns = _NativeStep.apply(constants.p, columns, grad.contiguous(),
                                               param.contiguous(), *constants[:-1])
    return new_param, new_columns.t()
