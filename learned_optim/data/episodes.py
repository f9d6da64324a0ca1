"""N-way K-shot episodes, drawn deterministically by episode index.

Every episode is a pure function of ``(seed, index)``: a run killed at episode 31,337 resumes
with ``sampler.episodes(start=31_337)``, and distributed ranks draw disjoint episodes with
``sampler.episodes(start=rank, step=world_size)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from learned_optim.data.dataset import FewShotDataset

__all__ = ["Episode", "EpisodeSampler", "WithinAlphabetSampler", "episode_generator"]


class Episode(NamedTuple):
    """One few-shot task: a support set D_train to adapt on and a query set D_test to score.

    For classification, targets are int64 class positions ``0 .. ways - 1`` (the episode's
    own labels, in a random class order), and both sets are ordered class by class. For
    regression (:class:`~learned_optim.data.sinusoid.SinusoidTasks`) all four are float32
    ``[points, 1]``.

    Attributes
    ----------
    support_inputs : torch.Tensor
        ``[ways * shots, ...]`` inputs of D_train.
    support_targets : torch.Tensor
        ``[ways * shots]`` targets of D_train.
    query_inputs : torch.Tensor
        ``[ways * queries, ...]`` inputs of D_test.
    query_targets : torch.Tensor
        ``[ways * queries]`` targets of D_test.
    """

    support_inputs: torch.Tensor
    support_targets: torch.Tensor
    query_inputs: torch.Tensor
    query_targets: torch.Tensor


def episode_generator(seed: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` whose state depends only on ``(seed, index)``.

    The two numbers are mixed by ``numpy.random.SeedSequence`` (stable across processes
    and Python versions, unlike the salted built-in ``hash``), so nearby seeds and indices
    give unrelated streams.

    Examples
    --------
    >>> a = torch.rand(2, generator=episode_generator(0, 7))
    >>> b = torch.rand(2, generator=episode_generator(0, 7))
    >>> bool(torch.equal(a, b))
    True
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"episode index must be a non-negative integer, got {index!r}")
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) >> 1)  # 63 bits: fits the signed range too
    return generator


def check_positive(**values: int) -> None:
    """Raise a ValueError naming the first option that is not a positive integer.

    >>> check_positive(ways=5, shots=0)
    Traceback (most recent call last):
    ...
    ValueError: shots must be a positive integer, got 0
    """
    for option, value in values.items():
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{option} must be a positive integer, got {value!r}")


def episode_index_range(start: int = 0, count: int | None = None, step: int = 1):
    """Episode indices ``start, start + step, ...``: ``count`` of them, or endless if None."""
    check_positive(step=step)
    if count is not None and count < 0:
        raise ValueError(f"count must be non-negative or None, got {count!r}")
    return itertools.count(start, step) if count is None else range(
        start, start + count * step, step)


class EpisodeSampler:
    """Draws N-way K-shot episodes from a :class:`FewShotDataset`.

    Episode ``index`` picks ``ways`` distinct classes at random, then ``shots + queries``
    distinct examples of each: the first ``shots`` form the support set, the rest the query
    set. It depends only on ``(seed, index)``.

    Parameters
    ----------
    dataset : FewShotDataset
        Where the examples come from.
    ways : int
        Classes per episode (N).
    shots : int
        Support examples per class (K).
    queries : int, optional
        Query examples per class (15 in Ravi & Larochelle).
    seed : int, optional
        Non-negative seed; different seeds give unrelated episode streams.

    Raises
    ------
    ValueError
        If ``ways``, ``shots`` or ``queries`` is not positive, ``ways`` exceeds the number
        of classes, or a class has fewer than ``shots + queries`` examples.

    Examples
    --------
    >>> import torch
    >>> from learned_optim.data import FewShotDataset
    >>> data = FewShotDataset(torch.rand(40, 1, 4, 4), torch.arange(40) % 8)
    >>> sampler = EpisodeSampler(data, ways=3, shots=1, queries=2, seed=0)
    >>> episode = sampler.episode(5)
    >>> episode.support_inputs.shape, episode.query_targets.tolist()
    (torch.Size([3, 1, 4, 4]), [0, 0, 1, 1, 2, 2])
    >>> bool(torch.equal(episode.query_inputs, sampler.episode(5).query_inputs))
    True
    """

    def __init__(
        self, dataset: FewShotDataset, ways: int, shots: int, queries: int = 15, seed: int = 0
    ) -> None:
        check_positive(ways=ways, shots=shots, queries=queries)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        label = f" {dataset.name!r}" if dataset.name else ""
        if ways > dataset.num_classes:
            raise ValueError(
                f"ways={ways} exceeds the {dataset.num_classes} classes of data set{label}"
            )
        sizes = dataset.class_sizes
        need = shots + queries
        if int(sizes.min()) < need:
            small = int(torch.argmin(sizes))
            raise ValueError(
                f"shots + queries = {shots} + {queries} = {need} exceeds the size of class "
                f"{small} ({dataset.class_names[small]!r}, {int(sizes[small])} examples) "
                f"of data set{label}"
            )
        self.dataset = dataset
        self.ways, self.shots, self.queries, self.seed = int(ways), int(shots), int(queries), seed
        # table[c, j] = position in dataset.inputs of the j-th example of class c (-1 = padding),
        # so one episode is one gather, whatever the class sizes.
        self._sizes = sizes
        self._table = torch.full((dataset.num_classes, int(sizes.max())), -1, dtype=torch.int64)
        for c in range(dataset.num_classes):
            self._table[c, : int(sizes[c])] = dataset.indices_of(c)
        self._slot = torch.arange(self._table.shape[1])

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler({self.dataset.name or 'dataset'}, ways={self.ways}, "
            f"shots={self.shots}, queries={self.queries}, seed={self.seed})"
        )

    def episode_indices(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which classes and examples episode ``index`` uses.

        Returns
        -------
        classes : torch.Tensor
            ``[ways]`` data set class indices; ``classes[t]`` gets episode target ``t``.
        support : torch.Tensor
            ``[ways * shots]`` positions into ``dataset.inputs``, class by class.
        query : torch.Tensor
            ``[ways * queries]`` positions into ``dataset.inputs``, class by class.
        """
        generator = episode_generator(self.seed, index)
        classes = torch.randperm(self.dataset.num_classes, generator=generator)[: self.ways]
        # A random key per example, padding slots pushed past every real key: sorting the
        # keys gives a uniform draw without replacement inside every class at once.
        keys = torch.rand(self.ways, self._table.shape[1], generator=generator)
        keys[self._slot[None, :] >= self._sizes[classes][:, None]] = 2.0
        picks = keys.argsort(dim=1)[:, : self.shots + self.queries]
        rows = self._table[classes[:, None], picks]
        return classes, rows[:, : self.shots].reshape(-1), rows[:, self.shots :].reshape(-1)

    def episode(self, index: int) -> Episode:
        """Episode number ``index`` (a non-negative integer); same index, same episode."""
        _, support, query = self.episode_indices(index)
        inputs = self.dataset.inputs[torch.cat([support, query])]
        targets = torch.arange(self.ways)
        n_support = len(support)
        return Episode(
            inputs[:n_support],
            targets.repeat_interleave(self.shots),
            inputs[n_support:],
            targets.repeat_interleave(self.queries),
        )

    def episodes(
        self, start: int = 0, count: int | None = None, step: int = 1
    ) -> Iterator[Episode]:
        """Iterate over episodes ``start, start + step, ...`` (``count`` of them, or forever).

        Use ``start=rank, step=world_size`` to give distributed ranks disjoint episodes, and
        ``start=`` the next unseen index to resume a killed run.
        """
        for index in episode_index_range(start, count, step):
            yield self.episode(index)


def _default_groups(dataset: FewShotDataset) -> list[str]:
    # Omniglot class names are "Alphabet/characterNN"(@rotD): the alphabet is the group, and
    # each rotation of an alphabet is an alphabet of its own ("Alphabet@rotD").
    groups = []
    for name in dataset.class_names:
        alphabet = name.split("/", 1)[0] if "/" in name else ""
        rotation = name.rpartition("@")[2] if "@rot" in name else ""
        groups.append(f"{alphabet}@{rotation}" if rotation else alphabet)
    return groups


def _rank_within_class(dataset: FewShotDataset) -> torch.Tensor:
    rank = torch.empty(len(dataset), dtype=torch.int64)
    for c in range(dataset.num_classes):
        rows = dataset.indices_of(c)
        rank[rows] = torch.arange(len(rows))
    return rank


class WithinAlphabetSampler(EpisodeSampler):
    """Lake et al.'s episodes: N classes of ONE alphabet, support and query by other drawers.

    Episode ``index`` picks one alphabet (uniformly among those with at least ``ways``
    classes), ``ways`` of its classes, and ``shots + queries`` distinct drawers: the first
    ``shots`` drawers write the support set of every class, the other ``queries`` the query
    set. No drawer appears on both sides, so a query is never matched by handwriting style.
    Lake et al. (2015) ran 20-way 1-shot with one query drawer; the episode depends only on
    ``(seed, index)``.

    Parameters
    ----------
    dataset : FewShotDataset
        Every class must have one example per drawer (Omniglot: 20).
    ways, shots, queries, seed
        As for :class:`EpisodeSampler`.
    alphabets : sequence, optional
        One group label per class; default the part of the class name before ``"/"`` (the
        Omniglot alphabet), plus the rotation of a rotated copy (``"...@rot90"``): each
        rotation of an alphabet is a group of its own. ``None`` entries are not allowed; pass
        one constant to put every class in one group (drawer-disjoint episodes across
        alphabets).
    drawers : torch.Tensor, optional
        ``[n]`` drawer id of every example; default its rank inside its class (the Omniglot
        loaders keep each character's files sorted as ``IIII_DD.png``: rank = drawer - 1).

    Raises
    ------
    ValueError
        If no alphabet has ``ways`` classes, a class lacks a drawer, or
        ``shots + queries`` exceeds the number of drawers.

    Examples
    --------
    >>> names = [f"{a}/character{c:02d}" for a in ("A", "B") for c in range(1, 4)]
    >>> labels = torch.arange(6).repeat_interleave(4)            # 6 classes x 4 drawers
    >>> data = FewShotDataset(torch.rand(24, 1, 2, 2), labels, names)
    >>> sampler = WithinAlphabetSampler(data, ways=3, shots=1, queries=2, seed=0)
    >>> classes, support, query = sampler.episode_indices(0)
    >>> len({names[c].split("/")[0] for c in classes.tolist()})  # one alphabet
    1
    >>> s, q = sampler.episode_drawers(0)
    >>> set(s.tolist()).isdisjoint(q.tolist()), sampler.episode(0).query_targets.tolist()
    (True, [0, 0, 1, 1, 2, 2])
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        ways: int,
        shots: int,
        queries: int = 15,
        seed: int = 0,
        alphabets=None,
        drawers: torch.Tensor | None = None,
    ) -> None:
        super().__init__(dataset, ways, shots, queries, seed)
        groups = _default_groups(dataset) if alphabets is None else list(alphabets)
        if len(groups) != dataset.num_classes:
            raise ValueError(f"alphabets has {len(groups)} entries for "
                             f"{dataset.num_classes} classes")
        drawers = _rank_within_class(dataset) if drawers is None else torch.as_tensor(
            drawers, dtype=torch.int64)
        if drawers.shape != (len(dataset),):
            raise ValueError(f"drawers must have one entry per example ({len(dataset)}), got "
                             f"shape {tuple(drawers.shape)}")
        ids = torch.unique(drawers)
        label = f" of data set {dataset.name!r}" if dataset.name else ""
        if self.shots + self.queries > len(ids):
            raise ValueError(f"shots + queries = {self.shots + self.queries} exceeds the "
                             f"{len(ids)} drawers{label}: support and query drawers must differ")
        column = torch.searchsorted(ids, drawers)
        # by_drawer[c, d] = position of class c's example by drawer ids[d]
        self._by_drawer = torch.full((dataset.num_classes, len(ids)), -1, dtype=torch.int64)
        pairs = dataset.labels * len(ids) + column
        if len(torch.unique(pairs)) < len(dataset):
            raise ValueError(f"data set{label} holds two examples of one class by one drawer: "
                             "drawer ids must be unique inside a class")
        self._by_drawer[dataset.labels, column] = torch.arange(len(dataset))
        lacking = torch.nonzero(self._by_drawer < 0)
        if len(lacking):
            c, d = (int(v) for v in lacking[0])
            raise ValueError(f"class {c} ({dataset.class_names[c]!r}){label} has no example by "
                             f"drawer {int(ids[d])}: every class needs one per drawer")
        self.drawer_ids = ids
        order: dict = {}
        for c, group in enumerate(groups):
            order.setdefault(group, []).append(c)
        self.alphabets = [g for g, members in order.items() if len(members) >= self.ways]
        if not self.alphabets:
            largest = max(len(m) for m in order.values())
            raise ValueError(f"ways={ways} exceeds the classes of every alphabet{label} "
                             f"(largest: {largest})")
        self._members = [torch.tensor(order[g]) for g in self.alphabets]

    def __repr__(self) -> str:
        return (super().__repr__().replace("EpisodeSampler", "WithinAlphabetSampler", 1)
                + f" over {len(self.alphabets)} alphabets")

    def _draw(self, index: int):
        generator = episode_generator(self.seed, index)
        group = int(torch.randint(len(self.alphabets), (1,), generator=generator))
        members = self._members[group]
        classes = members[torch.randperm(len(members), generator=generator)[: self.ways]]
        columns = torch.randperm(len(self.drawer_ids), generator=generator)
        return classes, columns[: self.shots], columns[self.shots : self.shots + self.queries]

    def episode_drawers(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The drawer ids of episode ``index``'s support and query sets (disjoint)."""
        _, support, query = self._draw(index)
        return self.drawer_ids[support], self.drawer_ids[query]

    def episode_indices(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        classes, support, query = self._draw(index)
        rows = self._by_drawer[classes]
        return classes, rows[:, support].reshape(-1), rows[:, query].reshape(-1)
