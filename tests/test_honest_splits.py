"""Checkpoints record what they were meta-trained on; evaluate refuses overlapping test splits."""

from __future__ import annotations

import pytest
import torch

from learned_optim import load_checkpoint, save_checkpoint
from learned_optim.checkpoint import CheckpointError, read_preprocessing, read_training_data
from learned_optim.cli import main
from learned_optim.data.splits import split_characters, split_overlap, training_data
from learned_optim.evaluate import evaluate
from learned_optim.metalearner import MetaLearnerLSTM


def test_vinyals_checkpoints_saw_about_three_quarters_of_lakes_test_characters():
    seen = training_data(load_checkpoint("omniglot-20w1s").record["config"])
    overlap = split_overlap(seen, "lake-within", "test")
    assert (overlap.characters, overlap.seen_in_training, overlap.seen_in_validation) == (
        659, 453, 33)
    assert split_overlap(seen, "vinyals", "test").seen == 0


def test_lake_training_splits_hold_only_background_characters():
    seen = training_data({"task": "omniglot", "protocol": "lake-within"})
    background = set(range(964))
    for split in ("train", "val"):
        assert set(seen["characters"][split]) <= background
    assert len(seen["characters"]["train"]) + len(seen["characters"]["val"]) == 964
    assert split_overlap(seen, "lake-within", "test").seen == 0
    assert set(split_characters("lake", "test").tolist()) == set(range(964, 1623))


def test_evaluate_refuses_an_overlapping_split_and_names_the_count(shared_data):
    with pytest.raises(ValueError, match=r"486 of the 659 Omniglot characters of the 'test' "
                                         r"split of protocol 'lake-within'.*force_overlap"):
        evaluate("omniglot-20w1s", protocol="lake-within", episodes=2,
                 data_root=str(shared_data / "omniglot"))


def test_forced_evaluation_records_the_overlap(shared_data):
    torch.set_num_threads(1)
    report = evaluate("omniglot-5w1s", protocol="lake-within", episodes=2, queries=1,
                      data_root=str(shared_data / "omniglot"), force_overlap=True)
    assert report.setting["overlap"]["checkpoint"]["seen"] == 486
    assert report.setting["queries"] == 1 and next(iter(report.results.values())).n == 2


def test_cli_evaluate_refuses_without_force_overlap(shared_data, capsys):
    code = main(["evaluate", "omniglot-5w1s", "--protocol", "lake-within", "--episodes", "2",
                 "--data-root", str(shared_data / "omniglot"), "--no-progress"])
    assert code == 2
    assert "--force-overlap" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["omniglot-lake-5w1s", "omniglot-lake-20w1s",
                                  "omniglot-lake-alphabets-20w1s",
                                  "omniglot-lake-alphabets-resnet12-20w1s"])
def test_lake_checkpoints_record_their_characters_and_preprocessing(name):
    checkpoint = load_checkpoint(name)
    seen = read_training_data(checkpoint)
    assert seen["split_protocol"] in ("lake", "lake-alphabets") and seen["split_seed"] == 0
    assert max(seen["characters"]["train"] + seen["characters"]["val"]) < 964
    expected = {"size": 28, "mode": "L", "resample": "lanczos", "invert": True, "mean": None,
                "std": None, "train_mean": 0.0815}
    if name.startswith("omniglot-lake-alphabets-"):  # since session 19: cropped to the ink
        expected.update(train_mean=0.137, crop_to_ink=0.1)
    assert read_preprocessing(checkpoint) == expected


def test_malformed_record_fields_name_the_file_and_field(tmp_path):
    path = save_checkpoint(tmp_path / "bad.safetensors", MetaLearnerLSTM(),
                           training_data={"dataset": "omniglot", "characters": {"train": [-1]}},
                           preprocessing={"size": 28, "resample": "sharp"})
    checkpoint = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"bad.safetensors: invalid field 'training_data'"):
        read_training_data(checkpoint)
    with pytest.raises(CheckpointError, match=r"bad.safetensors: invalid field 'preprocessing'"):
        read_preprocessing(checkpoint)


def test_the_lake_alphabets_checkpoint_counts_its_warm_starts_characters():
    seen = read_training_data(load_checkpoint("omniglot-lake-alphabets-20w1s"))
    assert seen["warm_started_from"] == ["omniglot-lake-20w1s"]
    lake = read_training_data(load_checkpoint("omniglot-lake-20w1s"))
    assert set(lake["characters"]["train"]) <= set(seen["characters"]["train"])
    assert len(seen["characters"]["train"]) == 944  # 795 of its own, 868 of the warm start's
