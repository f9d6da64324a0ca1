"""A few-shot task family: episode streams for each split, the learner, loss and score."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from learned_optim.config import MetaTrainConfig
from learned_optim.learners import SinusoidMLP, classification_learner

__all__ = ["Task", "build_task", "accuracy", "SPLIT_SEED_OFFSETS"]

# Each split draws from its own episode stream (seed + offset).
SPLIT_SEED_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_003}
# ... and prototypical pre-training's episodes from a stream of their own.
PRETRAINING_SEED_OFFSET = 3_000_017


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Fraction of correct arg-max predictions."""
    return (logits.argmax(dim=1) == targets).float().mean()


@dataclass
class Task:
    """What meta-training and evaluation need to know about a task family.

    ``episodes(split)`` returns an object with ``episode(index)``; ``make_learner()`` a fresh
    learner; ``loss`` the training loss; ``metric`` the reported number (accuracy, or MSE for
    regression) with ``higher_is_better``. ``pretraining()`` (classification tasks) returns
    the data set whose classes pre-train the learned init's features (``pretrain_epochs``):
    the training split, or with ``pretrain_alphabets`` that many of its alphabets, whose
    characters ``episodes("train")`` then leaves out. ``pretraining_episodes(ways, shots,
    queries)`` draws episodes of that data set for prototypical pre-training
    (``pretrain_episodes``): inside one alphabet where the protocol tests so.
    """

    config: MetaTrainConfig
    episodes: Callable[[str], object]
    make_learner: Callable[[], nn.Module]
    loss: Callable[[Tensor, Tensor], Tensor]
    metric: Callable[[Tensor, Tensor], Tensor]
    metric_name: str
    higher_is_better: bool
    pretraining: Callable[[], object] | None = None
    pretraining_episodes: Callable[[int, int, int], object] | None = None

    def is_better(self, score: float, than: float | None) -> bool:
        """Whether ``score`` beats ``than`` (``None``: nothing to beat) for this metric."""
        if than is None:
            return True
        return score > than if self.higher_is_better else score < than


def _classification_dataset(config: MetaTrainConfig, split: str):
    from learned_optim.data import Preprocessing, miniimagenet, omniglot

    if config.data_root is None:
        raise ValueError(
            f"task {config.task!r} needs data_root (--data-root): the folder holding "
            + ("images_background.zip and images_evaluation.zip"
               if config.task == "omniglot" else "images/ and train.csv, val.csv, test.csv")
        )
    root = Path(config.data_root).expanduser()
    if config.task == "omniglot":
        # Rotated copies are new training classes only: val and test stay as the protocol has
        # them, so scores remain comparable with and without rotations.
        return omniglot(root, split=split, protocol=config.protocol, image_size=config.image_size,
                        download=bool(config.extra.get("download", False)),
                        rotations=config.rotations and split == "train",
                        preprocessing=Preprocessing.for_config(config))
    return miniimagenet(root, split=split, image_size=config.image_size)


def _training_parts(config: MetaTrainConfig, dataset_of: Callable):
    """The training split as ``(pre-training classes, meta-training classes)``: the same data
    set twice, or, with ``pretrain_alphabets``, its two disjoint parts by whole alphabets; with
    ``pretrain_on_validation`` the pre-training classes are the training and the validation
    classes. ``dataset_of(split)`` loads a split (the task's, loaded once)."""
    from learned_optim.data.omniglot import split_by_alphabets

    dataset = dataset_of("train")
    if config.pretrain_on_validation:
        return join_classes(dataset, dataset_of("val")), dataset
    if config.pretrain_alphabets is None:
        return dataset, dataset
    return split_by_alphabets(dataset, config.pretrain_alphabets, config.seed)


def join_classes(first, second):
    """One :class:`~learned_optim.data.FewShotDataset` of two data sets' classes, the second's
    numbered after the first's; class names are kept (an alphabet's characters stay grouped
    by their ``"alphabet/character"`` names), so they must not repeat.

    >>> import torch
    >>> from learned_optim.data import FewShotDataset
    >>> a = FewShotDataset(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), class_names=["x", "y"])
    >>> b = FewShotDataset(torch.ones(2, 2), torch.tensor([0, 0]), class_names=["z"])
    >>> joined = join_classes(a, b)
    >>> joined.num_classes, joined.labels.tolist(), joined.class_names
    (3, [0, 0, 1, 1, 2, 2], ['x', 'y', 'z'])
    """
    from learned_optim.data import FewShotDataset

    if first.inputs.shape[1:] != second.inputs.shape[1:]:
        raise ValueError(f"cannot join {first.name!r} (examples {tuple(first.inputs.shape[1:])}) "
                         f"and {second.name!r} ({tuple(second.inputs.shape[1:])})")
    shared = sorted(set(first.class_names) & set(second.class_names))
    if shared:
        raise ValueError(f"cannot join {first.name!r} and {second.name!r}: {len(shared)} class "
                         f"name(s) in both, e.g. {shared[0]!r}")
    return FewShotDataset(torch.cat((first.inputs, second.inputs)),
                          torch.cat((first.labels, second.labels + first.num_classes)),
                          class_names=list(first.class_names) + list(second.class_names),
                          name=f"{first.name}+{second.name}")


def build_task(config: MetaTrainConfig) -> Task:
    """Build the task family a (resolved) configuration describes.

    >>> task = build_task(MetaTrainConfig().resolved())
    >>> task.metric_name, task.episodes("train").episode(0).support_inputs.shape
    ('mse', torch.Size([10, 1]))
    """
    config = config.resolved()
    if config.task == "sinusoid":
        from learned_optim.data import SinusoidTasks

        def sinusoid_episodes(split: str):
            return SinusoidTasks(config.shots, config.queries, protocol=config.protocol,
                                 seed=config.seed + SPLIT_SEED_OFFSETS[split])

        return Task(config, sinusoid_episodes, SinusoidMLP, F.mse_loss,
                    F.mse_loss, "mse", higher_is_better=False)

    from learned_optim.data import EpisodeSampler, WithinAlphabetSampler
    from learned_optim.data.omniglot import WITHIN_ALPHABET_PROTOCOLS

    cache: dict[str, object] = {}

    def dataset_of(split: str):  # each split loaded once (validation may pre-train too)
        key = "dataset " + split
        if key not in cache:
            cache[key] = _classification_dataset(config, split)
        return cache[key]

    def training_parts():  # loaded once for pre-training and the training episodes
        if "parts" not in cache:
            cache["parts"] = _training_parts(config, dataset_of)
        return cache["parts"]

    within_alphabet = config.task == "omniglot" and config.protocol in WITHIN_ALPHABET_PROTOCOLS

    def sampler(dataset, ways: int, shots: int, queries: int, seed: int, mixed: bool = False):
        """Lake's runs (one alphabet per episode, support and query by other drawers) under
        the within-alphabet protocols; ``mixed``: one group, drawers still apart."""
        if within_alphabet:
            alphabets = ["all"] * dataset.num_classes if mixed else None
            return WithinAlphabetSampler(dataset, ways, shots, queries, seed,
                                         alphabets=alphabets)
        return EpisodeSampler(dataset, ways, shots, queries, seed=seed)

    def classification_episodes(split: str):
        if split not in cache:
            dataset = training_parts()[1] if split == "train" else dataset_of(split)
            # lake-within's few validation characters per alphabet: one group; lake-alphabets
            # validates on whole alphabets, as it tests.
            mixed = split == "val" and config.protocol == "lake-within"
            cache[split] = sampler(dataset, config.ways, config.shots, config.queries,
                                   config.seed + SPLIT_SEED_OFFSETS[split], mixed)
        return cache[split]

    def pretraining_episodes(ways: int, shots: int, queries: int):
        return sampler(training_parts()[0], ways, shots, queries,
                       config.seed + PRETRAINING_SEED_OFFSET)

    channels = 1 if config.task == "omniglot" else 3

    def make_learner() -> nn.Module:
        return classification_learner(config.architecture, channels, config.ways,
                                      config.filters, config.image_size, config.bn_momentum,
                                      feature_scale=config.feature_scale)

    return Task(config, classification_episodes, make_learner, F.cross_entropy, accuracy,
                "accuracy", higher_is_better=True, pretraining=lambda: training_parts()[0],
                pretraining_episodes=pretraining_episodes)


def to_device(episode, device: torch.device | str):
    """Move an episode's four tensors to ``device``."""
    return type(episode)(*(t.to(device) for t in episode))
