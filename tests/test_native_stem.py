"""The first conv block's fused kernels (convolution, BatchNorm, ReLU, max-pool, the
convolution never written) compute what the modules compute one by one: closer to float64
than those in float32, on awkward shapes, one thread or two, first and second order."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from learned_optim import native_block, native_stem
from learned_optim.learners import ConvLearner
from learned_optim.native_stem import conv_batchnorm_relu_maxpool, stem_fusable

BLOCK_TAIL = (nn.ReLU(), nn.MaxPool2d(2))

pytestmark = pytest.mark.skipif(
    not stem_fusable(torch.zeros(1, 1, 2, 2).to(memory_format=torch.channels_last),
                     nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), *BLOCK_TAIL),
    reason="the fused first-block kernels did not build here")


def make_block(inputs: int, channels: int, seed: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(seed)
    conv, batchnorm = nn.Conv2d(inputs, channels, 3, padding=1), nn.BatchNorm2d(channels)
    with torch.no_grad():
        batchnorm.weight.uniform_(-1, 2)
        batchnorm.bias.normal_()
    return conv, batchnorm


def image_batch(shape, seed: int) -> torch.Tensor:
    """Images in [0, 1], mostly blank like Omniglot's (the case float32 statistics lose)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator)
    x = torch.where(torch.rand(shape, generator=generator) < 0.8, torch.zeros(()), x)
    return x.to(memory_format=torch.channels_last)


def eager_block(x, weight, bias, gamma, beta):
    convolved = F.conv2d(x, weight, bias, padding=1)
    return F.max_pool2d(F.relu(F.batch_norm(convolved, None, None, gamma, beta, True)), 2)


def errors(actual, truth) -> list[float]:
    return [float((a.detach().double() - t).abs().max() / t.detach().abs().max())
            for a, t in zip(actual, truth)]


@pytest.mark.parametrize("shape,channels", [((100, 1, 28, 28), 32), ((5, 1, 28, 28), 32),
                                            ((3, 3, 9, 7), 20), ((2, 2, 5, 6), 17),
                                            ((4, 4, 4, 4), 40)])
@pytest.mark.parametrize("thread_count", [1, 2])
def test_outputs_and_gradients_are_as_close_to_float64_as_the_eager_modules(shape, channels,
                                                                            thread_count,
                                                                            threads):
    threads(thread_count)
    x = image_batch(shape, sum(shape))
    conv, batchnorm = make_block(shape[1], channels, seed=channels)
    params = [conv.weight, batchnorm.weight, batchnorm.bias]
    out = conv_batchnorm_relu_maxpool(x, conv, batchnorm)
    assert out.shape == (shape[0], channels, shape[2] // 2, shape[3] // 2)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    fused = [out, *torch.autograd.grad(out, params, d_out)]

    doubles = [p.detach().double().requires_grad_() for p in params]
    truth_out = eager_block(x.double(), doubles[0], conv.bias.detach().double(), *doubles[1:])
    truth = [truth_out, *torch.autograd.grad(truth_out, doubles, d_out.double())]
    floats = [p.detach().clone().requires_grad_() for p in params]
    eager_out = eager_block(x, floats[0], conv.bias.detach(), *floats[1:])
    eager = [eager_out, *torch.autograd.grad(eager_out, floats, d_out)]

    for fused_error, eager_error in zip(errors(fused, truth), errors(eager, truth)):
        assert fused_error < max(eager_error, 1e-6), (fused_error, eager_error)


def test_the_conv_bias_gradient_is_zero_to_rounding_and_none_without_a_bias():
    # Ahead of batch-statistics BatchNorm a conv bias changes nothing: its gradient is zero.
    x = image_batch((6, 1, 8, 8), 3)
    conv, batchnorm = make_block(1, 8, seed=4)
    out = conv_batchnorm_relu_maxpool(x, conv, batchnorm)
    d_weight, d_bias = torch.autograd.grad(out.square().sum(), (conv.weight, conv.bias))
    assert float(d_bias.abs().max()) < 1e-5 * float(d_weight.abs().max())
    unbiased = nn.Conv2d(1, 8, 3, padding=1, bias=False)
    out = conv_batchnorm_relu_maxpool(x, unbiased, batchnorm)
    assert unbiased.bias is None and out.requires_grad


def test_running_statistics_and_the_batch_count_update_as_the_modules_do():
    x = image_batch((10, 1, 12, 12), 5)
    fused_conv, fused_bn = make_block(1, 8, seed=6)
    eager_conv, eager_bn = make_block(1, 8, seed=6)
    for _ in range(3):
        conv_batchnorm_relu_maxpool(x, fused_conv, fused_bn)
        eager_bn(eager_conv(x))
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(fused_bn, name), getattr(eager_bn, name),
                                   rtol=1e-5, atol=1e-6)
    assert int(fused_bn.num_batches_tracked) == 3


def test_a_gradient_of_the_gradient_is_exact():
    x = image_batch((4, 1, 6, 6), 7)
    results = []
    for fused in (False, True):
        conv, batchnorm = make_block(1, 6, seed=8)
        out = (conv_batchnorm_relu_maxpool(x, conv, batchnorm) if fused
               else F.max_pool2d(F.relu(batchnorm(conv(x))), 2))
        (d_weight,) = torch.autograd.grad(out.square().sum(), conv.weight, create_graph=True)
        results.append(torch.autograd.grad(d_weight.square().sum(),
                                           (conv.weight, batchnorm.weight)))
    for eager, fused in zip(*results):
        torch.testing.assert_close(fused, eager, rtol=1e-3, atol=1e-4 * float(eager.abs().max()))


def test_only_a_3x3_same_convolution_of_the_data_is_fused():
    x = image_batch((2, 1, 6, 6), 9)
    conv, batchnorm = make_block(1, 4, seed=0)
    assert stem_fusable(x, conv, batchnorm, *BLOCK_TAIL)
    assert not stem_fusable(x.clone().requires_grad_(), conv, batchnorm, *BLOCK_TAIL)
    nchw = x.to(memory_format=torch.contiguous_format)
    assert not stem_fusable(nchw, conv, batchnorm, *BLOCK_TAIL)  # NCHW strides
    assert not stem_fusable(x.double(), conv.double(), batchnorm.double(), *BLOCK_TAIL)
    for other in (nn.Conv2d(1, 4, 3, padding=0), nn.Conv2d(1, 4, 3, padding=1, stride=2),
                  nn.Conv2d(1, 4, 5, padding=2), nn.Conv2d(1, 4, 3, padding=2, dilation=2),
                  nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")):
        assert not stem_fusable(x, other, batchnorm, *BLOCK_TAIL)
    assert not stem_fusable(x, conv, nn.BatchNorm2d(5), *BLOCK_TAIL)  # channels disagree
    assert not stem_fusable(x, conv, batchnorm.eval(), *BLOCK_TAIL)  # running statistics
    wide = image_batch((2, 5, 6, 6), 9)
    assert not stem_fusable(wide, nn.Conv2d(5, 4, 3, padding=1), nn.BatchNorm2d(4),
                            *BLOCK_TAIL)


def test_the_learner_fuses_its_first_block_only_channels_last(monkeypatch):
    calls = []
    original = native_stem._ConvBatchNormReLUPool.apply
    monkeypatch.setattr(native_stem._ConvBatchNormReLUPool, "apply",
                        lambda *args: calls.append(1) or original(*args))
    inputs = image_batch((4, 1, 28, 28), 10).contiguous()
    ConvLearner(1, ways=4, filters=8, image_size=28)(inputs)
    assert len(calls) == 1
    # NCHW (second-order meta-training, the benchmark's straightforward reference): eager
    ConvLearner(1, ways=4, filters=8, image_size=28, channels_last=False)(inputs)
    assert len(calls) == 1
    monkeypatch.setattr(native_block, "FUSED_BLOCKS", False)  # LEARNED_OPTIM_COMPILE=0
    ConvLearner(1, ways=4, filters=8, image_size=28)(inputs)
    assert len(calls) == 1


def test_a_failed_build_warns_once_and_the_block_runs_its_modules(no_cpp_compiler):
    no_cpp_compiler(native_stem._forward_kernel, native_stem._backward_kernel)
    x = image_batch((4, 1, 8, 8), 11)
    conv, batchnorm = make_block(1, 4, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not stem_fusable(x, conv, batchnorm, *BLOCK_TAIL)
        assert not stem_fusable(x, conv, batchnorm, *BLOCK_TAIL)
    messages = [str(w.message) for w in caught if "first-block" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler found" in messages[0], messages


def test_a_hooked_block_runs_module_by_module_so_the_hook_sees_its_output():
    learner = ConvLearner(1, ways=4, filters=8, image_size=28)
    inputs = image_batch((4, 1, 28, 28), 12)
    expected = learner(inputs)
    seen = []
    learner.features[1].register_forward_hook(lambda module, args, out: seen.append(out))
    torch.testing.assert_close(learner(inputs), expected, rtol=1e-4, atol=1e-4)
    assert len(seen) == 1 and seen[0].shape == (4, 8, 28, 28)
