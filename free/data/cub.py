"""CUB-200-2011: 200 bird species, split 100/50/50 by class for few-shot learning.

The split is the standard one of Chen et al., "A Closer Look at Few-shot Classification" (ICLR 2019),
https://github.com/wyharveychen/CloserLookFewShot (``filelists/CUB/write_CUB_filelist.py``): the class
folders are sorted by name and class ``i`` goes to train when ``i % 2 == 0``, to val when
``i % 4 == 1`` and to test when ``i % 4 == 3``. Explicit split files ``<root>/splits/{train,val,test}.txt``
(one class folder name per line) override that rule.

The images are user-provided: ``<root>/CUB_200_2011/images/<NNN.Class_Name>/*.jpg`` as extracted from
CUB_200_2011.tgz (https://www.vision.caltech.edu/datasets/cub_200_2011/), or ``<root>/images/...``.
"""

from __future__ import annotations

from pathlib import Path

from free.data.base import SPLITS, DatasetIntegrityError, DatasetNotFoundError, Progress, RawDataset, sha256_file
from free.data.folders import ImageClass, list_images, load_image_classes


def _images_dir(root: Path) -> Path:
    """The folder of class folders, in either accepted layout."""
    for candidate in (root / "CUB_200_2011" / "images", root / "images"):
        if candidate.is_dir() and any(path.is_dir() for path in candidate.iterdir()):
            return candidate
    raise DatasetNotFoundError(
        f"CUB-200-2011 not found under {root}: expected class folders {root}/CUB_200_2011/images/"
        f"<NNN.Class_Name>/*.jpg (or {root}/images/<NNN.Class_Name>/*.jpg). Extract CUB_200_2011.tgz "
        f"(https://www.vision.caltech.edu/datasets/cub_200_2011/) into {root}; it cannot be downloaded "
        f"automatically."
    )


def cub_class_splits(class_folders: list[str]) -> list[str]:
    """Chen et al. (2019) split of class folders: by index in name order, train/val/test = 2:1:1.

    Args:
        class_folders: class folder names, in any order.

    Returns:
        Per folder (in the given order), ``"train"``, ``"val"`` or ``"test"``.
    """
    index = {name: i for i, name in enumerate(sorted(class_folders))}
    return ["train" if index[name] % 2 == 0 else "val" if index[name] % 4 == 1 else "test" for name in class_folders]


def _read_split_files(split_dir: Path, class_folders: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Class folder -> split from ``split_dir/{train,val,test}.txt``, and their sha256s."""
    split_of: dict[str, str] = {}
    sources: dict[str, str] = {}
    known = set(class_folders)
    for split in SPLITS:
        path = split_dir / f"{split}.txt"
        if not path.is_file():
            raise DatasetNotFoundError(f"{split_dir} exists but {path} is missing; give all of train/val/test.txt")
        sources[f"splits/{path.name}"] = sha256_file(path)
        for line in path.read_text(encoding="utf-8").splitlines():
            name = line.strip()
            if not name:
                continue
            if name not in known:
                raise DatasetNotFoundError(f"class folder {name!r} listed in {path} not found among the images")
            if split_of.setdefault(name, split) != split:
                raise DatasetIntegrityError(f"class {name!r} is in both {split_of[name]}.txt and {split}.txt")
    return split_of, sources


def load_cub(root: Path, image_size: int = 84, progress: Progress | None = None) -> RawDataset:
    """Load user-provided CUB-200-2011 with the Chen et al. (2019) few-shot class split.

    Args:
        root: folder holding ``CUB_200_2011/images/`` (or ``images/``) and optionally ``splits/``.
        image_size: output side length of the square RGB images.
        progress: optional wrapper ``progress(iterable, description, total)`` around the decoding.

    Returns:
        A :class:`RawDataset` with class name = group = class folder name
        (e.g. ``001.Black_footed_Albatross``), classes sorted by name.
        With split files, classes they do not list are left out.

    Raises:
        DatasetNotFoundError: no class folders, an incomplete ``splits/`` folder, or a split file naming
            an absent class.
        DatasetIntegrityError: a class in two split files, an empty class folder, or an undecodable image.
    """
    root = Path(root)
    images_dir = _images_dir(root)
    class_folders = sorted(path.name for path in images_dir.iterdir() if path.is_dir())
    split_dir = root / "splits"
    if split_dir.is_dir():
        split_of, sources = _read_split_files(split_dir, class_folders)
    else:
        split_of, sources = dict(zip(class_folders, cub_class_splits(class_folders), strict=True)), {}
    classes = [
        ImageClass(name, name, split_of[name], list_images(images_dir / name))
        for name in class_folders
        if name in split_of
    ]
    sources["images/"] = f"imagefolder:{sum(len(cls.files) for cls in classes)} files in {len(classes)} classes"
    return load_image_classes(classes, image_size, sources, progress, "Decoding CUB-200-2011")
