"""Prototypical pre-training of the learned init's features (``pretrain_episodes``), on the
real Omniglot zips: it makes the features separate characters they never saw, draws its
episodes from the training characters only (inside one alphabet for the lake protocols), zeroes
the head, is reproducible, and a run records and counts it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learned_optim.cli import main
from learned_optim.config import MetaTrainConfig
from learned_optim.data import EpisodeSampler, FewShotDataset, WithinAlphabetSampler, omniglot
from learned_optim.evaluate import nearest_neighbour_score
from learned_optim.learners import ConvLearner
from learned_optim.pretrain import pretrain_prototypical
from learned_optim.runstate import read_log
from learned_optim.tasks import build_task
from learned_optim.train import MetaTrainer

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


@pytest.fixture(scope="module")
def lake_train_subset() -> FewShotDataset:
    """The first 150 training characters of Lake's background split (3,000 images)."""
    return omniglot(ROOT, "train", "lake").subset_classes(range(150))


def _nn_accuracy(learner, episodes=40) -> float:
    task = build_task(MetaTrainConfig(task="omniglot", protocol="lake", ways=20,
                                      data_root=str(ROOT)))
    sampler = EpisodeSampler(omniglot(ROOT, "val", "lake"), ways=20, shots=1, queries=5, seed=7)
    return sum(nearest_neighbour_score(learner, sampler.episode(i), task)
               for i in range(episodes)) / episodes


def test_prototypical_pretraining_separates_unseen_characters(lake_train_subset):
    torch.manual_seed(0)
    learner = ConvLearner(1, ways=20, filters=16, image_size=28)
    before = _nn_accuracy(learner)
    episodes = WithinAlphabetSampler(lake_train_subset, ways=10, shots=5, queries=5, seed=1)
    report = pretrain_prototypical(learner, episodes, count=150, seed=0)
    after = _nn_accuracy(learner)
    assert (report.objective, report.episodes, report.epochs) == ("prototypical", 150, 0)
    assert (report.classes, report.examples) == (150, 3000)
    assert report.final_accuracy > 0.5  # the last 100 episodes' queries, 10-way
    # 20-way one-shot nearest neighbour on the 96 validation characters it never saw
    assert before < 0.3 and after > 0.45, (before, after)  # measured 0.18 -> 0.52
    assert not learner.head.weight.any() and not learner.head.bias.any()


def test_prototypical_pretraining_is_reproducible_from_its_seed(lake_train_subset):
    weights = []
    for _ in range(2):
        torch.manual_seed(3)
        learner = ConvLearner(1, ways=5, filters=4, image_size=28)
        episodes = EpisodeSampler(lake_train_subset, ways=5, shots=2, queries=2, seed=2)
        pretrain_prototypical(learner, episodes, count=3, seed=5, distort=True)
        weights.append(torch.cat([p.flatten() for p in learner.features.parameters()]))
    assert torch.equal(*weights)


@pytest.mark.parametrize("count", [0, -1, 1.5])
def test_a_non_positive_episode_count_is_refused(lake_train_subset, count):
    episodes = EpisodeSampler(lake_train_subset, ways=5, shots=1, queries=1)
    with pytest.raises(ValueError, match="pretrain episodes must be a positive integer"):
        pretrain_prototypical(ConvLearner(1, 5, 4, 28), episodes, count)


def test_a_learner_without_features_is_refused(lake_train_subset):
    episodes = EpisodeSampler(lake_train_subset, ways=5, shots=1, queries=1)
    with pytest.raises(ValueError, match="Linear has no 'features' module"):
        pretrain_prototypical(torch.nn.Linear(784, 5), episodes, 1)


@pytest.mark.parametrize("fields", [{"task": "sinusoid"},
                                    {"task": "omniglot", "learned_init": False}])
def test_the_option_is_refused_where_there_is_no_learned_init_to_pretrain(fields):
    with pytest.raises(ValueError, match=r"pretrain_episodes \(--pretrain-episodes\)"):
        MetaTrainConfig(pretrain_episodes=2, **fields)


def test_distortion_alone_with_prototypical_pretraining_is_accepted():
    config = MetaTrainConfig(task="omniglot", pretrain_episodes=2, pretrain_distort=True)
    assert config.pretrain_distort and config.pretrain_epochs is None
    with pytest.raises(ValueError, match="set pretrain_epochs .* or pretrain_episodes"):
        MetaTrainConfig(task="omniglot", pretrain_distort=True)


def test_the_lake_protocols_pretrain_inside_one_alphabet_of_the_training_characters():
    config = MetaTrainConfig(task="omniglot", protocol="lake-alphabets", ways=20,
                             data_root=str(ROOT), pretrain_alphabets=17)
    task = build_task(config)
    episodes = task.pretraining_episodes(20, 5, 5)
    assert isinstance(episodes, WithinAlphabetSampler)
    assert episodes.dataset is task.pretraining()  # the features' 17 alphabets, nothing else
    names = episodes.dataset.class_names
    for index in range(5):
        classes, _, _ = episodes.episode_indices(index)
        assert len({names[c].split("/")[0] for c in classes.tolist()}) == 1
    # its own stream: not the training episodes' draws
    assert episodes.seed not in (task.episodes("train").seed, task.episodes("val").seed)
    vinyals = build_task(MetaTrainConfig(task="omniglot", ways=5, data_root=str(ROOT)))
    assert type(vinyals.pretraining_episodes(5, 5, 5)) is EpisodeSampler


def test_a_run_pretrains_both_ways_once_logs_them_and_counts_their_time(tmp_path):
    config = MetaTrainConfig(task="omniglot", protocol="lake", data_root=str(ROOT), ways=5,
                             filters=4, queries=2, inner_steps=2, meta_steps=1, meta_batch=1,
                             val_episodes=2, validate_every=1, checkpoint_every=1,
                             pretrain_epochs=1, pretrain_episodes=3,
                             run_dir=str(tmp_path / "run"))
    MetaTrainer(config, progress=False).run()
    log = read_log(tmp_path / "run")
    classifier, prototypical = [e["pretrain"] for e in log if "pretrain" in e]
    assert "objective" not in classifier and classifier["epochs"] == 1
    assert (prototypical["objective"], prototypical["episodes"]) == ("prototypical", 3)
    last = [e for e in log if "meta_loss" in e][-1]
    # each report's seconds are rounded to 0.1
    assert last["elapsed_s"] >= classifier["seconds"] + prototypical["seconds"] - 0.1


def test_the_command_line_passes_the_option_and_names_a_bad_value(tmp_path, capsys):
    args = ["meta-train", "--task", "omniglot", "--protocol", "lake", "--data-root", str(ROOT),
            "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(args + ["--pretrain-episodes", "0"]) == 2
    assert "pretrain_episodes must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
