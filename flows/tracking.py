"""MLflow side of the pipeline: one parent run per pipeline run, a nested run per stage, the model.

Everything here reads what the stages wrote (``artifacts/``, ``dvc.lock``, ``params.yaml``) after
they ran; the stages themselves know nothing about MLflow. The tracking server comes from
``MLFLOW_TRACKING_URI`` (set by ``free stack``) or ``tracking.tracking_uri`` of the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from free.config import Config

STAGE_SECTIONS = {  # the config sections each stage reads (logged as the nested run's params)
    "data": ("dataset",),
    "teachers": ("seed", "dataset", "teachers"),
    "metatrain": ("seed", "device", "model", "inversion", "taskcache", "metalearn", "method"),
    "metatest": ("evaluate",),
}
# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, assistant); with it,
# on the runs. Set when the experiment is created, and added to an existing one that lacks it.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
CURVE_METRICS = ("query_acc", "query_loss", "teacher_acc", "inversion_loss", "recovery_seconds", "val_acc")


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists stay one value."""
    if isinstance(tree, dict):
        flat: dict[str, str] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): json.dumps(tree) if isinstance(tree, list) else str(tree)}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_commit(project: Path) -> str:
    """``HEAD`` of the project, with ``-dirty`` when tracked files changed; ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=project, capture_output=True, text=True
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


# How long an MLflow call may keep trying before the pipeline gives up on it, set unless the user set
# them. MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) kept a run with MLflow down
# going for 17 minutes. urllib3 (2.x, util/retry.py) makes retries + 1 attempts and sleeps nothing
# after the first failed one, then min(120, factor * 2**(n-1) + uniform(0, jitter)) seconds after the
# n-th consecutive one. Here: 4 attempts, sleeps 0, 2, 4 s (+ < 0.5 each of the last two), so a blip
# of up to ~6 s (a server restart) is ridden out, and (:func:`outage_seconds` computes it)
#   MLflow down (connection refused at once):      one call fails within 7 s;
#   MLflow hung (accepts, never answers): 4 x 5 s timeout + 7 s = 27 s.
# The flow's tracking tasks have no Prefect retries on top (flows/pipeline.py), and after a failed
# tracking call the flow makes one more (ending the parent run FAILED), which fails the same way:
# an outage during a run fails it within 2 x 7 = 14 s (down) or 2 x 27 = 54 s (hung): under 60 s.
# tests/test_tracking_faults.py checks the real client against this on an injected clock.
# A read timeout of 5 s is plenty for the pipeline's calls on one machine (the largest, an artifact
# upload of the model through the server's proxy, answers once the server has stored the file); for a
# remote server and large models set MLFLOW_HTTP_REQUEST_TIMEOUT higher.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


def outage_seconds(*, hung: bool, limits: dict[str, str] = HTTP_LIMITS, calls: int = 2) -> float:
    """The longest ``calls`` MLflow calls in a row keep trying under ``limits`` (urllib3 2.x's
    arithmetic above) when the server is down (connection refused at once) or ``hung`` (accepts,
    never answers: each attempt waits out the timeout). A server that trickles bytes slower than the
    timeout, or a connect that itself takes the timeout, is outside this bound."""
    retries = int(limits["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    factor = float(limits["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    jitter = float(limits["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"])
    timeout = float(limits["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    backoff_max = 120.0  # urllib3's Retry.DEFAULT_BACKOFF_MAX; MLflow leaves it as is
    sleeps = sum(min(backoff_max, factor * 2 ** (n - 1) + jitter) for n in range(2, retries + 1))
    waits = (retries + 1) * timeout if hung else 0.0  # a refused connect takes no time
    return calls * (sleeps + waits)


def client(cfg: Config) -> MlflowClient:
    """A client of the configured tracking server (``MLFLOW_TRACKING_URI`` wins, see free.config),
    with bounded retries and timeouts (:data:`HTTP_LIMITS`, unless set in the environment)."""
    # tqdm bars of artifact up/downloads would only be redraw noise in the worker's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)  # read by MLflow at each request
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    return MlflowClient(cfg.tracking.tracking_uri)


def ensure_experiment(tracker: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing, tagged as model development (runs view)."""
    key, kind = EXPERIMENT_KIND
    experiment = tracker.get_experiment_by_name(name)
    if experiment is None:
        return tracker.create_experiment(name, tags={key: kind})
    if key not in experiment.tags:  # an explicit choice of another kind stays
        tracker.set_experiment_tag(experiment.experiment_id, key, kind)
    return experiment.experiment_id


def start_parent(cfg: Config, params: dict, tags: dict[str, str], params_text: str | None = None) -> str:
    """Open the pipeline's parent run, left RUNNING until :func:`finish`: the resolved config as
    flattened params and (``params_text``) as the artifact ``params.yaml``. Returns its id."""
    tracker = client(cfg)
    experiment_id = ensure_experiment(tracker, cfg.tracking.experiment)
    run = tracker.create_run(experiment_id, tags=tags, run_name=tags.get("mlflow.runName"))
    _log(tracker, run.info.run_id, params=flatten(params))
    if params_text is not None:
        tracker.log_text(run.info.run_id, params_text, "params.yaml")
    return run.info.run_id


def finish(
    cfg: Config, run_id: str, status: str, tags: dict[str, str] | None = None, metrics: dict | None = None
) -> None:
    tracker = client(cfg)
    _log(tracker, run_id, tags=tags or {}, metrics=metrics)
    tracker.set_terminated(run_id, status)


def log_stage(
    parent_id: str, stage: str, project: Path, cfg: Config, params: dict, info: dict[str, Any],
    log_file: Path | None = None,
) -> str:  # fmt: skip
    """A nested run for ``stage``: its config sections, metrics (curves with steps), artifacts, lineage,
    and its full output (``log_file``) as ``logs/<stage>.log``. ``info["outcome"] == "failed"``: only
    the config and the output, and the run ends FAILED."""
    tracker = client(cfg)
    parent = tracker.get_run(parent_id)
    tags = {"mlflow.parentRunId": parent_id, **{f"stage.{k}": str(v) for k, v in info.items()}}
    run_id = tracker.create_run(parent.info.experiment_id, tags=tags, run_name=stage).info.run_id
    failed = info.get("outcome") == "failed"
    try:
        _log(tracker, run_id, params=flatten({k: params[k] for k in STAGE_SECTIONS[stage] if k in params}))
        if log_file is not None and log_file.is_file():
            tracker.log_artifact(run_id, str(log_file), "logs")
        if not failed:
            LOGGERS[stage](tracker, run_id, project / cfg.paths.artifacts_dir)
    except Exception:
        tracker.set_terminated(run_id, "FAILED")
        raise
    tracker.set_terminated(run_id, "FAILED" if failed else "FINISHED")
    return run_id


def tag_run(tracker: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    """Set ``tags`` on run ``run_id`` in one request (a request per tag: 40 ms each on the local stack)."""
    _log(tracker, run_id, tags=tags)


def _log(tracker: MlflowClient, run_id: str, params: dict | None = None, metrics: dict | None = None,
         step: int = 0, tags: dict | None = None) -> None:  # fmt: skip
    now = int(time.time() * 1000)
    params_list = [Param(k, v[:6000]) for k, v in (params or {}).items()]
    for start in range(0, len(params_list), 100):  # the server takes at most 100 params per batch
        tracker.log_batch(run_id, params=params_list[start : start + 100])
    entries = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
    if entries or tags:
        tracker.log_batch(run_id, metrics=entries, tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])


def _log_input(tracker: MlflowClient, run_id: str, dataset: MetaDataset, context: str) -> None:
    tag = InputTag(key="mlflow.data.context", value=context)
    tracker.log_inputs(run_id, datasets=[DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[tag])])


def _log_data(tracker: MlflowClient, run_id: str, root: Path) -> None:
    manifest = root / "data" / "splits.json"
    name = json.loads(manifest.read_text()).get("dataset", {}).get("name", "dataset")
    tracker.log_artifact(run_id, str(manifest), "data")
    _log_input(tracker, run_id, _lineage("dataset", name, manifest), "meta-val/meta-test")


def _log_teachers(tracker: MlflowClient, run_id: str, root: Path) -> None:
    zoo_file = root / "teachers" / "zoo.json"
    zoo = json.loads(zoo_file.read_text())
    for step, card in enumerate(zoo["teachers"]):
        if "val_acc" in card:
            _log(tracker, run_id, metrics={"teacher_val_acc": card["val_acc"]}, step=step)
    _log(tracker, run_id, metrics={"n_teachers": len(zoo["teachers"])})
    tracker.log_artifact(run_id, str(zoo_file), "teachers")
    _log_input(tracker, run_id, _lineage("teacher-zoo", "teacher-zoo", zoo_file, _zoo_digest(zoo)), "teachers")


def _log_metatrain(tracker: MlflowClient, run_id: str, root: Path) -> None:
    curves = json.loads((root / "metalearner" / "curves.json").read_text())
    now = int(time.time() * 1000)
    points = [Metric(k, float(p[k]), now, int(p["iteration"])) for p in curves for k in CURVE_METRICS if k in p]
    for start in range(0, len(points), 1000):  # at most 1000 metrics per batch
        tracker.log_batch(run_id, metrics=points[start : start + 1000])
    card = json.loads((root / "metalearner" / "card.json").read_text())
    _log(tracker, run_id, metrics={"best_val_acc": card["best_val_acc"], "best_iteration": card["best_iteration"]})
    for path in ("metalearner/card.json", "metalearner/curves.png", "generator/recovery.json"):
        tracker.log_artifact(run_id, str(root / path), path.split("/")[0])
    samples = root / "generator" / "samples"
    if samples.is_dir():
        tracker.log_artifacts(run_id, str(samples), "generator/samples")


def _log_metatest(tracker: MlflowClient, run_id: str, root: Path) -> None:
    metrics = json.loads((root / "metrics" / "metatest.json").read_text())
    _log(tracker, run_id, metrics=headline(metrics))
    tracker.log_artifact(run_id, str(root / "metrics" / "metatest.json"), "metrics")
    tracker.log_artifact(run_id, str(root / "plots" / "metatest.png"), "plots")


LOGGERS = {"data": _log_data, "teachers": _log_teachers, "metatrain": _log_metatrain, "metatest": _log_metatest}


def headline(metrics: dict) -> dict[str, float]:
    """``{"acc_5way_1shot": .., "ci95_5way_1shot": .., ...}`` from ``metatest.json``."""
    flat = {}
    for setting, value in metrics.items():
        if isinstance(value, dict):
            flat[f"acc_{setting}"], flat[f"ci95_{setting}"] = float(value["acc"]), float(value["ci95"])
    return flat


def _zoo_digest(zoo: dict) -> str:
    return sha256_bytes("\n".join(card["sha256"] for card in zoo["teachers"]).encode())


def _lineage(kind: str, name: str, path: Path, digest: str | None = None) -> MetaDataset:
    digest = digest or sha256_bytes(path.read_bytes())
    return MetaDataset(source=HTTPDatasetSource(f"file://{path.name}#{kind}"), name=name, digest=digest[:16])


def lineage_tags(project: Path, cfg: Config) -> dict[str, str]:
    """Hashes that pin what a model came from: data split manifest, teacher zoo, DVC lock, git."""
    root = project / cfg.paths.artifacts_dir
    tags = {"git.commit": git_commit(project)}
    hashed = {"dataset.splits_sha256": root / "data" / "splits.json", "dvc.lock_sha256": project / "dvc.lock"}
    for key, path in hashed.items():
        if path.is_file():
            tags[key] = sha256_bytes(path.read_bytes())
    zoo = root / "teachers" / "zoo.json"
    if zoo.is_file():
        tags["teachers.zoo_sha256"] = _zoo_digest(json.loads(zoo.read_text()))
    return tags


# What the registered model needs to load and serve: MLflow's pyfunc loader, the package (which pins torch,
# safetensors and the rest) and numpy for its inputs. Passed to MLflow rather than inferred: inference
# loads the model in a subprocess to record its imports, 12-16 s of every registration here (docs/RESULTS.md,
# "The cost of orchestration"), and it also listed packages MLflow itself imports (colorama, pydot, tqdm).
MODEL_REQUIREMENTS = ("mlflow", "cloudpickle", "free-pipeline", "numpy")


def model_requirements() -> list[str]:
    """:data:`MODEL_REQUIREMENTS` pinned to the versions installed here (``mlflow==3.17.2``, ...)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in MODEL_REQUIREMENTS]


# Model version tag: the hash of what a registered version holds (:func:`model_digest`). A run whose
# model would hash the same as the challenger's registers nothing new (flows.pipeline.register).
MODEL_DIGEST_TAG = "model.content_sha256"


def model_digest(project: Path, cfg: Config, metrics: dict) -> str:
    """sha256 of everything a registered version is made of: the meta-learner's weights, the serving
    card's settings and meta-test metrics, the input example's way, the serving code and the pinned
    requirements. Reads files only (no torch): a no-op rerun asks this before deciding to log anything."""
    import free

    package = Path(free.__file__).parent
    weights = project / cfg.paths.artifacts_dir / "metalearner" / "metalearner.safetensors"
    settings = {
        "test_inner_steps": cfg.evaluate.inner_steps,
        "inner_lr": cfg.metalearn.inner_lr,
        "n_way": cfg.evaluate.n_way,
        "metatest": metrics,
        "requirements": model_requirements(),
    }
    digest = hashlib.sha256()
    for part in (weights, package / "serving_model.py", package / "serving.py"):
        digest.update(sha256_bytes(part.read_bytes()).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def challenger_with_digest(cfg: Config, digest: str) -> str | None:
    """The version that holds alias ``challenger`` if its :data:`MODEL_DIGEST_TAG` is ``digest``, else
    None (also when the model or the alias does not exist yet; other errors are raised)."""
    try:
        version = client(cfg).get_model_version_by_alias(cfg.tracking.registered_model, "challenger")
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no model / no alias
            return None
        raise
    return str(version.version) if version.tags.get(MODEL_DIGEST_TAG) == digest else None


def log_model(
    parent_id: str, project: Path, cfg: Config, metrics: dict, tags: dict[str, str] | None = None
) -> tuple[str, str]:
    """Log the meta-learner as a pyfunc in the parent run and register it, the version with ``tags``.
    Returns ``(name, version)``."""
    from free import serving_model
    from free.checkpoints import load_classifier
    from free.serving import CARD, WEIGHTS, input_example, signature

    weights = project / cfg.paths.artifacts_dir / "metalearner" / "metalearner.safetensors"
    _, meta = load_classifier(weights)  # validates the file before it goes to the registry
    serving_card = {
        **{k: meta[k] for k in ("arch", "n_classes", "channels", "image_size", "head")},
        "test_inner_steps": cfg.evaluate.inner_steps,
        "inner_lr": cfg.metalearn.inner_lr,
        "metatest": metrics,
    }
    client(cfg)
    # The fluent run context ends the parent as FINISHED on exit; the flow's `finish` sets the final state.
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=parent_id):
        card_path = Path(tmp) / "card.json"
        card_path.write_text(json.dumps(serving_card, indent=2))
        info = mlflow.pyfunc.log_model(
            name="meta-learner",
            python_model=serving_model.__file__,  # models-from-code: no pickle in the registry
            artifacts={WEIGHTS: str(weights), CARD: str(card_path)},
            signature=signature(meta),
            input_example=input_example(meta, min(meta["n_classes"], cfg.evaluate.n_way)),
            pip_requirements=model_requirements(),
        )
    # Registered here rather than by log_model (registered_model_name): the version is created with its
    # tags in one request, where a request per tag afterwards took about 0.5 s (11 tags, 40 ms each).
    version = mlflow.register_model(info.model_uri, cfg.tracking.registered_model, tags=tags)
    return cfg.tracking.registered_model, str(version.version)


class NotUpToDate(RuntimeError):
    """``dvc status`` says a stage's outputs do not match its code, data or params: registering them
    would record a model under settings that did not make it."""


def stale_stages(project: Path) -> dict:
    """``dvc status --json`` of ``project`` (reads, never runs a stage): ``{}`` when every stage is up
    to date, else ``{stage: [what changed]}``.

    Raises:
        NotUpToDate: ``dvc status`` itself failed (e.g. another DVC command holds the repo lock).
    """
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise NotUpToDate(f"`dvc status` failed in {project}: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    return json.loads(proc.stdout.strip() or "{}")


def register_finished(project: Path, push: bool = False) -> dict:
    """Log a pipeline run whose stages finished (``dvc status`` clean) and register its model, without
    running anything again: what the flow's tracking did or would have done (e.g. when MLflow was
    down). First :mod:`flows.preflight` (MLflow; S3 when ``push``), then a parent run (``params.yaml``,
    tag ``pipeline.registered_later``), a nested run per stage
    from its outputs and its last output log (``.dvc/tmp/free-stage-logs/<stage>.log``), then the
    flow's own tail (:func:`flows.pipeline.conclude`): ``dvc push`` when ``push``, a model version
    with its metrics and lineage, alias ``challenger``, the parent run FINISHED.

    Raises:
        NotUpToDate: a stage is not up to date (names them; nothing is logged).
        flows.preflight.PreflightError: MLflow (or, with ``push``, S3) does not answer.
    """
    import yaml

    from flows import preflight
    from flows.pipeline import STAGE_LOGS, STAGES, conclude, stage_outcome
    from free.config import load_params

    stale = stale_stages(project)
    if stale:
        names = ", ".join(f"{stage} ({_changes(what)})" for stage, what in stale.items())
        raise NotUpToDate(
            f"not registered: `dvc status` says these stages are not up to date: {names}. Their outputs "
            "are not those of the current code and params.yaml; run the pipeline (`dvc repro` or the flow) "
            "first, or put params.yaml back to the run's settings (`free config params <the run's overrides>`)"
        )
    params_text = (project / "params.yaml").read_text()
    params, cfg = yaml.safe_load(params_text), load_params(project / "params.yaml")
    checked = preflight.check(project, cfg.tracking.tracking_uri, push, prefect=False, storage=cfg.storage)
    commit = git_commit(project)
    tags = {
        "mlflow.runName": f"free register {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "pipeline.registered_later": "true",  # by `free register`, from the finished stages' outputs
        "pipeline.overrides": "(params.yaml as found)",
        "git.commit": commit,
    }
    parent_id = start_parent(cfg, params, tags, params_text)
    try:
        for stage in STAGES:
            log_file = project / STAGE_LOGS / f"{stage}.log"
            lines = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
            outcome = stage_outcome(stage, lines) if lines else "finished earlier"  # no flow run logged it
            info = {"stage": stage, "outcome": outcome, "registered_later": True}
            log_stage(parent_id, stage, project, cfg, params, info, log_file)
    except BaseException:
        finish(cfg, parent_id, "FAILED")
        raise
    metrics, model = conclude(project, cfg, parent_id, commit, push, register_model=True)
    return {"mlflow_run_id": parent_id, "metrics": metrics, "model": model, "pushed": push, "preflight": checked}


def _changes(what: list) -> str:
    """DVC's status entries of a stage in a line: ``changed deps: params.yaml (evaluate modified)``."""

    def detail(value: object) -> str:
        if not isinstance(value, dict):
            return str(value)
        return ", ".join(f"{k} ({detail(v)})" if isinstance(v, dict) else f"{k} {v}" for k, v in value.items())

    return "; ".join(
        "; ".join(f"{kind}: {detail(d)}" for kind, d in entry.items()) if isinstance(entry, dict) else str(entry)
        for entry in what
    )
