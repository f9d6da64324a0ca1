"""Supervised pre-training of the learned init's features (``pretrain_epochs``), on the real
Omniglot zips: it reads the training split only, makes the features separate characters it
never saw, zeroes the head, and a meta-training run records and counts it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learned_optim import load_checkpoint
from learned_optim.cli import main
from learned_optim.config import MetaTrainConfig
from learned_optim.data import EpisodeSampler, FewShotDataset, omniglot
from learned_optim.evaluate import nearest_neighbour_score
from learned_optim.learners import ConvLearner
from learned_optim.pretrain import pretrain_features, random_affine
from learned_optim.runstate import read_log
from learned_optim.tasks import build_task
from learned_optim.train import MetaTrainer

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


@pytest.fixture(scope="module")
def lake_train_subset() -> FewShotDataset:
    """The first 150 training characters of Lake's background split (3,000 images)."""
    return omniglot(ROOT, "train", "lake").subset_classes(range(150))


@pytest.fixture(scope="module")
def lake_val() -> FewShotDataset:
    return omniglot(ROOT, "val", "lake")


def _nn_accuracy(learner, dataset, episodes=40) -> float:
    sampler = EpisodeSampler(dataset, ways=20, shots=1, queries=5, seed=7)
    task = build_task(MetaTrainConfig(task="omniglot", protocol="lake", ways=20,
                                      data_root=str(ROOT)))
    return sum(nearest_neighbour_score(learner, sampler.episode(i), task)
               for i in range(episodes)) / episodes


def test_pretraining_makes_features_separate_unseen_characters(lake_train_subset, lake_val):
    torch.manual_seed(0)
    learner = ConvLearner(1, ways=20, filters=16, image_size=28)
    before = _nn_accuracy(learner, lake_val)
    report = pretrain_features(learner, lake_train_subset, epochs=6, batch_size=32, seed=0)
    after = _nn_accuracy(learner, lake_val)
    assert report.classes == 150 and report.examples == 3000 and report.epochs == 6
    assert report.final_accuracy > 0.5  # it fits the 150 training characters
    # 20-way one-shot nearest neighbour on the 96 validation characters it never saw
    assert before < 0.3 and after > 0.5, (before, after)  # measured 0.18 -> 0.62


def test_pretraining_zeroes_the_head_and_keeps_its_shape(lake_train_subset):
    learner = ConvLearner(1, ways=20, filters=4, image_size=28)
    pretrain_features(learner, lake_train_subset, epochs=1, batch_size=256)
    assert learner.head.weight.shape == (20, 4)
    assert not learner.head.weight.any() and not learner.head.bias.any()


def test_pretraining_is_reproducible_from_its_seed(lake_train_subset):
    weights = []
    for _ in range(2):
        torch.manual_seed(3)
        learner = ConvLearner(1, ways=5, filters=4, image_size=28)
        pretrain_features(learner, lake_train_subset, epochs=1, batch_size=256, seed=5)
        weights.append(torch.cat([p.flatten() for p in learner.features.parameters()]))
    assert torch.equal(*weights)


@pytest.mark.parametrize("epochs", [0, -1, 1.5])
def test_non_positive_epochs_are_refused(lake_train_subset, epochs):
    with pytest.raises(ValueError, match="pretrain epochs must be a positive integer"):
        pretrain_features(ConvLearner(1, 5, 4, 28), lake_train_subset, epochs)


def test_a_learner_without_features_is_refused(lake_train_subset):
    with pytest.raises(ValueError, match="Linear has no 'features' module"):
        pretrain_features(torch.nn.Linear(784, 5), lake_train_subset, 1)


@pytest.mark.parametrize("fields", [{"task": "sinusoid"},
                                    {"task": "omniglot", "learned_init": False}])
def test_the_option_is_refused_where_there_is_no_learned_init_to_pretrain(fields):
    with pytest.raises(ValueError, match=r"pretrain_epochs \(--pretrain-epochs\)"):
        MetaTrainConfig(pretrain_epochs=2, **fields)


def test_a_run_pretrains_once_logs_it_and_counts_its_time(tmp_path):
    config = MetaTrainConfig(task="omniglot", protocol="lake", data_root=str(ROOT), ways=5,
                             filters=4, queries=2, inner_steps=2, meta_steps=2, meta_batch=1,
                             val_episodes=2, validate_every=1, checkpoint_every=1,
                             pretrain_epochs=1, run_dir=str(tmp_path / "run"))
    trainer = MetaTrainer(config, progress=False)
    assert not trainer.learner.head.weight.any()  # pre-trained before the first meta-step
    trainer.run()
    log = read_log(tmp_path / "run")
    (entry,) = [e for e in log if "pretrain" in e]
    assert entry["pretrain"]["classes"] == 868 and entry["pretrain"]["examples"] == 868 * 20
    last = [e for e in log if "meta_loss" in e][-1]
    # the report's seconds are rounded to 0.1 (a fast pre-training can round above the log)
    assert last["elapsed_s"] >= entry["pretrain"]["seconds"] - 0.05
    # the checkpoint says what it saw: the training split, as without pre-training
    record = load_checkpoint(tmp_path / "run" / "best.safetensors").record
    assert record["config"]["pretrain_epochs"] == 1
    assert len(record["training_data"]["characters"]["train"]) == 868
    # a resumed run does not pre-train again
    resumed = MetaTrainer(config, resume=True, progress=False)
    assert torch.equal(resumed.learner.features[0].weight, trainer.learner.features[0].weight)
    assert len([e for e in read_log(tmp_path / "run") if "pretrain" in e]) == 1


def test_the_command_line_passes_the_option_and_names_a_bad_value(tmp_path, capsys):
    args = ["meta-train", "--task", "omniglot", "--protocol", "lake", "--data-root", str(ROOT),
            "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(args + ["--pretrain-epochs", "0"]) == 2
    assert "pretrain_epochs must be a positive integer, got 0" in capsys.readouterr().err
    assert main(args + ["--pretrain-epochs", "2", "--no-learned-init"]) == 2
    assert "pretrain_epochs (--pretrain-epochs)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _centre_of_ink(images: torch.Tensor) -> torch.Tensor:
    """``[n, 2]`` ink-weighted mean (row, column) of ``[n, 1, H, W]`` images, in pixels."""
    rows = torch.arange(images.shape[2], dtype=images.dtype)
    ink = images[:, 0]
    total = ink.sum(dim=(1, 2))
    return torch.stack([(ink.sum(dim=2) * rows).sum(dim=1) / total,
                        (ink.sum(dim=1) * rows).sum(dim=1) / total], dim=1)


def test_distortions_are_small_maps_that_keep_the_ink(lake_val):
    images = lake_val.inputs[:200]  # 10 characters x 20 drawers
    distorted = random_affine(images, torch.Generator().manual_seed(0))
    assert distorted.shape == images.shape and 0.0 <= float(distorted.min())
    assert bool(((distorted - images).flatten(1).abs().sum(dim=1) > 0).all())  # all moved
    # the ink's centre moves by a few pixels at most (a shift of up to 2.8 px per axis plus a
    # small rotation and scale about the image centre)
    moved = (_centre_of_ink(distorted) - _centre_of_ink(images)).norm(dim=1)
    assert float(moved.mean()) < 3.0 and float(moved.max()) < 6.0, (float(moved.mean()),
                                                                     float(moved.max()))
    # and keeps its ink (scale 0.9-1.1 changes the area by at most about a fifth)
    ink = distorted.flatten(1).sum(dim=1) / images.flatten(1).sum(dim=1)
    assert 0.7 < float(ink.min()) and float(ink.max()) < 1.3, (float(ink.min()),
                                                                  float(ink.max()))


def test_distortions_are_reproducible_and_refuse_flat_inputs():
    images = torch.rand(4, 1, 28, 28)
    first = random_affine(images, torch.Generator().manual_seed(2))
    assert torch.equal(first, random_affine(images, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match=r"random_affine needs images \[n, C, H, W\]"):
        random_affine(images.flatten(1))


def test_distorted_pretraining_still_fits_and_transfers(lake_train_subset, lake_val):
    torch.manual_seed(0)
    learner = ConvLearner(1, ways=20, filters=16, image_size=28)
    report = pretrain_features(learner, lake_train_subset, epochs=6, batch_size=32, seed=0,
                               distort=True)
    assert report.final_accuracy > 0.3
    assert _nn_accuracy(learner, lake_val) > 0.5


def test_distortion_needs_pretraining():
    with pytest.raises(ValueError, match=r"pretrain_distort \(--pretrain-distort\).*"
                                         r"pretrain_epochs"):
        MetaTrainConfig(task="omniglot", pretrain_distort=True)
