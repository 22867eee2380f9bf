"""Data types shared by every data set loader.

A loader turns files on disk into a :class:`RawDataset`: every image of the data set as one
uint8 tensor, a class index per image, and per class a name, a group (alphabet / super-class,
used to stratify splits) and, for data sets with a standard split, the split the class belongs to.
Splitting, rotation augmentation and caching are done once, in :mod:`free.data.splits`, for all
data sets alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SPLITS = ("train", "val", "test")

# ``progress(iterable, description, total)`` yields the same items while showing progress.
Progress = Callable[[Iterable, str, int], Iterable]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large archives do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are not where the configuration says they are.

    The message says what to put where (or how to download it), so that the CLI can print it as is.
    """


class DatasetIntegrityError(ValueError):
    """A data set file exists but is not what it should be (bad checksum, unreadable image)."""


@dataclass
class RawDataset:
    """Every image of a data set, decoded, before splitting.

    Attributes:
        images: ``(N, C, H, W)`` uint8 images, already resized to the configured size.
        labels: ``(N,)`` int64, index into ``class_names``.
        class_names: unique, stable identifier of each class (e.g. ``"Greek/character01"``).
        class_groups: per class, the group used to stratify splits (alphabet, super-class).
        class_splits: per class, its standard split (``"train"|"val"|"test"``), or ``None`` when
            the data set has no standard split and one is drawn by :func:`free.data.splits.assign_splits`.
        sources: provenance of the data: file name -> sha256 (or a description), for lineage.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    class_groups: list[str]
    class_splits: list[str] | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_classes = len(self.class_names)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be (N,) = ({self.images.shape[0]},), got {tuple(self.labels.shape)}")
        if len(self.class_groups) != n_classes:
            raise ValueError("class_groups must have one entry per class")
        if len(set(self.class_names)) != n_classes:
            raise ValueError("class_names must be unique")
        if self.class_splits is not None:
            if len(self.class_splits) != n_classes or not set(self.class_splits) <= set(SPLITS):
                raise ValueError(f"class_splits must give one of {SPLITS} per class")
        if self.labels.numel() and (self.labels.min() < 0 or self.labels.max() >= n_classes):
            raise ValueError("labels out of range of class_names")
