"""A run folder: configuration, metrics log, resumable training state, best checkpoint.

The training state is a safetensors file (module and Adam tensors) with a JSON record (step,
best score, configuration, Adam's hyper-parameters): no pickle, written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from learned_optim.checkpoint import CheckpointError, read_header_record, write_atomic

__all__ = ["RunFolder", "save_training_state", "load_training_state", "read_training_record",
           "read_log", "append_log", "log_path", "read_run_config", "METRICS_LOG",
           "RESUME_OVERRIDES"]

# The metrics log of a run folder: one JSON object a line, per meta-step and per validation.
METRICS_LOG = "metrics.jsonl"

# Configuration fields a resumed run may change: how long and how fast it trains, how often it
# validates and saves, and where it runs. Anything else would make a different run.
RESUME_OVERRIDES = ("meta_lr", "rule_lr", "grad_clip", "meta_steps", "max_time_s",
                    "validate_every", "checkpoint_every", "device")

STATE_FORMAT = "learned_optim.training_state"
STATE_VERSION = 1


class RunFolder:
    """Paths and the append-only metrics log of one run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.log_path = self.path / METRICS_LOG
        self.state_path = self.path / "last.state.safetensors"
        self.best_path = self.path / "best.safetensors"

    def start(self, config) -> None:
        """Begin a new run; refuses to overwrite one that could be resumed."""
        self.remove_stale_temporaries()
        if self.state_path.exists():
            raise FileExistsError(
                f"{self.path} already holds a run ({self.state_path.name}): resume it with "
                "--resume (resume=True) or choose another run_dir"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config_path, json.dumps(config.to_dict(), indent=2).encode())
        write_atomic(self.log_path, b"")

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files that writes killed mid-way left (``.NAME.*.tmp``, see
        :func:`learned_optim.checkpoint.write_atomic`) next to this run's files."""
        if not self.path.is_dir():
            return []
        names = (self.config_path, self.log_path, self.state_path, self.best_path)
        stale = [found for path in names for found in self.path.glob(f".{path.name}.*.tmp")]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def resume_record(self, config) -> tuple[dict, dict]:
        """Check that ``config`` may resume this run; return the saved state's record (its
        tensors not yet loaded) and the changes to log.

        Stale temporary files are removed first. A resumed run may change the fields of
        :data:`RESUME_OVERRIDES`; any other difference is a ``ValueError`` naming the fields.
        ``run_dir`` is not compared: the folder being resumed is the run, however its path is
        written and wherever it was moved (a different path is reported among the changes).
        Raises ``FileNotFoundError`` telling to rerun without ``--resume`` if there is no
        saved state.
        """
        self.remove_stale_temporaries()
        if not self.state_path.is_file():
            raise FileNotFoundError(
                f"nothing to resume in {self.path}: it holds no {self.state_path.name} (the run "
                "never started, or was stopped before its first save); rerun the same command "
                "without --resume (resume=False) to start it")
        record = read_training_record(self.state_path)
        try:
            saved = type(config).from_dict(record["config"]).to_dict()
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"cannot resume {self.path}: its saved configuration is invalid "
                             f"({error})") from None
        given = config.to_dict()
        changed = sorted(k for k in given if k not in RESUME_OVERRIDES and k != "run_dir"
                         and given[k] != saved[k])
        if changed:
            raise ValueError(
                f"cannot resume {self.path}: the configuration differs in {changed} "
                f"(saved: {[saved[k] for k in changed]}, given: {[given[k] for k in changed]}); "
                f"a resumed run may change only {list(RESUME_OVERRIDES)}"
            )
        changes = {k: {"saved": saved[k], "given": given[k]} for k in RESUME_OVERRIDES
                   if given[k] != saved[k]}
        if Path(str(saved["run_dir"])).resolve() != Path(str(given["run_dir"])).resolve():
            changes["run_dir"] = {"saved": saved["run_dir"], "given": given["run_dir"]}
        return record, changes

    def log(self, entry: dict) -> None:
        """Append ``entry`` to the metrics log (:func:`append_log`)."""
        append_log(self.path, entry)

    def truncate_log(self, step: int) -> None:
        """Drop entries logged after ``step`` (by a run killed before its next state save)."""
        if not self.log_path.exists():
            return
        kept = [line for line in self.log_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_atomic(self.log_path, "".join(line + "\n" for line in kept).encode())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_training_state(path, *, modules: dict[str, nn.Module], optimizer, record: dict) -> Path:
    """Write modules' state dicts, the optimizer's state and ``record`` atomically."""
    tensors = {f"module/{name}/{key}": value.detach().cpu().contiguous()
               for name, module in modules.items()
               for key, value in module.state_dict().items()}
    optimizer_tensors, optimizer_record = _optimizer_tensors(optimizer)
    tensors.update(optimizer_tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    full = {"format": STATE_FORMAT, "format_version": STATE_VERSION, **record,
            "optimizer": optimizer_record}
    return write_atomic(path, safetensors_bytes(tensors, metadata={"learned_optim":
                                                                   json.dumps(full)}))


def read_training_record(path) -> dict:
    """The JSON record of a training state (step, best, configuration), without its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training state to resume at {path}")
    record = read_header_record(path, path.read_bytes(), expected_format=STATE_FORMAT)
    if not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{path}: training state without a configuration record")
    return record


def load_training_state(path, *, modules: dict[str, nn.Module], optimizer) -> dict:
    """Restore what :func:`save_training_state` wrote; returns its record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training state to resume at {path}")
    data = path.read_bytes()
    record = read_header_record(path, data, expected_format=STATE_FORMAT)
    if record["format_version"] > STATE_VERSION:
        raise CheckpointError(f"{path}: training state from a newer learned_optim")
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as error:
        raise CheckpointError(f"{path}: corrupt tensor data ({error})") from None
    for name, module in modules.items():
        prefix = f"module/{name}/"
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(own)
        except RuntimeError as error:
            raise CheckpointError(f"{path}: saved {name} does not match: {error}") from None
    try:  # a damaged record or tensor table is a CheckpointError naming the file, not a crash
        optimizer_record = record["optimizer"]
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                state.setdefault(int(index), {})[name] = value
        for key, value in optimizer_record["scalars"].items():
            index, name = key.split("/", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state,
                                   "param_groups": optimizer_record["param_groups"]})
        torch.set_rng_state(tensors["rng/torch"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: damaged training state "
                              f"({type(error).__name__}: {error})") from None
    return record


def log_path(run_dir: str | Path) -> Path:
    """Where a run folder's metrics log (:data:`METRICS_LOG`) is."""
    return Path(run_dir) / METRICS_LOG


def append_log(run_dir: str | Path, entry: dict) -> None:
    """Append one entry (a JSON-serialisable dict) to a run's metrics log.

    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp())
    >>> append_log(run, {"step": 1, "meta_loss": 2.5}); append_log(run, {"step": 2})
    >>> read_log(run)
    [{'step': 1, 'meta_loss': 2.5}, {'step': 2}]
    """
    with log_path(run_dir).open("a") as stream:
        stream.write(json.dumps(entry) + "\n")


def read_run_config(run_dir: str | Path) -> dict:
    """The configuration a run folder was started with (its ``config.json``), as saved."""
    return json.loads(RunFolder(run_dir).config_path.read_text())


def read_log(run_dir: str | Path) -> list[dict]:
    """The entries of a run's metrics log (:data:`METRICS_LOG`), in order."""
    path = log_path(run_dir)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
