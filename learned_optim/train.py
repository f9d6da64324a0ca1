"""Meta-training: episodes -> inner loop through ``higher`` -> meta-gradient -> Adam.

The same routine trains the Meta-Learner LSTM and, for fair comparisons, the MAML and Meta-SGD
baselines (``config.method``). A run folder holds ``config.json``, ``metrics.jsonl`` (one line
per meta-step and per validation), ``last.state.safetensors`` (everything needed to resume) and
``best.safetensors`` (the checkpoint with the best validation score).

Under ``torchrun`` the same routine runs in every process: each rank takes its share of every
meta-batch and of the validation episodes, one all-reduce sums the meta-gradients, and rank 0
alone writes the run folder (:mod:`learned_optim.distributed`).
"""

from __future__ import annotations

import functools
import math
import platform
import warnings
from pathlib import Path

import higher
import torch
from torch import nn

from learned_optim import distributed
from learned_optim.baselines import MetaSGDRates, PerCoordinateSGD
from learned_optim.checkpoint import load_checkpoint, load_learned_init, save_checkpoint
from learned_optim.config import MetaTrainConfig
from learned_optim.data import splits
from learned_optim.data.preprocessing import Preprocessing
from learned_optim.evaluate import evaluate_rule, query_scores
from learned_optim.finetune import adapted_parameters
from learned_optim.learners import conv_memory_format, reset_batchnorm, set_channels_last
from learned_optim.metalearner import MetaLearnerLSTM
from learned_optim.optimizer import LSTMMetaOptimizer
from learned_optim.pretrain import (
    PROTOTYPICAL_QUERIES,
    PROTOTYPICAL_SHOTS,
    pretrain_features,
    pretrain_prototypical,
)
from learned_optim.rule import policy
from learned_optim.runstate import (
    RESUME_OVERRIDES,
    RunFolder,
    load_training_state,
    read_log,
    save_training_state,
)
from learned_optim.schedule import run_schedule
from learned_optim.stats import Summary, summarize
from learned_optim.tasks import Task, build_task, to_device

# read_log and RESUME_OVERRIDES live in runstate; re-exported, as the README imports them here.
__all__ = ["meta_train", "MetaTrainer", "episode_query_loss", "read_log", "RESUME_OVERRIDES"]



def _detach_all(grads):
    """First-order baselines: the learner's gradients enter as constants."""
    return [None if g is None else g.detach() for g in grads]


def build_rule(config: MetaTrainConfig, learner: nn.Module) -> nn.Module | None:
    """What is meta-learned besides the init: the LSTM, Meta-SGD's step sizes, or nothing."""
    if config.method == "lstm":
        return MetaLearnerLSTM(hidden_size=config.hidden_size,
                               gradient_scale=config.gradient_scale)
    if config.method == "metasgd":
        return MetaSGDRates(learner, initial=config.inner_lr)
    return None  # maml: a fixed step size


def inner_optimizer(config: MetaTrainConfig, rule, learner: nn.Module):
    """The optimizer ``higher`` differentiates through, and the keyword arguments of its step.

    It holds the parameters ``config.adapt`` names; the others keep their initial values in the
    inner loop (and, as the learned init, still get their meta-gradients)."""
    named = adapted_parameters(learner, config.adapt)
    params = [p for _, p in named]
    if config.method == "lstm":
        return LSTMMetaOptimizer(params, rule, first_order=config.first_order), {}
    step_kwargs = {"grad_callback": _detach_all} if config.first_order else {}
    if config.method == "maml":
        return torch.optim.SGD(params, lr=config.inner_lr), step_kwargs
    # Meta-SGD: one group per tensor, whose step size is a learned tensor of the same shape.
    groups = [{"params": [p]} for p in params]
    rates = rule.as_dict()
    step_kwargs["override"] = {"lr": [rates[name] for name, _ in named]}
    return torch.optim.SGD(groups, lr=config.inner_lr), step_kwargs


def rule_spec(config: MetaTrainConfig, rule):
    """The same rule for :func:`learned_optim.finetune` (in place, no tape)."""
    if config.method == "lstm":
        return rule
    if config.method == "maml":
        return functools.partial(torch.optim.SGD, lr=config.inner_lr)
    return functools.partial(PerCoordinateSGD, rates=list(rule.rates))


def episode_query_loss(learner, opt, step_kwargs, episode, steps, task: Task, learned_init=True,
                       query_statistics: str = "batch"):
    """Adapt on the support set for ``steps`` differentiable updates; score the query set.

    Meta-training protocol: BatchNorm statistics reset, support steps in train mode, the query
    set normalised with its own batch statistics (``query_statistics="batch"``, the paper's),
    or in eval mode with the running statistics of the support steps (``"support"``, as
    validation and test score it). Returns ``(query_loss, query_metric)``.
    """
    reset_batchnorm(learner)
    with higher.innerloop_ctx(learner, opt, copy_initial_weights=not learned_init) as (
        fmodel, diffopt):
        fmodel.train()
        for _ in range(steps):
            diffopt.step(task.loss(fmodel(episode.support_inputs), episode.support_targets),
                         **step_kwargs)
        if query_statistics == "support":
            fmodel.eval()
        output = fmodel(episode.query_inputs)
        return task.loss(output, episode.query_targets), task.metric(output.detach(),
                                                                    episode.query_targets)


def _preprocessing_record(config: MetaTrainConfig) -> dict | None:
    spec = Preprocessing.for_config(config)
    return None if spec is None else spec.to_dict()


class MetaTrainer:
    """One meta-training run; see :func:`meta_train`.

    Under ``torchrun`` it joins the process group (:func:`distributed.init_from_env`), and
    rank ``r`` of ``W`` computes the meta-gradient of slots ``r, r + W, ...`` of every
    meta-batch; ``meta_batch`` must be a multiple of ``W``.

    ``adaptive_threads``: a meta-step that starts while other processes hold cores runs on the
    free ones only (:func:`learned_optim.rule.policy.meta_step_threads`), else on torch's
    threads.
    """

    def __init__(self, config: MetaTrainConfig, *, resume: bool = False, progress: bool = True,
                 adaptive_threads: bool = False):
        self.adaptive_threads = adaptive_threads
        self.config = config = config.resolved()
        if config.pretrain_on_validation and not (config.pretrain_epochs
                                                  or config.pretrain_episodes or config.init_from):
            raise ValueError("pretrain_on_validation (--pretrain-on-validation) adds the "
                             "validation classes to the pre-training: set pretrain_epochs "
                             "(--pretrain-epochs) or pretrain_episodes (--pretrain-episodes) too, "
                             "or init_from (--init-from) the run whose features were so")
        distributed.init_from_env(config.device)
        self.rank, self.world_size = distributed.world()
        if config.meta_batch % self.world_size:
            raise ValueError(
                f"meta_batch {config.meta_batch} cannot be split evenly across "
                f"{self.world_size} processes: choose a multiple of {self.world_size} "
                "(each process takes meta_batch / world_size episodes per meta-step)")
        self.task = build_task(config)
        for split in ("train", "val"):  # fail now on missing data, not after the first step
            self.task.episodes(split)
        self.device = distributed.device_for(config.device)  # cuda -> cuda:LOCAL_RANK
        self.folder = RunFolder(config.run_dir)
        self.progress = progress and self.rank == 0
        torch.manual_seed(config.seed)
        self.learner = self.task.make_learner().to(self.device)
        # Second order differentiates through the learner's backward: NCHW is faster there.
        set_channels_last(self.learner, conv_memory_format(
            self.device, second_order=not config.first_order) == torch.channels_last)
        self.rule = build_rule(config, self.learner)
        if self.rule is not None:
            self.rule.to(self.device)
        self.meta_params = list(self.rule.parameters()) if self.rule is not None else []
        if config.learned_init:
            self.meta_params += list(self.learner.parameters())
        if not self.meta_params:
            raise ValueError("nothing to meta-train: MAML without a learned init has no "
                             "meta-parameters")
        self.adam = torch.optim.Adam(self._param_groups(), lr=config.meta_lr)
        self.step = 0
        self.best: dict | None = None
        self.elapsed = 0.0
        if resume:
            self._resume()
        else:
            # Rank 0 owns the files and decides; its error (e.g. FileExistsError) stops all.
            distributed.on_main(self._start, "starting the run")
        # All ranks start from rank 0's weights (warm start and resume happen there only).
        distributed.broadcast_(self._module_tensors(), "sharing the initial weights")

    def _param_groups(self) -> list[dict]:
        """Adam's groups: one at meta_lr, or the rule's weights apart at ``rule_lr``."""
        rule_lr = self.config.rule_lr
        if rule_lr is None or self.rule is None:
            return [{"params": self.meta_params}]
        rule_params = list(self.rule.parameters())
        rule_ids = {id(p) for p in rule_params}
        groups = [{"params": rule_params, "lr": rule_lr}]
        init = [p for p in self.meta_params if id(p) not in rule_ids]
        return groups + ([{"params": init}] if init else [])

    def _start(self) -> None:
        if self.config.init_from:
            self._warm_start(self.config.init_from)
        self.folder.start(self.config)
        if self.config.pretrain_epochs or self.config.pretrain_episodes:
            self._pretrain()

    def _pretrain(self) -> None:
        """Pre-training of c_0's features on the training split, or on its
        ``pretrain_alphabets`` (after a warm start, so it replaces the features a checkpoint of
        another architecture could not give): ``pretrain_epochs`` as a classifier, then
        ``pretrain_episodes`` as a prototypical network. Its time counts as training time and
        its reports go to the metrics log."""
        config = self.config
        if config.pretrain_on_validation:
            warnings.warn("pretrain_on_validation: the features are pre-trained on the "
                          "validation classes too, so this run's validation scores are not held "
                          "out (the record says so; test on another split)", UserWarning,
                          stacklevel=2)
        reports = []
        if config.pretrain_epochs:
            reports.append(pretrain_features(
                self.learner, self.task.pretraining(), config.pretrain_epochs, seed=config.seed,
                distort=config.pretrain_distort, progress=self.progress))
        if config.pretrain_episodes:
            episodes = self.task.pretraining_episodes(config.ways, PROTOTYPICAL_SHOTS,
                                                      PROTOTYPICAL_QUERIES)
            reports.append(pretrain_prototypical(
                self.learner, episodes, config.pretrain_episodes, seed=config.seed,
                distort=config.pretrain_distort, progress=self.progress))
        for report in reports:
            self.elapsed += report.seconds
            self.folder.log({"step": 0, "pretrain": report.to_dict()})

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
        theirs = (checkpoint.record.get("config") or {}).get("architecture",
                                                            MetaTrainConfig.architecture)
        if checkpoint.learned_init is not None and theirs != self.config.architecture:
            # Nothing of another net's init fits; the rule is architecture-free.
            warnings.warn(f"init_from {path}: only its update rule is loaded; its learned init "
                          f"is a {theirs!r} learner's, this run's is {self.config.architecture!r}"
                          + ("" if self.config.pretrain_epochs or self.config.pretrain_episodes
                             else " (and nothing pre-trains it: set pretrain_epochs)"),
                          stacklevel=2)
        elif checkpoint.learned_init is not None:
            # Another number of ways: the head's shape differs; it keeps its fresh weights.
            report = load_learned_init(self.learner, checkpoint, strict=False)
            fresh = report.missing + report.mismatched
            if report.unexpected or (fresh and self.config.method == "metasgd"):
                load_learned_init(self.learner, checkpoint)  # raises, naming the mismatch
            if fresh:
                warnings.warn(f"init_from {path}: learned init loaded except {fresh}, whose "
                              "shapes differ (another number of ways or filters?); those are "
                              "re-initialised",
                              stacklevel=2)

    # --- state -------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module]:
        modules = {"learner": self.learner}
        if self.rule is not None:
            modules["rule"] = self.rule
        return modules

    def _module_tensors(self) -> list[torch.Tensor]:
        return [t for module in self._modules().values() for t in module.state_dict().values()]

    def save_state(self) -> None:
        save_training_state(
            self.folder.state_path, modules=self._modules(), optimizer=self.adam,
            record={"step": self.step, "best": self.best, "elapsed": self.elapsed,
                    "config": self.config.to_dict()},
        )

    def _resume(self) -> None:
        # Rank 0 reads the run folder and hands the others Adam's state (the weights follow in
        # the initial broadcast), so only rank 0's machine needs the files.
        record, shared = distributed.on_main(self._load_state, "resuming the run")
        if shared is not None and self.rank != 0:
            self.adam.load_state_dict(shared["optimizer"])
            torch.set_rng_state(shared["rng"])
        self.step, self.best, self.elapsed = record["step"], record["best"], record["elapsed"]

    def _load_state(self) -> tuple[dict, dict | None]:
        # The configuration is compared before any tensor is loaded into this run's modules.
        _, overrides = self.folder.resume_record(self.config)
        if None in overrides.get("rule_lr", {}).values():  # Adam's groups would differ
            raise ValueError(f"cannot resume {self.folder.path}: rule_lr may change from one "
                             f"number to another, not to or from none ({overrides['rule_lr']})")
        record = load_training_state(self.folder.state_path, modules=self._modules(),
                                     optimizer=self.adam)
        # Adam's loaded param groups carry the saved learning rate: the given one applies now.
        for group, given in zip(self.adam.param_groups, self._param_groups()):
            group["lr"] = given.get("lr", self.config.meta_lr)
        self.folder.truncate_log(record["step"])
        if overrides:
            self.folder.log({"step": record["step"], "resumed_with_changes": overrides})
        if self.world_size == 1:
            return record, None
        state = self.adam.state_dict()
        optimizer = {"param_groups": state["param_groups"],
                     "state": {index: {k: v.cpu() if isinstance(v, torch.Tensor) else v
                                       for k, v in entry.items()}
                               for index, entry in state["state"].items()}}
        return record, {"optimizer": optimizer, "rng": torch.get_rng_state()}

    # --- training ----------------------------------------------------------------------
    def meta_step(self) -> dict:
        """One meta-update over ``meta_batch`` episodes; returns its log entry.

        In a distributed run this rank back-propagates its slots of the meta-batch and the
        meta-gradients are summed over the ranks before the (identical) clip and Adam step.
        """
        with policy.threads_for_meta_step(self.device, self.adaptive_threads):
            return self._meta_step()

    def _meta_step(self) -> dict:
        """:meth:`meta_step` under the threads it runs on."""
        config, episodes = self.config, self.task.episodes("train")
        self.adam.zero_grad(set_to_none=True)
        loss_sum = metric_sum = 0.0
        failure = None
        stopped = (f"at meta-step {self.step + 1}: training stopped; the last good state is "
                   f"kept in {self.folder.state_path} (resume with a lower meta_lr or grad_clip: "
                   f"the same command with --resume --meta-lr {config.meta_lr / 3:.3g}"
                   + ("" if config.rule_lr is None else f" --rule-lr {config.rule_lr / 3:.3g}")
                   + ", or --grad-clip, added)")
        for slot in distributed.rank_slots(config.meta_batch):
            episode = to_device(episodes.episode(self.step * config.meta_batch + slot),
                                self.device)
            opt, step_kwargs = inner_optimizer(config, self.rule, self.learner)
            try:
                loss, metric = episode_query_loss(self.learner, opt, step_kwargs, episode,
                                                  config.inner_steps, self.task,
                                                  config.learned_init, config.query_statistics)
            except FloatingPointError as error:
                failure = str(error)
                break
            (loss / config.meta_batch).backward()
            loss_sum += loss.item()
            metric_sum += metric.item()
        if self.world_size > 1:
            loss_sum, metric_sum, failed = self._sum_over_ranks(loss_sum, metric_sum,
                                                                failure is not None)
            if failed and failure is None:
                failure = "on another rank"
        if failure is not None:  # every rank raises: the failure count was summed
            raise FloatingPointError(f"inner loop failed ({failure}) {stopped}")
        meta_loss = loss_sum / config.meta_batch
        if not math.isfinite(meta_loss):
            raise FloatingPointError(f"meta-loss is {meta_loss} {stopped}")
        grad_norm = nn.utils.clip_grad_norm_(self.meta_params, config.grad_clip)
        self.adam.step()
        self.step += 1
        return {"step": self.step, "meta_loss": meta_loss,
                f"train_{self.task.metric_name}": metric_sum / config.meta_batch,
                "grad_norm": grad_norm.item()}

    def _sum_over_ranks(self, loss_sum: float, metric_sum: float,
                        failed: bool) -> tuple[float, float, bool]:
        """Sum meta-gradients, loss, metric and failures over the ranks: ONE all-reduce.

        Each rank holds sum_{its episodes} d(L_i / meta_batch), so the sum over ranks is the
        single-process meta-gradient of the whole meta-batch.
        """
        params = self.meta_params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dtype = params[0].dtype
        # Which parameters got a gradient anywhere: Adam skips those with none, as it would
        # in one process.
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=dtype,
                                device=self.device)
        scalars = torch.tensor([loss_sum, metric_sum, float(failed)], dtype=dtype,
                               device=self.device)
        distributed.all_reduce_sum_([*grads, has_grad, scalars],
                                    f"meta-step {self.step + 1}")
        for p, grad, present in zip(params, grads, has_grad.tolist()):
            p.grad = grad if present else None
        loss_sum, metric_sum, failures = scalars.tolist()
        return loss_sum, metric_sum, failures > 0

    def validate(self) -> Summary:
        """Validation score; in a distributed run each rank scores its share of the episodes."""
        config = self.config
        indices = range(config.val_episodes)
        spec, episodes = rule_spec(config, self.rule), self.task.episodes("val")
        if self.world_size == 1:
            return evaluate_rule(self.learner, spec, episodes, indices, config.inner_steps,
                                 self.task, self.device)
        mine = list(distributed.rank_slots(config.val_episodes))
        scores = torch.zeros(config.val_episodes, dtype=torch.float64, device=self.device)
        scores[mine] = torch.tensor(
            query_scores(self.learner, spec, episodes, [indices[i] for i in mine],
                         config.inner_steps, self.task, self.device),
            dtype=torch.float64, device=self.device)
        # Each score is added to zeros only: the same numbers, in the same order, as one process.
        distributed.all_reduce_sum_([scores], f"validation at meta-step {self.step}")
        return summarize(scores.tolist())

    def record_validation(self, summary: Summary) -> None:
        name = self.task.metric_name
        if self.rank == 0:
            self.folder.log({"step": self.step, f"val_{name}": summary.mean,
                             f"val_{name}_ci95": summary.ci95, "val_episodes": summary.n})
        # The same summary, hence the same best, on all ranks.
        best_so_far = None if self.best is None else self.best["mean"]
        if self.task.is_better(summary.mean, best_so_far):
            self.best = {"step": self.step, **summary.as_dict()}
            if self.rank == 0:
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
                  "wall_time_s": round(self.elapsed, 1),
                  "hardware": _hardware(self.device, self.world_size),
                  "learned_init_trained": config.learned_init},
            preprocessing=_preprocessing_record(config),
            training_data=splits.training_data(config.to_dict()),
        )

    def run(self) -> Path:
        """Train up to ``meta_steps`` (validating and saving on schedule); the best's path."""
        try:
            self._train()
        except distributed.DistributedError as error:
            raise distributed.DistributedError(
                f"{error} The last saved state is {self.folder.state_path}: restart every "
                "rank with --resume (resume=True).") from error
        distributed.barrier("the end of training")  # rank 0's files are complete for everyone
        return self.folder.best_path

    def _train(self) -> None:
        name = self.task.metric_name
        run_schedule(self, progress=self.progress, main=self.rank == 0,
                     postfix=lambda entry: {"meta_loss": f"{entry['meta_loss']:.4f}",
                                            name: f"{entry['train_' + name]:.4f}"},
                     stop_together=lambda out: distributed.any_true(out, "the time-budget check"))


def _hardware(device: torch.device, processes: int = 1) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = (f"{platform.processor() or platform.machine()} CPU, "
                f"{torch.get_num_threads()} threads")
    return name if processes == 1 else f"{processes} processes x {name}"


def meta_train(config: MetaTrainConfig, *, resume: bool = False, progress: bool = True,
               adaptive_threads: bool = False) -> Path:
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
    adaptive_threads:
        On a CPU, run a meta-step that starts while other processes hold cores on as many
        threads as cores are free (1.6-2.3x faster on one thread with one of 2 cores busy);
        the numbers then depend on the load, so such a run is not reproducible to the bit.
        Episodic tasks (the ``general`` task's trainer keeps torch's threads; its command
        runs on one).

    Examples
    --------
    >>> import tempfile
    >>> config = MetaTrainConfig(meta_steps=2, meta_batch=1, val_episodes=2,
    ...                          run_dir=tempfile.mkdtemp() + "/run")
    >>> path = meta_train(config, progress=False)
    >>> path.name
    'best.safetensors'

    Under ``torchrun`` (``torchrun --nproc-per-node 2 my_script.py``) the same call trains
    with every process: see :mod:`learned_optim.distributed` and docs/howto-distributed.md.
    """
    if config.task == "general":  # a task distribution, unrolled in truncations
        from learned_optim.truncated import TruncatedTrainer

        return TruncatedTrainer(config, resume=resume, progress=progress).run()
    owned = distributed.init_from_env(config.resolved().device)
    best = MetaTrainer(config, resume=resume, progress=progress,
                       adaptive_threads=adaptive_threads).run()
    if owned:  # left in place on errors: the process is about to stop anyway
        distributed.shutdown()
    return best
