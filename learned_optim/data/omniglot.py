"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015): 1623 handwritten characters x 20 drawers.

Reads the official release from ``root``: ``images_background.zip`` and
``images_evaluation.zip`` (read in place, no extraction), or the extracted folders
``images_background/`` and ``images_evaluation/`` (``<Alphabet>/<characterNN>/<IIII_DD>.png``).

Two split protocols:

``"vinyals"`` (Vinyals et al. 2016; MAML, Prototypical Networks)
    All 1623 characters are pooled (background then evaluation, each sorted by
    ``Alphabet/characterNN``) and permuted with ``numpy.random.default_rng(VINYALS_SPLIT_SEED)``
    (seed 0). The first 1200 of the permutation are meta-training characters, the other 423
    meta-test ("test"). Of the 1200, the first 1100 are "train" and the last 100 "val"
    ("trainval" is all 1200). Every character also appears rotated by 90, 180 and 270 degrees
    (counter-clockwise, ``torch.rot90``) as three more classes: train has 4400 classes,
    val 400, trainval 4800, test 1692.
``"lake"`` (Lake et al. 2015)
    The background set (30 alphabets, 964 characters) is "train" minus a held-out 10%
    (96 characters, chosen by ``numpy.random.default_rng(LAKE_SPLIT_SEED)``, seed 0) that
    is "val"; the evaluation set (20 alphabets, 659 characters) is "test". No rotations,
    unless ``rotations=True``: then a split also holds every character rotated by 90, 180 and
    270 degrees as three more classes (meta-training uses it for "train" only: 3472 classes).
``"lake-within"`` (Lake et al. 2015, their one-shot runs)
    The same characters as ``"lake"``; :func:`learned_optim.tasks.build_task` then draws
    episodes with :class:`~learned_optim.data.WithinAlphabetSampler`: all classes of an
    episode from one alphabet, support and query written by different drawers. (The 96
    validation characters are spread over 30 alphabets, too few per alphabet for 20-way
    episodes: validation episodes keep the drawer rule but mix alphabets.) With
    ``rotations=True`` each rotation of an alphabet is an alphabet of its own
    (``"Alphabet@rot90"``): an episode's classes share one alphabet and one rotation.
``"lake-alphabets"`` (Lake et al.'s test, validated within whole alphabets)
    The test split of ``"lake"``; the background set is split by alphabet instead of by
    character: :data:`LAKE_VAL_ALPHABETS` whole background alphabets of at least 20 characters
    (chosen by ``numpy.random.default_rng(LAKE_SPLIT_SEED)``) are "val", the other alphabets
    "train". Every split is drawn within alphabets, as ``"lake-within"`` draws its test, so
    validation measures what the test measures (20-way episodes inside unseen alphabets)
    instead of the easier mixed-alphabet episodes of ``"lake-within"``'s 96 validation
    characters.

Images are float32 ``[1, S, S]`` with ink = 1 and background = 0, resized from 105 x 105 with
PIL's Lanczos filter. Decoding the 32,460 PNGs takes seconds, so the decoded uint8 images of
both archives are cached once per image size (see :mod:`learned_optim.data.cache`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from learned_optim.data import cache
from learned_optim.data import download as downloading
from learned_optim.data._images import check_image_size, decode_image
from learned_optim.data.dataset import FewShotDataset
from learned_optim.data.preprocessing import RESAMPLE_FILTERS, Preprocessing, adjust_loaded

__all__ = ["omniglot", "load_omniglot_characters", "omniglot_split_characters",
           "split_by_alphabets"]

log = logging.getLogger(__name__)

ARCHIVES = ("images_background", "images_evaluation")
URL = "https://github.com/brendenlake/omniglot/raw/master/python/{archive}.zip"
# MD5 of the official archives; checked only on files this module downloads.
MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
PROTOCOLS = ("vinyals", "lake", "lake-within", "lake-alphabets")
# The protocols whose episodes are Lake's one-shot runs (classes of one alphabet, support and
# query by other drawers): tasks draw them with WithinAlphabetSampler, cards quote Lake et al.
WITHIN_ALPHABET_PROTOCOLS = ("lake-within", "lake-alphabets")
SPLITS = ("train", "val", "trainval", "test")
VINYALS_SPLIT_SEED = 0
VINYALS_CHARACTERS = 1623
OMNIGLOT_BACKGROUND = 964
VINYALS_TRAIN, VINYALS_VAL = 1100, 100  # + 423 test characters
LAKE_SPLIT_SEED = 0
LAKE_VAL_FRACTION = 0.1
LAKE_VAL_ALPHABETS = 5  # "lake-alphabets": whole background alphabets held out for validation
# The official background set: its 30 alphabets in sorted order and their character counts
# (964 in all). "lake-alphabets" splits by alphabet from this table, so a split is known
# without reading the archive; the loader checks the archive against it.
BACKGROUND_ALPHABETS = (
    ("Alphabet_of_the_Magi", 20), ("Anglo-Saxon_Futhorc", 29), ("Arcadian", 26),
    ("Armenian", 41), ("Asomtavruli_(Georgian)", 40), ("Balinese", 24), ("Bengali", 46),
    ("Blackfoot_(Canadian_Aboriginal_Syllabics)", 14), ("Braille", 26), ("Burmese_(Myanmar)", 34),
    ("Cyrillic", 33), ("Early_Aramaic", 22), ("Futurama", 26), ("Grantha", 43), ("Greek", 24),
    ("Gujarati", 48), ("Hebrew", 22), ("Inuktitut_(Canadian_Aboriginal_Syllabics)", 16),
    ("Japanese_(hiragana)", 52), ("Japanese_(katakana)", 47), ("Korean", 40), ("Latin", 26),
    ("Malay_(Jawi_-_Arabic)", 40), ("Mkhedruli_(Georgian)", 41), ("N_Ko", 33),
    ("Ojibwe_(Canadian_Aboriginal_Syllabics)", 14), ("Sanskrit", 42), ("Syriac_(Estrangelo)", 23),
    ("Tagalog", 17), ("Tifinagh", 55),
)
ROTATIONS = (0, 90, 180, 270)
_RESAMPLE = Image.LANCZOS  # as in MAML's Omniglot preprocessing
CACHE_FORMAT = 1


@dataclass(frozen=True)
class _Source:
    """One of the two archives, found either as a zip or as an extracted folder."""

    archive: str
    path: Path
    is_zip: bool


def _missing_message(root: Path, missing: list[str], extra: str = "") -> str:
    wanted = ", ".join(f"{a}.zip (or the extracted folder {a}/)" for a in missing)
    return (
        f"Omniglot files not found in {root}: {wanted}. Put the official archives "
        f"images_background.zip and images_evaluation.zip "
        f"(https://github.com/brendenlake/omniglot/tree/master/python) into {root}, "
        f"or pass download=True to fetch them.{extra}"
    )


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def _locate(root: Path, download: bool, cache_dir: Path) -> list[_Source]:
    """Find both archives under ``root`` (or a previous download in the cache folder)."""
    download_dir = cache_dir / "omniglot"
    sources: dict[str, _Source] = {}
    for archive in ARCHIVES:
        for folder in (root, download_dir):
            if (folder / f"{archive}.zip").is_file():
                sources[archive] = _Source(archive, folder / f"{archive}.zip", True)
                break
            if (folder / archive).is_dir():
                sources[archive] = _Source(archive, folder / archive, False)
                break
    missing = [a for a in ARCHIVES if a not in sources]
    if missing and download:
        # Never fail just because root is read-only: fall back to the cache folder.
        target = root if _writable_dir(root) else download_dir
        for archive in missing:
            url = URL.format(archive=archive)
            log.info("downloading %s to %s", url, target)
            try:
                path = downloading.download_verified(url, target / f"{archive}.zip", MD5[archive])
            except OSError as error:
                raise FileNotFoundError(
                    _missing_message(root, missing, f" The download of {url} failed: {error}.")
                ) from error
            sources[archive] = _Source(archive, path, True)
        missing = []
    if missing:
        raise FileNotFoundError(_missing_message(root, missing))
    return [sources[a] for a in ARCHIVES]


def _members(source: _Source) -> dict[str, list[str]]:
    """``{"Alphabet/characterNN": [png member names, sorted]}`` for one archive."""
    if source.is_zip:
        with zipfile.ZipFile(source.path) as archive:
            names = [n for n in archive.namelist() if n.lower().endswith(".png")]
    else:
        names = [p.relative_to(source.path).as_posix() for p in source.path.glob("*/*/*.png")]
    characters: dict[str, list[str]] = {}
    for name in sorted(names):
        parts = PurePosixPath(name).parts
        if len(parts) < 3:
            raise ValueError(
                f"{source.path}: unexpected entry {name!r}; expected "
                "<Alphabet>/<characterNN>/<IIII_DD>.png"
            )
        characters.setdefault(f"{parts[-3]}/{parts[-2]}", []).append(name)
    if not characters:
        raise ValueError(f"{source.path}: no <Alphabet>/<characterNN>/*.png images found")
    return characters


def _fingerprint(source: _Source) -> dict:
    """What the cache key records about an archive: zip size + mtime, or every file's stat."""
    if source.is_zip:
        stat = source.path.stat()
        return {"archive": source.archive, "zip_size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    digest = hashlib.sha256()
    for path in sorted(source.path.glob("*/*/*.png")):
        stat = path.stat()
        rel = path.relative_to(source.path).as_posix()
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"archive": source.archive, "folder_sha256": digest.hexdigest()}


def _decode(sources: list[_Source], image_size: int, resample: int = _RESAMPLE,
            ink_margin: float | None = None) -> dict[str, np.ndarray]:
    """Decode every PNG: images uint8 [n, S, S] (ink 255), character [n], names, archive."""
    images: list[np.ndarray] = []
    character: list[int] = []
    names: list[str] = []
    archive_of: list[int] = []
    for archive_index, source in enumerate(sources):
        members = _members(source)
        opened = zipfile.ZipFile(source.path) if source.is_zip else None
        try:
            for name, files in members.items():
                for member in files:
                    if opened:
                        with opened.open(member) as handle:
                            pixels = decode_image(
                                handle, "L", image_size, resample, f"{source.path}/{member}",
                                ink_margin)
                    else:
                        pixels = decode_image(source.path / member, "L", image_size, resample,
                                              ink_margin=ink_margin)
                    images.append(255 - pixels)  # mode "1" has white background: make ink 255
                    character.append(len(names))
                names.append(name)
                archive_of.append(archive_index)
        finally:
            if opened:
                opened.close()
    return {
        "images": np.stack(images),
        "character": np.asarray(character, dtype=np.int64),
        "names": np.asarray(names, dtype=np.str_),
        "archive": np.asarray(archive_of, dtype=np.int64),
    }


def load_omniglot_characters(
    root: str | os.PathLike,
    image_size: int = 28,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    resample: str = "lanczos",
    crop_to_ink: float | None = None,
) -> dict[str, np.ndarray]:
    """All Omniglot images of both archives, decoded (or read back from the cache).

    Parameters
    ----------
    root, image_size, download, cache_dir
        As for :func:`omniglot`.
    resample : str
        PIL resize filter (a key of ``RESAMPLE_FILTERS``); Lanczos as in MAML.
    crop_to_ink : float, optional
        Crop each image to the square around its ink first, with this margin
        (:func:`learned_optim.data.crop_to_ink`); cached apart.

    Returns
    -------
    dict
        ``images`` uint8 ``[n, S, S]`` (ink 255, background 0); ``character`` int64 ``[n]``,
        the index of each image's character; ``names`` str ``[characters]``
        (``"Alphabet/characterNN"``); ``archive`` int64 ``[characters]`` (0 background,
        1 evaluation).
    """
    check_image_size(image_size)
    root = Path(root).expanduser()
    cache_root = cache.default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    sources = _locate(root, download, cache_root)
    key = {
        "format": CACHE_FORMAT,
        "image_size": image_size,
        "resample": resample,
        "sources": [_fingerprint(s) for s in sources],
    }
    stem = f"omniglot_{image_size}px"
    if crop_to_ink is not None:  # (absent otherwise: the uncropped caches keep their keys)
        key["crop_to_ink"] = crop_to_ink
        stem += "_ink"
    path = cache.cache_file(cache_root, stem, key)
    arrays = cache.load_arrays(path)
    if arrays is None:
        log.info("decoding Omniglot from %s (once; cached at %s)", root, path)
        arrays = _decode(sources, image_size, RESAMPLE_FILTERS[resample], crop_to_ink)
        cache.save_arrays(path, **arrays)
    return arrays


def omniglot_split_characters(
    archive: np.ndarray, split: str, protocol: str = "vinyals"
) -> np.ndarray:
    """Indices of the characters in ``split`` under ``protocol`` (sorted ascending).

    Parameters
    ----------
    archive : numpy.ndarray
        ``[characters]``: 0 for a background character, 1 for an evaluation one, in the
        order of :func:`load_omniglot_characters`.
    split : {"train", "val", "trainval", "test"}
    protocol : {"vinyals", "lake", "lake-within", "lake-alphabets"}

    Examples
    --------
    >>> archive = np.array([0] * 964 + [1] * 659)
    >>> [len(omniglot_split_characters(archive, s)) for s in ("train", "val", "test")]
    [1100, 100, 423]
    >>> [len(omniglot_split_characters(archive, s, "lake")) for s in ("train", "val", "test")]
    [868, 96, 659]
    >>> [len(omniglot_split_characters(archive, s, "lake-alphabets"))
    ...  for s in ("train", "val", "test")]
    [795, 169, 659]
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Omniglot protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if split not in SPLITS:
        raise ValueError(f"Omniglot split must be one of {SPLITS}, got {split!r}")
    if protocol == "vinyals":
        if len(archive) != VINYALS_CHARACTERS:
            raise ValueError(
                f"protocol 'vinyals' needs all {VINYALS_CHARACTERS} Omniglot characters, "
                f"found {len(archive)}; use protocol='lake' for a partial copy"
            )
        order = np.random.default_rng(VINYALS_SPLIT_SEED).permutation(len(archive))
        parts = {
            "train": order[:VINYALS_TRAIN],
            "val": order[VINYALS_TRAIN : VINYALS_TRAIN + VINYALS_VAL],
            "trainval": order[: VINYALS_TRAIN + VINYALS_VAL],
            "test": order[VINYALS_TRAIN + VINYALS_VAL :],
        }
    elif protocol == "lake-alphabets":
        background = np.flatnonzero(archive == 0)
        if len(background) != OMNIGLOT_BACKGROUND:
            raise ValueError(f"protocol 'lake-alphabets' needs the {OMNIGLOT_BACKGROUND} "
                             f"background characters, found {len(background)}")
        val = np.concatenate([background[np.arange(start, stop)]
                              for start, stop in _val_alphabet_ranges()])
        parts = {
            "train": np.setdiff1d(background, val),
            "val": val,
            "trainval": background,
            "test": np.flatnonzero(archive == 1),
        }
    else:  # lake, lake-within
        background = np.flatnonzero(archive == 0)
        shuffled = np.random.default_rng(LAKE_SPLIT_SEED).permutation(background)
        n_val = round(LAKE_VAL_FRACTION * len(background))
        parts = {
            "train": shuffled[n_val:],
            "val": shuffled[:n_val],
            "trainval": background,
            "test": np.flatnonzero(archive == 1),
        }
    return np.sort(parts[split])


def lake_val_alphabets() -> list[str]:
    """The background alphabets that protocol ``"lake-alphabets"`` holds out for validation:
    :data:`LAKE_VAL_ALPHABETS` of those with at least 20 characters (enough for 20-way
    episodes inside one alphabet), drawn with ``numpy.random.default_rng(LAKE_SPLIT_SEED)``.

    >>> lake_val_alphabets()
    ['Latin', 'Asomtavruli_(Georgian)', 'Early_Aramaic', 'Futurama', 'Tifinagh']
    """
    eligible = [name for name, count in BACKGROUND_ALPHABETS if count >= 20]
    order = np.random.default_rng(LAKE_SPLIT_SEED).permutation(len(eligible))
    return [eligible[i] for i in order[:LAKE_VAL_ALPHABETS]]


def _val_alphabet_ranges() -> list[tuple[int, int]]:
    """``(first, stop)`` background character indices of each validation alphabet."""
    starts = np.concatenate(([0], np.cumsum([count for _, count in BACKGROUND_ALPHABETS])))
    index = {name: i for i, (name, _) in enumerate(BACKGROUND_ALPHABETS)}
    return [(int(starts[index[name]]), int(starts[index[name] + 1]))
            for name in lake_val_alphabets()]


def _check_background_alphabets(names: np.ndarray, archive: np.ndarray) -> None:
    """Raise if the archive's background characters are not the official alphabets that
    ``"lake-alphabets"`` splits by (a partial or re-packed copy would split wrongly)."""
    found: dict[str, int] = {}
    for name in names[archive == 0]:
        alphabet = str(name).split("/")[0]
        found[alphabet] = found.get(alphabet, 0) + 1
    if tuple(found.items()) != BACKGROUND_ALPHABETS:
        raise ValueError("protocol 'lake-alphabets' needs the official background set (30 "
                         "alphabets, 964 characters); this copy differs "
                         f"({len(found)} alphabets, {sum(found.values())} characters)")


def omniglot(
    root: str | os.PathLike,
    split: str = "train",
    protocol: str = "vinyals",
    image_size: int = 28,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    preprocessing: Preprocessing | None = None,
    rotations: bool = False,
) -> FewShotDataset:
    """Load one split of Omniglot as a :class:`FewShotDataset` (one class per character).

    Parameters
    ----------
    root : path
        Folder holding ``images_background.zip`` and ``images_evaluation.zip`` (or their
        extracted folders). Only read, never written (unless ``download=True`` and it is
        writable).
    split : {"train", "val", "trainval", "test"}
        See the module docstring for the definitions.
    protocol : {"vinyals", "lake", "lake-within", "lake-alphabets"}
        ``"vinyals"``: 1200/423 random characters plus rotations (MAML, ProtoNets).
        ``"lake"``: background/evaluation alphabets, no rotations; ``"lake-within"`` the same
        data (it changes how episodes are drawn, see the module docstring);
        ``"lake-alphabets"``: validation on whole held-out background alphabets.
    image_size : int
        Side of the square output images (28 in MAML; 105 keeps the originals).
    download : bool
        Fetch missing archives from the official repository (MD5-checked) into ``root``,
        or into ``cache_dir`` if ``root`` is not writable.
    cache_dir : path, optional
        Where the decoded-image cache goes; default ``$LEARNED_OPTIM_CACHE`` or
        ``~/.cache/learned_optim``.
    preprocessing : Preprocessing, optional
        Other steps than the default ``Preprocessing.omniglot(image_size)`` (gray, Lanczos,
        inverted so that ink = 1), e.g. ``crop_to_ink``; its size replaces ``image_size``.
        Mode must be ``"L"``.
    rotations : bool
        ``"lake"`` and ``"lake-within"`` only (``"vinyals"`` always rotates): add every
        character rotated by 90, 180 and 270 degrees as three more classes. Class
        ``r * C + c`` is character ``c`` rotated by ``ROTATIONS[r]`` (``C`` characters), so
        the first ``C`` classes are the split without rotations.

    Returns
    -------
    FewShotDataset
        Inputs float32 ``[n, 1, S, S]`` in ``[0, 1]`` (ink 1), 20 examples per class, class
        names ``"Alphabet/characterNN"`` (``"...@rot90"`` etc. for rotated copies).

    Raises
    ------
    FileNotFoundError
        If an archive is missing and ``download`` is False, or the download fails.
    ValueError
        For an unknown split or protocol, ``rotations`` with protocol ``"vinyals"``, or a
        wrong checksum of a downloaded archive.

    Examples
    --------
    >>> from pathlib import Path
    >>> root = Path("~/data/omniglot").expanduser()  # holds the two official zips
    >>> if root.is_dir():  # doctest: +SKIP
    ...     test = omniglot(root, "test")
    ...     print(test.num_classes, test.inputs.shape[1:])
    1692 torch.Size([1, 28, 28])
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Omniglot protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if split not in SPLITS:
        raise ValueError(f"Omniglot split must be one of {SPLITS}, got {split!r}")
    if rotations and protocol == "vinyals":
        raise ValueError("rotations=True is for the lake protocols: protocol 'vinyals' "
                         "already adds every character rotated by 90, 180 and 270 degrees")
    if preprocessing is not None:
        image_size = preprocessing.require_mode("L", "Omniglot").size
    resample = "lanczos" if preprocessing is None else preprocessing.resample
    crop = None if preprocessing is None else preprocessing.crop_to_ink
    arrays = load_omniglot_characters(root, image_size, download, cache_dir, resample, crop)
    if protocol == "lake-alphabets":
        _check_background_alphabets(arrays["names"], arrays["archive"])
    chosen = omniglot_split_characters(arrays["archive"], split, protocol)
    names = [str(n) for n in arrays["names"][chosen]]
    # position of every kept character in the split (-1 = not in this split)
    position = np.full(len(arrays["names"]), -1, dtype=np.int64)
    position[chosen] = np.arange(len(chosen))
    rows = np.flatnonzero(position[arrays["character"]] >= 0)
    images = torch.from_numpy(arrays["images"][rows]).unsqueeze(1)  # [n, 1, S, S] uint8
    labels = torch.from_numpy(position[arrays["character"][rows]])
    if protocol != "vinyals" and not rotations:
        inputs, class_names = images, names
    else:
        inputs = torch.cat([torch.rot90(images, r, dims=(2, 3)) for r in range(len(ROTATIONS))])
        if protocol == "vinyals":  # class 4 * c + r is character c rotated by ROTATIONS[r]
            labels = torch.cat([len(ROTATIONS) * labels + r for r in range(len(ROTATIONS))])
            order = [(name, angle) for name in names for angle in ROTATIONS]
        else:  # class r * C + c: the unrotated split first, each rotation appended
            labels = torch.cat([r * len(names) + labels for r in range(len(ROTATIONS))])
            order = [(name, angle) for angle in ROTATIONS for name in names]
        class_names = [name + (f"@rot{angle}" if angle else "") for name, angle in order]
    inputs = inputs.to(torch.float32).div_(255.0)
    if preprocessing is not None:
        loaded = Preprocessing(image_size, "L", resample, invert=True, crop_to_ink=crop)
        inputs = adjust_loaded(inputs, loaded, preprocessing)
    return FewShotDataset(
        inputs,
        labels,
        class_names,
        name=f"omniglot-{protocol}-{split}" + ("-rotations" if rotations else ""),
    )


def split_by_alphabets(dataset: FewShotDataset, count: int, seed: int = 0
                       ) -> tuple[FewShotDataset, FewShotDataset]:
    """Two disjoint Omniglot data sets by whole alphabets: ``count`` alphabets drawn with
    ``numpy.random.default_rng(seed)`` from ``dataset``'s (sorted by name), and the others.

    Classes are grouped by the alphabet in their name (``"Alphabet/characterNN"``); rotated
    copies (``"...@rot90"``) go with their alphabet, so no character is in both parts. Meta-
    training uses it to pre-train the features on some training alphabets and meta-train the
    rule on episodes of the others, whose characters the features never saw (as at test).

    >>> names = ["A/c1", "A/c2", "B/c1", "C/c1", "A/c1@rot90"]
    >>> data = FewShotDataset(torch.zeros(5, 1), torch.arange(5), names)
    >>> first, rest = split_by_alphabets(data, 1, seed=3)
    >>> first.class_names, rest.class_names
    (['C/c1'], ['A/c1', 'A/c2', 'B/c1', 'A/c1@rot90'])
    """
    alphabets = [name.split("/", 1)[0] for name in dataset.class_names]
    names = sorted(set(alphabets))
    if not (isinstance(count, int) and 1 <= count < len(names)):
        raise ValueError(f"split_by_alphabets: count must be an integer from 1 to "
                         f"{len(names) - 1} (the data set has {len(names)} alphabets), "
                         f"got {count!r}")
    order = np.random.default_rng(seed).permutation(len(names))
    chosen = {names[i] for i in order[:count]}
    first = [c for c, alphabet in enumerate(alphabets) if alphabet in chosen]
    rest = [c for c, alphabet in enumerate(alphabets) if alphabet not in chosen]
    return dataset.subset_classes(first), dataset.subset_classes(rest)
