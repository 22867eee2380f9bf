"""Flow runs forked from a warm interpreter instead of started cold.

Prefect's runner (what :mod:`flows.serve` runs) starts each flow run of a deployment it serves as a
``python -m prefect.engine`` process (``prefect.runner._starter_engine``): a fresh interpreter that
imports Prefect, loads the flow from its entrypoint (importing MLflow, DVC, Hydra) and, once running,
torch. On 2 cores that was 3.2-4.0 s of every run between created and running, a third of a no-op
rerun (docs/RESULTS.md §4).

:func:`install` has the runner fork that process from a forkserver instead: one process, started with
the worker, that imported :data:`PRELOAD` once, then :mod:`flows.warm_up` (work each run would redo).
The child then does what the command does (Prefect's ``prefect.engine`` as ``__main__``, with the
command's environment and working directory), so the flow is still loaded from its entrypoint in
each run, and a change to the project's code (``flows/``, ``free/``) takes effect at the next run as
before: only third-party libraries are preloaded (and the warm-up, which holds no flow code); after
upgrading one, restart the worker. It is still one process per flow run: a run that dies takes nothing
else with it, and the runner's control of it (the PID, cancelling, the exit code) works as before. The
forkserver is the worker's child, in its process group; it ends once the worker and the runs forked
from it have. Recovery (:func:`flows.recovery.process_of`) sees through it to the worker.

Prefect has no setting for how the runner starts the process: :func:`install` replaces
``run_process`` in ``prefect.runner._starter_engine`` (Prefect 3.x, pinned in constraints.txt), and
passes any other command to Prefect's own. tests/test_warm_runs.py checks the replacement against
the command; tests/test_orchestration.py runs served deployments through it.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import sys
from multiprocessing import forkserver
from typing import Any

import anyio

from flows.forking import finish_as_interpreter, main_unnamed, mark_environ, set_title

# Third-party libraries a flow run of the pipeline imports (5.7 s on one core; the project's own
# modules on top of them take 0.1 s and stay fresh). torch: the registration loads the model; s3fs: the
# push to the DVC remote (0.3 s); git: MLflow's run context (0.06 s).
PRELOAD = (
    "prefect.flow_engine",
    "prefect.flows",
    "prefect.artifacts",
    "mlflow",
    "mlflow.pyfunc",
    "mlflow.pytorch",
    "dvc.repo",
    "dvc.stage.run",
    "hydra",
    "omegaconf",
    "safetensors.torch",
    "torch",
    "torch._dynamo",
    "s3fs",
    "git",
)
# Imported after PRELOAD: work each run would redo, done once (MLflow's map of installed packages).
WARM_UP = ("flows.warm_up",)
ENGINE = ["-m", "prefect.engine"]  # after the interpreter: the command the runner starts a flow run with
FORKSERVER_MARK = "multiprocessing.forkserver"  # in the forkserver's command line (what recovery looks for)


def install() -> None:
    """From now on this process's runner forks its flow runs from a forkserver that imported
    :data:`PRELOAD`, then :data:`WARM_UP`. The forkserver starts now and imports in the background (a
    run that comes before it is done waits for it). Call it in the worker only: multiprocessing has
    one forkserver per process, and this one's preloads are the flow runs'."""
    import prefect.runner._starter_engine as starter

    multiprocessing.set_forkserver_preload([*PRELOAD, *WARM_UP])
    forkserver.ensure_running()
    if starter.run_process is not run_process:
        global _prefects_run_process
        _prefects_run_process = starter.run_process
        starter.run_process = run_process


_prefects_run_process: Any = None


async def run_process(
    command: list[str],
    *,
    stream_output: Any = False,
    task_status: Any = None,
    task_status_handler: Any = None,
    env: dict[str, str] | None = None,
    cwd: Any = None,
    **kwargs: Any,
) -> Any:
    """Prefect's ``run_process`` for ``<this interpreter> -m prefect.engine``: the process is forked
    (:func:`_engine_main`), and the runner gets it as it would the command's (its PID to the task
    status, through ``task_status_handler``; its exit code once it ends). Output goes where this
    process's goes, as the command's did (the runner streamed it there). Anything else (another
    command, or ``kwargs`` such as a new session) goes to Prefect's own."""
    if command[1:] != ENGINE or os.path.realpath(command[0]) != os.path.realpath(sys.executable) or kwargs:
        return await _prefects_run_process(
            command, stream_output=stream_output, task_status=task_status,
            task_status_handler=task_status_handler, env=env, cwd=cwd, **kwargs,
        )  # fmt: skip
    context = multiprocessing.get_context("forkserver")
    title = " ".join([sys.executable, *ENGINE])  # what `ps` showed for the command
    process = context.Process(
        target=_engine_main, args=(ENGINE[1], dict(env or os.environ), cwd, title), name="prefect-engine"
    )
    await anyio.to_thread.run_sync(_start, process)  # it waits for the forkserver's imports, if they still run
    if task_status is not None:
        task_status.started(task_status_handler(process) if task_status_handler else process.pid)
    await anyio.to_thread.run_sync(process.join)
    return process


def _start(process: Any) -> None:
    with main_unnamed():
        process.start()


RUN_ID_ENV = "PREFECT__FLOW_RUN_ID"  # set by Prefect's runner in the engine command's environment


def _mark_and_fork_stages(flow_run_id: str | None) -> None:
    """In the forked flow-run process, still with one thread: mark it and what it starts as the run's
    (``/proc/<pid>/environ`` shows the forkserver's block, not ``os.environ``: :func:`flows.forking.
    mark_environ`), then fork the stages' forkserver from it, torch already loaded
    (:func:`flows.stage_process.fork_forkserver`). Either can fail quietly: recovery then finds the
    run by what ``os.environ`` gives its later children, and the stages' forkserver is spawned. Every
    flow run the worker starts gets one (a promote run too: it stays idle, 0.6 s of imports, and
    ends with the run)."""
    from flows import recovery, stage_process

    if flow_run_id:
        os.environ[recovery.RUN_ENV] = flow_run_id
        mark_environ(recovery.RUN_ENV, flow_run_id)
    try:
        stage_process.fork_forkserver()
    except Exception:  # noqa: BLE001 (the first stage spawns one, as before)
        pass


def _engine_main(module: str, env: dict[str, str], cwd: Any, title: str) -> None:
    """The forked flow-run process: what ``python -m <module>`` (Prefect's engine) is, in ``cwd`` with ``env``."""
    set_title(title)  # before os.environ changes
    if cwd is not None:
        os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [sys.executable]
    _mark_and_fork_stages(env.get(RUN_ID_ENV))
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import Settings

    # Prefect read its settings from the environment when the forkserver imported it: read them anew
    # from the run's (its heartbeat period, the control channel's port), as a fresh interpreter would.
    sys.modules.pop(module, None)  # run anew as __main__, as `-m` does (else runpy warns)
    try:
        with SettingsContext(profile=get_settings_context().profile, settings=Settings()):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        finish_as_interpreter()
