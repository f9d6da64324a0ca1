"""finetune(): adapting a copy of any model, and the non-transductive BatchNorm protocol."""

import functools

import pytest
import torch
from torch import nn

from learned_optim import MetaLearnerLSTM
from learned_optim.finetune import finetune
from learned_optim.learners import ConvLearner


@pytest.fixture
def episode_pair():
    generator = torch.Generator().manual_seed(0)
    support = torch.rand(5, 1, 28, 28, generator=generator)
    query = torch.rand(15, 1, 28, 28, generator=generator)
    other_support = torch.rand(5, 1, 28, 28, generator=generator) * 3
    return support, torch.arange(5), query, other_support


def conv_learner():
    torch.manual_seed(0)
    return ConvLearner(in_channels=1, ways=5, filters=8, image_size=28, bn_momentum=0.9)


def test_original_model_is_untouched(episode_pair):
    support, labels, _, _ = episode_pair
    model = conv_learner()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = finetune(model, support, labels, optimizer=MetaLearnerLSTM(), steps=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(adapted.head.weight, model.head.weight)
    assert model.training and not adapted.training


def test_query_predictions_do_not_depend_on_other_queries(episode_pair):
    support, labels, query, _ = episode_pair
    adapted = finetune(conv_learner(), support, labels, optimizer=MetaLearnerLSTM(), steps=3)
    with torch.no_grad():
        together = adapted(query)
        one_by_one = torch.cat([adapted(q.unsqueeze(0)) for q in query])
        reversed_order = adapted(query.flip(0)).flip(0)
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together, reversed_order, rtol=1e-5, atol=1e-5)


def test_running_statistics_come_from_this_episode_only(episode_pair):
    support, labels, query, other_support = episode_pair
    model = conv_learner()
    meta = MetaLearnerLSTM()
    alone = finetune(model, support, labels, optimizer=meta, steps=3)
    finetune(model, other_support, labels, optimizer=meta, steps=3)  # an earlier episode
    again = finetune(model, support, labels, optimizer=meta, steps=3)
    for (key, a), b in zip(alone.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key
    # The statistics really are the support set's: the first BN sees its conv output.
    bn = alone.features[1]
    assert bn.num_batches_tracked.item() == 3
    assert bn.running_mean.abs().sum() > 0


def test_factory_optimizers_and_validation(episode_pair):
    support, labels, _, _ = episode_pair
    adapted = finetune(conv_learner(), support, labels,
                       optimizer=functools.partial(torch.optim.Adam, lr=1e-2), steps=2)
    assert isinstance(adapted, nn.Module)
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        finetune(conv_learner(), support, labels, optimizer=MetaLearnerLSTM(), steps=-1)
    with pytest.raises(ValueError, match="5 inputs but 4 targets"):
        finetune(conv_learner(), support, labels[:4], optimizer=MetaLearnerLSTM(), steps=1)


def test_update_rule_adapts_a_model_of_another_architecture(digits):
    """A rule is portable: here a plain MLP on digits, fine-tuned with a trained-free rule."""
    inputs, labels = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    adapted = finetune(model, inputs[:50], labels[:50], optimizer=MetaLearnerLSTM(), steps=12)
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(adapted(inputs[:50]), labels[:50]) < loss(model(inputs[:50]), labels[:50])


def test_the_step_hook_sees_every_update_and_changes_nothing(episode_pair):
    support, labels, query, _ = episode_pair
    model = conv_learner()
    rule = MetaLearnerLSTM()
    seen = []

    def watch(step):
        assert step.model.training
        seen.append((step.step, step.loss.item() > 0, len(step.optimizer.state) > 0))

    watched = finetune(model, support, labels, optimizer=rule, steps=3, on_step=watch)
    plain = finetune(model, support, labels, optimizer=rule, steps=3)
    assert seen == [(1, True, True), (2, True, True), (3, True, True)]
    with torch.no_grad():
        assert torch.equal(watched(query), plain(query))
