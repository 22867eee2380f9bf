"""The stack's worker the Prefect way: a ``process`` worker of work pool ``free-local`` running the
deployments declared in ``prefect.yaml`` (``free stack up --worker pool``).

What it does is what a user would type in the project root, in order:

1. make the pool when missing: ``prefect work-pool create free-local --type process``;
2. ``prefect deploy --all`` (the deployments of ``prefect.yaml``: ``free/full-pipeline``, ``promote``,
   ``smoke``, all on that pool);
3. become ``prefect worker start --pool free-local --type process --limit 1`` (``exec``: the worker
   is this process, the leader of the stack's ``worker`` group, so ``free stack down`` stops it and
   the flow runs it started).

The default worker, ``flows.serve`` (``--worker serve``), serves the same flows with ``serve()``;
what this one does not do is that worker's clean-up after a dead worker (``flows.recovery``: runs
left RUNNING are crashed at start, a 90 s heartbeat automation) - a pool's runs are its worker's
business, and Prefect's own rules apply to them (README, "Work pools").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

POOL = os.environ.get("FREE_WORK_POOL", "free-local")
PREFECT = str(Path(sys.executable).parent / "prefect")


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


def main() -> None:
    ensure_pool(POOL)
    say("prefect deploy --all (prefect.yaml)")
    deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], capture_output=True, text=True)
    print(deploy.stdout[-4000:], deploy.stderr[-4000:], sep="\n", flush=True)
    if deploy.returncode != 0:
        sys.exit(f"prefect deploy --all exited {deploy.returncode} (its output is above)")
    say(f"starting a process worker on {POOL!r}, one flow run at a time")
    # Flow runs send a heartbeat every 30 s (Prefect's minimum): the UI shows a live run as alive.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    os.execv(PREFECT, [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1"])


if __name__ == "__main__":
    main()
