"""The conv block's fused BatchNorm + ReLU + max-pool kernels compute what the eager modules
compute, to float32 rounding, and take over only where they may.

The comparisons are against the same modules run one by one (``native_block.FUSED_BLOCKS``
off), on real Omniglot images and on random activations of awkward shapes (odd sizes, channel
counts that fill no vector, more than one vector), on one thread and on two.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import higher
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from learned_optim import native_block
from learned_optim.data import EpisodeSampler, omniglot
from learned_optim.learners import ConvFeatures, ConvLearner
from learned_optim.native_block import batchnorm_relu_maxpool, fusable

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"

pytestmark = pytest.mark.skipif(
    not fusable(torch.zeros(1, 2, 2, 2).contiguous(memory_format=torch.channels_last),
                nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2)),
    reason="the fused conv-block kernels did not build here")


@pytest.fixture(scope="module")
def support_set() -> tuple[torch.Tensor, torch.Tensor]:
    """A real 20-way 5-shot Omniglot support set (100 images, 28 x 28)."""
    sampler = EpisodeSampler(omniglot(ROOT, "val", "lake"), ways=20, shots=5, queries=1, seed=4)
    episode = sampler.episode(0)
    return episode.support_inputs, episode.support_targets


def eager(x, batchnorm):
    return F.max_pool2d(F.relu(batchnorm(x)), 2)


def channels_last(*shape, generator) -> torch.Tensor:
    x = torch.randn(*shape, generator=generator) * 2 + 0.5
    return x.contiguous(memory_format=torch.channels_last).requires_grad_()


def assert_close_to_scale(actual, expected, rtol=2e-5):
    """Equal to float32 rounding relative to the tensor's largest value (a sum of thousands of
    terms that cancel, e.g. BatchNorm's input gradient, has no tighter elementwise bound)."""
    scale = float(expected.detach().abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("shape", [(100, 32, 28, 28), (5, 32, 7, 7), (3, 20, 5, 6),
                                   (4, 40, 3, 3), (2, 8, 2, 2), (6, 17, 9, 4)])
@pytest.mark.parametrize("thread_count", [1, 2])
def test_outputs_gradients_and_running_statistics_equal_the_eager_modules(shape, thread_count,
                                                                          threads):
    threads(thread_count)
    generator = torch.Generator().manual_seed(sum(shape))
    x = channels_last(*shape, generator=generator)
    modules = []
    for _ in range(2):
        batchnorm = nn.BatchNorm2d(shape[1], momentum=0.3)
        with torch.no_grad():
            batchnorm.weight.uniform_(-1, 2, generator=torch.Generator().manual_seed(1))
            batchnorm.bias.normal_(generator=torch.Generator().manual_seed(2))
        modules.append(batchnorm)
    expected = eager(x, modules[0])
    assert fusable(x, modules[1], nn.ReLU(), nn.MaxPool2d(2))
    actual = batchnorm_relu_maxpool(x, modules[1])
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_scale(actual, expected)
    d_out = torch.randn(expected.shape, generator=generator)
    expected_grads = torch.autograd.grad(expected, (x, modules[0].weight, modules[0].bias), d_out)
    actual_grads = torch.autograd.grad(actual, (x, modules[1].weight, modules[1].bias), d_out)
    for got, want in zip(actual_grads, expected_grads):
        assert_close_to_scale(got, want)
    # (eager's float32 variance is the less exact: 7e-6 against 1e-7 of float64's at the
    # largest shape)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(modules[1], name), getattr(modules[0], name),
                                   rtol=3e-5, atol=1e-6)
    assert int(modules[1].num_batches_tracked) == int(modules[0].num_batches_tracked) == 1


def test_windows_that_tie_and_values_the_relu_stops_route_the_gradient_as_eager():
    # Ties inside a window (the first maximum takes the gradient) and windows wholly negative
    # after normalisation (no gradient at all) are where a pooling gradient goes wrong.
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, -3.0, -3.0],
                      [2.0, 0.0, 2.0, 2.0], [0.0, 2.0, 2.0, 2.0]])
    x = torch.stack([x, -x]).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    results = []
    for fused in (False, True):
        batchnorm = nn.BatchNorm2d(2)
        out = batchnorm_relu_maxpool(x, batchnorm) if fused else eager(x, batchnorm)
        results.append((out, *torch.autograd.grad(out.sum(), (x, batchnorm.weight))))
    (out_e, dx_e, dw_e), (out_f, dx_f, dw_f) = results
    torch.testing.assert_close(out_f, out_e)
    torch.testing.assert_close(dx_f, dx_e)
    torch.testing.assert_close(dw_f, dw_e)


def test_a_nan_activation_comes_out_nan_as_eager():
    x = torch.randn(2, 4, 4, 4).contiguous(memory_format=torch.channels_last)
    x[0, 1, 2, 3] = float("nan")
    out = batchnorm_relu_maxpool(x, nn.BatchNorm2d(4))
    assert out[:, 1].isnan().all() and not out[:, 0].isnan().any()


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


def relative_error(actual, truth) -> float:
    return float((flat(actual) - flat(truth)).norm() / flat(truth).norm())


@pytest.mark.parametrize("thread_count", [1, 2])
def test_on_a_real_support_set_the_learner_is_closer_to_float64_than_the_eager_modules(
        support_set, monkeypatch, thread_count, threads):
    # Omniglot's blank background makes the first block's activations nearly constant, so
    # eager float32 BatchNorm (its statistics summed in float) loses digits that the kernels'
    # double sums keep: float64 (eager, unfused) is the reference for both.
    threads(thread_count)
    inputs, targets = support_set

    def outputs_and_grads(dtype):
        torch.manual_seed(0)
        learner = ConvLearner(1, ways=20, filters=32, image_size=28).to(dtype)
        assert isinstance(learner.features, ConvFeatures)
        outputs = learner(inputs.to(dtype))
        loss = F.cross_entropy(outputs, targets)
        return outputs, torch.autograd.grad(loss, list(learner.parameters())), learner

    truth_out, truth_grads, truth_learner = outputs_and_grads(torch.float64)
    fused_out, fused_grads, fused_learner = outputs_and_grads(torch.float32)
    monkeypatch.setattr(native_block, "FUSED_BLOCKS", False)
    eager_out, eager_grads, _ = outputs_and_grads(torch.float32)
    scale = float(truth_out.detach().abs().max())
    fused_error = float((fused_out.double() - truth_out).detach().abs().max()) / scale
    eager_error = float((eager_out.double() - truth_out).detach().abs().max()) / scale
    assert fused_error < 1e-5 and fused_error < eager_error, (fused_error, eager_error)
    # measured 2.5e-5 against eager float32's 2.4e-2 (one thread)
    assert relative_error(fused_grads, truth_grads) < 2e-4
    assert relative_error(fused_grads, truth_grads) < relative_error(eager_grads, truth_grads)
    for fused, truth in zip(fused_learner.buffers(), truth_learner.buffers()):
        torch.testing.assert_close(fused.to(truth.dtype), truth, rtol=1e-5, atol=1e-6)


def test_a_gradient_of_the_gradient_is_exact(threads):
    # create_graph=True through the fused node recomputes the block eagerly.
    generator = torch.Generator().manual_seed(5)
    x = channels_last(3, 6, 6, 6, generator=generator)
    results = []
    for fused in (False, True):
        batchnorm = nn.BatchNorm2d(6)
        out = batchnorm_relu_maxpool(x, batchnorm) if fused else eager(x, batchnorm)
        (dx,) = torch.autograd.grad((out ** 2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(dx.pow(2).sum(), (x, batchnorm.weight)))
    for got, want in zip(*results[::-1]):
        assert_close_to_scale(got, want)


def test_a_higher_inner_loop_meta_gradient_is_no_further_from_float64_than_eager(
        support_set, monkeypatch):
    # Two second-order SGD steps through max-pooling on real images: float32 routes some
    # near-tied windows differently from float64, so neither path is close to it; the fused
    # one (double-backward through its eager recompute) must be no further than eager.
    inputs, targets = support_set

    def meta_gradient(dtype):
        torch.manual_seed(1)
        learner = ConvLearner(1, ways=20, filters=8, image_size=28).to(dtype)
        opt = torch.optim.SGD(learner.parameters(), lr=0.01)
        with higher.innerloop_ctx(learner, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(F.cross_entropy(fmodel(inputs.to(dtype)), targets))
            F.cross_entropy(fmodel(inputs.to(dtype)), targets).backward()
        return [p.grad for p in learner.parameters()]

    truth = meta_gradient(torch.float64)
    fused_error = relative_error(meta_gradient(torch.float32), truth)
    monkeypatch.setattr(native_block, "FUSED_BLOCKS", False)
    eager_error = relative_error(meta_gradient(torch.float32), truth)
    assert fused_error < max(eager_error, 0.12), (fused_error, eager_error)  # 0.077 and 0.149


def test_only_batch_statistics_on_channels_last_float32_cpu_activations_are_fused(monkeypatch):
    x = torch.zeros(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    block = (nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
    assert fusable(x, *block)
    assert not fusable(x.contiguous(), *block)  # NCHW
    assert not fusable(x.double(), *block)
    one_row = torch.zeros(2, 4, 1, 6).contiguous(memory_format=torch.channels_last)
    assert not fusable(one_row, *block)  # nothing to pool
    assert not fusable(x, nn.BatchNorm2d(4).eval(), *block[1:])  # running statistics
    assert fusable(x, nn.BatchNorm2d(4, track_running_stats=False).eval(), *block[1:])
    assert not fusable(x, nn.BatchNorm2d(4, affine=False), *block[1:])
    assert not fusable(x, block[0], nn.GELU(), block[2])
    for pool in (nn.MaxPool2d(3), nn.MaxPool2d(2, stride=1), nn.MaxPool2d(2, ceil_mode=True),
                 nn.AvgPool2d(2)):
        assert not fusable(x, block[0], block[1], pool)
    monkeypatch.setattr(native_block, "FUSED_BLOCKS", False)  # LEARNED_OPTIM_COMPILE=0
    assert not fusable(x, *block)


def test_torch_func_transforms_run_the_eager_modules(support_set, monkeypatch):
    inputs, targets = support_set
    torch.manual_seed(2)
    learner = ConvLearner(1, ways=20, filters=8, image_size=28)
    params = dict(learner.named_parameters())

    def loss(weights, buffers):  # the running statistics are inputs, so they may be updated
        outputs = torch.func.functional_call(learner, {**weights, **buffers}, (inputs,))
        return F.cross_entropy(outputs, targets)

    # functorch-wrapped activations have no data pointer for the kernels: the eager modules
    transformed = torch.func.grad(loss)(params, dict(learner.named_buffers()))
    monkeypatch.setattr(native_block, "FUSED_BLOCKS", False)
    eager = torch.autograd.grad(loss(params, dict(learner.named_buffers())),
                                list(params.values()))
    for name, grad in zip(params, eager):
        torch.testing.assert_close(transformed[name], grad)


def test_a_failed_build_warns_once_and_the_learner_runs_its_eager_modules(no_cpp_compiler,
                                                                        support_set):
    no_cpp_compiler(native_block._forward_kernel, native_block._backward_kernel)
    inputs, targets = support_set
    learner = ConvLearner(1, ways=20, filters=8, image_size=28)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            F.cross_entropy(learner(inputs), targets).backward()
    messages = [str(w.message) for w in caught if "conv-block" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler found" in messages[0], messages
    assert "eager modules" in messages[0]
    assert all(torch.isfinite(p.grad).all() for p in learner.parameters())


def test_fewer_openmp_threads_than_asked_still_sum_every_value():
    # OMP_THREAD_LIMIT=1 with torch asked for two: the kernels' sums of threads that never
    # ran must count as zero (they are zeroed, not left as allocated).
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from torch import nn\n"
        "from learned_optim.native_block import batchnorm_relu_maxpool\n"
        "torch.set_num_threads(2)\n"
        "x = torch.randn(50, 32, 28, 28, generator=torch.Generator().manual_seed(0))\n"
        "x = x.contiguous(memory_format=torch.channels_last).requires_grad_()\n"
        "bn = nn.BatchNorm2d(32)\n"
        "out = batchnorm_relu_maxpool(x, bn)\n"
        "(dx,) = torch.autograd.grad(out.sum(), x)\n"
        "truth = nn.functional.max_pool2d(torch.relu(nn.functional.batch_norm(\n"
        "    x.double(), None, None, training=True)), 2)\n"
        "(tdx,) = torch.autograd.grad(truth.sum(), x)\n"
        "print(float((out.double() - truth).abs().max()), float((dx - tdx).abs().max()))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "OMP_THREAD_LIMIT": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    out_error, grad_error = map(float, result.stdout.split())
    assert out_error < 1e-5 and grad_error < 1e-5, result.stdout


def test_a_float64_default_dtype_changes_nothing_for_a_float32_learner(default_dtype):
    # The fused blocks allocate their outputs and statistics themselves: float32 whatever
    # the default dtype (before, the first block's output came out float64 and the next
    # convolution refused it).
    torch.manual_seed(0)
    learner, inputs = ConvLearner(1, ways=5, filters=8, image_size=28), torch.rand(5, 1, 28, 28)

    def output_and_gradient():
        learner.zero_grad()
        out = learner(inputs)
        out.square().sum().backward()
        return out.detach(), learner.features[0].weight.grad.clone()

    expected = output_and_gradient()
    default_dtype(torch.float64)
    for ours, theirs in zip(output_and_gradient(), expected):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
