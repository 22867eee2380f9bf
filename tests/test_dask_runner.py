"""runner=dask: the stage commands fan out on a real LocalCluster through Prefect, with the local runner's outputs.

Each test runs the real CLI (`python -m free ...`) as a subprocess in private artifacts folders, on a fake
Omniglot smaller than the tiny preset, against Prefect's ephemeral server (no PREFECT_API_URL), whose
state goes to a private PREFECT_HOME shared by this module's tests (its database is set up once).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from free.checkpoints import classifier_meta, save_classifier
from free.models import build_classifier
from tests.conftest import write_omniglot_archive, write_sha256sums

# Smaller than tiny: 24 classes x 4 images -> 12 / 6 / 6 classes; 3 small teachers, 6 episodes per shot
# setting in chunks of 2.
FAKE = [
    "experiment=tiny",
    "dataset.split.train=0.5",
    "dataset.split.val=0.25",
    "teachers.n_teachers=3",
    "teachers.width=8",
    "teachers.max_epochs=2",
    "evaluate.episodes=6",
    "evaluate.episode_batch=2",
    "evaluate.q_query=2",
    "evaluate.shots=[1,2]",
    "evaluate.inner_steps=2",
    "threads=1",
]
DASK = ["runner=dask", "runner.workers=2"]


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "omniglot"
    root.mkdir()
    write_omniglot_archive(root / "images_background_small1.zip", {"Greek": 6, "Alpha": 5})
    write_omniglot_archive(root / "images_background_small2.zip", {"Greek": 6, "Beta": 6, "Gamma": 7})
    write_sha256sums(root)
    return root


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prefect")


def free(command: str, artifacts: Path, omniglot: Path, prefect_home: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m free <command>`` on the fake data into ``artifacts``; no Prefect server or S3 in reach."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "FREE_S3_"))}
    env["PREFECT_HOME"] = str(prefect_home)
    overrides = [f"dataset.root={omniglot}", f"paths.artifacts_dir={artifacts}", *FAKE, *extra]
    return subprocess.run(
        [sys.executable, "-m", "free", *command.split(), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, omniglot: Path, prefect_home: Path) -> Path:
    """An artifacts folder after `free data build` (run once: the same for every test, about 4 s a run)."""
    base = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as env:  # module-scoped: no test's isolated cache exists yet
        env.setenv("FREE_CACHE_DIR", str(base / "cache"))
        ok(free("data build", base / "artifacts", omniglot, prefect_home))
    return base / "artifacts"


def with_data(built: Path, artifacts: Path) -> Path:
    """``artifacts`` with the data stage's output copied in, as if `free data build` had run there."""
    shutil.copytree(built / "data", artifacts / "data")
    return artifacts


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_dask_teachers_are_byte_identical_to_local(
    tmp_path: Path, omniglot: Path, prefect_home: Path, built: Path
) -> None:
    local, dask = with_data(built, tmp_path / "local"), with_data(built, tmp_path / "dask")
    ok(free("teachers", local, omniglot, prefect_home))
    done = free("teachers", dask, omniglot, prefect_home, *DASK)
    output = ok(done)

    assert all(f"Task run 'teacher-{i}'" in output for i in range(3)), output[-3000:]  # one mapped task each
    summary = json.loads(done.stdout[("\n" + done.stdout).rindex("\n{") :])  # the stage's summary, printed last
    assert summary["tasks_seconds"] > 0 and summary["trained"] == 3, summary  # the tasks' time is reported
    expected = digests(local / "teachers")
    assert {f"teacher_{i:03d}.safetensors" for i in range(3)} <= expected.keys()
    assert digests(dask / "teachers") == expected  # weights, cards, zoo.json and the done marker

    again = ok(free("teachers", dask, omniglot, prefect_home, *DASK))  # up to date: no fan-out at all
    assert '"reused": 3' in again and "Task run" not in again


def test_metatest_shards_give_the_same_metrics_as_the_loop(
    tmp_path: Path, omniglot: Path, prefect_home: Path, built: Path
) -> None:
    local, dask = with_data(built, tmp_path / "local"), with_data(built, tmp_path / "dask")
    # A meta-learner as metatrain writes it (Conv4, batch-statistics BatchNorm), at a fixed random init.
    meta = classifier_meta("conv4", 1, 5, 28, 8, [0.5], [0.5], False)
    model = build_classifier("conv4", 1, 5, 28, 8, [0.5], [0.5], track_running_stats=False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for artifacts in (local, dask):
        (artifacts / "metalearner").mkdir()
        save_classifier(artifacts / "metalearner" / "metalearner.safetensors", state, meta)
    ok(free("metatest", local, omniglot, prefect_home))
    output = ok(free("metatest", dask, omniglot, prefect_home, *DASK))

    # Two shards per setting on the chunk grid of 2 (episodes 0-1 and 2-5), for 1 and 2 shots.
    for name in ("metatest-1shot-0-2", "metatest-1shot-2-6", "metatest-2shot-0-2", "metatest-2shot-2-6"):
        assert f"Task run '{name}'" in output, output[-3000:]
    for name in ("metatest.json", "metatest_episodes.json"):
        assert (dask / "metrics" / name).read_bytes() == (local / "metrics" / name).read_bytes()


def test_a_failed_teacher_task_is_named_and_fails_the_stage(
    tmp_path: Path, omniglot: Path, prefect_home: Path, built: Path
) -> None:
    artifacts = with_data(built, tmp_path / "art")
    # A real fault: a folder where teacher 1's weights must go, so only that task cannot write its file.
    (artifacts / "teachers" / "teacher_001.safetensors").mkdir(parents=True)
    done = free("teachers", artifacts, omniglot, prefect_home, *DASK)

    assert done.returncode != 0
    assert "teacher 1:" in done.stderr and "failed on the dask runner" in done.stderr, done.stderr[-3000:]
    assert "teacher 0:" not in done.stderr and "teacher 2:" not in done.stderr
    written = digests(artifacts / "teachers")
    assert {"teacher_000.json", "teacher_002.json"} <= written.keys()  # the others finished: a rerun reuses them
    assert "zoo.json" not in written and ".done.json" not in written  # no finished zoo to mistake for one
