"""Small image helpers shared by the loaders (decoding with PIL, resizing arrays)."""

from __future__ import annotations

import os
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError


def crop_to_ink(image: Image.Image, margin: float, dark_ink: bool = True) -> Image.Image:
    """The square around the ink of a gray (mode ``"L"``) image, before it is resized.

    Ink is what is darker than mid-gray (``dark_ink``) or lighter. The square is centred on
    the ink's bounding box, its side the box's longer side times ``1 + 2 margin``; what falls
    outside the image is background (white for dark ink). An image without ink is returned
    as it is. So a character fills the same share of the frame whoever drew it, and however
    large.

    >>> image = Image.new("L", (40, 20), 255)
    >>> image.paste(0, (10, 5, 14, 15))   # a 4 x 10 stroke
    >>> crop_to_ink(image, 0.1).size      # 10 * 1.2
    (12, 12)
    """
    pixels = np.asarray(image)
    ink = pixels < 128 if dark_ink else pixels >= 128
    if not ink.any():
        return image
    rows, cols = np.nonzero(ink)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(1, int(round(max(bottom - top, right - left) * (1 + 2 * margin))))
    corner_y = int(round((top + bottom - side) / 2))
    corner_x = int(round((left + right - side) / 2))
    width, height = image.size
    box = (max(corner_x, 0), max(corner_y, 0), min(corner_x + side, width),
           min(corner_y + side, height))
    square = Image.new("L", (side, side), 255 if dark_ink else 0)
    square.paste(image.crop(box), (box[0] - corner_x, box[1] - corner_y))
    return square


def decode_image(
    source: str | os.PathLike | IO[bytes],
    mode: str,
    size: int | None,
    resample: int = Image.BILINEAR,
    label: str | None = None,
    ink_margin: float | None = None,
) -> np.ndarray:
    """Decode one image file as uint8 ``[H, W]`` (mode ``"L"``) or ``[H, W, 3]`` (``"RGB"``).

    ``size`` resizes to ``size x size`` (PIL's resize filters the image when shrinking, so no
    aliasing); ``label`` names the file in errors when ``source`` is an open file;
    ``ink_margin`` first crops a gray image of dark ink to its ink (:func:`crop_to_ink`).
    """
    try:
        with Image.open(source) as image:
            image = image.convert(mode)
            if ink_margin is not None:
                image = crop_to_ink(image, ink_margin)
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), resample)
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {label or source}: {error}") from error


def resize_images(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize float ``[n, C, H, W]`` images to ``size x size`` (bilinear, antialiased)."""
    check_image_size(size, allow_none=True)
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    resized = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    return resized.clamp_(0.0, 1.0)


def check_image_size(image_size: int | None, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``image_size`` is a positive int (or ``None`` if allowed)."""
    if image_size is None and allow_none:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
