"""In-memory, class-indexed data sets for few-shot learning.

A :class:`FewShotDataset` holds every example of a data set as one tensor plus one integer
label per example, and knows which examples belong to which class. Episode samplers
(:mod:`learned_optim.data.episodes`) draw N-way K-shot tasks from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["FewShotDataset"]


class FewShotDataset:
    """Examples grouped by class, held in memory.

    Parameters
    ----------
    inputs : torch.Tensor
        Float32 tensor ``[n, ...]``, one row per example. Images are ``[n, C, H, W]`` with
        values in ``[0, 1]``; any other feature shape is accepted.
    labels : torch.Tensor
        Int64 tensor ``[n]``: the class index (``0 .. num_classes - 1``) of every example.
        Every class must have at least one example.
    class_names : list of str, optional
        One name per class (its length fixes ``num_classes``). Defaults to ``"0", "1", ...``.
    name : str, optional
        A name for messages and ``repr``.

    Attributes
    ----------
    inputs : torch.Tensor
        The float32 examples, in the order given.
    labels : torch.Tensor
        Their int64 class indices.
    class_names : list of str
        The name of every class.
    name : str
        The data set's name.

    Raises
    ------
    TypeError
        If ``inputs`` is not floating point or ``labels`` is not an integer tensor.
    ValueError
        If the data are empty, lengths disagree, a label is out of range or a class is empty.

    Examples
    --------
    >>> import torch
    >>> data = FewShotDataset(torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2]),
    ...                       class_names=["a", "b", "c"], name="toy")
    >>> data.num_classes, len(data)
    (3, 6)
    >>> data.class_sizes.tolist()
    [2, 2, 2]
    >>> data.examples_of(1).shape
    torch.Size([2, 1, 4, 4])
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        class_names: Sequence[str] | None = None,
        name: str = "",
    ) -> None:
        where = f"FewShotDataset {name!r}" if name else "FewShotDataset"
        if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError(
                f"{where}: inputs and labels must be torch tensors, got "
                f"{type(inputs).__name__} and {type(labels).__name__} "
                "(use FewShotDataset.from_arrays for numpy arrays)"
            )
        if not inputs.is_floating_point():
            raise TypeError(f"{where}: inputs must be floating point, got dtype {inputs.dtype}")
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{where}: labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.dim() != 1:
            raise ValueError(f"{where}: labels must be 1-D, got shape {tuple(labels.shape)}")
        if inputs.dim() == 0 or len(inputs) == 0:
            raise ValueError(f"{where}: no examples (inputs shape {tuple(inputs.shape)})")
        if len(inputs) != len(labels):
            raise ValueError(
                f"{where}: {len(inputs)} inputs but {len(labels)} labels; need one label per input"
            )
        labels = labels.to(torch.int64)
        if int(labels.min()) < 0:
            raise ValueError(f"{where}: negative label {int(labels.min())}")
        num_classes = int(labels.max()) + 1 if class_names is None else len(class_names)
        if int(labels.max()) >= num_classes:
            raise ValueError(
                f"{where}: label {int(labels.max())} is out of range for {num_classes} class names"
            )
        sizes = torch.bincount(labels, minlength=num_classes)
        if bool((sizes == 0).any()):
            empty = int(torch.nonzero(sizes == 0)[0])
            raise ValueError(f"{where}: class {empty} has no examples; every class needs one")

        self.inputs = inputs.to(torch.float32)
        self.labels = labels
        self.class_names = (
            [str(c) for c in range(num_classes)] if class_names is None else list(class_names)
        )
        self.name = name
        # Examples sorted by class (stable: keeps the original order inside a class), with
        # offsets[c]:offsets[c + 1] the slice of class c.
        self._order = torch.argsort(labels, stable=True)
        self._offsets = torch.zeros(num_classes + 1, dtype=torch.int64)
        self._offsets[1:] = torch.cumsum(sizes, 0)

    @classmethod
    def from_arrays(
        cls,
        inputs: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | Sequence,
        class_names: Sequence[str] | None = None,
        name: str = "",
    ) -> FewShotDataset:
        """Build a data set from a user's own arrays.

        Parameters
        ----------
        inputs : numpy.ndarray or torch.Tensor
            ``[n, ...]`` examples. ``uint8`` arrays are taken as 8-bit images and divided by
            255; anything else is converted to float32 unchanged.
        labels : array-like
            ``[n]`` labels of any sortable kind (ints, strings). The distinct values, sorted,
            become classes ``0 .. C - 1``.
        class_names : list of str, optional
            Names of the sorted distinct labels; defaults to ``str(label)``.
        name : str, optional
            A name for messages.

        Returns
        -------
        FewShotDataset

        Examples
        --------
        >>> import numpy as np
        >>> images = np.zeros((4, 1, 2, 2), dtype=np.uint8)
        >>> data = FewShotDataset.from_arrays(images, np.array(["cat", "dog", "cat", "dog"]))
        >>> data.class_names, data.labels.tolist()
        (['cat', 'dog'], [0, 1, 0, 1])
        """
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.detach().cpu().numpy()
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        inputs = np.asarray(inputs)
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"from_arrays: labels must be 1-D, got shape {labels.shape}")
        if inputs.dtype == np.uint8:
            features = torch.from_numpy(inputs.astype(np.float32) / 255.0)
        elif np.issubdtype(inputs.dtype, np.number) or inputs.dtype == np.bool_:
            features = torch.from_numpy(inputs.astype(np.float32))
        else:
            raise TypeError(f"from_arrays: inputs must be numeric, got dtype {inputs.dtype}")
        values, codes = np.unique(labels, return_inverse=True)
        if class_names is not None and len(class_names) != len(values):
            raise ValueError(
                f"from_arrays: {len(class_names)} class names for {len(values)} distinct labels"
            )
        names = [str(v) for v in values] if class_names is None else list(class_names)
        return cls(features, torch.from_numpy(codes.reshape(-1).astype(np.int64)), names, name)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def class_sizes(self) -> torch.Tensor:
        """Int64 tensor ``[num_classes]``: the number of examples of every class."""
        return self._offsets[1:] - self._offsets[:-1]

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        sizes = self.class_sizes
        return (
            f"FewShotDataset(name={self.name!r}, classes={self.num_classes}, "
            f"examples={len(self)}, shape={tuple(self.inputs.shape[1:])}, "
            f"per class {int(sizes.min())}-{int(sizes.max())})"
        )

    def _check_class(self, class_index: int) -> int:
        if not -self.num_classes <= class_index < self.num_classes:
            raise IndexError(
                f"class index {class_index} out of range for {self.num_classes} classes"
                + (f" in {self.name!r}" if self.name else "")
            )
        return class_index % self.num_classes

    def indices_of(self, class_index: int) -> torch.Tensor:
        """Int64 positions (into ``inputs``) of the examples of one class, in data set order."""
        c = self._check_class(class_index)
        return self._order[self._offsets[c] : self._offsets[c + 1]]

    def examples_of(self, class_index: int) -> torch.Tensor:
        """All examples of one class, ``[size, ...]``."""
        return self.inputs[self.indices_of(class_index)]

    def subset_classes(
        self, indices: Sequence[int] | torch.Tensor, name: str | None = None
    ) -> FewShotDataset:
        """A new data set holding only the given classes, relabelled ``0 .. len(indices) - 1``.

        Parameters
        ----------
        indices : sequence of int
            Class indices to keep, in the order they get in the new data set (no repeats).
        name : str, optional
            Name of the new data set (default: this one's).

        Examples
        --------
        >>> import torch
        >>> data = FewShotDataset(torch.arange(6.0)[:, None], torch.tensor([0, 1, 2, 0, 1, 2]),
        ...                       ["a", "b", "c"])
        >>> part = data.subset_classes([2, 0])
        >>> part.class_names, part.examples_of(0).flatten().tolist()
        (['c', 'a'], [2.0, 5.0])
        """
        keep = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(keep) == 0:
            raise ValueError("subset_classes: no class indices given")
        keep = torch.tensor([self._check_class(int(c)) for c in keep], dtype=torch.int64)
        if len(torch.unique(keep)) != len(keep):
            raise ValueError(f"subset_classes: repeated class indices in {keep.tolist()}")
        rows = torch.cat([self.indices_of(int(c)) for c in keep])
        new_label = torch.full((self.num_classes,), -1, dtype=torch.int64)
        new_label[keep] = torch.arange(len(keep))
        return FewShotDataset(
            self.inputs[rows],
            new_label[self.labels[rows]],
            [self.class_names[int(c)] for c in keep],
            self.name if name is None else name,
        )
