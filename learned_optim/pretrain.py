"""Supervised pre-training of a learner's feature extractor, as a start for its learned init.

Meta-training learns the learner's initial weights c_0 (Ravi & Larochelle, sec. 3.2) from
episodes of a few examples each, which is slow to shape good features on a CPU. Training the
same ``features`` module as one ordinary classifier over every class of the training split
first (a linear head over all of them, discarded afterwards) gives meta-training a start whose
features already separate characters; the update rule and c_0 are then meta-trained from there
as usual. The pre-training reads the training split only (with its rotated copies where the
run has them): what the checkpoint records as seen is unchanged, and validation and test
characters stay unseen.

:func:`pretrain_prototypical` trains the same features for the comparison a few-shot episode
asks for instead: as a prototypical network (Snell et al., 2017), on episodes of the training
classes, within one alphabet for Omniglot's within-alphabet protocols.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from learned_optim.learners import conv_inputs

__all__ = ["PretrainReport", "pretrain_features", "pretrain_prototypical", "random_affine",
           "PROTOTYPICAL_SHOTS", "PROTOTYPICAL_QUERIES"]

# Episodes of prototypical pre-training: more shots than a one-shot test, as Snell et al.
# (2017) trained; 5 + 5 of Omniglot's 20 drawers a character.
PROTOTYPICAL_SHOTS = 5
PROTOTYPICAL_QUERIES = 5


@dataclass(frozen=True)
class PretrainReport:
    """What :func:`pretrain_features` did: for the run's log and the model card."""

    epochs: int
    classes: int
    examples: int
    final_loss: float
    final_accuracy: float
    seconds: float
    objective: str = "classifier"  # or "prototypical"
    episodes: int = 0  # prototypical: episodes trained on

    def to_dict(self) -> dict:
        extra = ({} if self.objective == "classifier"
                 else {"objective": self.objective, "episodes": self.episodes})
        return {"epochs": self.epochs, "classes": self.classes, "examples": self.examples,
                "final_loss": round(self.final_loss, 4),
                "final_accuracy": round(self.final_accuracy, 4),
                "seconds": round(self.seconds, 1), **extra}


def pretrain_features(
    learner: nn.Module,
    dataset,
    epochs: int,
    *,
    batch_size: int = 128,
    max_lr: float = 3e-3,
    seed: int = 0,
    distort: bool = False,
    progress: bool = False,
) -> PretrainReport:
    """Train ``learner.features`` in place as a classifier over all classes of ``dataset``.

    A temporary linear head (``features`` output -> ``dataset.num_classes``) is trained with it
    by Adam under a one-cycle learning-rate schedule peaking at ``max_lr``, on shuffled
    mini-batches of ``batch_size``; that head is then dropped. The learner's own ``head`` (if
    it has one) is zeroed, since its weights read features that no longer exist: every class
    starts equally likely and the first update of a few-shot episode moves each class's row
    towards its support features. BatchNorm running statistics are updated too (the inner loop
    uses batch statistics, so they only matter for code that evaluates in eval mode).

    Parameters
    ----------
    learner:
        A module with a ``features`` sub-module mapping inputs to flat feature vectors (e.g.
        :class:`~learned_optim.learners.ConvLearner`).
    dataset:
        A :class:`~learned_optim.data.FewShotDataset` (its ``inputs`` and ``labels``): the
        training split only.
    epochs:
        Passes over ``dataset``.
    batch_size, max_lr, seed:
        Mini-batch size, peak learning rate, and the seed of the head's weights, the batch
        order and the distortions (the run is reproducible given the same threads).
    distort:
        Show every training image under a fresh small random affine distortion (Koch et al.,
        2015): rotation up to 10 degrees, scale 0.9-1.1, shear up to 0.1 and a shift of up to
        a tenth of the side (:func:`random_affine`). Images must be ``[n, C, H, W]`` with a
        zero background (Omniglot's ink = 1).
    progress:
        Show a progress bar.

    Returns
    -------
    PretrainReport
        Epochs, classes, examples, and the last epoch's mean loss and training accuracy.

    Raises
    ------
    ValueError
        If ``epochs`` or ``batch_size`` is not positive, or ``learner`` has no ``features``.

    Examples
    --------
    >>> import torch
    >>> from learned_optim.data import FewShotDataset
    >>> from learned_optim.learners import ConvLearner
    >>> data = FewShotDataset(torch.rand(40, 1, 16, 16), torch.arange(4).repeat(10))
    >>> learner = ConvLearner(1, ways=2, filters=4, image_size=16)
    >>> report = pretrain_features(learner, data, epochs=2, batch_size=8)
    >>> report.classes, report.examples, int(learner.head.weight.count_nonzero())
    (4, 40, 0)
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"pretrain epochs must be a positive integer, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"pretrain batch_size must be a positive integer, got {batch_size!r}")
    features = _features_of(learner)
    inputs, labels = dataset.inputs, dataset.labels
    device = next(features.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        width = features(inputs[:2].to(device)).shape[1]
    head = nn.Linear(width, dataset.num_classes).to(device)
    with torch.no_grad():  # the head's draw from the seed, not from the global stream
        bound = 1.0 / width ** 0.5
        head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound,
                                                                 generator=generator))
        head.bias.zero_()
    params = list(features.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=max_lr)
    batches = max(1, len(inputs) // batch_size)  # a short last batch is dropped
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr,
                                                   total_steps=epochs * batches)
    was_training = features.training
    features.train()
    start = time.perf_counter()
    bar = _progress_bar(progress, epochs * batches, "pre-training features", "batch")
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        loss_sum, correct = 0.0, 0
        for index in range(batches):
            rows = order[index * batch_size:(index + 1) * batch_size]
            targets = labels[rows].to(device)
            images = inputs[rows]
            if distort:
                images = random_affine(images, generator)
            logits = head(_embed(features, images, device))
            loss = F.cross_entropy(logits, targets)
            _descend(optimizer, schedule, loss)
            loss_sum += loss.item()
            correct += int((logits.argmax(1) == targets).sum())
            if bar is not None:
                bar.update()
    _finish(bar, features, was_training, learner)
    return PretrainReport(epochs, dataset.num_classes, len(inputs), loss_sum / batches,
                          correct / (batches * batch_size), time.perf_counter() - start)


def _progress_bar(enabled: bool, total: int, description: str, unit: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit)


def _descend(optimizer, schedule, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()


def _finish(bar, features: nn.Module, was_training: bool, learner: nn.Module) -> None:
    """Close the progress bar, restore the features' mode and zero the learner's head."""
    if bar is not None:
        bar.close()
    features.train(was_training)
    _zero_head(learner)


def _zero_head(learner: nn.Module) -> None:
    """Zero the learner's own head: it read features that no longer exist."""
    own_head = getattr(learner, "head", None)
    if isinstance(own_head, nn.Module):
        with torch.no_grad():
            for tensor in own_head.parameters():
                tensor.zero_()


def _embed(features: nn.Module, images: Tensor, device: torch.device) -> Tensor:
    """``features`` of ``images`` on ``device``, laid out as the learner's own forward lays
    them out (channels-last on a CPU: the conv blocks' fused kernels take only that)."""
    return features(conv_inputs(images.to(device)))


def _features_of(learner: nn.Module) -> nn.Module:
    features = getattr(learner, "features", None)
    if not isinstance(features, nn.Module):
        raise ValueError(f"{type(learner).__name__} has no 'features' module to pre-train")
    return features


def pretrain_prototypical(
    learner: nn.Module,
    episodes,
    count: int,
    *,
    max_lr: float = 1e-3,
    seed: int = 0,
    distort: bool = False,
    progress: bool = False,
) -> PretrainReport:
    """Train ``learner.features`` in place as a prototypical network on ``count`` episodes.

    Snell et al. (2017): each class's prototype is the mean of its support features, and a
    query is scored by its negative squared distance to every prototype, divided by a learned
    temperature (it starts at three times the features' mean length in the first episode, and
    matters when the features have a fixed length, as with ``ConvLearner(feature_scale=...)``).
    Adam under a one-cycle schedule peaking at ``max_lr``; BatchNorm in train mode over each
    episode's support and query images together. The learner's own ``head`` is zeroed after,
    as by :func:`pretrain_features`, so that a few-shot update starts from features that are
    close exactly where characters are alike, which is what a one-shot comparison needs and a
    classifier of the training characters does not ask for.

    Parameters
    ----------
    learner:
        A module with a ``features`` sub-module mapping inputs to flat feature vectors.
    episodes:
        An episode sampler over the training classes only (``episode(index)`` returning an
        :class:`~learned_optim.data.Episode`), e.g. a
        :class:`~learned_optim.data.WithinAlphabetSampler` so that a prototype competes with
        the characters of its own alphabet, as in Lake et al.'s test.
    count:
        Episodes to train on (indices 0 .. count - 1).
    max_lr, seed:
        Peak learning rate; seed of the distortions.
    distort:
        Show every image under a fresh small random affine distortion (:func:`random_affine`).
    progress:
        Show a progress bar.

    Returns
    -------
    PretrainReport
        ``objective="prototypical"``, the episodes, the data set's classes and examples, and
        the mean query loss and accuracy of the last 100 episodes.

    Raises
    ------
    ValueError
        If ``count`` is not a positive integer or ``learner`` has no ``features``.

    Examples
    --------
    >>> import torch
    >>> from learned_optim.data import EpisodeSampler, FewShotDataset
    >>> from learned_optim.learners import ConvLearner
    >>> data = FewShotDataset(torch.rand(40, 1, 16, 16), torch.arange(4).repeat(10))
    >>> learner = ConvLearner(1, ways=2, filters=4, image_size=16)
    >>> report = pretrain_prototypical(learner, EpisodeSampler(data, 3, 2, 2), count=3)
    >>> report.objective, report.episodes, int(learner.head.weight.count_nonzero())
    ('prototypical', 3, 0)
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"pretrain episodes must be a positive integer, got {count!r}")
    features = _features_of(learner)
    device = next(features.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the temperature's start, scaled to the features' length
        first = _embed(features, episodes.episode(0).support_inputs, device).flatten(1)
        start_temperature = 3 * first.norm(dim=1).mean().clamp_min(1e-6)
    log_temperature = nn.Parameter(start_temperature.log().reshape(()))
    optimizer = torch.optim.Adam([*features.parameters(), log_temperature], lr=max_lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=count,
                                                   pct_start=0.1)
    was_training = features.training
    features.train()
    start = time.perf_counter()
    bar = _progress_bar(progress, count, "pre-training features (prototypical)", "episode")
    recent: deque[tuple[float, float]] = deque(maxlen=100)  # the last 100 episodes
    for index in range(count):
        episode = episodes.episode(index)
        ways = int(episode.support_targets.max()) + 1
        images = torch.cat([episode.support_inputs, episode.query_inputs])
        if distort:
            images = random_affine(images, generator)
        embedded = _embed(features, images, device).flatten(1)
        support, query = embedded.split([len(episode.support_inputs), len(episode.query_inputs)])
        targets = episode.support_targets.to(device)
        prototypes = torch.zeros(ways, support.shape[1], device=device).index_add_(
            0, targets, support) / torch.bincount(targets, minlength=ways).unsqueeze(1)
        logits = -torch.cdist(query, prototypes).pow(2) / log_temperature.exp()
        query_targets = episode.query_targets.to(device)
        loss = F.cross_entropy(logits, query_targets)
        _descend(optimizer, schedule, loss)
        recent.append((loss.item(), (logits.argmax(1) == query_targets).float().mean().item()))
        if bar is not None:
            bar.update()
    _finish(bar, features, was_training, learner)
    dataset = getattr(episodes, "dataset", None)
    return PretrainReport(0, getattr(dataset, "num_classes", 0),
                          len(dataset) if dataset is not None else 0,
                          sum(loss for loss, _ in recent) / len(recent),
                          sum(acc for _, acc in recent) / len(recent),
                          time.perf_counter() - start, objective="prototypical", episodes=count)


def random_affine(images: torch.Tensor, generator: torch.Generator | None = None,
                  *, rotation_deg: float = 10.0, scale: float = 0.1, shear: float = 0.1,
                  shift: float = 0.1) -> torch.Tensor:
    """Each image under its own random affine map (bilinear, zero outside the image).

    Rotation uniform in +- ``rotation_deg``, scale in ``1 +- scale``, shear in +- ``shear``
    and a shift in +- ``shift`` of the image side, per axis: the small distortions a writer's
    hand makes, which leave a character the same character.

    Examples
    --------
    >>> images = torch.zeros(3, 1, 28, 28)
    >>> images[:, :, 10:18, 12:16] = 1.0
    >>> out = random_affine(images, torch.Generator().manual_seed(0))
    >>> out.shape, bool((out - images).abs().sum() > 0), float(out.min()) >= 0.0
    (torch.Size([3, 1, 28, 28]), True, True)
    """
    if images.dim() != 4:
        raise ValueError(f"random_affine needs images [n, C, H, W], got shape "
                         f"{tuple(images.shape)}")
    n = len(images)

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * bound

    angle = uniform(rotation_deg) * (torch.pi / 180)
    zoom = 1 + uniform(scale)
    cos, sin, skew = torch.cos(angle) / zoom, torch.sin(angle) / zoom, uniform(shear)
    # affine_grid's coordinates span [-1, 1]: a shift of a tenth of the side is 0.2.
    theta = torch.stack([
        torch.stack([cos, -sin + skew, uniform(2 * shift)], dim=1),
        torch.stack([sin, cos, uniform(2 * shift)], dim=1),
    ], dim=1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)
