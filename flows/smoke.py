"""A quick check that a worker can run the pipeline (deployment ``smoke/smoke`` in ``prefect.yaml``).

Run it through a work pool before a pipeline run would find out the hard way: it executes where the
pipeline would (the worker's checkout, its Python, its settings) and takes seconds. It checks

* the checkout: ``dvc.yaml``, ``params/`` and ``prefect.yaml`` in the working directory, and the
  ``free`` package imported from it (not another checkout's editable install);
* the packages the stages import: torch, torchvision, dvc, mlflow;
* the data: the config of ``experiment`` composes, and the Omniglot archives it reads are present
  and match their ``SHA256SUMS`` (else the digests the loader knows);
* the services, when ``require_services``: MLflow, the DVC remote's S3 endpoint and the Prefect API
  answer (:mod:`flows.preflight`); listed either way.

It fails with every problem found, each with its fix, and returns the report otherwise.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows import preflight

PACKAGES = ("torch", "torchvision", "dvc", "mlflow", "free")
PROJECT_FILES = ("dvc.yaml", "params/config.yaml", "prefect.yaml")


class SmokeError(RuntimeError):
    """The worker cannot run the pipeline; the message lists each problem and its fix."""


@task
def check_checkout(project: Path) -> tuple[dict, list[str]]:
    """The project files are in the working directory and ``free`` is imported from there."""
    fix = "start the worker in a checkout of the project (or set the deployment's working_dir to one)"
    problems = [f"{project / name} is missing: {fix}" for name in PROJECT_FILES if not (project / name).is_file()]
    found, versions = {}, {}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            problems.append(f"cannot import {name} ({err}): build the environment with `make setup`")
            continue
        found[name] = str(Path(module.__file__).resolve().parent)
        versions[name] = getattr(module, "__version__", "")
    ours = (project / "free").resolve()
    if "free" in found and ours.is_dir() and Path(found["free"]) != ours:
        problems.append(
            f"the free package comes from {found['free']}, not this checkout's {ours}: install this checkout "
            "(`make setup`) or run the worker from the checkout it installed"
        )
    return {"project": str(project), "packages": found, "versions": versions}, problems


@task
def check_data(experiment: str) -> tuple[dict, list[str]]:
    """The experiment's config composes and its Omniglot archives match their digests."""
    from free.config import ConfigError, compose
    from free.data.base import sha256_file
    from free.data.omniglot import KNOWN_SHA256

    try:
        config = compose([f"experiment={experiment}"] if experiment else [])
    except ConfigError as err:
        return {}, [f"the config of experiment={experiment!r} does not compose: {err}"]
    root = Path(config.dataset.root)
    if config.dataset.name != "omniglot":
        return {"dataset": config.dataset.name, "root": str(root)}, []  # other sets are checked by their loaders
    expected = dict(KNOWN_SHA256)
    sums = root / "SHA256SUMS"
    for line in sums.read_text().splitlines() if sums.is_file() else []:
        if len(line.split()) == 2:
            digest, name = line.split()
            expected[name.lstrip("*")] = digest.lower()
    present = {name: digest for name, digest in expected.items() if (root / name).is_file()}
    if not present:
        fix = "restore data/omniglot (`git checkout -- data/omniglot`) or point FREE_DATA_DIR at the archives' parent"
        return {"root": str(root)}, [f"no Omniglot archive in {root}: {fix}"]
    wrong = [name for name, digest in present.items() if sha256_file(root / name) != digest]
    problems = [f"{root / name} does not match its sha256 (corrupt or replaced): restore it" for name in wrong]
    return {"root": str(root), "archives": sorted(present)}, problems


@task
def check_services(project: Path, experiment: str) -> tuple[list[str], list[str]]:
    """Which of MLflow, S3 and Prefect answer; their failures as problems."""
    from free.config import compose

    tracking_uri = compose([f"experiment={experiment}"] if experiment else []).tracking.tracking_uri
    try:
        return preflight.check(project, tracking_uri), []
    except preflight.PreflightError as err:
        return [], [str(err)]


@flow(name="smoke", log_prints=True)
def smoke_flow(experiment: str = "tiny", require_services: bool = True) -> dict:
    """Check that this worker can run the pipeline on ``experiment``: checkout, packages, data, services."""
    project = Path.cwd()
    checkout, problems = check_checkout(project)
    data, data_problems = check_data(experiment)
    services, service_problems = check_services(project, experiment)
    problems += data_problems + (service_problems if require_services else [])
    report = {**checkout, "data": data, "services": services or service_problems}
    if problems:
        raise SmokeError("this worker cannot run the pipeline:\n- " + "\n- ".join(problems))
    get_run_logger().info("worker ready in %s: %s", project, report)
    return report
