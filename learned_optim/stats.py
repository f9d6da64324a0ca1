"""Mean and 95% confidence interval over episodes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Summary", "summarize"]


@dataclass(frozen=True)
class Summary:
    """Mean of ``n`` per-episode scores with the half-width of its 95% confidence interval."""

    mean: float
    ci95: float
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": self.ci95, "episodes": self.n}

    def __str__(self) -> str:
        return f"{self.mean:.4f} +- {self.ci95:.4f} (n={self.n})"


def summarize(scores: Sequence[float]) -> Summary:
    """``1.96 * std / sqrt(n)`` around the mean (population std, as in the authors' code).

    >>> summarize([0.5, 0.7, 0.6, 0.8])
    Summary(mean=0.65, ci95=0.10956..., n=4)
    """
    n = len(scores)
    if n == 0:
        raise ValueError("no scores to summarise")
    mean = math.fsum(scores) / n
    variance = math.fsum((s - mean) ** 2 for s in scores) / n
    return Summary(mean, 1.96 * math.sqrt(variance) / math.sqrt(n), n)
