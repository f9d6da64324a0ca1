"""The meta-training configuration: one dataclass, saved inside every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["ADAPTED", "ARCHITECTURES", "MetaTrainConfig", "TASKS", "METHODS", "SINUSOID_RULE_LR",
           "load_config"]

TASKS = ("sinusoid", "omniglot", "miniimagenet", "general")
METHODS = ("lstm", "maml", "metasgd")
IMAGE_TASKS = ("omniglot", "miniimagenet")  # the tasks whose learner is an image classifier
# The image learners a configuration may name (learners.classification_learner).
ARCHITECTURES = ("conv4", "resnet12")
# What the inner loop adapts (finetune.adapted_parameters): every parameter, or the image
# learner's head alone (its features stay the learned init).
ADAPTED = ("all", "head")
QUERY_STATISTICS = ("batch", "support")  # meta-training's BatchNorm of the query set
# The sinusoid main job's rule learning rate: 10x meta_lr. In the ~1,500 meta-steps that fit in
# its few minutes the rule, which starts as SGD with a step of ~0.01 (input gate bias -4.5), then
# learns its own steps, while the learned init moves at meta_lr (3x meta_lr for everything
# made the rule diverge on some test episodes). Shipped sinusoid configs pin rule_lr.
SINUSOID_RULE_LR = 1e-2


@dataclass
class MetaTrainConfig:
    """Everything a meta-training run depends on. ``None`` means "the task's default".

    Defaults follow the paper (METHOD.md): T inner steps on the whole support set, 15 queries
    per class, Adam with learning rate 1e-3, global gradient-norm clip 0.25, first-order
    meta-gradients, learned initialisation. ``learned-optim meta-train`` with no options runs
    the sinusoid task in a few minutes on a CPU.

    Examples
    --------
    >>> config = MetaTrainConfig(task="omniglot", shots=5).resolved()
    >>> config.inner_steps, config.bn_momentum, config.queries
    (8, 0.95, 15)
    """

    task: str = "sinusoid"
    method: str = "lstm"  # lstm (the paper), or the maml / metasgd baselines
    data_root: str | None = None
    # omniglot: vinyals | lake | lake-within | lake-alphabets; sinusoid: maml | metasgd
    protocol: str | None = None
    # omniglot lake protocols: add the training characters rotated by 90, 180 and 270
    # degrees as new classes (train split only; vinyals always has them)
    rotations: bool = False
    ways: int | None = None  # classification only
    shots: int | None = None
    queries: int | None = None  # per class (classification) or points (sinusoid)
    inner_steps: int | None = None  # T
    meta_batch: int = 4  # episodes per meta-update
    meta_steps: int | None = None  # meta-updates
    meta_lr: float = 1e-3
    # Adam learning rate of the rule's weights (the LSTM's, or Meta-SGD's rates); None: meta_lr
    # (the learned init always takes meta_lr). The sinusoid LSTM's default is SINUSOID_RULE_LR.
    rule_lr: float | None = None
    grad_clip: float = 0.25
    first_order: bool = True
    learned_init: bool = True  # meta-learn the learner's initial weights c_0
    hidden_size: int = 20
    # None: the paper's rule (raw gradients); a number: the rule reads RMS-scaled gradients
    # and a step is at most this (MetaLearnerLSTM(gradient_scale=...)); "general" uses 0.1.
    gradient_scale: float | None = None
    filters: int | None = None
    # image tasks: the learner, "conv4" (the paper's 4 blocks) or "resnet12" (widths filters,
    # 2, 4 and 8 filters; learners.ResNet12Learner)
    architecture: str = "conv4"
    # image tasks: the parameters the update rule adapts on a support set, "all" or "head"
    # (the features stay the learned init, meta-trained by the outer loop only)
    adapt: str = "all"
    feature_scale: float | None = None  # conv learner: a cosine head (features scaled to this)
    image_size: int | None = None
    # omniglot: crop every image to the square around its ink, widened by this margin,
    # before resizing (data.crop_to_ink; stored in the record's preprocessing)
    crop_to_ink: float | None = None
    bn_momentum: float | None = None
    inner_lr: float | None = None  # maml step size / metasgd initial step size
    validate_every: int | None = None
    val_episodes: int | None = None
    checkpoint_every: int | None = None
    init_from: str | None = None  # start from a checkpoint's rule and learned init
    pretrain_epochs: int | None = None  # supervised pre-training of c_0's features first
    # ... then (or instead) as a prototypical network on this many episodes of the training
    # classes (Snell et al. 2017; within one alphabet for Omniglot's lake protocols)
    pretrain_episodes: int | None = None
    pretrain_distort: bool = False  # ... on randomly distorted images (Koch et al. 2015)
    # omniglot: the features are pre-trained on this many of the training split's alphabets
    # (drawn by seed; data.omniglot.split_by_alphabets) and meta-training's episodes come from
    # the others, whose characters the features never saw (as at test). Set it also when
    # continuing (init_from) a run whose features were pre-trained so.
    pretrain_alphabets: int | None = None
    # pre-train the features on the validation classes too (train + val: the final features of
    # a recipe fixed on validation, with every class the protocol allows); validation scores
    # of such a run are not held out, which its record and card say. Set it also when
    # continuing (init_from) a run whose features were pre-trained so: a shipped record keeps
    # it without init_from, and meta_train() refuses it with neither that nor pre-training.
    pretrain_on_validation: bool = False
    # BatchNorm statistics of the query set in meta-training: "batch" (the paper: the query
    # set's own) or "support" (eval mode with the support steps' running statistics, as
    # validation and test score it)
    query_statistics: str = "batch"
    max_time_s: float | None = None  # stop (validated and saved) after this much training time
    # task "general" (learned_optim.general): fresh learners trained for horizon_min ..
    # horizon_max steps in truncations of `truncation` steps; `loss_dropout` of the problems
    # withhold the loss from the rule, so that it also works without one.
    truncation: int | None = None
    horizon_min: int | None = None
    horizon_max: int | None = None
    loss_dropout: float | None = None
    seed: int = 0
    run_dir: str | None = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("ways", "shots", "queries", "inner_steps", "meta_batch", "meta_steps",
                     "hidden_size", "filters", "image_size", "validate_every", "val_episodes",
                     "checkpoint_every", "truncation", "horizon_min", "horizon_max",
                     "pretrain_epochs", "pretrain_episodes", "pretrain_alphabets"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("meta_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.rule_lr is not None and not self.rule_lr > 0:
            raise ValueError(f"rule_lr must be positive, got {self.rule_lr!r}")
        if self.max_time_s is not None and not self.max_time_s > 0:
            raise ValueError(f"max_time_s must be positive, got {self.max_time_s!r}")
        if self.gradient_scale is not None and not self.gradient_scale > 0:
            raise ValueError(f"gradient_scale must be positive, got {self.gradient_scale!r}")
        if self.loss_dropout is not None and not 0 <= self.loss_dropout <= 1:
            raise ValueError(f"loss_dropout must lie in [0, 1], got {self.loss_dropout!r}")
        if (self.horizon_min is not None and self.horizon_max is not None
                and self.horizon_min > self.horizon_max):
            raise ValueError(f"horizon_min {self.horizon_min} exceeds horizon_max "
                             f"{self.horizon_max}")
        if self.feature_scale is not None and (not self.feature_scale > 0
                                               or self.task not in IMAGE_TASKS):
            raise ValueError("feature_scale (--feature-scale) must be positive and applies to "
                             "the conv learner of omniglot / miniimagenet, got "
                             f"{self.feature_scale!r} for task {self.task!r}")
        if self.crop_to_ink is not None and (not 0 <= self.crop_to_ink <= 2
                                             or self.task != "omniglot"):
            raise ValueError("crop_to_ink (--crop-to-ink) is a margin in [0, 2] for task "
                             f"omniglot, got {self.crop_to_ink!r} for task {self.task!r}")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise ValueError(f"bn_momentum must lie in (0, 1], got {self.bn_momentum!r}")
        if not isinstance(self.rotations, bool):
            raise ValueError(f"rotations must be true or false, got {self.rotations!r}")
        if self.rotations and not (self.task == "omniglot"
                                   and self.protocol in ("lake", "lake-within",
                                                         "lake-alphabets")):
            raise ValueError(
                "rotations (--rotations) adds rotated training characters to Omniglot's 'lake', "
                f"'lake-within' and 'lake-alphabets' protocols only, got task {self.task!r} with "
                f"protocol {self.protocol!r} (protocol 'vinyals', the omniglot default, always "
                "rotates)")

        for name in ("pretrain_epochs", "pretrain_episodes"):
            if getattr(self, name) and not (self.task in IMAGE_TASKS
                                            and self.learned_init):
                raise ValueError(
                    f"{name} (--{name.replace('_', '-')}) pre-trains the learned init's "
                    "features on the training classes: it needs a classification task "
                    f"(omniglot, miniimagenet) with learned_init, got task {self.task!r} with "
                    f"learned_init {self.learned_init!r}")

        if not isinstance(self.pretrain_distort, bool):
            raise ValueError(f"pretrain_distort must be true or false, got "
                             f"{self.pretrain_distort!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got "
                             f"{self.architecture!r}")
        if self.architecture != "conv4" and self.task not in IMAGE_TASKS:
            raise ValueError(f"architecture {self.architecture!r} is for the image tasks "
                             f"{IMAGE_TASKS}; task {self.task!r} builds its own learners")
        if self.adapt not in ADAPTED:
            raise ValueError(f"adapt must be one of {ADAPTED}, got {self.adapt!r}")
        if self.adapt != "all" and self.task not in IMAGE_TASKS:
            raise ValueError(f"adapt {self.adapt!r} is for the image tasks {IMAGE_TASKS} (their "
                             f"learners have a head); task {self.task!r} adapts all parameters")
        if self.query_statistics not in QUERY_STATISTICS:
            raise ValueError(f"query_statistics must be one of {QUERY_STATISTICS}, got "
                             f"{self.query_statistics!r}")
        if self.pretrain_alphabets is not None and self.task != "omniglot":
            raise ValueError("pretrain_alphabets (--pretrain-alphabets) splits Omniglot's "
                             f"training alphabets, got task {self.task!r}")
        if not isinstance(self.pretrain_on_validation, bool):
            raise ValueError(f"pretrain_on_validation must be true or false, got "
                             f"{self.pretrain_on_validation!r}")
        if self.pretrain_on_validation and self.pretrain_alphabets is not None:
            raise ValueError("pretrain_on_validation and pretrain_alphabets cannot be combined: "
                             "the one pre-trains on more classes, the other keeps some apart")
        if self.pretrain_distort and not (self.pretrain_epochs or self.pretrain_episodes):
            raise ValueError("pretrain_distort (--pretrain-distort) distorts the images of the "
                             "pre-training: set pretrain_epochs (--pretrain-epochs) or "
                             "pretrain_episodes (--pretrain-episodes) too")

    @property
    def is_classification(self) -> bool:
        return self.task != "sinusoid"

    def resolved(self) -> MetaTrainConfig:
        """A copy with every task default filled in."""
        c = dataclasses.replace(self)
        if c.task == "general":
            return self._resolved_general(c)
        sinusoid = c.task == "sinusoid"
        c.protocol = c.protocol or ("maml" if sinusoid else "vinyals")
        c.shots = c.shots or (10 if sinusoid else 1)
        c.queries = c.queries or (c.shots if sinusoid else 15)
        if sinusoid:
            c.ways = None
        else:
            c.ways = c.ways or 5
        # Authors: 1-shot T = 12, 5-shot T = 8; sinusoid: a short horizon like MAML's.
        c.inner_steps = c.inner_steps or (5 if sinusoid else (12 if c.shots == 1 else 8))
        c.meta_steps = c.meta_steps or (1500 if sinusoid else 20000)
        c.filters = c.filters or 32  # the paper's learner
        c.image_size = c.image_size or {"sinusoid": 1, "omniglot": 28, "miniimagenet": 84}[c.task]
        c.bn_momentum = c.bn_momentum or (0.9 if c.shots == 1 else 0.95)
        c.inner_lr = c.inner_lr or (0.01 if sinusoid else 0.1)
        if sinusoid and c.method == "lstm" and c.rule_lr is None:
            c.rule_lr = SINUSOID_RULE_LR
        c.validate_every = c.validate_every or (250 if sinusoid else 500)
        c.val_episodes = c.val_episodes or (100 if sinusoid else 100)
        c.checkpoint_every = c.checkpoint_every or (50 if sinusoid else 100)
        c.run_dir = c.run_dir or str(Path("runs") / self.default_name(c))
        return c

    @staticmethod
    def _resolved_general(c: MetaTrainConfig) -> MetaTrainConfig:
        """Defaults of the task distribution: fresh learners (no learned init), horizons of
        5-300 steps in truncations of 20, the loss withheld from half of the problems."""
        c.learned_init = False
        c.gradient_scale = 0.1 if c.gradient_scale is None else c.gradient_scale
        c.truncation = c.truncation or 20
        c.horizon_min = c.horizon_min or 5
        c.horizon_max = c.horizon_max or max(300, c.horizon_min)
        if c.horizon_min > c.horizon_max:
            raise ValueError(f"horizon_min {c.horizon_min} exceeds horizon_max {c.horizon_max}")
        c.loss_dropout = 0.5 if c.loss_dropout is None else c.loss_dropout
        c.meta_steps = c.meta_steps or 2000
        c.validate_every = c.validate_every or 20
        c.val_episodes = c.val_episodes or 16
        c.checkpoint_every = c.checkpoint_every or 5
        c.run_dir = c.run_dir or str(Path("runs") / "general-lstm")
        return c

    @staticmethod
    def default_name(c: MetaTrainConfig) -> str:
        if c.task == "general":
            return "general-lstm"
        if c.task == "sinusoid":
            return f"sinusoid-{c.shots}shot-{c.method}"
        return f"{c.task}-{c.ways}w{c.shots}s-{c.method}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MetaTrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def load_config(path: str | os.PathLike) -> MetaTrainConfig:
    """Read a configuration from a ``.toml`` or ``.json`` file (flat keys, as the dataclass)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            raise RuntimeError(f"{path}: reading TOML needs Python 3.11+; use JSON") from None
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: invalid TOML ({error})") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON ({error})") from None
    try:
        return MetaTrainConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
