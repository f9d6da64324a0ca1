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

from learned_optim.metalearner import MetaLearnerLSTM

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "FORMAT_VERSION",
    "available_pretrained",
    "load_checkpoint",
    "load_learned_init",
    "load_update_rule",
    "read_preprocessing",
    "read_training_data",
    "resolve_checkpoint",
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


def read_header_record(path: Path, data: bytes, expected_format: str = FORMAT) -> dict:
    """Parse the header without trusting it: size, JSON, our format key and version."""
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated file ({len(data)} bytes), not a checkpoint")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > len(data) - 8:
        raise CheckpointError(
            f"{path}: truncated or not a safetensors file (header claims {header_size} bytes, "
            f"file has {len(data)})"
        )
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt header, not a safetensors file") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or RECORD_KEY not in metadata:
        raise CheckpointError(
            f"{path}: not a learned_optim checkpoint (no {RECORD_KEY!r} record in its metadata)"
        )
    try:
        record = json.loads(metadata[RECORD_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: the {RECORD_KEY!r} record is not valid JSON") from None
    if not isinstance(record, dict) or record.get("format") != expected_format:
        raise CheckpointError(f"{path}: foreign record (format {record.get('format')!r})")
    version = record.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} was written by a newer learned_optim; this "
            f"version reads up to {FORMAT_VERSION}: upgrade learned_optim"
        )
    return record


def _build_meta_learner(path: Path, record: dict, tensors: dict[str, Tensor]) -> MetaLearnerLSTM:
    spec = record.get("meta_learner") or {}
    if spec.get("class") != "MetaLearnerLSTM":
        raise CheckpointError(f"{path}: unknown meta-learner class {spec.get('class')!r}")
    try:
        meta_learner = MetaLearnerLSTM(hidden_size=int(spec["hidden_size"]), p=float(spec["p"]),
                                       optional_loss=bool(spec.get("optional_loss", False)))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid meta-learner hyper-parameters: {error}") from None
    for name, expected in meta_learner.named_parameters():
        stored = tensors.get(f"rule/{name}")
        if stored is None:
            raise CheckpointError(f"{path}: update-rule tensor 'rule/{name}' is missing")
        if stored.shape != expected.shape or not stored.is_floating_point():
            raise CheckpointError(
                f"{path}: update-rule tensor 'rule/{name}' has shape {tuple(stored.shape)} and "
                f"dtype {stored.dtype}, expected floating point {tuple(expected.shape)}"
            )
        if not bool(torch.isfinite(stored).all()):
            raise CheckpointError(f"{path}: update-rule tensor 'rule/{name}' holds NaN or Inf")
        with torch.no_grad():
            expected.copy_(stored)
    return meta_learner


def _learned_init(path: Path, record: dict, tensors: dict[str, Tensor]) -> dict | None:
    spec = record.get("learned_init")
    if not spec:
        return None
    init = {}
    for name, shape in spec.get("parameters", {}).items():
        stored = tensors.get(f"init/{name}")
        if stored is None:
            raise CheckpointError(f"{path}: learned-init tensor 'init/{name}' is missing")
        if list(stored.shape) != list(shape):
            raise CheckpointError(
                f"{path}: learned-init tensor 'init/{name}' has shape {tuple(stored.shape)}, "
                f"its record says {tuple(shape)}"
            )
        init[name] = stored
    return init


def load_checkpoint(name_or_path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint (a shipped name or a path).

    Raises :class:`CheckpointError` naming the file and the problem for a missing, truncated,
    corrupt, foreign or newer-format file. Only JSON and raw tensor bytes are read.
    """
    path = resolve_checkpoint(name_or_path)
    data = path.read_bytes()
    record = read_header_record(path, data)
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as error:  # safetensors raises its own error types for damaged bodies
        raise CheckpointError(f"{path}: corrupt tensor data ({error})") from None
    init = _learned_init(path, record, tensors)
    method = record.get("method", "lstm")
    if method == "lstm":
        return Checkpoint(_build_meta_learner(path, record, tensors), init, record, path)
    if method == "maml":
        inner_lr = record.get("inner_lr")
        if not isinstance(inner_lr, (int, float)) or not inner_lr > 0:
            raise CheckpointError(f"{path}: invalid MAML inner_lr {inner_lr!r}")
        return Checkpoint(None, init, record, path, method, inner_lr=float(inner_lr))
    if method == "metasgd":
        rates = {}
        for name, shape in (record.get("learning_rates") or {}).items():
            stored = tensors.get(f"rule/{name}")
            if stored is None or list(stored.shape) != list(shape):
                raise CheckpointError(f"{path}: Meta-SGD step sizes 'rule/{name}' missing or "
                                      f"not of shape {tuple(shape)}")
            rates[name] = stored
        return Checkpoint(None, init, record, path, method, learning_rates=rates)
    raise CheckpointError(f"{path}: unknown update-rule method {method!r}")


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
