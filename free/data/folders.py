"""Image-folder data sets (one folder or CSV list of files per class), decoded in one pass.

Shared by the loaders of user-provided data sets (MiniImageNet, CUB): each lists its classes as
:class:`ImageClass` records with their files and standard split, and :func:`load_image_classes`
decodes them into a :class:`~free.data.base.RawDataset`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from free.data.base import DatasetIntegrityError, Progress, RawDataset
from free.data.images import decode_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class ImageClass:
    """One class of a user-provided image data set, before decoding.

    Attributes:
        name: unique class name.
        group: group used to stratify splits.
        split: ``"train"``, ``"val"`` or ``"test"``.
        files: image files of the class.
    """

    name: str
    group: str
    split: str
    files: list[Path]


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; hidden files (``._x.jpg``) are skipped."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )


def load_image_classes(
    classes: Sequence[ImageClass],
    image_size: int,
    sources: dict[str, str],
    progress: Progress | None = None,
    description: str = "Decoding images",
) -> RawDataset:
    """Decode the files of each class into a :class:`RawDataset`, classes sorted by name.

    Args:
        classes: the classes, each with its files; an empty class is an error.
        image_size: output side length of the square RGB images.
        sources: provenance to store in the result.
        progress: optional wrapper ``progress(iterable, description, total)`` around the decoding.
        description: text shown by ``progress``.

    Raises:
        DatasetIntegrityError: a class has no image, or an image cannot be decoded (the message names it).
    """
    # Sorting makes labels independent of the order of CSV rows or of the file system.
    classes = sorted(classes, key=lambda cls: cls.name)
    items: list[tuple[int, Path]] = []
    for label, cls in enumerate(classes):
        if not cls.files:
            raise DatasetIntegrityError(f"class {cls.name!r} has no image files")
        items.extend((label, path) for path in sorted(cls.files))

    images = torch.empty((len(items), 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.tensor([label for label, _ in items], dtype=torch.int64)
    indexed: Iterable[tuple[int, tuple[int, Path]]] = enumerate(items)
    if progress is not None:
        indexed = progress(indexed, description, len(items))
    for i, (_, path) in indexed:
        images[i] = decode_image(path, image_size, 3)
    return RawDataset(
        images=images,
        labels=labels,
        class_names=[cls.name for cls in classes],
        class_groups=[cls.group for cls in classes],
        class_splits=[cls.split for cls in classes],
        sources=dict(sources),
    )
