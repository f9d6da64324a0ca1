"""Rotated training characters for Lake's protocols (``rotations``), on the real Omniglot zips.

With ``rotations`` the "train" split of ``lake`` / ``lake-within`` also holds every background
training character rotated by 90, 180 and 270 degrees, each a new class (and, for
``lake-within``, each rotation of an alphabet a new alphabet); validation and test stay as they
were, and checkpoints record it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from learned_optim import load_checkpoint
from learned_optim.cli import main
from learned_optim.config import MetaTrainConfig, load_config
from learned_optim.data import WithinAlphabetSampler, omniglot
from learned_optim.data.splits import split_overlap, training_data
from learned_optim.packaging.episodic import seen_characters
from learned_optim.runstate import read_log
from learned_optim.tasks import build_task

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
TRAIN_CHARACTERS = 868  # background characters minus the 96 validation ones


def _lake(protocol="lake-within", **fields) -> MetaTrainConfig:
    return MetaTrainConfig(task="omniglot", protocol=protocol, ways=20, data_root=str(ROOT),
                           **fields)


def _digest(sampler, episodes: int = 5) -> str:
    """Images, labels, class names and the first episodes of an episode stream."""
    h = hashlib.sha256()
    data = sampler.dataset
    h.update(data.inputs.numpy().tobytes())
    h.update(data.labels.numpy().tobytes())
    h.update("\n".join(data.class_names).encode())
    for index in range(episodes):
        for t in sampler.episode_indices(index):
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _record_digest(config: MetaTrainConfig) -> str:
    record = training_data(config.resolved().to_dict())
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def plain_train():
    return omniglot(ROOT, "train", "lake-within")


@pytest.fixture(scope="module")
def rotated_train():
    return omniglot(ROOT, "train", "lake-within", rotations=True)


@pytest.fixture(scope="module")
def rotated_task():
    return build_task(_lake(rotations=True))


def test_rotations_give_the_train_split_four_times_the_classes(plain_train, rotated_train):
    assert plain_train.num_classes == TRAIN_CHARACTERS
    assert rotated_train.num_classes == 4 * TRAIN_CHARACTERS
    assert len(rotated_train) == 4 * len(plain_train) == 4 * 20 * TRAIN_CHARACTERS
    # the first 868 classes are the split without rotations, then one block per angle
    n = len(plain_train)
    assert torch.equal(rotated_train.inputs[:n], plain_train.inputs)
    assert torch.equal(rotated_train.labels[:n], plain_train.labels)
    assert rotated_train.class_names[:TRAIN_CHARACTERS] == plain_train.class_names
    for r, angle in enumerate((90, 180, 270), start=1):
        block = rotated_train.class_names[r * TRAIN_CHARACTERS:(r + 1) * TRAIN_CHARACTERS]
        assert block == [f"{name}@rot{angle}" for name in plain_train.class_names]


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_a_rotated_class_holds_rot90_of_the_original_images(plain_train, rotated_train, turns):
    for c in (0, 417, TRAIN_CHARACTERS - 1):
        original = plain_train.inputs[plain_train.labels == c]
        rotated = rotated_train.inputs[rotated_train.labels == turns * TRAIN_CHARACTERS + c]
        assert rotated.shape == (20, 1, 28, 28)
        assert torch.equal(rotated, torch.rot90(original, turns, dims=(2, 3)))
        assert not torch.equal(rotated, original)


def test_within_alphabet_episodes_draw_one_alphabet_at_one_rotation(rotated_task):
    sampler = rotated_task.episodes("train")
    assert isinstance(sampler, WithinAlphabetSampler)
    names = sampler.dataset.class_names
    assert len(sampler.alphabets) == 4 * 23  # 23 background alphabets have >= 20 training chars
    angles_seen = set()
    for index in range(40):
        classes, _, _ = sampler.episode_indices(index)
        alphabets = {names[c].split("/")[0] for c in classes.tolist()}
        angles = {names[c].partition("@")[2] or "rot0" for c in classes.tolist()}
        assert len(classes) == 20 and len(alphabets) == 1 and len(angles) == 1
        angles_seen |= angles
        support, query = sampler.episode_drawers(index)
        assert not set(support.tolist()) & set(query.tolist())
    assert angles_seen == {"rot0", "rot90", "rot180", "rot270"}


def test_validation_and_test_stay_unrotated(rotated_task):
    plain = build_task(_lake())
    for split in ("val", "test"):
        assert "@" not in "".join(rotated_task.episodes(split).dataset.class_names)
        assert _digest(rotated_task.episodes(split)) == _digest(plain.episodes(split))


@pytest.mark.parametrize("protocol, expected", [
    # digests of the data and episodes as learned_optim drew them before rotations existed
    ("lake-within", {"train": "07ba52117d651ba3", "val": "d3bec7ceefbe6888",
                     "test": "ff9a5a50a91efd6f", "record": "84b88bc602de8b99"}),
    ("lake", {"train": "c5bc5f87e7745862", "val": "82a1a40776bce65e",
              "test": "e79be32624c159c7", "record": "5c51e07fe373beed"}),
])
def test_without_rotations_data_episodes_and_record_are_as_before(protocol, expected):
    config = _lake(protocol)
    assert config.rotations is False
    task = build_task(config)
    found = {split: _digest(task.episodes(split)) for split in ("train", "val", "test")}
    found["record"] = _record_digest(config)
    assert found == expected


def test_vinyals_data_is_as_before():
    task = build_task(MetaTrainConfig(task="omniglot", protocol="vinyals", data_root=str(ROOT)))
    assert _digest(task.episodes("val")) == "af4ae7470f099f10"


def test_training_data_records_rotations_and_counts_rotated_copies_as_their_character():
    plain = training_data(_lake().resolved().to_dict())
    rotated = training_data(_lake(rotations=True).resolved().to_dict())
    assert "rotations" not in plain
    assert rotated["rotations"] == {"train": [0, 90, 180, 270]}
    assert rotated["characters"] == plain["characters"]  # the same 868 + 96 characters
    assert split_overlap(rotated, "lake-within", "test").seen == 0
    # Vinyals' test split holds background characters: a rotated copy seen counts as seen
    assert split_overlap(rotated, "vinyals", "test") == split_overlap(plain, "vinyals", "test")
    assert split_overlap(rotated, "vinyals", "test").seen_in_training > 0
    assert "train also rotated by 90, 180, 270 degrees" in seen_characters(rotated)
    assert "rotated" not in seen_characters(plain)


def test_config_round_trips_through_dict_toml_and_command_line(tmp_path):
    config = _lake(rotations=True)
    assert MetaTrainConfig.from_dict(config.to_dict()) == config
    toml = tmp_path / "lake.toml"
    toml.write_text('task = "omniglot"\nprotocol = "lake"\nrotations = true\n')
    assert load_config(toml).rotations is True


@pytest.mark.parametrize("fields", [
    {"task": "omniglot", "protocol": "vinyals"},
    {"task": "omniglot"},  # protocol defaults to vinyals
    {"task": "sinusoid"},
    {"task": "miniimagenet"},
])
def test_rotations_outside_the_lake_protocols_are_a_value_error(fields):
    with pytest.raises(ValueError, match=r"rotations \(--rotations\).*'lake'"):
        MetaTrainConfig(rotations=True, **fields)


def test_rotations_must_be_a_bool():
    with pytest.raises(ValueError, match="rotations must be true or false"):
        _lake(rotations="yes")


def test_the_loader_refuses_rotations_with_vinyals():
    with pytest.raises(ValueError, match="rotations=True.*'vinyals' already"):
        omniglot(ROOT, "train", "vinyals", rotations=True)


def test_meta_training_with_rotations_records_them_and_a_resume_keeps_them(tmp_path, capsys):
    # through the command line: --rotations sets the option; a resume with no --config reads
    # the run's config.json, so leaving the flag out keeps it, and another setting is refused
    run = tmp_path / "run"
    command = ["meta-train", "--task", "omniglot", "--protocol", "lake-within",
               "--data-root", str(ROOT), "--ways", "5", "--filters", "8", "--meta-batch", "2",
               "--val-episodes", "2", "--validate-every", "2", "--checkpoint-every", "2",
               "--run-dir", str(run), "--test-episodes", "0", "--no-progress"]
    assert main(command + ["--rotations", "--meta-steps", "2"]) == 0
    best = load_checkpoint(run / "best.safetensors")
    assert best.record["config"]["rotations"] is True
    assert best.record["training_data"]["rotations"] == {"train": [0, 90, 180, 270]}
    assert json.loads((run / "config.json").read_text())["rotations"] is True
    capsys.readouterr()
    assert main(command + ["--resume", "--meta-steps", "3", "--ways", "3"]) == 2
    assert "differs in ['ways']" in capsys.readouterr().err
    assert main(command + ["--resume", "--meta-steps", "3"]) == 0
    assert json.loads((run / "config.json").read_text())["rotations"] is True
    assert load_checkpoint(run / "best.safetensors").record["config"]["rotations"] is True
    assert [e["step"] for e in read_log(run) if "meta_loss" in e] == [1, 2, 3]
