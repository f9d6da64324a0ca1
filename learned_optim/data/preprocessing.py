"""How raw images become a learner's inputs: one spec, stored in every checkpoint, one function.

A :class:`Preprocessing` names every step between an image file (or a PIL image, an array, a
tensor) and the float tensor a learner was meta-trained on: colour mode, square size and
resampling filter, inversion, normalisation. :func:`preprocess` applies it; the Omniglot loader
and :func:`~learned_optim.data.image_folder` accept it, and :class:`learned_optim.FewShotClassifier`
reads it from the checkpoint, so a user's images reach a shipped model exactly as the training
images did.

The steps, in order (all on 8-bit pixels, as PIL does them):

1. convert to ``mode`` (``"L"``: one channel, ``"RGB"``: three), and, if ``crop_to_ink`` is
   set (gray only), crop to the square around the ink (``invert=True``: dark ink on light);
2. resize to ``size x size`` with the ``resample`` filter (skipped if already that size);
3. ``invert``: ``255 - pixel`` (Omniglot files are black ink on white; its learners see ink = 1);
4. divide by 255, then ``(x - mean) / std`` per channel if ``mean`` and ``std`` are set.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from learned_optim.data._images import crop_to_ink

__all__ = [
    "Preprocessing",
    "crop_to_ink",
    "OMNIGLOT_INK_CROPPED_MEAN_PIXEL_28",
    "RESAMPLE_FILTERS",
    "adjust_loaded",
    "check_polarity",
    "normalise_pixels",
    "preprocess",
    "preprocess_with_shapes",
    "to_pil",
]

RESAMPLE_FILTERS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}
MODES = {"L": 1, "RGB": 3}
# Mean pixel of Omniglot after the Omniglot preprocessing (ink = 1), 28 x 28, measured on the
# 964 background characters x 20 drawers (tests/test_classifier.py re-measures it).
OMNIGLOT_MEAN_PIXEL_28 = 0.0815
# The same with every image cropped to its ink (Preprocessing.crop_to_ink), by margin: the ink
# fills more of the frame.
OMNIGLOT_INK_CROPPED_MEAN_PIXEL_28 = {0.1: 0.1370}
# A support set whose mean pixel is farther than this from the training mean, and nearer to
# the inverse, gets the polarity warning.
POLARITY_TOLERANCE = 0.2


@dataclass(frozen=True)
class Preprocessing:
    """Every step from an image to a learner input (see the module docstring).

    Attributes
    ----------
    size : int
        Side of the square output.
    mode : {"L", "RGB"}
        PIL colour mode: one or three channels.
    resample : str
        PIL resampling filter: one of :data:`RESAMPLE_FILTERS`.
    invert : bool
        ``255 - pixel`` after resizing.
    mean, std : tuple of float, optional
        Per-channel normalisation after scaling to ``[0, 1]`` (none if ``None``).
    train_mean : float, optional
        Mean pixel (in ``[0, 1]``, before normalisation) of the meta-training images: a support
        set far from it and near its inverse is reported by :func:`check_polarity`.
    crop_to_ink : float, optional
        Mode ``"L"`` only: before resizing, crop each image to the square around its ink's
        bounding box, widened by this share of the box's longer side on each side
        (:func:`learned_optim.data.crop_to_ink`; the ink is dark if ``invert``). ``None``: the
        whole image, as the paper's loaders.

    Examples
    --------
    >>> spec = Preprocessing.omniglot(28)
    >>> spec.channels, spec.resample, spec.invert
    (1, 'lanczos', True)
    >>> Preprocessing.from_dict(spec.to_dict()) == spec
    True
    """

    size: int = 28
    mode: str = "L"
    resample: str = "bilinear"
    invert: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    train_mean: float | None = None
    crop_to_ink: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"preprocessing size must be a positive integer, got {self.size!r}")
        if self.mode not in MODES:
            raise ValueError(f"preprocessing mode must be one of {tuple(MODES)}, got "
                             f"{self.mode!r}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"preprocessing resample must be one of {tuple(RESAMPLE_FILTERS)}, "
                             f"got {self.resample!r}")
        if not isinstance(self.invert, bool):
            raise ValueError(f"preprocessing invert must be true or false, got {self.invert!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("preprocessing needs both mean and std, or neither")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(float(v) for v in value)
            if len(value) != self.channels:
                raise ValueError(f"preprocessing {name} needs {self.channels} value(s) for mode "
                                 f"{self.mode!r}, got {len(value)}")
            if name == "std" and not all(v > 0 for v in value):
                raise ValueError(f"preprocessing std must be positive, got {value}")
            object.__setattr__(self, name, value)
        if self.crop_to_ink is not None:
            if (isinstance(self.crop_to_ink, bool)
                    or not isinstance(self.crop_to_ink, (int, float))
                    or not 0.0 <= float(self.crop_to_ink) <= 2.0):
                raise ValueError("preprocessing crop_to_ink must be a margin in [0, 2] (a share "
                                 f"of the ink's extent), got {self.crop_to_ink!r}")
            if self.mode != "L":
                raise ValueError("preprocessing crop_to_ink finds the ink of gray images: mode "
                                 f"must be 'L', got {self.mode!r}")
            object.__setattr__(self, "crop_to_ink", float(self.crop_to_ink))
        if self.train_mean is not None and not 0.0 <= float(self.train_mean) <= 1.0:
            raise ValueError(f"preprocessing train_mean must lie in [0, 1], got "
                             f"{self.train_mean!r}")

    @property
    def channels(self) -> int:
        """1 for mode ``"L"``, 3 for ``"RGB"``."""
        return MODES[self.mode]

    def require_mode(self, mode: str, dataset: str) -> Preprocessing:
        """This preprocessing, if it produces ``mode``, the colour mode of ``dataset``'s
        images; else a ValueError naming both (a loader's check).

        >>> Preprocessing.omniglot().require_mode("RGB", "miniImageNet")
        Traceback (most recent call last):
        ...
        ValueError: miniImageNet images are colour: preprocessing mode must be 'RGB', got 'L'
        """
        if self.mode != mode:
            kind = "gray" if mode == "L" else "colour"
            raise ValueError(f"{dataset} images are {kind}: preprocessing mode must be "
                             f"{mode!r}, got {self.mode!r}")
        return self

    @classmethod
    def omniglot(cls, size: int = 28, crop_to_ink: float | None = None) -> Preprocessing:
        """The Omniglot loader's steps: gray, (cropped to the ink,) Lanczos resize, inverted
        (ink = 1)."""
        means = {None: OMNIGLOT_MEAN_PIXEL_28, **OMNIGLOT_INK_CROPPED_MEAN_PIXEL_28}
        train_mean = means.get(crop_to_ink) if size == 28 else None
        return cls(size, "L", "lanczos", True, train_mean=train_mean, crop_to_ink=crop_to_ink)

    @classmethod
    def miniimagenet(cls, size: int = 84) -> Preprocessing:
        """The miniImageNet loader's steps: RGB, bilinear resize, no inversion."""
        return cls(size, "RGB", "bilinear", False)

    @classmethod
    def for_config(cls, config: Any) -> Preprocessing | None:
        """The preprocessing a training configuration implies (``None`` for sinusoid tasks).

        >>> Preprocessing.for_config({"task": "omniglot", "image_size": 28}).resample
        'lanczos'
        """
        values = config if isinstance(config, dict) else asdict(config)
        task = values.get("task")
        if task == "omniglot":
            return cls.omniglot(values.get("image_size") or 28, values.get("crop_to_ink"))
        if task == "miniimagenet":
            return cls.miniimagenet(values.get("image_size") or 84)
        return None

    def to_dict(self) -> dict:
        """JSON-ready form (the checkpoint record's ``preprocessing`` field)."""
        values = asdict(self)
        for name in ("mean", "std"):
            if values[name] is not None:
                values[name] = list(values[name])
        return values

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming a bad or unknown key."""
        if not isinstance(values, dict):
            raise ValueError(f"preprocessing must be a mapping, got {type(values).__name__}")
        known = {"size", "mode", "resample", "invert", "mean", "std", "train_mean",
                 "crop_to_ink"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def _array_to_pil(array: np.ndarray, label: str) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # [C, H, W] -> [H, W, C]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f"{label}: expected an image of shape [H, W], [H, W, 1|3] or "
                         f"[1|3, H, W], got {tuple(array.shape)}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{label}: pixel dtype must be uint8, bool or float in [0, 1], "
                             f"got {array.dtype}")
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        if not (np.isfinite(array).all() and low >= 0.0 and high <= 1.0):
            raise ValueError(f"{label}: float pixels must lie in [0, 1], found [{low:g}, "
                             f"{high:g}] (pass uint8 for 0-255 images)")
        array = np.rint(array * 255.0).astype(np.uint8)
    return Image.fromarray(array, "L" if array.ndim == 2 else "RGB")


def to_pil(image: Any, label: str = "image") -> Image.Image:
    """One image (a file path, PIL image, numpy array or tensor) as an 8-bit PIL image.

    Arrays and tensors are pixels: uint8 0-255, bool, or float in ``[0, 1]``; shaped
    ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` with ``C`` 1 or 3.

    >>> to_pil(np.zeros((5, 7), dtype=np.uint8)).size
    (7, 5)
    """
    if isinstance(image, Image.Image):
        image.load()
        return image
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                opened.load()
                return opened
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {image}: {error}") from error
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, label)
    raise TypeError(f"{label}: expected a file path, PIL image, numpy array or tensor, got "
                    f"{type(image).__name__}")


def _pixels(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """Steps 1-3 on one PIL image: uint8 ``[H, W]`` or ``[H, W, 3]``."""
    image = image.convert(spec.mode)
    if spec.crop_to_ink is not None:
        image = crop_to_ink(image, spec.crop_to_ink, dark_ink=spec.invert)
    if image.size != (spec.size, spec.size):
        image = image.resize((spec.size, spec.size), RESAMPLE_FILTERS[spec.resample])
    pixels = np.asarray(image, dtype=np.uint8)
    return 255 - pixels if spec.invert else pixels


def _split_batch(images: Any) -> list:
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike, Image.Image, torch.Tensor, np.ndarray)):
        return [images]
    return list(images)


def preprocess(images: Any, spec: Preprocessing, *, normalise: bool = True) -> torch.Tensor:
    """Apply ``spec`` to images: float32 ``[n, C, size, size]``.

    Parameters
    ----------
    images
        One image or a sequence of them (file paths, PIL images, arrays, tensors; see
        :func:`to_pil`); a 4-D array or tensor is a batch ``[n, ...]``.
    spec : Preprocessing
        The steps (e.g. ``Preprocessing.omniglot()`` or a checkpoint's).
    normalise : bool
        Apply ``spec``'s mean/std (default); False stops at ``[0, 1]`` pixels.

    Examples
    --------
    >>> white = np.full((105, 105), 255, dtype=np.uint8)   # a blank Omniglot page
    >>> x = preprocess([white, white], Preprocessing.omniglot(28))
    >>> tuple(x.shape), float(x.max())                      # inverted: background 0
    ((2, 1, 28, 28), 0.0)
    """
    items = _split_batch(images)
    if not items:
        raise ValueError("preprocess: no images given")
    arrays = [_pixels(to_pil(item, f"image {i}"), spec) for i, item in enumerate(items)]
    batch = np.stack(arrays)
    tensor = torch.from_numpy(batch[:, None] if spec.mode == "L" else batch.transpose(0, 3, 1, 2))
    tensor = tensor.to(torch.float32).div_(255.0).contiguous()
    return normalise_pixels(tensor, spec) if normalise else tensor


def normalise_pixels(pixels: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """Step 4's normalisation ``(x - mean) / std`` (identity if ``spec`` has none).

    >>> spec = Preprocessing(size=2, mean=(0.5,), std=(0.25,))
    >>> normalise_pixels(torch.ones(1, 1, 2, 2), spec).flatten().tolist()
    [2.0, 2.0, 2.0, 2.0]
    """
    if spec.mean is None:
        return pixels
    mean = torch.tensor(spec.mean, dtype=pixels.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=pixels.dtype).view(1, -1, 1, 1)
    return (pixels - mean) / std


def adjust_loaded(pixels: torch.Tensor, loaded: Preprocessing, wanted: Preprocessing
                  ) -> torch.Tensor:
    """A loader's ``[0, 1]`` images made with ``loaded``'s steps 1-3, finished as ``wanted``.

    The two specs must agree on size, mode, filter and crop (the loader decodes with those); an
    inversion that differs is undone here, and ``wanted``'s normalisation applied.

    >>> ink = torch.tensor([[[[0.0, 1.0]]]])
    >>> plain = Preprocessing(size=2, mode="L", resample="lanczos")
    >>> adjust_loaded(ink, Preprocessing.omniglot(2), plain).flatten().tolist()
    [1.0, 0.0]
    """
    for name in ("size", "mode", "resample", "crop_to_ink"):
        if getattr(loaded, name) != getattr(wanted, name):
            raise ValueError(f"preprocessing {name} {getattr(wanted, name)!r} differs from the "
                             f"loader's {getattr(loaded, name)!r}")
    if loaded.invert != wanted.invert:
        pixels = 1.0 - pixels
    return normalise_pixels(pixels, wanted)


def check_polarity(pixels: torch.Tensor, spec: Preprocessing, what: str = "support set") -> float:
    """Warn if ``pixels`` (``[0, 1]``, un-normalised) look inverted w.r.t. the training data.

    Returns the mean pixel. The warning fires when the mean is more than 0.2 from
    ``spec.train_mean`` and nearer to its inverse ``1 - train_mean``.

    >>> spec = Preprocessing.omniglot(28)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     _ = check_polarity(torch.full((1, 1, 28, 28), 0.9), spec)
    >>> "inverted" in str(caught[0].message)
    True
    """
    mean = float(pixels.mean())
    if spec.train_mean is None:
        return mean
    expected = float(spec.train_mean)
    if abs(mean - expected) > POLARITY_TOLERANCE and abs(mean - (1 - expected)) < abs(
            mean - expected):
        warnings.warn(
            f"the {what}'s mean pixel after preprocessing is {mean:.2f}, far from the "
            f"meta-training images' {expected:.2f} and close to its inverse: the images are "
            f"probably inverted (the preprocessing {'inverts' if spec.invert else 'keeps'} "
            "pixels, so files must be "
            + ("dark strokes on a light background" if spec.invert == (expected < 0.5)
               else "light strokes on a dark background")
            + "); invert them first or predictions will be near chance", UserWarning,
            stacklevel=3)
    return mean


def preprocess_with_shapes(
    images: Any, spec: Preprocessing, what: str = "image"
) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Un-normalised ``[0, 1]`` pixels of ``images`` and each one's raw (channels, H, W).

    >>> pixels, shapes = preprocess_with_shapes([np.zeros((30, 20, 3), np.uint8)],
    ...                                         Preprocessing(size=8))
    >>> tuple(pixels.shape), shapes
    ((1, 1, 8, 8), [(3, 30, 20)])
    """
    items = _split_batch(images)
    pils = [to_pil(item, f"{what} {i}") for i, item in enumerate(items)]
    shapes = [(len(p.getbands()), p.size[1], p.size[0]) for p in pils]
    if not pils:
        return torch.empty(0, spec.channels, spec.size, spec.size), shapes
    return preprocess(pils, spec, normalise=False), shapes
