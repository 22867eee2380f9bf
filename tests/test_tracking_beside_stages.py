"""The pipeline flow's MLflow work beside its stages (flows/pipeline.py ``_run_stages``), in a real flow
run on Prefect's ephemeral server (a private PREFECT_HOME), with stand-ins for the stages and MLflow.

The parent run opens while the first stage runs, and each stage's nested run is logged while the next
stage runs, in the stages' order; everything is logged before ``_run_stages`` returns. A tracking
failure fails the run before the next stage starts, ends the parent run FAILED (no nested run after
that), and is the error the run reports; a parent run that never opened is the error, with nothing
to end. The live flow is in tests/test_orchestration.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """\
import json, sys, time
from pathlib import Path

from prefect import flow, task

from flows import pipeline

events = []


def note(*what):
    events.append([round(time.monotonic(), 3), *what])


def run_stage(project, stage, current):
    note("stage", stage, "start")
    time.sleep(1.0)  # long against a task's start on a busy machine: the nested runs fit inside
    note("stage", stage, "end")
    return {"stage": stage, "ran": True, "outcome": "ran", "seconds": 1.0}


@task
def track_stage(parent_id, stage, project, cfg, params, info, log_file):
    note("track", stage, "start", parent_id)
    time.sleep(0.2)
    if stage == FAIL_TRACKING:
        raise RuntimeError("MLflow went away while logging " + stage)
    note("track", stage, "end")


@task
def open_tracking(fail):
    time.sleep(0.2)
    if fail:
        raise RuntimeError("MLflow refused the parent run")
    note("parent", "opened")
    return "parent-1"


pipeline.run_stage = run_stage
pipeline.up_to_date = lambda project, stage: False
pipeline.track_stage = track_stage
pipeline.tracking.finish = lambda cfg, parent_id, status, **kw: note("finish", parent_id, status)


@flow
def stages(fail_parent):
    parent = open_tracking.submit(fail_parent)
    try:
        return pipeline._run_stages(Path("."), None, {}, parent)
    except Exception as err:
        note("raised", str(err))


results = {}
for case, fail_parent, fail_tracking in [("ok", False, None), ("tracking", False, "teachers"),
                                         ("parent", True, None)]:
    FAIL_TRACKING = fail_tracking
    events = []
    stages(fail_parent)
    results[case] = events
print(json.dumps(results))
"""


def _events(tmp_path: Path) -> dict[str, list[list]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "ERROR"})
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _at(events: list[list], *what: str) -> float:
    return next(e[0] for e in events if tuple(e[1 : 1 + len(what)]) == what)


def test_tracking_runs_beside_the_stages_in_order_and_fails_the_run_before_the_next_stage(tmp_path: Path) -> None:
    results = _events(tmp_path)
    ok = results["ok"]
    stages = ["data", "teachers", "metatrain", "metatest"]
    # The parent opened while the first stage ran; each nested run was logged while the next stage ran.
    assert _at(ok, "stage", "data", "start") < _at(ok, "parent", "opened") < _at(ok, "stage", "data", "end"), ok
    for stage, after in zip(stages, stages[1:], strict=False):
        assert _at(ok, "stage", after, "start") < _at(ok, "track", stage, "end") < _at(ok, "stage", after, "end"), ok
    tracked = [e[2] for e in ok if e[1] == "track" and e[3] == "start"]
    assert tracked == stages and all(e[4] == "parent-1" for e in ok if e[1] == "track" and e[3] == "start"), ok
    assert ok[-1][1:] == ["track", "metatest", "end"], ok  # waited for before _run_stages returned

    # Tracking failed during metatrain: metatrain finished, metatest never started, the parent ended
    # FAILED after the last nested run began, and the run's error is MLflow's.
    failed = results["tracking"]
    assert ["stage", "metatrain", "end"] in [e[1:] for e in failed], failed
    assert not [e for e in failed if e[1:3] == ["stage", "metatest"]], failed
    finish = [e for e in failed if e[1] == "finish"]
    assert [e[2:] for e in finish] == [["parent-1", "FAILED"]], failed
    assert max(e[0] for e in failed if e[1] == "track") <= finish[0][0], failed
    assert failed[-1][1:] == ["raised", "MLflow went away while logging teachers"], failed

    # The parent run never opened: its error is the run's, and there is no parent to end.
    parent = results["parent"]
    assert parent[-1][1:] == ["raised", "MLflow refused the parent run"], parent
    assert not [e for e in parent if e[1] in ("finish", "track")], parent
