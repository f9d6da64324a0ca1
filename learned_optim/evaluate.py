"""Few-shot evaluation of a checkpoint, with the usual baselines on the same episodes.

Every method adapts the same learner, from the same initial weights, for the same number of
steps, on the same test episodes, and is scored on the query set with the non-transductive
BatchNorm protocol (running statistics of the episode's own support set).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from learned_optim.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_learned_init,
    read_training_data,
)
from learned_optim.config import MetaTrainConfig
from learned_optim.data import splits
from learned_optim.learners import reset_batchnorm
from learned_optim.stats import Summary, summarize
from learned_optim.tasks import Task, build_task, to_device
from learned_optim.train import evaluate_rule

__all__ = ["evaluate", "EvaluationReport", "BASELINES", "nearest_neighbour_score"]

BASELINES = ("sgd", "adam", "maml", "metasgd", "nn")
TUNED_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
LR_GRIDS = {
    "sgd": (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
}


@dataclass
class EvaluationReport:
    """Results of :func:`evaluate`: one :class:`Summary` per method, plus the setting."""

    metric: str
    split: str
    setting: dict
    results: dict[str, Summary] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"metric": self.metric, "split": self.split, "setting": self.setting,
                "results": {name: {**s.as_dict(), **self.details.get(name, {})}
                            for name, s in self.results.items()}}

    def to_markdown(self) -> str:
        scale = 100.0 if self.metric == "accuracy" else 1.0
        unit = " (%)" if self.metric == "accuracy" else ""
        lines = [f"| method | {self.metric}{unit} | 95% CI | episodes | notes |",
                 "|---|---|---|---|---|"]
        for name, summary in self.results.items():
            notes = ", ".join(f"{k} {v}" for k, v in self.details.get(name, {}).items())
            lines.append(f"| {name} | {summary.mean * scale:.2f} | {summary.ci95 * scale:.2f} | "
                         f"{summary.n} | {notes} |")
        return "\n".join(lines)

    def write_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=2))


def nearest_neighbour_score(learner: nn.Module, episode, task: Task) -> float:
    """1-nearest-neighbour in the learner's feature space (its ``features`` module, else the
    raw inputs); BatchNorm statistics come from the support set alone."""
    features = getattr(learner, "features", None)
    with torch.no_grad():
        if features is None:
            support, query = episode.support_inputs.flatten(1), episode.query_inputs.flatten(1)
        else:
            import copy

            extractor = copy.deepcopy(features)
            reset_batchnorm(extractor)
            for module in extractor.modules():  # exact support statistics in one pass
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = None
            extractor.train()
            support = extractor(episode.support_inputs).flatten(1)
            extractor.eval()
            query = extractor(episode.query_inputs).flatten(1)
        nearest = torch.cdist(query, support).argmin(dim=1)
        return task.metric(_nn_predictions(episode.support_targets[nearest], task),
                           episode.query_targets).item()


def _nn_predictions(targets: Tensor, task: Task) -> Tensor:
    if task.metric_name != "accuracy":
        return targets
    # The metric takes logits: a one-hot score row per query.
    ways = int(targets.max()) + 1
    return nn.functional.one_hot(targets, ways).float()


def _learner_with_init(task: Task, checkpoint: Checkpoint, device) -> tuple[nn.Module, str]:
    torch.manual_seed(task.config.seed)
    learner = task.make_learner()
    if checkpoint.learned_init is None:
        return learner.to(device), "random init"
    report = load_learned_init(learner, checkpoint, strict=False)
    note = "learned init" if not (report.missing or report.mismatched) else (
        f"learned init except {report.missing + report.mismatched}")
    return learner.to(device), note


def _overlap(checkpoint: Checkpoint, config: MetaTrainConfig, split: str):
    """How many characters of the evaluated split ``checkpoint`` was meta-trained on."""
    if config.task != "omniglot":
        return None
    seen = read_training_data(checkpoint) or splits.training_data(
        checkpoint.record.get("config") or {})
    return splits.split_overlap(seen, config.protocol, split)


def _tune_lr(name, learner, task, steps, tune_episodes, device) -> tuple[float, Summary]:
    """The learning rate of ``LR_GRIDS[name]`` with the best validation score, and that score."""
    factory = TUNED_OPTIMIZERS[name]
    best = None
    for lr in LR_GRIDS[name]:
        summary = evaluate_rule(learner, functools.partial(factory, lr=lr), task.episodes("val"),
                                range(tune_episodes), steps, task, device)
        if task.is_better(summary.mean, None if best is None else best[1].mean):
            best = (lr, summary)
    return best


def evaluate(
    checkpoint: str | os.PathLike | Checkpoint,
    *,
    task: str | None = None,
    ways: int | None = None,
    shots: int | None = None,
    inner_steps: int | None = None,
    protocol: str | None = None,
    data_root: str | None = None,
    episodes: int = 600,
    split: str = "test",
    baselines: Sequence[str] = (),
    baseline_checkpoints: dict[str, str | os.PathLike] | None = None,
    tune_episodes: int = 50,
    device: str = "cpu",
    progress: bool = False,
    queries: int | None = None,
    force_overlap: bool = False,
) -> EvaluationReport:
    """Mean query score with 95% CI of a checkpoint and of baselines, on the same episodes.

    The setting (task, ways, shots, T, protocol, data) comes from the checkpoint's configuration
    unless overridden; ``protocol`` evaluates on another Omniglot split (``vinyals``/``lake``) or
    sinusoid family (``maml``/``metasgd``) than the checkpoint was trained on. SGD and Adam
    fine-tune the same learner from the same initial weights, with the learning rate chosen on
    ``tune_episodes`` validation episodes; MAML and Meta-SGD need checkpoints meta-trained with
    ``learned-optim meta-train --method maml|metasgd``; ``nn`` is 1-nearest-neighbour in the
    learner's feature space.

    ``protocol="lake-within"`` runs Lake et al.'s one-shot protocol on Omniglot's 20 evaluation
    alphabets: every episode's classes come from one alphabet and support and query sets from
    different drawers (``queries=1`` is Lake's one test drawer). An Omniglot checkpoint that was
    meta-trained or validated on characters of the evaluated split is refused with a
    ``ValueError`` that says how many overlap, unless ``force_overlap=True`` (the report's
    setting then records the overlap).
    """
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {BASELINES}")
    if episodes < 1:
        raise ValueError(f"episodes must be positive, got {episodes}")
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    saved = dict(checkpoint.record.get("config") or {})
    overrides = {"task": task, "ways": ways, "shots": shots, "inner_steps": inner_steps,
                 "protocol": protocol, "data_root": data_root, "queries": queries}
    saved.update({k: v for k, v in overrides.items() if v is not None})
    if shots is not None and inner_steps is None and saved.get("task") != "sinusoid":
        saved["inner_steps"] = None  # let the task default follow the new shot count
    if "queries" in saved and shots is not None and saved.get("task") == "sinusoid":
        saved["queries"] = None
    saved["device"] = device
    config = MetaTrainConfig.from_dict(saved).resolved()
    overlaps = {name: _overlap(other, config, split) for name, other in
                [("checkpoint", checkpoint)] + [(b, load_checkpoint(p)) for b, p in
                                                (baseline_checkpoints or {}).items()
                                                if b in baselines]}
    overlaps = {name: o for name, o in overlaps.items() if o is not None and o.seen}
    if overlaps and not force_overlap:
        raise ValueError(
            "; ".join(o.message(f"{name} ({path})") for name, (o, path) in (
                (n, (o, checkpoint.path if n == "checkpoint" else baseline_checkpoints[n]))
                for n, o in overlaps.items()))
            + f": its {split} score would not measure generalisation to unseen characters. "
            "Evaluate on a split it has not seen, or pass force_overlap=True "
            "(learned-optim evaluate --force-overlap) to report it anyway.")
    the_task = build_task(config)
    steps = config.inner_steps
    def indices(label: str):  # the same test episodes for every method, with a progress bar
        return tqdm(range(episodes), desc=f"evaluate {label}", disable=not progress,
                    leave=False, dynamic_ncols=True)

    source = the_task.episodes(split)
    learner, init_note = _learner_with_init(the_task, checkpoint, device)
    report = EvaluationReport(
        the_task.metric_name, split,
        {"task": config.task, "ways": config.ways, "shots": config.shots, "inner_steps": steps,
         "queries": config.queries, "protocol": config.protocol,
         "checkpoint": str(checkpoint.path)})
    for name, overlap in overlaps.items():  # only when forced
        report.setting.setdefault("overlap", {})[name] = {
            "characters": overlap.characters, "seen": overlap.seen,
            "seen_in_training": overlap.seen_in_training,
            "seen_in_validation": overlap.seen_in_validation}
    name = {"lstm": "meta-learner LSTM"}.get(checkpoint.method, checkpoint.method)
    report.results[name] = evaluate_rule(learner, checkpoint, source, indices(name), steps,
                                         the_task, device)
    report.details[name] = {"init": init_note}
    for baseline in baselines:
        if baseline in ("sgd", "adam"):
            lr, _ = _tune_lr(baseline, learner, the_task, steps, tune_episodes, device)
            tuned = functools.partial(TUNED_OPTIMIZERS[baseline], lr=lr)
            report.results[baseline] = evaluate_rule(learner, tuned,
                                                     source, indices(baseline), steps, the_task,
                                                     device)
            report.details[baseline] = {"lr": lr, "init": init_note}
        elif baseline in ("maml", "metasgd"):
            path = (baseline_checkpoints or {}).get(baseline)
            if path is None:
                raise ValueError(
                    f"baseline {baseline!r} needs a checkpoint meta-trained with "
                    f"`learned-optim meta-train --method {baseline}` (pass --{baseline} PATH)")
            other = load_checkpoint(path)
            if other.method != baseline:
                raise ValueError(f"{path} is a {other.method!r} checkpoint, not {baseline!r}")
            other_learner, other_note = _learner_with_init(the_task, other, device)
            report.results[baseline] = evaluate_rule(other_learner, other, source,
                                                     indices(baseline),
                                                     steps, the_task, device)
            report.details[baseline] = {"init": other_note}
        else:
            scores = [nearest_neighbour_score(learner, to_device(source.episode(i), device),
                                              the_task) for i in indices("nn")]
            report.results["nn"] = summarize(scores)
            report.details["nn"] = {"features": "learner features" if hasattr(
                learner, "features") else "raw inputs"}
    return report
