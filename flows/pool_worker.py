"""The stack's worker the Prefect way: a ``process`` worker of work pool ``free-local`` running the
deployments declared in ``prefect.yaml`` (``free stack up --worker pool``).

What it does is what a user would type in the project root, in order:

1. make the pool when missing: ``prefect work-pool create free-local --type process``;
2. ``prefect deploy --all`` (the deployments of ``prefect.yaml``: ``free/full-pipeline``, ``promote``,
   ``smoke``, all on that pool);
3. become ``prefect worker start --pool free-local --type process --limit 1`` (``exec``: the worker
   is this process, the leader of the stack's ``worker`` group, so ``free stack down`` stops it; it
   starts each flow run in a process group of the run's own).

Between the first two it cleans up after a dead worker as the default worker (``flows.serve``) does
(:mod:`flows.recovery`): runs of the pool's deployments left RUNNING/PENDING whose worker died are
crashed (what is left of their processes stopped, their MLflow runs ended FAILED, ``params.yaml``
put back), and a heartbeat automation of the pool's runs crashes a run whose heartbeats stop for
:data:`ZOMBIE_AFTER_SECONDS` (the worker died and nothing restarted it). It touches only its pool's
runs of this project: the serve() worker's runs, other pools' and those another live worker of the
pool may run are left alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from flows import recovery

POOL = os.environ.get("FREE_WORK_POOL", "free-local")
PREFECT = str(Path(sys.executable).parent / "prefect")
# Three heartbeats missed, as flows.serve, but of Prefect's default period (180 s): a process worker started
# by hand on the pool runs its flow runs with that one, and the automation judges every run on the pool.
ZOMBIE_AFTER_SECONDS = 540


def say(line: str) -> None:
    """One line of the worker's own log (``state/logs/worker.log`` under the stack)."""
    print(f"{time.strftime('%H:%M:%S')} | flows.pool_worker | {line}", flush=True)


def ensure_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            say(f"work pool {name!r} (process): created")
        except ObjectAlreadyExists:
            say(f"work pool {name!r}: exists")


def deployment_ids() -> list:
    """Ids of :data:`flows.recovery.DEPLOYMENTS` as registered now (``prefect deploy --all`` made them)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [client.read_deployment_by_name(name).id for name in recovery.DEPLOYMENTS]


def main() -> None:
    project = Path.cwd()
    ensure_pool(POOL)
    try:
        recovery.reconcile(project, say=say, pool=POOL)
    except Exception as err:  # noqa: BLE001 (cleaning up must not keep the worker from working)
        say(f"reconciling the runs of a previous worker failed, starting anyway: {err!r}")
    say("prefect deploy --all (prefect.yaml)")
    deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], capture_output=True, text=True)
    print(deploy.stdout[-4000:], deploy.stderr[-4000:], sep="\n", flush=True)
    if deploy.returncode != 0:
        sys.exit(f"prefect deploy --all exited {deploy.returncode} (its output is above)")
    try:
        ids = deployment_ids()
        recovery.ensure_zombie_automation(ids, ZOMBIE_AFTER_SECONDS, say, recovery.POOL_AUTOMATION, recovery.POOL_TAG)
    except Exception as err:  # noqa: BLE001 (a restart reconciles anyway)
        say(f"could not create the zombie-run automation: {err!r}")
    say(f"starting a process worker on {POOL!r}, one flow run at a time")
    # Flow runs send a heartbeat every 30 s (Prefect's minimum; they inherit this environment): the UI shows
    # a live run as alive, and the automation above crashes one whose heartbeats stop.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    # A name that survives restarts: the next start's reconcile tells this worker from another live one.
    name = recovery.pool_worker_name(project)
    os.execv(PREFECT, [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1", "--name", name])


if __name__ == "__main__":
    main()
