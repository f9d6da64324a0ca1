"""What a shipped card says about training, read from the run folders that trained it."""

from __future__ import annotations

from pathlib import Path

from learned_optim.runstate import read_log, read_run_config

__all__ = ["training_facts", "continued_facts"]


def training_facts(runs: list[Path], *, restarted_validations: bool = True) -> dict:
    """Meta-steps, Adam updates (where the log counts them), episodes and wall time summed over
    the runs, in training order, and the validation trace, steps counted from the first run.

    A run resumed in its own folder counts once. ``restarted_validations`` says whether each
    later run's step-0 validation stays in the trace: an episodic run warm-started with
    ``--init-from`` validates its starting point again and the shipped episodic cards keep that
    point (True); the ``general`` rule's card keeps only the first run's (False).

    >>> import tempfile
    >>> from learned_optim.runstate import append_log
    >>> run = Path(tempfile.mkdtemp())
    >>> _ = (run / "config.json").write_text('{"meta_batch": 4}')
    >>> for entry in ({"step": 0, "val_mse": 2.0}, {"step": 1, "meta_loss": 1.5,
    ...               "elapsed_s": 3.2}, {"step": 1, "val_mse": 1.0}):
    ...     append_log(run, entry)
    >>> facts = training_facts([run])
    >>> facts["meta_steps"], facts["episodes_trained"], len(facts["validation_trace"])
    (1, 4, 2)
    """
    steps = updates = episodes = 0
    counts_updates = True
    wall = 0.0
    trace: list[dict] = []
    for run in runs:
        config = read_run_config(run)
        log = read_log(run)
        trained = [e for e in log if "meta_loss" in e]
        if not trained:
            raise ValueError(f"run {run} has no meta-step in its metrics log")
        last = max(trained, key=lambda e: e["step"])
        trace += [{**e, "step": e["step"] + steps} for e in log
                  if any(k.startswith("val_") for k in e)
                  and (restarted_validations or e["step"] > 0 or not trace)]
        steps += last["step"]
        counts_updates = counts_updates and "updates" in last
        updates += last.get("updates", 0)
        episodes += last["step"] * config["meta_batch"]
        wall += last["elapsed_s"]
    facts = {"meta_steps": steps}
    if counts_updates:  # truncated training logs its Adam updates (several per meta-step)
        facts["meta_updates"] = updates
    return {**facts, "episodes_trained": episodes, "train_wall_time_s": round(wall),
            "validation_trace": trace}


def continued_facts(shipped_card: dict, facts: dict) -> dict:
    """The shipped card's training followed by the runs that continued it."""
    steps = shipped_card["meta_steps"]
    return {"meta_steps": steps + facts["meta_steps"],
            "episodes_trained": shipped_card["episodes_trained"] + facts["episodes_trained"],
            "train_wall_time_s": shipped_card["train_wall_time_s"] + facts["train_wall_time_s"],
            "validation_trace": shipped_card["validation_trace"] + [
                {**e, "step": e["step"] + steps} for e in facts["validation_trace"]]}
