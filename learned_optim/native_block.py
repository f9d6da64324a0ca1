"""A conv block's BatchNorm, ReLU and 2 x 2 max-pooling as hand-fused C++ kernels (CPU).

The paper's learner repeats ``conv -> BatchNorm (batch statistics) -> ReLU -> max-pool 2``.
Eagerly, everything after the convolution is six memory-bound kernels a pass (BatchNorm's
statistics and transform, ReLU, pooling, and in the backward pooling's zero fill and scatter,
ReLU's mask and BatchNorm's two reductions and transform), each a round trip through the
block's largest activation; profiled on the 2-core Xeon (20-way 5-shot support set, 100
images, 32 filters, 28 x 28, channels-last), they took about two thirds of a forward and
backward pass, the convolutions one third. Here they are two kernels, one each way, over
channels-last (NHWC) float32 activations, vectorised across channels:

- **forward**: the per-channel mean and variance (two passes, float sums of 64 rows joined in
  double), the running statistics updated in place, then each 2 x 2 window's maximum of
  ``scale * x + shift`` and the ReLU, written pooled. Nothing but the block's input is kept
  for the backward, not ReLU's output or pooling's indices.
- **backward**: recomputes each window's winner (the first maximum in scan order, as eager
  pooling picks it, NaN winning) and whether it passed the ReLU, sums BatchNorm's two
  per-channel reductions, then writes the input gradient of every position (positions
  outside every window, an odd last row or column, get only BatchNorm's share).

The results equal the eager modules' to float32 rounding, and are closer to float64 than
theirs where float32 BatchNorm statistics lose digits (``tests/test_native_block.py``).
:class:`ConvFeatures <learned_optim.learners.ConvFeatures>` takes this path for a block whose
BatchNorm uses batch statistics (training mode, the paper's inner loop and meta-training) on
channels-last float32 CPU activations, and the eager modules otherwise: in evaluation mode, on
a GPU, in NCHW (second-order meta-training runs its learner so), with forward hooks on the
block, under ``torch.compile`` or ``torch.func`` transforms, or where the kernels cannot be
built (warned once; ``LEARNED_OPTIM_COMPILE=0`` skips them). A backward that is itself
differentiated (``create_graph=True``) recomputes the block eagerly, so higher-order gradients
stay exact.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from learned_optim.rule.native_build import (
    VEC_PRELUDE,
    NativeKernel,
    native_allowed,
    partial_sums,
)

__all__ = ["FUSED_BLOCKS", "KERNEL_PRELUDE", "MAX_CHANNELS", "NO_RUNNING", "batchnorm_relu_maxpool",
           "eager_block", "fusable", "is_2x2_pool", "kernel_threads", "modules_fusable",
           "nchw_differentiable", "padded_channels", "poolable_shape", "running_update"]

# Read at call time, so a test or a user may switch the fused path off.
FUSED_BLOCKS = native_allowed()
MAX_CHANNELS = 1024  # the kernels' per-channel buffers live on the stack
# Below this many activation values one thread: waking a second costs more than it saves
# (the threshold of PyTorch's own elementwise kernels).
_PARALLEL_MIN_VALUES = 32768
_LANES = 16  # the widest at::vec float vector (AVX-512); per-channel sums are padded to it

# The start of every conv-block kernel's source (this module's and native_stem's): at::vec
# helpers, the channel bound, and BatchNorm's running-statistics update.
KERNEL_PRELUDE = VEC_PRELUDE + f"static constexpr int64_t kMaxChannels = {MAX_CHANNELS};\n" + r"""
// As BatchNorm's training forward: running = (1 - m) running + m batch, the variance
// unbiased. stats: [2, C] (mean, biased variance) of P values a channel.
static void update_running(float* running_mean, float* running_var, const float* stats,
                           int64_t C, int64_t P, float momentum) {
    const float unbias = (float)((double)P / (double)(P - 1));
    for (int64_t c = 0; c < C; ++c) {
        running_mean[c] = (1.f - momentum) * running_mean[c] + momentum * stats[c];
        running_var[c] = (1.f - momentum) * running_var[c] + momentum * stats[C + c] * unbias;
    }
}
"""

_FORWARD = KERNEL_PRELUDE + r"""
// x: [n, h, w, C] (channels-last). out: [n, h/2, w/2, C]. scale_shift: [2, C] and stats:
// [2, C] (mean, biased variance) are written for the backward. The running mean and
// variance [C] move towards the batch's by momentum unless it is negative. partial:
// [threads, C padded] doubles of scratch.
extern "C" void kernel(const float* x, const float* weight, const float* bias, float* out,
                       float* scale_shift, float* stats, float* running_mean,
                       float* running_var, double* partial,
                       const int64_t n, const int64_t h, const int64_t w, const int64_t C,
                       const int64_t threads, const float eps, const float momentum)
{
    const int64_t P = n * h * w, oh = h / 2, ow = w / 2, Cp = padded(C);
    std::vector<double> mean(Cp, 0.0), var(Cp, 0.0);
    alignas(64) float mean_f[kMaxChannels] = {0.f};
    // Two passes (the sum, then the squared deviations from the mean), each split into one
    // contiguous range of positions a thread, joined in a fixed order: deterministic.
    for (int pass = 0; pass < 2; ++pass) {
        #pragma omp parallel num_threads(threads)
        {
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
            const int64_t lo = P * t / T, hi = P * (t + 1) / T;
            double* part = partial + t * Cp;
            alignas(64) float acc[kMaxChannels];
            for (int64_t c = 0; c < Cp; ++c) part[c] = 0.0;
            for (int64_t r0 = lo; r0 < hi; r0 += kFlush) {
                const int64_t r1 = std::min(hi, r0 + kFlush);
                for (int64_t c = 0; c < C; c += V) {
                    const int64_t k = std::min(V, C - c);
                    Vec a(0.f);
                    if (pass == 0) {
                        for (int64_t r = r0; r < r1; ++r) a += load(x + r * C + c, k);
                    } else {
                        const Vec m = Vec::loadu(mean_f + c);
                        for (int64_t r = r0; r < r1; ++r) {
                            const Vec d = load(x + r * C + c, k) - m;
                            a = at::vec::fmadd(d, d, a);
                        }
                    }
                    a.store(acc + c);
                }
                for (int64_t c = 0; c < C; ++c) part[c] += acc[c];
            }
        }
        for (int64_t c = 0; c < C; ++c) {
            double s = 0.0;
            for (int64_t t = 0; t < threads; ++t) s += partial[t * Cp + c];
            if (pass == 0) { mean[c] = s / P; mean_f[c] = (float)mean[c]; } else var[c] = s / P;
        }
    }
    alignas(64) float scale[kMaxChannels] = {0.f}, shift[kMaxChannels] = {0.f};
    for (int64_t c = 0; c < C; ++c) {
        const float invstd = (float)(1.0 / std::sqrt(var[c] + (double)eps));
        scale[c] = weight[c] * invstd;
        shift[c] = bias[c] - mean_f[c] * scale[c];
        scale_shift[c] = scale[c]; scale_shift[C + c] = shift[c];
        stats[c] = mean_f[c]; stats[C + c] = (float)var[c];
    }
    if (momentum >= 0.f) update_running(running_mean, running_var, stats, C, P, momentum);
    // relu(max) = max(relu): the ReLU once a window; maximum() propagates NaN, as pooling does
    const Vec zero(0.f);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < n * oh; ++row) {
        const int64_t b = row / oh, i = row % oh;
        const float* top = x + ((b * h + 2 * i) * w) * C;
        const float* bottom = top + w * C;
        float* o = out + row * ow * C;
        for (int64_t j = 0; j < ow; ++j) {
            const float* p0 = top + 2 * j * C; const float* p2 = bottom + 2 * j * C;
            for (int64_t c = 0; c < C; c += V) {
                const int64_t k = std::min(V, C - c);
                const Vec s = Vec::loadu(scale + c), t = Vec::loadu(shift + c);
                Vec v = at::vec::fmadd(load(p0 + c, k), s, t);
                v = at::vec::maximum(v, at::vec::fmadd(load(p0 + C + c, k), s, t));
                v = at::vec::maximum(v, at::vec::fmadd(load(p2 + c, k), s, t));
                v = at::vec::maximum(v, at::vec::fmadd(load(p2 + C + c, k), s, t));
                store(at::vec::maximum(v, zero), o + j * C + c, k);
            }
        }
    }
}
"""

_BACKWARD = KERNEL_PRELUDE + r"""
// One window of V channels: its four inputs, which of them eager max-pooling routes the
// gradient to (the first maximum in scan order, NaN winning) as four lane masks, and whether
// the pooled value passed the ReLU (else no gradient flows at all).
struct Window { Vec x[4]; Vec win[4]; Vec live; };

static inline Window window(const float* p0, const float* p1, const float* p2,
                            const float* p3, Vec s, Vec t, int64_t k) {
    Window r;
    r.x[0] = load(p0, k); r.x[1] = load(p1, k); r.x[2] = load(p2, k); r.x[3] = load(p3, k);
    Vec v = at::vec::fmadd(r.x[0], s, t);
    Vec take[4];
    for (int q = 1; q < 4; ++q) {
        const Vec u = at::vec::fmadd(r.x[q], s, t);
        take[q] = (u > v) | u.isnan();
        v = select(take[q], u, v);
    }
    const Vec all = Vec(0.f) == Vec(0.f);
    r.win[3] = take[3];
    r.win[2] = take[2] & (take[3] ^ all);
    r.win[1] = take[1] & ((take[2] | take[3]) ^ all);
    r.win[0] = (take[1] | take[2] | take[3]) ^ all;
    r.live = (v > Vec(0.f)) | v.isnan();
    return r;
}

// x: [n, h, w, C]; dz: [n, h/2, w/2, C]; scale_shift, stats: as the forward wrote them.
// dx: [n, h, w, C] and dparams: [2, C] (weight, bias) are written. partial: [threads, 2 x C
// padded] doubles of scratch.
extern "C" void kernel(const float* x, const float* dz, const float* scale_shift,
                       const float* stats, const float* weight, float* dx, float* dparams,
                       double* partial, const int64_t n, const int64_t h, const int64_t w,
                       const int64_t C, const int64_t threads, const float eps)
{
    const int64_t P = n * h * w, oh = h / 2, ow = w / 2, Cp = padded(C);
    alignas(64) float scale[kMaxChannels] = {0.f}, shift[kMaxChannels] = {0.f};
    alignas(64) float mean[kMaxChannels] = {0.f};
    for (int64_t c = 0; c < C; ++c) {
        scale[c] = scale_shift[c]; shift[c] = scale_shift[C + c]; mean[c] = stats[c];
    }
    // BatchNorm's reductions: sum(dy) and sum(dy (x - mean)), dy nonzero only at the winners.
    #pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t rows = n * oh, lo = rows * t / T, hi = rows * (t + 1) / T;
        double* part = partial + t * 2 * Cp;
        alignas(64) float acc[2 * kMaxChannels];
        for (int64_t c = 0; c < 2 * Cp; ++c) part[c] = 0.0;
        for (int64_t row = lo; row < hi; ++row) {
            const int64_t b = row / oh, i = row % oh;
            const float* top = x + ((b * h + 2 * i) * w) * C;
            const float* bottom = top + w * C;
            const float* g = dz + row * ow * C;
            for (int64_t c = 0; c < C; c += V) {
                const int64_t k = std::min(V, C - c);
                const Vec s = Vec::loadu(scale + c), sh = Vec::loadu(shift + c);
                const Vec m = Vec::loadu(mean + c);
                Vec sum_dy(0.f), sum_dyx(0.f);
                for (int64_t j = 0; j < ow; ++j) {
                    const float* p0 = top + 2 * j * C + c; const float* p2 = bottom + 2 * j * C + c;
                    const Window win = window(p0, p0 + C, p2, p2 + C, s, sh, k);
                    Vec winner = select(win.win[1], win.x[1], win.x[0]);
                    winner = select(win.win[2], win.x[2], winner);
                    winner = select(win.win[3], win.x[3], winner);
                    const Vec dy = select(win.live, load(g + j * C + c, k), Vec(0.f));
                    sum_dy += dy;
                    sum_dyx = at::vec::fmadd(dy, winner - m, sum_dyx);
                }
                sum_dy.store(acc + c); sum_dyx.store(acc + Cp + c);
            }
            for (int64_t c = 0; c < C; ++c) { part[c] += acc[c]; part[Cp + c] += acc[Cp + c]; }
        }
    }
    // dx = weight invstd (dy - sum(dy) / P - (x - mean) invstd^2 sum(dy (x - mean)) / P)
    alignas(64) float k1[kMaxChannels] = {0.f}, k2[kMaxChannels] = {0.f};
    alignas(64) float k3[kMaxChannels] = {0.f};
    for (int64_t c = 0; c < C; ++c) {
        double sum_dy = 0.0, sum_dyx = 0.0;
        for (int64_t t = 0; t < threads; ++t) {
            sum_dy += partial[t * 2 * Cp + c]; sum_dyx += partial[t * 2 * Cp + Cp + c];
        }
        const double invstd = 1.0 / std::sqrt((double)stats[C + c] + (double)eps);
        dparams[c] = (float)(sum_dyx * invstd);
        dparams[C + c] = (float)sum_dy;
        k1[c] = (float)(weight[c] * invstd);
        k2[c] = (float)(weight[c] * invstd * sum_dy / P);
        k3[c] = (float)(weight[c] * invstd * invstd * invstd * sum_dyx / P);
    }
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t row = 0; row < n * oh; ++row) {
            const int64_t b = row / oh, i = row % oh;
            const int64_t offset = ((b * h + 2 * i) * w) * C;
            const float* top = x + offset; const float* bottom = top + w * C;
            float* dtop = dx + offset; float* dbottom = dtop + w * C;
            const float* g = dz + row * ow * C;
            for (int64_t c = 0; c < C; c += V) {
                const int64_t k = std::min(V, C - c);
                const Vec s = Vec::loadu(scale + c), sh = Vec::loadu(shift + c);
                const Vec m = Vec::loadu(mean + c), K1 = Vec::loadu(k1 + c);
                const Vec K2 = Vec::loadu(k2 + c), K3 = Vec::loadu(k3 + c);
                for (int64_t j = 0; j < ow; ++j) {
                    const int64_t o0 = 2 * j * C + c, o1 = o0 + C;
                    const Window win = window(top + o0, top + o1, bottom + o0, bottom + o1,
                                              s, sh, k);
                    const Vec g_live = select(win.live, load(g + j * C + c, k), Vec(0.f));
                    float* d[4] = {dtop + o0, dtop + o1, dbottom + o0, dbottom + o1};
                    for (int q = 0; q < 4; ++q) {
                        const Vec dy = select(win.win[q], g_live, Vec(0.f));
                        store(K1 * dy - K2 - (win.x[q] - m) * K3, d[q], k);
                    }
                }
                if (w % 2) {  // an odd last column is in no window
                    for (int64_t q = 0; q < 2; ++q) {
                        const int64_t o = q * w * C + (w - 1) * C + c;
                        store(Vec(0.f) - K2 - (load(top + o, k) - m) * K3, dtop + o, k);
                    }
                }
            }
        }
        if (h % 2) {  // an odd last row of each image is in no window
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < n; ++b) {
                const int64_t o = ((b * h + h - 1) * w) * C;
                for (int64_t j = 0; j < w; ++j) {
                    for (int64_t c = 0; c < C; c += V) {
                        const int64_t k = std::min(V, C - c);
                        const Vec m = Vec::loadu(mean + c);
                        const Vec K2 = Vec::loadu(k2 + c), K3 = Vec::loadu(k3 + c);
                        const int64_t at = o + j * C + c;
                        store(Vec(0.f) - K2 - (load(x + at, k) - m) * K3, dx + at, k);
                    }
                }
            }
        }
    }
}
"""


def padded_channels(channels: int) -> int:
    """``channels`` rounded up to whole vectors of the widest ISA: a kernel's per-thread sums
    are laid out so (``padded`` in :data:`KERNEL_PRELUDE` never exceeds it)."""
    return -(-channels // _LANES) * _LANES


def _probe_forward(kernel) -> None:
    """One 2 x 2 image of one channel: mean 2.5, the window's maximum 4 normalised."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    out, scale_shift, stats = torch.empty(1), torch.empty(2), torch.empty(2)
    kernel(x, torch.ones(1), torch.zeros(1), out, scale_shift, stats, NO_RUNNING, NO_RUNNING,
           partial_sums(1, padded_channels(1)), 1, 2, 2, 1, 1, 0.0, -1.0)
    expected = 1.5 / 1.25 ** 0.5
    if not (abs(float(out) - expected) < 1e-5 and stats.tolist() == [2.5, 1.25]):
        raise RuntimeError(f"the fused conv-block forward computed {out.tolist()}, "
                           f"{stats.tolist()} on its probe")


def _probe_backward(kernel) -> None:
    """The same image, unit gradient: the bias gets it all, the input sums to zero."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    dx, dparams = torch.empty(4), torch.empty(2)
    kernel(x, torch.ones(1), torch.tensor([1.25 ** -0.5, -2.5 * 1.25 ** -0.5]),
           torch.tensor([2.5, 1.25]), torch.ones(1), dx, dparams,
           partial_sums(1, 2 * padded_channels(1)), 1, 2, 2, 1, 1, 0.0)
    if not (float(dparams[1]) == 1.0 and abs(float(dx.sum())) < 1e-5):
        raise RuntimeError(f"the fused conv-block backward computed {dx.tolist()}, "
                           f"{dparams.tolist()} on its probe")


_SHAPE_ARGS = ["const int64_t"] * 5 + ["const float"]  # n, h, w, C, threads, eps
_forward_kernel = NativeKernel(
    "the fused conv-block forward kernel",
    ["const float*"] * 3 + ["float*"] * 5 + ["double*"] + _SHAPE_ARGS + ["const float"],
    _FORWARD,
    _probe_forward, "conv blocks run their eager modules")
_backward_kernel = NativeKernel(
    "the fused conv-block backward kernel",
    ["const float*"] * 5 + ["float*"] * 2 + ["double*"] + _SHAPE_ARGS, _BACKWARD,
    _probe_backward, "conv blocks run their eager modules")


def _kernels_built() -> bool:
    return _forward_kernel() is not None and _backward_kernel() is not None


def kernel_threads(values: int) -> int:
    """The threads a kernel over an activation of ``values`` floats runs on: torch's, or one
    below 32,768 values."""
    return torch.get_num_threads() if values >= _PARALLEL_MIN_VALUES else 1


def eager_block(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """The same block from torch's operators (batch statistics, no running statistics)."""
    normalised = nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    return nn.functional.max_pool2d(nn.functional.relu(normalised), 2)


class _BatchNormReLUPool(torch.autograd.Function):
    """The fused block as one autograd node. The running statistics (``running``: mean,
    variance and momentum from :func:`running_update`) are updated in the forward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, running: tuple):
        n, channels, height, width = x.shape
        threads = kernel_threads(x.numel())
        out = torch.empty((n, channels, height // 2, width // 2), dtype=x.dtype,
                          memory_format=torch.channels_last)
        scale_shift = torch.empty(2, channels, dtype=torch.float32)
        stats = torch.empty(2, channels, dtype=torch.float32)
        partial = partial_sums(threads, padded_channels(channels))
        _forward_kernel()(x.detach(), weight.detach().contiguous(), bias.detach().contiguous(),
                          out, scale_shift, stats, *running[:2], partial, n, height, width,
                          channels, threads, eps, running[2])
        ctx.eps = eps
        ctx.save_for_backward(x, weight, bias, scale_shift, stats)
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        x, weight, bias, scale_shift, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the eager block, which autograd records
            _, pull_back = torch.func.vjp(lambda *a: eager_block(*a, ctx.eps), x, weight, bias)
            return (*pull_back(d_out), None, None)
        n, channels, height, width = x.shape
        threads = kernel_threads(x.numel())
        d_out = d_out.contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        d_params = torch.empty(2, channels, dtype=torch.float32)
        partial = partial_sums(threads, 2 * padded_channels(channels))
        _backward_kernel()(x.detach(), d_out, scale_shift, stats, weight.detach().contiguous(),
                           dx, d_params, partial, n, height, width, channels, threads, ctx.eps)
        return dx, d_params[0], d_params[1], None, None


def is_2x2_pool(pool: nn.Module) -> bool:
    """Whether ``pool`` is a 2 x 2 ``MaxPool2d`` of stride 2, no padding or dilation, floor mode,
    returning no indices: the pooling the kernels compute.

    >>> is_2x2_pool(nn.MaxPool2d(2)), is_2x2_pool(nn.MaxPool2d(2, ceil_mode=True))
    (True, False)
    """

    def pair(value) -> tuple:
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    return (isinstance(pool, nn.MaxPool2d) and pair(pool.kernel_size) == (2, 2)
            and pair(pool.stride) == (2, 2) and pair(pool.padding) == (0, 0)
            and pair(pool.dilation) == (1, 1)
            and not pool.ceil_mode and not pool.return_indices)


def modules_fusable(batchnorm: nn.Module, relu: nn.Module, pool: nn.Module) -> bool:
    """Whether the modules are a block the kernels compute: a ``BatchNorm2d`` with an affine
    transform that normalises with batch statistics (training mode, or no running statistics),
    float32, a ``ReLU``, and a 2 x 2 ``MaxPool2d`` of stride 2 (and the fused path is on).

    >>> modules_fusable(nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
    True
    >>> modules_fusable(nn.BatchNorm2d(4).eval(), nn.ReLU(), nn.MaxPool2d(2))
    False
    """
    return (FUSED_BLOCKS and isinstance(batchnorm, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
            and is_2x2_pool(pool) and batchnorm.weight is not None
            and batchnorm.bias is not None
            and (batchnorm.training or batchnorm.running_mean is None)
            and batchnorm.weight.dtype == torch.float32 and batchnorm.bias.dtype == torch.float32
            and all(b is None or (b.dtype == torch.float32 and b.is_contiguous())
                    for b in (batchnorm.running_mean, batchnorm.running_var))
            and not torch.compiler.is_compiling())


def poolable_shape(channels: int, height: int, width: int) -> bool:
    """Whether activations of this shape fit the kernels: 2 to :data:`MAX_CHANNELS` channels
    and at least one 2 x 2 window."""
    return 1 < channels <= MAX_CHANNELS and height >= 2 and width >= 2


def nchw_differentiable(x: Tensor) -> bool:
    """Whether ``x`` is an activation the NCHW kernels (:mod:`learned_optim.native_batchnorm`,
    :mod:`learned_optim.native_pool`) may take: a 4-d NCHW-contiguous float32 CPU tensor,
    under grad mode, outside ``torch.compile`` and ``torch.func`` transforms, with the fused
    paths switched on (:data:`FUSED_BLOCKS`).

    >>> x = torch.zeros(2, 4, 6, 6)
    >>> nchw_differentiable(x), nchw_differentiable(x.contiguous(memory_format=torch.channels_last))
    (True, False)
    """
    return (FUSED_BLOCKS and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() == 4 and x.is_contiguous() and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def fusable(x: Tensor, batchnorm: nn.Module, relu: nn.Module, pool: nn.Module) -> bool:
    """Whether ``pool(relu(batchnorm(x)))`` may run as :func:`batchnorm_relu_maxpool`.

    True for modules that :func:`modules_fusable` accepts and ``x`` a channels-last float32
    CPU batch that :func:`poolable_shape` accepts, outside ``torch.func`` transforms, where the
    kernels build (the first call builds them: a few seconds, cached on disk).

    >>> block = (nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
    >>> fusable(torch.zeros(2, 4, 6, 6), *block)  # NCHW: the eager modules
    False
    """
    return (modules_fusable(batchnorm, relu, pool) and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.dim() == 4 and poolable_shape(*x.shape[1:])
            and x.shape[1] == batchnorm.num_features
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and _kernels_built())


def batchnorm_relu_maxpool(x: Tensor, batchnorm: nn.BatchNorm2d) -> Tensor:
    """``max_pool2d(relu(batchnorm(x)), 2)`` through the fused kernels, for ``x`` and
    ``batchnorm`` that :func:`fusable` accepts; ``batchnorm``'s running statistics and batch
    count are updated as its own forward updates them.

    >>> bn = nn.BatchNorm2d(4)
    >>> x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    >>> eager = nn.functional.max_pool2d(torch.relu(bn(x)), 2)
    >>> if fusable(x, bn, nn.ReLU(), nn.MaxPool2d(2)):
    ...     torch.testing.assert_close(batchnorm_relu_maxpool(x, bn), eager)
    """
    return _BatchNormReLUPool.apply(x, batchnorm.weight, batchnorm.bias, batchnorm.eps,
                                    running_update(batchnorm))


# A kernel's running-statistics arguments where there are none to update (never written).
NO_RUNNING = torch.empty(0, dtype=torch.float32)


def running_update(batchnorm: nn.BatchNorm2d) -> tuple[Tensor, Tensor, float]:
    """What a kernel needs to update ``batchnorm``'s running statistics as its training
    forward does: ``(running_mean, running_var, momentum)``, the momentum negative where
    nothing is updated. Counts the batch (``num_batches_tracked``), and where the momentum
    is ``None`` gives the cumulative average's weight, as ``BatchNorm2d.forward`` does.

    >>> bn = nn.BatchNorm2d(3, momentum=None)
    >>> running_update(bn)[2], running_update(bn)[2], int(bn.num_batches_tracked)
    (1.0, 0.5, 2)
    """
    if not (batchnorm.training and batchnorm.track_running_stats):
        return NO_RUNNING, NO_RUNNING, -1.0
    momentum = batchnorm.momentum
    if batchnorm.num_batches_tracked is not None:
        batchnorm.num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / float(batchnorm.num_batches_tracked)
    if batchnorm.running_mean is None or momentum is None:
        return NO_RUNNING, NO_RUNNING, -1.0
    return batchnorm.running_mean, batchnorm.running_var, float(momentum)
