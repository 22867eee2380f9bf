"""Prefect flow ``free`` (deployment ``full-pipeline``): the DVC stages, tracked in MLflow.

    prefect deployment run free/full-pipeline -p experiment=tiny -p 'overrides=["seed=1"]'

1. writes ``params.yaml`` for the preset + overrides (what ``dvc exp run -S`` does);
2. runs each stage through DVC (``dvc repro --single-item <stage>``), so the lock file, cache and
   remote are the same whichever front door was used; unchanged stages are skipped by DVC. Stage
   output goes to the Prefect log, the stage's progress to a progress artifact;
3. logs a parent MLflow run with a nested run per stage, pushes the outputs to the DVC remote,
   registers the meta-learner and points alias ``challenger`` at it;
4. leaves a markdown artifact with the metrics and links.

A failed stage fails the flow; stages finished before it stay in the DVC cache and ``dvc.lock``,
and ``metatrain`` keeps its resume checkpoint, so running the flow again resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from flows import tracking
from free.config import Config, load_params, params_yaml

STAGES = ("data", "teachers", "metatrain", "metatest")
STAGE_COMMAND = {"data": "data build"}  # the rest: `python -m free <stage>`


def _dvc(*args: str, project: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
        cwd=project,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )


@task(cache_policy=NO_CACHE)  # bad overrides do not get better on retry
def write_params(project: Path, overrides: list[str]) -> dict:
    """Compose params/ with the overrides, write params.yaml, return the resolved tree."""
    import yaml

    text = params_yaml(overrides)
    path = project / "params.yaml"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    get_run_logger().info("params.yaml <- params/ %s", " ".join(overrides) or "(defaults)")
    return yaml.safe_load(text)


@task(cache_policy=NO_CACHE, task_run_name="stage-{stage}")  # no retries: a failed stage fails the same way
def run_stage(project: Path, stage: str) -> dict[str, Any]:
    """``dvc repro --single-item <stage>``, its output in the task log, its progress as an artifact."""
    logger = get_run_logger()
    with tempfile.TemporaryDirectory() as tmp:
        progress_file = Path(tmp) / "progress.json"
        proc = _dvc("repro", "--single-item", stage, project=project, env={"FREE_PROGRESS_FILE": str(progress_file)})
        watcher = _ProgressWatcher(progress_file, stage)
        watcher.start()
        assert proc.stdout is not None
        tail: list[str] = []
        ran = False
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                logger.info("%s", line)
                tail = [*tail[-19:], line]
                ran = ran or line.startswith(f"Running stage '{stage}'")
        code = proc.wait()
        watcher.stop()
    if code != 0:
        raise RuntimeError(f"stage {stage} failed (dvc repro exit {code}):\n" + "\n".join(tail))
    logger.info("stage %s: %s", stage, "ran" if ran else "up to date (skipped or restored from the DVC cache)")
    return {"stage": stage, "ran": ran}


class _ProgressWatcher(threading.Thread):
    """Mirror the stage's progress file (written by free.progress.bar) into a Prefect progress artifact."""

    def __init__(self, path: Path, stage: str) -> None:
        super().__init__(daemon=True)
        self.path, self.stage, self.done = path, stage, threading.Event()
        self.artifact = create_progress_artifact(0.0, key=f"stage-{stage}", description=f"stage {stage}")

    def run(self) -> None:
        last = None
        while not self.done.wait(2.0):
            last = self._update(last)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)
        update_progress_artifact(self.artifact, 100.0, description=f"stage {self.stage}: done")

    def _update(self, last: Any) -> Any:
        try:
            state = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return last
        if state != last and state.get("total"):
            percent = 100.0 * state["completed"] / state["total"]
            text = f"stage {self.stage}: {state['description']} {state['completed']}/{state['total']}"
            update_progress_artifact(self.artifact, percent, description=text)
        return state


@task(retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)  # tracking server: network
def open_tracking(cfg: Config, params: dict, tags: dict[str, str]) -> str:
    return tracking.start_parent(cfg, params, tags)


@task(retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)
def track_stage(parent_id: str, stage: str, project: Path, cfg: Config, params: dict, info: dict) -> str:
    return tracking.log_stage(parent_id, stage, project, cfg, params, info)


@task(retries=3, retry_delay_seconds=10, cache_policy=NO_CACHE)  # S3: network
def push_outputs(project: Path) -> str:
    proc = _dvc("push", project=project)
    output = proc.communicate()[0]
    if proc.returncode != 0:
        raise RuntimeError(f"dvc push failed:\n{output[-3000:]}")
    get_run_logger().info("%s", output.strip().splitlines()[-1] if output.strip() else "dvc push: nothing to push")
    return output


@task(retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)  # registry: network
def register(parent_id: str, project: Path, cfg: Config, metrics: dict, lineage: dict[str, str]) -> dict:
    """Log the pyfunc model, register a version, tag it with its metrics and lineage, alias challenger."""
    name, version = tracking.log_model(parent_id, project, cfg, metrics)
    client = tracking.client(cfg)
    tags = {**lineage, "mlflow.run_id": parent_id, "evaluate.episodes": str(metrics.get("episodes"))}
    for setting, value in metrics.items():
        if isinstance(value, dict):
            tags[f"metatest.{setting}.acc"], tags[f"metatest.{setting}.ci95"] = str(value["acc"]), str(value["ci95"])
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, "challenger", version)
    return {"name": name, "version": version}


@flow(name="free", log_prints=True)
def full_pipeline(
    experiment: str = "tiny", overrides: list[str] | None = None, push: bool = True, register_model: bool = True
) -> dict:
    """The whole pipeline on ``experiment`` (a preset in params/experiment/, or "" for the defaults)."""
    project = Path.cwd()
    all_overrides = [*([f"experiment={experiment}"] if experiment else []), *(overrides or [])]
    params = write_params(project, all_overrides)
    cfg = load_params(project / "params.yaml")
    flow_run = runtime.flow_run
    tags = {
        "mlflow.runName": f"full-pipeline {flow_run.name or ''}".strip(),
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_url": str(flow_run.ui_url or ""),
        "pipeline.experiment": experiment or "(defaults)",
        "pipeline.overrides": " ".join(all_overrides),
        "git.commit": tracking.git_commit(project),
    }
    parent_id = open_tracking(cfg, params, tags)
    try:
        for stage in STAGES:
            info = run_stage(project, stage)
            track_stage(parent_id, stage, project, cfg, params, info)
        metrics = json.loads((project / cfg.paths.artifacts_dir / "metrics" / "metatest.json").read_text())
        lineage = tracking.lineage_tags(project, cfg)
        if push:
            push_outputs(project)
        model = register(parent_id, project, cfg, metrics, lineage) if register_model else None
    except BaseException:
        tracking.finish(cfg, parent_id, "FAILED")
        raise
    tracking.finish(cfg, parent_id, "FINISHED", tags=lineage, metrics=tracking.headline(metrics))
    summary = {"mlflow_run_id": parent_id, "metrics": metrics, "model": model}
    create_markdown_artifact(_report(cfg, parent_id, metrics, model, all_overrides), key="free-pipeline-report")
    return summary


def _report(cfg: Config, run_id: str, metrics: dict, model: dict | None, overrides: list[str]) -> str:
    uri = cfg.tracking.tracking_uri.rstrip("/")
    tracker = tracking.client(cfg)
    experiment_id = tracker.get_run(run_id).info.experiment_id
    lines = [
        f"# FREE pipeline: {' '.join(overrides) or 'defaults'}",
        "",
        "| setting | accuracy | 95% CI |",
        "|---|---|---|",
        *(
            f"| {k} | {v['acc'] * 100:.2f}% | ± {v['ci95'] * 100:.2f} |"
            for k, v in metrics.items()
            if isinstance(v, dict)
        ),
        "",
        f"{metrics.get('episodes')} meta-test episodes per setting.",
        "",
        f"- MLflow run: [{run_id}]({uri}/#/experiments/{experiment_id}/runs/{run_id})",
    ]
    if model:
        link = f"{uri}/#/models/{model['name']}/versions/{model['version']}"
        lines.append(f"- Registered model: [{model['name']} v{model['version']}]({link}), alias `challenger`")
    return "\n".join(lines) + "\n"
