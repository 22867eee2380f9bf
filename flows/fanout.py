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

Caching: every task has ``NO_CACHE``. The core's own check is the cache (a teacher whose card and
file match this configuration is skipped, see ``train_into``); a Prefect cache keyed on the inputs
could claim a teacher whose file was deleted since. Results (a few numbers per task) are persisted:
with the local stack (``PREFECT_API_URL``, ``FREE_S3_ENDPOINT_URL`` and S3 credentials in the
environment) on its S3 server, ``s3://<storage.bucket>/prefect-results`` through the saved block
``free-fanout-results`` (endpoint only: the credentials stay in the environment of each worker);
otherwise in Prefect's local storage (``$PREFECT_HOME/storage``), which only a LocalCluster's
workers share.

Prefect needs an API: ``PREFECT_API_URL`` when set (the stack's server), else Prefect's ephemeral
mode, a temporary server that this process starts (a few seconds; see the README's runner section).
No ``dvc`` command runs here: DVC records the stage's outputs once the stage command returns.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
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
EPHEMERAL_STARTUP_SECONDS = 180
logger = get_logger("fanout")  # under Prefect's configured "prefect" logger, so its lines are shown


class FanOutError(RuntimeError):
    """A task of a fan-out failed; the message names its unit (teacher index, episode shard)."""


@task(cache_policy=NO_CACHE, persist_result=True, task_run_name="teacher-{index}")
def train_teacher(cfg: Config, index: int, out: str, teacher_fp: str, threads: int) -> dict[str, Any]:
    """Train teacher ``index`` into ``out`` (skipped if a matching one is there)."""
    return train_into(cfg, index, Path(out), teacher_fp, threads)


@task(cache_policy=NO_CACHE, persist_result=True, task_run_name="metatest-{k_shot}shot-{start}-{stop}")
def metatest_shard(cfg: Config, checkpoint: str, k_shot: int, start: int, stop: int, threads: int) -> list[float]:
    """Accuracies of episodes ``start .. stop - 1`` of shot setting ``k_shot``."""
    return evaluate_shard(cfg, Path(checkpoint), k_shot, start, stop, threads)


@flow(name="free-teachers-fanout", validate_parameters=False)
def teachers_fanout(cfg: Config, out: str, teacher_fp: str, threads: int) -> list[dict[str, Any]]:
    """Every teacher of the zoo as one mapped task; their outcomes in teacher order."""
    indices = list(range(cfg.teachers.n_teachers))
    task_ = train_teacher.with_options(result_storage=_result_storage(cfg))
    futures = task_.map(unmapped(cfg), indices, unmapped(out), unmapped(teacher_fp), unmapped(threads))
    return _gather(futures, [f"teacher {i}" for i in indices])


@flow(name="free-metatest-fanout", validate_parameters=False)
def metatest_fanout(cfg: Config, checkpoint: str, threads: int) -> dict[int, list[float]]:
    """Every episode shard of every shot setting as one mapped task; accuracies per setting, in order."""
    ev = cfg.evaluate
    shards = episode_shards(ev.episodes, ev.episode_batch, cfg.runner.shards or cfg.runner.workers)
    units = [(k, a, b) for k in shot_settings(ev) for a, b in shards]
    task_ = metatest_shard.with_options(result_storage=_result_storage(cfg))
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
        FanOutError: a teacher failed; names it and its error.
    """
    return _run(teachers_fanout.with_options(task_runner=task_runner(cfg)), cfg, str(out), teacher_fp, threads)


def metatest_shards(cfg: Config, checkpoint: Path, threads: int) -> dict[int, list[float]]:
    """Run :func:`metatest_fanout` on the configured Dask runner (what the metatest stage calls).

    Raises:
        FanOutError: a shard failed; names it and its error.
    """
    return _run(metatest_fanout.with_options(task_runner=task_runner(cfg)), cfg, str(checkpoint), threads)


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


def _result_storage(cfg: Config) -> Any:
    """Where task results go: the stack's S3 server when this process is pointed at the stack, else
    ``None`` (Prefect's local storage). The saved block holds the endpoint only, no credentials."""
    stack = all(os.environ.get(v) for v in ("PREFECT_API_URL", "FREE_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"))
    if not stack:
        return None
    from prefect.filesystems import RemoteFileSystem

    block = RemoteFileSystem(
        basepath=f"s3://{cfg.storage.bucket}/{RESULTS_PREFIX}",
        settings={"client_kwargs": {"endpoint_url": cfg.storage.s3_endpoint_url}},
    )
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
