"""Few-shot sinusoid regression tasks (Finn et al. 2017; Li et al. 2017).

Two protocols:

- ``"maml"`` (MAML): ``y = A sin(x - b)``, ``A ~ U[0.1, 5]``, ``b ~ U[0, pi]``,
  ``x ~ U[-5, 5]``.
- ``"metasgd"`` (Meta-SGD): ``y = A sin(w x + b)``, with the frequency ``w ~ U[0.8, 1.2]``
  drawn as well; ``A``, ``b`` and ``x`` as above.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

from learned_optim.data.episodes import (
    Episode,
    check_positive,
    episode_generator,
    episode_index_range,
)

__all__ = ["SinusoidTask", "SinusoidTasks"]

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
FREQUENCY_RANGE = (0.8, 1.2)
INPUT_RANGE = (-5.0, 5.0)
PROTOCOLS = ("maml", "metasgd")


class SinusoidTask(NamedTuple):
    """Parameters of one sinusoid: amplitude ``A``, phase ``b`` and frequency ``w``.

    ``w`` is 1 under the ``"maml"`` protocol.
    """

    amplitude: float
    phase: float
    frequency: float


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator):
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


class SinusoidTasks:
    """A deterministic stream of K-shot sinusoid regression episodes.

    Episode ``index`` depends only on ``(seed, index)``, as for
    :class:`~learned_optim.data.episodes.EpisodeSampler`.

    Parameters
    ----------
    shots : int
        Support points per task (K).
    queries : int, optional
        Query points per task; defaults to ``shots`` (MAML trains with K + K points;
        Meta-SGD evaluates on 100 query points: pass ``queries=100``).
    protocol : {"maml", "metasgd"}
        Task family (see the module docstring).
    seed : int, optional
        Non-negative seed.

    Examples
    --------
    >>> tasks = SinusoidTasks(shots=5, seed=0)
    >>> episode = tasks.episode(3)
    >>> episode.support_inputs.shape, episode.query_targets.dtype
    (torch.Size([5, 1]), torch.float32)
    >>> task = tasks.task_parameters(3)
    >>> expected = task.amplitude * torch.sin(episode.support_inputs.double() - task.phase)
    >>> bool(torch.allclose(episode.support_targets.double(), expected, atol=1e-5))
    True
    """

    def __init__(
        self, shots: int, queries: int | None = None, protocol: str = "maml", seed: int = 0
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        queries = shots if queries is None else queries
        check_positive(shots=shots, queries=queries)
        episode_generator(seed, 0)  # validates the seed now rather than at the first episode
        self.shots, self.queries, self.protocol, self.seed = shots, queries, protocol, seed

    def __repr__(self) -> str:
        return (
            f"SinusoidTasks(shots={self.shots}, queries={self.queries}, "
            f"protocol={self.protocol!r}, seed={self.seed})"
        )

    def _draw(self, index: int) -> tuple[SinusoidTask, torch.Tensor]:
        generator = episode_generator(self.seed, index)
        amplitude, phase, frequency = (
            _uniform(*AMPLITUDE_RANGE, (), generator),
            _uniform(*PHASE_RANGE, (), generator),
            _uniform(*FREQUENCY_RANGE, (), generator),  # drawn always: A, b match across protocols
        )
        task = SinusoidTask(
            float(amplitude), float(phase), float(frequency) if self.protocol == "metasgd" else 1.0
        )
        x = _uniform(*INPUT_RANGE, (self.shots + self.queries, 1), generator)
        return task, x

    def task_parameters(self, index: int) -> SinusoidTask:
        """Amplitude, phase and frequency of episode ``index``."""
        return self._draw(index)[0]

    def evaluate(self, task: SinusoidTask, x: torch.Tensor) -> torch.Tensor:
        """The task's true function at ``x`` (float64 maths, result in ``x``'s dtype)."""
        xd = x.to(torch.float64)
        if self.protocol == "maml":
            y = task.amplitude * torch.sin(xd - task.phase)
        else:
            y = task.amplitude * torch.sin(task.frequency * xd + task.phase)
        return y.to(x.dtype)

    def episode(self, index: int) -> Episode:
        """Episode ``index``: float32 ``[K, 1]`` support and ``[Q, 1]`` query points."""
        task, x = self._draw(index)
        x = x.to(torch.float32)  # round first, so y is the formula at exactly the returned x
        y = self.evaluate(task, x)
        k = self.shots
        return Episode(x[:k], y[:k], x[k:], y[k:])

    def episodes(
        self, start: int = 0, count: int | None = None, step: int = 1
    ) -> Iterator[Episode]:
        """Iterate over episodes ``start, start + step, ...`` (``count`` of them, or forever)."""
        for index in episode_index_range(start, count, step):
            yield self.episode(index)
