"""Class splits: exact, seeded, stratified, disjoint; rotations stay inside their split."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from free.data import RawDataset, assign_splits, build_splits


def toy_raw(groups: dict[str, int], per_class: int = 3, class_splits: list[str] | None = None) -> RawDataset:
    names, group_of = [], []
    for group, n in groups.items():
        for c in range(n):
            names.append(f"{group}/c{c}")
            group_of.append(group)
    labels = torch.arange(len(names)).repeat_interleave(per_class)
    # Each image encodes its class and index so tests can trace it: pixel [0, 0, 0] = class id.
    images = torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    images[:, 0, 0, 1] = torch.arange(len(labels)).to(torch.uint8) % per_class
    return RawDataset(images, labels, names, group_of, class_splits)


def test_assign_splits_exact_totals_and_disjoint() -> None:
    groups = [g for g, n in {"A": 40, "B": 60, "C": 30, "D": 112}.items() for _ in range(n)]
    splits = assign_splits(groups, 0.62, 0.165, seed=0)
    assert Counter(splits) == {"train": 150, "val": 40, "test": 52}


def test_assign_splits_is_stratified_by_group() -> None:
    sizes = {"A": 40, "B": 60, "C": 30, "D": 112}
    groups = [g for g, n in sizes.items() for _ in range(n)]
    splits = assign_splits(groups, 0.62, 0.165, seed=3)
    for group, n in sizes.items():
        got = Counter(s for g, s in zip(groups, splits, strict=True) if g == group)
        # Proportional to the group's size up to rounding at the split boundaries.
        assert abs(got["train"] - 0.62 * n) <= 2, (group, got)
        assert abs(got["val"] - 0.165 * n) <= 2, (group, got)


def test_assign_splits_seeded() -> None:
    groups = [g for g in "ABCD" for _ in range(25)]
    assert assign_splits(groups, 0.6, 0.2, seed=1) == assign_splits(groups, 0.6, 0.2, seed=1)
    assert assign_splits(groups, 0.6, 0.2, seed=1) != assign_splits(groups, 0.6, 0.2, seed=2)


def test_assign_splits_rejects_empty_split() -> None:
    with pytest.raises(ValueError, match="empty split"):
        assign_splits(["A"] * 4, 0.9, 0.05, seed=0)


def test_build_splits_partitions_classes_and_images() -> None:
    raw = toy_raw({"A": 10, "B": 10})
    splits = build_splits(raw, 0.6, 0.2, seed=0)
    names = [set(splits[s].class_names) for s in ("train", "val", "test")]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert set().union(*names) == set(raw.class_names)
    for split in splits.values():
        for local, name in enumerate(split.class_names):
            # Every image labelled with a split-local class is an image of that original class.
            original = raw.class_names.index(name)
            assert torch.all(split.images[split.labels == local][:, 0, 0, 0] == original)


def test_standard_split_is_used_as_given() -> None:
    raw = toy_raw({"A": 4}, class_splits=["train", "val", "test", "train"])
    splits = build_splits(raw, 0.5, 0.25, seed=99)
    assert splits["train"].class_names == ["A/c0", "A/c3"]
    assert splits["val"].class_names == ["A/c1"] and splits["test"].class_names == ["A/c2"]


def test_rotations_make_new_classes_within_the_same_split() -> None:
    raw = toy_raw({"A": 10})
    plain = build_splits(raw, 0.6, 0.2, seed=0)
    rotated = build_splits(raw, 0.6, 0.2, seed=0, rotations=True)
    for s in ("train", "val", "test"):
        base = plain[s].class_names
        assert rotated[s].n_classes == 4 * len(base)
        assert {name.split("/rot")[0] for name in rotated[s].class_names} == set(base)
        local = rotated[s].class_names.index(base[0] + "/rot90")
        expected = torch.rot90(plain[s].images[plain[s].labels == 0], k=1, dims=(2, 3))
        assert torch.equal(rotated[s].images[rotated[s].labels == local], expected)
