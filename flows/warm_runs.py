"""Flow runs forked from a warm interpreter, not spawned cold.

Prefect's runner (what :mod:`flows.serve` runs) starts each flow run with multiprocessing's *spawn*
context (``prefect.flow_engine.run_flow_in_subprocess``): a fresh interpreter that imports Prefect,
MLflow, DVC and the flows before the run can start, and torch once it has. On 2 cores that was 3.3-3.9 s
of every run between Pending and Running, a third of a no-op rerun (docs/RESULTS.md §4).

:func:`install` gives the runner a forkserver instead: one process, started with the worker, that
imports :data:`PRELOAD` once; each flow run is a fresh fork of it. It is still one process per flow run,
as with spawn: a run that dies takes nothing else with it, and the runner's control of it (the PID it
records, cancelling, the exit code) works as before. The forkserver is the worker's child, in its process
group; it ends once the worker and the runs forked from it have. Recovery
(:func:`flows.recovery.process_of`) sees through it to the worker.

Prefect has no setting for this context, so :func:`install` replaces the ``multiprocessing`` name that
``prefect.flow_engine`` sees with one whose spawn context is the forkserver (Prefect 3.x, pinned in
constraints.txt; tests/test_warm_runs.py runs a served flow and checks that it was forked).
"""

from __future__ import annotations

import atexit
import multiprocessing
from collections.abc import Callable
from multiprocessing import forkserver
from typing import Any

# What a flow run of the pipeline imports, once per worker rather than once per run. torch and
# torch._dynamo: the registration loads the model (MLflow's input example check).
PRELOAD = (
    "flows.pipeline",
    "flows.promotion",
    "dvc.repo",
    "dvc.stage.run",
    "free.serving_model",
    "torch",
    "torch._dynamo",
)
FORKSERVER_MARK = "multiprocessing.forkserver"  # in the forkserver's command line (what recovery looks for)


def install() -> None:
    """From now on, this process's runner forks its flow runs from a forkserver that imported
    :data:`PRELOAD`; the forkserver starts now and imports in the background (the first run waits for
    it if it must). Call it in the worker only: the forkserver is this process's for anything else
    that asks multiprocessing for one."""
    import prefect.flow_engine

    multiprocessing.set_forkserver_preload(list(PRELOAD))
    forkserver.ensure_running()
    prefect.flow_engine.multiprocessing = _WarmMultiprocessing(multiprocessing.get_context("forkserver"))


class _WarmMultiprocessing:
    """``multiprocessing`` as ``prefect.flow_engine`` sees it: asked for spawn, it gives the forkserver."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def get_context(self, method: str | None = None) -> Any:
        return _ForkedContext(self._context) if method == "spawn" else multiprocessing.get_context(method)

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


class _ForkedContext:
    """The forkserver context, whose processes run their target through :func:`_run_to_exit`."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def Process(self, target: Callable[..., Any], args: tuple = (), kwargs: dict | None = None, **more: Any) -> Any:  # noqa: N802 (multiprocessing's name)
        return self._context.Process(target=_run_to_exit, args=(target, args, kwargs or {}), **more)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _run_to_exit(target: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """In the flow run's process: the target, then the exit hooks a spawned process would run at its
    exit (MLflow's and Prefect's own flushes among them). A forkserver's child leaves by ``os._exit``,
    which skips them."""
    try:
        target(*args, **kwargs)
    finally:
        atexit._run_exitfuncs()
