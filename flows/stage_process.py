"""A stage of the flow: DVC's ``repro --single-item`` in the flow's process, the stage's command in a
fresh process forked from a warm interpreter.

``dvc repro --single-item <stage>`` as a process per stage cost each stage that ran about 3 s before
its first line of work, on 2 cores: DVC's start (0.7 s), then the stage command's Python importing
torch and the stages (2.0 s) and, on the first ``torch.func`` call, ``torch._dynamo`` (1.0 s).
Here instead:

* DVC works in the flow's process (:func:`reproduce`: ``Repo.reproduce(single_item=True)``, what the
  command calls), which has DVC loaded already; so the decisions are DVC's own: changed or not,
  restored from the run cache, outputs removed before the run, ``dvc.lock`` and the cache after it,
  the locks meanwhile (DVC releases its repository lock while the command runs, as in the command);
* the stage command, when it is ``<python> -m free ARGS`` for this very environment (dvc.yaml's
  ``bin/project-python -m free ...``), runs in a process forked from Python's forkserver, which
  imported torch and the stages once per flow run (:data:`PRELOAD`; under the worker, forked from the
  run's process as it starts, torch loaded: :func:`fork_forkserver`); a fresh process per stage, as
  under DVC, so a stage that dies (OOM, a signal) fails its stage, not the flow. Any other command
  runs as DVC runs it: ``$SHELL -c <cmd>``.

DVC has no hook for how a stage's command runs: :func:`reproduce` swaps ``dvc.stage.run.cmd_run``
(DVC 3.x; constraints.txt pins the version, tests/test_stage_process.py checks the lock file it
writes against the ``dvc repro`` command's) for the time of the call.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import psutil

from flows.forking import finish_as_interpreter, main_unnamed, set_title

# What a stage's process would import first: torch (1.4 s), torch.func's torch._dynamo (1.0 s, on its
# first call), the CLI and the stages (0.6 s). Imports only: the forkserver starts no threads of its
# own (OpenBLAS's idle pool is fork-safe, as in a fork-started DataLoader worker).
PRELOAD = (
    "torch",
    "torch._dynamo",
    "free.cli",
    "free.stages.data",
    "free.stages.teachers",
    "free.stages.metatrain",
    "free.stages.metatest",
)
_SHELL_SYNTAX = set("$`|;&<>(){}*?~!\\\n")  # a command needing a shell is run by one
_INTERPRETER_ENV = ("PATH", "FREE_PYTHON", "VIRTUAL_ENV")  # what picks bin/project-python's interpreter
STOP_GRACE = 10.0  # s between SIGTERM and SIGKILL for the stage of an interrupted flow (recovery's grace)

Emit = Callable[[str], None]


def free_argv(cmd: str, cwd: Path, env: dict[str, str]) -> list[str] | None:
    """The ``free`` CLI arguments of ``cmd`` if it is ``<python> -m free ARGS`` and ``<python>`` is this
    process's environment (``sys.prefix``: dvc.yaml's ``bin/project-python`` picks ``$FREE_PYTHON``, the
    project's .venv, an activated one or python3); else None, and the command runs as DVC runs it."""
    if any(char in _SHELL_SYNTAX for char in cmd):
        return None
    try:
        parts = shlex.split(cmd)
    except ValueError:
        return None
    if len(parts) < 3 or parts[1:3] != ["-m", "free"]:
        return None
    prefix = _prefix_of(parts[0], str(cwd), tuple(env.get(k, "") for k in _INTERPRETER_ENV))
    return parts[3:] if prefix is not None and os.path.realpath(prefix) == os.path.realpath(sys.prefix) else None


@lru_cache(maxsize=8)
def _prefix_of(executable: str, cwd: str, env_keys: tuple[str, ...]) -> str | None:
    """``sys.prefix`` of the Python that ``executable`` runs (a wrapper script may pick one), asked of it (30 ms)."""
    env = {**os.environ, **dict(zip(_INTERPRETER_ENV, env_keys, strict=True))}
    env = {k: v for k, v in env.items() if v}
    try:
        done = subprocess.run(
            [executable, "-c", "import sys; print(sys.prefix)"],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def fork_forkserver() -> bool:
    """Fork the stages' forkserver from this process, which must have one thread only (a flow run's
    process as :mod:`flows.warm_runs` starts it, before Prefect's engine), and make it multiprocessing's
    forkserver here. Returns whether it did (False: no torch here yet, or the fork failed; then
    :func:`start_warm` spawns one as before).

    A flow run forked from the worker's forkserver has torch and ``torch._dynamo`` loaded already, so
    the forkserver forked from it imports only the stages (the ``free`` modules of :data:`PRELOAD`,
    fresh from disk, 0.6 s) where a spawned one imported everything again (3-5 s, which the first stage
    waited for). Like a spawned one it serves this process only and ends with it (its end of the
    "alive" pipe). Python's forkserver takes the listening socket and that pipe; this replaces the
    spawn in ``ForkServer.ensure_running`` (Python 3.11) and leaves the rest to multiprocessing."""
    import socket
    from multiprocessing import connection, forkserver

    if "torch._dynamo" not in sys.modules or threading.active_count() != 1:
        return False
    modules = [name for name in PRELOAD if name.startswith("free")]
    address = connection.arbitrary_address("AF_UNIX")
    try:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(address)
        os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()
        pid = os.fork()
    except OSError:
        return False
    if pid == 0:  # the forkserver: it ends when every holder of alive_w (this process) has
        code = 0
        try:
            os.close(alive_w)
            set_title(f"{sys.executable} -c from multiprocessing.forkserver import main; main()")  # as a spawned one
            forkserver.main(listener.fileno(), alive_r, modules)
        except SystemExit:  # how it ends once this process has: the "alive" pipe at EOF
            pass
        except BaseException:  # noqa: BLE001 (a child must not return into its parent's code)
            code = 1
        finally:
            os._exit(code)
    listener.close()
    os.close(alive_r)
    server = forkserver._forkserver
    server._forkserver_address, server._forkserver_alive_fd, server._forkserver_pid = address, alive_w, pid
    server._preload_modules = list(PRELOAD)
    return True


def start_warm() -> None:
    """Start the forkserver with :data:`PRELOAD` (it imports in the background; the first stage waits
    for it), and import torch and ``torch._dynamo`` in this process too, in a thread, on the core that
    the forkserver's imports leave idle: the flow's registration loads the model to check MLflow's
    input example, and paid 2.4 s for these imports then. Once per process; later calls do nothing.
    A forkserver that :func:`fork_forkserver` forked is used as it is."""
    from multiprocessing import forkserver

    global _warming
    if _warming is None and "torch._dynamo" not in sys.modules:  # a flow run forked warm has them
        _warming = threading.Thread(target=_import, args=(PRELOAD[:2],), name="free-import-torch", daemon=True)
        _warming.start()
    multiprocessing.set_forkserver_preload(list(PRELOAD))
    forkserver.ensure_running()


_warming: threading.Thread | None = None


def _import(modules: tuple[str, ...]) -> None:
    import importlib

    for name in modules:
        importlib.import_module(name)


def run_forked(argv: list[str], cwd: str, env: dict[str, str], emit: Emit) -> int:
    """``free ARGS`` in a process forked from the warm forkserver, in ``cwd`` with ``env``, its output
    (stdout and stderr, line by line; a ``\\r`` redraw is a line) to ``emit``. Returns its exit code
    (negative: the signal that ended it)."""
    start_warm()
    context = multiprocessing.get_context("forkserver")
    reader, writer = context.Pipe(duplex=False)
    title = " ".join([sys.executable, "-m", "free", *argv])  # what `ps` and a stage's watchers look for
    proc = context.Process(target=_stage_main, args=(argv, cwd, env, title, writer), name="free-stage")
    with main_unnamed():
        proc.start()
    writer.close()  # the child holds the only writer: end of file when it (and what it started) ends
    try:
        with os.fdopen(os.dup(reader.fileno()), "r", errors="replace", newline=None) as stream:
            for line in stream:
                emit(line)
    except BaseException:
        _stop(proc, emit)
        raise
    finally:
        reader.close()
    proc.join()
    return proc.exitcode if proc.exitcode is not None else 1


def _stage_main(argv: list[str], cwd: str, env: dict[str, str], title: str, out) -> None:  # noqa: ANN001
    """The forked process: what ``python -m free ARGS`` would be, started in ``cwd`` with ``env``."""
    set_title(title)  # before os.environ changes
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    out.close()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["free", *argv]
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # lines reach the task log as they are written
    code: int | str | None = 0
    try:
        from free.cli import app

        app(args=argv, prog_name="free")
    except SystemExit as done:
        code = done.code
    finally:
        finish_as_interpreter()
    sys.exit(code)


def run_shell(cmd: str, cwd: str, env: dict[str, str], emit: Emit) -> int:
    """``cmd`` as DVC runs it (``$SHELL -c``, without the shell's rc files), its output to ``emit``."""
    from dvc.stage import run as dvc_run

    proc = subprocess.Popen(
        dvc_run._make_cmd(dvc_run.get_executable(), cmd), cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            emit(line)
    except BaseException:
        _stop(proc, emit)
        raise
    return proc.wait()


def _stop(proc: subprocess.Popen | multiprocessing.process.BaseProcess, emit: Emit) -> None:
    """Stop the stage of a flow that was interrupted (its run cancelled: Prefect's SIGTERM arrives as an
    exception while the flow reads the stage's output), with what it started (a shell's command, Dask's
    workers): SIGTERM, SIGKILL after :data:`STOP_GRACE` s. It ran on before, and multiprocessing's exit
    waited for it: a cancelled run took 30 s more to end, until the runner killed the flow-run process
    and its hook the stage."""
    from flows.recovery import stop_tree

    emit(f"stopping the stage's process {proc.pid}: the flow was interrupted\n")
    try:
        stop_tree(psutil.Process(proc.pid), STOP_GRACE)
    except psutil.Error:
        pass  # it ended meanwhile
    if isinstance(proc, subprocess.Popen):
        proc.wait()
    else:
        proc.join()


def reproduce(project: Path, stage: str, emit: Emit) -> None:
    """``dvc repro --single-item <stage>`` in this process, each command of the stage by :func:`run_forked`
    (a ``free`` command of this environment) or :func:`run_shell`; DVC's messages ("Running stage",
    "Stage ... is cached", "Updating lock file") and the commands' output to ``emit``. A command that
    fails raises DVC's ``ReproductionError`` (its cause: ``StageCmdFailedError``, with the exit code)."""
    from dvc.repo import Repo
    from dvc.stage import run as dvc_run
    from dvc.stage.exceptions import StageCmdFailedError

    def cmd_run(dvc_stage, dry: bool = False, run_env: dict | None = None) -> None:  # noqa: ANN001 (DVC's signature)
        emit(f"Running stage '{dvc_stage.addressing}':\n")
        kwargs = dvc_run.prepare_kwargs(dvc_stage, run_env=run_env)
        for cmd in dvc_run._enforce_cmd_list(dvc_stage.cmd):
            emit(f"> {cmd}\n")
            if dry:
                continue
            argv = free_argv(cmd, Path(kwargs["cwd"]), kwargs["env"])
            if argv is None:
                code = run_shell(cmd, kwargs["cwd"], kwargs["env"], emit)
            else:
                code = run_forked(argv, kwargs["cwd"], kwargs["env"], emit)
            if code != 0:
                raise StageCmdFailedError(cmd, code)

    # In the project's folder, as the command would be: DVC resolves some paths against the working
    # directory (the flow works there already; this matters to other callers, such as the tests).
    with contextlib.chdir(project), _dvc_messages(emit), _swapped(dvc_run, "cmd_run", cmd_run):
        with Repo(str(project)) as repo:
            repo.reproduce(stage, single_item=True)


@contextlib.contextmanager
def _swapped(module: object, name: str, value: object) -> Iterator[None]:
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


class _Lines(logging.Handler):
    def __init__(self, emit: Emit) -> None:
        super().__init__(logging.INFO)
        self.emit_line = emit

    def emit(self, record: logging.LogRecord) -> None:
        self.emit_line(record.getMessage() + "\n")


@contextlib.contextmanager
def _dvc_messages(emit: Emit) -> Iterator[None]:
    """DVC's INFO and above to ``emit`` (what the command prints) instead of its own handlers, which
    ``import dvc`` points at this process's stdout and stderr."""
    dvc_logger = logging.getLogger("dvc")
    handlers, level, propagate = dvc_logger.handlers[:], dvc_logger.level, dvc_logger.propagate
    dvc_logger.handlers = [_Lines(emit)]
    dvc_logger.setLevel(logging.INFO)
    dvc_logger.propagate = False
    try:
        yield
    finally:
        dvc_logger.handlers = handlers
        dvc_logger.setLevel(level)
        dvc_logger.propagate = propagate
