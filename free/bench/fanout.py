"""``free bench fanout``: wall time of the teacher stage with runner=local vs runner=dask at 1, 2, ... workers.

Each variant runs the real stage command (``python -m free teachers <overrides> [runner=dask
runner.workers=W]``) as a subprocess into its own fresh artifacts folder (the data stage's
``splits.json`` copied in), side by side in one invocation, so that every variant trains the whole
zoo from nothing on the same machine state. Reported per variant: the command's wall time (process
start, imports, for dask the ephemeral Prefect server and the LocalCluster, training, shutdown), the
stage's own ``seconds`` (the zoo's training as the stage times it) and the load average before and
after (the machine may be shared). Every variant must write the same teacher files (``identical``).

Without ``PREFECT_API_URL`` the dask variants start Prefect's ephemeral server; with it (the stack)
they report to that server. Variants run one after the other, never two at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run(
    overrides: list[str], workers: list[int], work: Path, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Time the teacher stage for ``runner=local`` and ``runner=dask`` with each of ``workers``."""
    work = Path(work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data-stage"
    _free(["data", "build", *overrides, f"paths.artifacts_dir={data}"])
    variants = [("local", [])] + [(f"dask-{w}", ["runner=dask", f"runner.workers={w}"]) for w in workers]
    rows, reference = [], None
    for name, runner in variants:
        artifacts = work / name
        (artifacts / "data").mkdir(parents=True)
        shutil.copy2(data / "data" / "splits.json", artifacts / "data" / "splits.json")
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        summary = _free(["teachers", *overrides, f"paths.artifacts_dir={artifacts}", *runner])
        wall = time.perf_counter() - started
        digests = _digests(artifacts / "teachers")
        reference = reference or digests
        row = {
            "runner": name,
            "wall_seconds": round(wall, 2),
            "stage_seconds": summary.get("seconds"),
            "tasks_seconds": summary.get("tasks_seconds"),  # dask: the tasks' own time, summed
            "teachers": summary.get("n_teachers"),
            "identical": digests == reference,
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
        }
        say(f"{name}: {row['wall_seconds']} s wall, {row['stage_seconds']} s in the stage, load {load_before:.1f}")
        rows.append(row)
    return {"overrides": overrides, "workers": workers, "cpu_count": os.cpu_count(), "rows": rows}


def plot(result: dict[str, Any], json_path: Path) -> Path:
    """Wall time and the stage's own time per runner."""
    from free.bench.common import pyplot, savefig

    plt = pyplot()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["wall_seconds"] for r in rows], width=0.4, label="wall (command)")
    ax.bar([x + 0.2 for x in xs], [r["stage_seconds"] or 0 for r in rows], width=0.4, label="in the stage")
    ax.set_xticks(list(xs), [r["runner"] for r in rows])
    ax.set(ylabel="seconds", title=f"teacher stage: {' '.join(result['overrides'])}, {result['cpu_count']} CPUs")
    ax.legend()
    return savefig(fig, json_path)


def _free(args: list[str]) -> dict[str, Any]:
    """Run ``python -m free ARGS``; the JSON summary it prints last (stdout), or fail with its output's tail."""
    done = subprocess.run([sys.executable, "-m", "free", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`free {' '.join(args)}` exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    text = "\n" + done.stdout
    start = text.rfind("\n{")
    try:
        return json.loads(text[start + 1 :]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}
