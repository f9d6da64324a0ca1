"""Few-shot classification of a user's own images with a shipped or trained checkpoint.

:class:`FewShotClassifier` rebuilds everything a checkpoint was meta-trained with (the learner,
its learned initial weights, the update rule, the number of inner steps T and the image
preprocessing), adapts on a support set with :func:`learned_optim.finetune` and labels
queries::

    clf = FewShotClassifier.from_pretrained("omniglot-lake-20w1s")
    clf.fit(support_images, support_labels)        # paths, PIL images, arrays or tensors
    clf.predict(query_images)                      # labels as given to fit

BatchNorm follows the paper's test protocol: statistics come from the support set alone and
every query is classified in eval mode, so queries never influence each other.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from learned_optim.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_learned_init,
    read_preprocessing,
)
from learned_optim.config import MetaTrainConfig
from learned_optim.data.preprocessing import (
    Preprocessing,
    check_polarity,
    normalise_pixels,
    preprocess_with_shapes,
)
from learned_optim.finetune import finetune
from learned_optim.learners import classification_learner, start_classes_alike

__all__ = ["FewShotClassifier", "read_class_folders", "list_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted; hidden names skipped)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_class_folders(root: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """``root/<class>/<images>`` -> (image paths, class-folder name of each).

    Raises ``ValueError`` naming an empty class folder or a root with no class folder.

    >>> import tempfile
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for name in ("a", "b"):
    ...     (root / name).mkdir()
    ...     Image.new("L", (5, 5)).save(root / name / "1.png")
    >>> paths, labels = read_class_folders(root)
    >>> labels
    ['a', 'b']
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"support folder not found: {root}")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    paths: list[Path] = []
    labels: list[str] = []
    for folder in classes:
        files = list_images(folder)
        if not files:
            raise ValueError(f"class {folder.name!r} has no example: {folder} holds no image "
                             f"file ({', '.join(IMAGE_SUFFIXES)})")
        paths += files
        labels += [folder.name] * len(files)
    return paths, labels


class FewShotClassifier:
    """A checkpoint's learner, init, update rule, T and preprocessing, as a classifier.

    Parameters
    ----------
    checkpoint : Checkpoint
        A loaded image-classification checkpoint (use :meth:`from_pretrained` for a name or
        path). Any number of classes can be fitted; a head of another size than the
        checkpoint's starts with every class alike, as the mean of the learned rows
        (:func:`learned_optim.learners.start_classes_alike`; a warning says so).
    inner_steps : int, optional
        Updates on the support set (default: the checkpoint's T).
    device : str
        Where the learner runs.
    seed : int
        Seeds the learner's construction (fits are deterministic).
    ensemble : sequence of checkpoints, names or paths
        Other learners (another architecture, say) with the same image preprocessing: each
        adapts on the support set on its own and the queries get the mean of all class
        probabilities (:mod:`learned_optim.ensemble`). The 4-block net and the ResNet-12 of
        Lake's protocol together err less than either alone (README).

    Attributes
    ----------
    classes_ : list
        The fitted labels, in order of first appearance (``predict_proba``'s columns).
    preprocessing : Preprocessing
        The checkpoint's image preprocessing (:func:`learned_optim.data.preprocess`).

    Examples
    --------
    >>> import numpy as np
    >>> pages = [np.full((105, 105), 255, np.uint8) for _ in range(5)]
    >>> pages[0][45:60, 10:95] = 0      # black strokes on white, like Omniglot's files
    >>> pages[1][10:95, 45:60] = 0
    >>> pages[2][20:40, 20:40] = 0
    >>> pages[3][65:85, 65:85] = 0
    >>> pages[4][20:85, 75:85] = 0
    >>> clf = FewShotClassifier.from_pretrained("omniglot-5w1s")
    >>> clf.fit(pages, ["bar", "pole", "dot", "spot", "side"]).predict(pages[::2])
    ['bar', 'dot', 'side']
    >>> clf.predict_proba(pages[:1]).shape
    (1, 5)
    >>> both = FewShotClassifier.from_pretrained("omniglot-5w1s", ensemble=["omniglot-5w5s"])
    >>> both.fit(pages, ["bar", "pole", "dot", "spot", "side"]).predict(pages[::2])
    ['bar', 'dot', 'side']
    """

    def __init__(self, checkpoint: Checkpoint, *, inner_steps: int | None = None,
                 device: str = "cpu", seed: int = 0,
                 ensemble: Sequence[str | os.PathLike | Checkpoint] = ()) -> None:
        record = checkpoint.record
        where = checkpoint.path or "checkpoint"
        try:
            config = MetaTrainConfig.from_dict(dict(record.get("config") or {})).resolved()
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{where}: invalid field 'config': {error}") from None
        if not config.is_classification:
            raise ValueError(f"{where} was meta-trained on the {config.task!r} task, not on "
                             "image classification: FewShotClassifier needs an image checkpoint")
        stored = read_preprocessing(checkpoint)
        self.preprocessing = (Preprocessing.from_dict(stored) if stored is not None
                              else Preprocessing.for_config(config))
        if self.preprocessing.size != config.image_size:
            raise CheckpointError(f"{where}: preprocessing size {self.preprocessing.size} "
                                  f"differs from the learner's image_size {config.image_size}")
        if inner_steps is not None and (not isinstance(inner_steps, int) or inner_steps < 0):
            raise ValueError(f"inner_steps must be a non-negative integer, got {inner_steps!r}")
        self.checkpoint = checkpoint
        self.config = config
        self.inner_steps = config.inner_steps if inner_steps is None else inner_steps
        self.device = device
        self.seed = seed
        self.classes_: list[Hashable] = []
        self._model: nn.Module | None = None
        self._support_shape: tuple[int, int, int] | None = None
        if isinstance(ensemble, (str, os.PathLike, Checkpoint)):
            raise TypeError("ensemble takes a list of checkpoints (names or paths), got one "
                            f"{type(ensemble).__name__}: wrap it in a list")
        self.members = [FewShotClassifier(m if isinstance(m, Checkpoint) else load_checkpoint(m),
                                          inner_steps=inner_steps, device=device, seed=seed)
                        for m in ensemble]
        for member in self.members:
            if member.preprocessing != self.preprocessing:
                raise ValueError(
                    f"ensemble member {member.checkpoint.path} preprocesses images as "
                    f"{member.preprocessing}, {where} as {self.preprocessing}: the members of "
                    "an ensemble must read the same images")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **options: Any
                        ) -> FewShotClassifier:
        """Load a shipped checkpoint by name (``available_pretrained()``) or a file path."""
        return cls(load_checkpoint(name_or_path), **options)

    def __repr__(self) -> str:
        name = Path(self.checkpoint.path).stem if self.checkpoint.path else "checkpoint"
        fitted = f", fitted on {len(self.classes_)} classes" if self._model else ""
        more = f", ensemble of {1 + len(self.members)}" if self.members else ""
        return (f"FewShotClassifier({name}: {self.config.ways}-way {self.config.shots}-shot, "
                f"T={self.inner_steps}{more}{fitted})")

    # --- fitting -------------------------------------------------------------------------
    def _learner(self, ways: int) -> nn.Module:
        config = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            learner = classification_learner(config.architecture, self.preprocessing.channels,
                                             ways, config.filters, config.image_size,
                                             config.bn_momentum,
                                             feature_scale=config.feature_scale)
        if self.checkpoint.learned_init is None:
            return learner
        report = load_learned_init(learner, self.checkpoint, strict=False)
        fresh = report.missing + report.mismatched
        if report.unexpected:
            raise CheckpointError(f"{self.checkpoint.path}: its learned init has parameters "
                                  f"{report.unexpected} that the rebuilt learner lacks")
        if fresh:
            start_classes_alike(learner, self.checkpoint.learned_init, fresh)
            warnings.warn(
                f"{len(self.classes_)} classes but the checkpoint's head has {config.ways} "
                f"outputs ({config.ways}-way): every class of the head {sorted(fresh)} starts "
                "as the mean of its learned rows (the learned init of the other layers is "
                "kept); accuracy can differ from the model card's", UserWarning, stacklevel=3)
        return learner

    def fit(self, support: Any, labels: Sequence[Hashable], *,
            classes: Sequence[Hashable] | None = None) -> FewShotClassifier:
        """Adapt to a support set: images and one label (any hashable value) per image.

        ``classes`` optionally lists every expected label: one with no example raises. Emits
        a warning if the support set looks inverted compared to the meta-training images.
        """
        labels = list(labels)
        pixels, shapes = preprocess_with_shapes(support, self.preprocessing, "support image")
        if len(pixels) == 0:
            raise ValueError("the support set is empty: fit needs at least one image per class")
        if len(labels) != len(pixels):
            raise ValueError(f"the support set has {len(pixels)} images but {len(labels)} "
                             "labels: give one label per image")
        try:
            order = list(dict.fromkeys(labels))
        except TypeError as error:
            raise TypeError(f"labels must be hashable: {error}") from None
        if classes is not None:
            empty = [c for c in classes if c not in set(order)]
            if empty:
                raise ValueError(f"class(es) {empty} have no example in the support set")
            unknown = [c for c in order if c not in set(classes)]
            if unknown:
                raise ValueError(f"labels {unknown} are not among classes {list(classes)}")
            order = list(classes)
        if len({s[0] for s in shapes}) > 1:
            counts = sorted({s[0] for s in shapes})
            raise ValueError(f"support images mix channel counts {counts}: give all images "
                             "the same colour mode")
        check_polarity(pixels, self.preprocessing, "support set")
        self.classes_ = order
        self._support_shape = shapes[0]
        index = {label: i for i, label in enumerate(order)}
        targets = torch.tensor([index[label] for label in labels], dtype=torch.int64)
        inputs = normalise_pixels(pixels, self.preprocessing)
        for one in (self, *self.members):
            one.classes_, one._support_shape = self.classes_, self._support_shape
            learner = one._learner(len(order)).to(one.device)
            one._model = finetune(learner, inputs.to(one.device), targets.to(one.device),
                                  optimizer=one.checkpoint, steps=one.inner_steps,
                                  adapt=one.config.adapt)
        return self

    # --- prediction ------------------------------------------------------------------------
    def _probabilities(self, queries: Any) -> torch.Tensor:
        if self._model is None:
            raise RuntimeError("call fit(support, labels) before predicting")
        pixels, shapes = preprocess_with_shapes(queries, self.preprocessing, "query image")
        if len(pixels) == 0:
            raise ValueError("no query images given")
        channels, height, width = self._support_shape
        for i, (c, _, _) in enumerate(shapes):
            if c != channels:
                raise ValueError(f"query image {i} has {c} channel(s) but the support images "
                                 f"have {channels}: give queries the support set's colour mode")
        sizes = sorted({(h, w) for _, h, w in shapes} - {(height, width)})
        if sizes:
            warnings.warn(f"query images of size {sizes[0][0]}x{sizes[0][1]} differ from the "
                          f"support images' {height}x{width}; both are resized to "
                          f"{self.preprocessing.size}x{self.preprocessing.size}",
                          UserWarning, stacklevel=3)
        inputs = normalise_pixels(pixels, self.preprocessing)
        with torch.no_grad():  # eval mode: each query alone, support-set BN statistics
            return torch.stack([torch.softmax(one._model(inputs.to(one.device)), dim=1).cpu()
                                for one in (self, *self.members)]).mean(dim=0)

    def predict_proba(self, queries: Any) -> np.ndarray:
        """Class probabilities ``[n, len(classes_)]`` (columns in ``classes_`` order; an
        ensemble's are its members' mean)."""
        return self._probabilities(queries).numpy()

    def predict(self, queries: Any) -> list:
        """The most probable label of every query image (labels as given to :meth:`fit`)."""
        best = self._probabilities(queries).argmax(dim=1).tolist()
        return [self.classes_[i] for i in best]
