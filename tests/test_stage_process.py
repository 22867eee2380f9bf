"""flows/stage_process.py: the flow's stages through DVC in its own process, each command forked from a
warm interpreter. Compared with the naive reference, the ``dvc repro`` command, on the real data."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from flows import stage_process
from free.bench.pipeline import copy_project

REPO = Path(__file__).resolve().parents[1]
SMALL = ["teachers.n_teachers=2", "teachers.max_epochs=2"]  # the teachers stage in a few seconds


def _project(root: Path, name: str) -> Path:
    project = root / name
    copy_project(REPO, project, SMALL)
    (project / ".venv").symlink_to(Path(sys.executable).parent.parent)  # bin/project-python's interpreter
    return project


@pytest.mark.data
def test_the_flows_stages_write_what_the_dvc_repro_command_writes(tmp_path: Path, monkeypatch) -> None:
    """Two copies of the project: ``dvc repro`` (the command) in one, :func:`reproduce` stage by stage in
    the other. The same dvc.lock (so the same output digests: the teachers are byte-identical), and the
    commands ran forked, not as DVC's shell commands."""
    monkeypatch.setenv("FREE_CACHE_DIR", str(tmp_path / "cache"))
    by_command, by_flow = _project(tmp_path, "command"), _project(tmp_path, "flow")
    dvc = [sys.executable, "-m", "dvc", "repro", "teachers"]
    subprocess.run(dvc, cwd=by_command, check=True, capture_output=True)

    shell_runs: list[str] = []
    real_shell = stage_process.run_shell
    monkeypatch.setattr(stage_process, "run_shell", lambda cmd, *rest: shell_runs.append(cmd) or real_shell(cmd, *rest))
    lines: list[str] = []
    titles: set[str] = set()  # of this process's descendants while the stages ran, as `ps` shows them
    environs: list[bool] = []  # whether a stage's environment in /proc is its forkserver's (recovery reads it)
    running = threading.Event()

    def watch() -> None:
        while not running.wait(0.1):
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    title = " ".join(child.cmdline()).strip()
                    titles.add(title)
                    if "-m free --params" in title:
                        environs.append(child.environ() == child.parent().environ() != {})

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for stage in ("data", "teachers"):
            stage_process.reproduce(by_flow, stage, lines.append)
    finally:
        running.set()
        watcher.join()
    assert shell_runs == []
    assert f"{sys.executable} -m free --params params.yaml teachers" in titles, titles
    assert environs and all(environs), environs
    said = "".join(lines)
    assert "Running stage 'data':" in said and "Running stage 'teachers':" in said
    assert "trained" in said  # the teachers command's own output came through
    assert (by_flow / "dvc.lock").read_text() == (by_command / "dvc.lock").read_text()

    lines.clear()
    stage_process.reproduce(by_flow, "teachers", lines.append)  # nothing changed: DVC skips it
    assert "".join(lines).startswith("Stage 'teachers' didn't change, skipping"), lines

    # DVC's run cache: outputs gone and the lock entry lost, the stage is restored, not run again.
    subprocess.run(["git", "checkout", "-q", "--", "dvc.lock"], cwd=by_flow, check=False)
    (by_flow / "dvc.lock").unlink()
    lines.clear()
    stage_process.reproduce(by_flow, "data", lines.append)
    assert any(line.startswith("Stage 'data' is cached") for line in lines), lines
    assert not any(line.startswith("Running stage") for line in lines)


def test_a_free_command_of_this_environment_runs_forked_and_anything_else_in_a_shell(tmp_path: Path) -> None:
    env = dict(os.environ)
    here = f"{sys.executable} -m free --params params.yaml metatest"
    assert stage_process.free_argv(here, tmp_path, env) == ["--params", "params.yaml", "metatest"]
    wrapper = REPO / "bin" / "project-python"  # picks $FREE_PYTHON: this interpreter, or another one
    assert stage_process.free_argv(f"{wrapper} -m free data build", REPO, {**env, "FREE_PYTHON": sys.executable})
    other = {**env, "FREE_PYTHON": "/usr/bin/python3"}
    assert stage_process.free_argv(f"{wrapper} -m free data build", REPO, other) is None
    assert stage_process.free_argv(f"{sys.executable} -m other.module", tmp_path, env) is None
    assert stage_process.free_argv(f"{here} > out.txt", tmp_path, env) is None  # needs a shell
    assert stage_process.free_argv(f"{here} && touch done", tmp_path, env) is None
    assert stage_process.free_argv("/no/such/python -m free metatest", tmp_path, env) is None


def test_a_forked_command_streams_its_output_and_returns_its_exit_code(tmp_path: Path) -> None:
    lines: list[str] = []
    env = {**os.environ, "FREE_CONFIG_DIR": str(REPO / "params")}
    assert stage_process.run_forked(["config", "show", "seed=7"], str(tmp_path), env, lines.append) == 0
    assert "seed: 7\n" in lines

    lines.clear()
    code = stage_process.run_forked(["config", "show", "no_such_key=1"], str(tmp_path), env, lines.append)
    assert code != 0
    assert "no_such_key" in "".join(lines)  # the CLI's error, as the terminal would show it


def test_a_stage_is_stopped_when_its_flow_is_interrupted(tmp_path: Path) -> None:
    """A cancelled run's SIGTERM reaches the flow as an exception while it reads a stage's output (here:
    raised by ``emit``): the stage's process is stopped then, not left to run on (a forked stage is
    stopped the same way: tests/test_worker_crash.py cancels a live run mid-stage)."""
    lines: list[str] = []

    def interrupted(line: str) -> None:
        lines.append(line)
        if line.startswith("started"):
            raise KeyboardInterrupt

    marker = str(tmp_path / "stage-marker")  # names the stage's own child (the shell's sleep) in `ps`
    command = f"echo started; exec -a {marker} sleep 120; echo finished"
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        stage_process.run_shell(f"bash -c '{command}'", str(tmp_path), dict(os.environ), interrupted)
    assert time.monotonic() - started < 60  # not the stage's 120 s
    assert lines[-1].startswith("stopping the stage's process "), lines
    pid = int(lines[-1].split()[4].rstrip(":"))
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert left == [], "what the stage started runs on"


def test_a_forked_stage_does_not_import_the_main_module_of_the_process_that_forks_it(tmp_path: Path) -> None:
    """A flow run's ``__main__`` is Prefect's runner: multiprocessing would import it again in each
    stage's process (1-2.5 s). Here a main module that says so when it is imported under another name."""
    main = tmp_path / "runner.py"
    main.write_text(
        "import sys\n"
        "if __name__ != '__main__':\n"
        "    print('MAIN IMPORTED AGAIN', flush=True)\n"
        "else:\n"
        f"    sys.path.insert(0, {str(REPO)!r})\n"
        "    from flows import stage_process\n"
        "    lines, env = [], dict(__import__('os').environ)\n"
        "    code = stage_process.run_forked(['config', 'show', 'seed=3'], '.', env, lines.append)\n"
        "    print('child said:', ''.join(lines).count('seed: 3'), 'exit', code)\n"
    )  # fmt: skip
    env = {**os.environ, "FREE_CONFIG_DIR": str(REPO / "params")}
    done = subprocess.run([sys.executable, str(main)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "child said: 1 exit 0" in done.stdout, done.stdout + done.stderr
    assert "MAIN IMPORTED AGAIN" not in done.stdout + done.stderr
