"""``free bench pipeline``: what orchestration costs - the tiny pipeline three ways, and no-op reruns.

In fresh copies of the project (tracked files, as a new git repository; one copy per front door,
so that no DVC cache or run cache helps a later run), with the same resolved ``params.yaml``:

* ``bare``    - ``free --params params.yaml pipeline``: the stages in one process, no services;
* ``dvc``     - ``dvc repro``: one process per stage, DVC hashing deps and outs and writing dvc.lock;
* ``prefect`` - ``prefect deployment run free/full-pipeline --watch`` through the local stack
  (Prefect server + worker + MLflow + S3 on free loopback ports): ``dvc repro --single-item`` per
  stage as a task, plus MLflow runs, ``dvc push`` and model registration.

Then each again with nothing changed (the no-op rerun). ``free stack up`` is timed separately: it
is paid once per machine, not per run. Wall times are of the whole command, as a user sees them.
The metatest numbers of the three runs are recorded too; they must be identical.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from free.artifacts import read_json
from free.bench.common import pyplot, savefig

BIN = Path(sys.executable).parent


def copy_project(source: Path, dest: Path) -> None:
    """The code of ``source`` (HEAD plus the change under test), without what its user ran, as a fresh
    git repository in ``dest``.

    Copies the files git tracks (staged new files included), as they are in the working tree (a
    change under test need not be committed yet); never untracked or ignored ones: ``state/``, run
    results (``dvc.lock``, ``artifacts/``), ``.venv``, caches, ``.dvc/config.local``. ``params.yaml``
    is the one tracked file that running the project rewrites (``dvc exp run -S``, ``free config
    params``): it is written anew from the copy's own ``params/`` tree, so the copy runs the defaults.
    """
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=source, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (source / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, dest / name)
    (dest / ".dvc" / "config.local").unlink(missing_ok=True)  # machine credentials stay with their machine
    env = {**os.environ, "FREE_CONFIG_DIR": str(dest / "params")}
    write_params = [sys.executable, "-m", "free", "config", "params"]
    subprocess.run(write_params, cwd=dest, env=env, check=True, capture_output=True)
    git = ["git", "-c", "user.name=free-bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)


def _timed_command(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    """Run ``argv``, its output into ``log``; return wall seconds (error with the log tail if it fails)."""
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run(argv, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=3600)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode} in {cwd} (log {log}):\n{tail}")
    return seconds


def _load(before: float) -> dict[str, list[float]]:
    """The 1-minute load average before and after a front door's two runs: the cores are shared, and a
    busy neighbour stretches one front door's time and not another's."""
    return {"load_average": [round(before, 2), round(os.getloadavg()[0], 2)]}


def _headline(project: Path) -> dict[str, Any]:
    metrics = read_json(project / "artifacts" / "metrics" / "metatest.json")
    return {k: v["acc"] for k, v in metrics.items() if isinstance(v, dict)}


def run(source: Path, work: Path, cache_dir: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    from free import stack

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = {
        **os.environ,
        "FREE_CACHE_DIR": str(cache_dir.resolve()),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # DVC stages call `python`
    }
    env.pop("FREE_STATE_DIR", None)
    logs = work / "logs"
    logs.mkdir()
    projects = {name: work / name for name in ("bare", "dvc", "prefect")}
    for project in projects.values():
        project.mkdir()
        copy_project(source, project)

    runs: dict[str, dict[str, Any]] = {}
    commands = {
        "bare": [str(BIN / "free"), "--params", "params.yaml", "pipeline"],
        "dvc": [str(BIN / "dvc"), "repro"],
    }
    for name, argv in commands.items():
        say(f"{name}: {' '.join(argv[-3:])} (first run, then no-op rerun)")
        load = os.getloadavg()[0]
        first = _timed_command(argv, projects[name], env, logs / f"{name}.log")
        again = _timed_command(argv, projects[name], env, logs / f"{name}-rerun.log")
        runs[name] = {"command": " ".join(argv), "seconds": first, "noop_seconds": again, **_load(load)}

    settings = stack.StackSettings(
        state_dir=work / "state",
        project_dir=projects["prefect"],
        prefect_port=stack.free_port_block(1),
        mlflow_port=stack.free_port_block(1),
        s3_port=stack.free_port_block(1),
        aux_port=stack.free_port_block(9),
    )
    saved_env = dict(os.environ)
    os.environ.update({k: env[k] for k in ("FREE_CACHE_DIR", "PATH")})  # the worker inherits these
    try:
        say("prefect: free stack up (timed separately)")
        started = time.perf_counter()
        stack.up(settings, say=lambda line: None)
        stack_seconds = time.perf_counter() - started
        client = {**env, **stack.client_env(settings), "FREE_CONFIG_DIR": str(projects["prefect"] / "params")}
        argv = [str(BIN / "prefect"), "deployment", "run", "free/full-pipeline", "--watch"]
        say("prefect: prefect deployment run free/full-pipeline --watch (first run, then no-op rerun)")
        load = os.getloadavg()[0]
        first = _timed_command(argv, projects["prefect"], client, logs / "prefect.log")
        again = _timed_command(argv, projects["prefect"], client, logs / "prefect-rerun.log")
        runs["prefect"] = {"command": " ".join(argv), "seconds": first, "noop_seconds": again, **_load(load)}
    finally:
        stack.down(settings, say=lambda line: None)
        os.environ.clear()
        os.environ.update(saved_env)

    metrics = {name: _headline(project) for name, project in projects.items()}
    bare = runs["bare"]["seconds"]
    return {
        "params": (source / "params.yaml").read_text(),
        "stack_up_seconds": stack_seconds,
        "runs": runs,
        "overhead_vs_bare": {name: r["seconds"] - bare for name, r in runs.items()},
        "metatest": metrics,
        "identical_metrics": all(m == metrics["bare"] for m in metrics.values()),
        "logs": str(logs),
    }


def plot(result: dict[str, Any], json_path: Path) -> Path:
    """First run and no-op rerun per front door."""
    plt = pyplot()
    names = list(result["runs"])
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [result["runs"][n]["seconds"] for n in names], width=0.4, label="first run")
    ax.bar([x + 0.2 for x in xs], [result["runs"][n]["noop_seconds"] for n in names], width=0.4, label="no-op rerun")
    ax.set_xticks(list(xs), names)
    ax.set(ylabel="wall time (s)", title=f"tiny pipeline; stack up once: {result['stack_up_seconds']:.0f} s")
    ax.legend()
    return savefig(fig, json_path)
