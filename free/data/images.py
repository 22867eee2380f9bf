"""Decoding image files into fixed-size uint8 tensors, shared by all loaders."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from free.data.base import DatasetIntegrityError


def decode_image(source: bytes | str | Path, image_size: int, channels: int) -> torch.Tensor:
    """Decode one image file, convert it to ``channels`` and resize it to a square.

    Args:
        source: encoded file content (bytes) or a path.
        image_size: output side length ``S``; resized with Lanczos (antialiased) filtering.
        channels: 1 (grayscale) or 3 (RGB).

    Returns:
        ``(C, S, S)`` uint8 tensor.

    Raises:
        DatasetIntegrityError: the file is not a readable image; the message names it.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
            array = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy shares it
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetIntegrityError(f"cannot decode image {name}: {err}") from err
    if channels == 1:
        array = array[None]  # (1, S, S)
    else:
        array = array.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    return torch.from_numpy(np.ascontiguousarray(array))
