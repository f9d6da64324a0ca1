"""ReLU and 2 x 2 max-pooling as one kernel (NCHW, CPU) compute the eager modules' outputs and
gradients of every order to the bit, and take over only where they may.

Every derivative of the pair is a copy (of an output gradient to a window's winner, or of a
winner back), so nothing is allowed to differ: checked with ties (values drawn from a handful),
zeros, windows with no positive value, NaN and infinities, odd heights and widths whose last
row or column no window reads, on one and two threads, and inside a real second-order
meta-gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from learned_optim import learners, native_block, native_pool
from learned_optim.learners import ConvLearner
from learned_optim.native_pool import relu_maxpool, relu_maxpool_fusable

RELU, POOL = nn.ReLU(), nn.MaxPool2d(2)

pytestmark = pytest.mark.skipif(
    not relu_maxpool_fusable(torch.zeros(1, 1, 2, 2, requires_grad=True), RELU, POOL),
    reason="the ReLU-pooling kernel did not build here")

SHAPES = [(100, 32, 28, 28), (5, 32, 7, 7), (3, 20, 5, 6), (2, 3, 2, 2), (6, 3, 9, 35),
          (1, 1, 3, 1 + 2 * 17)]


def activation(shape, seed=0, ties: bool = False) -> torch.Tensor:
    """Normal values, or (``ties``) values drawn from {-1, 0, 1, 2}; either way with NaN, +inf
    and -inf sprinkled in, and the first plane's first window wholly negative."""
    generator = torch.Generator().manual_seed(seed)
    if ties:
        x = torch.randint(-1, 3, shape, generator=generator).float()
    else:
        x = torch.randn(shape, generator=generator)
    flat = x.view(-1)
    for value, start in ((float("nan"), 3), (float("inf"), 5), (float("-inf"), 8)):
        flat[start::97] = value
    x[0, 0, :2, :2] = -torch.rand(2, 2, generator=generator) - 0.5
    return x


def derivatives(x: torch.Tensor, fused: bool, seed: int = 1) -> list[torch.Tensor]:
    """The output, the input gradient for an output gradient ``g``, the gradient of
    ``<a, dx>`` with respect to ``g``, and that one's gradient with respect to ``a``."""
    x = x.detach().requires_grad_()
    out = relu_maxpool(x) if fused else F.max_pool2d(torch.relu(x), 2)
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(out.shape, generator=generator).requires_grad_()
    (dx,) = torch.autograd.grad(out, x, g, create_graph=True)
    a = torch.randn(dx.shape, generator=generator).requires_grad_()
    (dg,) = torch.autograd.grad(dx, g, a, create_graph=True)
    b = torch.randn(dg.shape, generator=generator)
    (da,) = torch.autograd.grad(dg, a, b)
    return [out, dx, dg, da]


def assert_bit_equal(ours, theirs):
    for name, mine, eager in zip(("output", "dx", "d g", "d a"), ours, theirs):
        torch.testing.assert_close(mine, eager, rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("thread_count", [1, 2])
def test_outputs_and_gradients_of_every_order_are_the_modules_to_the_bit(shape, ties,
                                                                          thread_count, threads):
    threads(thread_count)
    x = activation(shape, ties=ties)
    ours, theirs = derivatives(x, fused=True), derivatives(x, fused=False)
    assert_bit_equal(ours, theirs)
    dx = ours[1]
    assert dx.abs().max() > 0 and (dx == 0).float().mean() >= 0.75  # a winner a window at most
    if shape[2] % 2:
        assert not dx[:, :, -1].any()  # no window reads an odd height's last row


def test_a_window_with_equal_values_routes_to_its_first_in_scan_order():
    x = torch.tensor([[[[1.0, 3.0], [3.0, 3.0]], [[-2.0, -1.0], [-1.0, -3.0]]]],
                     requires_grad=True)  # one image, two channels of one window
    out = relu_maxpool(x)
    (dx,) = torch.autograd.grad(out, x, torch.tensor([[[[5.0]], [[7.0]]]]))
    assert out.flatten().tolist() == [3.0, 0.0]
    assert dx[0, 0].tolist() == [[0.0, 5.0], [0.0, 0.0]] and not dx[0, 1].any()


def test_the_forward_saves_one_byte_a_window():
    x = activation((5, 4, 10, 10)).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = relu_maxpool(x)
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(torch.uint8, tuple(out.shape))]


def test_only_2x2_pooling_after_a_relu_on_nchw_float32_cpu_activations_that_need_gradients():
    x = torch.zeros(2, 4, 6, 6, requires_grad=True)
    assert relu_maxpool_fusable(x, RELU, POOL)
    assert relu_maxpool_fusable(x, nn.ReLU(inplace=True), nn.MaxPool2d((2, 2), stride=2))
    assert not relu_maxpool_fusable(x.contiguous(memory_format=torch.channels_last), RELU, POOL)
    assert not relu_maxpool_fusable(x.double(), RELU, POOL)
    assert not relu_maxpool_fusable(x.detach(), RELU, POOL)  # nothing to differentiate
    assert not relu_maxpool_fusable(x, nn.LeakyReLU(), POOL)
    for pool in (nn.MaxPool2d(3), nn.MaxPool2d(2, stride=1), nn.MaxPool2d(2, padding=1),
                 nn.MaxPool2d(2, ceil_mode=True), nn.MaxPool2d(2, return_indices=True),
                 nn.AvgPool2d(2)):
        assert not relu_maxpool_fusable(x, RELU, pool), pool
    assert not relu_maxpool_fusable(torch.zeros(2, 4, 1, 6, requires_grad=True), RELU, POOL)
    assert not relu_maxpool_fusable(torch.zeros(0, 4, 6, 6, requires_grad=True), RELU, POOL)
    with torch.no_grad():
        assert not relu_maxpool_fusable(x, RELU, POOL)


def counted_calls(kernel_calls) -> list:
    """Each kernel call's mode (0 forward, 1 route, 2 gather)."""
    return kernel_calls(native_pool._kernel, lambda args: args[6])


def test_switched_off_hooked_or_transformed_the_learner_runs_its_modules(monkeypatch,
                                                                          learner_passes,
                                                                          kernel_calls):
    learner = ConvLearner(1, ways=3, filters=4, image_size=8, blocks=2, channels_last=False)
    calls = counted_calls(kernel_calls)
    passes = learner_passes(learner, activation((6, 1, 8, 8)).nan_to_num(0.0, 1.0, -1.0))
    passes.gradient_of_gradient()
    # per block: forward, the backward's route, and the double backward's gather and route
    assert sorted(calls) == [0, 0, 1, 1, 1, 1, 2, 2], calls
    monkeypatch.setattr(native_block, "FUSED_BLOCKS", False)  # LEARNED_OPTIM_COMPILE=0
    passes.gradient_of_gradient()
    assert len(calls) == 8
    monkeypatch.setattr(native_block, "FUSED_BLOCKS", True)
    seen = []
    handle = learner.features[2].register_forward_hook(lambda *args: seen.append(1))
    passes.gradient_of_gradient()
    assert calls.count(0) == 3 and seen == [1]  # the hooked ReLU ran as its module
    handle.remove()
    passes.under_torch_func()
    assert calls.count(0) == 3


def test_a_second_order_meta_gradient_on_real_images_is_the_modules_to_the_bit(
        second_order_meta_gradient, monkeypatch, kernel_calls):
    # Two second-order SGD steps on a real support set, the kernel against the ReLU and
    # pooling modules (the BatchNorm kernel in both).
    meta_gradient = second_order_meta_gradient
    calls = counted_calls(kernel_calls)
    fused = meta_gradient()
    assert calls.count(0) == 12  # 4 blocks x 3 passes
    monkeypatch.setattr(learners, "relu_maxpool_fusable", lambda *args: False)
    eager = meta_gradient()
    assert calls.count(0) == 12 and eager.abs().max() > 0
    assert torch.equal(fused, eager)


def test_a_failed_build_warns_once_and_the_learner_runs_its_modules(no_cpp_compiler,
                                                                     learner_passes):
    no_cpp_compiler(native_pool._kernel)
    learner = ConvLearner(1, ways=3, filters=4, image_size=8, blocks=2, channels_last=False)
    inputs = activation((6, 1, 8, 8)).nan_to_num(0.0, 1.0, -1.0)
    messages = learner_passes(learner, inputs).warnings_of_two_passes("ReLU-pooling")
    assert len(messages) == 1 and "no C++ compiler found" in messages[0], messages
    assert all(torch.isfinite(p.grad).all() for p in learner.parameters())
