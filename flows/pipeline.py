"""Prefect flow ``free`` (deployment ``full-pipeline``): the DVC stages, tracked in MLflow.

    prefect deployment run free/full-pipeline -p experiment=tiny -p 'overrides=["seed=1"]' --watch

1. writes ``params.yaml`` for the preset + overrides (what ``dvc exp run -S`` does) for the run only:
   the file the run found is put back afterwards, failed or not, so a run never edits tracked files;
2. runs each stage through DVC (what ``dvc repro --single-item <stage>`` does, in this process; the
   stage's command in a fresh process forked from a warm interpreter: :mod:`flows.stage_process`), so
   the lock file, cache and remote are the same whichever front door was used; unchanged stages are
   skipped by DVC;
3. logs a parent MLflow run (with the run's ``params.yaml``) and a nested run per stage (with the
   stage's full output), pushes the outputs to the DVC remote, registers the meta-learner and points
   alias ``challenger`` at it;
4. leaves a markdown artifact with the metrics, the stages and links.

What ``--watch`` shows: Prefect's CLI prints the flow run's *events* (the server streams logs only
with ``PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED``, off by default). So each stage's outcome, a failed
stage's error and the final metrics are also emitted as events (``free.stage``, ``free.pipeline``),
one line each; the stage output goes to the task log (progress redraws and DVC's hints at DEBUG).

A failed stage fails the flow; stages finished before it stay in the DVC cache and ``dvc.lock``,
and ``metatrain`` keeps its resume checkpoint, so running the flow again resumes.

Before step 1, :mod:`flows.preflight` checks that MLflow, the DVC remote's S3 endpoint and the
Prefect API answer, and fails the run in seconds naming each one that does not. MLflow calls are
bounded by :data:`flows.tracking.HTTP_LIMITS` (an outage fails a run in under a minute). A run whose
stages finished but whose tracking failed is recorded later by ``free register`` (the same tail,
:func:`conclude`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.exceptions import TerminationSignal
from rich.markup import escape

from flows import guards, preflight, recovery, stage_process, tracking
from free.config import Config, ConfigError, load_params, params_config, params_yaml

STAGES = ("data", "teachers", "metatrain", "metatest")
TAIL_LINES = 15  # of a failed stage's output, shown in the watched output and the error
SCRATCH = Path(".dvc") / "tmp"  # DVC's own scratch folder: git-ignored by .dvc/.gitignore
STAGE_LOGS = SCRATCH / "free-stage-logs"  # <stage>.log: the last run's full output of each stage
PARAMS_BEFORE = SCRATCH / "free-params-before.yaml"  # params.yaml as found, while a run has replaced it

# Redraws of a progress bar: rich (the stages' bars: `meta-training ━━━━╸━━ 12/20 0:01:02`) and tqdm
# (DVC, MLflow: ` 45%|████▌     | 9/20 [00:01<00:02, 4.50it/s]`).
_PROGRESS = re.compile(r"[━╸╺█▏▎▍▌▋▊▉]|\d%\||\d(?:it/s|s/it)\]")
# What DVC says after every stage that ran, addressed to a person at a git prompt.
_DVC_HINTS = re.compile(
    r"^(?:Generating|Updating) lock file|^To (?:track the changes with git|enable auto staging), run:"
    r"|^\s*(?:git add |dvc config core\.autostage)|^Use `dvc push`"
)


# The frame of a rich traceback (the stages' error output): `╭─── Traceback ───╮`, `│ code │`, `╰───╯`.
_FRAME_EDGE = re.compile(r"^\s*[╭╰]─.*[╮╯]\s*$")
_FRAME_SIDES = re.compile(r"^\s*│ ?|\s*│\s*$")


def is_noise(line: str) -> bool:
    """A progress-bar redraw or DVC's git hints: kept in the full log, at DEBUG in the task log."""
    return bool(_PROGRESS.search(line) or _DVC_HINTS.search(line))


def error_line(line: str) -> str:
    """A line of a failed stage's output as shown in its tail: without a traceback's frame, so that
    the tail holds file:line, code and the exception rather than box drawing ("" to drop it)."""
    if _FRAME_EDGE.match(line):
        return ""
    return _FRAME_SIDES.sub("", line).rstrip()


def stage_outcome(stage: str, lines: Iterable[str]) -> str:
    """``ran`` | ``restored`` (from DVC's run cache) | ``skipped`` (up to date), from DVC's output."""
    outcome = "skipped"
    for line in lines:
        if line.startswith(f"Running stage '{stage}'"):
            return "ran"
        if line.startswith(f"Stage '{stage}' is cached"):
            outcome = "restored"
    return outcome


def stage_summary(stage: str, outcome: str, seconds: float) -> str:
    """The one line per stage of the watched output and the task log."""
    return {
        "ran": f"stage {stage}: ran in {seconds:.1f} s",
        "restored": f"stage {stage}: restored from cache",  # short: one 80-column line in the watch
        "skipped": f"stage {stage}: skipped (up to date)",
    }[outcome]


def metrics_line(metrics: dict) -> str:
    """``metatest 5way_1shot 61.2% ± 4.3, 5way_5shot 80.1% ± 3.0 (20 episodes)``."""
    settings = [f"{k} {v['acc'] * 100:.1f}% ± {v['ci95'] * 100:.1f}" for k, v in metrics.items() if isinstance(v, dict)]
    return f"metatest {', '.join(settings)} ({metrics.get('episodes')} episodes)"


class StageFailed(RuntimeError):
    """DVC's reproduction of a stage failed (its command exited non-zero, or DVC refused: a missing
    dependency, a broken lock file); the message ends with the tail of its output."""


def _dvc_error(err: BaseException) -> str:
    """DVC's error as ``dvc repro`` prints it: the message and its causes, ``failed to reproduce 'x':
    failed to run: <cmd>, exited with 1``."""
    from dvc.exceptions import DvcException

    parts: list[str] = []
    while err is not None and len(parts) < 5:
        text = str(err) if isinstance(err, DvcException) else f"{type(err).__name__}: {err}"
        if not parts or text not in parts[-1]:
            parts.append(text)
        err = err.__cause__
    return ": ".join(parts)


def up_to_date(project: Path, stage: str) -> bool:
    """Whether DVC says ``stage`` is up to date (``dvc status <stage>``: its code, params, deps and outs
    match ``dvc.lock``), asked in this process. A ``dvc repro --single-item`` process only to hear that
    took 1.4-1.8 s per stage (DVC's start and the lock file's checks), most of a no-op rerun's stage
    time; this takes about 0.2 s. DVC holds its repository lock meanwhile, as ``dvc status`` does; on
    any doubt (no ``dvc.yaml`` here, the lock held, an error) the answer is no, and ``dvc repro`` decides."""
    if not (project / "dvc.yaml").is_file():
        return False
    try:
        from dvc.repo import Repo

        with Repo(str(project)) as repo:
            return not repo.status(targets=[stage])
    except Exception:  # noqa: BLE001 (dvc repro decides, and reports the error itself)
        return False


def _announce(event: str, resource_id: str, text: str, labels: dict[str, str] | None = None) -> None:
    """An event of this flow run, which ``prefect deployment run --watch`` prints as one line
    ``<event> * <text>`` (the CLI renders the text as rich markup, hence the escape)."""
    failed = "failed" in (labels or {}).values()
    resource = {
        "prefect.resource.id": resource_id,
        "prefect.resource.name": escape(text),
        "prefect.state-type": "FAILED" if failed else "COMPLETED",  # the CLI colours the line by it
        **(labels or {}),
    }
    emit_event(event=event, resource=resource, payload={"text": text})


@task(cache_policy=NO_CACHE)  # bad overrides do not get better on retry
def write_params(project: Path, overrides: list[str], text: str | None = None) -> dict:
    """Write params.yaml for this run (``text``: :func:`free.config.params_yaml` of the overrides, composed
    by the caller; None composes it here), return the resolved tree.

    The file it replaces is kept in ``PARAMS_BEFORE`` until :func:`restore_params` puts it back."""
    import yaml

    try:
        text = text if text is not None else params_yaml(overrides)  # before anything is written
    except ConfigError as err:
        _announce("free.params", "free.params", f"params FAILED: {err}", {"free.params.outcome": "failed"})
        raise
    path, before = project / "params.yaml", project / PARAMS_BEFORE
    if not before.is_file() and path.is_file():
        before.parent.mkdir(parents=True, exist_ok=True)
        before.write_bytes(path.read_bytes())
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    get_run_logger().info("params.yaml <- params/ %s (for this run)", " ".join(overrides) or "(defaults)")
    return yaml.safe_load(text)


def restore_params(project: Path) -> bool:
    """Put back the params.yaml that :func:`write_params` found (after a run, or after a run that was
    killed before it could). Returns whether the file had to change."""
    path, before = project / "params.yaml", project / PARAMS_BEFORE
    if not before.is_file():
        return False
    original = before.read_bytes()
    changed = not path.is_file() or path.read_bytes() != original
    if changed:
        path.write_bytes(original)
    before.unlink()
    return changed


@task(cache_policy=NO_CACHE, task_run_name="stage-{stage}")  # no retries: a failed stage fails the same way
def run_stage(project: Path, stage: str, current: bool | None = None) -> dict[str, Any]:
    """``dvc repro --single-item <stage>`` (:func:`flows.stage_process.reproduce`): DVC's messages and the
    command's output to the task log and ``STAGE_LOGS/<stage>.log``,
    one summary line (ran / restored / skipped, seconds) as a log line and a ``free.stage`` event.
    ``current``: what :func:`up_to_date` said of the stage (None: ask it here)."""
    logger = get_run_logger()
    log_file = project / STAGE_LOGS / f"{stage}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if current if current is not None else up_to_date(project, stage):  # what `dvc repro` would say, without it
        line = f"Stage '{stage}' didn't change, skipping"
        log_file.write_text(line + "\n")
        logger.info("%s", line)
        summary = stage_summary(stage, "skipped", time.monotonic() - started)
        logger.info("%s", summary)
        _announce("free.stage", f"free.stage.{stage}", summary, {"free.stage.outcome": "skipped"})
        return {"stage": stage, "ran": False, "outcome": "skipped", "seconds": round(time.monotonic() - started, 1)}
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    outcome_lines: list[str] = []
    with log_file.open("w") as full:

        def emit(raw: str) -> None:
            full.write(raw)
            line = raw.rstrip()
            if not line.strip():
                return
            if is_noise(line):
                logger.debug("%s", line)
                return
            logger.info("%s", line)
            kept = error_line(line)
            if kept.strip():
                tail.append(kept)
            if line.startswith(("Running stage", "Stage ")):
                outcome_lines.append(line)

        try:
            stage_process.reproduce(project, stage, emit)
            failure = None
        except Exception as err:  # noqa: BLE001 (DVC's errors and the command's exit: the stage failed)
            failure = _dvc_error(err)
            logger.debug("stage %s failed", stage, exc_info=True)  # where, if DVC or this code broke
            emit(f"ERROR: {failure}\n")  # the last line of the tail, as the command printed it
    seconds = time.monotonic() - started
    if failure is not None:
        head = f"stage {stage} FAILED after {seconds:.1f} s"
        shown = "\n".join([f"{head}:", *(f"  {line}" for line in tail)])
        _announce("free.stage", f"free.stage.{stage}", shown, {"free.stage.outcome": "failed"})
        raise StageFailed(f"{head} (full output in {log_file}):\n" + "\n".join(tail))
    outcome = stage_outcome(stage, outcome_lines)
    summary = stage_summary(stage, outcome, seconds)
    logger.info("%s", summary)
    _announce("free.stage", f"free.stage.{stage}", summary, {"free.stage.outcome": outcome})
    return {"stage": stage, "ran": outcome == "ran", "outcome": outcome, "seconds": round(seconds, 1)}


# Tracking tasks: no Prefect retries. MLflow's client retries each call itself, bounded so that an
# outage fails the run in under 60 s (the arithmetic: flows/tracking.py, HTTP_LIMITS); retrying the
# task on top multiplied that (4 attempts x MLflow's 4 minutes: 17 minutes before).
@task(cache_policy=NO_CACHE)
def open_tracking(cfg: Config, params: dict, tags: dict[str, str], params_text: str) -> str:
    return tracking.start_parent(cfg, params, tags, params_text)


@task(cache_policy=NO_CACHE)
def track_stage(
    parent_id: str, stage: str, project: Path, cfg: Config, params: dict, info: dict, log_file: Path
) -> str:
    return tracking.log_stage(parent_id, stage, project, cfg, params, info, log_file)


@task(retries=3, retry_delay_seconds=10, cache_policy=NO_CACHE)  # S3: network
def push_outputs(project: Path) -> str:
    """``dvc push`` of the outputs in ``dvc.lock``, asked in this process: a ``dvc push`` process spent
    about 0.7 s of its 1.0 s starting Python and DVC (a no-op rerun's push; this process has DVC loaded
    already, for :func:`up_to_date`). DVC holds its repository lock meanwhile, as the command does."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    said = _DvcWarnings()  # what the command would have printed about a failure (which file, which remote)
    logging.getLogger("dvc").addHandler(said)
    try:
        with Repo(str(project)) as repo:
            pushed = repo.push()
    except Exception as err:  # DVC's own errors, and the OS errors of a remote it cannot write
        what = str(err) if isinstance(err, DvcException) else f"{type(err).__name__}: {err}"
        raise RuntimeError("\n".join(["dvc push failed:", *said.lines[-20:], what])) from err
    finally:
        logging.getLogger("dvc").removeHandler(said)
    line = f"dvc push: {pushed} file{'s' * (pushed != 1)} pushed" if pushed else "dvc push: everything is up to date"
    _logger().info("%s", line)
    return line


class _DvcWarnings(logging.Handler):
    """DVC's warnings and errors while it works in this process, for the message of a failure."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage() + (f": {record.exc_info[1]}" if record.exc_info else ""))


@task(cache_policy=NO_CACHE)  # registry: MLflow's bounded retries, as above
def register(parent_id: str, project: Path, cfg: Config, metrics: dict, lineage: dict[str, str]) -> dict:
    """Log the pyfunc model, register a version, tag it with its metrics and lineage, alias challenger;
    unless the challenger already holds the same model (:func:`flows.tracking.model_digest`): then
    nothing is logged (3-5 s of a no-op rerun) and the parent run is tagged with that version."""
    digest = tracking.model_digest(project, cfg, metrics)
    client = tracking.client(cfg)
    same = tracking.challenger_with_digest(cfg, digest)
    if same is not None:
        name = cfg.tracking.registered_model
        _say_model(f"unchanged: challenger stays version {same} (same outputs)")
        tracking.tag_run(client, parent_id, {"model.name": name, "model.version": same, "model.unchanged": "true"})
        return {"name": name, "version": same, "unchanged": True}
    tags = {**lineage, "mlflow.run_id": parent_id, "evaluate.episodes": str(metrics.get("episodes"))}
    tags[tracking.MODEL_DIGEST_TAG] = digest
    for setting, value in metrics.items():
        if isinstance(value, dict):
            tags[f"metatest.{setting}.acc"], tags[f"metatest.{setting}.ci95"] = str(value["acc"]), str(value["ci95"])
    name, version = tracking.log_model(parent_id, project, cfg, metrics, tags)
    tracking.tag_run(client, parent_id, {"model.name": name, "model.version": version})
    client.set_registered_model_alias(name, "challenger", version)
    _say_model(f"registered: challenger is version {version}")
    return {"name": name, "version": version, "unchanged": False}


def _say_model(text: str) -> None:
    """The registration's outcome in the log and, in a flow run, as a ``free.model`` event (a line of ``--watch``)."""
    _logger().info("%s", text)
    if FlowRunContext.get():
        _announce("free.model", "free.model", text)


# The hooks let a later worker clean up after a dead one (flows/recovery.py): on_running records the run's
# process; on_crashed / on_cancellation (run by the worker) stop what the run started and end its MLflow runs.
@flow(
    name="free",
    log_prints=True,
    on_running=[recovery.record_process],
    on_crashed=[recovery.end_tracking],
    on_cancellation=[recovery.end_tracking],
)
def full_pipeline(
    experiment: str = "tiny", overrides: list[str] | None = None, push: bool = True, register_model: bool = True
) -> dict:
    """The whole pipeline on ``experiment`` (a preset in params/experiment/, or "" for the defaults)."""
    project = Path.cwd()
    logger = get_run_logger()
    _dvc_idle(project)  # before anything here touches params.yaml
    if restore_params(project):  # a run killed before it could put params.yaml back
        logger.warning("params.yaml: put back the file that an interrupted run had replaced")
    all_overrides = [*([f"experiment={experiment}"] if experiment else []), *(overrides or [])]
    # One composition for the whole run (Hydra: about 0.3 s each): the preflight's tracking URI, params.yaml, cfg.
    params_text, cfg = _compose(all_overrides)
    if likely_to_run(project, params_text):
        stage_process.start_warm()  # its imports (about 3 s) beside the preflight and tracking's start
    _preflight(project, cfg, push)
    commit = tracking.git_commit(project)  # before params.yaml is replaced for the run
    try:
        params = write_params(project, all_overrides, params_text)  # reports a bad composition, if any
        params_text = (project / "params.yaml").read_text()
        cfg = cfg or load_params(project / "params.yaml")  # None: raises what the environment got wrong
        parent_id = _open(cfg, params, params_text, experiment, all_overrides, commit)
        stages = _run_stages(project, cfg, params, parent_id)
    finally:
        if restore_params(project):
            logger.info("params.yaml: put back as the run found it")
    metrics, model = conclude(project, cfg, parent_id, commit, push, register_model)
    logger.info("%s", metrics_line(metrics))
    _announce("free.pipeline", "free.pipeline.metrics", metrics_line(metrics))
    summary = {"mlflow_run_id": parent_id, "metrics": metrics, "model": model, "stages": stages}
    create_markdown_artifact(_report(cfg, parent_id, metrics, model, all_overrides, stages), key="free-pipeline-report")
    return summary


def likely_to_run(project: Path, params_text: str | None) -> bool:
    """Whether a stage will probably run: no ``dvc.lock`` yet, or ``params.yaml`` about to change. Then
    the forkserver of :mod:`flows.stage_process` starts importing at once, beside the preflight and
    the tracking's start, instead of when the first stage runs. A wrong guess costs an idle forkserver
    (a no-op rerun, the usual case with a lock file and the same params, starts none)."""
    if params_text is None:
        return False
    current = project / "params.yaml"
    return not (project / "dvc.lock").is_file() or not current.is_file() or current.read_text() != params_text


def conclude(
    project: Path, cfg: Config, parent_id: str, commit: str, push: bool, register_model: bool
) -> tuple[dict, dict | None]:
    """What follows the finished stages, in the flow and in ``free register``: push the outputs to the
    DVC remote (``push``), register the meta-learner with alias ``challenger`` (``register_model``),
    end the parent run FINISHED with the lineage tags and headline metrics, or FAILED if any of it
    fails. Returns ``(metrics, model)``. Outside a flow run the tasks run as plain functions."""
    try:
        metrics = json.loads((project / cfg.paths.artifacts_dir / "metrics" / "metatest.json").read_text())
        lineage = {**tracking.lineage_tags(project, cfg), "git.commit": commit}
        # The push (S3) and the registration (MLflow) wait on different servers: side by side in a flow run.
        pushing = _submit(push_outputs, project) if push else None
        try:
            model = _call(register, parent_id, project, cfg, metrics, lineage) if register_model else None
        except BaseException:
            if pushing is not None:
                pushing.wait()  # the registration's error is the one reported; the push ends first
            raise
        if pushing is not None:
            pushing.result()  # a failed push fails the run (after its retries), as before
    except BaseException as err:
        tracking.finish(cfg, parent_id, ended_status(err))
        raise
    tracking.finish(cfg, parent_id, "FINISHED", tags=lineage, metrics=tracking.headline(metrics))
    return metrics, model


def _call(step: Any, *args: Any) -> Any:
    """A task of a flow run as a task; outside one (``free register``) its plain function, which
    needs no Prefect server."""
    return step(*args) if FlowRunContext.get() else step.fn(*args)


def _submit(step: Any, *args: Any) -> Any:
    """Start a task beside the flow's work (Prefect's task runner: a thread): its future. Outside a
    flow run the plain function runs at once, in a :class:`_Ran` that answers like the future."""
    if FlowRunContext.get():
        return step.submit(*args)
    try:
        return _Ran(value=step.fn(*args))
    except Exception as err:  # noqa: BLE001 (raised by result(), where a flow run would raise it)
        return _Ran(error=err)


@dataclass
class _Ran:
    """A finished call with a future's ``wait()`` and ``result()``."""

    value: Any = None
    error: Exception | None = None

    def wait(self) -> None:
        pass

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _logger() -> logging.Logger | logging.LoggerAdapter:
    return get_run_logger() if FlowRunContext.get() else logging.getLogger("flows.pipeline")


def _dvc_idle(project: Path) -> None:
    """:func:`flows.guards.ensure_dvc_idle`: while another DVC process works on the project (an orphaned
    stage, a ``dvc repro`` by hand) the run fails at once, params.yaml untouched; a ``free.guard``
    event names the holder (one line in ``--watch``)."""
    try:
        guards.ensure_dvc_idle(project)
    except guards.RepoBusy as err:
        _announce("free.guard", "free.guard", str(err), {"free.guard.outcome": "failed"})
        raise


def _compose(overrides: list[str]) -> tuple[str | None, Config | None]:
    """``params.yaml``'s text for the overrides and the config a stage reads from it
    (:func:`free.config.params_config`: the environment's machine settings on top); None for what
    does not compose, which :func:`write_params` or ``load_params`` report after the preflight."""
    try:
        text = params_yaml(overrides)
    except ConfigError:
        return None, None
    try:
        return text, params_config(text)
    except ConfigError:  # the environment's machine settings: load_params names them once the file is written
        return text, None


def _preflight(project: Path, cfg: Config | None, push: bool) -> None:
    """:func:`flows.preflight.check` before anything is written: a ``free.preflight`` event (one line
    in ``--watch``) and, if an endpoint does not answer, the run fails with each one named; a DVC remote
    elsewhere than ``storage.*`` says is a warning on that line. Without a config (the overrides do not
    compose), the tracking server of the environment is checked."""
    if cfg is not None:
        tracking_uri = cfg.tracking.tracking_uri
    else:  # write_params reports the composition's error next
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or Config().tracking.tracking_uri
    try:
        lines = preflight.check(project, tracking_uri, push, storage=cfg.storage if cfg is not None else None)
    except preflight.PreflightError as err:
        _announce("free.preflight", "free.preflight", str(err), {"free.preflight.outcome": "failed"})
        raise
    get_run_logger().info("preflight: %s", "; ".join(lines))
    _announce("free.preflight", "free.preflight", "preflight: " + "; ".join(lines))


def _run_stages(project: Path, cfg: Config, params: dict, parent_id: str) -> list[dict[str, Any]]:
    """Each stage, then its nested MLflow run; a failed stage gets a FAILED nested run with its output.

    The nested run of a stage DVC skipped is logged beside the flow's next steps (Prefect's task
    runner: a thread); those pending are waited for before a stage runs and at the end, so that a
    tracking failure still fails the run before any more work (:data:`flows.tracking.HTTP_LIMITS`'s
    bound) and the nested runs keep the stages' order. A no-op rerun's four took about 0.65 s in a row."""
    done: list[dict[str, Any]] = []
    pending: list[Any] = []  # futures of track_stage, each waiting for the one before
    try:
        for stage in STAGES:
            log_file = project / STAGE_LOGS / f"{stage}.log"
            current = up_to_date(project, stage)
            if not current:
                _wait_all(pending)
            try:
                info = run_stage(project, stage, current)
            except StageFailed:
                failed = {"stage": stage, "ran": True, "outcome": "failed"}
                track_stage(parent_id, stage, project, cfg, params, failed, log_file, return_state=True)
                raise
            if current:
                pending.append(
                    track_stage.submit(parent_id, stage, project, cfg, params, info, log_file, wait_for=pending[-1:])
                )
            else:
                track_stage(parent_id, stage, project, cfg, params, info, log_file)
            done.append(info)
        _wait_all(pending)
    except BaseException as err:
        for future in pending:
            future.wait()  # no nested run starts after its parent ended
        tracking.finish(cfg, parent_id, ended_status(err))
        raise
    return done


def ended_status(err: BaseException) -> str:
    """MLflow's end status for the parent run when ``err`` ends the flow: KILLED if the flow run is being
    cancelled (the runner's SIGTERM reaches the flow as Prefect's TerminationSignal, and the server
    says Cancelling), else FAILED (a failure; a crash's SIGTERM has no Cancelling state)."""
    run = FlowRunContext.get()
    if not isinstance(err, TerminationSignal) or run is None:
        return "FAILED"
    try:
        with get_client(sync_client=True) as client:
            return "KILLED" if client.read_flow_run(run.flow_run.id).state.is_cancelling() else "FAILED"
    except Exception:  # noqa: BLE001 (the server may be what went away: then a crash, FAILED)
        return "FAILED"


def _wait_all(futures: list[Any]) -> None:
    """Wait for each future in turn; the first failure raises."""
    while futures:
        futures.pop(0).result()


def _open(cfg: Config, params: dict, params_text: str, experiment: str, overrides: list[str], commit: str) -> str:
    flow_run = runtime.flow_run
    tags = {
        "mlflow.runName": f"full-pipeline {flow_run.name or ''}".strip(),
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_url": str(flow_run.ui_url or ""),
        "pipeline.experiment": experiment or "(defaults)",
        "pipeline.overrides": " ".join(overrides),
        "git.commit": commit,
    }
    return open_tracking(cfg, params, tags, params_text)


def _report(
    cfg: Config, run_id: str, metrics: dict, model: dict | None, overrides: list[str], stages: list[dict]
) -> str:
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
        "| stage | outcome | seconds |",
        "|---|---|---|",
        *(f"| {s['stage']} | {s['outcome']} | {s['seconds']:.1f} |" for s in stages),
        "",
        f"- MLflow run: [{run_id}]({uri}/#/experiments/{experiment_id}/runs/{run_id})"
        " (nested runs per stage, each with its full output as `logs/<stage>.log`)",
    ]
    if model:
        link = f"{uri}/#/models/{model['name']}/versions/{model['version']}"
        same = " (unchanged: same outputs, nothing new registered)" if model.get("unchanged") else ""
        lines.append(f"- Registered model: [{model['name']} v{model['version']}]({link}), alias `challenger`{same}")
    return "\n".join(lines) + "\n"
