"""BatchNorm's fused double backward (NCHW, CPU) computes PyTorch's, and takes over only where
it may.

The forward and the first backward are PyTorch's own, so they must equal the module's to the
bit; the double backward is checked against PyTorch's at float64 (a float32 error within 1.5x
of PyTorch's own float32 error, or 2e-6 of the largest value), for every combination of
upstream gradients, on shapes that fill no vector and on one and two threads; then inside a
real second-order meta-gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from learned_optim import native_batchnorm, native_block
from learned_optim.learners import ConvLearner
from learned_optim.native_batchnorm import batchnorm_train, double_backward_fusable

pytestmark = pytest.mark.skipif(
    not double_backward_fusable(torch.zeros(2, 2, 2, 2, requires_grad=True), nn.BatchNorm2d(2)),
    reason="the BatchNorm double-backward kernel did not build here")

SHAPES = [(100, 32, 28, 28), (5, 32, 7, 7), (3, 20, 5, 6), (2, 17, 1, 1), (6, 3, 9, 4)]


def batch(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.5).to(dtype)


def module(channels: int, dtype=torch.float32, **options) -> nn.BatchNorm2d:
    batchnorm = nn.BatchNorm2d(channels, **options).to(dtype)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        batchnorm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
        batchnorm.bias.copy_(torch.randn(channels, generator=generator))
    return batchnorm


def second_order(x, batchnorm, fused: bool, upstream: str):
    """The gradients of ``<a, dx> + <u, dweight> + <v, dbias>`` with respect to the output
    gradient, the input and the weight, for the upstream gradients ``upstream`` names."""
    x = x.detach().requires_grad_()
    out = batchnorm_train(x, batchnorm) if fused else batchnorm(x)
    g = batch(out.shape, out.dtype, seed=2).requires_grad_()
    grads = torch.autograd.grad(out, (x, batchnorm.weight, batchnorm.bias), g,
                                create_graph=True)
    total = sum((grad * batch(grad.shape, grad.dtype, seed=3 + i)).sum()
                for i, grad in enumerate(grads) if "auv"[i] in upstream)
    return torch.autograd.grad(total, (g, x, batchnorm.weight), allow_unused=True)


def error(actual, truth) -> float:
    """The largest difference relative to the tensor's largest value (BatchNorm's input
    gradients are sums of thousands of terms that cancel: no tighter elementwise bound)."""
    if truth is None:
        return 0.0 if actual is None or not actual.any() else float("inf")
    return float((actual.double() - truth).abs().max() / truth.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", [{}, {"momentum": None}, {"track_running_stats": False}],
                         ids=["momentum", "cumulative", "no-running"])
def test_outputs_first_gradients_and_running_statistics_are_the_modules_to_the_bit(
        shape, options):
    x = batch(shape).requires_grad_()
    fused_module, eager_module = module(shape[1], **options), module(shape[1], **options)
    for _ in range(2):  # a second call moves the running statistics on from the first
        fused, eager = batchnorm_train(x, fused_module), eager_module(x)
        assert torch.equal(fused, eager)
        g = batch(shape, seed=2)
        for ours, theirs in zip(
                torch.autograd.grad(fused, (x, fused_module.weight, fused_module.bias), g),
                torch.autograd.grad(eager, (x, eager_module.weight, eager_module.bias), g)):
            assert torch.equal(ours, theirs)
        for ours, theirs in zip(fused_module.buffers(), eager_module.buffers()):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("upstream", ["auv", "a", "u", "v", "au"])
@pytest.mark.parametrize("thread_count", [1, 2])
def test_the_double_backward_is_pytorchs_to_float32_rounding(shape, upstream, thread_count,
                                                              threads):
    # upstream: which of the input, weight and bias gradients ("a", "u", "v") the loss reads
    threads(thread_count)
    truth = second_order(batch(shape, torch.float64), module(shape[1], torch.float64),
                         fused=False, upstream=upstream)
    fused = second_order(batch(shape), module(shape[1]), fused=True, upstream=upstream)
    eager = second_order(batch(shape), module(shape[1]), fused=False, upstream=upstream)
    for name, ours, theirs, exact in zip(("output gradient", "input", "weight"), fused, eager,
                                         truth):
        assert error(ours, exact) <= max(1.5 * error(theirs, exact), 2e-6), name  # <= 1.39x
    if "a" in upstream:  # the input gradient's gradient reaches all three
        assert all(grad is not None and grad.abs().max() > 0 for grad in truth)


def test_a_third_derivative_is_refused_with_the_way_out():
    x = batch((3, 4, 5, 5)).requires_grad_()
    batchnorm = module(4)
    (dx,) = torch.autograd.grad(batchnorm_train(x, batchnorm).pow(3).sum(), x,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="third derivative.*LEARNED_OPTIM_COMPILE=0"):
        torch.autograd.grad(dx.pow(2).sum(), x, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.pow(2).sum(), x)  # a second derivative is fine
    assert torch.isfinite(ddx).all() and ddx.abs().max() > 0


def test_only_batch_statistics_on_nchw_float32_cpu_activations_that_need_gradients():
    x = torch.zeros(2, 4, 6, 6, requires_grad=True)
    batchnorm = nn.BatchNorm2d(4)
    assert double_backward_fusable(x, batchnorm)
    assert double_backward_fusable(x.detach(), batchnorm)  # its weight needs a gradient
    assert not double_backward_fusable(x.contiguous(memory_format=torch.channels_last),
                                       batchnorm)  # the fused conv blocks' layout
    assert not double_backward_fusable(x.double(), batchnorm.double())
    assert not double_backward_fusable(x, nn.BatchNorm2d(4).eval())  # running statistics
    assert double_backward_fusable(x, nn.BatchNorm2d(4, track_running_stats=False).eval())
    assert not double_backward_fusable(x, nn.BatchNorm2d(4, affine=False))
    assert not double_backward_fusable(x, nn.BatchNorm2d(3))
    assert not double_backward_fusable(torch.zeros(1, 4, 1, 1), batchnorm)  # one value
    assert not double_backward_fusable(torch.zeros(0, 4, 6, 6), batchnorm)  # no images
    frozen = nn.BatchNorm2d(4).requires_grad_(False)
    assert not double_backward_fusable(x.detach(), frozen)  # nothing to differentiate
    with torch.no_grad():
        assert not double_backward_fusable(x, batchnorm)


def test_switched_off_hooked_or_transformed_the_learner_runs_its_modules(monkeypatch,
                                                                          learner_passes,
                                                                          kernel_calls):
    learner = ConvLearner(1, ways=3, filters=4, image_size=8, blocks=2, channels_last=False)
    calls = kernel_calls(native_batchnorm._kernel)
    passes = learner_passes(learner, batch((6, 1, 8, 8)))
    passes.gradient_of_gradient()
    assert len(calls) == 2  # one a block
    monkeypatch.setattr(native_block, "FUSED_BLOCKS", False)  # LEARNED_OPTIM_COMPILE=0
    passes.gradient_of_gradient()
    assert len(calls) == 2
    monkeypatch.setattr(native_block, "FUSED_BLOCKS", True)
    seen = []
    handle = learner.features[1].register_forward_hook(lambda *args: seen.append(1))
    passes.gradient_of_gradient()
    assert len(calls) == 3 and seen == [1]  # the hooked BatchNorm ran as its module
    handle.remove()
    passes.under_torch_func()
    assert len(calls) == 3


def test_a_second_order_meta_gradient_on_real_images_is_the_modules_to_rounding(
        second_order_meta_gradient, monkeypatch, kernel_calls):
    # Two second-order SGD steps on a real support set: the fused double backward against
    # PyTorch's.
    meta_gradient = second_order_meta_gradient
    calls = kernel_calls(native_batchnorm._kernel)
    fused = meta_gradient()
    assert len(calls) == 8  # 4 blocks x 2 steps
    monkeypatch.setattr(native_block, "FUSED_BLOCKS", False)
    eager = meta_gradient()
    relative = float((fused - eager).norm() / eager.norm())
    assert relative < 1e-5, relative


def test_a_failed_build_warns_once_and_the_learner_runs_its_modules(no_cpp_compiler,
                                                                     learner_passes):
    no_cpp_compiler(native_batchnorm._kernel)
    learner = ConvLearner(1, ways=3, filters=4, image_size=8, blocks=2, channels_last=False)
    messages = learner_passes(learner, batch((6, 1, 8, 8))).warnings_of_two_passes(
        "double-backward")
    assert len(messages) == 1 and "no C++ compiler found" in messages[0], messages
    assert all(torch.isfinite(p.grad).all() for p in learner.parameters())

