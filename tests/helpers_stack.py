"""Shared by the tests that run the real services: find credentials where they must never be.

Each scan takes ``secrets``, ``{name: value}`` of recognisable fake credentials (``{"key id": ...,
"secret": ...}``), and returns one line per hit (``"<where>: <name>"``), so a test asserts ``== []``
and its failure names every place a credential showed up.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

BIN = Path(sys.executable).parent
Secrets = Mapping[str, str]


def leaks(label: str, data: bytes, secrets: Secrets) -> list[str]:
    """``"<label>: <name>"`` for each secret whose value is in ``data``."""
    return [f"{label}: {name}" for name, value in secrets.items() if value.encode() in data]


def leaks_in(folder: Path, secrets: Secrets) -> list[str]:
    """:func:`leaks` of every file under ``folder``, labelled with its path."""
    return [hit for f in sorted(folder.rglob("*")) if f.is_file() for hit in leaks(str(f), f.read_bytes(), secrets)]


class CmdlineWatch:
    """Samples every process's command line (``/proc/*/cmdline``) in a thread while services start
    and the pipeline runs, keeping those that show one of ``secrets``' values."""

    def __init__(self, secrets: Secrets) -> None:
        self.values = [v.encode() for v in secrets.values()]
        self.hits: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    raw = cmdline.read_bytes()
                except OSError:
                    continue
                if any(value in raw for value in self.values):
                    line = raw.replace(b"\0", b" ").decode(errors="replace")
                    hit = f"{cmdline.parent.name}: {line[:300]}"
                    if hit not in self.hits:
                        self.hits.append(hit)
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def post_json(url: str, body: dict) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def mlflow_leaks(client: Any, secrets: Secrets, scratch: Path, model: str | None = None) -> tuple[list[str], int]:
    """Every run's params, tags and artifacts (downloaded under ``scratch``) and, with ``model``, every
    version's tags of that registered model. Returns ``(hits, runs scanned)``."""
    found: list[str] = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=1000)
    for run in runs:
        found += leaks(f"mlflow run {run.info.run_id}", json.dumps([run.data.params, run.data.tags]).encode(), secrets)
        found += leaks_in(Path(client.download_artifacts(run.info.run_id, "", str(scratch / run.info.run_id))), secrets)
    if model:
        for version in client.search_model_versions(f"name = '{model}'"):
            found += leaks(f"model version {version.version} tags", json.dumps(version.tags).encode(), secrets)
    return found, len(runs)


def prefect_leaks(api: str, secrets: Secrets) -> tuple[list[str], list[dict], int]:
    """Every flow run's parameters and every log line of the Prefect server at ``api``.
    Returns ``(hits, flow runs, log lines scanned)``."""
    flow_runs = post_json(f"{api}/flow_runs/filter", {"limit": 200})
    found = leaks("prefect flow-run parameters", json.dumps([r["parameters"] for r in flow_runs]).encode(), secrets)
    offset = 0
    while logs := post_json(f"{api}/logs/filter", {"limit": 200, "offset": offset}):
        found += leaks(f"prefect logs {offset}..", json.dumps(logs).encode(), secrets)
        offset += len(logs)
    return found, flow_runs, offset


def tracked_leaks(project: Path, secrets: Secrets) -> list[str]:
    """Every file git tracks in ``project`` (as it is on disk now)."""
    import subprocess

    names = subprocess.run(["git", "ls-files", "-z"], cwd=project, capture_output=True, check=True).stdout
    found = []
    for name in filter(None, names.decode().split("\0")):
        path = project / name
        if path.is_file() and not path.is_symlink():
            found += leaks(f"tracked {name}", path.read_bytes(), secrets)
    return found


def run_checked(
    argv: tuple[str, ...], cwd: Path, env: dict[str, str], check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run a command as a user would in ``cwd``; with ``check``, fail naming it and its output's end."""
    proc = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def use_built_venv(project: Path) -> None:
    """Give a project copy the virtual environment ``make setup`` built (as ``.venv``), and make sure its
    stamp is newer than the copy's install files, so ``make`` never reinstalls into it from the copy."""
    venv = BIN.parent
    stamp = venv / ".setup-complete"
    newest = max((project / name).stat().st_mtime for name in ("pyproject.toml", "constraints.txt"))
    if not stamp.is_file() or stamp.stat().st_mtime < newest:
        pytest.fail(f"{venv} is not set up for this checkout: run `make setup` (or `make test`) first")
    (project / ".venv").symlink_to(venv)


# -- private stacks and the processes they start ------------------------------------------------------


def fresh_project(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, Path]:
    """``(root, project)``: a new folder for one module's stack (state, cache, logs) and a fresh copy of
    the project from git in ``<root>/project``."""
    from free.bench.pipeline import copy_project

    root = tmp_path_factory.mktemp(name)
    project = root / "project"
    project.mkdir()
    copy_project(Path(__file__).resolve().parents[1], project)
    return root, project


def free_port_settings(root: Path, project: Path, **settings: Any):
    """:class:`free.stack.StackSettings` with its state in ``<root>/state`` and every service on free
    loopback ports, so a test's stack never meets the user's or another test's; ``settings`` override."""
    from free.stack import StackSettings, free_port_block

    ports = {
        "prefect_port": free_port_block(1),
        "mlflow_port": free_port_block(1),
        "s3_port": free_port_block(1),
        "aux_port": free_port_block(9),  # SeaweedFS's master, volume, filer, ... ports
    }
    return StackSettings(**{"state_dir": root / "state", "project_dir": project, **ports, **settings})


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (non-zombie) processes of process group ``pgid``, read from ``/proc/<pid>/stat``
    (not through psutil, which the code under test uses to find and stop groups)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]  # after "(comm)": may hold spaces
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        if int(group) == pgid and state != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """Poll ``check`` until it returns something true and return that; fail naming ``what`` after
    ``timeout`` s. A readiness wait, not a speed check: give ``timeout`` room for busy cores."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")


def stop_session(proc: subprocess.Popen) -> None:
    """Stop a process started here with ``start_new_session`` and its whole process group: SIGTERM,
    SIGKILL after 10 s, then wait until no process of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    wait_until(f"process group {proc.pid} to end", lambda: not group_members(proc.pid), 10)


CLIENT_SETTINGS = ("FREE_DATA_DIR", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "FREE_S3_ENDPOINT_URL")


@contextmanager
def stack_up_in(settings: Any, machine: Mapping[str, str], cleared: Iterable[str] = CLIENT_SETTINGS) -> Iterator[None]:
    """``free stack up`` with ``machine`` set and ``cleared`` unset in the environment its services
    inherit (the test's own settings must not leak into the copy's stack); ``free stack down`` after."""
    from free import stack

    with pytest.MonkeyPatch.context() as mp:
        for key, value in machine.items():
            mp.setenv(key, value)
        for key in cleared:
            mp.delenv(key, raising=False)
        started = time.time()
        try:
            stack.up(settings, say=lambda line: None)
            print(f"stack up: {time.time() - started:.0f} s")
            yield
        finally:
            stack.down(settings, say=lambda line: None)


def run_recorded_here(pid: int) -> SimpleNamespace:
    """A stand-in flow run whose process is ``pid`` on this host (``infrastructure_pid = host:pid``, as
    the pipeline's hook records it), started now: what :func:`flows.recovery.process_of` reads."""
    return SimpleNamespace(
        id="not-a-real-run",
        infrastructure_pid=f"{socket.gethostname()}:{pid}",
        start_time=SimpleNamespace(timestamp=lambda: time.time()),
    )
