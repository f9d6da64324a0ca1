"""Small image helpers shared by the loaders (decoding with PIL, resizing arrays)."""

from __future__ import annotations

import os
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError


def decode_image(
    source: str | os.PathLike | IO[bytes],
    mode: str,
    size: int | None,
    resample: int = Image.BILINEAR,
    label: str | None = None,
) -> np.ndarray:
    """Decode one image file as uint8 ``[H, W]`` (mode ``"L"``) or ``[H, W, 3]`` (``"RGB"``).

    ``size`` resizes to ``size x size`` (PIL's resize filters the image when shrinking, so no
    aliasing); ``label`` names the file in errors when ``source`` is an open file.
    """
    try:
        with Image.open(source) as image:
            image = image.convert(mode)
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
