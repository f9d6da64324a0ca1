"""Protocol ``lake-alphabets``: Lake's test, validated on whole held-out background alphabets.

``lake-within`` validates on 96 background characters spread over 30 alphabets, too few per
alphabet for 20-way within-alphabet episodes, so its validation mixes alphabets and says little
about the within-alphabet test. ``lake-alphabets`` holds out five whole background alphabets
instead; these tests check the split on the real Omniglot zips.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import learned_optim.data as data_module
from learned_optim.config import MetaTrainConfig
from learned_optim.data import WithinAlphabetSampler, omniglot
from learned_optim.data.omniglot import (
    BACKGROUND_ALPHABETS,
    lake_val_alphabets,
    omniglot_split_characters,
    split_by_alphabets,
)
from learned_optim.data.splits import split_characters, split_overlap, training_data
from learned_optim.tasks import build_task, join_classes
from learned_optim.train import MetaTrainer

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
VAL_ALPHABETS = ["Latin", "Asomtavruli_(Georgian)", "Early_Aramaic", "Futurama", "Tifinagh"]


def _alphabets(names) -> set[str]:
    return {name.split("/")[0] for name in names}


@pytest.fixture(scope="module")
def task():
    return build_task(MetaTrainConfig(task="omniglot", protocol="lake-alphabets", ways=20,
                                      data_root=str(ROOT)))


def test_the_validation_alphabets_are_five_whole_alphabets_of_at_least_20_characters():
    assert lake_val_alphabets() == VAL_ALPHABETS
    counts = dict(BACKGROUND_ALPHABETS)
    assert all(counts[name] >= 20 for name in VAL_ALPHABETS)
    assert len(BACKGROUND_ALPHABETS) == 30 and sum(counts.values()) == 964


def test_splits_partition_the_background_and_keep_lakes_test():
    train = split_characters("lake-alphabets", "train")
    val = split_characters("lake-alphabets", "val")
    assert (len(train), len(val)) == (795, 169)
    assert not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(964))
    assert np.array_equal(split_characters("lake-alphabets", "test"),
                          split_characters("lake-within", "test"))


def test_loaded_splits_hold_whole_alphabets_on_the_official_zips():
    val = omniglot(ROOT, "val", "lake-alphabets")
    train = omniglot(ROOT, "train", "lake-alphabets")
    assert _alphabets(val.class_names) == set(VAL_ALPHABETS)
    assert not _alphabets(train.class_names) & set(VAL_ALPHABETS)
    assert (val.num_classes, train.num_classes) == (169, 795)
    assert len(val) == 20 * 169


def test_every_split_draws_within_one_alphabet_by_other_drawers(task):
    for split in ("train", "val", "test"):
        sampler = task.episodes(split)
        assert isinstance(sampler, WithinAlphabetSampler)
        names = sampler.dataset.class_names
        for index in range(10):
            classes, _, _ = sampler.episode_indices(index)
            assert len(classes) == 20 and len(_alphabets(names[c] for c in classes.tolist())) == 1
            support, query = sampler.episode_drawers(index)
            assert not set(support.tolist()) & set(query.tolist())
    # Validation meets all five alphabets (each has >= 20 characters).
    sampler, names = task.episodes("val"), task.episodes("val").dataset.class_names
    seen = {names[int(sampler.episode_indices(i)[0][0])].split("/")[0] for i in range(60)}
    assert seen == set(VAL_ALPHABETS)


def test_the_test_split_and_its_episodes_are_those_of_lake_within(task):
    within = build_task(MetaTrainConfig(task="omniglot", protocol="lake-within", ways=20,
                                        data_root=str(ROOT)))
    ours, theirs = task.episodes("test"), within.episodes("test")
    assert ours.dataset.class_names == theirs.dataset.class_names
    for index in range(5):
        for a, b in zip(ours.episode_indices(index), theirs.episode_indices(index)):
            assert np.array_equal(a.numpy(), b.numpy())


def test_the_record_counts_no_test_overlap_and_lake_runs_saw_the_validation_alphabets():
    record = training_data({"task": "omniglot", "protocol": "lake-alphabets"})
    assert record["split_protocol"] == "lake-alphabets"
    assert split_overlap(record, "lake-within", "test").seen == 0
    lake = training_data({"task": "omniglot", "protocol": "lake-within"})
    overlap = split_overlap(lake, "lake-alphabets", "val")
    assert overlap.characters == 169 and overlap.seen == 169  # in lake's train or val split


def test_rotations_are_allowed_and_a_partial_archive_is_refused():
    MetaTrainConfig(task="omniglot", protocol="lake-alphabets", ways=20, rotations=True)
    with pytest.raises(ValueError, match="964 background characters"):
        omniglot_split_characters(np.array([0] * 900 + [1] * 659), "val", "lake-alphabets")


def test_pretrain_alphabets_splits_training_alphabets_between_features_and_rule():
    config = MetaTrainConfig(task="omniglot", protocol="lake-alphabets", ways=20,
                             data_root=str(ROOT), pretrain_alphabets=17, pretrain_epochs=1)
    task = build_task(config)
    features = task.pretraining()
    episodes = task.episodes("train")
    pretrained, meta_trained = _alphabets(features.class_names), _alphabets(
        episodes.dataset.class_names)
    assert (len(pretrained), len(meta_trained)) == (17, 8)
    assert not pretrained & meta_trained and not (pretrained | meta_trained) & set(VAL_ALPHABETS)
    assert features.num_classes + episodes.dataset.num_classes == 795
    # Every meta-training episode is drawn from characters the features never saw.
    drawn = set()
    for index in range(40):
        classes, _, _ = episodes.episode_indices(index)
        drawn |= _alphabets(episodes.dataset.class_names[c] for c in classes.tolist())
    assert drawn <= meta_trained and len(drawn) > 1
    # The same seed draws the same alphabets; another seed others.
    assert _alphabets(build_task(config).pretraining().class_names) == pretrained
    other = dataclasses.replace(config, seed=1)
    assert _alphabets(build_task(other).pretraining().class_names) != pretrained
    # Without the split, pre-training reads the training episodes' own data set (loaded once).
    plain = build_task(dataclasses.replace(config, pretrain_alphabets=None))
    assert plain.pretraining() is plain.episodes("train").dataset


def test_split_by_alphabets_keeps_rotated_copies_with_their_alphabet_and_refuses_bad_counts():
    train = omniglot(ROOT, "train", "lake-alphabets", rotations=True)
    first, rest = split_by_alphabets(train, 5, seed=0)
    assert first.num_classes + rest.num_classes == train.num_classes
    assert not _alphabets(first.class_names) & _alphabets(rest.class_names)
    assert {n.split("@")[0] for n in first.class_names}.isdisjoint(
        {n.split("@")[0] for n in rest.class_names})
    for count in (0, 25, 2.5):
        with pytest.raises(ValueError, match="from 1 to 24 .* 25 alphabets"):
            split_by_alphabets(train, count)
    with pytest.raises(ValueError, match="pretrain_alphabets .* Omniglot"):
        MetaTrainConfig(task="sinusoid", pretrain_alphabets=3)
    with pytest.raises(ValueError, match="pretrain_alphabets must be a positive integer"):
        MetaTrainConfig(task="omniglot", pretrain_alphabets=0)


def test_pretrain_on_validation_adds_the_validation_classes_to_pretraining_only(monkeypatch):
    config = MetaTrainConfig(task="omniglot", protocol="lake-alphabets", ways=20,
                             data_root=str(ROOT), pretrain_epochs=1, pretrain_on_validation=True)
    loads = []
    monkeypatch.setattr(data_module, "omniglot",
                        lambda *args, split, **kwargs: loads.append(split)
                        or omniglot(*args, split=split, **kwargs))
    task = build_task(config)
    features, episodes = task.pretraining(), task.episodes("train")
    # 795 training and 169 validation characters: all 964 of the background alphabets
    assert (features.num_classes, episodes.dataset.num_classes) == (964, 795)
    validation = task.episodes("val").dataset
    assert loads == ["train", "val"]  # each split loaded once, for pre-training and episodes
    assert _alphabets(features.class_names[795:]) == set(VAL_ALPHABETS)
    assert features.class_names[795:] == validation.class_names
    assert features.inputs[-len(validation.inputs):].equal(validation.inputs)
    assert features.labels[-1].item() == 963
    # the record says the features saw the validation classes; the seen characters are as before
    record = training_data(config.resolved().to_dict())
    assert record["pretrained_on"] == ["train", "val"]
    assert record["characters"] == training_data(
        dataclasses.replace(config, pretrain_on_validation=False).resolved().to_dict()
    )["characters"]
    assert "pretrained_on" not in training_data({"task": "omniglot",
                                                 "protocol": "lake-alphabets"})
    with pytest.raises(ValueError, match=r"169 class name\(s\) in both, e.g. 'Asomtavruli"):
        join_classes(validation, validation)
    # the command line's flag sets it
    from learned_optim import cli

    args = cli.build_parser().parse_args(["meta-train", "--task", "omniglot", "--pretrain-epochs",
                                          "1", "--pretrain-on-validation"])
    assert cli._config_from(args).pretrain_on_validation is True
    with pytest.raises(ValueError, match="pretrain_on_validation .* set pretrain_epochs"):
        MetaTrainer(MetaTrainConfig(task="omniglot", protocol="lake-alphabets",
                                    data_root=str(ROOT), pretrain_on_validation=True))
    # a continuation of such a run says so too, without pre-training again
    continued = MetaTrainConfig(task="omniglot", protocol="lake-alphabets", init_from="run.st",
                                pretrain_on_validation=True)
    assert training_data(continued.resolved().to_dict())["pretrained_on"] == ["train", "val"]
    with pytest.raises(ValueError, match="cannot be combined"):
        MetaTrainConfig(task="omniglot", pretrain_epochs=1, pretrain_alphabets=17,
                        pretrain_on_validation=True)
    with pytest.raises(ValueError, match="pretrain_on_validation must be true or false"):
        MetaTrainConfig(task="omniglot", pretrain_epochs=1, pretrain_on_validation="yes")
