"""Pseudo-task cache: a memory bank of recovered images and the pseudo-task sampler.

Recovered images are kept **per teacher and per class of that teacher** in a bounded ring buffer of
``slots`` slots, each holding ``images_per_slot`` images: one slot per recovered batch, the oldest
slot overwritten once the buffer is full. Every teacher keeps its own buffers, so the bank always
holds samples of all teachers seen so far (the official code kept only the last teacher's).

Pseudo tasks are N-way K-shot Q-query :class:`~free.data.episodes.Episode` objects (relabelled
``0..N-1``, class-major), so the meta-learner consumes real episodes and pseudo tasks alike. Each
task also says, per label, which teacher and which of that teacher's classes it came from, so the
meta-learner can distill from the teacher's logits.

Images are stored as uint8 (quantised from float [0, 1]) to keep the bank small, and a class's
buffer is allocated as it fills (grown by doubling, up to the ring), not as the whole ring up front.
The bank is an artifact written as one safetensors shard per teacher plus a ``manifest.json`` with
their sha256; saving again into the same folder (a checkpoint) rewrites only the shards of teachers
that changed since, and saving into a new folder can hard-link the unchanged shards of an earlier one
(how a checkpoint keeps its previous bank intact until the new one is complete).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from free.artifacts import load_tensors, read_json, save_tensors, write_json
from free.data.base import sha256_file
from free.data.episodes import Episode

MANIFEST = "manifest.json"
# 1: one (n_classes, slots, images_per_slot, C, H, W) tensor per shard, empty slots zero-filled.
# 2: one (filled slots, images_per_slot, C, H, W) tensor per non-empty class, ``images/<class>``.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # format 1 is still read: a checkpoint written before the change resumes


def shard_name(teacher_id: int) -> str:
    return f"bank_{teacher_id:03d}.safetensors"


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 (the bank's storage format)."""
    return (x.detach() * 255).round().clamp(0, 255).to(torch.uint8)


def dequantise(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    return x.float().div_(255)


@dataclass
class PseudoTask:
    """One pseudo task sampled from the bank.

    Attributes:
        episode: the task as an :class:`Episode` (support ``(N*K, C, H, W)``, query ``(N*Q, C, H, W)``,
            float in [0, 1], labels ``0..N-1`` class-major). ``episode.classes`` holds the teacher-local
            class index of each label (the same as ``teacher_classes``).
        teacher_ids: ``(N,)`` int64, the teacher each task label was recovered from.
        teacher_classes: ``(N,)`` int64, the teacher-local class index (which of that teacher's logits)
            of each task label.
        class_names: the original class name of each task label (length N, all distinct).
    """

    episode: Episode
    teacher_ids: torch.Tensor
    teacher_classes: torch.Tensor
    class_names: list[str]

    def to(self, device: torch.device | str) -> PseudoTask:
        return PseudoTask(
            self.episode.to(device), self.teacher_ids.to(device), self.teacher_classes.to(device), self.class_names
        )


@dataclass
class _TeacherStore:
    """The ring buffers of one teacher's classes, each allocated as it fills.

    Attributes:
        class_names: the teacher's classes, in teacher-local order.
        images: per class, ``(capacity, images_per_slot, C, H, W)`` uint8 with
            ``counts[c] <= capacity <= slots``: ring slot ``s`` is ``images[c][s]``; rows from
            ``counts[c]`` on are room to grow into, never read or saved.
        counts: ``(n_classes,)`` int64, filled slots per class (at most ``slots``).
        cursor: ``(n_classes,)`` int64, the slot the next batch of each class goes to.
        revision: bumped by every :meth:`MemoryBank.add`; a save compares it with the revision it
            last wrote to tell whether the teacher's shard is still current.
    """

    class_names: list[str]
    images: list[torch.Tensor]
    counts: torch.Tensor
    cursor: torch.Tensor
    revision: int = 0


@dataclass(frozen=True)
class _Shard:
    """A shard as this bank last wrote (or read and verified) it in one folder.

    ``stat`` is ``(inode, size, mtime_ns)`` of the file then: a file replaced since (every writer of
    this project renames a new file into place) or edited no longer matches, so it is written again
    rather than trusted - the check DVC and git make instead of rehashing. Not caught: an in-place
    edit keeping the size within the filesystem's timestamp granularity (a few ms on ext4).
    """

    revision: int
    sha256: str
    stat: tuple[int, int, int] | None


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class MemoryBank:
    """Per-teacher, per-class ring buffers of recovered images, and the pseudo-task sampler.

    Memory: a class holds its filled slots plus room grown by doubling (at most twice what it holds,
    never more than the ring), so a teacher seen once holds one batch (5 classes x 20 images at 84 px:
    2.1 MB), not its whole ring (42 MB). Checkpoints: :meth:`save` into a folder it already wrote (or
    loaded from) rewrites and hashes only the shards of teachers added to since.

    Measured on 2 shared CPU cores (30 teachers of 5 classes, 3x84x84, slots = images_per_slot = 20;
    the second save adds one batch to 2 teachers first, into the same folder; issue 12):

    ==================  =========================  ==========================  ==========================
    layout              held, one batch a teacher  save, one batch a teacher   second save, all rings full
    ==================  =========================  ==========================  ==========================
    ring up front (v1)  1270 MB                    5.3 s (1270 MB written)     2.1 s (1270 MB)
    as filled (v2)      63.5 MB                    0.12 s (63.5 MB written)    0.26 s (85 MB)
    ==================  =========================  ==========================  ==========================

    With every ring full both hold 1270 MB; what changes then is that a checkpoint rewrites 2 shards, not 30.

    Args:
        slots: ring buffer length per (teacher, class) (``taskcache.slots``).
        images_per_slot: images per class stored per recovered batch (``taskcache.images_per_slot``).
        image_shape: ``(C, H, W)`` of the images.
    """

    def __init__(self, slots: int, images_per_slot: int, image_shape: tuple[int, int, int]) -> None:
        if slots < 1 or images_per_slot < 1:
            raise ValueError(f"need slots >= 1 and images_per_slot >= 1; got {slots}, {images_per_slot}")
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        self.slots, self.images_per_slot = int(slots), int(images_per_slot)
        c, h, w = image_shape
        self.image_shape = (int(c), int(h), int(w))
        self._stores: dict[int, _TeacherStore] = {}
        self._recent: list[int] = []  # distinct teachers, most recently added first
        self._saved: dict[Path, dict[int, _Shard]] = {}  # per folder (resolved): the shards there

    # ---- filling --------------------------------------------------------------------------------

    def add(self, teacher_id: int, class_names: list[str], images: torch.Tensor, labels: torch.Tensor) -> None:
        """Store one recovered batch of one teacher.

        For each teacher-local class present in ``labels``, its first ``images_per_slot`` images (in
        batch order) go into the next slot of that class's ring buffer, overwriting the oldest slot
        once the buffer is full. Classes absent from the batch are left as they are.

        Args:
            teacher_id: the teacher's id in the zoo.
            class_names: the teacher's original class names, in teacher-local order (the same on
                every call for one teacher).
            images: ``(B, C, H, W)`` float in [0, 1] (any device; stored on the CPU as uint8).
            labels: ``(B,)`` teacher-local class indices in ``0..len(class_names)-1``.

        Raises:
            ValueError: wrong shapes, labels out of range, class names that differ from an earlier
                batch of the same teacher, or a class with fewer than ``images_per_slot`` images.
        """
        teacher_id = int(teacher_id)
        class_names = [str(name) for name in class_names]
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"teacher {teacher_id}: class names are not distinct: {class_names}")
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images must be (B, *{self.image_shape}), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
        labels = labels.detach().cpu().long()
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(f"teacher {teacher_id}: labels must be in 0..{len(class_names) - 1}")

        store = self._stores.get(teacher_id)
        if store is None:
            n = len(class_names)
            store = _TeacherStore(
                class_names,
                [self._empty(0) for _ in range(n)],
                torch.zeros(n, dtype=torch.long),
                torch.zeros(n, dtype=torch.long),
            )
        elif store.class_names != class_names:
            raise ValueError(f"teacher {teacher_id}: class names {class_names} differ from {store.class_names}")

        # Check every class before writing anything, so a bad batch leaves the bank unchanged.
        per_class: dict[int, torch.Tensor] = {}
        for c in labels.unique().tolist():
            idx = (labels == c).nonzero().squeeze(1)
            if len(idx) < self.images_per_slot:
                raise ValueError(
                    f"teacher {teacher_id}, class {class_names[c]!r}: the batch has {len(idx)} images but each "
                    f"slot stores taskcache.images_per_slot={self.images_per_slot}; recover at least that many "
                    "images per class (inversion.images_per_class) or lower taskcache.images_per_slot"
                )
            per_class[c] = idx[: self.images_per_slot]
        stored = quantise(images).cpu()
        for c, idx in per_class.items():
            slot = int(store.cursor[c])
            if slot == len(store.images[c]):  # not yet full and out of room (slots fill in order 0, 1, ...)
                store.images[c] = self._grown(store.images[c], int(store.counts[c]))
            store.images[c][slot] = stored[idx]
            store.cursor[c] = (slot + 1) % self.slots
            store.counts[c] = min(int(store.counts[c]) + 1, self.slots)
        store.revision += 1

        self._stores[teacher_id] = store
        if teacher_id in self._recent:
            self._recent.remove(teacher_id)
        self._recent.insert(0, teacher_id)

    def _empty(self, n_slots: int) -> torch.Tensor:
        """``(n_slots, images_per_slot, C, H, W)`` uint8 zeros."""
        return torch.zeros(n_slots, self.images_per_slot, *self.image_shape, dtype=torch.uint8)

    def _grown(self, images: torch.Tensor, filled: int) -> torch.Tensor:
        """``images`` with twice the room (at least 1 slot, at most ``slots``), its ``filled`` slots copied.

        Doubling keeps the copying linear in what is stored over a ring's life, and the room unused
        below what is held.
        """
        grown = self._empty(min(max(2 * len(images), 1), self.slots))
        grown[:filled] = images[:filled]
        return grown

    # ---- inspecting -----------------------------------------------------------------------------

    def nbytes(self, teacher_id: int | None = None) -> int:
        """Bytes of the tensors held for one teacher (all teachers when ``None``), room to grow included."""
        ids = self.teachers() if teacher_id is None else [int(teacher_id)]
        total = 0
        for t in ids:
            store = self._store(t)
            tensors = [*store.images, store.counts, store.cursor]
            total += sum(x.untyped_storage().nbytes() for x in tensors)
        return total

    def teachers(self) -> list[int]:
        """Ids of the teachers in the bank, ascending."""
        return sorted(self._stores)

    def recent_teachers(self, n: int) -> list[int]:
        """The last ``n`` distinct teachers added, most recent first."""
        return self._recent[:n]

    def class_names(self, teacher_id: int) -> list[str]:
        """The original class names of a teacher, in teacher-local order."""
        return list(self._store(teacher_id).class_names)

    def n_images(self, teacher_id: int, class_index: int) -> int:
        """Images held for one (teacher, class) entry."""
        return int(self._store(teacher_id).counts[class_index]) * self.images_per_slot

    def __len__(self) -> int:
        """Number of (teacher, class) entries holding at least one slot of images."""
        return sum(int((s.counts > 0).sum()) for s in self._stores.values())

    def images(self, teacher_id: int, class_index: int) -> torch.Tensor:
        """All images of one entry, oldest slot first.

        Returns:
            ``(n_images, C, H, W)`` float in [0, 1].
        """
        store = self._store(teacher_id)
        count, cursor = int(store.counts[class_index]), int(store.cursor[class_index])
        # Not yet full: slots 0..count-1 in write order. Full: the oldest slot is the next to be written.
        order = list(range(count)) if count < self.slots else [(cursor + i) % self.slots for i in range(self.slots)]
        return dequantise(store.images[class_index][order].reshape(-1, *self.image_shape))

    def to_grid_tensor(self, teacher_id: int, n_per_class: int) -> torch.Tensor:
        """The newest ``n_per_class`` images of each of a teacher's classes, for sample grids.

        Classes with fewer images are padded with black images.

        Returns:
            ``(n_classes * n_per_class, C, H, W)`` float in [0, 1], class-major.
        """
        store = self._store(teacher_id)
        rows = []
        for c in range(len(store.class_names)):
            newest_first = self.images(teacher_id, c).flip(0)[:n_per_class]  # flip: newest slot first
            pad = torch.zeros(n_per_class - len(newest_first), *self.image_shape)
            rows.append(torch.cat([newest_first, pad]))
        return torch.cat(rows)

    def _store(self, teacher_id: int) -> _TeacherStore:
        try:
            return self._stores[int(teacher_id)]
        except KeyError:
            raise KeyError(f"teacher {teacher_id} has nothing in the memory bank") from None

    # ---- sampling -------------------------------------------------------------------------------

    def sample_task(
        self,
        n_way: int,
        k_shot: int,
        q_query: int,
        generator: torch.Generator,
        teachers: list[int] | None = None,
        mix_teachers: bool = True,
    ) -> PseudoTask:
        """Sample one N-way K-shot Q-query pseudo task, relabelled ``0..N-1`` (class-major).

        Args:
            n_way, k_shot, q_query: classes, support and query images per class.
            generator: the only source of randomness (a CPU generator).
            teachers: the teachers whose entries may be drawn (e.g. the freshest ones); ``None``
                draws from the whole bank (memory replay).
            mix_teachers: classes may come from different teachers (never two entries with the same
                original class name in one task); ``False`` picks one teacher, then ``n_way`` of its classes.

        Returns:
            A :class:`PseudoTask`; images of a class are drawn without replacement from all stored
            images of its entry, so support and query never share an image.

        Raises:
            ValueError: no candidate entries, too few distinct classes (names ``metalearn.n_way``), or an
                entry holding fewer than ``k_shot + q_query`` images (names ``metalearn.k_shot``).
        """
        if n_way < 1 or k_shot < 1 or q_query < 0:
            raise ValueError(f"need n_way >= 1, k_shot >= 1, q_query >= 0; got {n_way}, {k_shot}, {q_query}")
        entries = self._candidates(teachers)
        need = k_shot + q_query
        poor = [(t, c) for t, c in entries if self.n_images(t, c) < need]
        if poor:
            t, c = poor[0]
            raise ValueError(
                f"metalearn.k_shot + metalearn.q_query = {need} images per class, but entry (teacher {t}, class "
                f"{self._stores[t].class_names[c]!r}) of the memory bank holds only {self.n_images(t, c)} "
                f"({int(self._stores[t].counts[c])} slot(s) x taskcache.images_per_slot={self.images_per_slot}); "
                "lower k_shot/q_query or raise taskcache.images_per_slot"
            )
        chosen = (
            self._pick_mixed(entries, n_way, generator) if mix_teachers else self._pick_one(entries, n_way, generator)
        )

        drawn = []  # (N, K+Q, C, H, W) uint8
        for t, c in chosen:
            store = self._stores[t]
            # Filled slots in slot order (not age order), a view: the order the draw indexes into.
            pool = store.images[c][: int(store.counts[c])].reshape(-1, *self.image_shape)
            drawn.append(pool[torch.randperm(len(pool), generator=generator)[:need]])
        x = torch.stack(drawn)
        labels = torch.arange(n_way).view(n_way, 1)
        teacher_classes = torch.tensor([c for _, c in chosen], dtype=torch.long)
        episode = Episode(
            support_x=dequantise(x[:, :k_shot].reshape(n_way * k_shot, *self.image_shape)),
            support_y=labels.expand(n_way, k_shot).reshape(-1),
            query_x=dequantise(x[:, k_shot:].reshape(n_way * q_query, *self.image_shape)),
            query_y=labels.expand(n_way, q_query).reshape(-1),
            classes=teacher_classes.clone(),
        )
        return PseudoTask(
            episode=episode,
            teacher_ids=torch.tensor([t for t, _ in chosen], dtype=torch.long),
            teacher_classes=teacher_classes,
            class_names=[self._stores[t].class_names[c] for t, c in chosen],
        )

    def _candidates(self, teachers: list[int] | None) -> list[tuple[int, int]]:
        """Non-empty (teacher, class) entries of ``teachers`` (all when ``None``), in a fixed order."""
        if teachers is None:
            ids = self.teachers()
        else:
            ids = sorted({int(t) for t in teachers})  # sorted: sampling depends on the set, not its order
            missing = [t for t in ids if t not in self._stores]
            if missing:
                raise ValueError(f"teachers {missing} have nothing in the memory bank")
        entries = [
            (t, c) for t in ids for c in range(len(self._stores[t].class_names)) if int(self._stores[t].counts[c]) > 0
        ]
        if not entries:
            raise ValueError("the memory bank holds no images" + ("" if teachers is None else f" of teachers {ids}"))
        return entries

    def _pick_mixed(self, entries: list[tuple[int, int]], n_way: int, g: torch.Generator) -> list[tuple[int, int]]:
        """``n_way`` entries in random order, skipping any whose class name is already in the task."""
        chosen, names = [], set()
        for i in torch.randperm(len(entries), generator=g).tolist():
            t, c = entries[i]
            name = self._stores[t].class_names[c]
            if name not in names:
                chosen.append((t, c))
                names.add(name)
                if len(chosen) == n_way:
                    return chosen
        raise ValueError(
            f"metalearn.n_way={n_way} but the candidate teachers' entries cover only {len(names)} distinct classes"
        )

    def _pick_one(self, entries: list[tuple[int, int]], n_way: int, g: torch.Generator) -> list[tuple[int, int]]:
        """One teacher uniformly, then ``n_way`` of its classes in random order."""
        by_teacher: dict[int, list[int]] = {}
        for t, c in entries:
            by_teacher.setdefault(t, []).append(c)
        # Checked for every candidate (not only the drawn one), so the error does not depend on luck.
        short = {t: len(cs) for t, cs in by_teacher.items() if len(cs) < n_way}
        if short:
            raise ValueError(
                f"metalearn.n_way={n_way} but with taskcache.mix_teachers=false each task uses one teacher, and "
                f"teachers {sorted(short)} hold only {sorted(set(short.values()))} classes in the bank"
            )
        ids = sorted(by_teacher)
        t = ids[int(torch.randint(len(ids), (1,), generator=g))]
        classes = by_teacher[t]
        return [(t, classes[i]) for i in torch.randperm(len(classes), generator=g)[:n_way].tolist()]

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, directory: Path, link_from: Path | None = None) -> dict[str, Any]:
        """Write one shard per teacher and ``manifest.json`` (last, so a readable manifest means complete shards).

        Incremental: a shard this bank wrote into (or loaded and verified from) ``directory`` before,
        of a teacher not added to since and whose file is untouched since, is left as it is and its
        sha256 reused - neither written nor hashed again. The folder's contents are the same as a
        single save of the bank into an empty folder writes, byte for byte. Shards of teachers no
        longer in the bank (from an earlier save into the same directory) are removed.

        Shard ``bank_<teacher>.safetensors`` holds ``counts`` and ``cursor`` (``(n_classes,)`` int64)
        and, per class ``c`` holding anything, ``images/<c>``: ``(counts[c], images_per_slot, C, H, W)``
        uint8, ring slots in slot order.

        Args:
            directory: where to write.
            link_from: another folder this bank saved into (or was loaded from): its shards that are
                still current are hard-linked into ``directory`` instead of written again. A
                checkpoint builds its next bank folder this way while the previous one stays intact
                (:mod:`free.stages.metatrain`); every writer here replaces files by renaming, never
                edits them in place, so the two folders sharing a file is safe.

        Returns:
            The manifest.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        known = self._saved.get(directory.resolve(), {})
        linkable = self._saved.get(Path(link_from).resolve(), {}) if link_from is not None else {}
        shards: dict[int, _Shard] = {}
        for t in self.teachers():
            store, path = self._stores[t], directory / shard_name(t)
            shard = known.get(t)
            if shard is None or shard.revision != store.revision or _stat(path) != shard.stat:
                shard = self._linked(linkable.get(t), store, Path(link_from or directory) / shard_name(t), path)
            if shard is None:
                digest = save_tensors(path, self._shard_tensors(store), self._shard_meta(t))
                shard = _Shard(store.revision, digest, _stat(path))
            shards[t] = shard
        manifest = self._manifest({t: shard.sha256 for t, shard in shards.items()})
        write_json(directory / MANIFEST, manifest)
        keep = {shard_name(t) for t in shards}
        for stale in directory.glob("bank_*.safetensors"):
            if stale.name not in keep:
                stale.unlink()
        self._saved[directory.resolve()] = shards
        return manifest

    @staticmethod
    def _linked(source: _Shard | None, store: _TeacherStore, source_path: Path, path: Path) -> _Shard | None:
        """``path`` as a hard link to ``source_path`` if that shard is current, else ``None`` (write it)."""
        if source is None or source.revision != store.revision or _stat(source_path) != source.stat:
            return None
        try:
            path.unlink(missing_ok=True)
            os.link(source_path, path)
        except OSError:  # a file system without hard links: the shard is written instead
            return None
        return _Shard(source.revision, source.sha256, _stat(path))

    def moved(self, old: Path, new: Path) -> None:
        """Tell the bank that the folder it saved into at ``old`` was renamed to ``new`` (files unchanged)."""
        shards = self._saved.pop(Path(old).resolve(), None)
        if shards is not None:
            self._saved[Path(new).resolve()] = shards

    def forget(self, directory: Path) -> None:
        """Drop what the bank knows of ``directory`` (removed, or left incomplete by a failed save)."""
        self._saved.pop(Path(directory).resolve(), None)

    def _shard_tensors(self, store: _TeacherStore) -> dict[str, torch.Tensor]:
        """A teacher's filled slots (views, not copies), one tensor per class holding any."""
        tensors = {"counts": store.counts, "cursor": store.cursor}
        for c, images in enumerate(store.images):
            if int(store.counts[c]):
                tensors[f"images/{c}"] = images[: int(store.counts[c])]
        return tensors

    def _shard_meta(self, teacher_id: int) -> dict[str, Any]:
        return {"teacher": teacher_id, "class_names": self._stores[teacher_id].class_names, "format": FORMAT_VERSION}

    def _manifest(self, digests: dict[int, str]) -> dict[str, Any]:
        entries = [
            {
                "teacher": t,
                "file": shard_name(t),
                "sha256": digests[t],
                "class_names": self._stores[t].class_names,
                "counts": self._stores[t].counts.tolist(),
            }
            for t in self.teachers()
        ]
        return {
            "format": FORMAT_VERSION,
            "slots": self.slots,
            "images_per_slot": self.images_per_slot,
            "image_shape": list(self.image_shape),
            "recent_teachers": list(self._recent),
            "teachers": entries,
        }

    @classmethod
    def load(cls, directory: Path) -> MemoryBank:
        """Read a bank written by :meth:`save` (format 1 or 2), verifying every shard's sha256 against the manifest.

        The bank remembers the verified shards, so saving it back into ``directory`` (resuming from a
        checkpoint) rewrites only what changes after loading.

        Raises:
            FileNotFoundError: no manifest in ``directory``.
            ValueError: an unknown format, or a shard whose content or shape does not match the
                manifest (the message names it).
        """
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise FileNotFoundError(f"no memory bank in {directory} (missing {MANIFEST})")
        manifest = read_json(directory / MANIFEST)
        if manifest.get("format") not in READABLE_FORMATS:
            raise ValueError(
                f"memory bank {directory}: format {manifest.get('format')!r}, readable: {READABLE_FORMATS}"
            )
        bank = cls(manifest["slots"], manifest["images_per_slot"], tuple(manifest["image_shape"]))
        shards: dict[int, _Shard] = {}
        for entry in manifest["teachers"]:
            path = directory / entry["file"]
            if not path.is_file():
                raise ValueError(f"memory bank shard {path} listed in {MANIFEST} is missing")
            stat = _stat(path)
            if sha256_file(path) != entry["sha256"]:
                raise ValueError(f"memory bank shard {path} does not match the sha256 in {MANIFEST} (corrupt?)")
            tensors, meta = load_tensors(path)
            names = list(entry["class_names"])
            if meta.get("class_names") != names:
                raise ValueError(f"memory bank shard {path} does not match {MANIFEST}")
            unpack = bank._unpack_v1 if manifest["format"] == 1 else bank._unpack_v2
            store = _TeacherStore(names, unpack(path, tensors, len(names)), tensors["counts"], tensors["cursor"])
            if store.counts.tolist() != entry["counts"]:
                raise ValueError(f"memory bank shard {path}: counts {store.counts.tolist()} differ from {MANIFEST}")
            bank._stores[int(entry["teacher"])] = store
            if manifest["format"] == FORMAT_VERSION:  # an older shard is rewritten in the current format
                shards[int(entry["teacher"])] = _Shard(store.revision, entry["sha256"], stat)
        bank._recent = [int(t) for t in manifest["recent_teachers"]]
        bank._saved[directory.resolve()] = shards
        return bank

    def _check_ring(self, path: Path, tensors: dict[str, torch.Tensor], n: int) -> list[int]:
        """The counts of a shard's ``n`` classes, after checking counts and cursors are a ring's."""
        counts, cursor = tensors.get("counts"), tensors.get("cursor")
        if counts is None or cursor is None or counts.shape != (n,) or cursor.shape != (n,):
            raise ValueError(f"memory bank shard {path} lacks counts/cursor of shape ({n},)")
        for count, cur in zip(counts.tolist(), cursor.tolist(), strict=True):
            # Not yet full, the next slot is the next free one; full, any slot may be next.
            if not 0 <= count <= self.slots or not (cur == count if count < self.slots else 0 <= cur < self.slots):
                raise ValueError(f"memory bank shard {path}: counts {counts.tolist()} / cursor {cursor.tolist()}")
        return counts.tolist()

    def _unpack_v2(self, path: Path, tensors: dict[str, torch.Tensor], n: int) -> list[torch.Tensor]:
        counts = self._check_ring(path, tensors, n)
        expected = {f"images/{c}": (count, self.images_per_slot, *self.image_shape) for c, count in enumerate(counts)}
        expected = {key: shape for key, shape in expected.items() if shape[0]}
        got = {key: tuple(x.shape) for key, x in tensors.items() if key.startswith("images/")}
        if got != expected or any(x.dtype != torch.uint8 for k, x in tensors.items() if k in expected):
            raise ValueError(f"memory bank shard {path} does not match {MANIFEST}: images {got}, expected {expected}")
        return [tensors.get(f"images/{c}", self._empty(0)) for c in range(n)]

    def _unpack_v1(self, path: Path, tensors: dict[str, torch.Tensor], n: int) -> list[torch.Tensor]:
        counts = self._check_ring(path, tensors, n)
        images = tensors.get("images")
        if images is None or tuple(images.shape) != (n, self.slots, self.images_per_slot, *self.image_shape):
            raise ValueError(f"memory bank shard {path} does not match {MANIFEST}")
        return [images[c, :count].clone() for c, count in enumerate(counts)]  # clones: the padding is freed
