"""miniImageNet (Vinyals et al. 2016) with the split files of Ravi & Larochelle (2017).

Layout read from ``root``::

    root/images/<filename>.jpg      # e.g. n0153282900000005.jpg, any size
    root/{train,val,test}.csv       # header "filename,label"; 64 / 16 / 20 classes x 600

The images come from ImageNet (ILSVRC-2012) and cannot be downloaded automatically: build
them with the usual script from an ImageNet copy you have access to. Decoded images are cached
as uint8 per split and image size (see :mod:`learned_optim.data.cache`). In memory a split is
float32: train (38,400 images of 3 x 84 x 84) takes about 3.3 GB.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from learned_optim.data import cache
from learned_optim.data._images import check_image_size, decode_image
from learned_optim.data.dataset import FewShotDataset
from learned_optim.data.preprocessing import RESAMPLE_FILTERS, Preprocessing, adjust_loaded

__all__ = ["miniimagenet", "read_split_csv"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CACHE_FORMAT = 1


def read_split_csv(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Read a Ravi & Larochelle split file: ``(filenames, labels)``, in file order.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the header is not ``filename,label``, a row has not two fields, or there are no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"miniImageNet split file not found: {path}")
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or [field.strip() for field in rows[0]] != ["filename", "label"]:
        raise ValueError(f"{path}: expected the header 'filename,label', got {rows[:1]}")
    filenames, labels = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(f"{path}, line {line}: expected 2 fields, got {row}")
        filenames.append(row[0].strip())
        labels.append(row[1].strip())
    if not filenames:
        raise ValueError(f"{path}: no image rows")
    return filenames, labels


def _check_images(paths: list[Path], csv_path: Path, image_dir: Path) -> list[os.stat_result]:
    stats, missing = [], []
    for path in paths:
        try:
            stats.append(path.stat())
        except FileNotFoundError:
            missing.append(path)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} miniImageNet images listed in {csv_path} are "
            f"missing; first missing: {missing[0]}. The images are not downloadable "
            "automatically (they come from ImageNet ILSVRC-2012 under its terms of access): "
            f"create them from your ImageNet copy and put them in {image_dir}."
        )
    return stats


def miniimagenet(
    root: str | os.PathLike,
    split: str = "train",
    image_size: int = 84,
    csv_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    preprocessing: Preprocessing | None = None,
) -> FewShotDataset:
    """Load one split of miniImageNet as a :class:`FewShotDataset`.

    Parameters
    ----------
    root : path
        Folder holding ``images/`` (and the CSV files unless ``csv_dir`` is given).
    split : {"train", "val", "test"}
        Which split file, ``<split>.csv``, to read.
    image_size : int
        Side of the square output images (84 is standard); images are resized bilinearly.
    csv_dir : path, optional
        Folder of the split CSV files, if not ``root``.
    cache_dir : path, optional
        Where the decoded-image cache goes; default ``$LEARNED_OPTIM_CACHE`` or
        ``~/.cache/learned_optim``.
    preprocessing : Preprocessing, optional
        Other steps than the default ``Preprocessing.miniimagenet(image_size)`` (RGB,
        bilinear, not inverted); its size replaces ``image_size``. Mode must be ``"RGB"``.

    Returns
    -------
    FewShotDataset
        Inputs float32 ``[n, 3, S, S]`` in ``[0, 1]``; classes (WordNet ids) in order of first
        appearance in the CSV file.

    Raises
    ------
    FileNotFoundError
        If the CSV file or any listed image is missing (the message gives how many and the
        first missing path).
    ValueError
        For an unknown split, a malformed CSV file or an unreadable image.

    Examples
    --------
    >>> from pathlib import Path
    >>> root = Path("~/data/miniimagenet").expanduser()  # holds images/ and the CSV files
    >>> if (root / "images").is_dir():  # doctest: +SKIP
    ...     test = miniimagenet(root, "test")
    ...     print(test.num_classes, test.inputs.shape[1:])
    20 torch.Size([3, 84, 84])
    """
    if split not in SPLITS:
        raise ValueError(f"miniImageNet split must be one of {SPLITS}, got {split!r}")
    if preprocessing is not None:
        image_size = preprocessing.require_mode("RGB", "miniImageNet").size
    resample = "bilinear" if preprocessing is None else preprocessing.resample
    check_image_size(image_size)
    root = Path(root).expanduser()
    csv_path = Path(csv_dir if csv_dir is not None else root).expanduser() / f"{split}.csv"
    filenames, wnids = read_split_csv(csv_path)
    image_dir = root / "images"
    paths = [image_dir / name for name in filenames]
    stats = _check_images(paths, csv_path, image_dir)

    # The cache key covers the split file's bytes and every image's size and mtime.
    digest = hashlib.sha256(csv_path.read_bytes())
    for name, stat in zip(filenames, stats):
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    key = {
        "format": CACHE_FORMAT,
        "image_dir": str(image_dir.resolve()),
        "image_size": image_size,
        **({} if resample == "bilinear" else {"resample": resample}),
        "content": digest.hexdigest(),
    }
    cache_root = cache.default_cache_dir() if cache_dir is None else cache_dir
    cache_path = cache.cache_file(cache_root, f"miniimagenet_{split}_{image_size}px", key)
    arrays = cache.load_arrays(cache_path)
    if arrays is None:
        log.info("decoding %d miniImageNet images (once; cached at %s)", len(paths), cache_path)

        def decode(path: Path) -> np.ndarray:
            return decode_image(path, "RGB", image_size, RESAMPLE_FILTERS[resample])

        # PIL releases the GIL while decoding, so threads use all cores.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            arrays = {"images": np.stack(list(pool.map(decode, paths)))}
        cache.save_arrays(cache_path, **arrays)

    class_names = list(dict.fromkeys(wnids))  # order of first appearance
    index = {wnid: c for c, wnid in enumerate(class_names)}
    labels = torch.tensor([index[w] for w in wnids], dtype=torch.int64)
    images = torch.from_numpy(arrays["images"]).permute(0, 3, 1, 2)  # [n, S, S, 3] -> NCHW
    inputs = images.to(torch.float32).div_(255.0).contiguous()
    if preprocessing is not None:
        inputs = adjust_loaded(inputs, Preprocessing(image_size, "RGB", resample), preprocessing)
    return FewShotDataset(
        inputs,
        labels,
        class_names,
        name=f"miniimagenet-{split}",
    )
