"""The conv learner runs channels-last on a CPU and computes what it computes in NCHW.

Only the activations change layout (``ConvLearner.forward`` restrides its inputs); these tests
pin that the outputs, the learner's gradients and a meta-gradient through ``higher`` are the same
to float64 rounding as with NCHW, first and second order.
"""

from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM, learners
from learned_optim.learners import ConvLearner, conv_memory_format
from learned_optim.train import episode_query_loss

RTOL, ATOL = 1e-10, 1e-13


def test_cpu_runs_channels_last_and_other_devices_nchw():
    assert conv_memory_format(torch.device("cpu")) == torch.channels_last
    assert conv_memory_format(torch.device("cuda")) == torch.contiguous_format


def test_the_policy_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(learners, "CPU_CHANNELS_LAST", False)
    assert conv_memory_format(torch.device("cpu")) == torch.contiguous_format


def first_conv_output(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    handle = conv.register_forward_hook(lambda m, i, out: seen.append(out))
    model(inputs)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("channels", [1, 3])
def test_activations_are_channels_last_by_default_on_the_cpu(channels):
    learner = ConvLearner(channels, ways=5, filters=8, image_size=28)
    output = first_conv_output(learner, torch.randn(4, channels, 28, 28))
    assert output.is_contiguous(memory_format=torch.channels_last)
    assert not output.is_contiguous()
    # The parameters keep their layout: checkpoints and the update rule see the same tensors.
    assert all(p.is_contiguous() for p in learner.parameters())


def test_channels_last_false_keeps_nchw():
    learner = ConvLearner(1, ways=5, filters=8, image_size=28, channels_last=False)
    assert first_conv_output(learner, torch.randn(4, 1, 28, 28)).is_contiguous()


def learner_pair(channels: int, image_size: int, blocks: int = 4):
    torch.manual_seed(0)
    nchw = ConvLearner(channels, ways=5, filters=8, image_size=image_size, blocks=blocks,
                       channels_last=False).double()
    nhwc = ConvLearner(channels, ways=5, filters=8, image_size=image_size, blocks=blocks,
                       channels_last=True).double()
    nhwc.load_state_dict(nchw.state_dict())
    return nchw, nhwc


@pytest.mark.parametrize("channels,image_size", [(1, 28), (3, 42)], ids=["omniglot", "rgb"])
@pytest.mark.parametrize("train", [True, False], ids=["train-mode", "eval-mode"])
def test_outputs_and_gradients_equal_nchw_at_float64(channels, image_size, train):
    nchw, nhwc = learner_pair(channels, image_size)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(10, channels, image_size, image_size, generator=generator,
                         dtype=torch.float64)
    targets = torch.arange(5).repeat(2)
    results = []
    for learner in (nchw, nhwc):
        learner.train()
        learner(inputs)  # running statistics for eval mode, the same in both
        learner.train(train)
        outputs = learner(inputs)
        grads = torch.autograd.grad(F.cross_entropy(outputs, targets), list(learner.parameters()))
        results.append((outputs, grads, [b.clone() for b in learner.buffers()]))
    (out_a, grads_a, buffers_a), (out_b, grads_b, buffers_b) = results
    assert out_a.abs().max() > 1e-3  # real outputs
    torch.testing.assert_close(out_b, out_a, rtol=RTOL, atol=ATOL)
    for grad_a, grad_b in zip(grads_a, grads_b):
        assert grad_a.abs().max() > 0
        torch.testing.assert_close(grad_b, grad_a, rtol=RTOL, atol=ATOL)
    for buffer_a, buffer_b in zip(buffers_a, buffers_b):
        torch.testing.assert_close(buffer_b, buffer_a, rtol=RTOL, atol=ATOL)


def tiny_episode() -> SimpleNamespace:
    """3-way 2-shot, 12 x 12 images, 2 queries per class, float64."""
    generator = torch.Generator().manual_seed(2)
    return SimpleNamespace(
        support_inputs=torch.randn(6, 1, 12, 12, generator=generator, dtype=torch.float64),
        support_targets=torch.arange(3).repeat(2),
        query_inputs=torch.randn(6, 1, 12, 12, generator=generator, dtype=torch.float64),
        query_targets=torch.arange(3).repeat(2))


def meta_gradient(channels_last: bool, first_order: bool):
    torch.manual_seed(3)
    learner = ConvLearner(1, ways=3, filters=8, image_size=12, blocks=2,
                          channels_last=channels_last).double()
    rule = MetaLearnerLSTM().double()
    with torch.no_grad():  # larger than the fresh rule's init, so every path matters
        for weight in rule.parameters():
            weight.add_(torch.randn_like(weight) * 0.1)
    task = SimpleNamespace(loss=F.cross_entropy,
                           metric=lambda out, y: out.argmax(1).eq(y).double().mean())
    opt = LSTMMetaOptimizer(learner.parameters(), rule, first_order=first_order)
    loss, _ = episode_query_loss(learner, opt, {}, tiny_episode(), 4, task)
    loss.backward()
    return (loss.item(), {name: w.grad for name, w in rule.named_parameters()},
            [p.grad for p in learner.parameters()])


@pytest.mark.parametrize("first_order", [True, False], ids=["first-order", "second-order"])
def test_meta_gradient_through_higher_equals_nchw(first_order):
    loss, rule_grads, init_grads = meta_gradient(channels_last=False, first_order=first_order)
    cl_loss, cl_rule_grads, cl_init_grads = meta_gradient(channels_last=True,
                                                          first_order=first_order)
    assert cl_loss == pytest.approx(loss, rel=1e-12)
    for name, grad in rule_grads.items():
        assert grad.abs().max() > 1e-8, name
        torch.testing.assert_close(cl_rule_grads[name], grad, rtol=1e-9, atol=1e-14)
    for grad, cl_grad in zip(init_grads, cl_init_grads):
        torch.testing.assert_close(cl_grad, grad, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("channels_last", [True, False])
def test_higher_fast_model_keeps_the_learners_layout(channels_last):
    import higher

    learner = ConvLearner(1, ways=3, filters=8, image_size=12, blocks=2,
                          channels_last=channels_last)
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    with higher.innerloop_ctx(learner, opt) as (fmodel, _):
        output = first_conv_output(fmodel, torch.randn(2, 1, 12, 12))
    assert output.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert output.is_contiguous() != channels_last


def test_general_conv_nets_run_channels_last_with_the_same_numbers(monkeypatch):
    from learned_optim.general import make_convnet

    torch.manual_seed(0)
    model = make_convnet(1, 14, 3, 8, 5, batchnorm=True).double()
    inputs = torch.randn(6, 1, 14, 14, dtype=torch.float64)
    targets = torch.arange(5).repeat(2)[:6]

    def outputs_and_gradients():
        outputs = model(inputs)
        return outputs, torch.autograd.grad(F.cross_entropy(outputs, targets),
                                            list(model.parameters()))

    assert first_conv_output(model, inputs).is_contiguous(memory_format=torch.channels_last)
    outputs, grads = outputs_and_gradients()
    monkeypatch.setattr(learners, "CPU_CHANNELS_LAST", False)
    assert first_conv_output(model, inputs).is_contiguous()
    nchw_outputs, nchw_grads = outputs_and_gradients()
    torch.testing.assert_close(outputs, nchw_outputs, rtol=RTOL, atol=ATOL)
    for grad, nchw_grad in zip(grads, nchw_grads):
        torch.testing.assert_close(grad, nchw_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("first_order", [True, False], ids=["first-order", "second-order"])
def test_meta_training_learner_is_channels_last_only_in_first_order(tmp_path, shared_data,
                                                                    first_order):
    from learned_optim.config import MetaTrainConfig
    from learned_optim.train import MetaTrainer

    config = MetaTrainConfig(task="omniglot", protocol="lake-within", filters=8,
                             data_root=str(shared_data / "omniglot"), first_order=first_order,
                             run_dir=str(tmp_path / "run"), meta_batch=2, val_episodes=5)
    trainer = MetaTrainer(config, progress=False)
    # The learner's double backward (second order) is slower channels-last.
    assert trainer.learner.channels_last is first_order
