"""Serve the deployments ``free/full-pipeline`` and ``promote/promote`` from this process.

``free stack up`` starts it (service ``worker``) in the project directory with the stack's settings
in its environment; ``python -m flows.serve`` runs it by hand (set PREFECT_API_URL first). Flow
runs execute in processes forked from a forkserver child of this one that imported the third-party
libraries once (Prefect, MLflow, DVC, torch: :mod:`flows.warm_runs`; each run loads the flow anew), in
its process group and the project directory.

Before it takes runs, it cleans up after a worker that died (:func:`flows.recovery.reconcile`): runs
of these deployments left RUNNING without a process become Crashed, what is left of their processes
is stopped, their MLflow runs end FAILED. While it serves, each flow run sends a heartbeat every
:data:`HEARTBEAT_SECONDS`, and a Prefect automation crashes a run whose heartbeats stop for
:data:`ZOMBIE_AFTER_SECONDS` (the worker died and nothing restarted it).
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from prefect.exceptions import TerminationSignal
from prefect.runner import Runner

from flows import recovery, warm_runs
from flows.pipeline import full_pipeline
from flows.promotion import promote_flow

HEARTBEAT_SECONDS = 30  # Prefect's minimum
ZOMBIE_AFTER_SECONDS = 90  # three heartbeats missed: slow but alive runs on a busy machine are spared
# How often the runner asks the server for runs to start. Prefect's default (10 s) was, on average, 5 s
# of every deployment run spent waiting to be picked up; one query a second costs the server nothing
# that shows. PREFECT_RUNNER_POLL_FREQUENCY, when set, wins.
POLL_SECONDS = float(os.environ.get("PREFECT_RUNNER_POLL_FREQUENCY", 1))
API_WAIT_SECONDS = 180  # `free stack up` starts this process beside the Prefect server: wait for it


def say(line: str) -> None:
    """One line of the worker's own log (its stdout: ``state/logs/worker.log`` under the stack)."""
    print(f"{time.strftime('%H:%M:%S')} | flows.serve | {line}", flush=True)


def deployments() -> list:
    """The two deployments, tagged as served here (the zombie automation judges only these). The runner
    runs them from their entrypoints, so the pipeline flow carries its recovery hooks itself."""
    return [
        full_pipeline.to_deployment(
            name="full-pipeline",
            description="FREE end to end through DVC, tracked in MLflow; registers the meta-learner (challenger).",
            parameters={"experiment": "tiny", "overrides": []},
            tags=[recovery.SERVED_TAG],
        ),
        promote_flow.to_deployment(
            name="promote",
            description="Move alias champion to the challenger if it is not worse beyond the CI.",
            tags=[recovery.SERVED_TAG],
        ),
    ]


def wait_for_api(timeout: float = API_WAIT_SECONDS) -> None:
    """Return once ``$PREFECT_API_URL/health`` answers (the stack starts the server and this process
    together, so the imports above overlap the server's start); exit naming the URL if it never does."""
    url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not url:
        return  # a temporary server will be started by Prefect itself
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310 (configured URL)
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the Prefect API at {url} (PREFECT_API_URL) did not answer within {timeout:.0f} s")
        time.sleep(0.3)


def main() -> None:
    try:
        warm_runs.install()  # its imports overlap the Prefect server's start (free stack up starts both)
    except Exception as err:  # noqa: BLE001 (runs still start, as Prefect starts them: 3 s slower each)
        say(f"flow runs will start cold (python -m prefect.engine): no warm forkserver: {err!r}")
    wait_for_api()
    try:
        recovery.reconcile(Path.cwd(), say=say)
    except Exception as err:  # noqa: BLE001 (cleaning up must not keep the worker from serving)
        say(f"reconciling the runs of a previous worker failed, serving anyway: {err!r}")
    # What prefect.serve() does, with heartbeats on and the deployments' ids for the automation.
    # limit=1: one pipeline at a time, they share the working tree and dvc.lock
    runner = Runner(
        limit=1, query_seconds=POLL_SECONDS, heartbeat_seconds=HEARTBEAT_SECONDS, pause_on_shutdown=True
    )
    ids = [runner.add_deployment(deployment) for deployment in deployments()]
    try:
        recovery.ensure_zombie_automation(ids, ZOMBIE_AFTER_SECONDS, say=say)
    except Exception as err:  # noqa: BLE001 (a restart reconciles anyway)
        say(f"could not create the zombie-run automation: {err!r}")
    say(f"serving {', '.join(recovery.DEPLOYMENTS)} (one run at a time)")
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal) as exc:
        say(f"received {type(exc).__name__}, shutting down")


if __name__ == "__main__":
    main()
