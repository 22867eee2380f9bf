"""Decode once, reuse: a data set's decoded images as one safetensors file.

The file holds ``images`` (uint8) and ``labels`` plus JSON metadata (class names, groups, standard
split, sources with their hashes). Its name is derived from everything that changes the decoded
tensors (data set, resolved root, image size, loader version). It is written atomically, and a
cache that cannot be read is rebuilt from the source files - it is derived data, nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from free.data.base import RawDataset

CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused
CACHE_SETTING = "FREE_CACHE_DIR (paths.cache_dir)"  # what chooses the cache folder, named in a write error


def cache_path(cache_dir: Path, name: str, root: Path, image_size: int) -> Path:
    """Path of the cache file of one decoded data set."""
    identity = json.dumps(
        {"name": name, "root": str(Path(root).resolve()), "image_size": image_size, "version": CACHE_VERSION},
        sort_keys=True,
    )
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{name}-{image_size}px-{key}.safetensors"


def save(raw: RawDataset, path: Path) -> None:
    """Write ``raw`` to ``path`` atomically (temp file + rename).

    Serialised in memory (for a moment the tensors twice: 1.3 GB more for MiniImageNet at 84 px),
    then written by :func:`free.artifacts.write_atomic`: safetensors' own file writer reports a full
    disk as a ``SafetensorError`` without errno, and would leave its half-written file behind.

    Raises:
        StorageError: the write failed (disk full, read-only, ...), naming the file and the fix;
            ``path`` is unchanged and no temporary file is left.
    """
    from free.artifacts import write_atomic  # not at the top: free.artifacts imports free.data

    meta = {
        "class_names": raw.class_names,
        "class_groups": raw.class_groups,
        "class_splits": raw.class_splits,
        "sources": raw.sources,
        "version": CACHE_VERSION,
    }
    data = save_bytes({"images": raw.images.contiguous(), "labels": raw.labels}, metadata={"meta": json.dumps(meta)})
    write_atomic(path, data, setting=CACHE_SETTING)


def load(path: Path) -> RawDataset | None:
    """Read a cache file; ``None`` if it is missing, unreadable or from another loader version."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["meta"])
        tensors = load_file(str(path))
        if meta.get("version") != CACHE_VERSION:
            return None
        return RawDataset(
            images=tensors["images"],
            labels=tensors["labels"],
            class_names=meta["class_names"],
            class_groups=meta["class_groups"],
            class_splits=meta["class_splits"],
            sources=meta["sources"],
        )
    except (SafetensorError, OSError, KeyError, ValueError):
        return None
