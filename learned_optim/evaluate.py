"""Few-shot evaluation of a checkpoint, with the usual baselines on the same episodes.

Every method adapts the same learner, from the same initial weights, for the same number of
steps, on the same test episodes, and is scored on the query set with the non-transductive
BatchNorm protocol (running statistics of the episode's own support set).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from learned_optim.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_learned_init,
    read_training_data,
)
from learned_optim.config import MetaTrainConfig
from learned_optim.data import splits
from learned_optim.data.preprocessing import Preprocessing
from learned_optim.ensemble import Member, ensemble_log_probabilities, support_and_query_features
from learned_optim.finetune import finetune
from learned_optim.learners import start_classes_alike
from learned_optim.stats import Summary, summarize
from learned_optim.tasks import Task, build_task, to_device
from learned_optim.version import __version__

__all__ = ["evaluate", "EvaluationReport", "BASELINES", "LR_GRIDS", "TUNED_OPTIMIZERS",
           "ensemble_scores", "evaluate_rule", "evaluation_config", "learner_with_init",
           "nearest_neighbour_score", "query_scores", "split_overlap_of", "tune_learning_rate",
           "tuned_on_validation"]

BASELINES = ("sgd", "adam", "maml", "metasgd", "nn")
TUNED_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
LR_GRIDS = {
    "sgd": (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
}


def environment() -> dict:
    """Versions that produced a result: learned_optim, torch, higher and Python."""
    import higher

    return {"learned_optim": __version__, "torch": torch.__version__,
            "higher": getattr(higher, "__version__", "unknown"),
            "python": platform.python_version()}


@dataclass
class EvaluationReport:
    """Results of :func:`evaluate`: per-episode scores and a :class:`Summary` per method, the
    setting, the seed and the versions, and each baseline's paired difference to the first
    method (the checkpoint's, e.g. the meta-learner LSTM) on the same episodes.

    >>> report = EvaluationReport("accuracy", "test", {"task": "omniglot"}, seed=0)
    >>> report.add("meta-learner LSTM", [0.6, 0.8, 0.7, 0.9])
    >>> report.add("sgd", [0.5, 0.6, 0.7, 0.6])
    >>> difference = report.paired_differences()["sgd"]
    >>> round(difference.mean, 3), difference.n
    (-0.15, 4)
    """

    metric: str
    split: str
    setting: dict
    results: dict[str, Summary] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    seed: int | None = None  # of the learner's initial weights (episodes are drawn by index)
    versions: dict = field(default_factory=environment)

    def add(self, name: str, scores: Sequence[float], details: dict | None = None) -> None:
        """Record a method's per-episode scores (in episode order) and their summary."""
        self.scores[name] = [float(s) for s in scores]
        self.results[name] = summarize(self.scores[name])
        if details is not None:
            self.details[name] = details

    @property
    def reference(self) -> str | None:
        """The method the baselines are compared with: the checkpoint's, evaluated first."""
        return next(iter(self.results), None)

    def paired_differences(self) -> dict[str, Summary]:
        """Per baseline: mean and 95% CI of (baseline - reference) over the same episodes.

        Positive means the baseline scored higher (better for accuracy, worse for MSE).
        """
        reference = self.scores.get(self.reference, [])
        differences = {}
        for name, scores in self.scores.items():
            if name == self.reference or len(scores) != len(reference):
                continue
            differences[name] = summarize([b - a for a, b in zip(reference, scores)])
        return differences

    def as_dict(self) -> dict:
        paired = self.paired_differences()
        results = {}
        for name, summary in self.results.items():
            entry = {**summary.as_dict(), **self.details.get(name, {})}
            if name in paired:
                entry["paired_difference"] = {"minus": self.reference,
                                              **paired[name].as_dict()}
            if name in self.scores:
                entry["scores"] = self.scores[name]
            results[name] = entry
        return {"metric": self.metric, "split": self.split, "setting": self.setting,
                "seed": self.seed, "versions": self.versions,
                "reference": self.reference, "results": results}

    def to_markdown(self) -> str:
        scale = 100.0 if self.metric == "accuracy" else 1.0
        unit = " (%)" if self.metric == "accuracy" else ""
        paired = self.paired_differences()
        lines = [f"| method | {self.metric}{unit} | 95% CI | minus {self.reference} (paired, "
                 "95% CI) | episodes | notes |", "|---|---|---|---|---|---|"]
        for name, summary in self.results.items():
            notes = ", ".join(f"{k} {v}" for k, v in self.details.get(name, {}).items())
            difference = (f"{paired[name].mean * scale:+.2f} +- {paired[name].ci95 * scale:.2f}"
                          if name in paired else "")
            lines.append(f"| {name} | {summary.mean * scale:.2f} | {summary.ci95 * scale:.2f} | "
                         f"{difference} | {summary.n} | {notes} |")
        return "\n".join(lines)

    def write_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`as_dict` as JSON (per-episode scores, seed, versions included)."""
        Path(path).write_text(json.dumps(self.as_dict(), indent=2))


def query_scores(learner, spec, episodes, indices, steps, task: Task, device="cpu") -> list[float]:
    """The query metric of each episode in ``indices``, adapting through :func:`finetune` the
    parameters the task's configuration names (``adapt``)."""
    scores = []
    for index in indices:
        episode = to_device(episodes.episode(index), device)
        adapted = finetune(learner, episode.support_inputs, episode.support_targets,
                           optimizer=spec, steps=steps, loss_fn=task.loss,
                           adapt=task.config.adapt)
        with torch.no_grad():
            scores.append(task.metric(adapted(episode.query_inputs), episode.query_targets).item())
    return scores


def evaluate_rule(learner, spec, episodes, indices, steps, task: Task, device="cpu") -> Summary:
    """Mean query metric with its 95% CI, adapting through :func:`finetune` (test protocol)."""
    return summarize(query_scores(learner, spec, episodes, indices, steps, task, device))


def ensemble_scores(members: Sequence[Member], episodes, indices, task: Task,
                    device="cpu") -> list[float]:
    """The query metric of each episode in ``indices`` when every member adapts on its support
    set on its own and the queries get the members' mean class probabilities
    (:mod:`learned_optim.ensemble`)."""
    scores = []
    for index in indices:
        episode = to_device(episodes.episode(index), device)
        scores.append(task.metric(
            ensemble_log_probabilities(members, episode.support_inputs,
                                       episode.support_targets, episode.query_inputs,
                                       task.loss),
            episode.query_targets).item())
    return scores


def nearest_neighbour_score(learner: nn.Module | Sequence[nn.Module], episode,
                            task: Task) -> float:
    """1-nearest-neighbour in the learner's feature space (its ``features`` module, else the
    raw inputs); BatchNorm statistics come from the support set alone. Several learners (an
    ensemble): their features concatenated."""
    learners = list(learner) if isinstance(learner, Sequence) else [learner]
    pairs = [support_and_query_features(one, episode.support_inputs, episode.query_inputs)
             for one in learners]
    support = torch.cat([s for s, _ in pairs], dim=1)
    query = torch.cat([q for _, q in pairs], dim=1)
    nearest = torch.cdist(query, support).argmin(dim=1)
    return task.metric(_nn_predictions(episode.support_targets[nearest], task),
                       episode.query_targets).item()


def _nn_predictions(targets: Tensor, task: Task) -> Tensor:
    if task.metric_name != "accuracy":
        return targets
    # The metric takes logits: a one-hot score row per query.
    ways = int(targets.max()) + 1
    return nn.functional.one_hot(targets, ways).float()


def learner_with_init(task: Task, checkpoint: Checkpoint, device) -> tuple[nn.Module, str]:
    """The task's learner (seeded by the task's config), with the checkpoint's learned init
    where it has one, on ``device``; and a note saying which init it got."""
    torch.manual_seed(task.config.seed)
    learner = task.make_learner()
    if checkpoint.learned_init is None:
        return learner.to(device), "random init"
    report = load_learned_init(learner, checkpoint, strict=False)
    fresh = report.missing + report.mismatched
    if not fresh:
        return learner.to(device), "learned init"
    start_classes_alike(learner, checkpoint.learned_init, fresh)  # another number of ways
    note = f"learned init except {fresh} (every class as the mean of the learned rows)"
    return learner.to(device), note


def split_overlap_of(checkpoint: Checkpoint, config: MetaTrainConfig, split: str):
    """How many characters of the evaluated split ``checkpoint`` was meta-trained on
    (:class:`~learned_optim.data.splits.Overlap`), or ``None`` off Omniglot."""
    if config.task != "omniglot":
        return None
    seen = read_training_data(checkpoint) or splits.training_data(
        checkpoint.record.get("config") or {})
    return splits.split_overlap(seen, config.protocol, split)


def tune_learning_rate(
    optimizer: str, score: Callable[[Callable[..., torch.optim.Optimizer]], float], *,
    higher_is_better: bool = True,
) -> tuple[float, dict[float, float]]:
    """The learning rate of ``LR_GRIDS[optimizer]`` whose optimizer scores best, and every score.

    Parameters
    ----------
    optimizer:
        ``"sgd"`` or ``"adam"`` (:data:`TUNED_OPTIMIZERS`).
    score:
        Called once per learning rate with the optimizer's factory at that rate
        (``functools.partial(torch.optim.SGD, lr=lr)``); returns the number to compare. This is
        where callers differ: :func:`evaluate` scores the mean query metric of fine-tuning on
        validation episodes, ``benchmarks/transfer.py`` the mean query accuracy of fresh
        models, ``benchmarks/scratch.py`` the validation accuracy after a whole training run.
    higher_is_better:
        Whether a larger score wins (accuracy) or a smaller one (MSE). Ties keep the earlier
        rate of the grid.

    Examples
    --------
    >>> tune_learning_rate("sgd", lambda factory: -abs(factory.keywords["lr"] - 0.03))[0]
    0.03
    """
    factory = TUNED_OPTIMIZERS[optimizer]
    grid: dict[float, float] = {}
    best = None
    for lr in LR_GRIDS[optimizer]:
        grid[lr] = score(functools.partial(factory, lr=lr))
        if best is None or (grid[lr] > grid[best] if higher_is_better else grid[lr] < grid[best]):
            best = lr
    return best, grid


def tuned_on_validation(name: str, learner: nn.Module, task: Task, steps: int,
                        tune_episodes: int, device) -> float:
    """:func:`tune_learning_rate` as :func:`evaluate` runs it: the mean query metric of
    fine-tuning ``learner`` for ``steps`` on the first ``tune_episodes`` validation episodes."""
    def score(factory) -> float:
        return evaluate_rule(learner, factory, task.episodes("val"), range(tune_episodes),
                             steps, task, device).mean

    return tune_learning_rate(name, score, higher_is_better=task.higher_is_better)[0]


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
    ensemble: Sequence[str | os.PathLike | Checkpoint] = (),
) -> EvaluationReport:
    """Mean query score with 95% CI of a checkpoint and of baselines, on the same episodes.

    The setting (task, ways, shots, T, protocol, data) comes from the checkpoint's configuration
    unless overridden; ``protocol`` evaluates on another Omniglot split (``vinyals``/``lake``) or
    sinusoid family (``maml``/``metasgd``) than the checkpoint was trained on. SGD and Adam
    fine-tune the same learner from the same initial weights, with the learning rate chosen on
    ``tune_episodes`` validation episodes; MAML and Meta-SGD need checkpoints meta-trained with
    ``learned-optim meta-train --method maml|metasgd``; ``nn`` is 1-nearest-neighbour in the
    learner's feature space. The report keeps every method's per-episode scores (in episode
    order), the seed and the versions, and gives each baseline's paired difference to the
    checkpoint's method with its 95% CI (:meth:`EvaluationReport.paired_differences`).

    ``protocol="lake-within"`` runs Lake et al.'s one-shot protocol on Omniglot's 20 evaluation
    alphabets: every episode's classes come from one alphabet and support and query sets from
    different drawers (``queries=1`` is Lake's one test drawer); ``"lake-alphabets"`` has the
    same test split and draws it the same way (its validation holds out whole background
    alphabets, so a checkpoint meta-trained with it tunes the baselines' learning rates inside
    alphabets it never saw). An Omniglot checkpoint that was
    meta-trained or validated on characters of the evaluated split is refused with a
    ``ValueError`` that says how many overlap, unless ``force_overlap=True`` (the report's
    setting then records the overlap).

    ``ensemble`` adds checkpoints of other learners (another architecture, say) meta-trained
    for the same setting and preprocessing: every member adapts on each support set on its own
    (its learned init, rule, T and ``adapt``) and the queries get the members' mean class
    probabilities (:mod:`learned_optim.ensemble`); SGD and Adam fine-tune every member at its
    own learning rate, tuned as above, and average the same way; ``nn`` uses the members'
    features concatenated. Every member passes the overlap check.
    """
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {BASELINES}")
    if episodes < 1:
        raise ValueError(f"episodes must be positive, got {episodes}")
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    members = [m if isinstance(m, Checkpoint) else load_checkpoint(m) for m in ensemble]
    if members and set(baselines) & {"maml", "metasgd"}:
        raise ValueError("the maml and metasgd baselines take one checkpoint each: evaluate "
                         "them without ensemble members")
    overrides = {"task": task, "ways": ways, "shots": shots, "inner_steps": inner_steps,
                 "protocol": protocol, "data_root": data_root, "queries": queries,
                 "device": device}
    config = evaluation_config(checkpoint, overrides)
    member_configs = [evaluation_config(m, overrides) for m in members]
    for member, member_config in zip(members, member_configs):
        _check_same_episodes(member, member_config, checkpoint, config)
    checked = ([("checkpoint", checkpoint)]
               + [(b, load_checkpoint(p)) for b, p in (baseline_checkpoints or {}).items()
                  if b in baselines]
               + [(f"ensemble member {i}", m) for i, m in enumerate(members, start=1)])
    overlaps = {name: (split_overlap_of(other, config, split), other.path)
                for name, other in checked}
    overlaps = {name: (o, path) for name, (o, path) in overlaps.items()
                if o is not None and o.seen}
    if overlaps and not force_overlap:
        raise ValueError(
            "; ".join(o.message(f"{name} ({path})") for name, (o, path) in overlaps.items())
            + f": its {split} score would not measure generalisation to unseen characters. "
            "Evaluate on a split it has not seen, or pass force_overlap=True "
            "(learned-optim evaluate --force-overlap) to report it anyway.")
    the_task = build_task(config)
    steps = config.inner_steps
    def indices(label: str):  # the same test episodes for every method, with a progress bar
        return tqdm(range(episodes), desc=f"evaluate {label}", disable=not progress,
                    leave=False, dynamic_ncols=True)

    source = the_task.episodes(split)
    learner, init_note = learner_with_init(the_task, checkpoint, device)
    report = EvaluationReport(
        the_task.metric_name, split,
        {"task": config.task, "ways": config.ways, "shots": config.shots, "inner_steps": steps,
         "queries": config.queries, "protocol": config.protocol,
         "checkpoint": str(checkpoint.path)}, seed=config.seed)
    for name, (overlap, _) in overlaps.items():  # only when forced
        report.setting.setdefault("overlap", {})[name] = {
            "characters": overlap.characters, "seen": overlap.seen,
            "seen_in_training": overlap.seen_in_training,
            "seen_in_validation": overlap.seen_in_validation}
    name = {"lstm": "meta-learner LSTM"}.get(checkpoint.method, checkpoint.method)
    if members:
        tasks = [the_task] + [build_task(c) for c in member_configs]
        built = [(learner, init_note)] + [learner_with_init(t, m, device)
                                          for t, m in zip(tasks[1:], members)]
        return _evaluate_ensemble(report, name, baselines, [checkpoint, *members], tasks,
                                  built, source, indices, tune_episodes, device)
    report.add(name, query_scores(learner, checkpoint, source, indices(name), steps, the_task,
                                  device), {"init": init_note})
    for baseline in baselines:
        if baseline in ("sgd", "adam"):
            lr = tuned_on_validation(baseline, learner, the_task, steps, tune_episodes, device)
            tuned = functools.partial(TUNED_OPTIMIZERS[baseline], lr=lr)
            report.add(baseline, query_scores(learner, tuned, source, indices(baseline), steps,
                                              the_task, device), {"lr": lr, "init": init_note})
        elif baseline in ("maml", "metasgd"):
            path = (baseline_checkpoints or {}).get(baseline)
            if path is None:
                raise ValueError(
                    f"baseline {baseline!r} needs a checkpoint meta-trained with "
                    f"`learned-optim meta-train --method {baseline}` (pass --{baseline} PATH)")
            other = load_checkpoint(path)
            if other.method != baseline:
                raise ValueError(f"{path} is a {other.method!r} checkpoint, not {baseline!r}")
            other_learner, other_note = learner_with_init(the_task, other, device)
            report.add(baseline, query_scores(other_learner, other, source, indices(baseline),
                                              steps, the_task, device), {"init": other_note})
        else:
            scores = [nearest_neighbour_score(learner, to_device(source.episode(i), device),
                                              the_task) for i in indices("nn")]
            report.add("nn", scores, {"features": "learner features" if hasattr(
                learner, "features") else "raw inputs"})
    return report


def evaluation_config(checkpoint: Checkpoint, overrides: dict) -> MetaTrainConfig:
    """The resolved setting :func:`evaluate` runs ``checkpoint`` in: its recorded configuration
    with ``overrides`` (the non-``None`` ones) applied."""
    # The record's config may hold fields of a newer writer: only this version's are read.
    known = {f.name for f in dataclasses.fields(MetaTrainConfig)}
    saved = {k: v for k, v in (checkpoint.record.get("config") or {}).items() if k in known}
    saved.update({k: v for k, v in overrides.items() if v is not None})
    shots, queries, steps = (overrides.get(k) for k in ("shots", "queries", "inner_steps"))
    # Rotated copies are training classes only (val and test never have them): evaluation on
    # another protocol or task must not inherit them (nor their check).
    saved.pop("rotations", None)
    if saved.get("task") == "general":
        raise ValueError(
            f"{checkpoint.path} was meta-trained over a task distribution (task 'general'), "
            "which has no episodes of its own: pass task='omniglot' (or sinusoid, "
            "miniimagenet) to evaluate its rule on those episodes with a fresh learner, or "
            "run benchmarks/scratch.py and benchmarks/transfer.py")
    if shots is not None and steps is None and saved.get("task") != "sinusoid":
        saved["inner_steps"] = None  # let the task default follow the new shot count
    if queries is None and shots is not None and saved.get("task") == "sinusoid":
        saved["queries"] = None
    try:
        return MetaTrainConfig.from_dict(saved).resolved()
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{checkpoint.path}: field 'config' does not describe a valid "
                              f"setting ({error})") from None


# What must agree for every member of an ensemble to see the same episodes.
EPISODE_FIELDS = ("task", "protocol", "ways", "shots", "queries", "seed", "data_root")


def _check_same_episodes(member: Checkpoint, member_config: MetaTrainConfig,
                         checkpoint: Checkpoint, config: MetaTrainConfig) -> None:
    for name in EPISODE_FIELDS:
        if getattr(member_config, name) != getattr(config, name):
            raise ValueError(
                f"ensemble member {member.path}: its {name} {getattr(member_config, name)!r} "
                f"differs from {checkpoint.path}'s {getattr(config, name)!r}; the members of "
                "an ensemble must be scored on the same episodes")
    if Preprocessing.for_config(member_config) != Preprocessing.for_config(config):
        raise ValueError(
            f"ensemble member {member.path}: its image preprocessing "
            f"({Preprocessing.for_config(member_config)}) differs from {checkpoint.path}'s "
            f"({Preprocessing.for_config(config)}); the members of an ensemble must read the "
            "same images")


def _evaluate_ensemble(report: EvaluationReport, name: str, baselines: Sequence[str],
                       checkpoints: list[Checkpoint], tasks: list[Task],
                       built: list[tuple[nn.Module, str]], source, indices, tune_episodes: int,
                       device) -> EvaluationReport:
    """The ensemble's rows of :func:`evaluate`: the members with their rules, then the
    baselines (``sgd``/``adam`` with one tuned rate per member, ``nn`` on all features)."""
    learners, notes = zip(*built)
    task = tasks[0]  # every member's episodes, loss and metric are the same
    paths = [str(c.path) for c in checkpoints]
    report.setting["ensemble"] = paths
    members = [Member(learner, c, t.config.inner_steps, t.config.adapt)
               for learner, c, t in zip(learners, checkpoints, tasks)]
    report.add(f"{name} ensemble", ensemble_scores(members, source, indices(name), task, device),
               {"members": paths, "init": list(notes)})
    for baseline in baselines:
        if baseline == "nn":
            scores = [nearest_neighbour_score(list(learners), to_device(source.episode(i), device),
                                              task) for i in indices("nn")]
            report.add("nn", scores, {"features": f"the {len(learners)} learners' features, "
                                                  "concatenated"})
            continue
        rates = [tuned_on_validation(baseline, learner, t, t.config.inner_steps,
                                     tune_episodes, device)
                 for learner, t in zip(learners, tasks)]
        tuned = [Member(learner, functools.partial(TUNED_OPTIMIZERS[baseline], lr=lr),
                        t.config.inner_steps, t.config.adapt)
                 for learner, lr, t in zip(learners, rates, tasks)]
        report.add(baseline, ensemble_scores(tuned, source, indices(baseline), task, device),
                   {"lr": rates, "init": list(notes)})
    return report
