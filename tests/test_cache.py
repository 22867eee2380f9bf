"""The decoded-tensor cache: reused when valid, rebuilt when corrupt, keyed by what changes the tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from free.config import compose
from free.data import load_dataset
from free.data.cache import cache_path


def test_decode_once_then_reuse(fake_omniglot: Path, tmp_path: Path) -> None:
    ds = compose([f"dataset.root={fake_omniglot}"]).dataset
    first, path, from_cache = load_dataset(ds, tmp_path)
    assert not from_cache and path.is_file()
    calls = []
    second, _, from_cache = load_dataset(ds, tmp_path, progress=lambda it, d, t: calls.append(d) or it)
    assert from_cache and calls == []  # nothing decoded the second time
    assert torch.equal(first.images, second.images) and first.class_names == second.class_names
    assert second.sources == first.sources


def test_corrupt_cache_is_rebuilt(fake_omniglot: Path, tmp_path: Path) -> None:
    ds = compose([f"dataset.root={fake_omniglot}"]).dataset
    first, path, _ = load_dataset(ds, tmp_path)
    path.write_bytes(b"not a safetensors file")
    again, _, from_cache = load_dataset(ds, tmp_path)
    assert not from_cache and torch.equal(again.images, first.images)


def test_key_depends_on_size_and_root(tmp_path: Path) -> None:
    a = cache_path(tmp_path, "omniglot", Path("/data/a"), 28)
    assert a != cache_path(tmp_path, "omniglot", Path("/data/a"), 32)
    assert a != cache_path(tmp_path, "omniglot", Path("/data/b"), 28)
    assert a == cache_path(tmp_path, "omniglot", Path("/data/a"), 28)
