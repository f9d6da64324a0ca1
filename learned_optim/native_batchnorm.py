"""BatchNorm with batch statistics whose double backward is one hand-fused kernel (CPU, NCHW).

Second-order meta-training differentiates the learner's backward pass (``create_graph=True``
at every inner step, then the meta-gradient through it). PyTorch's double backward of
BatchNorm (``NativeBatchNormBackwardBackward0``) is a composite of some twenty broadcast
products and per-channel reductions, each a pass over the activation: profiled on a 2-core
CPU (Omniglot 20-way 5-shot, 100 support images, 32 filters, NCHW), it took 30% of a
second-order meta-step, more than the convolutions' double backward. Written out, it needs
five per-channel sums and one elementwise pass (``x_hat`` the normalised input, ``g`` the
output gradient, ``a``, ``u``, ``v`` the gradients flowing back to the input gradient, the
weight gradient and the bias gradient, ``s`` the inverse standard deviation, means over a
channel's ``M`` values)::

    grad of g      = gamma s (a - mean(a) - x_hat mean(a x_hat)) + u x_hat + v
    grad of x      = -gamma s^2 ((mean(a g) - mean(a) mean(g) - 3 mean(g x_hat) mean(a x_hat))
                                  x_hat + mean(a x_hat) (g - mean(g)) + mean(g x_hat) (a - mean(a)))
                     + u s (g - mean(g) - x_hat mean(g x_hat))
    grad of gamma  = s M (mean(a g) - mean(a) mean(g) - mean(g x_hat) mean(a x_hat))

Here they are one kernel: a thread takes whole channels, sums a channel's planes, then writes
its two gradients, while the channel (a megabyte at 100 images of 28 x 28) is still in cache.
The forward and the first backward are PyTorch's own (``native_batch_norm`` and
``native_batch_norm_backward``), so outputs and first-order gradients are the eager module's
to the bit; the double backward agrees with PyTorch's to float32 rounding
(``tests/test_native_batchnorm.py``). A third derivative (the double backward differentiated
with ``create_graph=True``) is refused with an error that says how to switch the path off.

:class:`ConvFeatures <learned_optim.learners.ConvFeatures>` takes this path for a BatchNorm
with batch statistics on NCHW float32 CPU activations (second-order meta-training runs its
learner so); elsewhere, under ``torch.compile`` or ``torch.func`` transforms, or where the
kernel cannot be built, the module runs as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from learned_optim.native_block import kernel_threads, nchw_differentiable, running_update
from learned_optim.rule.native_build import VEC_PRELUDE, NativeKernel

__all__ = ["batchnorm_train", "double_backward_fusable"]

_DOUBLE_BACKWARD = VEC_PRELUDE + r"""
// Sums of one channel's N planes of HW values: g, a, g x_hat, a x_hat, a g (x_hat = (x - mean)
// s), in float vectors flushed into doubles every kFlush vectors.
static void channel_sums(const float* x, const float* g, const float* a, bool has_a,
                         int64_t N, int64_t stride, int64_t HW, float mean, float s,
                         double* sums) {
    const Vec vm(mean), vs(s);
    alignas(64) float lanes[5][V];
    for (int64_t n = 0; n < N; ++n) {
        const float* xp = x + n * stride; const float* gp = g + n * stride;
        const float* ap = a + n * stride;
        for (int64_t i0 = 0; i0 < HW; i0 += kFlush * V) {
            const int64_t i1 = std::min(HW, i0 + kFlush * V);
            Vec sg(0.f), sa(0.f), sgx(0.f), sax(0.f), sag(0.f);
            for (int64_t i = i0; i < i1; i += V) {
                const int64_t k = std::min(V, i1 - i);
                // a partial load's missing lanes are 0 in g and a, so every product is too
                const Vec xh = (load(xp + i, k) - vm) * vs, gv = load(gp + i, k);
                sg += gv; sgx = at::vec::fmadd(gv, xh, sgx);
                if (has_a) {
                    const Vec av = load(ap + i, k);
                    sa += av; sax = at::vec::fmadd(av, xh, sax); sag = at::vec::fmadd(av, gv, sag);
                }
            }
            sg.store(lanes[0]); sa.store(lanes[1]); sgx.store(lanes[2]); sax.store(lanes[3]);
            sag.store(lanes[4]);
            for (int q = 0; q < 5; ++q)
                for (int64_t l = 0; l < V; ++l) sums[q] += lanes[q][l];
        }
    }
}

// x, g (the output gradient), a (the input gradient's gradient; unread if !has_a): [N, C, HW].
// mean, invstd: the forward's batch statistics [C]; weight, gw, gb: gamma and the gradients
// of the weight and bias gradients [C]. Writes d_g, d_x [N, C, HW] and d_weight [C].
extern "C" void kernel(const float* x, const float* g, const float* a, const float* mean,
                       const float* invstd, const float* weight, const float* gw,
                       const float* gb, float* d_g, float* d_x, float* d_weight,
                       const int64_t N, const int64_t C, const int64_t HW,
                       const int64_t has_a, const int64_t threads)
{
    const int64_t stride = C * HW;
    const double M = (double)(N * HW);
    // Channels go to threads as they free up: a static share would wait out a time slice
    // for a thread whose core another process holds.
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < C; ++c) {
        const int64_t base = c * HW;
        double sums[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
        channel_sums(x + base, g + base, a + base, has_a != 0, N, stride, HW, mean[c],
                     invstd[c], sums);
        const double s = invstd[c], gamma = weight[c], u = gw[c], v = gb[c];
        const double g_mean = sums[0] / M, a_mean = sums[1] / M, m = sums[2] / M;
        const double na = sums[3] / M, q = sums[4] / M;
        const double gs = gamma * s, gs2 = gamma * s * s;
        d_weight[c] = (float)(s * M * (q - a_mean * g_mean - m * na));
        // d_g = ka a + kx x_hat + k0;  d_x = cg g + ca a + cx x_hat + c0
        const Vec ka((float)gs), kx((float)(u - gs * na)), k0((float)(v - gs * a_mean));
        const Vec cg((float)(-gs2 * na + u * s)), ca((float)(-gs2 * m));
        const Vec cx((float)(-gs2 * (q - a_mean * g_mean - 3.0 * m * na) - u * s * m));
        const Vec c0((float)(gs2 * (na * g_mean + m * a_mean) - u * s * g_mean));
        const Vec vm(mean[c]), vs(invstd[c]);
        for (int64_t n = 0; n < N; ++n) {
            const int64_t o = n * stride + base;
            for (int64_t i = 0; i < HW; i += V) {
                const int64_t k = std::min(V, HW - i);
                const Vec xh = (load(x + o + i, k) - vm) * vs, gv = load(g + o + i, k);
                Vec dg = at::vec::fmadd(kx, xh, k0);
                Vec dx = at::vec::fmadd(cg, gv, at::vec::fmadd(cx, xh, c0));
                if (has_a) {
                    const Vec av = load(a + o + i, k);
                    dg = at::vec::fmadd(ka, av, dg);
                    dx = at::vec::fmadd(ca, av, dx);
                }
                store(dg, d_g + o + i, k);
                store(dx, d_x + o + i, k);
            }
        }
    }
}
"""


def _probe(kernel) -> None:
    """One channel of three values, x = (-1, 0, 1) (s = sqrt(3/2) with eps 0), g = (0, 1, 0)
    and a unit weight gradient's gradient: d_g = x_hat, d_x = s (g - 1/3), d_weight = 0."""
    x, g = torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0])
    s = 1.5 ** 0.5
    d_g, d_x, d_weight = torch.empty(3), torch.empty(3), torch.empty(1)
    one, zero = torch.ones(1), torch.zeros(1)
    kernel(x, g, x, zero, torch.tensor([s]), one, one, zero, d_g, d_x, d_weight, 1, 1, 3, 0, 1)
    expected = torch.tensor([[-s, 0.0, s], [-s / 3, 2 * s / 3, -s / 3]])
    if not (torch.allclose(torch.stack((d_g, d_x)), expected, atol=1e-6)
            and float(d_weight) == 0.0):
        raise RuntimeError(f"the BatchNorm double-backward kernel computed {d_g.tolist()}, "
                           f"{d_x.tolist()}, {d_weight.tolist()} on its probe")


_kernel = NativeKernel(
    "the BatchNorm double-backward kernel",
    ["const float*"] * 8 + ["float*"] * 3 + ["const int64_t"] * 5, _DOUBLE_BACKWARD, _probe,
    "BatchNorm's double backward runs PyTorch's operators")


def _first_backward(d_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor,
                    eps: float, wanted: list[bool]) -> tuple:
    """PyTorch's BatchNorm backward with batch statistics (the eager module's, to the bit):
    the gradients of the input, weight and bias that ``wanted`` asks for, else ``None``."""
    return torch.ops.aten.native_batch_norm_backward(d_out, x, weight, None, None, mean, invstd,
                                                     True, eps, wanted)


class _BatchNormTrain(torch.autograd.Function):
    """BatchNorm with batch statistics: PyTorch's forward and backward, the backward itself
    one node (:class:`_BatchNormTrainGradient`) whose backward is the kernel."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, running_mean, running_var,
                momentum: float, eps: float) -> Tensor:
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var,
                                                    True, momentum, eps)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a node whose backward is the kernel
            grads = _BatchNormTrainGradient.apply(d_out, x, weight, mean, invstd, ctx.eps)
        else:
            grads = _first_backward(d_out.contiguous(), x, weight, mean, invstd, ctx.eps,
                                    list(ctx.needs_input_grad[:3]))
        return (*grads, None, None, None, None)


class _BatchNormTrainGradient(torch.autograd.Function):
    """BatchNorm's backward as a differentiable function of the output gradient, the input
    and the weight (the batch statistics are recomputed from the input analytically)."""

    @staticmethod
    def forward(ctx, d_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor,
                eps: float):
        d_out = d_out.contiguous()
        grads = _first_backward(d_out, x, weight, mean, invstd, eps, [True, True, True])
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        ctx.save_for_backward(d_out, x, weight, mean, invstd)
        return grads

    @staticmethod
    def backward(ctx, grad_dx, grad_dweight, grad_dbias):
        d_out, x, weight, mean, invstd = ctx.saved_tensors
        if grad_dx is None and grad_dweight is None and grad_dbias is None:
            return None, None, None, None, None, None
        upstream = (grad_dx, grad_dweight, grad_dbias)
        if torch.is_grad_enabled() and any(g is not None and g.requires_grad for g in upstream):
            raise RuntimeError(
                "learned_optim: a third derivative through BatchNorm (its double backward "
                "differentiated with create_graph=True) is not supported by the fused NCHW "
                "double backward; set LEARNED_OPTIM_COMPILE=0 to run PyTorch's BatchNorm")
        n, channels = x.shape[:2]
        zeros = weight.new_zeros(channels)
        grad_dx = None if grad_dx is None else grad_dx.contiguous()
        d_g, d_x = torch.empty_like(x), torch.empty_like(x)
        d_weight = torch.empty_like(weight)
        _kernel()(x, d_out, x if grad_dx is None else grad_dx, mean, invstd,
                  weight.contiguous(),
                  zeros if grad_dweight is None else grad_dweight.contiguous(),
                  zeros if grad_dbias is None else grad_dbias.contiguous(),
                  d_g, d_x, d_weight, n, channels, x.shape[2] * x.shape[3],
                  int(grad_dx is not None),
                  kernel_threads(x.numel()))
        return d_g, d_x, d_weight, None, None, None


def double_backward_fusable(x: Tensor, batchnorm: nn.Module) -> bool:
    """Whether ``batchnorm(x)`` may run as :func:`batchnorm_train`: an affine float32
    ``BatchNorm2d`` normalising with batch statistics (training mode, or no running
    statistics), ``x`` an NCHW-contiguous float32 CPU batch of its channels that something
    will differentiate, outside ``torch.compile`` and ``torch.func`` transforms, where the
    kernel builds (the first call builds it: seconds, cached on disk).

    >>> bn, x = nn.BatchNorm2d(4), torch.zeros(2, 4, 6, 6)
    >>> double_backward_fusable(x.contiguous(memory_format=torch.channels_last), bn)
    False
    >>> with torch.no_grad():  # nothing will be differentiated
    ...     double_backward_fusable(x, bn)
    False
    """
    return (nchw_differentiable(x) and isinstance(batchnorm, nn.BatchNorm2d)
            and batchnorm.weight is not None and batchnorm.bias is not None
            and (batchnorm.training or batchnorm.running_mean is None)
            and batchnorm.weight.dtype == torch.float32
            and batchnorm.bias.dtype == torch.float32
            and x.shape[1] == batchnorm.num_features and x.shape[2] * x.shape[3] > 0
            and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and (x.requires_grad or batchnorm.weight.requires_grad
                 or batchnorm.bias.requires_grad)
            and _kernel() is not None)


def batchnorm_train(x: Tensor, batchnorm: nn.BatchNorm2d) -> Tensor:
    """``batchnorm(x)`` with batch statistics, its double backward through the kernel, for
    ``x`` and ``batchnorm`` that :func:`double_backward_fusable` accepts; the running
    statistics and batch count are updated as the module's own forward updates them.

    >>> bn = nn.BatchNorm2d(3)
    >>> x = torch.randn(4, 3, 5, 5, requires_grad=True)
    >>> torch.equal(batchnorm_train(x, bn), nn.BatchNorm2d(3)(x))
    True
    """
    running_mean, running_var, momentum = running_update(batchnorm)
    if momentum < 0:  # nothing to update
        running_mean = running_var = None
        momentum = 0.0
    return _BatchNormTrain.apply(x, batchnorm.weight, batchnorm.bias, running_mean,
                                 running_var, momentum, batchnorm.eps)
