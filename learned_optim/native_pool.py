"""ReLU then 2 x 2 max-pooling as one kernel each way, at every order of derivative (CPU, NCHW).

Second-order meta-training runs its learner on NCHW activations (the channels-last fused
blocks of :mod:`learned_optim.native_block` have no double backward) and differentiates the
learner's backward at every inner step. There each block's ``ReLU`` and ``MaxPool2d(2)`` ran
as PyTorch's operators: the ReLU's output kept whole and pooling's int64 indices kept for the
backward, a zero fill, a scatter and a threshold pass for the backward, a gather and another
threshold pass for the double backward, each a pass over the activation. Profiled on a 2-core
CPU (Omniglot 20-way 5-shot, 100 support images, 32 filters), they were about a quarter of a
second-order meta-step.

Together the two are a selection: each output is its window's first maximum in scan order
(NaN winning, as eager pooling picks it) where that maximum passed the ReLU, else nothing
reaches the input. So the forward writes the pooled values and one byte a window (which of its
four values won, or none), and every derivative is a linear map of that byte: the backward
routes the output gradient to the winners (zeros elsewhere), and the backward's own gradient
gathers from the winners. Both are exact copies, so outputs and gradients of every order are
the eager modules' to the bit, and nothing else is saved (a byte a window, where eager kept
six floats' worth).

:class:`ConvFeatures <learned_optim.learners.ConvFeatures>` takes this path for an unhooked
``ReLU`` followed by a 2 x 2, stride-2 ``MaxPool2d`` on NCHW float32 CPU activations that
will be differentiated; elsewhere, under ``torch.compile`` or ``torch.func`` transforms, or
where the kernel cannot be built, the modules run as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from learned_optim.native_block import is_2x2_pool, kernel_threads, nchw_differentiable
from learned_optim.rule.native_build import VEC_PRELUDE, NativeKernel

__all__ = ["relu_maxpool", "relu_maxpool_fusable"]

_FORWARD, _ROUTE, _GATHER = 0, 1, 2  # the kernel's modes

_SOURCE = VEC_PRELUDE + r"""
#include <cstdint>
#include <tuple>

// A window's code: which of its values gets the gradient (0 top left, 1 top right, 2 bottom
// left, 3 bottom right), or kNone where its maximum did not pass the ReLU.
static constexpr float kNone = 4.f;

// The windows of k outputs along one input row: their left and right values.
static inline void pairs(const float* row, int64_t k, Vec& left, Vec& right) {
    const int64_t n = 2 * k;
    const Vec a = load(row, std::min(V, n)), b = load(row + V, std::max<int64_t>(0, n - V));
    std::tie(left, right) = at::vec::deinterleave2(a, b);
}

// The inverse: k outputs' left and right values written along one input row.
static inline void unpairs(Vec left, Vec right, float* row, int64_t k) {
    const int64_t n = 2 * k;
    const auto both = at::vec::interleave2(left, right);
    store(both.first, row, std::min(V, n));
    if (n > V) store(both.second, row + V, n - V);
}

// k codes as float lanes (the missing lanes kNone).
static inline Vec codes(const uint8_t* code, int64_t k) {
    alignas(64) float lanes[V];
    for (int64_t l = 0; l < V; ++l) lanes[l] = l < k ? (float)code[l] : kNone;
    return Vec::loadu(lanes);
}

static void forward_plane(const float* x, float* y, uint8_t* code, int64_t W, int64_t oh,
                          int64_t ow) {
    const Vec zero(0.f), none(kNone);
    alignas(64) float lanes[V];
    for (int64_t i = 0; i < oh; ++i) {
        const float* top = x + 2 * i * W;
        for (int64_t j = 0; j < ow; j += V) {
            const int64_t k = std::min(V, ow - j);
            Vec q[4];
            pairs(top + 2 * j, k, q[0], q[1]);
            pairs(top + W + 2 * j, k, q[2], q[3]);
            Vec v = q[0], c = zero;
            // eager pooling's rule: a later value wins if it is greater or NaN
            for (int s = 1; s < 4; ++s) {
                const Vec take = (q[s] > v) | q[s].isnan();
                v = select(take, q[s], v);
                c = select(take, Vec((float)s), c);
            }
            // relu(max) = max(relu); ReLU's backward passes NaN (it tests "not <= 0")
            store(at::vec::maximum(v, zero), y + i * ow + j, k);
            select((v > zero) | v.isnan(), c, none).store(lanes);
            for (int64_t l = 0; l < k; ++l) code[i * ow + j + l] = (uint8_t)lanes[l];
        }
    }
}

static void route_plane(const float* g, const uint8_t* code, float* dx, int64_t H, int64_t W,
                        int64_t oh, int64_t ow) {
    const Vec zero(0.f);
    for (int64_t i = 0; i < oh; ++i) {
        float* top = dx + 2 * i * W;
        for (int64_t j = 0; j < ow; j += V) {
            const int64_t k = std::min(V, ow - j);
            const Vec c = codes(code + i * ow + j, k), gv = load(g + i * ow + j, k);
            Vec q[4];
            for (int s = 0; s < 4; ++s) q[s] = select(c == Vec((float)s), gv, zero);
            unpairs(q[0], q[1], top + 2 * j, k);
            unpairs(q[2], q[3], top + W + 2 * j, k);
        }
        if (W > 2 * ow) top[W - 1] = top[2 * W - 1] = 0.f;  // an odd width's last column
    }
    if (H > 2 * oh) std::fill(dx + (H - 1) * W, dx + H * W, 0.f);  // an odd height's last row
}

static void gather_plane(const float* a, const uint8_t* code, float* out, int64_t W,
                         int64_t oh, int64_t ow) {
    for (int64_t i = 0; i < oh; ++i) {
        const float* top = a + 2 * i * W;
        for (int64_t j = 0; j < ow; j += V) {
            const int64_t k = std::min(V, ow - j);
            const Vec c = codes(code + i * ow + j, k);
            Vec q[4];
            pairs(top + 2 * j, k, q[0], q[1]);
            pairs(top + W + 2 * j, k, q[2], q[3]);
            Vec r(0.f);
            for (int s = 0; s < 4; ++s) r = select(c == Vec((float)s), q[s], r);
            store(r, out + i * ow + j, k);
        }
    }
}

// Over `planes` planes of H x W inputs and (H/2) x (W/2) outputs, by `mode`:
// 0: in = x, out = the pooled ReLU, code written;  1: in = an output gradient, out = the
// input's (zeros but at the winners);  2: in = an input-shaped tensor, out = its winners.
extern "C" void kernel(const float* in, float* out, uint8_t* code, const int64_t planes,
                       const int64_t H, const int64_t W, const int64_t mode,
                       const int64_t threads)
{
    const int64_t oh = H / 2, ow = W / 2, hw = H * W, ohw = oh * ow;
    // Planes go to threads as they free up: a static share would wait out a time slice for
    // a thread whose core another process holds.
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 16)
    for (int64_t p = 0; p < planes; ++p) {
        if (mode == 0) forward_plane(in + p * hw, out + p * ohw, code + p * ohw, W, oh, ow);
        else if (mode == 1) route_plane(in + p * ohw, code + p * ohw, out + p * hw, H, W, oh, ow);
        else gather_plane(in + p * hw, code + p * ohw, out + p * ohw, W, oh, ow);
    }
}
"""


def _probe(kernel) -> None:
    """One 3 x 3 plane (its last row and column outside the window) with window (-1, 2, 2, 0):
    pooled 2, the first 2 (top right) wins; the routed gradient and the gather invert it."""
    x = torch.tensor([[-1.0, 2.0, 7.0], [2.0, 0.0, 7.0], [7.0, 7.0, 7.0]])
    y, code = torch.empty(1), torch.empty(1, dtype=torch.uint8)
    kernel(x, y, code, 1, 3, 3, _FORWARD, 1)
    dx = torch.full((3, 3), 9.0)
    kernel(torch.tensor([5.0]), dx, code, 1, 3, 3, _ROUTE, 1)
    back = torch.empty(1)
    kernel(dx, back, code, 1, 3, 3, _GATHER, 1)
    routed = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    if not (float(y) == 2.0 and int(code) == 1 and torch.equal(dx, routed)
            and float(back) == 5.0):
        raise RuntimeError(f"the ReLU-pooling kernel computed {y.tolist()}, {code.tolist()}, "
                           f"{dx.tolist()}, {back.tolist()} on its probe")


_kernel = NativeKernel(
    "the ReLU-pooling kernel", ["const float*", "float*", "uint8_t*"] + ["const int64_t"] * 5,
    _SOURCE, _probe, "ReLU and max-pooling run as PyTorch's operators")


def _run(mode: int, source: Tensor, out: Tensor, code: Tensor, shape: torch.Size) -> Tensor:
    """One kernel call over the planes of an input of ``shape``; returns ``out``."""
    n, channels, height, width = shape
    _kernel()(source, out, code, n * channels, height, width, mode,
              kernel_threads(max(source.numel(), out.numel())))
    return out


class _ReluMaxPool(torch.autograd.Function):
    """``max_pool2d(relu(x), 2)``; its backward is :class:`_Route`, itself differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        n, channels, height, width = x.shape
        y = x.new_empty(n, channels, height // 2, width // 2)
        code = torch.empty(y.shape, dtype=torch.uint8)
        _run(_FORWARD, x, y, code, x.shape)
        ctx.save_for_backward(code)
        ctx.input_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, d_y: Tensor):
        (code,) = ctx.saved_tensors
        return _Route.apply(d_y, code, ctx.input_shape)


class _Route(torch.autograd.Function):
    """The output gradient routed to the windows' winners: linear, its backward a gather."""

    @staticmethod
    def forward(ctx, d_y: Tensor, code: Tensor, input_shape: torch.Size) -> Tensor:
        d_y = d_y.contiguous()
        ctx.save_for_backward(code)
        return _run(_ROUTE, d_y, d_y.new_empty(input_shape), code, input_shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (code,) = ctx.saved_tensors
        return _Gather.apply(grad, code), None, None


class _Gather(torch.autograd.Function):
    """An input-shaped tensor read at the windows' winners: linear, its backward a route."""

    @staticmethod
    def forward(ctx, source: Tensor, code: Tensor) -> Tensor:
        source = source.contiguous()
        ctx.save_for_backward(code)
        ctx.input_shape = source.shape
        return _run(_GATHER, source, source.new_empty(code.shape), code, source.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (code,) = ctx.saved_tensors
        return _Route.apply(grad, code, ctx.input_shape), None


def relu_maxpool_fusable(x: Tensor, relu: nn.Module, pool: nn.Module) -> bool:
    """Whether ``pool(relu(x))`` may run as :func:`relu_maxpool`: a ``ReLU`` and a 2 x 2,
    stride-2 ``MaxPool2d``, ``x`` a non-empty NCHW-contiguous float32 CPU batch with at least
    one window that something will differentiate, outside ``torch.compile`` and ``torch.func``
    transforms, where the kernel builds (the first call builds it: seconds, cached on disk).

    >>> relu, pool, x = nn.ReLU(), nn.MaxPool2d(2), torch.zeros(2, 4, 6, 6, requires_grad=True)
    >>> relu_maxpool_fusable(x.contiguous(memory_format=torch.channels_last), relu, pool)
    False
    >>> relu_maxpool_fusable(x, relu, nn.MaxPool2d(3))
    False
    """
    return (nchw_differentiable(x) and isinstance(relu, nn.ReLU) and is_2x2_pool(pool)
            and x.shape[0] * x.shape[1] > 0 and x.shape[2] >= 2 and x.shape[3] >= 2
            and x.requires_grad and _kernel() is not None)


def relu_maxpool(x: Tensor) -> Tensor:
    """``max_pool2d(relu(x), 2)`` through the kernel, for ``x`` that
    :func:`relu_maxpool_fusable` accepts: outputs and gradients of every order are the eager
    operators' to the bit.

    >>> x = torch.randn(2, 3, 7, 7, requires_grad=True)
    >>> eager = nn.functional.max_pool2d(torch.relu(x), 2)
    >>> if relu_maxpool_fusable(x, nn.ReLU(), nn.MaxPool2d(2)):
    ...     assert torch.equal(relu_maxpool(x), eager)
    """
    return _ReluMaxPool.apply(x)
