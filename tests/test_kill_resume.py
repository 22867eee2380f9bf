"""``kill -9`` at points spread over each stage, then a rerun: the outputs equal an unbroken run's (issue 13, item 7).

Each stage runs as the real command (``python -m free <stage>``) in its own process group on the real
Omniglot archives, with a configuration smaller than ``tiny`` (2 teachers, 6 meta-iterations with a
checkpoint every 2). The stage is killed with SIGKILL several times in a row on the same folder -
at fractions of the unbroken run's measured wall time, or as soon as a given file appears - and then
run to the end. Every file of its outputs (dotfiles included: DVC hashes them, so a temporary file a
killed writer left would change the recorded output) must have the unbroken run's sha256; the two
JSON files with wall-clock fields (``seconds``) are compared without them.

Two in-process tests pin the kills a poll may miss: between staging the memory bank and committing
the metatrain state, and between the commit and the folder swap (:meth:`MetaTrainLoop.save_state`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from free.artifacts import read_json, remove_stale_tmp
from free.config import compose
from free.stages import metatrain
from free.stages.metatrain import MetaTrainLoop
from tests.helpers_stages import OUTPUTS, digests, fake_overrides, record_resumes

# Small models: one torch thread is faster than two and independent of earlier tests (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]

# Smaller than tiny; measured on 2 idle cores: data 4.0 s (decoding), teachers 4.9 s, metatrain 13.8 s,
# metatest 5.2 s per unbroken run, about 2 s of each being Python's start-up.
SMALL = [
    "experiment=tiny",
    "threads=1",
    "teachers.n_teachers=2",
    "teachers.max_epochs=2",
    "teachers.width=8",
    "model.width=8",
    "inversion.inner_steps=2",
    "inversion.images_per_class=5",
    "taskcache.images_per_slot=5",
    "metalearn.q_query=2",
    "metalearn.inner_steps=2",
    "metalearn.meta_batch=2",
    "metalearn.iterations=6",
    "metalearn.checkpoint_every=2",
    "metalearn.val_every=3",
    "metalearn.val_episodes=2",
    "evaluate.episodes=4",
    "evaluate.inner_steps=2",
]

COMMANDS = {"data": ["data", "build"], "teachers": ["teachers"], "metatrain": ["metatrain"], "metatest": ["metatest"]}
# Output folders a stage reads, copied from the unbroken run (the tensor cache is shared, read-only).
INPUTS = {"data": [], "teachers": ["data"], "metatrain": ["data", "teachers"], "metatest": ["data", "metalearner"]}


@dataclass(frozen=True)
class Kill:
    """When to send SIGKILL: ``after`` this fraction of the unbroken run's wall time, or as soon as a
    path matching the glob ``when`` (under the artifacts folder) exists."""

    label: str
    after: float | None = None
    when: str | None = None


SCHEDULES = {
    "data": [Kill("starting up", after=0.3), Kill("decoding or writing the cache", after=0.75)],
    "teachers": [
        Kill("teacher 0's weights written, its card maybe not", when="teachers/teacher_000.safetensors"),
        Kill("training teacher 1", after=0.7),
    ],
    "metatrain": [
        Kill("just after the first checkpoint", when=".state/*/state.safetensors"),
        Kill("mid-run", after=0.5),
        Kill("a checkpoint's bank staged, the state not yet swapped in", when=".state/*/bank.next"),
        Kill("writing the final outputs", when="metalearner/metalearner.safetensors"),
    ],
    "metatest": [
        Kill("running episodes", after=0.6),
        Kill("per-episode file written, metrics not yet", when="metrics/metatest_episodes.json"),
    ],
}


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREE_")}
    return {**env, "FREE_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}


def _command(stage: str, artifacts: Path, root: Path) -> list[str]:
    overrides = [*SMALL, f"paths.artifacts_dir={artifacts}", f"dataset.root={root}"]
    return [sys.executable, "-m", "free", *COMMANDS[stage], *overrides]


def _run(stage: str, artifacts: Path, root: Path, cache: Path, kill: Kill | None = None, seconds: float = 0.0) -> str:
    """Run the stage; with ``kill``, SIGKILL its process group at the given point. Returns what happened:
    ``killed`` (it was still running) or ``finished`` (it ended first, exit 0)."""
    log = artifacts.parent / f"{stage}.log"
    with open(log, "ab") as out:
        out.write(f"\n--- {kill.label if kill else 'to the end'}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            _command(stage, artifacts, root),
            cwd=REPO,
            env=_env(cache),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches every process it started
        )
    started = time.monotonic()
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            due = kill is not None and (
                (kill.after is not None and elapsed >= kill.after * seconds)
                or (kill.when is not None and any(artifacts.glob(kill.when)))
            )
            if due:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return "killed"
            if elapsed > 600:
                raise AssertionError(f"{stage} still running after 600 s; see {log}")
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"{stage} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}"
    return "finished"


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory, real_omniglot_root: Path) -> dict[str, object]:
    """The whole small pipeline run stage by stage without a kill, with each stage's wall time."""
    base = tmp_path_factory.mktemp("unbroken")
    artifacts, cache = base / "artifacts", base / "cache"
    seconds = {}
    for stage in COMMANDS:
        started = time.monotonic()
        assert _run(stage, artifacts, real_omniglot_root, cache) == "finished"
        seconds[stage] = time.monotonic() - started
    return {"artifacts": artifacts, "cache": cache, "seconds": seconds}


@pytest.mark.parametrize("stage", list(COMMANDS))
def test_stage_killed_with_sigkill_at_several_points_reruns_to_the_unbroken_outputs(
    stage: str, unbroken: dict[str, object], real_omniglot_root: Path, tmp_path: Path
) -> None:
    reference: Path = unbroken["artifacts"]  # type: ignore[assignment]
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for name in INPUTS[stage]:
        shutil.copytree(reference / name, artifacts / name)
    # The data stage writes the tensor cache as well: it gets an empty one, the others read the unbroken one.
    cache = tmp_path / "cache" if stage == "data" else unbroken["cache"]

    outcomes = [
        (kill.label, _run(stage, artifacts, real_omniglot_root, cache, kill, unbroken["seconds"][stage]))  # type: ignore[index]
        for kill in SCHEDULES[stage]
    ]
    killed = [label for label, outcome in outcomes if outcome == "killed"]
    print(f"{stage}: unbroken {unbroken['seconds'][stage]:.1f} s; kills: {outcomes}")  # type: ignore[index]
    # Each kill continues the folder the previous one left; a point the poll missed lets the stage run on.
    assert killed, f"no kill landed while {stage} was running: {outcomes}"
    assert _run(stage, artifacts, real_omniglot_root, cache) == "finished"

    folders = OUTPUTS[stage]
    expected = digests([reference / f for f in folders], reference)
    assert digests([artifacts / f for f in folders], artifacts) == expected, f"after kills {outcomes}"
    if stage == "data":
        assert digests([cache], cache) == digests([unbroken["cache"]], unbroken["cache"])  # type: ignore[list-item]
    if stage == "metatrain":
        assert not list((artifacts / ".state").glob("metatrain-*")), "resume state left after the stage finished"


# ------------------------------------------------------------------ kills a poll may miss, pinned


class Killed(BaseException):
    """Stands for SIGKILL at an exact point: nothing after it runs, no ``except Exception`` catches it."""


@pytest.mark.parametrize("moment", ["bank staged, state not written", "state written, folders not swapped"])
def test_metatrain_killed_inside_a_checkpoint_resumes_to_the_same_artifacts(
    fake_metatrained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """Before the fix the bank was written in place before the state: a kill between the two resumed
    from the older state with the newer bank, and the run ended with other weights."""
    root, unbroken_root = fake_metatrained  # the unbroken run; its inputs copied for the broken one
    broken_root = tmp_path / "broken"
    for name in ("data", "teachers"):
        shutil.copytree(unbroken_root / name, broken_root / name)
    broken = compose(fake_overrides(root, broken_root))
    real_save = metatrain.save_tensors
    iteration = {"n": 0}
    original_step = MetaTrainLoop.step

    def step(self: MetaTrainLoop) -> None:
        original_step(self)
        iteration["n"] = self.iteration

    def save_tensors(path: Path, tensors, meta=None):
        if Path(path).name == "state.safetensors" and iteration["n"] == 4:
            if moment.startswith("bank staged"):
                raise Killed
            real_save(path, tensors, meta)
            raise Killed
        return real_save(path, tensors, meta)

    monkeypatch.setattr(MetaTrainLoop, "step", step)
    monkeypatch.setattr(metatrain, "save_tensors", save_tensors)
    with pytest.raises(Killed):
        metatrain.run(broken)
    state_dir = next((tmp_path / "broken" / ".state").glob("metatrain-*"))
    assert (state_dir / "bank.next").is_dir()  # the kill left the staged bank
    staged = read_json(state_dir / "bank.next" / "manifest.json")
    monkeypatch.setattr(metatrain, "save_tensors", real_save)

    resumed_at = record_resumes(monkeypatch)
    metatrain.run(broken)
    assert resumed_at == ([2] if moment.startswith("bank staged") else [4])
    assert staged["teachers"]  # a real bank was staged
    expected = digests([unbroken_root / name for name in OUTPUTS["metatrain"]], unbroken_root)
    assert digests([broken_root / name for name in OUTPUTS["metatrain"]], broken_root) == expected


def test_temporary_files_of_a_killed_writer_are_removed_and_a_live_writers_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has ended
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "sub").mkdir()
        left = [tmp_path / f".teacher_001.safetensors.tmp{dead_pid}", tmp_path / "sub" / f"cache.tmp{dead_pid}"]
        in_flight = tmp_path / f".zoo.json.tmp{live.pid}"
        kept = [tmp_path / "teacher_001.safetensors", tmp_path / "notes.tmp", in_flight]
        for path in (*left, *kept):
            path.write_bytes(b"x")
        assert sorted(remove_stale_tmp(tmp_path)) == sorted(left)
        assert all(p.exists() for p in kept) and not any(p.exists() for p in left)
    finally:
        live.kill()
        live.wait()
