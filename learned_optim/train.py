"""Meta-training: episodes -> inner loop through ``higher`` -> meta-gradient -> Adam.

The same routine trains the Meta-Learner LSTM and, for fair comparisons, the MAML and Meta-SGD
baselines (``config.method``). A run folder holds ``config.json``, ``metrics.jsonl`` (one line
per meta-step and per validation), ``last.state.safetensors`` (everything needed to resume) and
``best.safetensors`` (the checkpoint with the best validation score).
"""

from __future__ import annotations

import functools
import json
import math
import platform
import time
from pathlib import Path

import higher
import torch
from torch import nn
from tqdm.auto import tqdm

from learned_optim.baselines import MetaSGDRates, PerCoordinateSGD
from learned_optim.checkpoint import load_checkpoint, load_learned_init, save_checkpoint
from learned_optim.config import MetaTrainConfig
from learned_optim.finetune import finetune
from learned_optim.learners import reset_batchnorm
from learned_optim.metalearner import MetaLearnerLSTM
from learned_optim.optimizer import LSTMMetaOptimizer
from learned_optim.runstate import RunFolder, load_training_state, save_training_state
from learned_optim.stats import Summary, summarize
from learned_optim.tasks import Task, build_task, to_device

__all__ = ["meta_train", "MetaTrainer", "episode_query_loss", "evaluate_rule"]


def _detach_all(grads):
    """First-order baselines: the learner's gradients enter as constants."""
    return [None if g is None else g.detach() for g in grads]


def build_rule(config: MetaTrainConfig, learner: nn.Module) -> nn.Module | None:
    """What is meta-learned besides the init: the LSTM, Meta-SGD's step sizes, or nothing."""
    if config.method == "lstm":
        return MetaLearnerLSTM(hidden_size=config.hidden_size)
    if config.method == "metasgd":
        return MetaSGDRates(learner, initial=config.inner_lr)
    return None  # maml: a fixed step size


def inner_optimizer(config: MetaTrainConfig, rule, learner: nn.Module):
    """The optimizer ``higher`` differentiates through, and the keyword arguments of its step."""
    if config.method == "lstm":
        return LSTMMetaOptimizer(learner.parameters(), rule, first_order=config.first_order), {}
    step_kwargs = {"grad_callback": _detach_all} if config.first_order else {}
    if config.method == "maml":
        return torch.optim.SGD(learner.parameters(), lr=config.inner_lr), step_kwargs
    # Meta-SGD: one group per tensor, whose step size is a learned tensor of the same shape.
    groups = [{"params": [p]} for p in learner.parameters()]
    step_kwargs["override"] = {"lr": list(rule.rates)}
    return torch.optim.SGD(groups, lr=config.inner_lr), step_kwargs


def rule_spec(config: MetaTrainConfig, rule):
    """The same rule for :func:`learned_optim.finetune` (in place, no tape)."""
    if config.method == "lstm":
        return rule
    if config.method == "maml":
        return functools.partial(torch.optim.SGD, lr=config.inner_lr)
    return functools.partial(PerCoordinateSGD, rates=list(rule.rates))


def episode_query_loss(learner, opt, step_kwargs, episode, steps, task: Task, learned_init=True):
    """Adapt on the support set for ``steps`` differentiable updates; score the query set.

    Meta-training protocol: BatchNorm statistics reset, support steps in train mode, the query
    set normalised with its own batch statistics. Returns ``(query_loss, query_metric)``.
    """
    reset_batchnorm(learner)
    with higher.innerloop_ctx(learner, opt, copy_initial_weights=not learned_init) as (
        fmodel, diffopt):
        fmodel.train()
        for _ in range(steps):
            diffopt.step(task.loss(fmodel(episode.support_inputs), episode.support_targets),
                         **step_kwargs)
        output = fmodel(episode.query_inputs)
        return task.loss(output, episode.query_targets), task.metric(output.detach(),
                                                                    episode.query_targets)


def evaluate_rule(learner, spec, episodes, indices, steps, task: Task, device="cpu") -> Summary:
    """Mean query metric with its 95% CI, adapting through :func:`finetune` (test protocol)."""
    scores = []
    for index in indices:
        episode = to_device(episodes.episode(index), device)
        adapted = finetune(learner, episode.support_inputs, episode.support_targets,
                           optimizer=spec, steps=steps, loss_fn=task.loss)
        with torch.no_grad():
            scores.append(task.metric(adapted(episode.query_inputs), episode.query_targets).item())
    return summarize(scores)


class MetaTrainer:
    """One meta-training run; see :func:`meta_train`."""

    def __init__(self, config: MetaTrainConfig, *, resume: bool = False, progress: bool = True):
        self.config = config = config.resolved()
        self.task = build_task(config)
        for split in ("train", "val"):  # fail now on missing data, not after the first step
            self.task.episodes(split)
        self.device = torch.device(config.device)
        self.folder = RunFolder(config.run_dir)
        self.progress = progress
        torch.manual_seed(config.seed)
        self.learner = self.task.make_learner().to(self.device)
        self.rule = build_rule(config, self.learner)
        if self.rule is not None:
            self.rule.to(self.device)
        self.meta_params = list(self.rule.parameters()) if self.rule is not None else []
        if config.learned_init:
            self.meta_params += list(self.learner.parameters())
        if not self.meta_params:
            raise ValueError("nothing to meta-train: MAML without a learned init has no "
                             "meta-parameters")
        self.adam = torch.optim.Adam(self.meta_params, lr=config.meta_lr)
        self.step = 0
        self.best: dict | None = None
        self.elapsed = 0.0
        if resume:
            self._resume()
        else:
            if config.init_from:
                self._warm_start(config.init_from)
            self.folder.start(config)

    def _warm_start(self, path: str) -> None:
        """Continue from a checkpoint's update rule and learned init (a new Adam state)."""
        checkpoint = load_checkpoint(path)
        if checkpoint.method != self.config.method:
            raise ValueError(f"init_from {path} is a {checkpoint.method!r} checkpoint, this run "
                             f"trains {self.config.method!r}")
        with torch.no_grad():
            if checkpoint.meta_learner is not None:
                for ours, theirs in zip(self.rule.parameters(),
                                        checkpoint.meta_learner.parameters()):
                    ours.copy_(theirs)
            if checkpoint.learning_rates is not None:
                for name, rate in zip(self.rule.names, self.rule.rates):
                    rate.copy_(checkpoint.learning_rates[name])
        if checkpoint.learned_init is not None:
            load_learned_init(self.learner, checkpoint)

    # --- state -------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module]:
        modules = {"learner": self.learner}
        if self.rule is not None:
            modules["rule"] = self.rule
        return modules

    def save_state(self) -> None:
        save_training_state(
            self.folder.state_path, modules=self._modules(), optimizer=self.adam,
            record={"step": self.step, "best": self.best, "elapsed": self.elapsed,
                    "config": self.config.to_dict()},
        )

    def _resume(self) -> None:
        record = load_training_state(self.folder.state_path, modules=self._modules(),
                                     optimizer=self.adam)
        saved = MetaTrainConfig.from_dict(record["config"])
        mine, theirs = self.config.to_dict(), saved.to_dict()
        changed = sorted(k for k in mine if k not in ("meta_steps", "device", "max_time_s") and
                         mine[k] != theirs[k])
        if changed:
            raise ValueError(
                f"cannot resume {self.folder.path}: the configuration differs in {changed} "
                f"(saved: {[theirs[k] for k in changed]}, given: {[mine[k] for k in changed]})"
            )
        self.step, self.best, self.elapsed = record["step"], record["best"], record["elapsed"]
        self.folder.truncate_log(self.step)

    # --- training ----------------------------------------------------------------------
    def meta_step(self) -> dict:
        """One meta-update over ``meta_batch`` episodes; returns its log entry."""
        config, episodes = self.config, self.task.episodes("train")
        self.adam.zero_grad(set_to_none=True)
        losses, metrics = [], []
        stopped = (f"at meta-step {self.step + 1}: training stopped; the last good state is "
                   f"kept in {self.folder.state_path} (resume with a lower meta_lr or grad_clip)")
        for slot in range(config.meta_batch):
            episode = to_device(episodes.episode(self.step * config.meta_batch + slot),
                                self.device)
            opt, step_kwargs = inner_optimizer(config, self.rule, self.learner)
            try:
                loss, metric = episode_query_loss(self.learner, opt, step_kwargs, episode,
                                                  config.inner_steps, self.task,
                                                  config.learned_init)
            except FloatingPointError as error:
                raise FloatingPointError(f"inner loop failed ({error}) {stopped}") from None
            (loss / config.meta_batch).backward()
            losses.append(loss.item())
            metrics.append(metric.item())
        meta_loss = sum(losses) / len(losses)
        if not math.isfinite(meta_loss):
            raise FloatingPointError(f"meta-loss is {meta_loss} {stopped}")
        grad_norm = nn.utils.clip_grad_norm_(self.meta_params, config.grad_clip)
        self.adam.step()
        self.step += 1
        return {"step": self.step, "meta_loss": meta_loss,
                f"train_{self.task.metric_name}": sum(metrics) / len(metrics),
                "grad_norm": grad_norm.item()}

    def validate(self) -> Summary:
        config = self.config
        indices = range(config.val_episodes)
        return evaluate_rule(self.learner, rule_spec(config, self.rule), self.task.episodes("val"),
                             indices, config.inner_steps, self.task, self.device)

    def _is_better(self, score: float) -> bool:
        if self.best is None:
            return True
        return score > self.best["mean"] if self.task.higher_is_better else (
            score < self.best["mean"])

    def _record_validation(self, summary: Summary) -> None:
        name = self.task.metric_name
        self.folder.log({"step": self.step, f"val_{name}": summary.mean,
                         f"val_{name}_ci95": summary.ci95, "val_episodes": summary.n})
        if self._is_better(summary.mean):
            self.best = {"step": self.step, **summary.as_dict()}
            self.save_best()

    def save_best(self) -> Path:
        config = self.config
        rule = self.rule if config.method != "maml" else config.inner_lr
        return save_checkpoint(
            self.folder.best_path, rule, learned_init=self.learner, config=config,
            dataset=config.task,
            metrics={f"val_{self.task.metric_name}": self.best["mean"],
                     f"val_{self.task.metric_name}_ci95": self.best["ci95"],
                     "val_episodes": self.best["episodes"]},
            card={"meta_steps": self.step, "episodes_trained": self.step * config.meta_batch,
                  "wall_time_s": round(self.elapsed, 1), "hardware": _hardware(self.device),
                  "learned_init_trained": config.learned_init},
        )

    def run(self) -> Path:
        config = self.config
        if self.step == 0 and self.best is None:
            self._record_validation(self.validate())  # the untrained starting point
            self.save_state()
        bar = tqdm(total=config.meta_steps, initial=self.step, disable=not self.progress,
                   desc=f"meta-train {Path(config.run_dir).name}", dynamic_ncols=True)
        with bar:
            while self.step < config.meta_steps:
                started = time.perf_counter()
                entry = self.meta_step()
                self.elapsed += time.perf_counter() - started
                entry["elapsed_s"] = round(self.elapsed, 3)
                self.folder.log(entry)
                bar.update(1)
                bar.set_postfix(meta_loss=f"{entry['meta_loss']:.4f}",
                                **{self.task.metric_name: f"{entry[list(entry)[2]]:.4f}"})
                out_of_time = config.max_time_s is not None and self.elapsed >= config.max_time_s
                last = self.step == config.meta_steps or out_of_time
                if self.step % config.validate_every == 0 or last:
                    self._record_validation(self.validate())
                if self.step % config.checkpoint_every == 0 or last:
                    self.save_state()
                if out_of_time:
                    break
        return self.folder.best_path


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def meta_train(config: MetaTrainConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Meta-train an update rule (and learned init) and return the best checkpoint's path.

    Parameters
    ----------
    config:
        The run's configuration (saved in every checkpoint).
    resume:
        Continue the run in ``config.run_dir`` from its last saved state (optimizer, step and
        best score included); episodes are drawn by index, so the resumed run sees the same
        episodes as an uninterrupted one.
    progress:
        Show a progress bar.

    Examples
    --------
    >>> import tempfile
    >>> config = MetaTrainConfig(meta_steps=2, meta_batch=1, val_episodes=2,
    ...                          run_dir=tempfile.mkdtemp() + "/run")
    >>> path = meta_train(config, progress=False)
    >>> path.name
    'best.safetensors'
    """
    return MetaTrainer(config, resume=resume, progress=progress).run()


def read_log(run_dir: str | Path) -> list[dict]:
    """The entries of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
