"""``free bench pipeline``: what orchestration costs - the tiny pipeline three ways, and no-op reruns.

In fresh copies of the project (tracked files, as a new git repository; one copy per front door,
so that no DVC cache or run cache helps a later run), with the same resolved ``params.yaml``:

* ``bare``    - ``free --params params.yaml pipeline``: the stages in one process, no services;
* ``dvc``     - ``dvc repro``: one process per stage, DVC hashing deps and outs and writing dvc.lock;
* ``prefect`` - ``prefect deployment run free/full-pipeline --watch`` through the local stack
  (Prefect server + worker + MLflow + S3 on free loopback ports): each stage a task, DVC's
  reproduction of it in the flow's process and its command forked from a warm interpreter
  (``flows/stage_process.py``), plus MLflow runs, ``dvc push`` and model registration.

Then each again with nothing changed (the no-op rerun). ``free stack up`` is timed separately: it
is paid once per machine, not per run. Wall times are of the whole command, as a user sees them.
The metatest numbers of the three runs are recorded too; they must be identical.

Each deployment run is also split into its parts, from the timestamps the Prefect API keeps
(:func:`breakdown`): the CLI until the run exists, the wait until it runs (the worker's poll and
the flow-run process's start and imports), each task, and the CLI after the run ended; and the CPU
seconds the stack's servers (Prefect, MLflow, S3) used meanwhile (:func:`group_cpu`): with the tiny
preset's torch using both cores, what they use is taken from the stages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from free.artifacts import read_json
from free.bench.common import pyplot, savefig

BIN = Path(sys.executable).parent
FRONT_DOORS = ("bare", "dvc", "prefect")  # the default order of a bench: bare first


def copy_project(source: Path, dest: Path, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """The code of ``source`` (HEAD plus the change under test), without what its user ran, as a fresh
    git repository in ``dest``, its ``params.yaml`` composed with ``overrides``.

    Copies the files git tracks (staged new files included), as they are in the working tree (a
    change under test need not be committed yet); never untracked or ignored ones: ``state/``, run
    results (``dvc.lock``, ``artifacts/``), ``.venv``, caches, ``.dvc/config.local``. ``params.yaml``
    is the one tracked file that running the project rewrites (``dvc exp run -S``, ``free config
    params``): it is written anew from the copy's own ``params/`` tree, so the copy runs the defaults
    (the tiny preset) with ``overrides``.
    """
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=source, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (source / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, dest / name)
    (dest / ".dvc" / "config.local").unlink(missing_ok=True)  # machine credentials stay with their machine
    env = {**os.environ, "FREE_CONFIG_DIR": str(dest / "params")}
    write_params = [sys.executable, "-m", "free", "config", "params", *overrides]
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


def _api(url: str, body: dict | None = None) -> Any:
    """One call to the Prefect REST API (JSON; POST when ``body``): standard library, no Prefect import."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (the stack's loopback URL)
        return json.load(response)


def _at(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def breakdown(api_url: str, cli_log: str, cli_started: float, cli_ended: float) -> dict[str, Any]:
    """Where a ``prefect deployment run --watch`` spent its wall time, in seconds: ``cli_to_created``
    (the CLI's start, creating the run), ``created_to_running`` (the worker's poll, the flow-run
    process's start and imports), ``flow`` (running to ended) and within it each task run by name in
    order (``tasks``) and ``untasked`` (the flow's own code between tasks), then ``after_end``
    (the CLI after the run ended: Prefect waits 3 s for late events). ``cli_*`` are ``time.time()``."""
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", cli_log).group(1)  # the CLI prints the run it created
    run = _api(f"{api_url}/flow_runs/{run_id}")
    created, started, ended = _at(run["created"]), _at(run["start_time"]), _at(run["end_time"])
    filter_ = {"flow_runs": {"id": {"any_": [run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    task_runs = sorted(_api(f"{api_url}/task_runs/filter", filter_), key=lambda r: _at(r["start_time"]))
    tasks = [
        [re.sub(r"-[0-9a-f]{3}$", "", r["name"]), round(_at(r["end_time"]) - _at(r["start_time"]), 2)]
        for r in task_runs
    ]  # fmt: skip
    # Tasks may run side by side (push and registration): the union of their intervals is task time.
    busy, last = 0.0, started
    for r in task_runs:
        begin, end = max(_at(r["start_time"]), last), _at(r["end_time"])
        busy, last = busy + max(0.0, end - begin), max(last, end)
    return {
        "cli_to_created": round(created - cli_started, 2),
        "created_to_running": round(started - created, 2),
        "flow": round(ended - started, 2),
        "tasks": tasks,
        "untasked": round(ended - started - busy, 2),
        "after_end": round(cli_ended - ended, 2),
    }


SERVERS = ("prefect", "mlflow", "s3")  # the stack's services whose CPU is counted during each deployment run


def group_cpu(pgids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the live processes of each named process group."""
    import psutil

    names = {pgid: name for name, pgid in pgids.items()}
    totals = dict.fromkeys(pgids, 0.0)
    for proc in psutil.process_iter():
        try:
            name = names.get(os.getpgid(proc.pid))
            if name is not None:
                times = proc.cpu_times()
                totals[name] += times.user + times.system
        except (psutil.Error, ProcessLookupError):
            pass  # ended meanwhile
    return totals


def _load(before: float) -> dict[str, list[float]]:
    """The 1-minute load average before and after a front door's two runs: the cores are shared, and a
    busy neighbour stretches one front door's time and not another's."""
    return {"load_average": [round(before, 2), round(os.getloadavg()[0], 2)]}


def _reruns(n: int) -> str:
    return "no-op rerun" if n == 1 else f"{n} no-op reruns"


def _rerun_log(logs: Path, name: str, i: int) -> Path:
    return logs / (f"{name}-rerun.log" if i == 0 else f"{name}-rerun{i + 1}.log")


def _noop(seconds: list[float]) -> dict[str, Any]:
    """``noop_seconds``: the median of the reruns (the lower middle one, so a run that happened);
    ``noop_runs``: each, when there was more than one."""
    return {"noop_seconds": statistics.median_low(seconds), **({"noop_runs": seconds} if len(seconds) > 1 else {})}


# A finished progress bar of a stage: `meta-training (free) ━━━━━━━━ 20/20 0:00:36 eta 0:00:00`.
_DONE_BAR = re.compile(r"^(?P<label>\S.*?) [━╸╺]+ (?P<n>\d+)/(?P=n) (?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d)\b")


def stage_clocks(output: str) -> dict[str, int]:
    """The elapsed clock of each finished progress bar in a run's output (whole seconds, by label: the
    teachers, meta-training, each meta-test setting): the same work in each front door, timed by the
    stages themselves. The machine's own speed drifts by tens of percent over minutes (a shared host),
    so these show how fast the cores were while each front door ran."""
    clocks: dict[str, int] = {}
    for line in output.replace("\r", "\n").splitlines():
        if found := _DONE_BAR.match(line.strip()):
            clocks[found["label"]] = int(found["h"]) * 3600 + int(found["m"]) * 60 + int(found["s"])
    return clocks


def _headline(project: Path) -> dict[str, Any]:
    metrics = read_json(project / "artifacts" / "metrics" / "metatest.json")
    return {k: v["acc"] for k, v in metrics.items() if isinstance(v, dict)}


def run(
    source: Path,
    work: Path,
    cache_dir: Path,
    say: Callable[[str], None] = print,
    overrides: list[str] | None = None,
    reruns: int = 1,
    order: tuple[str, ...] = FRONT_DOORS,
) -> dict[str, Any]:
    """The three front doors on the tiny preset with ``overrides`` (the same for each: the copies'
    ``params.yaml``, and the deployment run's parameters); an override that chooses an experiment
    replaces the tiny preset. Each first run is followed by ``reruns`` no-op reruns: the result's
    ``noop_seconds`` is their median (the lower middle one: a run that happened, whose breakdown
    is the deployment's ``noop``), ``noop_runs`` all of them. ``order``: which front door runs
    first (the host's speed can drift over the minutes a bench takes, against whichever runs last)."""
    from free.config import params_yaml, with_default_experiment

    if sorted(order) != sorted(FRONT_DOORS):
        raise ValueError(f"order must name each of {', '.join(FRONT_DOORS)} once, got {', '.join(order) or 'none'}")
    overrides = list(overrides or [])
    composed = with_default_experiment(overrides)  # what `free config params <overrides>` composes in each copy
    params_yaml(composed)  # a bad override fails here, naming itself
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
        copy_project(source, project, overrides)

    runs: dict[str, dict[str, Any]] = {}
    commands = {
        "bare": [str(BIN / "free"), "--params", "params.yaml", "pipeline"],
        "dvc": [str(BIN / "dvc"), "repro"],
    }
    for name in order:
        if name == "prefect":
            stack_seconds, runs[name] = _deployment(projects[name], work, env, logs, overrides, composed, reruns, say)
            continue
        argv = commands[name]
        say(f"{name}: {' '.join(argv[-3:])} (first run, then {_reruns(reruns)})")
        load = os.getloadavg()[0]
        first = _timed_command(argv, projects[name], env, logs / f"{name}.log")
        clocks = stage_clocks((logs / f"{name}.log").read_text(errors="replace"))
        again = [_timed_command(argv, projects[name], env, _rerun_log(logs, name, i)) for i in range(reruns)]
        runs[name] = {"command": " ".join(argv), "seconds": first, **_noop(again), **_load(load)}
        runs[name]["stage_clocks"] = clocks

    metrics = {name: _headline(project) for name, project in projects.items()}
    bare = runs["bare"]["seconds"]
    return {
        "overrides": overrides,
        "order": list(order),
        "params": (projects["bare"] / "params.yaml").read_text(),
        "stack_up_seconds": stack_seconds,
        "runs": {name: runs[name] for name in FRONT_DOORS},
        "overhead_vs_bare": {name: runs[name]["seconds"] - bare for name in FRONT_DOORS},
        "metatest": metrics,
        "identical_metrics": all(m == metrics["bare"] for m in metrics.values()),
        "logs": str(logs),
    }


def _deployment(
    project: Path, work: Path, env: dict[str, str], logs: Path, overrides: list[str], composed: list[str],
    reruns: int, say: Callable[[str], None],
) -> tuple[float, dict[str, Any]]:  # fmt: skip
    """``free stack up`` for ``project`` (its seconds), then the deployment's first run and ``reruns``
    no-op reruns through ``prefect deployment run --watch``; the stack goes down after."""
    from free import stack

    settings = stack.StackSettings(
        state_dir=work / "state",
        project_dir=project,
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
        client = {**env, **stack.client_env(settings), "FREE_CONFIG_DIR": str(project / "params")}
        argv = [str(BIN / "prefect"), "deployment", "run", "free/full-pipeline", "--watch"]
        if overrides:  # the flow's own experiment parameter (tiny) off: the copies' composition exactly
            argv += ["--params", json.dumps({"experiment": "", "overrides": composed})]
        say(f"prefect: prefect deployment run free/full-pipeline --watch (first run, then {_reruns(reruns)})")
        load = os.getloadavg()[0]
        done = []
        services = stack._read_state(settings)["services"]
        pgids = {name: services[name]["pgid"] for name in SERVERS}
        for log in [logs / "prefect.log", *(_rerun_log(logs, "prefect", i) for i in range(reruns))]:
            cli_started, cpu_before = time.time(), group_cpu(pgids)
            seconds = _timed_command(argv, project, client, log)
            split = breakdown(settings.prefect_api_url, log.read_text(), cli_started, time.time())
            cpu = {name: round(used - cpu_before[name], 2) for name, used in group_cpu(pgids).items()}
            done.append({"seconds": seconds, **split, "servers_cpu_seconds": cpu})
            if len(done) == 1:  # the stages' output of the first run, before a rerun's "skipped" replaces it
                stage_logs = project / ".dvc" / "tmp" / "free-stage-logs"
                shutil.copytree(stage_logs, logs / "prefect-stages")
                outputs = [log.read_text(errors="replace") for log in sorted(stage_logs.glob("*.log"))]
                clocks = stage_clocks("".join(outputs))
        noop = _noop([part["seconds"] for part in done[1:]])
        median = next(part for part in done[1:] if part["seconds"] == noop["noop_seconds"])
        result = {
            "command": " ".join(argv),
            "seconds": done[0]["seconds"],
            **noop,
            **_load(load),
            "breakdown": {"first": done[0], "noop": median},
            "stage_clocks": clocks,
        }
    finally:
        stack.down(settings, say=lambda line: None)
        os.environ.clear()
        os.environ.update(saved_env)
    return stack_seconds, result


def plot(result: dict[str, Any], json_path: Path) -> Path:
    """First run and no-op rerun per front door."""
    plt = pyplot()
    names = list(result["runs"])
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [result["runs"][n]["seconds"] for n in names], width=0.4, label="first run")
    ax.bar([x + 0.2 for x in xs], [result["runs"][n]["noop_seconds"] for n in names], width=0.4, label="no-op rerun")
    ax.set_xticks(list(xs), names)
    preset = " ".join(["tiny", *result.get("overrides", [])])
    ax.set(ylabel="wall time (s)", title=f"{preset} pipeline; stack up once: {result['stack_up_seconds']:.0f} s")
    ax.legend()
    return savefig(fig, json_path)
