"""Crafted checkpoints: every record field and tensor is validated before anything is built;
every failure is a CheckpointError naming the file and the field."""

import json
import math
import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from learned_optim import CheckpointError, MetaLearnerLSTM, load_checkpoint, save_checkpoint
from learned_optim import checkpoint as checkpoint_module
from learned_optim.checkpoint import read_record, validate_record


def valid_file(folder, name="rule.safetensors", **kwargs):
    torch.manual_seed(0)
    return save_checkpoint(folder / name, MetaLearnerLSTM(hidden_size=4, p=8.0),
                           learned_init=torch.nn.Linear(3, 2), config={"ways": 5},
                           card={"note": "x"}, **kwargs)


def split(data: bytes) -> tuple[dict, dict, bytes]:
    """(tensor table, record, tensor bytes) of a checkpoint file."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    record = json.loads(header["__metadata__"]["learned_optim"])
    return header, record, data[8 + size :]


def join(header: dict, record, body: bytes) -> bytes:
    header = dict(header, __metadata__={"learned_optim": json.dumps(record)})
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def with_record(path, change):
    header, record, body = split(path.read_bytes())
    record = change(record)
    path.write_bytes(join(header, record, body))
    return path


def set_field(record, dotted, value):
    target = record
    *parents, last = dotted.split(".")
    for key in parents:
        target = target[key]
    target[last] = value
    return record


@pytest.mark.parametrize("field, value", [
    ("meta_learner.hidden_size", 10**6),
    ("meta_learner.hidden_size", 3000),
    ("meta_learner.hidden_size", 0),
    ("meta_learner.hidden_size", "20"),
    ("meta_learner.hidden_size", True),
    ("meta_learner.p", "inf"),
    ("meta_learner.p", 1e6),
    ("meta_learner.p", -1.0),
    ("meta_learner.optional_loss", "yes"),
    ("meta_learner.gradient_scale", -0.1),
    ("meta_learner.gradient_scale", "0.1"),
    ("meta_learner.rms_decay", 1.0),
    ("meta_learner", "MetaLearnerLSTM"),
    ("learned_init", [1, 2]),
    ("learned_init.parameters", [1]),
    ("learned_init.parameters.weight", [2, "3"]),
    ("config", [1, 2]),
    ("card", "free text"),
    ("metrics", 3),
    ("dataset", 5),
    ("method", "adam"),
])
def test_crafted_field_is_refused_naming_file_and_field(tmp_path, field, value):
    path = with_record(valid_file(tmp_path), lambda r: set_field(r, field, value))
    shown = field.split(".")[0] if field in ("meta_learner", "learned_init") else field
    with pytest.raises(CheckpointError, match=rf"rule\.safetensors: field '{shown}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=rf"field '{shown}"):
        read_record(path)


def test_huge_hidden_size_is_refused_before_any_allocation(tmp_path):
    path = with_record(valid_file(tmp_path),
                       lambda r: set_field(r, "meta_learner.hidden_size", 10**6))
    tracemalloc.start()
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_checkpoint(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 10 * path.stat().st_size + 1_000_000


@pytest.mark.parametrize("record", [[1, 2], 3, "text", None])
def test_record_that_is_not_an_object_is_refused(tmp_path, record):
    path = with_record(valid_file(tmp_path), lambda r: record)
    with pytest.raises(CheckpointError, match=r"rule\.safetensors: .*record"):
        load_checkpoint(path)


def test_hidden_size_that_disagrees_with_the_tensors_is_refused(tmp_path):
    path = with_record(valid_file(tmp_path), lambda r: set_field(r, "meta_learner.hidden_size", 5))
    with pytest.raises(CheckpointError, match=r"'rule/weight_ih' has shape \(16, 4\).*\(20, 4\)"):
        load_checkpoint(path)


@pytest.mark.parametrize("bad", ["nan", "int"])
def test_nan_or_integer_tensors_are_refused(tmp_path, bad):
    path = valid_file(tmp_path)
    header, record, _ = split(path.read_bytes())
    tensors = {name: load_checkpoint(path).meta_learner.state_dict()[name[5:]].clone()
               for name in header if name.startswith("rule/")}
    tensors.update({f"init/{n}": t.detach() for n, t in torch.nn.Linear(3, 2).named_parameters()})
    if bad == "nan":
        tensors["init/bias"][0] = math.nan
        match = r"tensor 'init/bias' holds NaN"
    else:
        tensors["rule/meta_bias"] = torch.tensor([5, -4], dtype=torch.int32)
        match = r"'rule/meta_bias' has shape \(2,\) and dtype I32, expected floating point"
    path.write_bytes(safetensors_bytes(tensors, metadata={"learned_optim": json.dumps(record)}))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_descriptive_fields_accept_unknown_keys(tmp_path):
    def extend(record):
        record["preprocessing"] = {"normalize": [0.5, 0.25]}  # a field of a newer writer
        record["splits"] = {"train": ["alphabet_1"]}
        record["config"]["future_option"] = 3
        record["card"]["extra"] = {"nested": True}
        record["meta_learner"]["comment"] = "kept"
        return record

    path = with_record(valid_file(tmp_path), extend)
    loaded = load_checkpoint(path)
    assert loaded.record["preprocessing"] == {"normalize": [0.5, 0.25]}
    assert read_record(path)["config"]["future_option"] == 3


def test_optional_loss_and_gradient_scale_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "g.safetensors",
                           MetaLearnerLSTM(optional_loss=True, gradient_scale=0.1, rms_decay=0.9))
    rule = load_checkpoint(path).meta_learner
    assert (rule.optional_loss, rule.gradient_scale, rule.rms_decay) == (True, 0.1, 0.9)
    assert read_record(path)["meta_learner"]["optional_loss"] is True


def test_read_record_reads_the_record_without_the_tensors(tmp_path, monkeypatch):
    path = valid_file(tmp_path, metrics={"accuracy": 0.5})
    monkeypatch.setattr(checkpoint_module, "load_safetensors_bytes",
                        lambda data: pytest.fail("read_record loaded the tensors"))
    record = read_record(path)
    assert record["metrics"] == {"accuracy": 0.5}
    assert record["learned_init"]["parameters"] == {"weight": [2, 3], "bias": [2]}


def test_validate_record_accepts_the_shipped_records():
    for name in checkpoint_module.available_pretrained():
        assert validate_record(name, read_record(name)) is not None


# --- property: mutated files load as a valid rule or raise CheckpointError -------------------

_TEMPLATE: dict = {}


def template(tmp_path_factory) -> bytes:
    if "data" not in _TEMPLATE:
        _TEMPLATE["data"] = valid_file(tmp_path_factory.mktemp("template")).read_bytes()
    return _TEMPLATE["data"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
record_paths = st.sampled_from([
    "method", "format_version", "meta_learner", "meta_learner.class", "meta_learner.hidden_size",
    "meta_learner.p", "meta_learner.optional_loss", "meta_learner.gradient_scale",
    "meta_learner.rms_decay", "learned_init", "learned_init.parameters",
    "learned_init.parameters.weight", "config", "metrics", "card", "dataset", "inner_lr",
    "learning_rates",
])
header_keys = st.sampled_from(["dtype", "shape", "data_offsets"])


def mutate_record(data: bytes, field: str, value) -> bytes:
    header, record, body = split(data)
    try:
        set_field(record, field, value)
    except (TypeError, KeyError):
        record = value
    return join(header, record, body)


def mutate_header(data: bytes, tensor_index: int, key: str, value) -> bytes:
    header, record, body = split(data)
    names = sorted(k for k in header if k != "__metadata__")
    header[names[tensor_index % len(names)]][key] = value
    return join(header, record, body)


def mutate_bytes(data: bytes, position: int, replacement: bytes) -> bytes:
    position %= len(data)
    return data[:position] + replacement + data[position + len(replacement):]


mutations = st.one_of(
    st.tuples(st.just("record"), record_paths, json_values),
    st.tuples(st.just("header"), st.integers(0, 20), header_keys, json_values),
    st.tuples(st.just("header"), st.integers(0, 20), st.just("shape"),
              st.lists(st.integers(0, 10**9), max_size=3)),
    st.tuples(st.just("bytes"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
)


def apply(data: bytes, mutation) -> bytes:
    kind, *args = mutation
    if not data:
        return data
    if kind in ("record", "header"):
        try:
            split(data)
        except (ValueError, KeyError, TypeError, struct.error):  # an earlier mutation broke it
            return data
    if kind == "record":
        return mutate_record(data, *args)
    if kind == "header":
        return mutate_header(data, *args)
    if kind == "bytes":
        return mutate_bytes(data, *args)
    return data[: args[0] % len(data)]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutations, min_size=1, max_size=3))
def test_mutated_files_load_validly_or_raise_checkpoint_error(tmp_path_factory, monkeypatch,
                                                              mutations):
    data = template(tmp_path_factory)
    for mutation in mutations:
        data = apply(data, mutation)
    path = tmp_path_factory.mktemp("mutated") / "m.safetensors"
    path.write_bytes(data)
    budget = 4 * len(data) + 1_000_000  # bytes any one allocation may take

    def counting_module(hidden_size, **kwargs):
        floats = 16 * hidden_size + 4 * hidden_size**2 + 4 * hidden_size + 2 * hidden_size + 6
        assert 4 * floats <= budget, f"{4 * floats} bytes for a {len(data)}-byte file"
        return MetaLearnerLSTM(hidden_size, **kwargs)

    monkeypatch.setattr(checkpoint_module, "MetaLearnerLSTM", counting_module)
    tracemalloc.start()
    try:
        loaded = load_checkpoint(path)
    except CheckpointError:
        loaded = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= budget + 10 * len(data)
    if loaded is not None and loaded.meta_learner is not None:
        rule = loaded.meta_learner
        assert 1 <= rule.hidden_size <= 1024 and 0 < rule.p <= 100
        assert isinstance(rule.optional_loss, bool) and 0 < rule.rms_decay < 1
        assert rule.gradient_scale is None or 0 < rule.gradient_scale <= 1e6
        assert all(bool(torch.isfinite(t).all()) for t in rule.parameters())
        assert all(bool(torch.isfinite(t).all()) for t in (loaded.learned_init or {}).values())
