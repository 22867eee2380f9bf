"""What a dead worker leaves behind, cleaned up when a worker starts (issue 13, item 2).

The worker (``python -m flows.serve``) runs each flow run in a child process (Prefect's runner:
``multiprocessing`` spawn, same process group); the flow's stages run in processes forked from a
forkserver the flow starts (:mod:`flows.stage_process`), all in that group too. When the worker
dies, Prefect's server keeps the runs RUNNING and MLflow keeps their runs RUNNING: nobody is left to
report the end. So each flow run records its process (:func:`record_process`, an ``on_running``
hook: ``infrastructure_pid = "<host>:<pid>"``, Prefect's convention), and a starting worker
reconciles (:func:`reconcile`): every RUNNING/PENDING/CANCELLING run of our deployments whose
process is gone becomes Crashed (``force=True``, with why), its processes left over from the dead
worker are stopped by process group first, its MLflow runs (parent and nested) still RUNNING end
FAILED, and ``params.yaml`` is put back.

A worker that is never restarted is covered by Prefect's own mechanism: flow runs send heartbeats
(``serve.HEARTBEAT_SECONDS``) and an automation (:func:`ensure_zombie_automation`) marks a run
Crashed when they stop; its MLflow runs end FAILED at the next worker start (:func:`fail_stale_tracking`).

The stack's pool worker (``flows.pool_worker``, a ``prefect worker start`` of pool ``free-local``)
does the same for the runs of its pool (``reconcile(project, pool=...)``); each worker leaves the
other's runs alone. A pool run's process is the one the process worker spawned in a session of its
own (its group is its PID), its parent that worker; the forkserver and the stages share its group.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from flows import warm_runs

DEPLOYMENTS = ("free/full-pipeline", "promote/promote")
ACTIVE = ("RUNNING", "PENDING", "CANCELLING")  # a process should exist for these
WORKER_MODULE = "flows.serve"  # in the command line of the worker that started a flow run's process
POOL_WORKER_COMMAND = ("worker", "start")  # after `prefect`: a process worker, whose flow-run processes it spawns
AUTOMATION = "free: crash flow runs whose heartbeats stopped"
POOL_AUTOMATION = "free: crash work-pool flow runs whose heartbeats stopped"
# On the served deployments (flows/serve.py), so on their runs and their heartbeats: the same deployment
# names may be registered for a work pool (prefect.yaml), whose workers run them with Prefect's own
# heartbeat period (180 s), which the automation's shorter silence must not judge.
SERVED_TAG = "served-by-flows.serve"
# On the work-pool deployments of prefect.yaml, so on their runs: the pool's automation (POOL_AUTOMATION)
# judges them. The stack's pool worker has them beat every 30 s, but a process worker started by hand runs
# them with Prefect's default period (180 s), so that automation waits three of those.
POOL_TAG = "free"
RUN_ENV = "FREE_FLOW_RUN_ID"  # set by record_process in the flow run's process; what it starts inherits it
FLOW_RUN_TAG = "prefect.flow_run_id"  # on the pipeline's MLflow parent run (flows/pipeline.py)
Say = Callable[[str], None]


# -- the flow run's side: hooks ---------------------------------------------------------------------


def record_process(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_running`` hook, in the flow run's process: record ``<host>:<pid>`` as the run's
    ``infrastructure_pid``, so that a later worker can tell whether the run still has a process."""
    from prefect.client.orchestration import get_client

    os.environ[RUN_ENV] = str(flow_run.id)  # marks what the run starts (the forkserver, the stages) as its own
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, infrastructure_pid=f"{socket.gethostname()}:{os.getpid()}")


def end_tracking(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_crashed`` / ``on_cancellation`` hook, run by the worker when a flow run's process ended
    without reporting (killed, out of memory) or was cancelled: what it started is stopped, its MLflow
    runs still RUNNING end FAILED (crashed) or KILLED (cancelled)."""
    stop_run_processes(str(flow_run.id))  # the forkserver and a stage outlive a killed flow-run process
    status = "KILLED" if state.is_cancelled() or state.is_cancelling() else "FAILED"
    fail_tracking(str(flow_run.id), f"Prefect flow run {state.name}: {state.message or ''}".strip(), status)


# -- the worker's side: reconcile at start ----------------------------------------------------------


def reconcile(project: Path, say: Say = print, pool: str | None = None) -> list[str]:
    """Crash the active runs of our deployments that have no live process; return their ids.

    For each RUNNING/PENDING/CANCELLING run of :data:`DEPLOYMENTS` run by a worker like this one
    (``pool`` None: the serve() worker's, not on a work pool; ``pool``: that pool's, for its worker
    ``flows.pool_worker``; each leaves the other's runs alone): a run whose recorded process
    lives under a live worker is left alone; one whose process lives on after its worker died is
    stopped (:func:`stop_orphan`) and crashed; one without a live process is crashed. Runs recorded
    on another host are left alone (nothing here can tell). On a pool, other workers may run the
    pool's runs too, so also left alone: an orphan working in another directory than ``project``,
    and a run without a process recorded on this host (PENDING; a process worker's bare PID) while
    another worker of the pool is alive. Then MLflow runs of crashed flow runs end FAILED
    (:func:`fail_stale_tracking`) and, when no run is alive and DVC is idle, ``params.yaml`` is put
    back as the last run found it.
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
        others: list[str] | None = None  # the pool's other live workers, asked once when needed
        for run in runs:
            if run.work_pool_name != pool:  # the serve() worker's, or a work pool's: that worker's business
                continue
            verdict, proc = process_of(run)
            if verdict == "served":
                alive.append(str(run.id))
                say(f"flow run {run.name} ({run.id}): {run.state_name}, its process {proc.pid} lives: left alone")
                continue
            if pool is not None and verdict == "orphan" and not _works_in(proc, project):
                alive.append(str(run.id))
                say(f"flow run {run.name} ({run.id}): its process {proc.pid} works in another directory: left alone")
                continue
            if pool is not None and verdict in ("gone", "elsewhere") and not _recorded_here(run):
                others = _live_workers(client, pool, pool_worker_name(project)) if others is None else others
                if others:
                    alive.append(str(run.id))
                    say(
                        f"flow run {run.name} ({run.id}): {run.state_name}, no process of it recorded here, and "
                        f"pool {pool} has live workers ({', '.join(others)}): left to them"
                    )
                    continue
                verdict = "gone"  # no other worker could be running it
            if verdict == "elsewhere":
                say(f"flow run {run.name} ({run.id}): recorded on {run.infrastructure_pid}, not here: left alone")
                continue
            stopped = [stop_orphan(proc)] if verdict == "orphan" else []
            left = stop_run_processes(str(run.id))  # the forkserver, a stage: if they outlived the flow process
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

    served: the process lives and its parent is a worker (:func:`is_worker`); orphan: it lives, its
    worker is gone; gone: no such process (or a newer process reusing the PID); elsewhere: recorded
    on another host, or a bare PID (what a process worker records before the run's own hook) that is
    not this run's process here."""
    host, _, pid = (run.infrastructure_pid or "").rpartition(":")
    if not pid.isdigit():
        return "gone", None  # never reached Running (PENDING), or recorded by nothing of ours
    if host and host != socket.gethostname():
        return "elsewhere", None
    try:
        proc = psutil.Process(int(pid))
        if not host and proc.environ().get("PREFECT__FLOW_RUN_ID") != str(run.id):
            return "elsewhere", None  # a bare PID may be another host's: only this run's own process counts
        started = run.start_time.timestamp() if run.start_time else time.time()
        if proc.status() == psutil.STATUS_ZOMBIE or proc.create_time() > started + 5:
            return "gone", None  # the PID now belongs to a process born after the run started
        if is_worker(_past_forkserver(proc.parent())):
            return "served", proc
        return "orphan", proc
    except psutil.Error:
        return ("gone" if host else "elsewhere"), None


def is_worker(proc: psutil.Process | None) -> bool:
    """Whether ``proc`` is a worker that runs flow runs in its child processes: ``python -m flows.serve``,
    or ``prefect worker start`` (the stack's pool worker becomes one; a user may start one by hand)."""
    if proc is None:
        return False
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    if any(WORKER_MODULE in part for part in cmdline):
        return True
    n = len(POOL_WORKER_COMMAND)
    return any(
        Path(part).name == "prefect" and tuple(cmdline[i + 1 : i + 1 + n]) == POOL_WORKER_COMMAND
        for i, part in enumerate(cmdline)
    )


def _past_forkserver(proc: psutil.Process | None) -> psutil.Process | None:
    """``proc``, or its parent when ``proc`` is the forkserver that a worker forks its flow runs from
    (flows/warm_runs.py). It outlives a dead worker while a run forked from it lives: that run's
    grandparent is then no worker, and the run an orphan."""
    try:
        if proc is not None and any(warm_runs.FORKSERVER_MARK in part for part in proc.cmdline()):
            return proc.parent()
    except psutil.Error:
        return None
    return proc


def pool_worker_name(project: Path) -> str:
    """The name the stack's pool worker gives itself on its pool (``prefect worker start --name``):
    the same after a restart, so a reconcile can tell its dead predecessor from another live worker.
    Host, folder name and a digest of the folder's path (Prefect refuses ``/`` and ``%`` in a worker's name)."""
    import hashlib

    digest = hashlib.sha256(str(project.resolve()).encode()).hexdigest()[:10]
    return f"free-stack {socket.gethostname()} {project.resolve().name.replace('%', '_')} {digest}"


def _recorded_here(run: Any) -> bool:
    """Whether the run's ``infrastructure_pid`` names a process on this host (``<host>:<pid>``)."""
    host, _, pid = (run.infrastructure_pid or "").rpartition(":")
    return pid.isdigit() and host == socket.gethostname()


def _works_in(proc: psutil.Process, project: Path) -> bool:
    """Whether ``proc`` works in ``project`` (a process worker's flow runs start in its directory)."""
    try:
        return Path(proc.cwd()).resolve() == project.resolve()
    except psutil.NoSuchProcess:
        return True  # ended meanwhile: nothing left to spare
    except psutil.Error:
        return False  # not ours to see: not ours to stop


def _live_workers(client: Any, pool: str, own_name: str) -> list[str]:
    """Names of the workers of ``pool``, other than ``own_name``, that sent a heartbeat lately (Prefect's
    rule: within three of their heartbeat periods)."""
    now, names = datetime.now(UTC), []
    for worker in client.read_workers_for_work_pool(pool):
        silence = 3 * (worker.heartbeat_interval_seconds or 30)  # Prefect's default period: 30 s
        beat = worker.last_heartbeat_time
        if worker.name != own_name and beat is not None and (now - beat).total_seconds() < silence:
            names.append(worker.name)
    return names


def stop_orphan(proc: psutil.Process, grace: float = 10.0) -> str:
    """Stop an orphaned flow-run process with what it started (the forkserver, the stage).

    Its process group is the dead worker's (serve()) or its own (a process worker's run): when that
    group's leader is gone or is the orphan, the whole group is signalled (SIGTERM, SIGKILL after
    ``grace`` s); when another leader lives (a shell that started the worker by hand), only the
    orphan's own process tree is, so the shell is spared. Returns a few words on what was stopped."""
    try:
        pgid = os.getpgid(proc.pid)
    except OSError:
        return "nothing: it ended meanwhile"
    # Never our own group; a live leader other than the orphan is not the dead worker (a shell that started
    # it). A process worker's flow-run process leads a group of its own, which holds just the run's processes.
    if pgid == os.getpgid(0) or (pgid != proc.pid and _alive(pgid)):
        return stop_tree(proc, grace)
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


def stop_tree(proc: psutil.Process, grace: float) -> str:
    """Stop ``proc`` and its descendants (SIGTERM, SIGKILL after ``grace`` s); says what it stopped."""
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


def ensure_zombie_automation(
    deployment_ids: Iterable[Any],
    silence_seconds: int,
    say: Say = print,
    name: str = AUTOMATION,
    tag: str = SERVED_TAG,
) -> None:
    """Prefect's "detect zombie flows" recipe, for our deployments' runs only: when a run's heartbeat
    is not followed by another heartbeat or a final state within ``silence_seconds``, the server sets
    it Crashed. Created once per server, updated to the current deployments on each start.

    ``name`` and ``tag``: one automation per kind of run, as the serve() worker and the pool worker
    run the same two deployments (same names, so the same ids) with different heartbeat periods.
    :data:`AUTOMATION` for the runs flows/serve.py serves (tag :data:`SERVED_TAG`, 30 s beats);
    :data:`POOL_AUTOMATION` for those run on the pool (tag :data:`POOL_TAG`, beats every 30 s from
    the stack's pool worker, every 180 s from one started by hand): each worker keeps its own
    automation up to date, and never changes the other's."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    final = ("Completed", "Failed", "Cancelled", "Crashed")
    maker = "flows/serve.py" if tag == SERVED_TAG else "flows/pool_worker.py"
    wanted = Automation(
        name=name,
        description=f"Flow runs of free/full-pipeline and promote/promote tagged {tag} whose process stopped "
        f"sending heartbeats (the worker died with them) are set Crashed. Made by {maker}.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in final)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=[  # both: a run of our deployments, of the kind the tag says (served, or on the pool)
                ResourceSpecification(
                    {
                        "prefect.resource.role": "deployment",
                        "prefect.resource.id": [f"prefect.deployment.{i}" for i in deployment_ids],
                    }
                ),
                ResourceSpecification({"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{tag}"}),
            ],
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silence_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"Crashed by the automation {name!r}: no heartbeat for {silence_seconds} s "
                "(its worker died with it, or the machine did)",
                force=True,
            )
        ],
    )
    try:
        existing = Automation.read(name=name)
    except ValueError:
        wanted.create()
        say(f"automation {name!r}: created (crashes a run after {silence_seconds} s without heartbeat)")
        return
    wanted.id = existing.id
    wanted.update()
