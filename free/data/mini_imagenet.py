"""MiniImageNet: 100 ImageNet classes, 600 images each, split 64/16/20 by class.

The split is the standard one of Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning"
(ICLR 2017), https://github.com/twitter-research/meta-learning-lstm (``data/miniImagenet/{train,val,
test}.csv``). The images are not redistributable, so they are user-provided in one of two layouts:

* CSV layout (Ravi & Larochelle): ``<root>/images/*.jpg`` plus ``<root>/{train,val,test}.csv``, each
  CSV with the header ``filename,label`` (e.g. ``n0153282900000005.jpg,n01532829``);
* ImageFolder layout (common "mini-imagenet" tarballs): ``<root>/{train,val,test}/<wnid>/*.jpg``.

Besides the loader, this module holds the helpers shared by the loaders of user-provided image
folders (:func:`sha256_file`, :func:`list_images`, :func:`load_image_classes`).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from free.data.base import SPLITS, DatasetIntegrityError, DatasetNotFoundError, RawDataset
from free.data.images import decode_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

Progress = Callable[[Iterable, str, int], Iterable]


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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large archives do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def _layouts_message(root: Path, missing: list[Path]) -> str:
    return (
        f"MiniImageNet not found under {root}: expected either the CSV layout (Ravi & Larochelle) "
        f"{root}/images/*.jpg plus {root}/{{train,val,test}}.csv with header `filename,label`, or the "
        f"ImageFolder layout {root}/{{train,val,test}}/<wnid>/*.jpg. "
        f"Missing: {', '.join(map(str, missing))}. "
        f"MiniImageNet cannot be downloaded automatically; place the images there."
    )


def _read_csv_layout(root: Path) -> tuple[list[ImageClass], dict[str, str]]:
    """Classes of the CSV layout, checking that every listed image exists."""
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise DatasetNotFoundError(_layouts_message(root, [image_dir]))
    files: dict[str, list[Path]] = {}
    split_of: dict[str, str] = {}
    sources: dict[str, str] = {}
    for split in SPLITS:
        csv_path = root / f"{split}.csv"
        sources[csv_path.name] = sha256_file(csv_path)
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
                raise DatasetIntegrityError(f"{csv_path} must have the header `filename,label`")
            n_rows = 0
            for row in reader:
                n_rows += 1
                wnid, filename = (row["label"] or "").strip(), (row["filename"] or "").strip()
                if not wnid or not filename:
                    raise DatasetIntegrityError(f"{csv_path} line {reader.line_num}: empty filename or label")
                path = image_dir / filename
                if split_of.setdefault(wnid, split) != split:
                    raise DatasetIntegrityError(f"class {wnid} is in both {split_of[wnid]}.csv and {split}.csv")
                if not path.is_file():
                    raise DatasetNotFoundError(f"MiniImageNet image {path} listed in {csv_path} does not exist")
                files.setdefault(wnid, []).append(path)
        if n_rows == 0:
            raise DatasetIntegrityError(f"{csv_path} lists no image")
    classes = [ImageClass(wnid, wnid, split_of[wnid], paths) for wnid, paths in files.items()]
    return classes, sources


def _read_folder_layout(root: Path) -> tuple[list[ImageClass], dict[str, str]]:
    """Classes of the ImageFolder layout: one sub-folder per class in each split folder."""
    classes: dict[str, ImageClass] = {}
    sources: dict[str, str] = {}
    for split in SPLITS:
        split_dir = root / split
        class_dirs = sorted(path for path in split_dir.iterdir() if path.is_dir())
        if not class_dirs:
            raise DatasetNotFoundError(f"no class folders <wnid>/ in {split_dir}; expected {split_dir}/<wnid>/*.jpg")
        n_files = 0
        for class_dir in class_dirs:
            wnid = class_dir.name
            if wnid in classes:
                raise DatasetIntegrityError(f"class {wnid} is in both {classes[wnid].split}/ and {split}/")
            classes[wnid] = ImageClass(wnid, wnid, split, list_images(class_dir))
            n_files += len(classes[wnid].files)
        sources[f"{split}/"] = f"imagefolder:{n_files} files"
    return list(classes.values()), sources


def load_mini_imagenet(root: Path, image_size: int = 84, progress: Progress | None = None) -> RawDataset:
    """Load user-provided MiniImageNet with its standard Ravi & Larochelle split.

    Args:
        root: folder in the CSV or ImageFolder layout (see the module docstring); the CSV layout wins
            when both are present.
        image_size: output side length of the square RGB images.
        progress: optional wrapper ``progress(iterable, description, total)`` around the decoding.

    Returns:
        A :class:`RawDataset` with class name = group = WordNet id, classes sorted by wnid and files by name.

    Raises:
        DatasetNotFoundError: neither layout is complete under ``root``, or a listed image is missing.
        DatasetIntegrityError: a malformed CSV, a class in two splits, or an undecodable image.
    """
    root = Path(root)
    csv_paths = [root / f"{split}.csv" for split in SPLITS]
    split_dirs = [root / split for split in SPLITS]
    if all(path.is_file() for path in csv_paths):
        classes, sources = _read_csv_layout(root)
    elif all(path.is_dir() for path in split_dirs):
        classes, sources = _read_folder_layout(root)
    else:
        missing = [path for path in csv_paths if not path.is_file()]
        missing += [path for path in split_dirs if not path.is_dir()]
        raise DatasetNotFoundError(_layouts_message(root, missing))
    return load_image_classes(classes, image_size, sources, progress, "Decoding MiniImageNet")
