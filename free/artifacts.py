"""Writing stage outputs safely: atomic files, self-describing checkpoints, "done" markers.

Edge code shared by the stages (``free/stages/``): the algorithm modules never touch the disk.

* Every file is written to a temporary name and renamed, so a killed stage never leaves a
  half-written artifact where a finished one is expected.
* Checkpoints are safetensors (no pickles) with their JSON description in the header metadata.
* A stage records a fingerprint of its inputs (its config section and its input files' hashes) in
  ``<out>/.done.json`` when it finishes; rerun with the same fingerprint, it does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from free.data.base import sha256_file

DONE_FILE = ".done.json"


def write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> str:
    """Save ``tensors`` (+ JSON ``meta`` in the header) atomically; return the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(_unshared(tensors), str(tmp), metadata={"meta": json.dumps(meta or {})})
    os.replace(tmp, path)
    return sha256_file(path)


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies where needed; safetensors refuses two names for one storage, which
    happens when a state holds the same weights twice (e.g. current and best parameters)."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        result[name] = tensor
    return result


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a file written by :func:`save_tensors` (never unpickles anything)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return tensors, meta


def fingerprint(settings: Any, inputs: Iterable[Path] = ()) -> str:
    """sha256 over a JSON-able ``settings`` object and the content hashes of ``inputs`` (sorted)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in sorted(Path(p) for p in inputs):
        h.update(f"{path.name}:{sha256_file(path)}".encode())
    return h.hexdigest()


def is_done(out_dir: Path, fp: str) -> bool:
    marker = Path(out_dir) / DONE_FILE
    return marker.is_file() and read_json(marker).get("fingerprint") == fp


def mark_done(out_dir: Path, fp: str, **summary: Any) -> None:
    write_json(Path(out_dir) / DONE_FILE, {"fingerprint": fp, **summary})


def clear_done(out_dir: Path) -> None:
    (Path(out_dir) / DONE_FILE).unlink(missing_ok=True)


def resolve_device(name: str) -> torch.device:
    """The configured device, with a clear error when it is not available here."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available on this machine; use device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device={name!r} but MPS is not available on this machine; use device=cpu")
    return device


def set_threads(threads: int | None) -> None:
    """Use ``threads`` intra-op threads (``None`` keeps torch's default, one per core)."""
    if threads is not None:
        torch.set_num_threads(threads)
