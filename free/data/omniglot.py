"""Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015): handwritten characters of 50 alphabets.

Sources, all read by the same code:

* the full set, ``images_background.zip`` + ``images_evaluation.zip`` (1623 characters), as
  torchvision's :class:`~torchvision.datasets.Omniglot` downloads them into ``<root>/omniglot-py/``
  when ``download=True`` (online) - we let torchvision download and verify, then read the archives;
* the "minimal" background sets ``images_background_small1.zip`` / ``..._small2.zip`` (242 distinct
  characters; Greek and Latin appear in both), shipped with the project in ``data/omniglot/`` (the default root);
* any of these archives already extracted into a folder of the same name.

Archives with a known name are checked against a ``SHA256SUMS`` file next to them, else against
built-in digests (sha256 for the small sets, torchvision's md5 for the full set). A character is
identified by ``<alphabet>/<character>``; the first source that has it wins, so duplicates across
archives are read once. Images keep their files' polarity: dark ink on a white background.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from free.data.base import DatasetIntegrityError, DatasetNotFoundError, Progress, RawDataset, sha256_file
from free.data.images import decode_image

# Full set first: when present it is the superset, and dedup keeps the first source.
ARCHIVES = ("images_background", "images_evaluation", "images_background_small1", "images_background_small2")
KNOWN_SHA256 = {
    "images_background_small1.zip": "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    "images_background_small2.zip": "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
}
# Where torchvision.datasets.Omniglot keeps its downloads, relative to the root it is given.
TORCHVISION_FOLDER = "omniglot-py"


def load_omniglot(
    root: Path, image_size: int = 28, download: bool = False, progress: Progress | None = None
) -> RawDataset:
    """Read every Omniglot character found under ``root`` (or download the full set first).

    Args:
        root: folder holding the archives, directly or in ``omniglot-py/``.
        image_size: side of the square output images (105 px originals, Lanczos-resized).
        download: fetch ``images_background``/``images_evaluation`` with torchvision if absent.
        progress: optional ``progress(iterable, description, total)`` wrapper for a progress bar.

    Returns:
        A :class:`RawDataset` with 1-channel images, classes ``<alphabet>/<character>`` grouped by
        alphabet, no standard split, and ``sources`` mapping each archive to its sha256.

    Raises:
        DatasetNotFoundError: no archive or folder under ``root`` (message says what to put where).
        DatasetIntegrityError: an archive's checksum does not match.
    """
    root = Path(root)
    if download:
        _download_full_set(root)
    sources = _find_sources(root)
    if not sources:
        raise DatasetNotFoundError(
            f"Omniglot not found under {root}. Offline: put the archives there (or in {root}/{TORCHVISION_FOLDER}): "
            "images_background.zip + images_evaluation.zip (full set, 1623 characters) or "
            "images_background_small1.zip + images_background_small2.zip (242 characters), zipped or extracted; "
            "or point dataset.root / FREE_DATA_DIR at the folder that holds them. "
            "Online: set dataset.download=true to fetch the full set with torchvision."
        )
    provenance = {path.name: _verify(path) for path in sources}

    files: dict[str, list[tuple[Path, str]]] = {}  # "<alphabet>/<character>" -> [(source, member)]
    for path in sources:
        for key, member in _list_images(path):
            files.setdefault(key, [])
            owner = files[key][0][0] if files[key] else path
            if owner == path:  # keep the first source's copy of a character, skip duplicates
                files[key].append((path, member))
    class_names = sorted(files)
    total = sum(len(members) for members in files.values())

    images: list[torch.Tensor] = []
    labels: list[int] = []
    items = ((label, src, member) for label, name in enumerate(class_names) for src, member in sorted(files[name]))
    if progress is not None:
        items = progress(items, f"decoding Omniglot ({len(class_names)} characters)", total)
    with _Readers() as readers:
        for label, src, member in items:
            images.append(decode_image(readers.read(src, member), image_size, channels=1))
            labels.append(label)
    return RawDataset(
        images=torch.stack(images),
        labels=torch.tensor(labels, dtype=torch.int64),
        class_names=class_names,
        class_groups=[name.split("/")[0] for name in class_names],
        class_splits=None,
        sources=provenance,
    )


def _download_full_set(root: Path) -> None:
    from torchvision.datasets import Omniglot  # torchvision verifies the md5 of what it fetches

    for background in (True, False):
        try:
            Omniglot(str(root), background=background, download=True)
        except Exception as err:  # network errors come in many types; the message is what matters
            raise DatasetNotFoundError(
                f"downloading Omniglot into {root / TORCHVISION_FOLDER} failed ({err}); offline, place the "
                "archives there yourself and set dataset.download=false"
            ) from err


def _find_sources(root: Path) -> list[Path]:
    found = []
    for stem in ARCHIVES:
        for folder in (root, root / TORCHVISION_FOLDER):
            zipped, extracted = folder / f"{stem}.zip", folder / stem
            if zipped.is_file():
                found.append(zipped)
                break
            if extracted.is_dir():
                found.append(extracted)
                break
    return found


def _verify(path: Path) -> str:
    """Return the sha256 of an archive after checking it; ``"directory"`` for extracted folders."""
    if path.is_dir():
        return "directory"
    digest = sha256_file(path)
    expected = _listed_sha256(path) or KNOWN_SHA256.get(path.name)
    if expected is not None and digest != expected:
        raise DatasetIntegrityError(f"{path}: sha256 {digest} does not match the expected {expected}")
    if expected is None:
        md5 = _torchvision_md5(path.stem)
        if md5 is not None and hashlib.md5(path.read_bytes()).hexdigest() != md5:
            raise DatasetIntegrityError(f"{path}: md5 does not match torchvision's {md5}")
    return digest


def _listed_sha256(path: Path) -> str | None:
    sums = path.parent / "SHA256SUMS"
    if not sums.is_file():
        return None
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == path.name:
            return parts[0].lower()
    return None


def _torchvision_md5(stem: str) -> str | None:
    from torchvision.datasets import Omniglot

    return getattr(Omniglot, "zips_md5", {}).get(stem)


def _list_images(source: Path) -> Iterator[tuple[str, str]]:
    """Yield ``("<alphabet>/<character>", member)`` for each PNG of an archive or folder."""
    if source.is_dir():
        members = [p.relative_to(source.parent).as_posix() for p in source.rglob("*.png")]
    else:
        with zipfile.ZipFile(source) as zf:
            members = [n for n in zf.namelist() if n.endswith(".png")]
    for member in members:
        parts = member.split("/")  # <archive stem>/<alphabet>/<character>/<file>.png
        if len(parts) != 4:
            raise DatasetIntegrityError(f"{source}: unexpected layout {member!r}, want <set>/<alphabet>/<char>/<x>.png")
        yield f"{parts[1]}/{parts[2]}", member


class _Readers:
    """Keeps each archive open while decoding, instead of reopening it per image."""

    def __init__(self) -> None:
        self._zips: dict[Path, zipfile.ZipFile] = {}

    def read(self, source: Path, member: str) -> bytes:
        if source.is_dir():
            return (source.parent / member).read_bytes()
        if source not in self._zips:
            self._zips[source] = zipfile.ZipFile(source)
        return self._zips[source].read(member)

    def __enter__(self) -> _Readers:
        return self

    def __exit__(self, *exc: object) -> None:
        for zf in self._zips.values():
            zf.close()
