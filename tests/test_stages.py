"""Stages end to end: resume after a kill, no-op reruns, disjoint classes, the tiny pipeline on real data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from free.artifacts import read_json
from free.config import compose
from free.stages import data, metatest, metatrain, teachers
from free.stages.metatrain import MetaTrainLoop
from tests.conftest import write_fake_omniglot

# Small models: one torch thread is faster than two and independent of earlier tests (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A small but complete setup on the fake Omniglot (24 classes x 4 images): 12 / 6 / 6 classes.
FAKE = [
    "dataset.split.train=0.5",
    "dataset.split.val=0.25",
    "teachers.n_teachers=3",
    "teachers.width=8",
    "teachers.max_epochs=2",
    "model.width=8",
    "inversion.teachers_per_step=2",
    "inversion.images_per_class=2",
    "inversion.scratch_steps=3",
    "inversion.adv_warmup=2",
    "taskcache.slots=3",
    "taskcache.images_per_slot=2",
    "metalearn.k_shot=1",
    "metalearn.q_query=1",
    "metalearn.iterations=6",
    "metalearn.val_every=3",
    "metalearn.val_episodes=4",
    "metalearn.checkpoint_every=2",
    "metalearn.distill=0.5",
    "evaluate.episodes=4",
    "evaluate.q_query=3",
    "evaluate.shots=[1]",
    "threads=1",
]


def fake_config(root: Path, artifacts: Path, *extra: str):
    return compose([f"dataset.root={root}", f"paths.artifacts_dir={artifacts}", *FAKE, *extra])


def prepare(cfg) -> None:
    data.run(cfg)
    teachers.run(cfg)


def outputs_without_timings(artifacts: Path) -> dict[str, object]:
    """Every metatrain output, with wall-clock fields (which differ run to run) removed."""

    def strip(obj: object) -> object:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if "seconds" not in k}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    result = {}
    for directory in ("metalearner", "generator", "taskcache"):
        for path in sorted((artifacts / directory).iterdir()):
            if path.suffix == ".json":
                result[f"{directory}/{path.name}"] = strip(read_json(path))
            elif path.suffix == ".safetensors":
                result[f"{directory}/{path.name}"] = path.read_bytes()
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(archives, artifacts)``: the default :data:`FAKE` setup run through metatrain once for the tests
    that only read it or copy it (it is the unbroken run of the first-order resume test too)."""
    base = tmp_path_factory.mktemp("trained")
    root = write_fake_omniglot(base / "omniglot")
    with pytest.MonkeyPatch.context() as env:  # module-scoped: no test's isolated cache exists yet
        env.setenv("FREE_CACHE_DIR", str(base / "cache"))
        cfg = fake_config(root, base / "artifacts")
        prepare(cfg)
        metatrain.run(cfg)
    return root, base / "artifacts"


# The authors' update, small enough for a test (its Adam state must survive a resume as well).
OFFICIAL = [
    "metalearn.update=official",
    "metalearn.distill=0",  # FAKE's distillation weight belongs to the first_order update
    "metalearn.official.replay_batch=2",
    "metalearn.official.max_replay_batches=2",
]


@pytest.mark.parametrize("update", [[], OFFICIAL], ids=["first_order", "official"])
def test_metatrain_resumes_after_a_kill_with_the_same_artifacts(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, update: list[str]
) -> None:
    root, unbroken_root = trained
    if update:  # another setup: its own unbroken run
        unbroken_root = tmp_path / "unbroken"
        unbroken = fake_config(root, unbroken_root, *update)
        prepare(unbroken)
        metatrain.run(unbroken)

    broken = fake_config(root, tmp_path / "broken", *update)
    prepare(broken)
    original_step = MetaTrainLoop.step

    def dies_at_iteration_5(self: MetaTrainLoop) -> None:  # fault injection: the process is killed
        if self.iteration == 4:
            raise KeyboardInterrupt
        original_step(self)

    monkeypatch.setattr(MetaTrainLoop, "step", dies_at_iteration_5)
    with pytest.raises(KeyboardInterrupt):
        metatrain.run(broken)
    assert not (tmp_path / "broken" / "metalearner" / "metalearner.safetensors").exists()
    assert list((tmp_path / "broken" / ".state").glob("metatrain-*/state.safetensors"))  # checkpoint at 4
    monkeypatch.setattr(MetaTrainLoop, "step", original_step)

    resumed_from = []
    original_restore = MetaTrainLoop.restore
    monkeypatch.setattr(
        MetaTrainLoop, "restore", lambda self, d: (original_restore(self, d), resumed_from.append(self.iteration))
    )
    metatrain.run(broken)
    assert resumed_from == [4]
    assert outputs_without_timings(tmp_path / "broken") == outputs_without_timings(unbroken_root)
    assert not list((tmp_path / "broken" / ".state").glob("metatrain-*"))  # state removed when done


def test_metatrain_resumes_after_incremental_checkpoints_that_skipped_unchanged_shards(
    fake_omniglot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One teacher a step and a checkpoint every step: each checkpoint rewrites one bank shard and
    leaves the others as they are; a kill after such a checkpoint still resumes to the same artifacts."""
    extra = ("inversion.teachers_per_step=1", "metalearn.checkpoint_every=1")
    unbroken = fake_config(fake_omniglot, tmp_path / "unbroken", *extra)
    prepare(unbroken)
    metatrain.run(unbroken)

    broken = fake_config(fake_omniglot, tmp_path / "broken", *extra)
    prepare(broken)
    shards: list[dict[str, tuple[int, int]]] = []  # after each checkpoint: shard name -> (inode, mtime_ns)
    original_save, original_step = MetaTrainLoop.save_state, MetaTrainLoop.step

    def save_state(self: MetaTrainLoop, directory: Path) -> None:
        original_save(self, directory)
        bank = directory / "bank"
        shards.append({p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in bank.glob("bank_*.safetensors")})

    def kept(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
        return [name for name in before if after.get(name) == before[name]]

    def dies_at_iteration_5(self: MetaTrainLoop) -> None:
        if self.iteration == 4:
            raise KeyboardInterrupt
        original_step(self)

    monkeypatch.setattr(MetaTrainLoop, "save_state", save_state)
    monkeypatch.setattr(MetaTrainLoop, "step", dies_at_iteration_5)
    with pytest.raises(KeyboardInterrupt):
        metatrain.run(broken)
    assert len(shards) == 4 and len(shards[-1]) >= 2
    assert kept(shards[-2], shards[-1]), "the checkpoint before the kill rewrote every shard"
    assert all(len(set(shards[i]) - set(kept(shards[i], shards[i + 1]))) <= 1 for i in range(3))

    monkeypatch.setattr(MetaTrainLoop, "step", original_step)
    metatrain.run(broken)
    assert len(shards) == 6 and kept(shards[3], shards[4]), "the first checkpoint after the resume rewrote all"
    assert outputs_without_timings(tmp_path / "broken") == outputs_without_timings(tmp_path / "unbroken")


def test_finished_stages_do_nothing_and_changes_rerun(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, done = trained
    shutil.copytree(done, tmp_path, dirs_exist_ok=True)  # a finished run (copied: this test adds to it)
    cfg = fake_config(root, tmp_path)
    metatrain.run(cfg)
    metatest.run(cfg)

    class Trained(Exception):
        pass

    def step(self: MetaTrainLoop) -> None:
        raise Trained

    monkeypatch.setattr(MetaTrainLoop, "step", step)
    metatrain.run(cfg)  # same inputs: returns without a single meta-iteration
    with pytest.raises(Trained):  # a changed parameter trains again
        metatrain.run(fake_config(root, tmp_path, "metalearn.iterations=7"))


@pytest.mark.parametrize(
    "method",
    ["free", "free_noalign", "scratch", "pixels", "random_init", "oracle", "free+official", "free_noalign+official"],
)
def test_every_method_runs_through_the_same_stages(trained: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    method, _, update = method.partition("+")
    extra = ["metalearn.iterations=0"] if method == "random_init" else []
    extra += OFFICIAL if update == "official" else []
    root, done = trained
    for name in ("data", "teachers"):  # the methods differ from metatrain on: the same zoo for all
        shutil.copytree(done / name, tmp_path / name)
    cfg = fake_config(root, tmp_path, f"method={method}", *extra)
    prepare(cfg)  # finds both stages done
    summary = metatrain.run(cfg)
    assert summary["iterations"] == (0 if method == "random_init" else 6)
    card = read_json(tmp_path / "metalearner" / "card.json")
    assert card["method"] == method and card["selected_on"] == "meta-val"
    result = metatest.run(cfg)
    assert set(result) >= {"5way_1shot", "episodes"} and 0 <= result["5way_1shot"]["acc"] <= 1


def test_no_meta_test_class_reaches_training(trained: tuple[Path, Path]) -> None:
    _, artifacts = trained
    classes = read_json(artifacts / "data" / "splits.json")["classes"]
    held_out = set(classes["val"]) | set(classes["test"])
    zoo = read_json(artifacts / "teachers" / "zoo.json")["teachers"]
    assert all(not set(card["class_names"]) & held_out for card in zoo)
    bank = read_json(artifacts / "taskcache" / "manifest.json")
    banked = {name for teacher in bank["teachers"] for name in teacher["class_names"]}
    assert banked and not banked & held_out and banked <= set(classes["train"])


@pytest.mark.data
def test_tiny_pipeline_on_real_omniglot(real_omniglot_root: Path, tmp_path: Path) -> None:
    """`free pipeline experiment=tiny` end to end, meta-training cut to 6 iterations (the deployment
    tests run the full tiny preset; this one is about the one-process front door)."""
    from typer.testing import CliRunner

    from free.cli import app

    iterations = 6
    args = ["pipeline", "experiment=tiny", f"dataset.root={real_omniglot_root}", f"paths.artifacts_dir={tmp_path}",
            f"metalearn.iterations={iterations}", "metalearn.val_every=3", "metalearn.checkpoint_every=3"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics" / "metatest.json").read_text())
    assert set(metrics) == {"5way_1shot", "5way_5shot", "episodes"} and metrics["episodes"] == 20
    for key in ("5way_1shot", "5way_5shot"):
        assert 0.2 <= metrics[key]["acc"] <= 1 and metrics[key]["ci95"] > 0
    bank = read_json(tmp_path / "taskcache" / "manifest.json")
    assert len(bank["teachers"]) >= 2  # every recovered teacher is kept, not only the last one
    generator = read_json(tmp_path / "generator" / "recovery.json")["tasks"]
    assert len(generator) == iterations * 2 and all(len(t["curve"]) == 6 for t in generator)  # K=5 steps + final
    assert (tmp_path / "plots" / "metatest.png").is_file()
    grids = sorted((tmp_path / "generator" / "samples").glob("teacher_*.png"))
    assert len(grids) == len(bank["teachers"])  # one sample grid per recovered teacher
    # Second run: every stage is done already.
    weights = tmp_path / "metalearner" / "metalearner.safetensors"
    before = weights.stat().st_mtime_ns
    assert CliRunner().invoke(app, args).exit_code == 0
    assert weights.stat().st_mtime_ns == before
