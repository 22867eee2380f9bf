"""Shared by the tests that break stages and rerun them (kills, full disks): a seconds-sized
configuration on the fake Omniglot, the stages' output folders, and a digest of every output file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from free.artifacts import read_json
from free.config import compose
from free.config.schema import Config
from free.stages import data, teachers
from free.stages.metatrain import MetaTrainLoop

# The fake Omniglot (``fake_omniglot``: 24 classes x 4 drawers) split 12 / 6 / 6, 2 teachers, 6 meta-
# iterations with a checkpoint every 2: seconds per stage.
FAKE = [
    "dataset.split.train=0.5",
    "dataset.split.val=0.25",
    "teachers.n_teachers=2",
    "teachers.width=8",
    "teachers.max_epochs=1",
    "model.width=8",
    "inversion.teachers_per_step=2",
    "inversion.images_per_class=2",
    "inversion.inner_steps=2",
    "taskcache.slots=3",
    "taskcache.images_per_slot=2",
    "metalearn.k_shot=1",
    "metalearn.q_query=1",
    "metalearn.inner_steps=2",
    "metalearn.iterations=6",
    "metalearn.val_every=3",
    "metalearn.val_episodes=2",
    "metalearn.checkpoint_every=2",
    "threads=1",
]

# The output folders of each stage, under the artifacts folder.
OUTPUTS = {
    "data": ["data"],
    "teachers": ["teachers"],
    "metatrain": ["metalearner", "generator", "taskcache"],
    "metatest": ["metrics", "plots"],
}
TIMED_JSON = {"metalearner/curves.json", "generator/recovery.json"}  # wall-clock fields, run to run


def fake_overrides(root: Path, artifacts: Path) -> list[str]:
    """:data:`FAKE` on the archives in ``root``, writing under ``artifacts``."""
    return [f"dataset.root={root}", f"paths.artifacts_dir={artifacts}", *FAKE]


def fake_inputs(root: Path, artifacts: Path) -> Config:
    """Run the data and teachers stages of :data:`FAKE` into ``artifacts``; return the configuration."""
    cfg = compose(fake_overrides(root, artifacts))
    data.run(cfg)
    teachers.run(cfg)
    return cfg


def _strip_timings(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


def digests(folders: list[Path], base: Path) -> dict[str, str]:
    """sha256 of every file under ``folders`` by path relative to ``base`` (timed JSON: without its timings)."""
    result = {}
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
            name = path.relative_to(base).as_posix()
            if name in TIMED_JSON:
                content = json.dumps(_strip_timings(read_json(path)), sort_keys=True).encode()
            else:
                content = path.read_bytes()
            result[name] = hashlib.sha256(content).hexdigest()
    return result


def record_resumes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Watch :meth:`MetaTrainLoop.restore`: the returned list gets the iteration of every resume."""
    resumed_at: list[int] = []
    original_restore = MetaTrainLoop.restore

    def restore(self: MetaTrainLoop, directory: Path) -> None:
        original_restore(self, directory)
        resumed_at.append(self.iteration)

    monkeypatch.setattr(MetaTrainLoop, "restore", restore)
    return resumed_at
