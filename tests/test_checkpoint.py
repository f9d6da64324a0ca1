"""Checkpoints: round trip, shipped names, atomic writes, and refusal of bad files."""

import json
import os
import pickle
import struct
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from learned_optim import (
    CheckpointError,
    LSTMMetaOptimizer,
    MetaLearnerLSTM,
    load_checkpoint,
    load_learned_init,
    save_checkpoint,
)
from learned_optim import checkpoint as checkpoint_module


@dataclass
class TinyConfig:
    ways: int = 5
    shots: int = 1


def learner(hidden=8):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    meta = MetaLearnerLSTM(hidden_size=12, p=8.0)
    path = save_checkpoint(tmp_path / "rule.safetensors", meta, learned_init=learner(),
                           config=TinyConfig(), dataset="omniglot", metrics={"accuracy": 0.9})
    return path, meta


def test_round_trip_keeps_rule_init_and_record(saved):
    path, meta = saved
    loaded = load_checkpoint(path)
    assert loaded.meta_learner.hyperparameters() == {"hidden_size": 12, "p": 8.0,
                                                     "optional_loss": False, "gradient_scale": None,
                                                     "momentum": 0.9, "rms_decay": 0.99}
    for (name, ours), theirs in zip(meta.named_parameters(), loaded.meta_learner.parameters()):
        assert torch.equal(ours, theirs), name
    assert loaded.record["config"] == {"ways": 5, "shots": 1}
    assert loaded.record["dataset"] == "omniglot"
    assert loaded.record["metrics"] == {"accuracy": 0.9}
    assert loaded.record["learned_init"]["parameters"]["0.weight"] == [8, 4]
    assert torch.equal(loaded.learned_init["2.bias"], learner()[2].bias.detach())


def test_update_rule_loads_into_a_differently_shaped_model(saved):
    path, meta = saved
    other = nn.Conv2d(3, 5, 3)
    opt = LSTMMetaOptimizer.from_pretrained(str(path), other.parameters())
    assert torch.equal(opt.meta_learner.meta_bias, meta.meta_bias)
    loss = other(torch.randn(1, 3, 5, 5)).pow(2).mean()
    loss.backward()
    opt.step(loss=loss)
    assert opt.state[other.weight]["lstm_state"].shape == (135, 26)


def test_learned_init_loads_where_names_and_shapes_match(saved):
    path, _ = saved
    model = learner()
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    report = load_learned_init(model, path)
    assert report.loaded == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert torch.equal(model[0].weight, learner()[0].weight)


def test_learned_init_with_other_shapes_is_refused_by_name(saved):
    path, _ = saved
    expected = r"rule.safetensors.*'0.bias' has shape \(16,\) in the model but \(8,\)"
    with pytest.raises(CheckpointError, match=expected):
        load_learned_init(learner(hidden=16), path)


def test_learned_init_non_strict_loads_the_matching_part(saved):
    path, _ = saved
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    report = load_learned_init(model, path, strict=False)
    assert report.loaded == ["0.bias", "0.weight"]
    assert report.mismatched == ["2.bias", "2.weight"]


def test_rule_only_checkpoint_has_no_init(tmp_path):
    path = save_checkpoint(tmp_path / "rule.safetensors", MetaLearnerLSTM())
    assert load_checkpoint(path).learned_init is None
    with pytest.raises(CheckpointError, match="update rule only"):
        load_learned_init(nn.Linear(2, 2), path)


def test_unknown_name_lists_the_shipped_checkpoints():
    with pytest.raises(CheckpointError, match=r"'no-such-rule'.*available"):
        LSTMMetaOptimizer.from_pretrained("no-such-rule", nn.Linear(2, 2).parameters())


def test_truncated_file_is_refused_with_its_name(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{path.name}.*(truncated|corrupt)"):
        load_checkpoint(path)


def test_corrupt_header_is_refused(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt header"):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a learned_optim checkpoint"):
        load_checkpoint(path)


def test_future_format_version_is_refused(saved, monkeypatch):
    path, meta = saved
    monkeypatch.setattr(checkpoint_module, "FORMAT_VERSION", 99)
    newer = save_checkpoint(path.parent / "newer.safetensors", meta)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="format version 99.*newer learned_optim"):
        load_checkpoint(newer)


def test_tampered_tensor_shape_is_refused(saved):
    path, _ = saved
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    record = json.loads(header["__metadata__"]["learned_optim"])
    record["meta_learner"]["hidden_size"] = 20
    header["__metadata__"]["learned_optim"] = json.dumps(record)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])
    with pytest.raises(CheckpointError, match=r"'rule/weight_ih' has shape \(48, 4\)"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['LEARNED_OPTIM_MARKER']}",))


def test_pickle_is_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    monkeypatch.setenv("LEARNED_OPTIM_MARKER", str(marker))
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"state": _Payload()}))
    with pytest.raises(CheckpointError, match="evil.safetensors"):
        load_checkpoint(path)
    torch_file = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1)}, torch_file)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(torch_file)
    assert not marker.exists()


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(saved, monkeypatch):
    path, meta = saved
    before = path.read_bytes()

    def broken_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, MetaLearnerLSTM(), metrics={"accuracy": 0.1})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_unserialisable_config_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="config must be JSON-serialisable"):
        save_checkpoint(tmp_path / "x.safetensors", MetaLearnerLSTM(), config={"f": object()})
    assert not (tmp_path / "x.safetensors").exists()
