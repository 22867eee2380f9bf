"""Tests of the CIFAR-FS, MiniImageNet and CUB-200-2011 loaders on tiny fake data sets on disk."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from free.data import cifar_fs
from free.data.base import DatasetIntegrityError, DatasetNotFoundError, RawDataset
from free.data.cifar_fs import (
    CIFAR100_COARSE_OF,
    CIFAR100_FINE_NAMES,
    CIFAR100_SUPERCLASSES,
    CIFAR_FS_TEST_CLASSES,
    CIFAR_FS_TRAIN_CLASSES,
    CIFAR_FS_VAL_CLASSES,
    cifar_fs_class_splits,
    load_cifar_fs,
)
from free.data.cub import cub_class_splits, load_cub
from free.data.mini_imagenet import load_mini_imagenet

RNG = np.random.default_rng(0)


def write_image(path: Path, suffix_format: str = "JPEG") -> None:
    """Write a 10x12 random-colour image in the real on-disk format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path, format=suffix_format)


def check_consistent(data: RawDataset, image_size: int) -> None:
    """Shapes and labels agree with the class lists."""
    assert data.images.dtype == torch.uint8
    assert data.images.shape[1:] == (3, image_size, image_size)
    assert data.labels.shape == (data.images.shape[0],)
    assert set(data.labels.tolist()) == set(range(len(data.class_names)))


# ---------------------------------------------------------------- CIFAR-FS


def test_cifar_fs_split_constants() -> None:
    assert len(CIFAR100_FINE_NAMES) == len(set(CIFAR100_FINE_NAMES)) == 100
    assert list(CIFAR100_FINE_NAMES) == sorted(CIFAR100_FINE_NAMES)
    train, val, test = set(CIFAR_FS_TRAIN_CLASSES), set(CIFAR_FS_VAL_CLASSES), set(CIFAR_FS_TEST_CLASSES)
    assert (len(train), len(val), len(test)) == (64, 16, 20)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(CIFAR100_FINE_NAMES)


def test_cifar_fs_class_splits_maps_every_fine_name() -> None:
    splits = cifar_fs_class_splits(list(CIFAR100_FINE_NAMES))
    assert [splits.count(s) for s in ("train", "val", "test")] == [64, 16, 20]
    assert cifar_fs_class_splits(["otter", "whale", "apple"]) == ["val", "test", "train"]
    with pytest.raises(DatasetIntegrityError, match="not_a_class"):
        cifar_fs_class_splits(["not_a_class"])


def test_cifar100_superclasses_cover_every_fine_name_once() -> None:
    assert len(CIFAR100_SUPERCLASSES) == 20
    assert all(len(fines) == 5 for fines in CIFAR100_SUPERCLASSES.values())
    assert sorted(CIFAR100_COARSE_OF) == list(CIFAR100_FINE_NAMES)


def test_cifar_fs_missing_root_says_where(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar_fs(root)
    assert str(root / "cifar-100-python") in str(info.value)
    assert "dataset.download=true" in str(info.value)


def test_cifar_fs_failed_download_is_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self: object) -> None:
        raise URLError("no network")

    monkeypatch.setattr(cifar_fs.CIFAR100, "download", offline)
    with pytest.raises(DatasetNotFoundError, match=r"download failed.*no network") as info:
        load_cifar_fs(tmp_path, download=True)
    assert "cifar-100-python" in str(info.value)


def test_cifar_fs_fake_files_fail_md5_without_unpickling(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"not the official pickle")
    with pytest.raises(DatasetIntegrityError, match="md5"):
        load_cifar_fs(tmp_path)


class FakeCIFAR100:
    """Stands in for torchvision's CIFAR100: 2 train + 1 test image per class.

    Pixel value = label (+ 100 in the test part) + 20 * channel, to check the order of images and channels.
    """

    def __init__(self, root: str, train: bool, download: bool) -> None:
        per_class = 2 if train else 1
        self.classes = list(CIFAR100_FINE_NAMES)
        self.targets = [label for _ in range(per_class) for label in range(100)]
        offset = np.array([0, 20, 40], np.uint8) + (0 if train else 100)
        self.data = np.stack([np.full((32, 32, 3), label, np.uint8) + offset for label in self.targets])


def test_cifar_fs_combines_parts_grouped_by_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).touch()
    monkeypatch.setattr(cifar_fs, "CIFAR100", FakeCIFAR100)
    calls = []

    def progress(iterable: Iterable, description: str, total: int) -> Iterable:
        calls.append((description, total))
        yield from iterable

    data = load_cifar_fs(tmp_path, image_size=8, progress=progress)
    check_consistent(data, 8)
    assert calls == [("Resizing CIFAR-100", 300)]
    assert data.labels.tolist() == [label for label in range(100) for _ in range(3)]
    # Train part first within a class: values label, label, label + 100.
    assert data.images[:6, 0, 0, 0].tolist() == [0, 0, 100, 1, 1, 101]
    assert data.class_splits is not None
    assert data.class_splits[CIFAR100_FINE_NAMES.index("otter")] == "val"
    assert data.class_groups[CIFAR100_FINE_NAMES.index("otter")] == "aquatic_mammals"
    assert data.images[2, :, 3, 5].tolist() == [100, 120, 140]
    unresized = load_cifar_fs(tmp_path)
    assert unresized.images.shape == (300, 3, 32, 32)
    assert torch.equal(unresized.images[:, :, :8, :8], data.images)


# ---------------------------------------------------------------- MiniImageNet

MINI_SPLITS = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}
PER_CLASS = 4


def make_mini_csv(root: Path) -> None:
    for split, wnids in MINI_SPLITS.items():
        rows = ["filename,label"]
        for wnid in wnids:
            for k in range(PER_CLASS):
                name = f"{wnid}{k:08d}.jpg"
                write_image(root / "images" / name)
                rows.append(f"{name},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")


def make_mini_folders(root: Path) -> None:
    for split, wnids in MINI_SPLITS.items():
        for wnid in wnids:
            for k in range(PER_CLASS):
                write_image(root / split / wnid / f"{wnid}{k:08d}.jpg")


def expected_mini_splits() -> list[str]:
    return [split for split, wnids in MINI_SPLITS.items() for _ in wnids]


def test_mini_imagenet_csv_layout(tmp_path: Path) -> None:
    make_mini_csv(tmp_path)
    data = load_mini_imagenet(tmp_path, image_size=16)
    check_consistent(data, 16)
    assert data.images.shape[0] == 7 * PER_CLASS
    assert data.class_names == data.class_groups == [f"n0{i}" for i in range(1, 8)]
    assert data.class_splits == expected_mini_splits()
    assert torch.bincount(data.labels).tolist() == [PER_CLASS] * 7
    assert sorted(data.sources) == ["test.csv", "train.csv", "val.csv"]
    assert all(len(digest) == 64 for digest in data.sources.values())


def test_mini_imagenet_folder_layout_matches_csv_layout(tmp_path: Path) -> None:
    make_mini_csv(tmp_path / "csv")
    make_mini_folders(tmp_path / "folders")
    from_csv = load_mini_imagenet(tmp_path / "csv", image_size=16)
    from_folders = load_mini_imagenet(tmp_path / "folders", image_size=16)
    check_consistent(from_folders, 16)
    assert from_folders.class_names == from_csv.class_names
    assert from_folders.class_splits == from_csv.class_splits
    assert from_folders.labels.tolist() == from_csv.labels.tolist()
    assert from_folders.sources["train/"] == f"imagefolder:{3 * PER_CLASS} files"


def test_mini_imagenet_csv_missing_image_is_named(tmp_path: Path) -> None:
    make_mini_csv(tmp_path)
    (tmp_path / "images" / "n0500000002.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match=re.escape("n0500000002.jpg")):
        load_mini_imagenet(tmp_path, image_size=16)


def test_mini_imagenet_empty_root_names_both_layouts(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_mini_imagenet(tmp_path)
    message = str(info.value)
    assert "train.csv" in message and "images/*.jpg" in message
    assert "<wnid>/*.jpg" in message and str(tmp_path / "val") in message


def test_mini_imagenet_class_in_two_splits_is_rejected(tmp_path: Path) -> None:
    make_mini_csv(tmp_path)
    with open(tmp_path / "test.csv", "a") as handle:
        handle.write("n0100000000.jpg,n01\n")
    with pytest.raises(DatasetIntegrityError, match="n01"):
        load_mini_imagenet(tmp_path, image_size=16)


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    make_mini_folders(tmp_path)
    bad = tmp_path / "val" / "n04" / "n0400000001.jpg"
    bad.write_bytes(RNG.integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetIntegrityError, match=re.escape("n0400000001.jpg")):
        load_mini_imagenet(tmp_path, image_size=16)


# ---------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = [f"{i:03d}.{chr(ord('A') + i - 1)}" for i in range(1, 9)]  # 001.A .. 008.H


def make_cub(root: Path, per_class: int = 3) -> Path:
    images = root / "CUB_200_2011" / "images"
    for name in reversed(CUB_CLASSES):  # creation order must not matter
        for k in range(per_class):
            write_image(images / name / f"{name}_{k}.jpg", "PNG" if k == 0 else "JPEG")
    return images


def test_cub_index_rule_split(tmp_path: Path) -> None:
    make_cub(tmp_path)
    progressed = []

    def progress(iterable: Iterable, description: str, total: int) -> Iterable:
        progressed.append(total)
        return iterable

    data = load_cub(tmp_path, image_size=16, progress=progress)
    check_consistent(data, 16)
    assert progressed == [24]
    assert data.class_names == data.class_groups == CUB_CLASSES
    assert data.class_splits == ["train", "val", "train", "test", "train", "val", "train", "test"]
    assert torch.bincount(data.labels).tolist() == [3] * 8


def test_cub_split_rule_on_200_classes_is_100_50_50() -> None:
    names = [f"{i:03d}.Bird_{i}" for i in range(200, 0, -1)]
    splits = dict(zip(names, cub_class_splits(names), strict=True))
    assert [list(splits.values()).count(s) for s in ("train", "val", "test")] == [100, 50, 50]
    assert (splits["001.Bird_1"], splits["002.Bird_2"], splits["004.Bird_4"]) == ("train", "val", "test")


def test_cub_images_folder_directly_under_root(tmp_path: Path) -> None:
    make_cub(tmp_path / "x")
    (tmp_path / "x" / "CUB_200_2011" / "images").rename(tmp_path / "images")
    assert load_cub(tmp_path, image_size=8).class_names == CUB_CLASSES


def test_cub_split_files_override(tmp_path: Path) -> None:
    make_cub(tmp_path)
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text("005.E\n006.F\n007.G\n008.H\n")
    (splits / "val.txt").write_text("001.A\n\n002.B\n")
    (splits / "test.txt").write_text("003.C\n004.D\n")
    data = load_cub(tmp_path, image_size=8)
    assert data.class_splits == ["val", "val", "test", "test", "train", "train", "train", "train"]
    assert "splits/train.txt" in data.sources


def test_cub_split_file_naming_unknown_class(tmp_path: Path) -> None:
    make_cub(tmp_path)
    (tmp_path / "splits").mkdir()
    for split in ("train", "val", "test"):
        (tmp_path / "splits" / f"{split}.txt").write_text("001.A\n" if split == "train" else "")
    (tmp_path / "splits" / "test.txt").write_text("999.Missing\n")
    with pytest.raises(DatasetNotFoundError, match=re.escape("999.Missing")):
        load_cub(tmp_path, image_size=8)


def test_cub_missing_says_where(tmp_path: Path) -> None:
    (tmp_path / "CUB_200_2011" / "images").mkdir(parents=True)  # no class folders
    with pytest.raises(DatasetNotFoundError) as info:
        load_cub(tmp_path)
    assert str(tmp_path / "CUB_200_2011" / "images") in str(info.value)


def test_cub_corrupt_image_is_named(tmp_path: Path) -> None:
    images = make_cub(tmp_path)
    (images / "003.C" / "broken.jpg").write_bytes(b"\x00garbage" * 20)
    with pytest.raises(DatasetIntegrityError, match=re.escape("broken.jpg")):
        load_cub(tmp_path, image_size=8)
