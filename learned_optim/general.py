"""The task distribution a general update rule is meta-trained on (``task = "general"``).

Each problem is a fresh learner (random architecture, random init, no learned init) trained
for a random horizon on a random task, the way a user would train a new model:

- learners: MLPs of 1-3 hidden layers of 16-256 units (ReLU, tanh or GELU) and conv nets of
  2-4 blocks of 8-64 filters, each with or without BatchNorm, initialised by PyTorch's default
  rule scaled by a random factor;
- data: Omniglot's background alphabets (images of 28, 14 or 8 pixels: N-way K-shot episodes,
  or minibatch classification over many characters), sinusoids, random-teacher regression,
  Gaussian-blob and random-teacher classification;
- training: full-batch few-shot or minibatch, for a horizon of ``horizon_min`` to
  ``horizon_max`` steps (log-uniform), scored on held-out examples of the same task.

The evaluation sets of the benchmarks (sklearn digits, MNIST-5k, animal silhouettes) are never
drawn. Problem ``index`` of a split depends only on ``(seed, split, index)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from learned_optim.data.episodes import episode_generator
from learned_optim.learners import ConvFeatures, conv_inputs

__all__ = ["Problem", "ProblemDistribution", "ConvNet", "make_mlp", "make_convnet", "KINDS"]

# Problem kinds and their sampling weights; the image kinds need Omniglot (data_root).
KINDS = {
    "omniglot_fewshot": 3.0,
    "omniglot_minibatch": 3.0,
    "sinusoid": 1.0,
    "teacher_regression": 1.0,
    "blobs": 1.0,
    "teacher_classification": 1.0,
}
_IMAGE_KINDS = ("omniglot_fewshot", "omniglot_minibatch")
_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
# CPU budget of a problem: the forward passes of one step (training and validation batch)
# stay below this many multiply-adds, and the rule's rows (its main cost) below this many.
_MAX_FORWARD_MACS = 3e7
_MAX_PARAMETERS = 70_000


@dataclass
class Problem:
    """One training problem: a fresh learner, its data and its horizon.

    ``train_batch()`` returns the next training batch (the same full batch every step for
    few-shot problems), ``val_batch()`` the held-out batch the meta-objective scores.
    """

    name: str
    model: nn.Module
    train_batch: Callable[[], tuple[Tensor, Tensor]]
    val_batch: Callable[[], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    horizon: int
    withhold_loss: bool  # the rule gets no loss input during this problem

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def make_mlp(inputs: int, widths: list[int], outputs: int, activation: str = "relu",
             batchnorm: bool = False) -> nn.Sequential:
    """An MLP ``inputs -> widths... -> outputs`` (inputs of any shape are flattened).

    >>> make_mlp(4, [16, 16], 3, "tanh", batchnorm=True)(torch.zeros(2, 2, 2)).shape
    torch.Size([2, 3])
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = inputs
    for hidden in widths:
        layers.append(nn.Linear(width, hidden))
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(_ACTIVATIONS[activation]())
        width = hidden
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


class ConvNet(ConvFeatures):
    """A :class:`torch.nn.Sequential` conv net whose activations take the memory format
    :func:`learned_optim.learners.conv_memory_format` chooses for the inputs' device.

    Channels-last on a CPU: forward and backward of the distribution's conv nets (8 to 64
    filters on 8 to 28 pixels) measured 1.2x to 1.85x as fast on one thread
    (docs/results/cpu_speed.md); with BatchNorm its blocks then run as
    :class:`~learned_optim.learners.ConvFeatures`' fused kernels. Parameters and their names
    are a plain ``Sequential``'s.
    """

    def forward(self, inputs: Tensor) -> Tensor:
        return super().forward(conv_inputs(inputs))


def make_convnet(channels: int, image_size: int, blocks: int, filters: int, outputs: int,
                 batchnorm: bool = False) -> nn.Sequential:
    """``blocks`` x [conv 3x3, BatchNorm (optional), ReLU, max-pool 2], then a linear head
    (a :class:`ConvNet`: channels-last activations on a CPU).

    >>> make_convnet(1, 14, 3, 8, 5)(torch.zeros(2, 1, 14, 14)).shape
    torch.Size([2, 5])
    """
    layers: list[nn.Module] = []
    size = image_size
    for _ in range(blocks):
        layers.append(nn.Conv2d(channels, filters, 3, padding=1))
        if batchnorm:
            layers.append(nn.BatchNorm2d(filters))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        channels, size = filters, size // 2
    if size < 1:
        raise ValueError(f"{blocks} pooling blocks do not fit an image of {image_size} pixels")
    layers += [nn.Flatten(), nn.Linear(filters * size * size, outputs)]
    return ConvNet(*layers)


def _forward_macs(model: nn.Module, example: Tensor, batch: int) -> float:
    """Multiply-adds of one forward pass on ``batch`` examples (linear and conv layers)."""
    total = 0.0
    hooks = []

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            total += output[0].numel() * module.in_channels * 9
    for module in model.modules():
        hooks.append(module.register_forward_hook(count))
    with torch.no_grad():
        model.eval()
        model(example[:1])
        model.train()
    for hook in hooks:
        hook.remove()
    return total * batch


class _Rng:
    """Draws from one ``torch.Generator`` (reproducible across processes and platforms)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.generator).item()

    def log_uniform(self, low: float, high: float) -> float:
        return math.exp(self.uniform(math.log(low), math.log(high)))

    def integer(self, low: int, high: int) -> int:  # inclusive bounds
        return int(torch.randint(low, high + 1, (), generator=self.generator))

    def log_integer(self, low: int, high: int) -> int:
        return min(high, max(low, round(self.log_uniform(low, high + 0.999))))

    def choice(self, options):
        return options[self.integer(0, len(options) - 1)]

    def weighted(self, weights: dict[str, float]) -> str:
        names = list(weights)
        probs = torch.tensor([weights[n] for n in names])
        return names[int(torch.multinomial(probs, 1, generator=self.generator))]

    def bernoulli(self, probability: float) -> bool:
        return self.uniform(0.0, 1.0) < probability

    def seed(self) -> int:
        return int(torch.randint(0, 2**62, (), generator=self.generator))


class _OmniglotImages:
    """The characters of one Omniglot split, at 28, 14 and 8 pixels, ink = 1."""

    def __init__(self, root: str | Path, split: str) -> None:
        from learned_optim.data import omniglot

        # Lake's protocol: background alphabets only ("train" and "val" lie inside them).
        data = omniglot(root, split=split, protocol="lake", image_size=28)
        order = torch.argsort(data.labels, stable=True)
        self.classes = data.num_classes
        self.per_class = len(data) // self.classes  # 20 drawers a character
        images = data.inputs[order].reshape(self.classes, self.per_class, 1, 28, 28)
        self.by_size = {28: images}
        flat = images.reshape(-1, 1, 28, 28)
        self.by_size[14] = F.avg_pool2d(flat, 2).reshape(self.classes, self.per_class, 1, 14, 14)
        self.by_size[8] = F.adaptive_avg_pool2d(flat, 8).reshape(
            self.classes, self.per_class, 1, 8, 8)


class ProblemDistribution:
    """A reproducible stream of training problems for one split.

    Parameters
    ----------
    split : {"train", "val", "test"}
        ``train`` and ``val`` draw Omniglot characters from the background alphabets' train and
        validation characters (Lake's protocol); ``test`` from the evaluation alphabets.
        Synthetic tasks differ by seed only.
    data_root : path, optional
        Folder of the Omniglot zips; without it only the synthetic kinds are drawn.
    horizon : (int, int)
        Smallest and largest number of training steps (drawn log-uniformly).
    loss_dropout : float
        Probability that a problem withholds the loss from the rule.
    seed : int
        Seed of the stream.

    Examples
    --------
    >>> problems = ProblemDistribution("train", horizon=(5, 20), seed=0)
    >>> problem = problems.problem(3)
    >>> 5 <= problem.horizon <= 20, problem.num_parameters > 0
    (True, True)
    >>> x, y = problem.train_batch()
    >>> problem.loss(problem.model(x), y).ndim
    0
    """

    def __init__(self, split: str = "train", data_root: str | Path | None = None,
                 horizon: tuple[int, int] = (5, 300), loss_dropout: float = 0.5,
                 seed: int = 0, kinds: dict[str, float] | None = None) -> None:
        if split not in _SPLIT_INDEX:
            raise ValueError(f"split must be one of {tuple(_SPLIT_INDEX)}, got {split!r}")
        if not 1 <= horizon[0] <= horizon[1]:
            raise ValueError(f"horizon must be (low, high) with 1 <= low <= high, got {horizon}")
        if not 0.0 <= loss_dropout <= 1.0:
            raise ValueError(f"loss_dropout must lie in [0, 1], got {loss_dropout!r}")
        self.split, self.horizon, self.loss_dropout, self.seed = split, horizon, loss_dropout, seed
        weights = dict(KINDS if kinds is None else kinds)
        unknown = sorted(set(weights) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown problem kinds {unknown}; known: {sorted(KINDS)}")
        self.images = None
        if data_root is not None:
            self.images = _OmniglotImages(data_root, "test" if split == "test" else split)
        else:
            weights = {k: w for k, w in weights.items() if k not in _IMAGE_KINDS}
        if not weights:
            raise ValueError("no problem kind left to draw (image kinds need data_root)")
        self.weights = weights

    def problem(self, index: int) -> Problem:
        """Problem ``index`` of this stream (its model, data and horizon)."""
        rng = _Rng(episode_generator(self.seed, 3 * index + _SPLIT_INDEX[self.split]))
        kind = rng.weighted(self.weights)
        horizon = rng.log_integer(*self.horizon)
        withhold = rng.bernoulli(self.loss_dropout)
        build = getattr(self, "_" + kind)
        for _ in range(50):  # redraw problems that exceed the compute budget
            problem = build(rng, horizon, withhold)
            x, vx = problem.train_batch()[0], problem.val_batch()[0]
            macs = _forward_macs(problem.model, x, x.shape[0] + vx.shape[0])
            if macs <= _MAX_FORWARD_MACS and problem.num_parameters <= _MAX_PARAMETERS:
                return problem
        return problem

    # --- learners ----------------------------------------------------------------------
    @staticmethod
    def _scaled(model: nn.Module, rng: _Rng) -> tuple[nn.Module, float]:
        """Scale the weight matrices and kernels of a default-initialised model."""
        scale = rng.log_uniform(0.5, 2.0)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    module.weight.mul_(scale)
        return model, scale

    def _learner(self, rng: _Rng, inputs: tuple[int, ...], outputs: int,
                 allow_conv: bool) -> tuple[nn.Module, str]:
        batchnorm = rng.bernoulli(0.5)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.seed())
            if allow_conv and len(inputs) == 3 and rng.bernoulli(0.5):
                size = inputs[1]
                blocks = rng.integer(2, min(4, int(math.log2(size))))
                filters = rng.log_integer(8, 64)
                model = make_convnet(inputs[0], size, blocks, filters, outputs, batchnorm)
                what = f"conv {blocks}x{filters}"
            else:
                depth = rng.integer(1, 3)
                widths = [rng.log_integer(16, 256) for _ in range(depth)]
                activation = rng.choice(list(_ACTIVATIONS))
                model = make_mlp(math.prod(inputs), widths, outputs, activation, batchnorm)
                what = f"mlp {'-'.join(map(str, widths))} {activation}"
            model, scale = self._scaled(model, rng)
        return model, f"{what}{' bn' if batchnorm else ''} init x{scale:.2f}"

    # --- problem kinds -----------------------------------------------------------------
    @staticmethod
    def _batches(x: Tensor, y: Tensor, batch: int | None, seed: int):
        """Full batch (``batch`` None) or a minibatch stream drawn with replacement by steps."""
        if batch is None or batch >= x.shape[0]:
            return lambda: (x, y)
        generator = torch.Generator().manual_seed(seed)

        def next_batch():
            rows = torch.randint(0, x.shape[0], (batch,), generator=generator)
            return x[rows], y[rows]
        return next_batch

    def _image_classes(self, rng: _Rng, ways: int) -> tuple[Tensor, int]:
        size = rng.choice([28, 14, 14, 8])
        images = self.images.by_size[size]
        chosen = torch.randperm(self.images.classes, generator=rng.generator)[:ways]
        return images[chosen], size

    def _standardise(self, rng: _Rng, *tensors: Tensor) -> list[Tensor]:
        """Half of the image problems see standardised pixels, half raw ones in [0, 1]."""
        if not rng.bernoulli(0.5):
            return list(tensors)
        mean, std = tensors[0].mean(), tensors[0].std().clamp_min(1e-3)
        return [(t - mean) / std for t in tensors]

    def _omniglot_fewshot(self, rng: _Rng, horizon: int, withhold: bool) -> Problem:
        ways, shots = rng.integer(2, 20), rng.choice([1, 1, 2, 5, 5, 10])
        images, size = self._image_classes(rng, ways)
        drawers = torch.randperm(self.images.per_class, generator=rng.generator)
        support, query = images[:, drawers[:shots]], images[:, drawers[shots:shots + 5]]
        labels = torch.arange(ways)
        sx, qx = self._standardise(rng, support.reshape(-1, 1, size, size),
                                   query.reshape(-1, 1, size, size))
        sy, qy = labels.repeat_interleave(shots), labels.repeat_interleave(5)
        model, what = self._learner(rng, (1, size, size), ways, allow_conv=True)
        return Problem(f"omniglot {ways}w{shots}s {size}px, {what}, T={horizon}",
                       model, lambda: (sx, sy), lambda: (qx, qy), F.cross_entropy, horizon,
                       withhold)

    def _omniglot_minibatch(self, rng: _Rng, horizon: int, withhold: bool) -> Problem:
        ways = rng.log_integer(10, min(200, self.images.classes))
        images, size = self._image_classes(rng, ways)
        drawers = torch.randperm(self.images.per_class, generator=rng.generator)
        train, val = images[:, drawers[:15]], images[:, drawers[15:]]
        labels = torch.arange(ways)
        tx, vx = self._standardise(rng, train.reshape(-1, 1, size, size),
                                   val.reshape(-1, 1, size, size))
        ty, vy = labels.repeat_interleave(15), labels.repeat_interleave(val.shape[1])
        batch = rng.choice([16, 32, 64, 128])
        model, what = self._learner(rng, (1, size, size), ways, allow_conv=True)
        val_batch = self._batches(vx, vy, 128, rng.seed())
        return Problem(
            f"omniglot {ways} classes batch {batch} {size}px, {what}, T={horizon}", model,
            self._batches(tx, ty, batch, rng.seed()), val_batch, F.cross_entropy, horizon,
            withhold)

    def _vector_problem(self, rng, x, y, name, horizon, withhold, outputs, loss) -> Problem:
        """An MLP on vector data, trained full batch on a few examples (few-shot) or by
        minibatches over many; the last 256 examples are held out for the meta-objective."""
        if rng.bernoulli(0.5):
            train = rng.log_integer(5, 50)
            batch = None
        else:
            train = x.shape[0] - 256
            batch = rng.choice([16, 32, 64, 128])
        model, what = self._learner(rng, tuple(x.shape[1:]), outputs, allow_conv=False)
        return Problem(
            f"{name} n={train}{'' if batch is None else f' batch {batch}'}, {what}, "
            f"T={horizon}", model, self._batches(x[:train], y[:train], batch, rng.seed()),
            lambda: (x[-256:], y[-256:]), loss, horizon, withhold)

    def _sinusoid(self, rng: _Rng, horizon: int, withhold: bool) -> Problem:
        amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0.0, math.pi)
        frequency = rng.uniform(0.8, 1.2)
        x = torch.rand(1280, 1, generator=rng.generator) * 10 - 5
        y = amplitude * torch.sin(frequency * x - phase)
        return self._vector_problem(rng, x, y, "sinusoid", horizon, withhold, 1, F.mse_loss)

    def _teacher(self, rng: _Rng, inputs: int, outputs: int) -> Callable[[Tensor], Tensor]:
        hidden = rng.log_integer(8, 64)
        w1 = torch.randn(inputs, hidden, generator=rng.generator) / math.sqrt(inputs)
        w2 = torch.randn(hidden, outputs, generator=rng.generator) / math.sqrt(hidden)
        activation = rng.choice([torch.tanh, torch.relu, torch.sin])
        return lambda x: activation(x @ w1 * 2) @ w2

    def _teacher_regression(self, rng: _Rng, horizon: int, withhold: bool) -> Problem:
        inputs, outputs = rng.log_integer(2, 64), rng.choice([1, 1, 2, 4])
        x = torch.randn(1280, inputs, generator=rng.generator)
        y = self._teacher(rng, inputs, outputs)(x)
        y = (y - y.mean(0)) / y.std(0).clamp_min(1e-3)
        y = y + rng.uniform(0.0, 0.3) * torch.randn(y.shape, generator=rng.generator)
        return self._vector_problem(rng, x, y, f"teacher regression {inputs}->{outputs}",
                                    horizon, withhold, outputs, F.mse_loss)

    def _blobs(self, rng: _Rng, horizon: int, withhold: bool) -> Problem:
        classes, inputs = rng.integer(2, 10), rng.log_integer(2, 64)
        spread = rng.log_uniform(0.3, 3.0)
        centres = torch.randn(classes, inputs, generator=rng.generator) * spread
        y = torch.randint(0, classes, (1280,), generator=rng.generator)
        x = centres[y] + torch.randn(1280, inputs, generator=rng.generator)
        return self._vector_problem(rng, x, y, f"blobs {classes}c {inputs}d", horizon,
                                    withhold, classes, F.cross_entropy)

    def _teacher_classification(self, rng: _Rng, horizon: int, withhold: bool) -> Problem:
        classes, inputs = rng.integer(2, 10), rng.log_integer(2, 64)
        x = torch.randn(1280, inputs, generator=rng.generator)
        y = self._teacher(rng, inputs, classes)(x).argmax(dim=1)
        return self._vector_problem(rng, x, y, f"teacher classification {classes}c {inputs}d",
                                    horizon, withhold, classes, F.cross_entropy)
