"""Flow runs forked from the worker's warm forkserver (flows/warm_runs.py), on real processes.

What Prefect's runner gets once :func:`flows.warm_runs.install` ran: for ``<python> -m prefect.engine``
a process forked from a forkserver that imported the preloads, which runs the module as ``__main__``
with the command's environment and working directory, reads Prefect's settings from that environment,
shows the command in ``ps``, runs its exit hooks, and reports its exit code through the runner's own
``task_status_handler``; any other command goes to Prefect's ``run_process``. Recovery sees through the
forkserver: a run forked from it is its worker's while the worker lives, an orphan once it is gone.
Served deployment runs go through it in tests/test_orchestration.py, and tests/test_worker_crash.py
checks a live run's process tree.
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

import psutil

from flows import recovery, warm_runs
from tests.helpers_stack import group_members, run_recorded_here, stop_session

ROOT = Path(__file__).resolve().parents[1]

# Run as __main__ in the forked process, in place of prefect.engine.
PROBE = """\
import atexit, json, os, sys

import psutil
from prefect.settings import get_current_settings

me = psutil.Process()
seen = {
    "preloaded": "colorsys" in sys.modules,
    "cwd": os.getcwd(),
    "env": os.environ.get("PROBE_VALUE"),
    "heartbeat": get_current_settings().flows.heartbeat_frequency,
    "title": " ".join(me.cmdline()).strip(),
    "parent": me.parent().cmdline(),
    "name": __name__,
}
out = os.environ["PROBE_OUT"]
with open(out, "w") as f:
    json.dump(seen, f)
atexit.register(lambda: open(out + ".exit", "w").close())
sys.exit(3)
"""

RUNNER = """\
import sys

if __name__ == "__main__":
    import os

    import anyio
    import prefect.runner._starter_engine as starter
    from prefect.runner._process_manager import ProcessHandle

    from flows import warm_runs

    warm_runs.PRELOAD = ("colorsys",)  # a module nothing else here imports: the child must find it
    warm_runs.WARM_UP = ()  # MLflow's package map: its own test below
    warm_runs.ENGINE = ["-m", "probe"]
    warm_runs.install()
    assert starter.run_process is warm_runs.run_process

    class Status:
        def started(self, value):
            self.value = value

    async def main():
        status = Status()
        env = {**os.environ, "PROBE_VALUE": "from the run", "PROBE_OUT": sys.argv[1],
               "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "45"}
        process = await starter.run_process([sys.executable, "-m", "probe"], stream_output=True, task_status=status,
                                            task_status_handler=ProcessHandle, env=env, cwd=sys.argv[2])
        assert status.value.pid == process.pid
        other = await starter.run_process([sys.executable, "-c", "print('a plain command')"], stream_output=True)
        print(status.value.returncode, type(other).__module__, other.returncode)

    anyio.run(main)
"""


def test_the_engine_command_is_forked_from_a_warm_forkserver(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "runner.py").write_text(RUNNER)
    out, workdir = tmp_path / "seen", tmp_path / "workdir"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    env.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "runner.py"), str(out), str(workdir)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The forked process's exit code through the runner's handle; the plain command ran as Prefect runs it.
    assert done.stdout.strip().splitlines()[-2:] == ["a plain command", "3 anyio._backends._asyncio 0"], done.stdout
    seen = json.loads(out.read_text())
    assert seen["preloaded"], "the child did not find the forkserver's preloaded module"
    assert seen["name"] == "__main__" and seen["cwd"] == str(workdir) and seen["env"] == "from the run"
    assert seen["heartbeat"] == 45, "Prefect's settings were not read from the run's environment"
    assert seen["title"] == f"{sys.executable} -m probe"
    assert any(warm_runs.FORKSERVER_MARK in part for part in seen["parent"]), seen["parent"]
    assert Path(f"{out}.exit").exists(), "the child's exit hooks did not run"


def test_each_preloaded_module_exists() -> None:
    """The forkserver skips a module it cannot import without a word: a renamed one would only cost time."""
    preloads = [*warm_runs.PRELOAD, *warm_runs.WARM_UP]
    assert [name for name in preloads if importlib.util.find_spec(name) is None] == []


WARMED = """\
import sys, time

from mlflow.utils import requirements_utils

assert requirements_utils._MODULES_TO_PACKAGES is None, "built before the warm-up: the test shows nothing"
import flows.warm_up  # noqa: E402,F401

built = requirements_utils._MODULES_TO_PACKAGES
started = time.perf_counter()
requirements_utils._init_packages_to_modules_map()  # what log_model calls: must not build the map again
assert requirements_utils._MODULES_TO_PACKAGES is built, "log_model would build the map again"
print(len(built), ",".join(built.get("torch", [])), f"{time.perf_counter() - started:.3f}")
"""


def test_the_warm_up_leaves_mlflows_package_map_built() -> None:
    """What the forkserver's last import does for every run forked after it: the map MLflow's
    ``log_model`` builds to check pip requirements (0.9 s a run) exists, and is the one it reuses."""
    done = subprocess.run([sys.executable, "-c", WARMED], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    modules, torch_packages, _ = done.stdout.split()
    # The module ``torch`` maps to the distribution ``torch``. (Not the reverse map: a distribution's entry
    # there holds the last of its modules read, ``functorch`` in one venv and ``torchgen`` in another.)
    assert int(modules) > 100 and torch_packages.split(",") == ["torch"], done.stdout


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
        run = run_recorded_here(flow_pid)
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


MARKED = """\
import ctypes, json, os, sys

import psutil

from flows.forking import mark_environ

os.environ.clear()
os.environ.update({"PATH": "/bin:/usr/bin", "PROBE": "kept"})
assert mark_environ("FREE_FLOW_RUN_ID", "run-123")
libc = ctypes.CDLL(None)
libc.getenv.restype = ctypes.c_char_p
pid = os.fork()
if pid == 0:
    import time
    time.sleep(30)
    os._exit(0)
seen = {"self": psutil.Process().environ(), "child": psutil.Process(pid).environ(),
        "getenv": libc.getenv(b"PROBE").decode(), "os": os.environ["PROBE"]}
os.kill(pid, 9)
print(json.dumps(seen))
"""


def test_the_run_marker_shows_in_proc_environ_of_the_process_and_its_forks() -> None:
    """A process forked from a forkserver shows that forkserver's exec-time environment in /proc, where
    recovery looks for ``$FREE_FLOW_RUN_ID``: :func:`flows.forking.mark_environ` rewrites that block,
    and the process's own environment (C and Python) stays what ``os.environ`` holds."""
    done = subprocess.run([sys.executable, "-c", MARKED], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["self"] == seen["child"] == {"FREE_FLOW_RUN_ID": "run-123"}, seen
    assert seen["getenv"] == seen["os"] == "kept", seen


FORKED_SERVER = """\
import json, os, sys

import psutil
import torch._dynamo  # noqa: F401  (what a flow run forked from the worker's forkserver has)

from flows import stage_process

before = set(sys.modules)
assert stage_process.fork_forkserver()
server = psutil.Process().children()[0]
lines = []
code = stage_process.run_forked(["--help"], os.getcwd(), dict(os.environ), lines.append)
print(json.dumps({"code": code, "out": "".join(lines)[:400], "server_parent": server.ppid(), "me": os.getpid(),
                  "server_title": " ".join(server.cmdline()), "server": server.pid,
                  "torch_imported_here_after": "torch" in set(sys.modules) - before}))
"""


def test_the_stages_forkserver_forked_from_a_warm_process_runs_a_stage_command_and_ends_with_it() -> None:
    """:func:`flows.stage_process.fork_forkserver` in a process with torch loaded (as a flow run forked
    from the worker's forkserver): the forkserver is its child, a ``free`` command runs forked from it
    (exit code and output through the pipe), and it ends once the process that forked it has."""
    done = subprocess.run([sys.executable, "-c", FORKED_SERVER], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["code"] == 0 and "Usage" in seen["out"], seen
    assert seen["server_parent"] == seen["me"], seen
    assert "multiprocessing.forkserver" in seen["server_title"], seen
    assert not seen["torch_imported_here_after"], seen
    deadline = time.monotonic() + 10
    while psutil.pid_exists(seen["server"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = psutil.pid_exists(seen["server"]) and psutil.Process(seen["server"]).status() != psutil.STATUS_ZOMBIE
    assert not alive, "the forked forkserver outlived the process that forked it"
