"""What a dead worker leaves behind, cleaned up when a worker starts (issue 13, item 2).

The worker (``python -m flows.serve``) runs each flow run in a child process (Prefect's runner:
``multiprocessing`` spawn, same process group); the flow runs ``dvc repro``, which runs the stage,
both in that group too. When the worker dies, Prefect's server keeps the runs RUNNING and MLflow
keeps their runs RUNNING: nobody is left to report the end. So each flow run records its process
(:func:`record_process`, an ``on_running`` hook: ``infrastructure_pid = "<host>:<pid>"``, Prefect's
convention), and a starting worker reconciles (:func:`reconcile`): every RUNNING/PENDING/CANCELLING
run of our deployments whose process is gone becomes Crashed (``force=True``, with why), its
processes left over from the dead worker are stopped by process group first, its MLflow runs (parent
and nested) still RUNNING end FAILED, and ``params.yaml`` is put back.

A worker that is never restarted is covered by Prefect's own mechanism: flow runs send heartbeats
(``serve.HEARTBEAT_SECONDS``) and an automation (:func:`ensure_zombie_automation`) marks a run
Crashed when they stop; its MLflow runs end FAILED at the next worker start (:func:`fail_stale_tracking`).
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil

DEPLOYMENTS = ("free/full-pipeline", "promote/promote")
ACTIVE = ("RUNNING", "PENDING", "CANCELLING")  # a process should exist for these
WORKER_MODULE = "flows.serve"  # in the command line of the worker that spawned a flow run's process
AUTOMATION = "free: crash flow runs whose heartbeats stopped"
# On the served deployments (flows/serve.py), so on their runs and their heartbeats: the same deployment
# names may be registered for a work pool (prefect.yaml), whose workers run them with Prefect's own
# heartbeat period (180 s), which the automation's shorter silence must not judge.
SERVED_TAG = "served-by-flows.serve"
RUN_ENV = "FREE_FLOW_RUN_ID"  # set by record_process in the flow run's process: dvc and the stage inherit it
FLOW_RUN_TAG = "prefect.flow_run_id"  # on the pipeline's MLflow parent run (flows/pipeline.py)
Say = Callable[[str], None]


# -- the flow run's side: hooks ---------------------------------------------------------------------


def record_process(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_running`` hook, in the flow run's process: record ``<host>:<pid>`` as the run's
    ``infrastructure_pid``, so that a later worker can tell whether the run still has a process."""
    from prefect.client.orchestration import get_client

    os.environ[RUN_ENV] = str(flow_run.id)  # marks what the run starts (dvc repro, the stage) as its own
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, infrastructure_pid=f"{socket.gethostname()}:{os.getpid()}")


def end_tracking(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_crashed`` / ``on_cancellation`` hook, run by the worker when a flow run's process ended
    without reporting (killed, out of memory) or was cancelled: what it started is stopped, its MLflow
    runs still RUNNING end FAILED (crashed) or KILLED (cancelled)."""
    stop_run_processes(str(flow_run.id))  # dvc repro and the stage outlive a killed flow-run process
    status = "KILLED" if state.is_cancelled() or state.is_cancelling() else "FAILED"
    fail_tracking(str(flow_run.id), f"Prefect flow run {state.name}: {state.message or ''}".strip(), status)


# -- the worker's side: reconcile at start ----------------------------------------------------------


def reconcile(project: Path, say: Say = print) -> list[str]:
    """Crash the active runs of our deployments that have no live process; return their ids.

    For each RUNNING/PENDING/CANCELLING run of :data:`DEPLOYMENTS` served by a worker like this one
    (not one of a work pool, which its own worker manages): a run whose recorded process
    lives under a live worker is left alone; one whose process lives on after its worker died is
    stopped (:func:`stop_orphan`) and crashed; one without a live process is crashed. Runs recorded
    on another host are left alone (nothing here can tell). Then MLflow runs of crashed flow runs
    end FAILED (:func:`fail_stale_tracking`) and, when no run is alive and DVC is idle, ``params.yaml``
    is put back as the last run found it.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    crashed, alive = [], []
    with get_client(sync_client=True) as client:
        ids = []
        for name in DEPLOYMENTS:
            try:
                ids.append(client.read_deployment_by_name(name).id)
            except ObjectNotFound:
                continue  # never served yet: no runs
        runs = []
        if ids:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in ACTIVE]))
                ),
            )
        for run in runs:
            if run.work_pool_name:  # a work pool's worker runs it (prefect.yaml): that worker's business
                continue
            verdict, proc = process_of(run)
            if verdict == "served":
                alive.append(str(run.id))
                say(f"flow run {run.name} ({run.id}): {run.state_name}, its process {proc.pid} lives: left alone")
                continue
            if verdict == "elsewhere":
                say(f"flow run {run.name} ({run.id}): recorded on {run.infrastructure_pid}, not here: left alone")
                continue
            stopped = [stop_orphan(proc)] if verdict == "orphan" else []
            left = stop_run_processes(str(run.id))  # dvc repro, the stage: if they outlived the flow process
            stopped += [f"{left} processes it had started"] if left else []
            why = "its worker died and no process of it is left"
            if stopped:
                why = f"its worker died; stopped what was left of it: {'; '.join(stopped)}"
            message = f"Crashed by the worker starting at {time.strftime('%Y-%m-%d %H:%M:%S')}: {why}"
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            crashed.append(str(run.id))
            say(f"flow run {run.name} ({run.id}): was {run.state_name}, now Crashed: {why}")
    fail_stale_tracking(say)
    if not alive:
        _put_params_back(project, say)
    return crashed


def process_of(run: Any) -> tuple[str, psutil.Process | None]:
    """(served | orphan | gone | elsewhere, the process) for a flow run's recorded ``infrastructure_pid``.

    served: the process lives and its parent is a worker (``flows.serve``); orphan: it lives, its
    worker is gone; gone: no such process (or a newer process reusing the PID); elsewhere: recorded
    on another host."""
    host, _, pid = (run.infrastructure_pid or "").rpartition(":")
    if not pid.isdigit():
        return "gone", None  # never reached Running (PENDING), or recorded by nothing of ours
    if host != socket.gethostname():
        return "elsewhere", None
    try:
        proc = psutil.Process(int(pid))
        started = run.start_time.timestamp() if run.start_time else time.time()
        if proc.status() == psutil.STATUS_ZOMBIE or proc.create_time() > started + 5:
            return "gone", None  # the PID now belongs to a process born after the run started
        parent = proc.parent()
        if parent is not None and any(WORKER_MODULE in part for part in parent.cmdline()):
            return "served", proc
        return "orphan", proc
    except psutil.Error:
        return "gone", None


def stop_orphan(proc: psutil.Process, grace: float = 10.0) -> str:
    """Stop an orphaned flow-run process with what it started (``dvc repro``, the stage).

    Its process group is the dead worker's: when that group's leader is gone, the whole group is
    signalled (SIGTERM, SIGKILL after ``grace`` s); when the leader lives (a shell that started the
    worker by hand), only the orphan's own process tree is, so the shell is spared. Returns a few
    words on what was stopped."""
    try:
        pgid = os.getpgid(proc.pid)
    except OSError:
        return "nothing: it ended meanwhile"
    if pgid == os.getpgid(0) or _alive(pgid):  # never our own group; a live leader is not the dead worker
        return _stop_tree(proc, grace)
    members = _group(pgid)
    _signal_group(pgid, signal.SIGTERM)
    _wait(lambda: not _group(pgid), grace)
    if _group(pgid):
        _signal_group(pgid, signal.SIGKILL)
        _wait(lambda: not _group(pgid), 5)
    return f"process group {pgid}: {len(members)} processes"


def run_processes(flow_run_id: str) -> list[psutil.Process]:
    """The live processes a flow run started (``$FREE_FLOW_RUN_ID`` in their environment), wherever
    they are now: a killed parent leaves them to init, in the worker's process group."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE:
                if proc.environ().get(RUN_ENV) == flow_run_id:
                    found.append(proc)
        except psutil.Error:
            continue
    return found


def stop_run_processes(flow_run_id: str, grace: float = 10.0) -> int:
    """Stop every process of :func:`run_processes` (SIGTERM, SIGKILL after ``grace`` s): all of the
    run's, not the group they share with the worker. Returns how many there were."""
    procs = run_processes(flow_run_id)
    _terminate_then_kill(procs, grace)
    return len(procs)


def _stop_tree(proc: psutil.Process, grace: float) -> str:
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return "nothing: it ended meanwhile"
    _terminate_then_kill(tree, grace)
    return f"process {proc.pid} and its {len(tree) - 1} descendants"


def _terminate_then_kill(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM to each of ``procs``, SIGKILL to those still alive ``grace`` s later; waits for them."""
    for proc in procs:
        _quietly(proc.terminate)
    _, left = psutil.wait_procs(procs, timeout=grace)
    for proc in left:
        _quietly(proc.kill)
    psutil.wait_procs(left, timeout=5)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group(pgid: int) -> list[int]:
    found = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return found


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait(done: Callable[[], bool], seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not done():
        time.sleep(0.2)


def _quietly(action: Callable[[], Any]) -> None:
    try:
        action()
    except psutil.Error:
        pass


def _put_params_back(project: Path, say: Say) -> None:
    """``params.yaml`` as the crashed run found it, unless another DVC process works on the project."""
    from flows.guards import RepoBusy, ensure_dvc_idle
    from flows.pipeline import restore_params

    if not (project / ".dvc").is_dir():
        return
    try:
        ensure_dvc_idle(project)
    except RepoBusy as err:
        say(f"params.yaml: left as it is for now: {err}")
        return
    if restore_params(project):
        say("params.yaml: put back the file that a crashed run had replaced")


# -- MLflow -----------------------------------------------------------------------------------------


def _tracker():
    """An MLflow client of ``$MLFLOW_TRACKING_URI`` with bounded retries, or None when it is not set
    or does not answer within seconds (the worker must start anyway)."""
    from flows.tracking import HTTP_LIMITS

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):  # noqa: S310 (the configured server)
            pass
    except OSError:
        return None
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    return MlflowClient(uri)


def fail_tracking(flow_run_id: str, reason: str, status: str = "FAILED", tracker: Any = None) -> list[str]:
    """End the MLflow runs of flow run ``flow_run_id`` that are still RUNNING: the parent (tag
    ``prefect.flow_run_id``) and its nested stage runs, with ``status`` and tag ``free.ended_by``
    saying why. Returns their ids."""
    tracker = tracker or _tracker()
    if tracker is None:
        return []
    experiments = [e.experiment_id for e in tracker.search_experiments()]
    if not experiments:
        return []
    parents = tracker.search_runs(experiments, filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'")
    ended = []
    for parent in parents:
        nested = tracker.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' AND attributes.status = 'RUNNING'",
        )
        for run in [*nested, parent]:
            if run.info.status == "RUNNING":
                tracker.set_tag(run.info.run_id, "free.ended_by", reason[:5000])
                tracker.set_terminated(run.info.run_id, status)
                ended.append(run.info.run_id)
    return ended


def fail_stale_tracking(say: Say = print) -> list[str]:
    """MLflow parent runs still RUNNING whose Prefect flow run has ended (crashed by :func:`reconcile`
    or by the zombie automation, cancelled, or deleted): end them and their nested runs FAILED."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    tracker = _tracker()
    if tracker is None:
        say("MLflow: not reachable at MLFLOW_TRACKING_URI; runs of crashed flows stay RUNNING until the next start")
        return []
    experiments = [e.experiment_id for e in tracker.search_experiments()]
    if not experiments:
        return []
    running = tracker.search_runs(experiments, filter_string="attributes.status = 'RUNNING'")
    flow_runs = {r.data.tags[FLOW_RUN_TAG] for r in running if r.data.tags.get(FLOW_RUN_TAG)}
    ended = []
    with get_client(sync_client=True) as client:
        for flow_run_id in sorted(flow_runs):
            try:
                state = client.read_flow_run(flow_run_id).state
            except ObjectNotFound:
                state = None
            if state is not None and not state.is_final():
                continue  # still running (or scheduled again): its own flow ends its runs
            name = state.name if state is not None else "deleted"
            reason = f"Prefect flow run {flow_run_id} ended {name} without ending its MLflow run"
            if state is not None and state.message:
                reason += f": {state.message}"
            runs = fail_tracking(flow_run_id, reason, tracker=tracker)
            if runs:
                say(f"MLflow: runs {', '.join(runs)} of flow run {flow_run_id} ({name}): RUNNING -> FAILED")
            ended += runs
    return ended


# -- the zombie automation --------------------------------------------------------------------------


def ensure_zombie_automation(deployment_ids: Iterable[Any], silence_seconds: int, say: Say = print) -> None:
    """Prefect's "detect zombie flows" recipe, for our deployments' runs only: when a run's heartbeat
    is not followed by another heartbeat or a final state within ``silence_seconds``, the server sets
    it Crashed. Created once per server, updated to the current deployments on each start."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    final = ("Completed", "Failed", "Cancelled", "Crashed")
    wanted = Automation(
        name=AUTOMATION,
        description="Flow runs of free/full-pipeline and promote/promote whose process stopped sending "
        "heartbeats (the worker died with them) are set Crashed. Made by flows/serve.py.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in final)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=[  # both: a run of our deployments, served by flows.serve
                ResourceSpecification(
                    {
                        "prefect.resource.role": "deployment",
                        "prefect.resource.id": [f"prefect.deployment.{i}" for i in deployment_ids],
                    }
                ),
                ResourceSpecification(
                    {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{SERVED_TAG}"}
                ),
            ],
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silence_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"Crashed by the automation {AUTOMATION!r}: no heartbeat for {silence_seconds} s "
                "(its worker died with it, or the machine did)",
                force=True,
            )
        ],
    )
    try:
        existing = Automation.read(name=AUTOMATION)
    except ValueError:
        wanted.create()
        say(f"automation {AUTOMATION!r}: created (crashes a run after {silence_seconds} s without heartbeat)")
        return
    wanted.id = existing.id
    wanted.update()
