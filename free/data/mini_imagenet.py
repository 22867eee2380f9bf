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
from pathlib import Path

from free.data.base import SPLITS, DatasetIntegrityError, DatasetNotFoundError, Progress, RawDataset, sha256_file
from free.data.folders import ImageClass, list_images, load_image_classes


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
