"""Class splits (meta-train / meta-val / meta-test) and the per-split image container.

Splits are over *classes*, never images: a class (and, with rotation augmentation, all four of its
rotations) belongs to exactly one split, so no meta-test class can reach training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from free.data.base import SPLITS, RawDataset


@dataclass
class FewShotSplit:
    """The images of one split, grouped by class.

    Attributes:
        name: ``"train"``, ``"val"`` or ``"test"``.
        images: ``(N, C, H, W)`` uint8.
        labels: ``(N,)`` int64, split-local class index in ``0 .. n_classes-1``.
        class_names: global identifier of each split-local class (e.g. ``"Greek/character01/rot90"``).
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> torch.Tensor:
        """``(n_classes,)`` number of images of each class."""
        return torch.bincount(self.labels, minlength=self.n_classes)

    def sample_episode(self, n_way: int = 5, k_shot: int = 1, q_query: int = 15, seed: int = 0):
        """One N-way K-shot episode (no batch dimension); see :class:`free.data.episodes.EpisodeSampler`."""
        from free.data.episodes import EpisodeSampler

        return EpisodeSampler(self, n_way, k_shot, q_query, seed=seed).sample(1)[0]


def assign_splits(class_groups: list[str], train: float, val: float, seed: int) -> list[str]:
    """Draw a class split, stratified by group (alphabet), reproducible from ``seed``.

    Each class gets a position ``(rank + u) / n_group`` within its shuffled group (``u`` uniform in
    [0, 1)); sorting all classes by position interleaves the groups evenly, and the first
    ``round(train * n)`` classes go to train, the next ``round(val * n)`` to val, the rest to test.
    So every alphabet is spread over the splits in proportion to its size, and totals are exact.

    Returns:
        One of ``"train"|"val"|"test"`` per class, in the order of ``class_groups``.
    """
    n = len(class_groups)
    gen = torch.Generator().manual_seed(seed)
    position = torch.empty(n, dtype=torch.float64)
    for group in sorted(set(class_groups)):
        members = [i for i, g in enumerate(class_groups) if g == group]
        order = torch.randperm(len(members), generator=gen)
        jitter = torch.rand(len(members), generator=gen, dtype=torch.float64)
        for rank, (member, u) in enumerate(zip((members[j] for j in order), jitter, strict=True)):
            position[member] = (rank + u) / len(members)
    ranked = torch.argsort(position).tolist()
    n_train, n_val = round(train * n), round(val * n)
    if n_train < 1 or n_val < 1 or n_train + n_val >= n:
        raise ValueError(f"split fractions train={train} val={val} leave an empty split for {n} classes")
    splits = ["test"] * n
    for i in ranked[:n_train]:
        splits[i] = "train"
    for i in ranked[n_train : n_train + n_val]:
        splits[i] = "val"
    return splits


def build_splits(
    raw: RawDataset, train: float = 0.62, val: float = 0.165, seed: int = 0, rotations: bool = False
) -> dict[str, FewShotSplit]:
    """Split a data set by class and optionally add rotated copies as new classes.

    Args:
        raw: the decoded data set. Its standard split is used when it has one.
        train, val: class fractions when it has none (test gets the rest); see :func:`assign_splits`.
        seed: seed of that split.
        rotations: add 90/180/270-degree rotations of each class as three new classes of the same
            split (the standard Omniglot augmentation, x4 classes).

    Returns:
        ``{"train": FewShotSplit, "val": ..., "test": ...}``.
    """
    class_splits = raw.class_splits or assign_splits(raw.class_groups, train, val, seed)
    result = {}
    for split in SPLITS:
        members = [c for c, s in enumerate(class_splits) if s == split]
        images, labels, names = [], [], []
        for quarter_turns in range(4 if rotations else 1):
            for c in members:
                class_images = raw.images[raw.labels == c]  # (n_c, C, H, W)
                if quarter_turns:
                    class_images = torch.rot90(class_images, k=quarter_turns, dims=(2, 3))
                images.append(class_images)
                labels.append(torch.full((len(class_images),), len(names), dtype=torch.int64))
                suffix = f"/rot{90 * quarter_turns}" if quarter_turns else ""
                names.append(raw.class_names[c] + suffix)
        if not names:
            raise ValueError(f"split {split!r} has no classes")
        result[split] = FewShotSplit(split, torch.cat(images), torch.cat(labels), names)
    return result


def split_summary(splits: dict[str, FewShotSplit]) -> list[dict[str, object]]:
    """Rows for ``free data info``: classes, images and images per class of each split."""
    rows = []
    for name, split in splits.items():
        counts = split.class_counts()
        rows.append(
            {
                "split": name,
                "classes": split.n_classes,
                "images": int(split.labels.numel()),
                "images_per_class": f"{int(counts.min())}"
                if counts.min() == counts.max()
                else f"{int(counts.min())}-{int(counts.max())}",
                "image_shape": list(split.images.shape[1:]),
            }
        )
    return rows


def split_manifest(raw: RawDataset, splits: dict[str, FewShotSplit], settings: dict[str, object]) -> dict[str, object]:
    """The versioned record of a split: which classes are in which split, and where the data came from.

    Later stages read class lists from it, and a change of split changes its hash (DVC dependency).
    """
    return {
        "settings": settings,
        "sources": raw.sources,
        "split": "standard" if raw.class_splits else "seeded, stratified by group",
        "counts": {row["split"]: {"classes": row["classes"], "images": row["images"]} for row in split_summary(splits)},
        "classes": {name: split.class_names for name, split in splits.items()},
    }
