"""CIFAR-FS: CIFAR-100 split by class into 64 meta-train / 16 meta-val / 20 meta-test classes.

The split is the standard one of Bertinetto et al., "Meta-learning with differentiable closed-form
solvers" (ICLR 2019), https://github.com/bertinetto/r2d2 (``data/cifar-fs/splits/bertinetto``).
Every class keeps all its 600 images: the 500 of CIFAR-100's train part and the 100 of its test part.

The files are read through :class:`torchvision.datasets.CIFAR100`, which checks the md5 of the
official ``cifar-100-python/{train,test,meta}`` files before unpickling them, so no file other than
the genuine archive is ever unpickled. The super-class of every class is hard-coded below (the
``coarse_label_names`` of CIFAR-100's ``meta`` file) instead of being read from the pickles.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR100

from free.data.base import DatasetIntegrityError, DatasetNotFoundError, Progress, RawDataset

# CIFAR-100's 100 fine class names, in the order of ``fine_label_names`` in its ``meta`` file
# (alphabetical), which is also torchvision's ``CIFAR100.classes`` and the label order.
CIFAR100_FINE_NAMES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle",
    "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon",
    "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

# CIFAR-100's 20 super-classes (``coarse_label_names``), each with its 5 fine classes, as published
# on https://www.cs.toronto.edu/~kriz/cifar.html. Used as ``class_groups``.
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
CIFAR100_COARSE_OF: dict[str, str] = {fine: coarse for coarse, fines in CIFAR100_SUPERCLASSES.items() for fine in fines}

# Bertinetto et al. (2019), splits/bertinetto/{val,test}.txt.
CIFAR_FS_VAL_CLASSES: tuple[str, ...] = (
    "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
    "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
)  # fmt: skip
CIFAR_FS_TEST_CLASSES: tuple[str, ...] = (
    "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
    "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket",
)  # fmt: skip
CIFAR_FS_TRAIN_CLASSES: tuple[str, ...] = tuple(
    name for name in CIFAR100_FINE_NAMES if name not in CIFAR_FS_VAL_CLASSES + CIFAR_FS_TEST_CLASSES
)
assert (len(CIFAR_FS_TRAIN_CLASSES), len(CIFAR_FS_VAL_CLASSES), len(CIFAR_FS_TEST_CLASSES)) == (64, 16, 20)

CIFAR_FOLDER = "cifar-100-python"
CIFAR_FILES = ("train", "test", "meta")


def cifar_fs_class_splits(fine_names: list[str]) -> list[str]:
    """Map CIFAR-100 fine class names to their CIFAR-FS split.

    Args:
        fine_names: CIFAR-100 fine class names, e.g. torchvision's ``CIFAR100.classes``.

    Returns:
        Per name, ``"train"``, ``"val"`` or ``"test"``.

    Raises:
        DatasetIntegrityError: a name is not a CIFAR-100 fine class name.
    """
    splits = []
    for name in fine_names:
        if name in CIFAR_FS_VAL_CLASSES:
            splits.append("val")
        elif name in CIFAR_FS_TEST_CLASSES:
            splits.append("test")
        elif name in CIFAR_FS_TRAIN_CLASSES:
            splits.append("train")
        else:
            raise DatasetIntegrityError(f"{name!r} is not a CIFAR-100 fine class name")
    return splits


def _not_found_message(root: Path) -> str:
    folder = root / CIFAR_FOLDER
    return (
        f"CIFAR-100 not found under {root}: expected {folder}/{{train,test,meta}} (the python version "
        f"of CIFAR-100, cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html). "
        f"Download it with `dataset.download=true` when online, or place the extracted archive there."
    )


def _open_cifar100(root: Path, download: bool) -> tuple[CIFAR100, CIFAR100]:
    """Open both parts of CIFAR-100 with torchvision, turning its errors into ours."""
    folder = root / CIFAR_FOLDER
    missing = [name for name in CIFAR_FILES if not (folder / name).is_file()]
    if missing and not download:
        raise DatasetNotFoundError(_not_found_message(root))
    try:
        # torchvision downloads (when asked and needed) and md5-checks every file before unpickling.
        train = CIFAR100(str(root), train=True, download=download)
        test = CIFAR100(str(root), train=False, download=False)
    except (OSError, RuntimeError, tarfile.TarError) as err:
        # Offline downloads fail with URLError (an OSError); bad or missing files with RuntimeError.
        if all((folder / name).is_file() for name in CIFAR_FILES):
            raise DatasetIntegrityError(
                f"CIFAR-100 files under {folder} failed torchvision's md5 check ({err}); they are not the "
                f"official python version of CIFAR-100. Replace them with the extracted "
                f"cifar-100-python.tar.gz, or delete them and set `dataset.download=true` when online."
            ) from err
        raise DatasetNotFoundError(f"{_not_found_message(root)} (download failed: {err})") from err
    return train, test


def _resize(images: np.ndarray, image_size: int, progress: Progress | None) -> np.ndarray:
    """Resize ``(N, H, W, 3)`` images to ``(N, 3, S, S)`` with the Lanczos filter of :func:`decode_image`."""
    # Filled channel-first in place, so that large sizes need no second full-size copy to transpose.
    out = np.empty((len(images), 3, image_size, image_size), dtype=np.uint8)
    indices: Iterable[int] = range(len(images))
    if progress is not None:
        indices = progress(indices, "Resizing CIFAR-100", len(images))
    for i in indices:
        img = Image.fromarray(images[i]).resize((image_size, image_size), Image.Resampling.LANCZOS)
        out[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return out


def load_cifar_fs(
    root: Path, image_size: int = 32, download: bool = False, progress: Progress | None = None
) -> RawDataset:
    """Load CIFAR-FS: all 60,000 CIFAR-100 images, with the Bertinetto et al. class split.

    Args:
        root: folder holding (or to hold, when downloading) ``cifar-100-python/``.
        image_size: output side length; images are resized only when it is not 32.
        download: let torchvision download the archive when the files are missing.
        progress: optional wrapper ``progress(iterable, description, total)`` shown while resizing.

    Returns:
        A :class:`RawDataset` of ``(60000, 3, S, S)`` images ordered by class (train part first within
        a class), class names in CIFAR-100 label order, super-classes as groups, CIFAR-FS splits.

    Raises:
        DatasetNotFoundError: the files are missing and were not (or could not be) downloaded.
        DatasetIntegrityError: the files exist but are not the official ones.
    """
    root = Path(root)
    train, test = _open_cifar100(root, download)
    class_names = list(train.classes)
    unknown = sorted(set(class_names) - set(CIFAR100_FINE_NAMES))
    if unknown or len(class_names) != len(CIFAR100_FINE_NAMES):
        raise DatasetIntegrityError(f"unexpected CIFAR-100 class names under {root / CIFAR_FOLDER}: {unknown}")

    images = np.concatenate([np.asarray(train.data), np.asarray(test.data)])  # (N, 32, 32, 3)
    labels = np.concatenate([np.asarray(train.targets), np.asarray(test.targets)]).astype(np.int64)
    # Group the images by class; a stable sort keeps the train part before the test part.
    order = np.argsort(labels, kind="stable")
    images, labels = images[order], labels[order]
    if image_size != images.shape[1]:
        images = _resize(images, image_size, progress)
    else:
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))

    return RawDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        class_names=class_names,
        class_groups=[CIFAR100_COARSE_OF[name] for name in class_names],
        class_splits=cifar_fs_class_splits(class_names),
        sources={CIFAR_FOLDER: "cifar-100-python (torchvision, md5-checked)"},
    )
