"""Memory bank: ring buffers per teacher and class, pseudo-task sampling, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from free.taskcache import MemoryBank, PseudoTask

SHAPE = (1, 2, 2)


def traceable_batch(teacher: int, n_classes: int, per_class: int, batch_no: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A recovered batch whose pixels say (teacher, class, batch number, position in the batch).

    Labels are interleaved (0, 1, 2, 0, 1, 2, ...) so per-class selection really has to use them.
    Values are multiples of 1/255, which the uint8 storage keeps exactly.
    """
    labels = torch.arange(n_classes).repeat(per_class)
    images = torch.zeros(len(labels), *SHAPE)
    images[:, 0, 0, 0] = teacher
    images[:, 0, 0, 1] = labels.float()
    images[:, 0, 1, 0] = batch_no
    images[:, 0, 1, 1] = torch.arange(len(labels)).float()
    return images / 255, labels


def decode(x: torch.Tensor) -> torch.Tensor:
    """(..., 1, 2, 2) float -> (..., 4) ints: teacher, class, batch number, position in the batch."""
    return (x * 255).round().long().flatten(-3)


def names(teacher: int, n_classes: int) -> list[str]:
    return [f"t{teacher}c{c}" for c in range(n_classes)]


def filled_bank(n_teachers: int = 5, n_classes: int = 3, batches: int = 2, slots: int = 4, ips: int = 3) -> MemoryBank:
    bank = MemoryBank(slots, ips, SHAPE)
    for b in range(batches):
        for t in range(n_teachers):
            bank.add(t, names(t, n_classes), *traceable_batch(t, n_classes, ips, b))
    return bank


def assert_same_task(a: PseudoTask, b: PseudoTask) -> None:
    for x, y in zip(
        (a.episode.support_x, a.episode.support_y, a.episode.query_x, a.episode.query_y, a.teacher_ids),
        (b.episode.support_x, b.episode.support_y, b.episode.query_x, b.episode.query_y, b.teacher_ids),
        strict=True,
    ):
        assert torch.equal(x, y)
    assert torch.equal(a.teacher_classes, b.teacher_classes) and a.class_names == b.class_names


def test_ring_buffer_keeps_slots_and_overwrites_the_oldest() -> None:
    bank = MemoryBank(slots=3, images_per_slot=2, image_shape=SHAPE)
    for b in range(5):
        bank.add(7, names(7, 2), *traceable_batch(7, 2, per_class=4, batch_no=b))
    assert bank.n_images(7, 0) == bank.n_images(7, 1) == 6
    for c in range(2):
        codes = decode(bank.images(7, c))  # oldest slot first
        assert codes[:, 0].eq(7).all() and codes[:, 1].eq(c).all()
        assert codes[:, 2].tolist() == [2, 2, 3, 3, 4, 4], "batches 0 and 1 must be the ones overwritten"
        # The first images_per_slot images of class c in batch order: positions c and c + 2.
        assert codes[:2, 3].tolist() == [c, c + 2]


def test_partial_ring_buffer_and_classes_absent_from_a_batch() -> None:
    bank = MemoryBank(slots=3, images_per_slot=2, image_shape=SHAPE)
    images, labels = traceable_batch(0, 3, per_class=2, batch_no=0)
    keep = labels != 2
    bank.add(0, names(0, 3), images[keep], labels[keep])
    assert [bank.n_images(0, c) for c in range(3)] == [2, 2, 0]
    assert len(bank) == 2  # class 2 holds nothing yet, so it is no entry
    bank.add(0, names(0, 3), *traceable_batch(0, 3, per_class=2, batch_no=1))
    assert [bank.n_images(0, c) for c in range(3)] == [4, 4, 2] and len(bank) == 3
    assert decode(bank.images(0, 0))[:, 2].tolist() == [0, 0, 1, 1]


def test_add_rejects_bad_batches_and_leaves_the_bank_unchanged() -> None:
    bank = MemoryBank(slots=2, images_per_slot=3, image_shape=SHAPE)
    bank.add(0, names(0, 2), *traceable_batch(0, 2, per_class=3, batch_no=0))
    images, labels = traceable_batch(0, 2, per_class=3, batch_no=1)
    short = torch.cat([torch.arange(4), torch.tensor([5])])  # class 0 keeps 3 images, class 1 only 2
    with pytest.raises(ValueError, match="images_per_slot"):
        bank.add(0, names(0, 2), images[short], labels[short])
    assert bank.n_images(0, 0) == 3 and decode(bank.images(0, 0))[:, 2].eq(0).all()
    with pytest.raises(ValueError, match="differ"):
        bank.add(0, ["x", "y"], images, labels)
    with pytest.raises(ValueError, match="labels"):
        bank.add(1, names(1, 1), images, labels)
    with pytest.raises(ValueError, match="images must be"):
        bank.add(1, names(1, 2), images.flatten(1), labels)


def test_every_teacher_is_kept_and_replay_reaches_all_of_them() -> None:
    bank = filled_bank(n_teachers=5, n_classes=3)
    assert bank.teachers() == [0, 1, 2, 3, 4] and len(bank) == 15
    assert all(bank.class_names(t) == names(t, 3) for t in range(5))
    g = torch.Generator().manual_seed(0)
    seen = {t for _ in range(100) for t in bank.sample_task(3, 1, 2, g).teacher_ids.tolist()}
    assert seen == {0, 1, 2, 3, 4}


def test_recent_teachers_most_recent_first() -> None:
    bank = filled_bank(n_teachers=5, batches=1)
    assert bank.recent_teachers(2) == [4, 3]
    bank.add(1, names(1, 3), *traceable_batch(1, 3, 3, batch_no=5))
    assert bank.recent_teachers(3) == [1, 4, 3] and bank.recent_teachers(10) == [1, 4, 3, 2, 0]


def test_teachers_argument_restricts_the_candidates() -> None:
    bank = filled_bank(n_teachers=5)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        assert set(bank.sample_task(3, 1, 1, g, teachers=[1, 3]).teacher_ids.tolist()) <= {1, 3}
    with pytest.raises(ValueError, match=r"teachers \[9\]"):
        bank.sample_task(3, 1, 1, g, teachers=[1, 9])


def test_labels_are_class_major_and_images_trace_back_to_their_entry() -> None:
    bank = filled_bank(n_teachers=4, n_classes=3, batches=3)
    g = torch.Generator().manual_seed(2)
    n, k, q = 5, 2, 3
    for _ in range(50):
        task = bank.sample_task(n, k, q, g)
        ep = task.episode
        assert ep.support_x.shape == (n * k, *SHAPE) and ep.query_x.shape == (n * q, *SHAPE)
        assert ep.support_x.dtype == torch.float32
        assert ep.support_y.tolist() == torch.arange(n).repeat_interleave(k).tolist()
        assert ep.query_y.tolist() == torch.arange(n).repeat_interleave(q).tolist()
        pairs = zip(task.teacher_ids.tolist(), task.teacher_classes.tolist(), strict=True)
        assert task.class_names == [bank.class_names(t)[c] for t, c in pairs]
        for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
            codes = decode(x)
            assert torch.equal(codes[:, 0], task.teacher_ids[y]), "image from the wrong teacher"
            assert torch.equal(codes[:, 1], task.teacher_classes[y]), "image from the wrong class"
        every = decode(torch.cat([ep.support_x, ep.query_x]))
        assert len({tuple(row) for row in every.tolist()}) == n * (k + q), "an image was drawn twice"


def test_no_original_class_twice_in_a_mixed_task() -> None:
    bank = MemoryBank(slots=2, images_per_slot=2, image_shape=SHAPE)
    for t in range(3):  # three teachers trained on the same classes
        bank.add(t, ["a", "b", "c"], *traceable_batch(t, 3, 2, 0))
    bank.add(3, ["a", "d", "e"], *traceable_batch(3, 3, 2, 0))
    g = torch.Generator().manual_seed(3)
    mixed = 0
    for _ in range(200):
        task = bank.sample_task(4, 1, 1, g)
        assert len(set(task.class_names)) == 4, f"duplicate class in {task.class_names}"
        mixed += len(set(task.teacher_ids.tolist())) > 1
    assert mixed > 0
    with pytest.raises(ValueError, match="metalearn.n_way"):
        bank.sample_task(6, 1, 1, g)  # only a..e: 5 distinct classes


def test_unmixed_tasks_use_one_teacher() -> None:
    bank = filled_bank(n_teachers=5, n_classes=4)
    g = torch.Generator().manual_seed(4)
    for _ in range(50):
        task = bank.sample_task(3, 1, 2, g, mix_teachers=False)
        (teacher,) = set(task.teacher_ids.tolist())
        assert set(decode(task.episode.query_x)[:, 0].tolist()) == {teacher}
    assert any(len(set(bank.sample_task(3, 1, 2, g).teacher_ids.tolist())) > 1 for _ in range(50))
    with pytest.raises(ValueError, match="metalearn.n_way"):
        bank.sample_task(5, 1, 1, g, mix_teachers=False)
    bank.sample_task(5, 1, 1, g, mix_teachers=True)  # mixing makes 5-way possible


def test_too_few_images_for_k_shot_plus_q_query() -> None:
    bank = MemoryBank(slots=2, images_per_slot=2, image_shape=SHAPE)
    bank.add(0, names(0, 2), *traceable_batch(0, 2, 2, 0))
    g = torch.Generator().manual_seed(5)
    with pytest.raises(ValueError, match="k_shot"):
        bank.sample_task(2, 1, 2, g)  # needs 3 images per class, entries hold 2
    bank.add(0, names(0, 2), *traceable_batch(0, 2, 2, 1))
    assert bank.sample_task(2, 1, 3, g).episode.query_x.shape[0] == 6  # now 4 per class: all of them
    with pytest.raises(ValueError, match="k_shot"):
        bank.sample_task(2, 2, 3, g)  # beyond the full ring buffer


def test_same_seed_same_task() -> None:
    bank = filled_bank()
    a = bank.sample_task(4, 2, 3, torch.Generator().manual_seed(6))
    b = bank.sample_task(4, 2, 3, torch.Generator().manual_seed(6))
    assert_same_task(a, b)
    others = [bank.sample_task(4, 2, 3, torch.Generator().manual_seed(s)) for s in range(7, 12)]
    assert any(not torch.equal(a.episode.support_x, o.episode.support_x) for o in others)
    # The order in which teachers are listed does not change the task.
    c = bank.sample_task(4, 2, 3, torch.Generator().manual_seed(6), teachers=[3, 1, 0, 2, 4])
    assert_same_task(a, c)


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    bank = filled_bank(n_teachers=3, batches=6, slots=4)  # wrapped ring buffers: cursors matter
    bank.add(1, names(1, 3), *traceable_batch(1, 3, 3, batch_no=9))
    manifest = bank.save(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert [e["file"] for e in manifest["teachers"]] == [f"bank_{t:03d}.safetensors" for t in range(3)]
    assert manifest["teachers"][1]["counts"] == [4, 4, 4] and manifest["image_shape"] == list(SHAPE)

    loaded = MemoryBank.load(tmp_path)
    assert (loaded.slots, loaded.images_per_slot, loaded.image_shape) == (4, 3, SHAPE)
    assert loaded.teachers() == bank.teachers() and loaded.recent_teachers(3) == bank.recent_teachers(3) == [1, 2, 0]
    for t in bank.teachers():
        assert loaded.class_names(t) == bank.class_names(t)
        for c in range(3):
            assert torch.equal(loaded.images(t, c), bank.images(t, c))
    assert_same_task(
        loaded.sample_task(3, 2, 4, torch.Generator().manual_seed(0)),
        bank.sample_task(3, 2, 4, torch.Generator().manual_seed(0)),
    )
    # Cursors survived: the next batch overwrites the same slot in both.
    for b in (bank, loaded):
        b.add(2, names(2, 3), *traceable_batch(2, 3, 3, batch_no=10))
    assert torch.equal(loaded.images(2, 0), bank.images(2, 0))
    assert decode(loaded.images(2, 0))[:, 2].tolist() == [3, 3, 3, 4, 4, 4, 5, 5, 5, 10, 10, 10]


def test_tampered_shard_is_named(tmp_path: Path) -> None:
    filled_bank(n_teachers=3).save(tmp_path)
    shard = tmp_path / "bank_002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # flip one pixel
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bank_002.safetensors"):
        MemoryBank.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest"):
        MemoryBank.load(tmp_path / "nowhere")


def test_saving_again_drops_shards_of_teachers_no_longer_in_the_bank(tmp_path: Path) -> None:
    filled_bank(n_teachers=3).save(tmp_path)
    filled_bank(n_teachers=2).save(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("bank_*")) == ["bank_000.safetensors", "bank_001.safetensors"]
    assert MemoryBank.load(tmp_path).teachers() == [0, 1]


def test_grid_tensor_newest_first() -> None:
    bank = MemoryBank(slots=3, images_per_slot=2, image_shape=SHAPE)
    for b in range(4):
        bank.add(0, names(0, 2), *traceable_batch(0, 2, 2, b))
    grid = bank.to_grid_tensor(0, n_per_class=3)
    assert grid.shape == (6, *SHAPE)
    codes = decode(grid)
    assert codes[:, 1].tolist() == [0, 0, 0, 1, 1, 1] and codes[:3, 2].tolist() == [3, 3, 2]


# ---- memory: allocate as filled (issue 12, bug 4) ----------------------------------------------


def held_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of every tensor storage reachable from ``obj`` (through this project's objects, dicts,
    lists and tuples), each storage once: what the bank really holds, whatever its layout, and a
    small view of a big allocation counts as the big allocation."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        storage = obj.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(held_bytes(v, seen) for v in obj)
    if type(obj).__module__.startswith("free.") and hasattr(obj, "__dict__"):
        return sum(held_bytes(v, seen) for v in vars(obj).values())
    return 0


def test_a_teacher_holds_what_it_stored_not_its_whole_ring_buffer() -> None:
    shape, n_classes, slots, ips = (3, 84, 84), 5, 20, 20
    slot_bytes = n_classes * ips * 3 * 84 * 84  # one uint8 slot per class: one recovered batch
    bank = MemoryBank(slots, ips, shape)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n_classes).repeat(ips)

    def add(teacher: int) -> None:
        bank.add(teacher, names(teacher, n_classes), torch.rand(len(labels), *shape, generator=g), labels)

    add(0)
    held = held_bytes(bank)
    assert held < 1.05 * slot_bytes, f"one batch of {slot_bytes} bytes stored, {held} held (the full ring?)"
    assert bank.nbytes() == held and bank.nbytes(0) == held
    for _ in range(5):
        add(1)
    assert bank.nbytes(0) == held  # another teacher's growth leaves this one as it was
    assert 5 * slot_bytes <= bank.nbytes(1) < 2 * 5 * slot_bytes  # grows with what it holds
    assert bank.nbytes() == held_bytes(bank) == bank.nbytes(0) + bank.nbytes(1)
    for _ in range(slots + 5):  # full and wrapping: never more than the ring itself
        add(1)
    assert slots * slot_bytes <= bank.nbytes(1) < 1.05 * slots * slot_bytes


# ---- checkpoints: incremental saves (issue 12, bug 4) ------------------------------------------


def shard_files(directory: Path) -> dict[str, tuple[int, int]]:
    """``{shard name: (inode, mtime_ns)}``: a shard rewritten (atomically, by rename) changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(directory.glob("bank_*.safetensors"))}


def hashed_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files hashed from now on (sha256_file wherever the bank may call it)."""
    import free.artifacts
    import free.taskcache
    from free.data.base import sha256_file

    hashed: list[str] = []

    def spy(path: Path) -> str:
        hashed.append(Path(path).name)
        return sha256_file(path)

    monkeypatch.setattr(free.artifacts, "sha256_file", spy)
    monkeypatch.setattr(free.taskcache, "sha256_file", spy)
    return hashed


def assert_same_bank(a: MemoryBank, b: MemoryBank) -> None:
    assert a.teachers() == b.teachers() and a.recent_teachers(99) == b.recent_teachers(99)
    for t in a.teachers():
        assert a.class_names(t) == b.class_names(t)
        for c in range(len(a.class_names(t))):
            assert torch.equal(a.images(t, c), b.images(t, c))
    assert_same_task(
        a.sample_task(3, 1, 1, torch.Generator().manual_seed(0)),
        b.sample_task(3, 1, 1, torch.Generator().manual_seed(0)),
    )


def test_saving_again_rewrites_and_hashes_only_the_shards_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from free.data.base import sha256_file

    bank = filled_bank(n_teachers=3)
    bank.save(tmp_path / "ckpt")
    first = shard_files(tmp_path / "ckpt")
    hashed = hashed_paths(monkeypatch)
    bank.add(1, names(1, 3), *traceable_batch(1, 3, 3, batch_no=7))
    manifest = bank.save(tmp_path / "ckpt")
    second = shard_files(tmp_path / "ckpt")
    assert second["bank_001.safetensors"] != first["bank_001.safetensors"]
    assert {k: v for k, v in second.items() if k != "bank_001.safetensors"} == {
        k: v for k, v in first.items() if k != "bank_001.safetensors"
    }, "unchanged shards were rewritten"
    assert "bank_000.safetensors" not in hashed and "bank_002.safetensors" not in hashed
    hashed.clear()
    bank.save(tmp_path / "ckpt")  # nothing changed: nothing written, nothing hashed
    assert shard_files(tmp_path / "ckpt") == second and not [n for n in hashed if n.startswith("bank_")]

    # The manifest describes the files as they are, and loading gives the same bank ...
    assert json.loads((tmp_path / "ckpt" / "manifest.json").read_text()) == manifest
    for entry in manifest["teachers"]:
        assert entry["sha256"] == sha256_file(tmp_path / "ckpt" / entry["file"])
    assert_same_bank(MemoryBank.load(tmp_path / "ckpt"), bank)
    # ... byte for byte what one save of the same bank writes into a fresh folder.
    bank.save(tmp_path / "fresh")
    for path in sorted((tmp_path / "fresh").iterdir()):
        assert path.read_bytes() == (tmp_path / "ckpt" / path.name).read_bytes(), path.name


def test_incremental_saves_trust_only_shards_the_bank_wrote_or_verified(tmp_path: Path) -> None:
    bank = filled_bank(n_teachers=3)
    bank.save(tmp_path / "a")
    # A bank loaded (hash-checked) from a folder knows its shards there, and nowhere else.
    loaded = MemoryBank.load(tmp_path / "a")
    before = shard_files(tmp_path / "a")
    loaded.save(tmp_path / "a")
    assert shard_files(tmp_path / "a") == before
    loaded.add(2, names(2, 3), *traceable_batch(2, 3, 3, batch_no=8))
    loaded.save(tmp_path / "a")
    after = shard_files(tmp_path / "a")
    assert [n for n in after if after[n] != before[n]] == ["bank_002.safetensors"]
    loaded.save(tmp_path / "b")
    assert sorted(shard_files(tmp_path / "b")) == sorted(before)  # a new folder gets every shard
    # A shard changed or removed behind the bank's back is written again, not trusted.
    (tmp_path / "a" / "bank_000.safetensors").unlink()
    with (tmp_path / "a" / "bank_001.safetensors").open("ab") as shard:  # edited in place (same inode)
        shard.write(b"\0")
    loaded.save(tmp_path / "a")
    assert_same_bank(MemoryBank.load(tmp_path / "a"), loaded)
    # Another bank saving into the folder in between: its shards are not this bank's.
    filled_bank(n_teachers=3, batches=1).save(tmp_path / "a")
    loaded.save(tmp_path / "a")
    assert_same_bank(MemoryBank.load(tmp_path / "a"), loaded)


# ---- sampling is unchanged by the storage layout (recorded before bug 4 was fixed) -------------


def golden_bank() -> MemoryBank:
    """Wrapped and partial rings, a class absent from a batch, a class name shared by two teachers."""
    bank = MemoryBank(slots=3, images_per_slot=2, image_shape=SHAPE)
    for b in range(5):
        for t in range(4):
            if b < 2 + t:  # teacher t gets 2 + t batches: the rings of teachers 2 and 3 wrap
                classes = names(t, 3) if t != 3 else ["t0c1", "t3c1", "t3c2"]
                bank.add(t, classes, *traceable_batch(t, 3, 2 + b % 2, b))
    images, labels = traceable_batch(4, 3, 2, 0)
    keep = labels != 2
    bank.add(4, names(4, 3), images[keep], labels[keep])  # class 2 of teacher 4 stays empty
    return bank


# Support then query images of each task as "teacher.class.batch.position", then the task's teacher
# ids and teacher-local classes: the output of the bank as it was before the storage changed.
GOLDEN_TASKS = [
    ("1.1.1.4 1.0.1.0 2.1.1.1 2.0.1.3 1.1.2.1 1.0.2.0 2.1.2.4 2.0.3.3", [1, 1, 2, 2], [1, 0, 1, 0]),
    ("4.0.0.3 4.1.0.4 3.2.4.2 2.0.3.3 4.0.0.0 4.1.0.1 3.2.3.2 2.0.1.0", [4, 4, 3, 2], [0, 1, 2, 0]),
    ("0.2.0.5 0.0.0.0 3.0.2.0 4.1.0.1 0.2.0.2 0.0.1.3 3.0.4.0 4.1.0.4", [0, 0, 3, 4], [2, 0, 0, 1]),
    (
        "2.1.2.4 2.1.1.4 1.0.2.3 1.0.2.0 3.0.4.0 3.0.3.0 2.1.1.1 2.1.3.4 2.1.2.1 1.0.1.0 1.0.1.3 1.0.0.0 "
        "3.0.2.0 3.0.4.3 3.0.3.3",
        [2, 1, 3],
        [1, 0, 0],
    ),
    (
        "2.0.3.0 2.2.1.2 2.1.3.4 2.0.2.0 2.0.2.3 2.0.1.3 2.0.1.0 2.2.3.2 2.2.2.2 2.2.3.5 2.2.2.5 2.1.3.1 "
        "2.1.2.4 2.1.2.1 2.1.1.1",
        [2, 2, 2],
        [0, 2, 1],
    ),
]


def golden_tasks(bank: MemoryBank) -> list[tuple[str, list[int], list[int]]]:
    g = torch.Generator().manual_seed(0)
    tasks = [bank.sample_task(4, 1, 1, g) for _ in range(3)]  # one generator: its state carries on
    tasks.append(bank.sample_task(3, 2, 3, torch.Generator().manual_seed(1), teachers=[1, 2, 3]))
    tasks.append(bank.sample_task(3, 1, 4, torch.Generator().manual_seed(2), teachers=[2, 3], mix_teachers=False))
    described = []
    for task in tasks:
        codes = decode(torch.cat([task.episode.support_x, task.episode.query_x])).tolist()
        images = " ".join(".".join(map(str, c)) for c in codes)
        described.append((images, task.teacher_ids.tolist(), task.teacher_classes.tolist()))
    return described


def test_pseudo_tasks_are_the_ones_recorded_before_the_storage_changed(tmp_path: Path) -> None:
    bank = golden_bank()
    assert golden_tasks(bank) == GOLDEN_TASKS
    bank.save(tmp_path)
    assert golden_tasks(MemoryBank.load(tmp_path)) == GOLDEN_TASKS


def test_a_bank_saved_in_format_1_still_loads_and_is_rewritten_in_the_current_format(tmp_path: Path) -> None:
    """Format 1 (before allocation as filled): one zero-padded ``(n_classes, slots, images_per_slot, C, H, W)``
    tensor per shard. A checkpoint written then must still resume."""
    from free.artifacts import load_tensors, read_json, save_tensors, write_json

    bank = golden_bank()
    manifest = bank.save(tmp_path)
    for entry in manifest["teachers"]:  # rewrite every shard as format 1 did
        path = tmp_path / entry["file"]
        tensors, meta = load_tensors(path)
        padded = torch.zeros(len(entry["class_names"]), bank.slots, bank.images_per_slot, *SHAPE, dtype=torch.uint8)
        for c, count in enumerate(entry["counts"]):
            if count:
                padded[c, :count] = tensors[f"images/{c}"]
        entry["sha256"] = save_tensors(
            path,
            {"images": padded, "counts": tensors["counts"], "cursor": tensors["cursor"]},
            {"teacher": meta["teacher"], "class_names": meta["class_names"]},
        )
    write_json(tmp_path / "manifest.json", {**manifest, "format": 1})

    loaded = MemoryBank.load(tmp_path)
    assert_same_bank(loaded, bank)
    assert golden_tasks(loaded) == GOLDEN_TASKS
    images = sum(loaded.n_images(t, c) for t in loaded.teachers() for c in range(3))
    assert loaded.nbytes() == held_bytes(loaded) == images * 4 + len(loaded.teachers()) * 2 * 3 * 8  # no padding
    before = shard_files(tmp_path)
    loaded.save(tmp_path)  # nothing added, but every shard is rewritten in the current format
    assert all(shard_files(tmp_path)[name] != before[name] for name in before)
    assert read_json(tmp_path / "manifest.json")["format"] == 2
    bank.save(tmp_path / "fresh")
    for path in sorted((tmp_path / "fresh").iterdir()):
        assert path.read_bytes() == (tmp_path / path.name).read_bytes(), path.name
