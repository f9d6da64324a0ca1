"""The loop every meta-trainer shares: meta-steps, the time budget, validation and saved states
on schedule (:class:`learned_optim.train.MetaTrainer`, :class:`learned_optim.truncated.
TruncatedTrainer`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

__all__ = ["Trainer", "run_schedule"]


class Trainer(Protocol):
    """What :func:`run_schedule` drives."""

    config: object
    folder: object
    step: int
    elapsed: float
    best: dict | None

    def meta_step(self) -> dict: ...

    def validate(self): ...

    def record_validation(self, summary) -> None: ...

    def save_state(self) -> None: ...


def run_schedule(trainer: Trainer, *, progress: bool, postfix: Callable[[dict], dict],
                 main: bool = True, stop_together: Callable[[bool], bool] | None = None) -> None:
    """Run ``trainer.meta_step()`` up to ``config.meta_steps`` or ``config.max_time_s`` seconds
    of training, validating every ``validate_every`` meta-steps and saving the state every
    ``checkpoint_every`` (both at the last step too). Only ``main`` logs and saves (rank 0 of a
    distributed run); ``stop_together`` makes every rank agree on the time budget."""
    config = trainer.config
    if trainer.step == 0 and trainer.best is None:
        trainer.record_validation(trainer.validate())  # the untrained starting point
        if main:
            trainer.save_state()
    bar = tqdm(total=config.meta_steps, initial=trainer.step, disable=not progress,
               desc=f"meta-train {Path(config.run_dir).name}", dynamic_ncols=True)
    with bar:
        while trainer.step < config.meta_steps:
            started = time.perf_counter()
            entry = trainer.meta_step()
            trainer.elapsed += time.perf_counter() - started
            entry["elapsed_s"] = round(trainer.elapsed, 3)
            if main:
                trainer.folder.log(entry)
            bar.update(1)
            bar.set_postfix(**postfix(entry))
            out_of_time = config.max_time_s is not None and trainer.elapsed >= config.max_time_s
            if stop_together is not None and config.max_time_s is not None:
                out_of_time = stop_together(out_of_time)  # ranks' clocks differ
            last = trainer.step == config.meta_steps or out_of_time
            if trainer.step % config.validate_every == 0 or last:
                trainer.record_validation(trainer.validate())
            if main and (trainer.step % config.checkpoint_every == 0 or last):
                trainer.save_state()
            if out_of_time:
                break
