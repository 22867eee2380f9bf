"""``runner=dask``: a stage's independent units as mapped Prefect tasks on Dask (prefect-dask).

Two fan-outs, each one Prefect flow run started by the stage's own process (``free teachers``,
``free metatest``, so ``dvc repro`` and the ``free/full-pipeline`` deployment use them alike):

* ``free-teachers-fanout``: one task per teacher, :func:`free.stages.teachers.train_into`;
* ``free-metatest-fanout``: one task per contiguous episode shard and shot setting,
  :func:`free.stages.metatest.evaluate_shard` (shards from :func:`free.evaluate.episode_shards`).

The stage keeps the rest: its fingerprint and done marker, and the final step (``zoo.json``, the
metrics and plot), which it writes from the files and numbers the tasks leave. What crosses between
processes is paths, indices and plain numbers, never tensors or modules (Dask cannot serialise CUDA
tensors). Workers write the teacher files into the stage's output folder: a ``LocalCluster`` shares
this machine's disk; with ``runner.address`` (a remote scheduler) every worker must mount the
artifacts folder at the same path, or the stage fails naming the teachers whose files it cannot see.

Caching: none in Prefect. The core's own check is the cache (a teacher whose card and file match this
configuration is skipped, see ``train_into``); a Prefect cache keyed on the inputs could claim a
teacher whose file was deleted since. So each result is stored under its own task run's id
(:data:`RESULT_KEY`), which no later run looks up (Prefect's ``NO_CACHE`` would store nothing: with
no cache key, Prefect 3 writes no result, whatever ``persist_result`` says). Results (a few numbers per
task) go (:func:`results_location`), when this process talks to a Prefect API (``PREFECT_API_URL``) and
botocore finds S3 credentials (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and
``~/.aws``, an instance role), in ``s3://<storage.bucket>/prefect-results`` at
``storage.s3_endpoint_url`` (``FREE_S3_ENDPOINT_URL`` wins; "" = AWS's own), through the saved block
``free-fanout-results`` (basepath and endpoint only: each worker finds its own credentials the same
way); otherwise in Prefect's local storage (``$PREFECT_HOME/storage``), which only a LocalCluster's
workers share, so a remote scheduler (``runner.address``) then fails before any task, naming what is
missing.

Prefect needs an API: ``PREFECT_API_URL`` when set (the stack's server), else Prefect's ephemeral
mode, a temporary server that this process starts (a few seconds; see the README's runner section).
No ``dvc`` command runs here: DVC records the stage's outputs once the stage command returns.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task, unmapped
from prefect.futures import PrefectFuture, wait
from prefect.logging import get_logger
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_dask import DaskTaskRunner

from free.config import Config
from free.evaluate import episode_shards, shot_settings
from free.stages.metatest import evaluate_shard
from free.stages.teachers import train_into

RESULTS_BLOCK = "free-fanout-results"
RESULTS_PREFIX = "prefect-results"
RESULT_KEY = "{task_run.id}"  # one stored result per task run: written, never found again as a cache hit
EPHEMERAL_STARTUP_SECONDS = 180
logger = get_logger("fanout")  # under Prefect's configured "prefect" logger, so its lines are shown


class FanOutError(RuntimeError):
    """A task of a fan-out failed; the message names its unit (teacher index, episode shard). Or a remote
    Dask cluster was configured and the task results have nowhere its workers can reach."""


# ("s3", basepath, endpoint or "" for AWS's own) or ("local", why not S3): plain strings, a flow parameter.
ResultsLocation = tuple[Literal["s3"], str, str] | tuple[Literal["local"], str]


@task(cache_policy=None, persist_result=True, result_storage_key=RESULT_KEY, task_run_name="teacher-{index}")
def train_teacher(cfg: Config, index: int, out: str, teacher_fp: str, threads: int) -> dict[str, Any]:
    """Train teacher ``index`` into ``out`` (skipped if a matching one is there)."""
    return train_into(cfg, index, Path(out), teacher_fp, threads)


@task(
    cache_policy=None, persist_result=True, result_storage_key=RESULT_KEY,
    task_run_name="metatest-{k_shot}shot-{start}-{stop}",
)  # fmt: skip
def metatest_shard(cfg: Config, checkpoint: str, k_shot: int, start: int, stop: int, threads: int) -> list[float]:
    """Accuracies of episodes ``start .. stop - 1`` of shot setting ``k_shot``."""
    return evaluate_shard(cfg, Path(checkpoint), k_shot, start, stop, threads)


@flow(name="free-teachers-fanout", validate_parameters=False)
def teachers_fanout(
    cfg: Config, out: str, teacher_fp: str, threads: int, results: ResultsLocation = ("local", "")
) -> list[dict[str, Any]]:
    """Every teacher of the zoo as one mapped task; their outcomes in teacher order."""
    indices = list(range(cfg.teachers.n_teachers))
    task_ = train_teacher.with_options(result_storage=_result_storage(results))
    futures = task_.map(unmapped(cfg), indices, unmapped(out), unmapped(teacher_fp), unmapped(threads))
    return _gather(futures, [f"teacher {i}" for i in indices])


@flow(name="free-metatest-fanout", validate_parameters=False)
def metatest_fanout(
    cfg: Config, checkpoint: str, threads: int, results: ResultsLocation = ("local", "")
) -> dict[int, list[float]]:
    """Every episode shard of every shot setting as one mapped task; accuracies per setting, in order."""
    ev = cfg.evaluate
    shards = episode_shards(ev.episodes, ev.episode_batch, cfg.runner.shards or cfg.runner.workers)
    units = [(k, a, b) for k in shot_settings(ev) for a, b in shards]
    task_ = metatest_shard.with_options(result_storage=_result_storage(results))
    futures = task_.map(
        unmapped(cfg),
        unmapped(checkpoint),
        [k for k, _, _ in units],
        [a for _, a, _ in units],
        [b for _, _, b in units],
        unmapped(threads),
    )
    results = _gather(futures, [f"meta-test shard {k}-shot episodes {a}..{b - 1}" for k, a, b in units])
    accs: dict[int, list[float]] = {k: [] for k in shot_settings(ev)}
    for (k, _, _), shard in zip(units, results, strict=True):
        accs[k].extend(shard)  # shards of a setting are contiguous and in order
    return accs


def train_teachers(cfg: Config, out: Path, teacher_fp: str, threads: int) -> list[dict[str, Any]]:
    """Run :func:`teachers_fanout` on the configured Dask runner (what the teachers stage calls).

    Raises:
        FanOutError: a teacher failed; names it and its error. Or :func:`results_location`'s.
    """
    results = results_location(cfg)
    fanout = teachers_fanout.with_options(task_runner=task_runner(cfg))
    return _run(fanout, cfg, str(out), teacher_fp, threads, results)


def metatest_shards(cfg: Config, checkpoint: Path, threads: int) -> dict[int, list[float]]:
    """Run :func:`metatest_fanout` on the configured Dask runner (what the metatest stage calls).

    Raises:
        FanOutError: a shard failed; names it and its error. Or :func:`results_location`'s.
    """
    results = results_location(cfg)
    return _run(metatest_fanout.with_options(task_runner=task_runner(cfg)), cfg, str(checkpoint), threads, results)


def _run(fanout: Any, *args: Any) -> Any:
    """Call a fan-out flow against ``PREFECT_API_URL``, or else against one ephemeral server started here.

    Without an API, Prefect's ephemeral mode would start a temporary server in every process that
    reports a run: here and in each Dask worker. One server, started here and handed to the workers
    (environment for the processes the LocalCluster spawns, settings for the tasks' context), costs
    one start instead of ``workers + 1``; its start-up limit is raised from Prefect's 20 s, which a
    loaded 2-core machine exceeds (SQLite migrations on a new ``$PREFECT_HOME``).
    """
    logging.getLogger("distributed").setLevel(logging.WARNING)  # the LocalCluster's start/stop chatter
    if PREFECT_API_URL.value():
        return fanout(*args)
    from prefect.server.api.server import SubprocessASGIServer

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # its telemetry would call out from here
    server = SubprocessASGIServer()
    started = time.perf_counter()
    server.start(timeout=EPHEMERAL_STARTUP_SECONDS)
    logger.info("ephemeral Prefect server %s started in %.1f s", server.api_url, time.perf_counter() - started)
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            return fanout(*args)
    finally:
        APILogHandler().flush()  # the run's last log lines, while their server is still up
        if before is None:
            del os.environ["PREFECT_API_URL"]
        else:
            os.environ["PREFECT_API_URL"] = before
        server.stop()


def task_runner(cfg: Config) -> DaskTaskRunner:
    """The scheduler at ``runner.address``, else a LocalCluster of ``runner.workers`` processes with one
    task thread each, on loopback and without a dashboard (no port beyond the scheduler's)."""
    if cfg.runner.address:
        return DaskTaskRunner(address=cfg.runner.address)
    cluster = {
        "n_workers": cfg.runner.workers,
        "threads_per_worker": 1,  # torch uses `threads` intra-op threads inside each task
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
        # Each task sets `threads` intra-op threads, so workers x threads may exceed the cores; OpenMP's
        # default spin-waiting then starves the other processes (tiny, 2 workers x 2 threads on 2 cores:
        # ~10x slower than one process). Passive waiting changes no number, only who waits how.
        "env": {"OMP_WAIT_POLICY": "PASSIVE"},
    }
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster)


def s3_credentials() -> tuple[str | None, str]:
    """How botocore finds S3 credentials in this process, as s3fs (its async twin) will in the workers
    that inherit its environment: ``(method, "")`` (``env``, ``shared-credentials-file``, ``iam-role``,
    ...), or ``(None, why not)``. botocore's own chain decides; no file is read here."""
    import botocore.session
    from botocore.exceptions import BotoCoreError

    try:
        credentials = botocore.session.Session().get_credentials()
    except BotoCoreError as err:  # a profile that is not there, a config file that does not parse
        return None, f"botocore: {err}"
    if credentials is None:
        return None, (
            "botocore finds no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE with its keys in ~/.aws/credentials)"
        )
    return credentials.method, ""


def results_location(cfg: Config, api_url: str | None = None) -> ResultsLocation:
    """Where the fan-out's task results go: S3 when this process talks to a Prefect API of its own
    configuration (``api_url``, default ``PREFECT_API_URL``; an ephemeral server started by
    :func:`_run` does not count) and botocore finds credentials; else the local Prefect home.

    Raises:
        FanOutError: ``runner.address`` names a remote scheduler and the results cannot go to S3
            (its workers could not hand them back); the message names what is missing.
    """
    api_url = PREFECT_API_URL.value() if api_url is None else api_url
    if not api_url and not cfg.runner.address:  # local results whatever botocore says: spare its look-up
        logger.info("task results: this machine's Prefect home (PREFECT_API_URL is not set)")
        return "local", "PREFECT_API_URL is not set"
    method, no_credentials = s3_credentials()
    missing = [] if api_url else ["PREFECT_API_URL is not set (a temporary Prefect server here would run the flow)"]
    missing += [no_credentials] if no_credentials else []
    if not missing:
        basepath, endpoint = f"s3://{cfg.storage.bucket}/{RESULTS_PREFIX}", cfg.storage.s3_endpoint_url
        logger.info("task results: %s at %s (credentials: botocore's %s)", basepath, endpoint or "AWS", method)
        return "s3", basepath, endpoint
    reason = "; ".join(missing)
    if cfg.runner.address:
        raise FanOutError(
            f"runner.address={cfg.runner.address}: a remote Dask cluster's task results must go to S3, which "
            f"its workers and this process both reach, but {reason}. Set what is missing (the workers need S3 "
            "credentials of their own too), or leave runner.address unset for a cluster on this machine"
        )
    logger.info("task results: this machine's Prefect home (a local cluster's workers share it): %s", reason)
    return "local", reason


def results_block(results: ResultsLocation) -> Any:
    """The storage block (not saved) for :func:`results_location`'s S3 location, or ``None`` (Prefect's
    local storage). It holds the basepath and endpoint only: every process finds its credentials itself,
    and none is ever in Prefect's database."""
    if results[0] != "s3":
        return None
    from prefect.filesystems import RemoteFileSystem

    _, basepath, endpoint = results
    settings = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}  # "": s3fs's own (AWS)
    return RemoteFileSystem(basepath=basepath, settings=settings)


def _result_storage(results: ResultsLocation) -> Any:
    """:func:`results_block`, saved on the Prefect API (the persisted results refer to it by id)."""
    block = results_block(results)
    if block is not None:
        block.save(RESULTS_BLOCK, overwrite=True)
    return block


def _gather(futures: list[PrefectFuture], units: list[str]) -> list[Any]:
    """The tasks' results in order once all have finished; one :class:`FanOutError` naming every failed unit."""
    wait(futures)
    failed = []
    for unit, future in zip(units, futures, strict=True):
        if not future.state.is_completed():
            error = future.result(raise_on_failure=False)
            failed.append(f"{unit}: {type(error).__name__}: {error}")
    if failed:
        raise FanOutError("failed on the dask runner: " + "; ".join(failed))
    return [future.result() for future in futures]
