"""A full disk or an unwritable artifacts folder: a clear error before work is lost (issue 13, item 8).

We run as root, so ``chmod`` cannot make a folder unwritable. The faults are real kernel errors:

* ``/dev/full`` answers every write with ENOSPC. A symlink to it planted at the temporary name a
  writer of this process will use (``.<file>.tmp<pid>``, see :func:`free.artifacts.write_atomic`)
  makes exactly that one write fail with "No space left on device", at a chosen file and moment,
  while every other write succeeds.
* A small tmpfs mounted in the test's own mount namespace (``unshare -m``), filled up or remounted
  read-only, holds a whole artifacts folder (skipped, with the reason, where ``unshare`` cannot
  mount; the ``/dev/full`` tests cover the same code paths everywhere).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from free.artifacts import load_tensors
from free.cli import app
from free.config import compose
from free.data import cache
from free.stages import data, metatrain, teachers
from free.stages.metatrain import MetaTrainLoop
from free.taskcache import MemoryBank
from tests.helpers_stages import OUTPUTS, digests, fake_inputs, fake_overrides, record_resumes

# Small models: one torch thread is faster than two and independent of earlier tests (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _full_at(path: Path) -> Path:
    """Make this process's next atomic write of ``path`` hit a full disk (ENOSPC from /dev/full)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.symlink_to("/dev/full")
    return tmp


def _assert_storage_error(result, *names: str) -> None:
    assert result.exit_code == 1, result.output
    assert "storage error" in result.output and "Traceback" not in result.output, result.output
    assert "No space left on device (ENOSPC)" in result.output and "Fix: free space" in result.output
    for name in names:
        assert name in result.output, (name, result.output)


@pytest.mark.parametrize(
    ("stage", "folder"),
    [("data", "data"), ("teachers", "teachers"), ("metatrain", "metalearner"), ("metatest", "metrics")],
)
def test_a_full_output_folder_fails_at_stage_start_before_any_work(
    fake_omniglot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, folder: str
) -> None:
    artifacts = tmp_path / "artifacts"
    if stage in ("metatrain", "metatest"):  # their inputs, so that the probe is what stops them
        fake_inputs(fake_omniglot, artifacts)
        if stage == "metatest":
            (artifacts / "metalearner").mkdir()
            shutil.copy(REPO / "tests" / "test_disk_faults.py", artifacts / "metalearner" / "metalearner.safetensors")
    probe = artifacts / folder / f".write-probe.tmp{os.getpid()}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.symlink_to("/dev/full")
    work = []  # the first piece of work of each stage, watched (it still runs if reached)
    for module, name in ((data, "load_dataset"), (teachers, "load_splits"), (metatrain, "load_zoo")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, **k: (work.append(1), _o(*a, **k))[1])

    command = ["data", "build"] if stage == "data" else [stage]
    result = runner.invoke(app, [*command, *fake_overrides(fake_omniglot, artifacts)])

    _assert_storage_error(result, f"output folder {artifacts / folder} is not writable", "before any work")
    assert not work, f"{stage} started working before failing"
    assert not probe.exists() and not probe.is_symlink()  # the probe is removed
    if stage == "metatest":  # the (not even valid) checkpoint was never opened: the probe came first
        assert "checkpoint error" not in result.output


def test_a_full_disk_while_training_teachers_keeps_the_finished_ones(
    fake_omniglot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = fake_overrides(fake_omniglot, tmp_path / "artifacts")
    data.run(compose(overrides))
    out = tmp_path / "artifacts" / "teachers"
    planted = _full_at(out / "teacher_001.safetensors")

    result = runner.invoke(app, ["teachers", *overrides])

    _assert_storage_error(result, f"cannot write {out / 'teacher_001.safetensors'}", "rerun the same command")
    assert not planted.is_symlink() and not planted.exists()  # the failed temporary file is removed
    assert {p.name for p in out.iterdir()} == {"teacher_000.safetensors", "teacher_000.json"}
    summary = teachers.run(compose(overrides))  # space freed: only the teacher that failed is trained
    assert (summary["trained"], summary["reused"]) == (1, 1)
    unbroken = tmp_path / "unbroken"
    fake_inputs(fake_omniglot, unbroken)
    assert digests([out], tmp_path / "artifacts") == digests([unbroken / "teachers"], unbroken)


def test_a_full_disk_at_a_metatrain_checkpoint_keeps_the_previous_one_and_resumes_from_it(
    fake_metatrained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, unbroken = fake_metatrained  # the unbroken run (shared: only read)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for name in ("data", "teachers"):
        shutil.copytree(unbroken / name, artifacts / name)
    overrides = fake_overrides(root, artifacts)
    original_save = MetaTrainLoop.save_state

    def save_state(self: MetaTrainLoop, directory: Path) -> None:
        if self.iteration == 4:  # the disk fills up before the second checkpoint
            _full_at(directory / "state.safetensors")
        original_save(self, directory)

    monkeypatch.setattr(MetaTrainLoop, "save_state", save_state)
    result = runner.invoke(app, ["metatrain", *overrides])
    monkeypatch.setattr(MetaTrainLoop, "save_state", original_save)

    state_dir = next((artifacts / ".state").glob("metatrain-*"))
    _assert_storage_error(result, f"cannot write {state_dir / 'state.safetensors'}")
    # The checkpoint of iteration 2 is whole: its state, the bank it names, and nothing half-written.
    assert sorted(p.name for p in state_dir.iterdir()) == ["bank", "state.safetensors"]
    _, meta = load_tensors(state_dir / "state.safetensors")
    assert meta["iteration"] == 2
    MemoryBank.load(state_dir / "bank")  # verifies every shard against its manifest
    assert not (artifacts / "metalearner" / "metalearner.safetensors").exists()

    resumed_at = record_resumes(monkeypatch)
    result = runner.invoke(app, ["metatrain", *overrides])  # space freed
    assert result.exit_code == 0, result.output
    assert resumed_at == [2]
    folders = OUTPUTS["metatrain"]
    assert digests([artifacts / f for f in folders], artifacts) == digests([unbroken / f for f in folders], unbroken)


def test_a_full_disk_while_writing_the_tensor_cache_names_the_file_and_leaves_no_partial_file(
    fake_omniglot: Path, tmp_path: Path
) -> None:
    """The decoded-tensor cache is written by free.data.cache, not by a stage's own writer; the disk
    fills up in the middle of it (after the data stage's start-up probe of the cache folder passed)."""
    overrides = fake_overrides(fake_omniglot, tmp_path / "artifacts")
    cfg = compose(overrides)
    ds = cfg.dataset
    cache_file = cache.cache_path(Path(cfg.paths.cache_dir), ds.name, Path(ds.root), ds.image_size)
    planted = _full_at(cache_file)

    result = runner.invoke(app, ["data", "build", *overrides])

    _assert_storage_error(result, f"cannot write {cache_file}", "FREE_CACHE_DIR (paths.cache_dir)")
    assert not planted.is_symlink() and not planted.exists()  # the failed temporary file is removed
    assert sorted(p.name for p in cache_file.parent.iterdir()) == []  # no cache file, whole or partial
    result = runner.invoke(app, ["data", "build", *overrides])  # space freed
    assert result.exit_code == 0, result.output
    assert cache.load(cache_file) is not None


def test_a_library_write_on_a_full_disk_is_a_storage_error_not_a_traceback(tmp_path: Path) -> None:
    """Writes that do not go through free.artifacts (a library's own file) still end in one clear line."""
    import typer

    from free.cli.common import friendly_errors

    probe_app = typer.Typer()

    @probe_app.command()
    @friendly_errors
    def write() -> None:
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 8192)

    result = runner.invoke(probe_app, [])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "storage error" in result.output and "No space left on device (ENOSPC)" in result.output


# ---------------------------------------------------------------- a real small disk (tmpfs)


def _can_mount_tmpfs(tmp_path: Path) -> str | None:
    """``None`` if ``unshare -m`` can mount a tmpfs here, else why not (the skip reason)."""
    if shutil.which("unshare") is None:
        return "cannot mount a tmpfs: no `unshare` command (util-linux) on PATH"
    point = tmp_path / "mount-check"
    point.mkdir()
    check = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {point}"], capture_output=True, text=True
    )
    if check.returncode == 0:
        return None
    said = check.stderr.strip() or f"exit {check.returncode}"
    return (
        f"cannot mount a tmpfs in a private mount namespace (`unshare -m` + `mount -t tmpfs`: {said}): that "
        "needs CAP_SYS_ADMIN (root, or a container that grants it); the /dev/full tests cover the same code paths"
    )


@pytest.mark.parametrize(
    ("state", "message"),
    [("full", "No space left on device (ENOSPC)"), ("read-only", "Read-only file system (EROFS)")],
)
def test_a_full_or_read_only_tmpfs_as_artifacts_folder_fails_at_once(
    fake_omniglot: Path, tmp_path: Path, state: str, message: str
) -> None:
    reason = _can_mount_tmpfs(tmp_path)
    if reason:
        pytest.skip(reason)
    disk = tmp_path / "disk"
    disk.mkdir()
    fault = (
        "dd if=/dev/zero of=$DISK/filler bs=4k 2>/dev/null; true" if state == "full" else "mount -o remount,ro $DISK"
    )
    # The folder exists, as after an earlier run; then the disk fills up or goes read-only.
    script = f'mount -t tmpfs -o size=256k tmpfs $DISK && mkdir -p $DISK/artifacts/teachers && {fault} && exec "$@"'
    free_cmd = [sys.executable, "-m", "free", "teachers", *fake_overrides(fake_omniglot, disk / "artifacts")]
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *free_cmd],
        cwd=REPO,
        env={**os.environ, "DISK": str(disk)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"output folder {disk / 'artifacts' / 'teachers'} is not writable" in result.stderr, result.stderr
    assert message in result.stderr and "before any work" in result.stderr
