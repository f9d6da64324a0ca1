"""Ensembles of learners in evaluate: each member adapts on its own, the queries get the mean
of their probabilities; members that would see other episodes or images are refused."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from learned_optim.checkpoint import load_checkpoint
from learned_optim.ensemble import Member, ensemble_log_probabilities
from learned_optim.evaluate import (
    evaluate,
    evaluation_config,
    learner_with_init,
    nearest_neighbour_score,
)
from learned_optim.finetune import finetune
from learned_optim.tasks import build_task

RESNET = "omniglot-lake-alphabets-resnet12-20w1s"  # adapts its head alone
CONV = "omniglot-lake-alphabets-20w1s"  # adapts every parameter
EPISODES = 3


@pytest.fixture(scope="module")
def data_root(shared_data) -> str:
    return str(shared_data / "omniglot")


@pytest.fixture(scope="module")
def report(data_root):
    torch.set_num_threads(1)
    return evaluate(RESNET, ensemble=[CONV], data_root=data_root, episodes=EPISODES,
                    queries=5, baselines=("nn",))


def test_one_member_is_the_member_itself():
    torch.manual_seed(0)
    x, y = torch.randn(12, 4), torch.arange(3).repeat(4)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    sgd = functools.partial(torch.optim.SGD, lr=0.3)
    alone = finetune(model, x, y, optimizer=sgd, steps=4)
    with torch.no_grad():
        expected = alone(x).log_softmax(dim=1)
    got = ensemble_log_probabilities([Member(model, sgd, steps=4)], x, y, x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least one member"):
        ensemble_log_probabilities([], x, y, x)


def test_the_ensemble_scores_the_mean_of_its_members_probabilities(report, data_root):
    assert list(report.results) == ["meta-learner LSTM ensemble", "nn"]
    assert [p.rsplit("/", 1)[-1] for p in report.setting["ensemble"]] == [
        f"{RESNET}.safetensors", f"{CONV}.safetensors"]
    overrides = {"data_root": data_root, "queries": 5, "device": "cpu"}
    checkpoints = [load_checkpoint(RESNET), load_checkpoint(CONV)]
    tasks = [build_task(evaluation_config(c, overrides)) for c in checkpoints]
    learners = [learner_with_init(t, c, "cpu")[0] for t, c in zip(tasks, checkpoints)]
    assert [t.config.adapt for t in tasks] == ["head", "all"]
    for index in range(EPISODES):
        episode = tasks[0].episodes("test").episode(index)
        assert torch.equal(episode.query_inputs, tasks[1].episodes("test").episode(
            index).query_inputs)  # the members see the same images
        probabilities = []
        for learner, checkpoint, task in zip(learners, checkpoints, tasks):
            adapted = finetune(learner, episode.support_inputs, episode.support_targets,
                               optimizer=checkpoint, steps=task.config.inner_steps,
                               adapt=task.config.adapt)
            with torch.no_grad():
                probabilities.append(adapted(episode.query_inputs).softmax(dim=1))
        mean = (probabilities[0] + probabilities[1]) / 2
        accuracy = (mean.argmax(dim=1) == episode.query_targets).float().mean().item()
        assert report.scores["meta-learner LSTM ensemble"][index] == pytest.approx(accuracy)
        assert report.scores["nn"][index] == pytest.approx(
            nearest_neighbour_score(learners, episode, tasks[0]))
    # 20-way one-shot within an alphabet: chance is 5%
    assert report.results["meta-learner LSTM ensemble"].mean >= 0.8


def test_members_that_would_see_other_episodes_or_images_are_refused(data_root):
    with pytest.raises(ValueError, match="ensemble member .*omniglot-lake-5w1s.* its protocol "
                                         "'lake-within' differs"):
        evaluate(RESNET, ensemble=["omniglot-lake-5w1s"], data_root=data_root, episodes=1)
    # the same protocol forced on both: the 4-block lake checkpoint reads uncropped images
    with pytest.raises(ValueError, match="ensemble member .*omniglot-lake-20w1s.* image "
                                         "preprocessing"):
        evaluate(CONV, ensemble=["omniglot-lake-20w1s"], data_root=data_root,
                 protocol="lake-alphabets", episodes=1)
    with pytest.raises(ValueError, match="maml and metasgd baselines take one checkpoint"):
        evaluate(RESNET, ensemble=[CONV], data_root=data_root, episodes=1,
                 baselines=("maml",))


def test_every_member_passes_the_overlap_check(data_root):
    # both pre-trained their features on the validation alphabets
    with pytest.raises(ValueError, match="ensemble member 1") as error:
        evaluate(RESNET, ensemble=[CONV], data_root=data_root, split="val", episodes=1)
    assert "checkpoint (" in str(error.value)
