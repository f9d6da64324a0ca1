"""A conv learner's first block, ``conv 3x3 -> BatchNorm -> ReLU -> max-pool 2``, as two
hand-fused C++ kernels that never write the convolution's output (CPU).

The first block is the learner's most expensive: its convolution's output is the largest
activation (32 channels at full resolution, 10 MB for a 100-image Omniglot support set), and
eagerly it makes a dozen round trips through memory a pass (the convolution, BatchNorm,
ReLU and pooling each way). Profiled on the 2-core Xeon, 20-way 5-shot, that block took
about half of a whole forward and backward pass. Its input, though, is the data: a few input
channels, and no gradient wanted for it. So the convolution is cheap to recompute (9 to 36
products a channel), and:

- the **forward** computes each position's convolution on the fly twice, never storing it:
  once for BatchNorm's variance (the mean needs no pass: it is the convolution of the mean
  input patch, from the input alone), once for each 2 x 2 window's maximum of the normalised
  values and the ReLU, written pooled;
- the **backward** recomputes them once more, and with them every sum the block's parameter
  gradients need (BatchNorm's two per-channel reductions, and the weight gradient as the
  winners' patches weighted by the pooled gradient plus the patches weighted by the centred
  convolution), in one pass; no activation-sized gradient is ever formed.

The results equal ``conv``, ``BatchNorm2d`` (batch statistics), ``ReLU`` and ``MaxPool2d(2)``
run one by one, to float32 rounding: closer to float64 than those, whose float32 BatchNorm
statistics lose digits on a mostly blank image (``tests/test_native_stem.py``).
:class:`ConvFeatures <learned_optim.learners.ConvFeatures>` takes this path where
:func:`stem_fusable` allows: a 3 x 3 convolution of stride 1 and padding 1 on at most
:data:`MAX_INPUT_CHANNELS` channels of a channels-last float32 CPU input that needs no
gradient, then the block :func:`learned_optim.native_block.fusable` accepts; otherwise the
modules run one by one. A backward that is itself differentiated (``create_graph=True``)
recomputes the block eagerly, so higher-order gradients stay exact.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from learned_optim import native_block
from learned_optim.native_block import (
    KERNEL_PRELUDE,
    NO_RUNNING,
    eager_block,
    kernel_threads,
    padded_channels,
)
from learned_optim.rule.native_build import NativeKernel, partial_sums

__all__ = ["MAX_INPUT_CHANNELS", "conv_batchnorm_relu_maxpool", "stem_fusable"]

MAX_INPUT_CHANNELS = 4  # 36 products a channel and position: recomputing stays cheap
_MAX_TAPS = 9 * MAX_INPUT_CHANNELS

_COMMON = KERNEL_PRELUDE + f"static constexpr int64_t kMaxTaps = {_MAX_TAPS};\n" + r"""
// Input rows y0 .. y0 + rows - 1 of image b, zero-padded by one pixel on every side, as
// rows x (w + 2) x ci floats into buf: a patch is then a plain 3 x 3 x ci window of it.
static void padded_rows(const float* x, float* buf, int64_t b, int64_t y0, int64_t rows,
                        int64_t h, int64_t w, int64_t ci) {
    const int64_t width = (w + 2) * ci;
    for (int64_t r = 0; r < rows; ++r) {
        float* out = buf + r * width;
        const int64_t y = y0 + r - 1;
        std::fill(out, out + width, 0.f);
        if (y >= 0 && y < h) std::copy(x + (b * h + y) * w * ci, x + (b * h + y + 1) * w * ci,
                                       out + ci);
    }
}

// The mean 3 x 3 patch of the zero-padded input over all n h w positions, in tap order
// (ky, kx, channel): the whole image's sum, less the row and column that each tap's shift
// moves out of the frame (plus their corner, taken out twice).
static void mean_patches(const float* x, double* mean_patch, int64_t n, int64_t h, int64_t w,
                         int64_t ci) {
    for (int64_t c = 0; c < ci; ++c) {
        double total = 0.0, row[2] = {0.0, 0.0}, col[2] = {0.0, 0.0}, corner[2][2] = {};
        for (int64_t b = 0; b < n; ++b) {
            const float* img = x + b * h * w * ci + c;
            for (int64_t y = 0; y < h; ++y)
                for (int64_t j = 0; j < w; ++j) total += img[(y * w + j) * ci];
            for (int64_t j = 0; j < w; ++j) {
                row[0] += img[j * ci]; row[1] += img[((h - 1) * w + j) * ci];
            }
            for (int64_t y = 0; y < h; ++y) {
                col[0] += img[y * w * ci]; col[1] += img[(y * w + w - 1) * ci];
            }
            for (int q = 0; q < 2; ++q)
                for (int r = 0; r < 2; ++r)
                    corner[q][r] += img[((q ? h - 1 : 0) * w + (r ? w - 1 : 0)) * ci];
        }
        // tap ky = 0 reads rows -1 .. h - 2 (row h - 1 is out), ky = 2 rows 1 .. h (row 0)
        for (int64_t ky = 0; ky < 3; ++ky)
            for (int64_t kx = 0; kx < 3; ++kx) {
                double sum = total;
                const int out_row = ky == 0 ? 1 : ky == 2 ? 0 : -1;
                const int out_col = kx == 0 ? 1 : kx == 2 ? 0 : -1;
                if (out_row >= 0) sum -= row[out_row];
                if (out_col >= 0) sum -= col[out_col];
                if (out_row >= 0 && out_col >= 0) sum += corner[out_row][out_col];
                mean_patch[(ky * 3 + kx) * ci + c] = sum / (double)(n * h * w);
            }
    }
}

// Channel groups (of V channels) that the kernels convolve together: each input value is
// broadcast once for all of them, and their sums are independent chains (a group alone waited
// on the FMA's latency along its 9 ci taps: the forward 1.6-2.3x and the backward 1.1-1.3x
// slower, 2 threads, the AMD EPYC).
static constexpr int kGroups = 4;

// fn(groups, c) for the channels in steps of kGroups groups from c = 0, groups a
// std::integral_constant of how many groups (the last step may take fewer).
template <typename Fn>
static inline void for_channel_groups(int64_t C, Fn&& fn) {
    for (int64_t c = 0; c < C; c += kGroups * V) {
        switch (std::min<int64_t>(kGroups, (C - c + V - 1) / V)) {
            case 4: fn(std::integral_constant<int, 4>(), c); break;
            case 3: fn(std::integral_constant<int, 3>(), c); break;
            case 2: fn(std::integral_constant<int, 2>(), c); break;
            default: fn(std::integral_constant<int, 1>(), c); break;
        }
    }
}

// Channels of group g of those starting at channel c (V, or fewer in the last).
static inline int64_t group_count(int64_t C, int64_t c, int g) {
    return std::max<int64_t>(0, std::min<int64_t>(V, C - c - g * V));
}

// The weights of G groups from channel c, as wv[k G + g] (taps k = (ky, kx, channel) of the
// weight's [K, C] rows).
template <int G>
static inline void load_group_weights(const float* wk, Vec* wv, int64_t K, int64_t C,
                                      int64_t c) {
    for (int64_t k = 0; k < K; ++k)
        for (int g = 0; g < G; ++g) wv[k * G + g] = load(wk + k * C + c + g * V,
                                                          group_count(C, c, g));
}

// The convolution (no bias) of G groups of V channels from channel c at the position whose
// patch starts at column col of row r0 of buf, into d[0 .. G): each channel's taps in order,
// one FMA chain each, so the forward and the backward compute the same values.
template <int G>
static inline void conv_groups(const float* buf, int64_t width, int64_t r0, int64_t col,
                               int64_t ci, const Vec* wv, Vec* d) {
    for (int g = 0; g < G; ++g) d[g] = Vec(0.f);
    int64_t k = 0;
    for (int64_t ky = 0; ky < 3; ++ky) {
        const float* row = buf + (r0 + ky) * width + col * ci;
        for (int64_t t = 0; t < 3 * ci; ++t, ++k) {
            const Vec value(row[t]);
            for (int g = 0; g < G; ++g) d[g] = at::vec::fmadd(value, wv[k * G + g], d[g]);
        }
    }
}
"""

_FORWARD = _COMMON + r"""
// A padded input row's sums of e and e^2 (e = d - center) for G groups from channel c, added
// to part[c ..] and part[Cp + c ..].
template <int G>
static void variance_row(const float* buf, int64_t width, int64_t w, int64_t ci, int64_t K,
                         const float* wk, const float* centre, int64_t C, int64_t c,
                         double* part, int64_t Cp) {
    Vec wv[kMaxTaps * G], m[G], s[G], s2[G];
    load_group_weights<G>(wk, wv, K, C, c);
    for (int g = 0; g < G; ++g) {
        m[g] = Vec::loadu(centre + c + g * V);
        s[g] = s2[g] = Vec(0.f);
    }
    for (int64_t j = 0; j < w; ++j) {
        Vec d[G];
        conv_groups<G>(buf, width, 0, j, ci, wv, d);
        for (int g = 0; g < G; ++g) {
            const Vec e = d[g] - m[g];
            s[g] += e;
            s2[g] = at::vec::fmadd(e, e, s2[g]);
        }
    }
    for (int g = 0; g < G; ++g) {
        alignas(64) float a[V], a2[V];
        s[g].store(a);
        s2[g].store(a2);
        const int64_t at = c + g * V;
        for (int64_t l = 0; l < group_count(C, c, g); ++l) {
            part[at + l] += a[l];
            part[Cp + at + l] += a2[l];
        }
    }
}

// A pooled output row for G groups from channel c: each 2 x 2 window's maximum of
// scale d + shift (its positions in scan order, as the backward recomputes them), then ReLU.
template <int G>
static void pooled_row(const float* buf, int64_t width, int64_t ow, int64_t ci, int64_t K,
                       const float* wk, const float* scale, const float* shift, int64_t C,
                       int64_t c, float* o) {
    Vec wv[kMaxTaps * G], s[G], sh[G];
    load_group_weights<G>(wk, wv, K, C, c);
    for (int g = 0; g < G; ++g) {
        s[g] = Vec::loadu(scale + c + g * V);
        sh[g] = Vec::loadu(shift + c + g * V);
    }
    for (int64_t j = 0; j < ow; ++j) {
        Vec v[G], d[G];
        conv_groups<G>(buf, width, 0, 2 * j, ci, wv, d);
        for (int g = 0; g < G; ++g) v[g] = at::vec::fmadd(d[g], s[g], sh[g]);
        for (int q = 1; q < 4; ++q) {
            conv_groups<G>(buf, width, q / 2, 2 * j + q % 2, ci, wv, d);
            for (int g = 0; g < G; ++g)
                v[g] = at::vec::maximum(v[g], at::vec::fmadd(d[g], s[g], sh[g]));
        }
        for (int g = 0; g < G; ++g)
            store(at::vec::maximum(v[g], Vec(0.f)), o + j * C + c + g * V, group_count(C, c, g));
    }
}

// x: [n, h, w, ci]; wk: [K = 9 ci, C]; bias: [C] (the convolution's, or zeros); gamma,
// beta: [C]. out: [n, h/2, w/2, C]. Written for the backward: mean_patch [K] (doubles),
// center [C] (its convolution, no bias), scale_shift [2, C] (v = scale d + shift, d the
// convolution without bias) and moments [2, C] (the mean and the biased variance of
// d - center). The running mean and variance [C] move towards the batch's by momentum
// unless it is negative. partial: [threads, 2 C padded] doubles of scratch.
extern "C" void kernel(const float* x, const float* wk, const float* bias,
                       const float* gamma, const float* beta, float* out, double* mean_patch,
                       float* center, float* scale_shift, float* moments,
                       float* running_mean, float* running_var, double* partial,
                       const int64_t n, const int64_t h, const int64_t w, const int64_t ci,
                       const int64_t C, const int64_t threads, const float eps,
                       const float momentum)
{
    const int64_t K = 9 * ci, P = n * h * w, oh = h / 2, ow = w / 2, Cp = padded(C);
    const int64_t width = (w + 2) * ci;
    mean_patches(x, mean_patch, n, h, w, ci);
    alignas(64) float centre[kMaxChannels] = {0.f};
    for (int64_t c = 0; c < C; ++c) {
        double d = 0.0;
        for (int64_t k = 0; k < K; ++k) d += mean_patch[k] * (double)wk[k * C + c];
        centre[c] = (float)d; center[c] = centre[c];
    }
    // The variance about center: sum of e and e^2, e = d - center, one image row at a time.
    #pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t rows = n * h, lo = rows * t / T, hi = rows * (t + 1) / T;
        double* part = partial + t * 2 * Cp;
        std::vector<float> buf(3 * width);
        for (int64_t c = 0; c < 2 * Cp; ++c) part[c] = 0.0;
        for (int64_t row = lo; row < hi; ++row) {
            const int64_t b = row / h, y = row % h;
            padded_rows(x, buf.data(), b, y, 3, h, w, ci);
            for_channel_groups(C, [&](auto groups, int64_t c) {
                variance_row<decltype(groups)::value>(buf.data(), width, w, ci, K, wk, centre,
                                                      C, c, part, Cp);
            });
        }
    }
    alignas(64) float scale[kMaxChannels] = {0.f}, shift[kMaxChannels] = {0.f};
    alignas(64) float batch[2 * kMaxChannels];  // the convolution's mean and biased variance
    for (int64_t c = 0; c < C; ++c) {
        double s = 0.0, s2 = 0.0;
        for (int64_t t = 0; t < threads; ++t) {
            s += partial[t * 2 * Cp + c]; s2 += partial[t * 2 * Cp + Cp + c];
        }
        const double mean_e = s / P, var = std::max(s2 / P - mean_e * mean_e, 0.0);
        const float invstd = (float)(1.0 / std::sqrt(var + (double)eps));
        scale[c] = gamma[c] * invstd;
        shift[c] = beta[c] - scale[c] * (float)((double)centre[c] + mean_e);
        scale_shift[c] = scale[c]; scale_shift[C + c] = shift[c];
        moments[c] = (float)mean_e; moments[C + c] = (float)var;
        batch[c] = (float)((double)bias[c] + (double)centre[c] + mean_e);
        batch[C + c] = (float)var;
    }
    if (momentum >= 0.f) update_running(running_mean, running_var, batch, C, P, momentum);
    #pragma omp parallel num_threads(threads)
    {
        std::vector<float> buf(4 * width);
        #pragma omp for schedule(static)
        for (int64_t row = 0; row < n * oh; ++row) {
            const int64_t b = row / oh, i = row % oh;
            padded_rows(x, buf.data(), b, 2 * i, 4, h, w, ci);
            float* o = out + row * ow * C;
            for_channel_groups(C, [&](auto groups, int64_t c) {
                pooled_row<decltype(groups)::value>(buf.data(), width, ow, ci, K, wk, scale,
                                                    shift, C, c, o);
            });
        }
    }
}
"""

_BACKWARD = _COMMON + r"""
// One row pair of the backward (or the odd last image row, `tail`): its padded input, the
// pooled gradient's row, and the shapes.
struct Row {
    const float* buf; int64_t width, w, ow, ci, K; bool tail; const float* dz;
};

// A row pair's sums for G channel groups from channel c, added to part: every position's
// convolution recomputed as the forward computed it (conv_groups), each window's winner, and
// the sums of the kernel below; each input value broadcast once for all G groups.
template <int G>
static void backward_row(const Row& r, const float* wk, const float* centre, const float* scale,
                         const float* shift, int64_t C, int64_t c, double* part, int64_t Cp) {
    const int64_t K = r.K, ci = r.ci, width = r.width;
    Vec wv[kMaxTaps * G], m[G], s[G], sh[G], sum_dy[G], sum_dye[G], sum_e[G];
    load_group_weights<G>(wk, wv, K, C, c);
    alignas(64) float Gf[G][kMaxTaps * V], Hf[G][kMaxTaps * V];
    for (int g = 0; g < G; ++g) {
        m[g] = Vec::loadu(centre + c + g * V);
        s[g] = Vec::loadu(scale + c + g * V);
        sh[g] = Vec::loadu(shift + c + g * V);
        sum_dy[g] = sum_dye[g] = sum_e[g] = Vec(0.f);
        for (int64_t q = 0; q < K * V; ++q) { Gf[g][q] = 0.f; Hf[g][q] = 0.f; }
    }
    // Every position of this row pair not in a window: only its e and patch.
    auto lone = [&](int64_t r0, int64_t col) {
        Vec e[G];
        conv_groups<G>(r.buf, width, r0, col, ci, wv, e);
        for (int g = 0; g < G; ++g) {
            e[g] = e[g] - m[g];
            sum_e[g] += e[g];
        }
        const float* patch = r.buf + r0 * width + col * ci;
        int64_t tap = 0;
        for (int64_t ky = 0; ky < 3; ++ky)
            for (int64_t u = 0; u < 3 * ci; ++u, ++tap) {
                const Vec p(patch[ky * width + u]);
                for (int g = 0; g < G; ++g) {
                    float* hf = Hf[g] + tap * V;
                    at::vec::fmadd(e[g], p, Vec::loadu(hf)).store(hf);
                }
            }
    };
    if (r.tail) {
        for (int64_t j = 0; j < r.w; ++j) lone(0, j);
    } else {
        const Vec all = Vec(0.f) == Vec(0.f);
        for (int64_t j = 0; j < r.ow; ++j) {
            Vec e[4][G], dy[G], win[G][4];
            for (int q = 0; q < 4; ++q)
                conv_groups<G>(r.buf, width, q / 2, 2 * j + q % 2, ci, wv, e[q]);
            for (int g = 0; g < G; ++g) {
                // the forward's v exactly (same products, same order), then e
                Vec take[4];
                Vec v = at::vec::fmadd(e[0][g], s[g], sh[g]);
                for (int q = 1; q < 4; ++q) {
                    const Vec u = at::vec::fmadd(e[q][g], s[g], sh[g]);
                    take[q] = (u > v) | u.isnan();
                    v = select(take[q], u, v);
                }
                for (int q = 0; q < 4; ++q) e[q][g] = e[q][g] - m[g];
                win[g][3] = take[3];
                win[g][2] = take[2] & (take[3] ^ all);
                win[g][1] = take[1] & ((take[2] | take[3]) ^ all);
                win[g][0] = (take[1] | take[2] | take[3]) ^ all;
                const Vec live = (v > Vec(0.f)) | v.isnan();
                dy[g] = select(live, load(r.dz + j * C + c + g * V, group_count(C, c, g)),
                               Vec(0.f));
                Vec e_win = select(win[g][1], e[1][g], e[0][g]);
                e_win = select(win[g][2], e[2][g], e_win);
                e_win = select(win[g][3], e[3][g], e_win);
                sum_dy[g] += dy[g];
                sum_dye[g] = at::vec::fmadd(dy[g], e_win, sum_dye[g]);
                sum_e[g] += e[0][g] + e[1][g] + e[2][g] + e[3][g];
            }
            int64_t tap = 0;
            for (int64_t ky = 0; ky < 3; ++ky) {
                const float* r0 = r.buf + ky * width + 2 * j * ci;
                const float* r1 = r0 + width;
                for (int64_t u = 0; u < 3 * ci; ++u, ++tap) {
                    const Vec p0(r0[u]), p1(r0[u + ci]), p2(r1[u]), p3(r1[u + ci]);
                    for (int g = 0; g < G; ++g) {
                        Vec pw = select(win[g][1], p1, p0);
                        pw = select(win[g][2], p2, pw);
                        pw = select(win[g][3], p3, pw);
                        float* gf = Gf[g] + tap * V;
                        float* hf = Hf[g] + tap * V;
                        at::vec::fmadd(dy[g], pw, Vec::loadu(gf)).store(gf);
                        Vec hv = at::vec::fmadd(e[0][g], p0, Vec::loadu(hf));
                        hv = at::vec::fmadd(e[1][g], p1, hv);
                        hv = at::vec::fmadd(e[2][g], p2, hv);
                        at::vec::fmadd(e[3][g], p3, hv).store(hf);
                    }
                }
            }
        }
        if (r.w % 2) { lone(0, r.w - 1); lone(1, r.w - 1); }
    }
    for (int g = 0; g < G; ++g) {
        alignas(64) float a[3][V];
        sum_dy[g].store(a[0]); sum_dye[g].store(a[1]); sum_e[g].store(a[2]);
        const int64_t at = c + g * V;
        for (int64_t l = 0; l < group_count(C, c, g); ++l) {
            part[at + l] += a[0][l]; part[Cp + at + l] += a[1][l];
            part[2 * Cp + at + l] += a[2][l];
            for (int64_t tap = 0; tap < K; ++tap) {
                part[(3 + tap) * Cp + at + l] += Gf[g][tap * V + l];
                part[(3 + K + tap) * Cp + at + l] += Hf[g][tap * V + l];
            }
        }
    }
}


// The block's parameter gradients from one pass of sums over all positions p (e_p = d_p -
// center) and the windows' winners w (dy = the pooled gradient where the pooled value
// passed the ReLU): sum dy, sum dy e_w, sum e_p, G[k] = sum dy patch_w[k] and H[k] = sum
// e_p patch_p[k], per thread in sums [threads, (3 + 2 K) C padded] doubles of scratch.
// Written: d_taps [K, C] (the weight's, in tap order) and d_params [3, C] (the conv bias,
// gamma, beta). center, scale_shift, moments, mean_patch: as the forward wrote them.
extern "C" void kernel(const float* x, const float* wk, const float* center,
                       const float* scale_shift, const float* moments,
                       const double* mean_patch, const float* gamma, const float* dz,
                       float* d_taps, float* d_params, double* sums,
                       const int64_t n, const int64_t h, const int64_t w, const int64_t ci,
                       const int64_t C, const int64_t threads, const float eps)
{
    const int64_t K = 9 * ci, oh = h / 2, ow = w / 2, Cp = padded(C);
    const int64_t width = (w + 2) * ci, rows_per_image = oh + (h % 2);
    const int64_t stride = (3 + 2 * K) * Cp;
    alignas(64) float centre[kMaxChannels] = {0.f}, scale[kMaxChannels] = {0.f};
    alignas(64) float shift[kMaxChannels] = {0.f};
    for (int64_t c = 0; c < C; ++c) {
        centre[c] = center[c]; scale[c] = scale_shift[c]; shift[c] = scale_shift[C + c];
    }
    #pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t rows = n * rows_per_image, lo = rows * t / T, hi = rows * (t + 1) / T;
        double* part = sums + t * stride;
        std::vector<float> buf(4 * width);
        for (int64_t c = 0; c < stride; ++c) part[c] = 0.0;
        for (int64_t row = lo; row < hi; ++row) {
            const int64_t b = row / rows_per_image, i = row % rows_per_image;
            const bool tail = i == oh;  // the odd last image row: in no window
            padded_rows(x, buf.data(), b, 2 * i, tail ? 3 : 4, h, w, ci);
            const Row r{buf.data(), width, w, ow, ci, K, tail, dz + (b * oh + i) * ow * C};
            for_channel_groups(C, [&](auto groups, int64_t c) {
                backward_row<decltype(groups)::value>(r, wk, centre, scale, shift, C, c, part, Cp);
            });
        }
    }
    // BatchNorm's input gradient, dx = k1 dy - k2 - (conv - mean) k3, never formed: only its
    // sums against the patches (the weight) and over the positions (the conv bias).
    const double P = (double)(n * h * w);
    for (int64_t c = 0; c < C; ++c) {
        auto total = [&](int64_t slot) {
            double v = 0.0;
            for (int64_t t = 0; t < threads; ++t) v += sums[t * stride + slot * Cp + c];
            return v;
        };
        const double sum_dy = total(0), mean_e = moments[c];
        const double invstd = 1.0 / std::sqrt((double)moments[C + c] + (double)eps);
        const double sum_dy_x = total(1) - mean_e * sum_dy;  // sum dy (conv - mean)
        const double k1 = (double)gamma[c] * invstd, k2 = k1 * sum_dy / P;
        const double k3 = k1 * invstd * invstd * sum_dy_x / P;
        for (int64_t tap = 0; tap < K; ++tap) {
            const double patch_sum = mean_patch[tap] * P;
            d_taps[tap * C + c] = (float)(k1 * total(3 + tap) - k2 * patch_sum
                                          - k3 * (total(3 + K + tap) - mean_e * patch_sum));
        }
        d_params[c] = (float)(k1 * sum_dy - k2 * P - k3 * (total(2) - mean_e * P));
        d_params[C + c] = (float)(sum_dy_x * invstd);
        d_params[2 * C + c] = (float)sum_dy;
    }
}
"""


def _probe_forward(kernel) -> None:
    """A 2 x 2 one-channel image, a centre tap of 1 and a unit BatchNorm: the pooled value is
    the normalised maximum (4 - 2.5) / sqrt(1.25); each tap's mean is over the image shifted
    out of its zero-padded frame."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weights = torch.zeros(9, 1)
    weights[4] = 1.0
    out, center, scale_shift, moments = (torch.empty(1), torch.empty(1), torch.empty(2),
                                         torch.empty(2))
    mean_patch = torch.empty(9, dtype=torch.float64)
    kernel(x, weights, torch.zeros(1), torch.ones(1), torch.zeros(1), out, mean_patch, center,
           scale_shift, moments, NO_RUNNING, NO_RUNNING,
           partial_sums(1, 2 * padded_channels(1)), 1, 2, 2, 1, 1, 1, 0.0, -1.0)
    if not (abs(float(out) - 1.5 / 1.25 ** 0.5) < 1e-5 and float(center) == 2.5
            and moments.tolist() == [0.0, 1.25]
            and mean_patch.tolist() == [0.25, 0.75, 0.5, 1.0, 2.5, 1.5, 0.75, 1.75, 1.0]):
        raise RuntimeError(f"the fused first-block forward computed {out.tolist()}, "
                           f"{center.tolist()}, {moments.tolist()} on its probe")


def _probe_backward(kernel) -> None:
    """The same image, unit pooled gradient: beta's gradient 1, gamma's the winner's
    normalised value."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weights = torch.zeros(9, 1)
    weights[4] = 1.0
    scale = 1.25 ** -0.5
    mean_patch = torch.tensor([0.25, 0.75, 0.5, 1.0, 2.5, 1.5, 0.75, 1.75, 1.0],
                              dtype=torch.float64)
    d_taps, d_params = torch.empty(9), torch.empty(3)
    kernel(x, weights, torch.tensor([2.5]), torch.tensor([scale, -2.5 * scale]),
           torch.tensor([0.0, 1.25]), mean_patch, torch.ones(1), torch.ones(1), d_taps, d_params,
           partial_sums(1, (3 + 18) * padded_channels(1)), 1, 2, 2, 1, 1, 1, 0.0)
    if not (float(d_params[2]) == 1.0 and abs(float(d_params[1]) - 1.5 * scale) < 1e-5):
        raise RuntimeError(f"the fused first-block backward computed {d_params.tolist()} on "
                           "its probe")


_SHAPE_ARGS = ["const int64_t"] * 6  # n, h, w, input channels, channels, threads
_forward_kernel = NativeKernel(
    "the fused first-block forward kernel",
    ["const float*"] * 5 + ["float*", "double*"] + ["float*"] * 5 + ["double*"] + _SHAPE_ARGS
    + ["const float"] * 2, _FORWARD, _probe_forward, "first conv blocks run their eager modules")
_backward_kernel = NativeKernel(
    "the fused first-block backward kernel",
    ["const float*"] * 5 + ["const double*"] + ["const float*"] * 2 + ["float*"] * 2
    + ["double*"] + _SHAPE_ARGS + ["const float"], _BACKWARD, _probe_backward,
    "first conv blocks run their eager modules")


def _taps(weight: Tensor) -> Tensor:
    """``[C, ci, 3, 3]`` -> ``[9 ci, C]``, rows in the kernels' tap order (ky, kx, channel)."""
    channels, inputs = weight.shape[:2]
    return weight.permute(2, 3, 1, 0).reshape(9 * inputs, channels)


def _eager_stem(x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor,
                eps: float) -> Tensor:
    """The same block from torch's operators (batch statistics, no running statistics)."""
    return eager_block(nn.functional.conv2d(x, weight, bias, padding=1), gamma, beta, eps)


class _ConvBatchNormReLUPool(torch.autograd.Function):
    """The fused first block as one autograd node. The running statistics (``running``:
    mean, variance and momentum from :func:`learned_optim.native_block.running_update`) are
    updated in the forward. The input gets no gradient (:func:`stem_fusable` requires that it
    needs none)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor,
                beta: Tensor, eps: float, running: tuple):
        n, inputs, height, width = x.shape
        channels = weight.shape[0]
        threads = kernel_threads(n * height * width * channels)
        taps = _taps(weight.detach()).contiguous()
        out = torch.empty((n, channels, height // 2, width // 2), dtype=torch.float32,
                          memory_format=torch.channels_last)
        mean_patch = torch.empty(9 * inputs, dtype=torch.float64)
        center, scale_shift, moments = (torch.empty(channels, dtype=torch.float32),
                                        torch.empty(2, channels, dtype=torch.float32),
                                        torch.empty(2, channels, dtype=torch.float32))
        conv_bias = (bias.detach() if bias is not None
                     else torch.zeros(channels, dtype=torch.float32))
        partial = partial_sums(threads, 2 * padded_channels(channels))
        _forward_kernel()(x.detach(), taps, conv_bias, gamma.detach().contiguous(),
                          beta.detach().contiguous(), out, mean_patch, center, scale_shift,
                          moments, *running[:2], partial, n, height, width, inputs, channels,
                          threads, eps, running[2])
        ctx.eps, ctx.has_bias = eps, bias is not None
        ctx.save_for_backward(x, weight, bias, gamma, beta, taps, mean_patch, center,
                              scale_shift, moments)
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        (x, weight, bias, gamma, beta, taps, mean_patch, center, scale_shift,
         moments) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the eager block, which autograd records
            def block(weight, bias, gamma, beta):
                return _eager_stem(x, weight, bias, gamma, beta, ctx.eps)

            _, pull_back = torch.func.vjp(block, weight, bias, gamma, beta)
            return (None, *pull_back(d_out), None, None)
        n, inputs, height, width = x.shape
        channels = weight.shape[0]
        threads = kernel_threads(n * height * width * channels)
        d_taps = torch.empty(9 * inputs, channels, dtype=torch.float32)
        d_params = torch.empty(3, channels, dtype=torch.float32)
        sums = partial_sums(threads, (3 + 18 * inputs) * padded_channels(channels))
        _backward_kernel()(x.detach(), taps, center, scale_shift, moments, mean_patch,
                           gamma.detach().contiguous(),
                           d_out.contiguous(memory_format=torch.channels_last), d_taps,
                           d_params, sums, n, height, width, inputs, channels, threads, ctx.eps)
        d_weight = d_taps.view(3, 3, inputs, channels).permute(3, 2, 0, 1).contiguous()
        return (None, d_weight, d_params[0] if ctx.has_bias else None, d_params[1],
                d_params[2], None, None)


def _is_3x3_same_conv(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (3, 3)
            and tuple(conv.stride) == (1, 1) and conv.padding in ((1, 1), "same")
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def stem_fusable(x: Tensor, conv: nn.Module, batchnorm: nn.Module, relu: nn.Module,
                 pool: nn.Module) -> bool:
    """Whether ``pool(relu(batchnorm(conv(x))))`` may run as
    :func:`conv_batchnorm_relu_maxpool`.

    True for a bias-optional 3 x 3 ``Conv2d`` of stride 1 and padding 1 from at most
    :data:`MAX_INPUT_CHANNELS` channels, followed by a block that
    :func:`learned_optim.native_block.fusable` accepts, on ``x`` a channels-last float32 CPU
    batch that needs no gradient (the data), where the kernels build.

    >>> block = (nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
    >>> stem_fusable(torch.zeros(2, 1, 6, 6), *block)  # NCHW: the eager modules
    False
    """
    if not (_is_3x3_same_conv(conv) and conv.in_channels <= MAX_INPUT_CHANNELS):
        return False
    if (x.requires_grad or x.dim() != 4 or x.shape[1] != conv.in_channels
            or x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(1) != 1
            or not x.is_contiguous(memory_format=torch.channels_last)
            or conv.weight.dtype != torch.float32
            or torch._C._functorch.is_functorch_wrapped_tensor(conv.weight)):
        return False
    return (native_block.modules_fusable(batchnorm, relu, pool)
            and batchnorm.num_features == conv.out_channels
            and native_block.poolable_shape(conv.out_channels, *x.shape[2:])
            and _forward_kernel() is not None and _backward_kernel() is not None)


def conv_batchnorm_relu_maxpool(x: Tensor, conv: nn.Conv2d,
                                batchnorm: nn.BatchNorm2d) -> Tensor:
    """``max_pool2d(relu(batchnorm(conv(x))), 2)`` through the fused kernels, for modules and
    ``x`` that :func:`stem_fusable` accepts; ``batchnorm``'s running statistics and batch count
    are updated as its own forward updates them.

    >>> conv, bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
    >>> x = torch.rand(4, 1, 6, 6).to(memory_format=torch.channels_last)
    >>> eager = nn.functional.max_pool2d(torch.relu(bn(conv(x))), 2)
    >>> if stem_fusable(x, conv, bn, nn.ReLU(), nn.MaxPool2d(2)):
    ...     torch.testing.assert_close(conv_batchnorm_relu_maxpool(x, conv, bn), eager)
    """
    return _ConvBatchNormReLUPool.apply(x, conv.weight, conv.bias, batchnorm.weight,
                                        batchnorm.bias, batchnorm.eps,
                                        native_block.running_update(batchnorm))
