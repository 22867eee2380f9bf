"""Few-shot data: real images of disjoint meta-train / meta-val / meta-test classes.

Quick use (composes ``params/`` with defaults, i.e. offline Omniglot)::

    from free.data import load_split
    episode = load_split("test").sample_episode(n_way=5, k_shot=1)   # one 5-way 1-shot episode

Pipeline code passes a typed :class:`~free.config.schema.DatasetConfig` to :func:`load_splits`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from free.config.schema import DatasetConfig
    from free.data.base import Progress, RawDataset
    from free.data.splits import FewShotSplit

DATASET_NAMES = ("omniglot", "cifar_fs", "mini_imagenet", "cub")
NATIVE_CHANNELS = {"omniglot": 1, "cifar_fs": 3, "mini_imagenet": 3, "cub": 3}

# The names below live in submodules that import torch. They are imported on first use (PEP 562), so
# that `free.config` (which validates against DATASET_NAMES) and the flow-run process that only
# composes and validates a config do not pay torch's ~2 s import; `from free.data import X` is unchanged.
_LAZY = {
    "cache": "free.data.cache",
    "SPLITS": "free.data.base",
    "DatasetIntegrityError": "free.data.base",
    "DatasetNotFoundError": "free.data.base",
    "Progress": "free.data.base",
    "RawDataset": "free.data.base",
    "Episode": "free.data.episodes",
    "EpisodeSampler": "free.data.episodes",
    "FewShotSplit": "free.data.splits",
    "assign_splits": "free.data.splits",
    "build_splits": "free.data.splits",
    "split_manifest": "free.data.splits",
    "split_summary": "free.data.splits",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'free.data' has no attribute {name!r}")
    value = importlib.import_module(module) if name == "cache" else getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def read_dataset(cfg: DatasetConfig, progress: Progress | None = None) -> RawDataset:
    """Decode a data set from its source files (no cache). Loaders are imported on demand."""
    root = Path(cfg.root)
    if cfg.name == "omniglot":
        from free.data.omniglot import load_omniglot

        return load_omniglot(root, cfg.image_size, download=cfg.download, progress=progress)
    if cfg.name == "cifar_fs":
        from free.data.cifar_fs import load_cifar_fs

        return load_cifar_fs(root, cfg.image_size, download=cfg.download, progress=progress)
    if cfg.name == "mini_imagenet":
        from free.data.mini_imagenet import load_mini_imagenet

        return load_mini_imagenet(root, cfg.image_size, progress=progress)
    if cfg.name == "cub":
        from free.data.cub import load_cub

        return load_cub(root, cfg.image_size, progress=progress)
    raise ValueError(f"dataset.name: unknown data set {cfg.name!r}; choose one of: {', '.join(DATASET_NAMES)}")


def load_dataset(
    cfg: DatasetConfig, cache_dir: str | Path, rebuild: bool = False, progress: Progress | None = None
) -> tuple[RawDataset, Path, bool]:
    """Decoded data set, from the tensor cache when possible.

    Returns:
        ``(raw, cache_file, from_cache)``.
    """
    from free.data import cache

    path = cache.cache_path(Path(cache_dir), cfg.name, Path(cfg.root), cfg.image_size)
    raw = None if rebuild else cache.load(path)
    if raw is not None:
        return raw, path, True
    raw = read_dataset(cfg, progress=progress)
    cache.save(raw, path)
    return raw, path, False


def load_splits(cfg: DatasetConfig, cache_dir: str | Path, progress: Progress | None = None) -> dict[str, FewShotSplit]:
    """The three class-disjoint splits of the configured data set."""
    from free.data.splits import build_splits

    raw, _, _ = load_dataset(cfg, cache_dir, progress=progress)
    return build_splits(raw, cfg.split.train, cfg.split.val, cfg.split_seed, cfg.rotations)


def load_split(split: str = "test", overrides: Sequence[str] = ()) -> FewShotSplit:
    """One split of the data set that ``params/`` (with Hydra ``overrides``) configures."""
    from free.data.base import SPLITS

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from free.config import compose

    cfg = compose(overrides)
    return load_splits(cfg.dataset, cfg.paths.cache_dir)[split]


__all__ = [
    "DATASET_NAMES",
    "NATIVE_CHANNELS",
    "SPLITS",
    "DatasetIntegrityError",
    "DatasetNotFoundError",
    "Episode",
    "EpisodeSampler",
    "FewShotSplit",
    "RawDataset",
    "assign_splits",
    "build_splits",
    "load_dataset",
    "load_split",
    "load_splits",
    "read_dataset",
    "split_manifest",
    "split_summary",
]
