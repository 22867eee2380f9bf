"""Stage ``data``: decode the data set into the tensor cache and write the class-split manifest.

Both the manifest and the cache are written atomically; before decoding, the stage checks that both
folders take a write (a full disk fails in seconds, naming the folder) and removes the temporary
files a killed run left there, so a ``kill -9`` at any point and a rerun give the same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from free.artifacts import check_writable, remove_stale_tmp, write_json
from free.config.schema import Config, dataset_settings
from free.data import build_splits, load_dataset, split_manifest
from free.data.base import Progress


def run(cfg: Config, force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Decode (or reuse the cache) and write ``<artifacts>/data/splits.json``; return a summary.

    The manifest lists the classes of each split and the sources' hashes: the versioned input of
    every later stage. It holds no machine paths, so it is identical on every machine.
    """
    ds = cfg.dataset
    manifest = Path(cfg.paths.artifacts_dir) / "data" / "splits.json"
    outputs = ((manifest.parent, "paths.artifacts_dir"), (cfg.paths.cache_dir, "FREE_CACHE_DIR (paths.cache_dir)"))
    for folder, setting in outputs:
        check_writable(Path(folder), setting)
        remove_stale_tmp(Path(folder))
    raw, cache_file, from_cache = load_dataset(ds, cfg.paths.cache_dir, rebuild=force, progress=progress)
    splits = build_splits(raw, ds.split.train, ds.split.val, ds.split_seed, ds.rotations)
    settings = dataset_settings(ds)
    write_json(manifest, split_manifest(raw, splits, settings))
    return {
        "dataset": ds.name,
        "classes": len(raw.class_names),
        "images": len(raw.labels),
        "from_cache": from_cache,
        "cache": str(cache_file),
        "manifest": str(manifest),
        "split_classes": {name: split.n_classes for name, split in splits.items()},
    }
