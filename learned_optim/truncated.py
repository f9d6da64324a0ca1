"""Meta-training over a task distribution with truncated unrolls (``task = "general"``).

Each meta-step draws ``meta_batch`` problems (:mod:`learned_optim.general`): fresh learners
with no learned init, each trained by the rule for its own horizon. The horizon is unrolled in
truncations of ``truncation`` steps; the learner's weights and the rule's state carry from one
truncation to the next (the learner keeps training), while the meta-gradient is cut between
them. After every truncation the meta-gradients of the problems still running are averaged and
Adam takes a step.

The meta-objective rewards the whole trajectory: the mean over the truncation's steps of
``log(validation loss)``, the logarithm making problems of any loss scale count alike.
First order, as in the paper: the learner's gradients enter the rule as constants, while the
chain ``theta_{t-1} -> theta_t`` through the gates stays differentiable.

The run folder is the same as :class:`learned_optim.train.MetaTrainer`'s; a state is saved
between meta-steps, and a resumed run draws the same problems (problem ``i`` depends only on
the seed and ``i``), so it continues bit-identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from learned_optim.checkpoint import load_update_rule, save_checkpoint
from learned_optim.config import MetaTrainConfig
from learned_optim.general import Problem, ProblemDistribution
from learned_optim.metalearner import MetaLearnerLSTM
from learned_optim.rule.math import initial_state, prepare_step
from learned_optim.rule.tape import update_rows_differentiable
from learned_optim.runstate import RunFolder, load_training_state, save_training_state
from learned_optim.schedule import run_schedule
from learned_optim.stats import summarize

__all__ = ["TruncatedTrainer", "ProblemRun", "general_rule", "trajectory_objective",
           "trajectory_score", "LOSS_FLOOR"]

# Added to every validation loss before its logarithm: a problem fitted to 1e-4 should not
# dominate the meta-gradient through 1 / loss.
LOSS_FLOOR = 1e-4
# A problem whose training loss grows past this multiple of its first is stopped as diverged.
DIVERGED_FACTOR = 1e4


def general_rule(hidden_size: int = 20, gradient_scale: float | None = 0.1) -> MetaLearnerLSTM:
    """The starting point of a general rule: the paper's weights, gates set for long runs.

    The paper's forget bias (sigmoid ~ 0.995) shrinks every weight by 0.5% a step, harmless
    over 12 steps and fatal over thousands; here it starts at ~0.9999, and the input gate at
    ~0.02-0.05, which meta-training then adapts per coordinate. With ``gradient_scale`` the rule
    reads Adam's normalised direction (:func:`learned_optim.rule.math.scale_gradient`): the
    start is then close to Adam with a step of 0.002-0.005, instead of SGD with that step.

    >>> f, i = torch.sigmoid(general_rule().meta_bias.detach())
    >>> bool(f > 0.9998), bool(0.015 < i < 0.05)
    (True, True)
    """
    rule = MetaLearnerLSTM(hidden_size=hidden_size, optional_loss=True,
                           gradient_scale=gradient_scale)
    with torch.no_grad():
        rule.meta_bias[0].uniform_(8.5, 9.5)
        rule.meta_bias[1].uniform_(-4.0, -3.0)
    return rule


@dataclass
class ProblemRun:
    """A problem being trained: its flat weights, BatchNorm buffers and the rule's state."""

    problem: Problem
    names: list[str]
    shapes: list[torch.Size]
    params: Tensor  # flat theta_t
    buffers: dict[str, Tensor]
    state: Tensor  # [n, 2H + 2]
    step: int = 0
    moments: Tensor | None = None  # gradient averages of a rule with gradient_scale
    first_loss: float | None = None
    first_val: float | None = None
    diverged: bool = False

    @classmethod
    def start(cls, problem: Problem, hidden_size: int) -> ProblemRun:
        named = list(problem.model.named_parameters())
        params = torch.cat([p.detach().reshape(-1) for _, p in named])
        buffers = {name: b.detach().clone() for name, b in problem.model.named_buffers()}
        return cls(problem, [n for n, _ in named], [p.shape for _, p in named], params,
                   buffers, initial_state(params.numel(), hidden_size))

    @property
    def done(self) -> bool:
        return self.diverged or self.step >= self.problem.horizon

    def _tensors(self, flat: Tensor) -> dict[str, Tensor]:
        pieces = flat.split([math.prod(s) for s in self.shapes])
        return {name: piece.view(shape)
                for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def loss_at(self, flat: Tensor, batch: tuple[Tensor, Tensor], *, keep_stats: bool) -> Tensor:
        """The problem's loss with weights ``flat`` (train mode; BatchNorm statistics are
        updated only when ``keep_stats``)."""
        buffers = self.buffers if keep_stats else {k: v.clone() for k, v in self.buffers.items()}
        output = functional_call(self.problem.model, {**self._tensors(flat), **buffers},
                                 (batch[0],))
        return self.problem.loss(output, batch[1])

    def unroll(self, rule: MetaLearnerLSTM, steps: int) -> list[Tensor]:
        """Train ``steps`` more steps with ``rule``; the validation loss after each step.

        On the autograd tape when grad mode is on (the rule's weights require grad): the
        returned losses back-propagate into the rule through the chain of this unroll only;
        the carried weights and state are detached afterwards.
        """
        weights = rule.weights()
        flat, state = self.params, self.state
        val_losses = []
        for _ in range(min(steps, self.problem.horizon - self.step)):
            leaf = flat.detach().requires_grad_()
            with torch.enable_grad():
                loss = self.loss_at(leaf, self.problem.train_batch(), keep_stats=True)
                (grad,) = torch.autograd.grad(loss, leaf)
            loss_value = loss.item()
            if self.first_loss is None:
                self.first_loss = loss_value
            if (not math.isfinite(loss_value) or not bool(torch.isfinite(grad).all())
                    or loss_value > DIVERGED_FACTOR * max(self.first_loss, 1e-3)):
                self.diverged = True
                break
            grad, self.moments = rule.rule_gradient(grad, self.moments, self.step + 1)
            constants = prepare_step(weights, None if self.problem.withhold_loss
                                     else loss.detach(), flat.dtype)
            flat, state = update_rows_differentiable(constants, state, grad, flat)
            val = self.loss_at(flat, self.problem.val_batch(), keep_stats=False)
            if not bool(torch.isfinite(val)):
                self.diverged = True
                break
            if self.first_val is None:
                self.first_val = val.item()
            val_losses.append(val)
            self.step += 1
        self.params, self.state = flat.detach(), state.detach()
        return val_losses


def trajectory_objective(val_losses: list[Tensor]) -> Tensor:
    """The meta-loss of one truncation: mean of ``log(val loss + LOSS_FLOOR)`` over its steps.

    >>> float(trajectory_objective([torch.tensor(1.0), torch.tensor(1.0)])) > 0
    True
    """
    return torch.stack([torch.log(v + LOSS_FLOOR) for v in val_losses]).mean()


def trajectory_score(rule: MetaLearnerLSTM, problem: Problem, hidden_size: int) -> float:
    """Validation score of one problem (no tape): mean over its horizon of
    ``log((val loss_t + floor) / (val loss_1 + floor))``; a diverged problem scores
    ``log(DIVERGED_FACTOR)`` for its remaining steps."""
    run = ProblemRun.start(problem, hidden_size)
    with torch.no_grad():
        losses = [v.item() for v in run.unroll(rule, problem.horizon)]
    if not losses:
        return math.log(DIVERGED_FACTOR)
    base = math.log(losses[0] + LOSS_FLOOR)
    logs = [math.log(v + LOSS_FLOOR) - base for v in losses]
    logs += [math.log(DIVERGED_FACTOR)] * (problem.horizon - len(logs))
    return sum(logs) / len(logs)


class TruncatedTrainer:
    """One meta-training run over the task distribution; see :func:`learned_optim.meta_train`.

    >>> import tempfile
    >>> config = MetaTrainConfig(task="general", meta_steps=1, meta_batch=2, val_episodes=2,
    ...                          horizon_max=8, run_dir=tempfile.mkdtemp() + "/run")
    >>> TruncatedTrainer(config, progress=False).run().name
    'best.safetensors'
    """

    def __init__(self, config: MetaTrainConfig, *, resume: bool = False,
                 progress: bool = True) -> None:
        self.config = config = config.resolved()
        if config.method != "lstm":
            raise ValueError(f"task 'general' meta-trains the LSTM rule, not {config.method!r}")
        if config.learned_init:
            raise ValueError("task 'general' trains fresh learners of many architectures: it "
                             "has no learned init (set learned_init = false, --no-learned-init)")
        if not config.first_order:
            raise ValueError("task 'general' is first order only")
        if config.device != "cpu":
            raise ValueError("task 'general' runs on the CPU (its learners are small)")
        self.distributions = {
            split: ProblemDistribution(split, config.data_root,
                                       (config.horizon_min, config.horizon_max),
                                       config.loss_dropout, config.seed)
            for split in ("train", "val")}
        self.folder = RunFolder(config.run_dir)
        self.progress = progress
        torch.manual_seed(config.seed)
        self.rule = general_rule(config.hidden_size, config.gradient_scale)
        self.adam = torch.optim.Adam(self.rule.parameters(), lr=config.meta_lr)
        self.step, self.updates, self.best, self.elapsed = 0, 0, None, 0.0
        if resume:
            self._resume()
        else:
            if config.init_from:
                with torch.no_grad():
                    source = load_update_rule(config.init_from)
                    for ours, theirs in zip(self.rule.parameters(), source.parameters()):
                        ours.copy_(theirs)
            self.folder.start(config)

    # --- state -------------------------------------------------------------------------
    def save_state(self) -> None:
        save_training_state(self.folder.state_path, modules={"rule": self.rule},
                            optimizer=self.adam,
                            record={"step": self.step, "updates": self.updates,
                                    "best": self.best, "elapsed": self.elapsed,
                                    "config": self.config.to_dict()})

    def _resume(self) -> None:
        _, overrides = self.folder.resume_record(self.config)  # before any tensor loads
        record = load_training_state(self.folder.state_path, modules={"rule": self.rule},
                                     optimizer=self.adam)
        for group in self.adam.param_groups:  # a changed meta_lr applies from now on
            group["lr"] = self.config.meta_lr
        self.folder.truncate_log(record["step"])
        if overrides:
            self.folder.log({"step": record["step"], "resumed_with_changes": overrides})
        self.step, self.updates = record["step"], record["updates"]
        self.best, self.elapsed = record["best"], record["elapsed"]

    # --- training ----------------------------------------------------------------------
    def meta_step(self) -> dict:
        """Train ``meta_batch`` new problems to their horizons, one Adam step a truncation."""
        config = self.config
        runs = [ProblemRun.start(self.distributions["train"].problem(
            self.step * config.meta_batch + slot), config.hidden_size)
            for slot in range(config.meta_batch)]
        objectives, grad_norms = [], []
        while True:
            active = [run for run in runs if not run.done]
            if not active:
                break
            self.adam.zero_grad(set_to_none=True)
            total = 0.0
            for run in active:
                val_losses = run.unroll(self.rule, config.truncation)
                if not val_losses:
                    continue
                objective = trajectory_objective(val_losses)
                (objective / len(active)).backward()
                total += objective.item() - math.log(run.first_val + LOSS_FLOOR)
            if all(p.grad is None for p in self.rule.parameters()):
                continue
            grad_norms.append(nn.utils.clip_grad_norm_(self.rule.parameters(),
                                                       config.grad_clip).item())
            if not math.isfinite(grad_norms[-1]):
                raise FloatingPointError(
                    f"meta-gradient is {grad_norms[-1]} at meta-step {self.step + 1}: training "
                    f"stopped; the last good state is kept in {self.folder.state_path}")
            self.adam.step()
            self.updates += 1
            objectives.append(total / len(active))
        self.step += 1
        return {"step": self.step, "updates": self.updates,
                "meta_loss": sum(objectives) / max(1, len(objectives)),
                "grad_norm": max(grad_norms, default=0.0),
                "diverged": sum(run.diverged for run in runs),
                "horizons": [run.problem.horizon for run in runs]}

    def validate(self) -> dict:
        """Mean :func:`trajectory_score` over ``val_episodes`` validation problems."""
        problems = self.distributions["val"]
        return summarize([trajectory_score(self.rule, problems.problem(i),
                                           self.config.hidden_size)
                          for i in range(self.config.val_episodes)]).as_dict()

    def record_validation(self, summary: dict) -> None:
        self.folder.log({"step": self.step, "val_log_loss_ratio": summary["mean"],
                         "val_log_loss_ratio_ci95": summary["ci95"],
                         "val_episodes": summary["episodes"]})
        if self.best is None or summary["mean"] < self.best["mean"]:
            self.best = {"step": self.step, **summary}
            self.save_best()

    def save_best(self) -> Path:
        return save_checkpoint(
            self.folder.best_path, self.rule, config=self.config, dataset="general",
            metrics={"val_log_loss_ratio": self.best["mean"],
                     "val_log_loss_ratio_ci95": self.best["ci95"],
                     "val_episodes": self.best["episodes"]},
            card={"meta_steps": self.step, "meta_updates": self.updates,
                  "problems_trained": self.step * self.config.meta_batch,
                  "wall_time_s": round(self.elapsed, 1),
                  "hardware": f"CPU, {torch.get_num_threads()} threads",
                  "learned_init_trained": False})

    def run(self) -> Path:
        """Train up to ``meta_steps`` (validating and saving on schedule); the best's path."""
        run_schedule(self, progress=self.progress,
                     postfix=lambda entry: {"meta_loss": f"{entry['meta_loss']:.3f}"})
        return self.folder.best_path
