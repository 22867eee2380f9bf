"""Pseudo-task cache: a memory bank of recovered images and the pseudo-task sampler.

Recovered images are kept **per teacher and per class of that teacher** in a bounded ring buffer of
``slots`` slots, each holding ``images_per_slot`` images: one slot per recovered batch, the oldest
slot overwritten once the buffer is full. Every teacher keeps its own buffers, so the bank always
holds samples of all teachers seen so far (the official code kept only the last teacher's).

Pseudo tasks are N-way K-shot Q-query :class:`~free.data.episodes.Episode` objects (relabelled
``0..N-1``, class-major), so the meta-learner consumes real episodes and pseudo tasks alike. Each
task also says, per label, which teacher and which of that teacher's classes it came from, so the
meta-learner can distill from the teacher's logits.

Images are stored as uint8 (quantised from float [0, 1]) to keep the bank small; the bank is an
artifact written as one safetensors shard per teacher plus a ``manifest.json`` with their sha256.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from free.artifacts import load_tensors, read_json, save_tensors, write_json
from free.data.base import sha256_file
from free.data.episodes import Episode

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


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
    """The ring buffers of one teacher's classes.

    Attributes:
        class_names: the teacher's classes, in teacher-local order.
        images: ``(n_classes, slots, images_per_slot, C, H, W)`` uint8.
        counts: ``(n_classes,)`` int64, filled slots per class (at most ``slots``).
        cursor: ``(n_classes,)`` int64, the slot the next batch of each class goes to.
    """

    class_names: list[str]
    images: torch.Tensor
    counts: torch.Tensor
    cursor: torch.Tensor


class MemoryBank:
    """Per-teacher, per-class ring buffers of recovered images, and the pseudo-task sampler.

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
                torch.zeros(n, self.slots, self.images_per_slot, *self.image_shape, dtype=torch.uint8),
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
            store.images[c, slot] = stored[idx]
            store.cursor[c] = (slot + 1) % self.slots
            store.counts[c] = min(int(store.counts[c]) + 1, self.slots)

        self._stores[teacher_id] = store
        if teacher_id in self._recent:
            self._recent.remove(teacher_id)
        self._recent.insert(0, teacher_id)

    # ---- inspecting -----------------------------------------------------------------------------

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
        return dequantise(store.images[class_index, order].reshape(-1, *self.image_shape))

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
            pool = store.images[c, : int(store.counts[c])].reshape(-1, *self.image_shape)  # filled slots, a view
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

    def save(self, directory: Path) -> dict[str, Any]:
        """Write one shard per teacher and ``manifest.json`` (last, so a readable manifest means complete shards).

        Shards of teachers no longer in the bank (from an earlier save into the same directory) are removed.

        Returns:
            The manifest.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for t in self.teachers():
            store = self._stores[t]
            name = shard_name(t)
            digest = save_tensors(
                directory / name,
                {"images": store.images, "counts": store.counts, "cursor": store.cursor},
                {"teacher": t, "class_names": store.class_names},
            )
            entries.append(
                {
                    "teacher": t,
                    "file": name,
                    "sha256": digest,
                    "class_names": store.class_names,
                    "counts": store.counts.tolist(),
                }
            )
        manifest = {
            "format": FORMAT_VERSION,
            "slots": self.slots,
            "images_per_slot": self.images_per_slot,
            "image_shape": list(self.image_shape),
            "recent_teachers": list(self._recent),
            "teachers": entries,
        }
        write_json(directory / MANIFEST, manifest)
        keep = {e["file"] for e in entries}
        for stale in directory.glob("bank_*.safetensors"):
            if stale.name not in keep:
                stale.unlink()
        return manifest

    @classmethod
    def load(cls, directory: Path) -> MemoryBank:
        """Read a bank written by :meth:`save`, verifying every shard's sha256 against the manifest.

        Raises:
            FileNotFoundError: no manifest in ``directory``.
            ValueError: a shard whose content or shape does not match the manifest (the message names it).
        """
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise FileNotFoundError(f"no memory bank in {directory} (missing {MANIFEST})")
        manifest = read_json(directory / MANIFEST)
        bank = cls(manifest["slots"], manifest["images_per_slot"], tuple(manifest["image_shape"]))
        for entry in manifest["teachers"]:
            path = directory / entry["file"]
            if not path.is_file():
                raise ValueError(f"memory bank shard {path} listed in {MANIFEST} is missing")
            if sha256_file(path) != entry["sha256"]:
                raise ValueError(f"memory bank shard {path} does not match the sha256 in {MANIFEST} (corrupt?)")
            tensors, meta = load_tensors(path)
            n = len(entry["class_names"])
            shape = (n, bank.slots, bank.images_per_slot, *bank.image_shape)
            if tuple(tensors["images"].shape) != shape or meta.get("class_names") != entry["class_names"]:
                raise ValueError(f"memory bank shard {path} does not match {MANIFEST}")
            bank._stores[int(entry["teacher"])] = _TeacherStore(
                list(entry["class_names"]), tensors["images"], tensors["counts"], tensors["cursor"]
            )
        bank._recent = [int(t) for t in manifest["recent_teachers"]]
        return bank
