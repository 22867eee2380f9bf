"""Flow runs forked from the worker's warm forkserver (flows/warm_runs.py), on real processes.

What Prefect's runner gets once :func:`flows.warm_runs.install` ran: asked for spawn, a forkserver whose
children find the preloaded modules imported, run their exit hooks, and report exit codes as spawn's do.
Recovery sees through the forkserver: a run forked from it is its worker's while the worker lives, an
orphan once it is gone. A served deployment run end to end is tests/test_orchestration.py's (and
tests/test_worker_crash.py checks that its flow-run process is the forkserver's child).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil

from flows import recovery, warm_runs
from tests.helpers_stack import group_members, stop_session

ROOT = Path(__file__).resolve().parents[1]

PROBE = """\
import atexit, json, os, sys

import psutil


def report(out, fail):
    parent = psutil.Process(os.getppid())
    seen = {"preloaded": "colorsys" in sys.modules, "parent": parent.cmdline(), "grandparent": parent.ppid()}
    with open(out, "w") as f:
        json.dump(seen, f)
    atexit.register(lambda: open(out + ".exit", "w").close())
    if fail:
        raise SystemExit(3)
"""

RUNNER = """\
import sys

if __name__ == "__main__":
    import multiprocessing

    import prefect.flow_engine

    import probe
    from flows import warm_runs

    warm_runs.PRELOAD = ("colorsys",)  # a module nothing else here imports: the children must find it
    warm_runs.install()
    seen = prefect.flow_engine.multiprocessing
    assert seen.get_context("fork") is multiprocessing.get_context("fork"), "only spawn is replaced"
    assert seen.cpu_count is multiprocessing.cpu_count
    codes = []
    for i, fail in enumerate((False, True)):
        process = seen.get_context("spawn").Process(target=probe.report, args=(sys.argv[1] + str(i), fail))
        process.start()
        process.join()
        codes.append(process.exitcode)
    print(codes)
"""


def test_the_runners_spawn_context_forks_from_a_warm_forkserver(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "runner.py").write_text(RUNNER)
    out = tmp_path / "seen"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, str(tmp_path / "runner.py"), str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 3]"  # exit codes as a spawned process's
    for i in range(2):
        seen = json.loads(Path(f"{out}{i}").read_text())
        assert seen["preloaded"], "the child did not find the forkserver's preloaded module"
        assert any(warm_runs.FORKSERVER_MARK in part for part in seen["parent"]), seen["parent"]
        assert Path(f"{out}{i}.exit").exists(), "the child's exit hooks did not run"


def test_each_preloaded_module_exists() -> None:
    """The forkserver skips a module it cannot import without a word: a renamed one would only cost time."""
    assert [name for name in warm_runs.PRELOAD if importlib.util.find_spec(name) is None] == []


WORKER = """\
import multiprocessing, sys, time

multiprocessing.set_forkserver_preload(["colorsys"])
child = multiprocessing.get_context("forkserver").Process(target=time.sleep, args=(120,))
child.start()
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_run_forked_under_a_serve_worker_is_its_workers_until_that_worker_dies(tmp_path: Path) -> None:
    """A stand-in worker (``flows.serve`` in its command line, leader of its own group) whose flow-run
    stand-in is a child of its forkserver, as flows/warm_runs.py starts runs."""
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, recovery.WORKER_MODULE], start_new_session=True, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    flow_pid = int(worker.stdout.readline())
    try:
        run = SimpleNamespace(
            id="not-a-real-run",
            infrastructure_pid=f"{recovery.socket.gethostname()}:{flow_pid}",
            start_time=SimpleNamespace(timestamp=lambda: time.time()),
        )
        forkserver = psutil.Process(flow_pid).parent()
        assert forkserver.ppid() == worker.pid and not recovery.is_worker(forkserver)
        assert recovery.process_of(run)[0] == "served"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        # The forkserver lives on while a process forked from it does (they hold its end of file), but
        # it is no worker: the run is an orphan.
        verdict, proc = recovery.process_of(run)
        assert verdict == "orphan" and proc.pid == flow_pid
    finally:
        stop_session(worker)
        if group_members(worker.pid):
            os.killpg(worker.pid, signal.SIGKILL)
