"""Writing stage outputs safely: atomic files, self-describing checkpoints, "done" markers.

Edge code shared by the stages (``free/stages/``): the algorithm modules never touch the disk.

* Every file is written to a temporary name and renamed, so a killed stage never leaves a
  half-written artifact where a finished one is expected; the temporary files a killed writer
  leaves behind are removed when the stage runs again (:func:`remove_stale_tmp`), so they never
  end up in an output folder that DVC hashes.
* A stage checks that its output folders take a write before it computes anything
  (:func:`check_writable`), and a write that fails (disk full, read-only, no permission) raises a
  :class:`StorageError` naming the file, the cause and the fix; the file it was replacing, and
  everything written before, stay as they were, so a rerun after freeing space resumes.
* Checkpoints are safetensors (no pickles) with their JSON description in the header metadata.
* A stage records a fingerprint of its inputs (its config section and its input files' hashes) in
  ``<out>/.done.json`` when it finishes; rerun with the same fingerprint, it does nothing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from free.data.base import sha256_file

DONE_FILE = ".done.json"


#: A temporary file of :func:`write_atomic`: ``.<name>.tmp<pid>`` (older tensor caches wrote ``<stem>.tmp<pid>``).
_TMP_NAME = re.compile(r"\.tmp(\d+)$")

#: Causes of a failed write that the user fixes on the machine, not in the configuration.
_FIXES = {
    errno.ENOSPC: "free space on that disk, or point {setting} at a disk with room",
    errno.EDQUOT: "free space within your disk quota, or point {setting} at a disk with room",
    errno.EFBIG: "the file system refuses a file this large: point {setting} at another disk",
    errno.EROFS: "the file system is mounted read-only: remount it read-write, or point {setting} at a writable folder",
    errno.EACCES: "no permission to write there: fix the folder's owner or mode, or point {setting} elsewhere",
    errno.EPERM: "no permission to write there: fix the folder's owner or mode, or point {setting} elsewhere",
    errno.ENOTDIR: "a file stands where a folder is needed: move it away, or point {setting} elsewhere",
}


class StorageError(OSError):
    """A stage could not write its outputs; the message names the file or folder, the cause and the fix.

    An ``OSError`` (with the cause's ``errno`` and the ``filename``) that prints as its message alone.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


def storage_error(
    path: Path, err: OSError, setting: str = "paths.artifacts_dir", before_work: bool = False
) -> StorageError:
    """A :class:`StorageError` for ``err``, raised while writing ``path``.

    Args:
        path: the file (or, for a probe, the folder) that could not be written.
        err: the operating system's error.
        setting: the configuration key (or variable) that chooses the folder, named in the fix.
        before_work: the failure came from :func:`check_writable`: nothing was computed yet.
    """
    if isinstance(err, StorageError):
        return err
    cause = err.strerror or str(err)
    code = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    fix = _FIXES.get(err.errno, "make the folder writable, or point {setting} at a writable folder")
    if before_work:
        what = f"output folder {path} is not writable (checked before any work started)"
        then = "then rerun the same command"
    else:
        what = f"cannot write {path}"
        then = (
            "then rerun the same command: what was finished before (written files, the last checkpoint) "
            "is kept and the stage resumes from it"
        )
    error = StorageError(f"{what}: {cause}{f' ({code})' if code else ''}. Fix: {fix.format(setting=setting)}; {then}")
    error.errno, error.filename = err.errno, str(path)
    return error


def check_writable(directory: Path, setting: str = "paths.artifacts_dir") -> None:
    """Create ``directory`` if needed and write, sync and remove a small probe file in it.

    Stages call this before computing anything, so a full disk or a read-only folder fails in
    seconds with :class:`StorageError` rather than after hours of work.
    """
    directory = Path(directory)
    probe = directory / f".write-probe.tmp{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(4096))  # a block's worth: creating an empty file succeeds on a full disk
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        _discard(probe)
        raise storage_error(directory, err, setting, before_work=True) from err


def remove_stale_tmp(directory: Path) -> list[Path]:
    """Delete the temporary files that killed writers left under ``directory``; return them.

    A file ``….tmp<pid>`` of a process that still runs (another writer) is left alone.
    """
    directory, removed = Path(directory), []
    if not directory.is_dir():
        return removed
    for path in directory.rglob("*.tmp*"):
        match = _TMP_NAME.search(path.name)
        if match and path.is_file() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has nothing in flight when a stage starts
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _discard(path: Path) -> None:
    """Remove a temporary file after a failed write (it may hold the last free blocks of the disk)."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def write_atomic(path: Path, data: bytes, setting: str = "paths.artifacts_dir") -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    ``setting``: the configuration key that chooses the folder, named in the error's fix.

    Raises:
        StorageError: the write failed (disk full, read-only, ...); ``path`` is unchanged.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        raise storage_error(path, err, setting) from err


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> str:
    """Save ``tensors`` (+ JSON ``meta`` in the header) atomically; return the file's sha256.

    Serialised in memory, then written by :func:`write_atomic`: safetensors' own file writer reports
    a full disk as a ``SafetensorError`` without errno, which could not be told from a bad tensor.
    """
    data = save(_unshared(tensors), metadata={"meta": json.dumps(meta or {})})
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


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
