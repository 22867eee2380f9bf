"""The stack's pool worker (``free stack up --work-pool``) cleans up after a dead pool worker as the
serve() worker does (issue 13's recovery for issue 14's worker): a run it left RUNNING ends CRASHED,
no process of it is left, its MLflow runs end FAILED, ``params.yaml`` is put back.

First a check of :func:`flows.recovery.process_of` on real processes (a second): a flow-run stand-in
under a ``prefect worker start`` stand-in is the worker's; once that worker is killed it is an orphan.
Then one stack on free ports with a private state folder, in a fresh copy of the project, its worker a
process worker of pool ``free-local``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from flows import recovery
from free import stack
from tests.helpers_stack import (
    CLIENT_SETTINGS,
    free_port_settings,
    fresh_project,
    group_members,
    run_recorded_here,
    stack_up_in,
    stop_session,
    wait_until,
)
from tests.test_worker_crash import STAGE_CMD, Live, _alive

BIN = Path(sys.executable).parent
POOL = "free-local"


def test_a_flow_run_process_under_a_prefect_worker_is_its_workers_until_that_worker_dies(tmp_path: Path) -> None:
    """A stand-in ``prefect worker start`` (an executable named ``prefect``, leader of its own group)
    with a flow-run stand-in child in a session of its own, as a process worker starts it."""
    fake = tmp_path / "prefect"
    fake.write_text(
        f"#!{sys.executable}\nimport subprocess, sys, time\n"
        f"child = subprocess.Popen([{sys.executable!r}, '-c', 'import time; time.sleep(120)'],\n"
        "                         start_new_session=True)\n"
        "print(child.pid, flush=True)\ntime.sleep(120)\n"
    )
    fake.chmod(0o700)
    worker = subprocess.Popen(
        [sys.executable, str(fake), "worker", "start", "--pool", POOL], start_new_session=True,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    flow_pid = int(worker.stdout.readline())
    try:
        run = run_recorded_here(flow_pid)
        assert recovery.process_of(run)[0] == "served"
        # A bare PID (what the process worker records before the run's hook) counts only for that run's process.
        assert recovery.process_of(SimpleNamespace(**{**vars(run), "infrastructure_pid": str(flow_pid)}))[0] == (
            "elsewhere"
        )
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        verdict, proc = recovery.process_of(run)
        assert verdict == "orphan" and proc.pid == flow_pid
        # It leads its own group: stopped group and all, nothing else touched.
        assert recovery.stop_orphan(proc, grace=5) == f"process group {flow_pid}: 1 processes"
        assert group_members(flow_pid) == []
    finally:
        stop_session(worker)
        if group_members(flow_pid):
            os.killpg(flow_pid, signal.SIGKILL)


# -- the real stack, its worker a process worker of the pool ------------------------------------------


class PoolLive(Live):
    def flow_process(self, run_id: str) -> psutil.Process | None:
        """The flow run's own process: started by the process worker with ``PREFECT__FLOW_RUN_ID``."""
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("PREFECT__FLOW_RUN_ID") == run_id and "prefect.engine" in proc.cmdline():
                    return proc
            except psutil.Error:
                continue
        return None

    def run_stage(self, flow_pid: int, stage: str) -> psutil.Process | None:
        """The process of ``stage`` (``python -m free --params params.yaml <stage>``) under the flow-run process."""
        try:
            children = psutil.Process(flow_pid).children(recursive=True)
        except psutil.Error:
            return None
        return next((p for p in children if f"{STAGE_CMD} {stage}" in " ".join(_cmdline(p))), None)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


@pytest.fixture(scope="module")
def pool_live(tmp_path_factory: pytest.TempPathFactory, real_omniglot_root: Path):
    """The stack with a pool worker in a fresh copy of the project, on free ports; stack down after."""
    root, project = fresh_project(tmp_path_factory, "poolcrash")
    (project / ".venv").symlink_to(BIN.parent)  # the stages' interpreter (bin/project-python)
    settings = free_port_settings(root, project, work_pool=True)
    machine = {"FREE_STATE_DIR": str(settings.state_dir), "FREE_CACHE_DIR": str(root / "cache"),
               "FREE_CONFIG_DIR": str(project / "params"), "PREFECT_WORKER_QUERY_SECONDS": "2"}  # fmt: skip
    with stack_up_in(settings, machine, [*CLIENT_SETTINGS, "FREE_WORK_POOL"]):
        yield PoolLive(project, settings)


def test_pool_worker_group_killed_then_up_crashes_its_run_and_fails_its_mlflow_runs(pool_live: PoolLive) -> None:
    """``kill -9`` of the pool worker's whole process group mid-stage, then ``free stack up``: the run,
    whose process the worker had started in a group of its own and which works on without a worker, is
    stopped with everything it started and ends CRASHED; its MLflow runs FAILED; params.yaml put back."""
    live = pool_live
    started = time.time()
    run_id = live.submit(["evaluate.episodes=23"])
    flow_proc = wait_until("the flow run's process", lambda: live.flow_process(run_id), 120)
    # Teacher training: the first stage long enough (tens of seconds) to be killed in the middle of.
    stage_proc = wait_until("the run's teachers stage", lambda: live.run_stage(flow_proc.pid, "teachers"), 240)
    parent_id = wait_until("the run's MLflow parent run", lambda: live.parent_run(run_id), 30).info.run_id
    run = live.flow_run(run_id)
    assert run.work_pool_name == POOL and run.state.type.value == "RUNNING", run
    assert run.infrastructure_pid == f"{recovery.socket.gethostname()}:{flow_proc.pid}"  # the run's own hook
    assert (live.project / "params.yaml").read_bytes() != live.committed_params  # the run's own
    assert recovery.process_of(run) == ("served", flow_proc)  # under the live `prefect worker start`: never crashed
    old = live.worker()["pgid"]
    flow_group = os.getpgid(flow_proc.pid)
    assert flow_group != old and stage_proc.pid in group_members(flow_group)
    print(f"stage running {time.time() - started:.0f} s after submitting")

    os.killpg(old, signal.SIGKILL)
    wait_until("the worker's group to die", lambda: not group_members(old), 20)
    time.sleep(2)
    assert live.flow_run(run_id).state.type.value == "RUNNING"  # no worker left to say otherwise
    assert flow_proc.is_running() and recovery.process_of(run) == ("orphan", flow_proc)  # it works on, orphaned

    lines: list[str] = []
    up_started = time.time()
    stack.up(live.settings, say=lines.append)

    # The orphan's own SIGTERM handling may report Crashed first ("Execution was aborted ..."); the reconcile
    # sets its own Crashed once no process of the run is left.
    def reconciled():
        run = live.flow_run(run_id)
        return run if (run.state.message or "").startswith("Crashed by the worker starting at") else None

    try:
        run = wait_until("the reconcile's Crashed state", reconciled, 120)
    finally:
        print(f"after up: {live.flow_run(run_id).state!r} ({time.time() - up_started:.0f} s)")
    assert run.state.type.value == "CRASHED", run.state
    assert f"process group {flow_group}" in run.state.message, run.state.message
    parent = live.tracking_ended(parent_id, 60)
    assert parent.info.status == "FAILED", parent.info
    assert [r.info.run_id for r in live.nested_runs(parent_id) if r.info.status == "RUNNING"] == []
    wait_until("params.yaml put back", lambda: (live.project / "params.yaml").read_bytes() == live.committed_params, 30)
    assert group_members(old) == [] and group_members(flow_group) == []
    assert not _alive(stage_proc.pid) and recovery.run_processes(run_id) == []  # a zombie at most, till init reaps it
    new = live.worker()["pgid"]
    assert new != old and set(live.tagged().values()) <= {new}
    worker_log = Path(live.worker()["log"]).read_text()
    assert f"flow run {run.name} ({run_id}): was Running, now Crashed" in worker_log

    # The pool's heartbeat automation (a worker killed and never restarted): the pool's runs of our deployments.
    from flows.pool_worker import ZOMBIE_AFTER_SECONDS

    with live.prefect() as client:
        [automation] = client.read_automations_by_name(recovery.POOL_AUTOMATION)
        ids = {f"prefect.deployment.{client.read_deployment_by_name(name).id}" for name in recovery.DEPLOYMENTS}
        assert client.read_automations_by_name(recovery.AUTOMATION) == []  # the serve() worker's: not made here
    deployments, tag = automation.trigger.match_related
    assert set(deployments["prefect.resource.id"]) == ids and run.deployment_id is not None
    assert tag["prefect.resource.id"] == [f"prefect.tag.{recovery.POOL_TAG}"] and recovery.POOL_TAG in run.tags
    assert automation.trigger.within.total_seconds() == ZOMBIE_AFTER_SECONDS and automation.enabled


def test_stack_down_mid_stage_stops_the_pool_run_it_started_in_a_group_of_its_own(pool_live: PoolLive) -> None:
    """``free stack down`` while a pool run's stage runs: the run's process group (its flow-run process,
    ``dvc repro``, the stage), which a signal to the worker's group does not reach, is stopped first;
    then the worker. Nothing of the run is left. Last in this file: the stack stays down."""
    live = pool_live
    run_id = live.submit(["evaluate.episodes=24"])
    flow_proc = wait_until("the flow run's process", lambda: live.flow_process(run_id), 120)
    stage_proc = wait_until("the run's teachers stage", lambda: live.run_stage(flow_proc.pid, "teachers"), 240)
    flow_group, worker_group = os.getpgid(flow_proc.pid), live.worker()["pgid"]
    assert flow_group != worker_group and stage_proc.pid in group_members(flow_group)
    lines: list[str] = []
    started = time.time()
    stack.down(live.settings, say=lines.append)
    print(f"down in {time.time() - started:.1f} s: {lines}")
    assert lines[0] == f"worker   stopped its flow runs (process groups {flow_group})", lines
    assert group_members(flow_group) == [] and group_members(worker_group) == []
    assert not _alive(stage_proc.pid) and recovery.run_processes(run_id) == []
