"""Checkpoints: safetensors for the tensors, a JSON record for everything else.

One file holds the update rule (``rule/<name>`` tensors: portable to any model) and, optionally,
the learned initial weights of one learner architecture (``init/<parameter name>``). The record
(safetensors metadata key ``learned_optim``) states the format version, the meta-learner's
hyper-parameters, the training configuration, the data set, metrics and the names and shapes of
the learned init. Nothing is ever unpickled; every write is atomic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from learned_optim.metalearner import MetaLearnerLSTM, rule_fingerprint

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "FORMAT_VERSION",
    "available_pretrained",
    "load_checkpoint",
    "load_learned_init",
    "load_update_rule",
    "read_preprocessing",
    "read_record",
    "read_training_data",
    "resolve_checkpoint",
    "shipped_path",
    "validate_record",
    "save_checkpoint",
    "write_atomic",
]

FORMAT = "learned_optim.checkpoint"
FORMAT_VERSION = 1
RECORD_KEY = "learned_optim"
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, foreign, too new or mismatched."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes
    ----------
    meta_learner:
        The update rule, ready for :class:`learned_optim.LSTMMetaOptimizer` (``None`` for the
        MAML and Meta-SGD baselines, see ``method``).
    learned_init:
        Learner parameter name -> initial value, or ``None`` for a rule-only checkpoint.
    record:
        The JSON record (config, dataset, metrics, model card facts).
    path:
        Where it was read from.
    """

    meta_learner: MetaLearnerLSTM
    learned_init: dict[str, Tensor] | None
    record: dict = field(default_factory=dict)
    path: Path | None = None
    method: str = "lstm"
    inner_lr: float | None = None  # maml
    learning_rates: dict[str, Tensor] | None = None  # metasgd, by learner parameter name


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new, never a mix.

    Temporary file in the same folder, fsync, rename, fsync of the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would hide shipped files
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def _jsonable(value: Any, what: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"checkpoint {what} must be JSON-serialisable: {error}") from None
    return value


def _init_tensors(learned_init: nn.Module | dict[str, Tensor] | None) -> dict[str, Tensor]:
    if learned_init is None:
        return {}
    if isinstance(learned_init, nn.Module):
        learned_init = dict(learned_init.named_parameters())
    return {name: tensor.detach().cpu().contiguous() for name, tensor in learned_init.items()}


def _rule_tensors_and_record(rule) -> tuple[dict[str, Tensor], dict]:
    """The tensors and record entries of an update rule: the LSTM, or a baseline's."""
    from learned_optim.baselines import MetaSGDRates

    if isinstance(rule, MetaLearnerLSTM):
        tensors = {f"rule/{n}": t.detach().cpu().contiguous() for n, t in rule.named_parameters()}
        return tensors, {"method": "lstm",
                         "meta_learner": {"class": "MetaLearnerLSTM", **rule.hyperparameters()}}
    if isinstance(rule, MetaSGDRates):
        rates = {n: t.detach().cpu().contiguous() for n, t in rule.as_dict().items()}
        return ({f"rule/{n}": t for n, t in rates.items()},
                {"method": "metasgd",
                 "learning_rates": {n: list(t.shape) for n, t in rates.items()}})
    if isinstance(rule, (int, float)) and not isinstance(rule, bool) and rule > 0:
        return {}, {"method": "maml", "inner_lr": float(rule)}
    raise TypeError(
        "meta_learner must be a MetaLearnerLSTM, a MetaSGDRates or a positive MAML step size, "
        f"got {type(rule).__name__}"
    )


def save_checkpoint(
    path: str | os.PathLike,
    meta_learner: MetaLearnerLSTM | Any,
    *,
    learned_init: nn.Module | dict[str, Tensor] | None = None,
    config: Any = None,
    dataset: str | None = None,
    metrics: dict | None = None,
    card: dict | None = None,
    preprocessing: dict | None = None,
    training_data: dict | None = None,
) -> Path:
    """Write a checkpoint atomically and return its path.

    Parameters
    ----------
    path:
        Destination (conventionally ``*.safetensors``).
    meta_learner:
        The update rule: a :class:`MetaLearnerLSTM`; for the baselines a
        :class:`~learned_optim.baselines.MetaSGDRates` or MAML's step size (a float).
    learned_init:
        The learner (its parameters are stored under their names) or a name -> tensor mapping.
    config:
        Training configuration (a dataclass or a JSON-serialisable dict).
    dataset, metrics, card:
        Free-form facts for the record (data set name, measured results, model card fields).
    preprocessing:
        How images become the learner's inputs (``Preprocessing.to_dict()``); read back with
        :func:`read_preprocessing`.
    training_data:
        What was meta-trained and validated on (``learned_optim.data.splits.training_data``);
        read back with :func:`read_training_data`.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> learner = torch.nn.Linear(3, 2)
    >>> path = save_checkpoint(folder / "demo.safetensors", MetaLearnerLSTM(),
    ...                        learned_init=learner, metrics={"accuracy": 0.5})
    >>> loaded = load_checkpoint(path)
    >>> sorted(loaded.learned_init), loaded.record["metrics"]
    (['bias', 'weight'], {'accuracy': 0.5})
    """
    tensors, rule_record = _rule_tensors_and_record(meta_learner)
    init = _init_tensors(learned_init)
    tensors.update({f"init/{name}": tensor for name, tensor in init.items()})
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **rule_record,
        "learned_init": (
            {"parameters": {name: list(t.shape) for name, t in init.items()}} if init else None
        ),
        "config": _jsonable(config, "config"),
        "dataset": dataset,
        "metrics": _jsonable(metrics or {}, "metrics"),
        "card": _jsonable(card or {}, "card"),
    }
    # Optional fields (absent in files written before them): each has one reader below.
    if preprocessing is not None:
        record["preprocessing"] = _jsonable(preprocessing, "preprocessing")
    if training_data is not None:
        record["training_data"] = _jsonable(training_data, "training_data")
    payload = safetensors_bytes(tensors, metadata={RECORD_KEY: json.dumps(record)})
    return write_atomic(path, payload)


def _record_of(checkpoint: Checkpoint | dict) -> tuple[dict, str]:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint.record, str(checkpoint.path)
    return checkpoint, "checkpoint record"


def read_preprocessing(checkpoint: Checkpoint | dict) -> dict | None:
    """The record's ``preprocessing`` field, checked; ``None`` if the file predates it.

    Raises :class:`CheckpointError` naming the file and the field if it is malformed.

    >>> read_preprocessing({"preprocessing": {"size": 28, "mode": "L"}})["size"]
    28
    """
    record, where = _record_of(checkpoint)
    value = record.get("preprocessing")
    if value is None:
        return None
    from learned_optim.data.preprocessing import Preprocessing

    try:
        Preprocessing.from_dict(value)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: invalid field 'preprocessing': {error}") from None
    return value


def read_training_data(checkpoint: Checkpoint | dict) -> dict | None:
    """The record's ``training_data`` field, checked; ``None`` if the file predates it.

    Raises :class:`CheckpointError` naming the file and the field if it is malformed.

    >>> read_training_data({"training_data": {"dataset": "omniglot",
    ...     "characters": {"train": [0, 1], "val": [2]}}})["characters"]["val"]
    [2]
    """
    record, where = _record_of(checkpoint)
    value = record.get("training_data")
    if value is None:
        return None
    characters = value.get("characters") if isinstance(value, dict) else None
    valid = (isinstance(characters, dict) and isinstance(value.get("dataset"), str)
             and all(isinstance(k, str) and isinstance(v, list)
                     and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                             for i in v) for k, v in characters.items()))
    if not valid:
        raise CheckpointError(f"{where}: invalid field 'training_data': expected a dataset name "
                              "and characters {split: [non-negative integers]}")
    return value


def available_pretrained() -> list[str]:
    """Names of the checkpoints shipped in ``learned_optim/pretrained/``."""
    return sorted(p.name[: -len(SUFFIX)] for p in PRETRAINED_DIR.glob(f"*{SUFFIX}"))


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A shipped checkpoint's name or a file path -> an existing path, or a clear error."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate
    shipped = PRETRAINED_DIR / f"{name_or_path}{SUFFIX}"
    if isinstance(name_or_path, str) and shipped.is_file():
        return shipped
    names = available_pretrained()
    listing = ", ".join(names) if names else "none are shipped in this version"
    raise CheckpointError(
        f"checkpoint {str(name_or_path)!r} is neither an existing file nor a shipped "
        f"checkpoint name (available: {listing})"
    )


def shipped_path(name: str) -> Path:
    """The file of the shipped checkpoint ``name`` (never a local file of that name).

    >>> shipped_path("omniglot-5w1s").name
    'omniglot-5w1s.safetensors'
    """
    path = PRETRAINED_DIR / f"{name}{SUFFIX}"
    if "/" in name or "\\" in name or not path.is_file():
        names = ", ".join(available_pretrained()) or "none are shipped in this version"
        raise CheckpointError(f"no shipped checkpoint named {name!r} (available: {names})")
    return path


# --- reading: the whole record and the tensor table are validated before anything is built ---

# Bounds of a record's meta-learner: far above any trained rule, far below what would make the
# module (16 H^2 floats) or a step (182 floats a coordinate at H = 20) an allocation hazard.
MAX_HIDDEN_SIZE = 1024
MAX_P = 100.0
MAX_GRADIENT_SCALE = 1e6
# safetensors' own limit on a header: a larger one is refused before it is read.
MAX_HEADER_BYTES = 100_000_000
# Element sizes of the safetensors dtypes; the floating ones are accepted for rule and init.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_METHODS = ("lstm", "maml", "metasgd")


def _fail(path: Path, field_name: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: field {field_name!r} {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _header_json(path: Path, raw: bytes, body_size: int) -> tuple[dict, dict]:
    """The safetensors header's tensor table (validated) and its metadata."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt header, not a safetensors file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header (a JSON {type(header).__name__}, not an "
                              "object), not a safetensors file")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not isinstance(metadata.get(RECORD_KEY), str):
        raise CheckpointError(
            f"{path}: not a learned_optim checkpoint (no {RECORD_KEY!r} record in its metadata)"
        )
    table = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: {where} has no valid header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise CheckpointError(f"{path}: {where} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(
                _is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: {where} has invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
                or not 0 <= offsets[0] <= offsets[1] <= body_size):
            raise CheckpointError(f"{path}: truncated or corrupt: {where} has data offsets "
                                  f"{offsets!r}, the file holds {body_size} bytes of tensor "
                                  "data")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: {where} of shape {shape} and dtype {dtype} does not "
                                  f"fit its {offsets[1] - offsets[0]} bytes")
        table[name] = {"dtype": dtype, "shape": shape}
    return table, metadata


def _record_from_metadata(path: Path, metadata: dict, expected_format: str) -> dict:
    try:
        record = json.loads(metadata[RECORD_KEY])
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: the {RECORD_KEY!r} record is not valid JSON") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: the {RECORD_KEY!r} record is a JSON "
                              f"{type(record).__name__}, not an object")
    if record.get("format") != expected_format:
        raise CheckpointError(f"{path}: foreign record (format {record.get('format')!r})")
    version = record.get("format_version")
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} was written by a newer learned_optim; this "
            f"version reads up to {FORMAT_VERSION}: upgrade learned_optim"
        )
    return record


def _split_header(path: Path, prefix: bytes, file_size: int) -> int:
    """The header's size from the first 8 bytes, checked against the file's size."""
    if file_size < 8 or len(prefix) < 8:
        raise CheckpointError(f"{path}: truncated file ({file_size} bytes), not a checkpoint")
    (header_size,) = struct.unpack("<Q", prefix[:8])
    if header_size > file_size - 8:
        raise CheckpointError(
            f"{path}: truncated or not a safetensors file (header claims {header_size} bytes, "
            f"file has {file_size})"
        )
    if header_size > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header of {header_size} bytes exceeds the "
                              f"{MAX_HEADER_BYTES}-byte limit")
    return header_size


def read_header_record(path: Path, data: bytes, expected_format: str = FORMAT) -> dict:
    """Parse the header of ``data`` without trusting it: size, JSON, format key and version.

    Only the envelope is checked (see :func:`read_record` for the full schema of a
    checkpoint's record).
    """
    header_size = _split_header(path, data[:8], len(data))
    _, metadata = _header_json(path, data[8 : 8 + header_size], len(data) - 8 - header_size)
    return _record_from_metadata(path, metadata, expected_format)


def _check_dict(path: Path, record: dict, name: str, *, optional: bool = True) -> dict | None:
    value = record.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise _fail(path, name, f"must be a JSON object, got {type(value).__name__}")
    return value


def _check_tensor(path: Path, table: dict, name: str, shape: list[int], what: str) -> None:
    entry = table.get(name)
    if entry is None:
        raise CheckpointError(f"{path}: {what} tensor {name!r} is missing")
    if entry["dtype"] not in _FLOAT_DTYPES or entry["shape"] != list(shape):
        raise CheckpointError(
            f"{path}: {what} tensor {name!r} has shape {tuple(entry['shape'])} and dtype "
            f"{entry['dtype']}, expected floating point {tuple(shape)}")


def _check_shape_field(path: Path, field_name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            _is_int(d) and d >= 0 for d in shape):
        raise _fail(path, field_name, f"must be a list of non-negative integers, got {shape!r}")
    return shape


def _rule_shapes(hidden_size: int) -> dict[str, list[int]]:
    """The shapes of a MetaLearnerLSTM's weights, without building one."""
    h = hidden_size
    return {"weight_ih": [4 * h, 4], "weight_hh": [4 * h, h], "bias": [4 * h],
            "meta_weight": [2, h + 2], "meta_bias": [2]}


def validate_record(path: str | os.PathLike, record: dict, tensors: dict | None = None) -> dict:
    """Check a checkpoint's record against the schema; raise :class:`CheckpointError` naming
    the file and the field, else return the record.

    Checked: ``method``; for the LSTM the ``meta_learner`` spec (``class``, ``hidden_size`` an
    integer in 1..1024, ``p`` a number in (0, 100], ``optional_loss`` a boolean,
    ``gradient_scale`` null or a positive number, ``momentum`` in [0, 1), ``rms_decay`` in
    (0, 1), ``step_decay`` absent, null or a positive number); the learned
    init's names and shapes; MAML's ``inner_lr``; Meta-SGD's step-size shapes; the types of
    the descriptive fields (``config``, ``metrics``, ``card``: objects, ``dataset``: a string),
    whose contents, like any other top-level key, are free. With ``tensors`` (the safetensors
    header's table, name -> ``{"dtype", "shape"}``) every tensor the record names must exist
    with that shape and a floating-point dtype.

    >>> spec = {"class": "MetaLearnerLSTM", "hidden_size": 10**6, "p": 10.0}
    >>> validate_record("x.safetensors", {"method": "lstm", "meta_learner": spec})
    Traceback (most recent call last):
    ...
    learned_optim.checkpoint.CheckpointError: x.safetensors: field 'meta_learner.hidden_size' must be an integer in 1..1024, got 1000000
    """  # noqa: E501
    path = Path(path)
    method = record.get("method", "lstm")
    if method not in _METHODS:
        raise _fail(path, "method", f"must be one of {_METHODS}, got {method!r}")
    for name in ("config", "metrics", "card"):
        _check_dict(path, record, name)
    if record.get("dataset") is not None and not isinstance(record["dataset"], str):
        raise _fail(path, "dataset", f"must be a string, got {type(record['dataset']).__name__}")
    init = _check_dict(path, record, "learned_init")
    if init:
        parameters = init.get("parameters", {})
        if not isinstance(parameters, dict):
            raise _fail(path, "learned_init.parameters", "must be a JSON object")
        for name, shape in parameters.items():
            shape = _check_shape_field(path, f"learned_init.parameters.{name}", shape)
            if tensors is not None:
                _check_tensor(path, tensors, f"init/{name}", shape, "learned-init")
    if method == "lstm":
        spec = _check_dict(path, record, "meta_learner", optional=False)
        if spec.get("class") != "MetaLearnerLSTM":
            raise CheckpointError(f"{path}: unknown meta-learner class {spec.get('class')!r} "
                                  "(field 'meta_learner.class')")
        hidden = spec.get("hidden_size")
        if not _is_int(hidden) or not 1 <= hidden <= MAX_HIDDEN_SIZE:
            raise _fail(path, "meta_learner.hidden_size",
                        f"must be an integer in 1..{MAX_HIDDEN_SIZE}, got {hidden!r}")
        p = spec.get("p")
        if not _is_number(p) or not 0 < p <= MAX_P:  # NaN fails both comparisons
            raise _fail(path, "meta_learner.p", f"must be a number in (0, {MAX_P:g}], got {p!r}")
        if not isinstance(spec.get("optional_loss", False), bool):
            raise _fail(path, "meta_learner.optional_loss",
                        f"must be true or false, got {spec['optional_loss']!r}")
        scale = spec.get("gradient_scale")
        if scale is not None and (not _is_number(scale) or not 0 < scale <= MAX_GRADIENT_SCALE):
            raise _fail(path, "meta_learner.gradient_scale",
                        f"must be null or a number in (0, {MAX_GRADIENT_SCALE:g}], got {scale!r}")
        decay = spec.get("rms_decay", 0.99)
        if not _is_number(decay) or not 0 < decay < 1:
            raise _fail(path, "meta_learner.rms_decay",
                        f"must be a number in (0, 1), got {decay!r}")
        momentum = spec.get("momentum", 0.9)
        if not _is_number(momentum) or not 0 <= momentum < 1:
            raise _fail(path, "meta_learner.momentum",
                        f"must be a number in [0, 1), got {momentum!r}")
        step_decay = spec.get("step_decay")
        if step_decay is not None and (not _is_number(step_decay)
                                       or not 0 < step_decay < math.inf):
            raise _fail(path, "meta_learner.step_decay",
                        f"must be null or a positive number of steps, got {step_decay!r}")
        if tensors is not None:
            for name, shape in _rule_shapes(hidden).items():
                _check_tensor(path, tensors, f"rule/{name}", shape, "update-rule")
    elif method == "maml":
        inner_lr = record.get("inner_lr")
        if not _is_number(inner_lr) or not 0 < inner_lr < math.inf:
            raise _fail(path, "inner_lr", f"must be a positive finite number, got {inner_lr!r}")
    else:
        rates = _check_dict(path, record, "learning_rates", optional=False)
        for name, shape in rates.items():
            shape = _check_shape_field(path, f"learning_rates.{name}", shape)
            if tensors is not None:
                _check_tensor(path, tensors, f"rule/{name}", shape, "Meta-SGD step-size")
    return record


def read_record(name_or_path: str | os.PathLike) -> dict:
    """The JSON record of a checkpoint (a shipped name or a path), validated, without reading
    its tensors: only the header is read from the file.

    >>> record = read_record("omniglot-5w1s")
    >>> record["meta_learner"]["hidden_size"], record["config"]["ways"]
    (20, 5)
    """
    path = resolve_checkpoint(name_or_path)
    try:
        with path.open("rb") as stream:
            file_size = os.fstat(stream.fileno()).st_size
            header_size = _split_header(path, stream.read(8), file_size)
            raw = stream.read(header_size)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror})") from None
    table, metadata = _header_json(path, raw, file_size - 8 - header_size)
    return validate_record(path, _record_from_metadata(path, metadata, FORMAT), table)


def _load_tensors(path: Path, data: bytes, table: dict, names: list[str]) -> dict[str, Tensor]:
    """The named tensors (all validated floating point by the record's check), each finite."""
    try:
        loaded = load_safetensors_bytes(data)
    except Exception as error:  # safetensors raises its own error types for damaged bodies
        raise CheckpointError(f"{path}: corrupt tensor data ({error})") from None
    tensors = {}
    for name in names:
        tensor = loaded[name]
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or Inf")
        tensors[name] = tensor
    return tensors


def load_checkpoint(name_or_path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint (a shipped name or a path).

    The record and the tensor table are checked against the schema (:func:`validate_record`)
    before any tensor or module is built; every failure is a :class:`CheckpointError` naming
    the file and the problem (missing, truncated, corrupt, foreign or newer-format file, a
    field of the wrong type or out of range, a missing, misshapen, non-floating or non-finite
    tensor). Only JSON and raw tensor bytes are read.
    """
    path = resolve_checkpoint(name_or_path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror})") from None
    header_size = _split_header(path, data[:8], len(data))
    table, metadata = _header_json(path, data[8 : 8 + header_size], len(data) - 8 - header_size)
    record = validate_record(path, _record_from_metadata(path, metadata, FORMAT), table)
    method = record.get("method", "lstm")
    init_names = list((record.get("learned_init") or {}).get("parameters", {}))
    if method == "lstm":
        rule_names = list(_rule_shapes(1))
    elif method == "metasgd":
        rule_names = list(record["learning_rates"])
    else:
        rule_names = []
    tensors = _load_tensors(path, data, table, [f"init/{n}" for n in init_names]
                            + [f"rule/{n}" for n in rule_names])
    init = {name: tensors[f"init/{name}"] for name in init_names} if init_names else None
    if method == "lstm":
        spec = record["meta_learner"]
        scale = spec.get("gradient_scale")
        meta_learner = MetaLearnerLSTM(hidden_size=spec["hidden_size"], p=float(spec["p"]),
                                       optional_loss=spec.get("optional_loss", False),
                                       gradient_scale=None if scale is None else float(scale),
                                       momentum=float(spec.get("momentum", 0.9)),
                                       rms_decay=float(spec.get("rms_decay", 0.99)),
                                       step_decay=spec.get("step_decay"))
        with torch.no_grad():
            for name, weight in meta_learner.named_parameters():
                weight.copy_(tensors[f"rule/{name}"])
        if path.parent == PRETRAINED_DIR:  # a shipped rule: state dicts may name it
            meta_learner.pretrained_name = path.name[: -len(SUFFIX)]
            meta_learner.pretrained_fingerprint = rule_fingerprint(meta_learner)
        return Checkpoint(meta_learner, init, record, path)
    if method == "maml":
        return Checkpoint(None, init, record, path, method, inner_lr=float(record["inner_lr"]))
    rates = {name: tensors[f"rule/{name}"] for name in rule_names}
    return Checkpoint(None, init, record, path, method, learning_rates=rates)


def load_update_rule(name_or_path: str | os.PathLike) -> MetaLearnerLSTM:
    """The meta-learner of a Meta-Learner LSTM checkpoint (refuses the baselines' files)."""
    checkpoint = load_checkpoint(name_or_path)
    if checkpoint.meta_learner is None:
        raise CheckpointError(
            f"{checkpoint.path}: a {checkpoint.method!r} baseline checkpoint has no LSTM update "
            "rule; use learned_optim.finetune with it instead"
        )
    return checkpoint.meta_learner


@dataclass
class InitReport:
    """What :func:`load_learned_init` did: names loaded, and what did not match."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]


def load_learned_init(
    model: nn.Module, name_or_path: str | os.PathLike | Checkpoint, *, strict: bool = True
) -> InitReport:
    """Copy a checkpoint's learned initial weights (c_0) into ``model``'s parameters.

    With ``strict=True`` (default) every parameter name and shape must match, otherwise a
    :class:`CheckpointError` names the file and the first mismatch; with ``strict=False`` the
    matching parameters are loaded and the rest reported.
    """
    checkpoint = name_or_path if isinstance(name_or_path, Checkpoint) else load_checkpoint(
        name_or_path)
    path = checkpoint.path
    if checkpoint.learned_init is None:
        raise CheckpointError(f"{path}: holds an update rule only, no learned initialisation")
    own = dict(model.named_parameters())
    init = checkpoint.learned_init
    missing = sorted(set(own) - set(init))
    unexpected = sorted(set(init) - set(own))
    mismatched = sorted(n for n in set(own) & set(init) if own[n].shape != init[n].shape)
    if strict and (missing or unexpected or mismatched):
        problems = []
        if mismatched:
            name = mismatched[0]
            problems.append(
                f"parameter {name!r} has shape {tuple(own[name].shape)} in the model but "
                f"{tuple(init[name].shape)} in the checkpoint"
            )
        if missing:
            problems.append(f"the checkpoint has no value for {missing}")
        if unexpected:
            problems.append(f"the model has no parameter {unexpected}")
        raise CheckpointError(
            f"{path}: learned init does not match {type(model).__name__}: "
            + "; ".join(problems)
            + " (use strict=False to load the matching part, or the update rule alone)"
        )
    loaded = sorted(set(own) & set(init) - set(mismatched))
    with torch.no_grad():
        for name in loaded:
            own[name].copy_(init[name])
    return InitReport(loaded, missing, unexpected, mismatched)
