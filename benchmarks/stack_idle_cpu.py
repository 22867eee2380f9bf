"""What the local stack costs the cores while it waits: CPU per service, idle, side by side.

    .venv/bin/python benchmarks/stack_idle_cpu.py [--seconds 60] [--poll 1,30]

Starts the stack (`free stack up`'s services, on free loopback ports, in a fresh project copy under
``benchmarks/work/stack_idle_cpu``) once per runner poll interval in ``--poll``
(``PREFECT_RUNNER_POLL_FREQUENCY``: how often the worker asks the server for runs to start), waits
15 s for start-up work to settle, then counts each service's CPU seconds over ``--seconds`` of wall
time (every process of its process group, from psutil). Nothing runs meanwhile: this is the share of
a core the stack takes from the stages of a deployment run, beside the stages' own work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import psutil

from free import stack
from free.bench.pipeline import copy_project

REPO = Path(__file__).resolve().parents[1]


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes of process group ``pgid``."""
    total = 0.0
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                times = proc.cpu_times()
                total += times.user + times.system
        except (psutil.Error, ProcessLookupError):
            continue
    return total


def idle_share(settings: stack.StackSettings, seconds: float, settle: float = 15.0) -> dict[str, float]:
    """Percent of one core each service of the running stack uses over ``seconds`` of idle time."""
    groups = {name: service["pgid"] for name, service in stack.status(settings)["services"].items()}
    time.sleep(settle)
    before = {name: group_cpu_seconds(pgid) for name, pgid in groups.items()}
    started = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - started
    return {name: round(100 * (group_cpu_seconds(pgid) - before[name]) / wall, 2) for name, pgid in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="idle window measured per setting")
    parser.add_argument("--poll", default="1,30", help="runner poll intervals to compare, seconds")
    args = parser.parse_args()
    work = REPO / "benchmarks" / "work" / "stack_idle_cpu"
    shutil.rmtree(work, ignore_errors=True)
    project = work / "project"
    project.mkdir(parents=True)
    copy_project(REPO, project)
    rows = {}
    for poll in [float(p) for p in args.poll.split(",")]:
        settings = stack.StackSettings(
            state_dir=work / f"state-poll-{poll:g}",
            project_dir=project,
            prefect_port=stack.free_port_block(1),
            mlflow_port=stack.free_port_block(1),
            s3_port=stack.free_port_block(1),
            aux_port=stack.free_port_block(9),
        )
        saved = os.environ.get("PREFECT_RUNNER_POLL_FREQUENCY")
        os.environ["PREFECT_RUNNER_POLL_FREQUENCY"] = f"{poll:g}"  # the worker inherits it (flows/serve.py)
        try:
            stack.up(settings, say=lambda line: None)
            rows[poll] = idle_share(settings, args.seconds)
        finally:
            stack.down(settings, say=lambda line: None)
            if saved is None:
                os.environ.pop("PREFECT_RUNNER_POLL_FREQUENCY", None)
            else:
                os.environ["PREFECT_RUNNER_POLL_FREQUENCY"] = saved
    names = list(next(iter(rows.values())))
    print(f"idle stack, % of one core over {args.seconds:g} s ({os.cpu_count()} cores)")
    print("| runner poll (s) | " + " | ".join(names) + " | total |")
    print("|---" * (len(names) + 2) + "|")
    for poll, shares in rows.items():
        print(f"| {poll:g} | " + " | ".join(f"{shares[n]:.1f}" for n in names) + f" | {sum(shares.values()):.1f} |")


if __name__ == "__main__":
    main()
