"""A worker that dies mid-run (issue 13, item 2), on the real services: its flow run ends CRASHED,
not RUNNING forever; no process of it is left (process groups, not PIDs); its MLflow runs end
FAILED; and a run never touches params.yaml while a DVC stage works on the project.

First a few checks of :mod:`flows.guards` and :mod:`flows.recovery` on real processes and a real
DVC repository (seconds). Then one stack (S3, MLflow, Prefect, the worker) on free ports with a
private state folder, in a fresh copy of the project, shared by the tests below it in file order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows import guards, recovery, warm_runs
from flows.pipeline import STAGE_LOGS
from free import stack
from free.stack import TAG
from tests.helpers_stack import (
    free_port_settings,
    fresh_project,
    group_members,
    run_recorded_here,
    stack_up_in,
    stop_session,
    wait_until,
)

BIN = Path(sys.executable).parent
STAGE_CMD = "-m free --params params.yaml"  # in the command line of every stage (dvc.yaml)
# A meta-training that outlasts each slow test (minutes on 2 cores), which kills it: its stage process is
# there to be found and to outlive what the test kills (the data stage ends within seconds).
LONG_STAGE = (["metalearn.iterations=3000"], "metatrain")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# -- DVC's locks (no stack) -------------------------------------------------------------------------


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A DVC repository with one stage that sleeps: the state of a project while a stage runs."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "params.yaml").write_text("seed: 0\n")
    subprocess.run(
        [sys.executable, "-m", "dvc", "stage", "add", "-q", "-n", "slow", "-p", "seed", "-o", "out.txt",
         "sleep 30 && echo done > out.txt"],
        cwd=repo, check=True,
    )  # fmt: skip
    return repo


def test_guard_names_the_dvc_process_whose_stage_runs_and_passes_once_it_is_gone(dvc_repo: Path) -> None:
    repro = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "slow"], cwd=dvc_repo, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        sleeping = "sleep 30"
        wait_until("the stage's command", lambda: any(sleeping in " ".join(c.cmdline()) for c in _children(repro)), 30)
        started = time.monotonic()
        with pytest.raises(guards.RepoBusy) as refused:
            guards.ensure_dvc_idle(dvc_repo)
        print(f"guard refused after {time.monotonic() - started:.1f} s")
        # DVC released its repository lock while the command runs: the rwlock names the stage's dvc process.
        assert f"pid {repro.pid} (" in str(refused.value) and "out.txt" in str(refused.value), refused.value
        assert f"kill -TERM -- -{repro.pid}" in str(refused.value)
        assert repro.poll() is None  # it refused while the stage ran: it did not wait for the stage to end
    finally:
        stop_session(repro)
    guards.ensure_dvc_idle(dvc_repo)  # the killed process's rwlock entries are stale: idle


def test_guard_names_the_holder_of_dvcs_repository_lock(dvc_repo: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dvc.lock import make_lock; lock = make_lock(sys.argv[1]);"
         " lock.lock(); print('held', flush=True); time.sleep(60)", str(dvc_repo / ".dvc" / "tmp" / "lock")],
        start_new_session=True, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(guards.RepoBusy) as refused:
            guards.ensure_dvc_idle(dvc_repo)
        assert f"pid {holder.pid} (" in str(refused.value) and "lock" in str(refused.value), refused.value
    finally:
        stop_session(holder)
    guards.ensure_dvc_idle(dvc_repo)


def _children(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


# -- an orphaned flow-run process (no stack) -------------------------------------------------------


def test_an_orphan_left_by_a_dead_worker_is_stopped_with_its_whole_group() -> None:
    """A stand-in worker (a shell, leader of its own group) with a flow-run stand-in (a python that
    started a child): the leader is killed, its group lives on; ``process_of`` calls the flow-run
    process an orphan and ``stop_orphan`` leaves nothing of the group."""
    worker = subprocess.Popen(
        ["sh", "-c", f"{sys.executable} -c 'import subprocess, time; subprocess.Popen([\"sleep\", \"120\"]);"
         " print(1, flush=True); time.sleep(120)' & wait"],
        start_new_session=True, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert worker.stdout.readline().strip() == "1"
        flow_process = next(c for c in _children(worker) if "python" in c.name())
        run = run_recorded_here(flow_process.pid)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        assert len(group_members(worker.pid)) == 2  # half-dead: the flow-run stand-in and its child
        verdict, proc = recovery.process_of(run)
        assert verdict == "orphan" and proc.pid == flow_process.pid
        assert recovery.stop_orphan(proc, grace=5) == f"process group {worker.pid}: 2 processes"
        assert group_members(worker.pid) == []
        assert recovery.process_of(run)[0] == "gone"
    finally:
        stop_session(worker)


# -- the real stack ---------------------------------------------------------------------------------


class Live:
    def __init__(self, project: Path, settings: stack.StackSettings) -> None:
        self.project, self.settings = project, settings
        self.committed_params = (project / "params.yaml").read_bytes()

    def prefect(self):
        """A synchronous Prefect client of this stack's server."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.settings.prefect_api_url)

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(self.settings.mlflow_tracking_uri)

    def submit(self, overrides: list[str]) -> str:
        """``prefect deployment run free/full-pipeline -p overrides=…`` without waiting: the run's id."""
        with self.prefect() as client:
            deployment = client.read_deployment_by_name("free/full-pipeline")
            run = client.create_flow_run_from_deployment(deployment.id, parameters={"overrides": overrides})
        return str(run.id)

    def flow_run(self, run_id: str):
        with self.prefect() as client:
            return client.read_flow_run(run_id)

    def worker(self) -> dict:
        return stack._read_state(self.settings)["services"]["worker"]

    def stage_of(self, pgid: int, stage: str = "") -> psutil.Process | None:
        """A stage's process (``python -m free --params params.yaml <stage>``; of ``stage`` if given) in
        process group ``pgid``."""
        for proc in psutil.process_iter():
            try:
                command = " ".join(proc.cmdline()).strip()
                if os.getpgid(proc.pid) == pgid and STAGE_CMD in command and command.endswith(stage):
                    return proc
            except (psutil.Error, OSError):
                continue
        return None

    def parent_run(self, run_id: str):
        """The MLflow parent run of flow run ``run_id`` (tag ``prefect.flow_run_id``), or None."""
        client = self.mlflow()
        experiment = client.get_experiment_by_name("free")
        if experiment is None:
            return None
        found = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{run_id}'")
        return found[0] if found else None

    def nested_runs(self, parent_id: str) -> list:
        client = self.mlflow()
        experiment_id = client.get_run(parent_id).info.experiment_id
        return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")

    def tagged(self) -> dict[int, int]:
        """{pid: pgid} of every live process carrying this stack's worker tag."""
        tag, found = stack._tag(self.settings, "worker"), {}
        for proc in psutil.process_iter():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(TAG) == tag:
                    found[proc.pid] = os.getpgid(proc.pid)
            except (psutil.Error, OSError):
                continue
        return found

    def ended(self, run_id: str, timeout: float, every: float = 0.5):
        """The flow run once it is in a final state (waiting up to ``timeout`` s)."""

        def final():
            run = self.flow_run(run_id)
            return run if run.state.is_final() else None

        return wait_until(f"flow run {run_id} to end", final, timeout, every)

    def tracking_ended(self, parent_id: str, timeout: float):
        """The MLflow run once it is no longer RUNNING (waiting up to ``timeout`` s)."""

        def ended():
            run = self.mlflow().get_run(parent_id)
            return run if run.info.status != "RUNNING" else None

        return wait_until(f"MLflow run {parent_id} to end", ended, timeout)

    def mid_stage(
        self, overrides: list[str], stage: str = "", timeout: float = 240
    ) -> tuple[str, psutil.Process, str]:
        """Submit a run and wait until one of its stages (``stage`` if given) runs and its MLflow parent
        run is open: (flow run id, the stage's process, the MLflow parent run's id)."""
        run_id = self.submit(overrides)
        pgid = self.worker()["pgid"]
        stage_proc = wait_until(f"a stage of the run {stage}", lambda: self.stage_of(pgid, stage), timeout)
        parent = wait_until("the run's MLflow parent run", lambda: self.parent_run(run_id), 30)
        assert self.flow_run(run_id).state.type.value == "RUNNING"
        return run_id, stage_proc, parent.info.run_id


def _forked_flow_process(live: Live, run_id: str, stage_proc: psutil.Process) -> psutil.Process:
    """The run's flow-run process (its recorded PID), checked to be what flows/warm_runs.py makes it: a
    child of the worker's forkserver, shown as the ``python -m prefect.engine`` it stands for, the
    stage's ancestor."""
    flow_proc = psutil.Process(int(live.flow_run(run_id).infrastructure_pid.rpartition(":")[2]))
    forkserver = flow_proc.parent()
    assert warm_runs.FORKSERVER_MARK in " ".join(forkserver.cmdline()), forkserver.cmdline()
    assert forkserver.ppid() == live.worker()["pid"]
    assert " ".join(flow_proc.cmdline()).strip().endswith(" ".join(warm_runs.ENGINE)), flow_proc.cmdline()
    assert flow_proc in stage_proc.parents()
    return flow_proc


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, real_omniglot_root: Path):
    """The stack with its worker in a fresh copy of the project, on free ports; stack down after."""
    root, project = fresh_project(tmp_path_factory, "crash")
    (project / ".venv").symlink_to(BIN.parent)  # the stages' interpreter (bin/project-python)
    settings = free_port_settings(root, project)
    machine = {"FREE_STATE_DIR": str(settings.state_dir), "FREE_CACHE_DIR": str(root / "cache"),
               "FREE_CONFIG_DIR": str(project / "params")}  # fmt: skip
    with stack_up_in(settings, machine):
        yield Live(project, settings)


def test_a_run_refuses_to_start_while_a_stage_holds_dvcs_locks(live: Live) -> None:
    """``dvc repro`` by hand in the project; a deployment run submitted while one of its stages runs
    fails within seconds naming that process, and never touched params.yaml (not even to put it back)."""
    params = live.project / "params.yaml"
    before = (params.read_bytes(), params.stat().st_mtime_ns, params.stat().st_ino)
    by_hand = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"], cwd=live.project, start_new_session=True,
        env={**os.environ, **stack.client_env(live.settings)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until("a stage of the repro by hand", lambda: live.stage_of(by_hand.pid), 120)
        run_id = live.submit(["metalearn.iterations=3"])  # a params.yaml of its own, were it written
        run = live.ended(run_id, 120)
        assert by_hand.poll() is None  # the hand-run repro still works on the project
    finally:
        stop_session(by_hand)
    assert run.state.type.value == "FAILED", run.state
    assert f"pid {by_hand.pid} (" in run.state.message and "params.yaml untouched" in run.state.message, run.state
    print(f"the run failed after {(run.end_time - run.start_time).total_seconds():.1f} s")
    assert (params.read_bytes(), params.stat().st_mtime_ns, params.stat().st_ino) == before
    assert live.parent_run(run_id) is None  # failed before anything was tracked


def test_worker_group_killed_then_up_crashes_its_run_and_fails_its_mlflow_runs(live: Live) -> None:
    """``kill -9`` of the worker's whole process group mid-stage (nothing of it can report), then
    ``free stack up``: the run is CRASHED, its MLflow runs FAILED, params.yaml put back."""
    run_id, stage_proc, parent_id = live.mid_stage(["evaluate.episodes=21"])
    _forked_flow_process(live, run_id, stage_proc)
    assert (live.project / "params.yaml").read_bytes() != live.committed_params  # the run's own
    old = live.worker()["pgid"]
    os.killpg(old, signal.SIGKILL)
    wait_until("the worker's group to die", lambda: not group_members(old), 20)
    time.sleep(2)
    assert live.flow_run(run_id).state.type.value == "RUNNING"  # nobody left to say otherwise
    assert live.mlflow().get_run(parent_id).info.status == "RUNNING"

    lines: list[str] = []
    stack.up(live.settings, say=lines.append)
    run = live.ended(run_id, 120)
    print(f"group killed, up: {run.state.name}: {run.state.message}")
    assert run.state.type.value == "CRASHED", run.state
    assert "its worker died and no process of it is left" in run.state.message, run.state.message
    parent = live.tracking_ended(parent_id, 30)
    assert parent.info.status == "FAILED" and "CRASHED" in parent.data.tags["free.ended_by"].upper()
    assert [r.info.status for r in live.nested_runs(parent_id) if r.info.status == "RUNNING"] == []
    wait_until("params.yaml put back", lambda: (live.project / "params.yaml").read_bytes() == live.committed_params, 30)
    assert not stage_proc.is_running()
    new = live.worker()["pgid"]
    assert set(live.tagged().values()) == {new} and new != old


def test_a_cancelled_run_stops_its_stage_puts_params_back_and_ends_its_mlflow_runs_killed(live: Live) -> None:
    """``prefect flow-run cancel`` mid-stage: the worker signals the flow-run process (forked from its
    forkserver, flows/warm_runs.py) as it did the command's. The run ends Cancelled, the stage and its
    forkserver are stopped, ``params.yaml`` is the committed file again, the MLflow runs end KILLED
    (they ended FAILED before: the flow ended them as for a failure), and the worker lives on."""
    run_id, stage_proc, parent_id = live.mid_stage(*LONG_STAGE)
    flow_proc = _forked_flow_process(live, run_id, stage_proc)
    cancel = subprocess.run(
        [str(BIN / "prefect"), "flow-run", "cancel", run_id], env={**os.environ, **stack.client_env(live.settings)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    run = live.ended(run_id, 120)
    print(f"cancelled: {run.state.name}: {run.state.message}")
    assert run.state.type.value == "CANCELLED", run.state
    wait_until("the run's processes to stop", lambda: not recovery.run_processes(run_id), 30)
    assert not stage_proc.is_running() and not flow_proc.is_running()
    # The flow stopped its stage as the cancellation reached it (the hook would only 30 s later).
    assert "stopping the stage's process" in (live.project / STAGE_LOGS / "metatrain.log").read_text()
    assert (live.project / "params.yaml").read_bytes() == live.committed_params
    assert live.tracking_ended(parent_id, 60).info.status == "KILLED"
    assert [r.info.status for r in live.nested_runs(parent_id) if r.info.status == "RUNNING"] == []
    assert _alive(live.worker()["pid"])


@pytest.mark.slow
def test_worker_leader_killed_then_up_stops_its_group_and_the_run_ends(live: Live) -> None:
    """``kill -9`` of the worker's PID only: its forkserver, flow run and stage live on in the
    worker's process group (half-dead); ``up`` stops that group, the run ends CRASHED, MLflow FAILED."""
    run_id, stage_proc, parent_id = live.mid_stage(*LONG_STAGE)
    record = live.worker()
    members = group_members(record["pgid"])
    assert stage_proc.pid in members and len(members) >= 4  # forkserver, flow run, stages' forkserver, stage
    os.kill(record["pid"], signal.SIGKILL)
    wait_until("the leader to die", lambda: record["pid"] not in group_members(record["pgid"]), 20)
    assert stack.status(live.settings)["services"]["worker"]["state"] == "half-dead"
    assert stage_proc.is_running()  # the orphans the issue saw

    lines: list[str] = []
    stack.up(live.settings, say=lines.append)
    assert any("worker" in line and "half-dead" in line for line in lines), lines
    assert group_members(record["pgid"]) == [] and not stage_proc.is_running()
    run = live.ended(run_id, 120)
    print(f"leader killed, up: {run.state.name}: {run.state.message}")
    assert run.state.type.value == "CRASHED", run.state
    parent = live.tracking_ended(parent_id, 60)
    print(f"leader killed, up: MLflow {parent.info.status}: {parent.data.tags.get('free.ended_by')}")
    assert parent.info.status == "FAILED"
    assert set(live.tagged().values()) == {live.worker()["pgid"]}


@pytest.mark.slow
def test_a_killed_flow_run_process_under_a_live_worker_takes_its_stage_along(live: Live) -> None:
    """``kill -9`` of the flow run's process alone (out of memory, say): the worker marks the run
    Crashed and its ``on_crashed`` hook stops the stage and its forkserver (left to init, in the
    worker's group, marked by ``$FREE_FLOW_RUN_ID``) and fails the MLflow runs."""
    run_id, stage_proc, parent_id = live.mid_stage(*LONG_STAGE)
    worker_pid = live.worker()["pid"]
    flow_proc = _forked_flow_process(live, run_id, stage_proc)
    assert stage_proc.pid in {p.pid for p in recovery.run_processes(run_id)}
    flow_proc.kill()
    run = live.ended(run_id, 120)
    print(f"flow-run process killed: {run.state.name}: {run.state.message}")
    assert run.state.type.value == "CRASHED", run.state
    assert live.tracking_ended(parent_id, 60).info.status == "FAILED"
    wait_until("the run's processes to stop", lambda: not recovery.run_processes(run_id), 30)
    assert not stage_proc.is_running() and _alive(worker_pid)


@pytest.mark.slow
def test_a_worker_never_restarted_has_its_run_crashed_by_the_heartbeat_automation(live: Live) -> None:
    """The worker's group killed and nothing restarts it: the automation crashes the run once its
    heartbeats stop (``ZOMBIE_AFTER_SECONDS`` after the last one); the next start fails its MLflow runs."""
    from flows.serve import HEARTBEAT_SECONDS, ZOMBIE_AFTER_SECONDS

    run_id, _, parent_id = live.mid_stage(*LONG_STAGE)
    old = live.worker()["pgid"]
    os.killpg(old, signal.SIGKILL)
    killed = time.time()
    limit = ZOMBIE_AFTER_SECONDS + HEARTBEAT_SECONDS + 60  # silence + one heartbeat period + evaluation
    run = live.ended(run_id, limit, every=2)
    print(f"crashed by the automation {time.time() - killed:.0f} s after the kill: {run.state.message}")
    assert run.state.type.value == "CRASHED" and recovery.AUTOMATION in run.state.message, run.state
    assert live.mlflow().get_run(parent_id).info.status == "RUNNING"  # nothing of ours ran since
    stack.up(live.settings, say=lambda line: None)
    assert live.tracking_ended(parent_id, 120).info.status == "FAILED"


@pytest.mark.slow
def test_stack_down_mid_stage_leaves_no_process_of_the_run(live: Live) -> None:
    """``free stack down`` while a stage runs: the worker's group goes, and with it the flow run,
    the stage and its forkserver (they are in that group). Last: the stack stays down."""
    _, stage_proc, _ = live.mid_stage(*LONG_STAGE)
    members = group_members(live.worker()["pgid"])
    assert stage_proc.pid in members
    stack.down(live.settings, say=lambda line: None)
    assert live.tagged() == {} and not stage_proc.is_running()
    assert [pid for pid in members if _alive(pid)] == []
