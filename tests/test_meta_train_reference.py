"""The straightforward reference of benchmarks/meta_train.py computes the package's meta-gradient.

The benchmark times the package against that reference (issue 16); these tests make the
comparison fair: on a tiny episode at float64, both give the same meta-gradient on every
weight of the rule and on the learned init, first and second order.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import meta_train  # noqa: E402

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM  # noqa: E402
from learned_optim.learners import ConvLearner  # noqa: E402
from learned_optim.train import episode_query_loss  # noqa: E402

STEPS = 4


def tiny_episode(seed: int = 0) -> SimpleNamespace:
    """3-way 2-shot, 8 x 8 images, 2 queries per class, float64."""
    generator = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        support_inputs=torch.randn(6, 1, 8, 8, generator=generator, dtype=torch.float64),
        support_targets=torch.arange(3).repeat(2),
        query_inputs=torch.randn(6, 1, 8, 8, generator=generator, dtype=torch.float64),
        query_targets=torch.arange(3).repeat(2))


def learner_and_rule():
    torch.manual_seed(3)
    learner = ConvLearner(1, ways=3, filters=4, image_size=8, blocks=2).double()
    rule = MetaLearnerLSTM().double()
    with torch.no_grad():  # larger than the fresh rule's init, so every path matters
        for weight in rule.parameters():
            weight.add_(torch.randn_like(weight) * 0.1)
    return learner, rule


def package_meta_gradient(first_order: bool):
    learner, rule = learner_and_rule()
    task = SimpleNamespace(loss=F.cross_entropy, metric=lambda out, y: out.argmax(1).eq(y).float()
                           .mean())
    opt = LSTMMetaOptimizer(learner.parameters(), rule, first_order=first_order)
    loss, _ = episode_query_loss(learner, opt, {}, tiny_episode(), STEPS, task)
    loss.backward()
    return (loss.item(), {name: w.grad for name, w in rule.named_parameters()},
            [p.grad for p in learner.parameters()])


def reference_meta_gradient(first_order: bool):
    learner, rule = learner_and_rule()
    reference = meta_train.StraightforwardRule(rule)
    loss = meta_train.reference_query_loss(learner, reference, tiny_episode(), STEPS,
                                           F.cross_entropy, first_order)
    loss.backward()
    return (loss.item(), reference.gradients_as_package(),
            [p.grad for p in learner.parameters()])


@pytest.mark.parametrize("first_order", [True, False], ids=["first-order", "second-order"])
def test_reference_meta_gradient_equals_the_packages(first_order):
    loss, rule_grads, init_grads = package_meta_gradient(first_order)
    ref_loss, ref_rule_grads, ref_init_grads = reference_meta_gradient(first_order)
    assert ref_loss == pytest.approx(loss, rel=1e-12)
    assert loss > 0.5  # a real loss: the episode is not solved
    for name, grad in rule_grads.items():
        assert grad.abs().max() > 1e-6, name  # every rule weight receives a meta-gradient
        torch.testing.assert_close(ref_rule_grads[name], grad, rtol=1e-9, atol=1e-12)
    for grad, ref_grad in zip(init_grads, ref_init_grads):
        torch.testing.assert_close(ref_grad, grad, rtol=1e-9, atol=1e-12)


def test_second_order_differs_from_first_order():
    """The second-order variant really differentiates through the learner's gradients."""
    _, first, _ = reference_meta_gradient(first_order=True)
    _, second, _ = reference_meta_gradient(first_order=False)
    difference = max((first[n] - second[n]).abs().max().item() for n in first)
    assert difference > 1e-6


def test_paper_preprocessing_matches_the_package():
    from learned_optim.metalearner import preprocess

    x = torch.tensor([1.0, -0.5, 0.0, 1e-6, -3e-5, 4.6e-5, 20.0], dtype=torch.float64)
    torch.testing.assert_close(meta_train.paper_preprocess(x), preprocess(x, 10.0),
                               rtol=0, atol=1e-15)


def test_the_parts_report_differentiates_the_learner_twice_as_second_order_runs_it(
        shared_data, tmp_path):
    # The first/second-order report's (a2) times the learner's share of a second-order step
    # with its saved tensors counted (a saved-tensor hook), on the NCHW learner second-order
    # meta-training runs: the channels-last fused blocks' double backward goes through
    # torch.func, which refuses such hooks (the report failed there).
    import argparse

    args = argparse.Namespace(data_root=str(shared_data / "omniglot"), ways=5, shots=1,
                              steps=2, filters=4, meta_batch=1, device="cpu")
    parts = meta_train.Parts(meta_train.make_trainer(args, True, tmp_path), steps=2)
    assert not parts.learner_nchw.channels_last
    saved_bytes, _ = meta_train.saved_tensor_bytes(parts.learner_passes_second_order)
    assert saved_bytes > 0
