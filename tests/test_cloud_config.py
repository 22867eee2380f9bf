"""Pointing the pipeline at real clouds (issue 14, items 5 and 1): ``storage=s3 tracking=remote``, the
DVC remote in ``.dvc/config`` (its URL only), credentials from an AWS profile, a stack that runs only
Prefect and the worker (``FREE_STACK_EXTERNAL=1``), and the deployment on ``runner=dask``.

The "cloud" is real servers on free loopback ports that the project knows nothing of: a SeaweedFS S3
server and an MLflow server (artifacts proxied to that S3), started apart from the project with their
own state. The pipeline reaches them only through the documented settings: ``MLFLOW_TRACKING_URI``,
``AWS_PROFILE`` with the keys in ``~/.aws/credentials`` of a private ``HOME``, ``FREE_S3_ENDPOINT_URL``
(the S3-compatible store, where the Dask tasks' results go), and the DVC remote added by
``dvc remote add`` (no ``.dvc/config.local``, no ``AWS_*`` keys in any environment). One run of the
``free/full-pipeline`` deployment with seconds-sized settings then serves both checks: no credential in
params.yaml, tracked files, MLflow params/tags/artifacts, Prefect parameters/logs or command lines;
DVC's push and MLflow's artifacts are in the cloud's bucket; and its ``runner=dask`` teachers and
``metatest.json`` are the bytes the stage commands make with ``runner=local``.

In the default run (issue 14 asks for this check in CI): the stack and the deployment took about 4
minutes on 2 shared cores when written (3:53, of which the deployment run 130-156 s and the stack 27-48 s,
before the orchestration cuts); the config, preflight and stack-settings tests at the end take seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from flows import preflight
from free import stack
from free.bench.pipeline import copy_project
from free.config import compose, params_yaml
from free.stack import free_port_block
from tests import helpers_stack

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Recognisable fakes: the tracked files are scanned, this one among them, so each is spelt in two halves.
KEY_ID, SECRET = "CLOUDFAKE" + "KEYIDX4P9", "cloud-fake-secret" + "-71f0aa3c9e26"
SECRETS = {"key id": KEY_ID, "secret": SECRET}
PROFILE, BUCKET = "free-cloud", "free-team"
# Seconds-sized stages (the point is where things go, not what they learn); the same for both runners.
SMALL = [
    "teachers.n_teachers=2", "teachers.width=8", "teachers.max_epochs=2", "model.width=8",
    "inversion.images_per_class=4", "inversion.scratch_steps=3", "taskcache.slots=3", "taskcache.images_per_slot=4",
    "metalearn.q_query=3", "metalearn.iterations=2", "metalearn.val_every=2", "metalearn.val_episodes=2",
    "metalearn.checkpoint_every=1", "evaluate.episodes=4", "evaluate.episode_batch=2", "evaluate.q_query=3",
    "threads=1",
]  # fmt: skip
CLOUD = ["storage=s3", f"storage.bucket={BUCKET}", "tracking=remote"]
DASK = ["runner=dask", "runner.workers=2"]


class Cloud:
    def __init__(self, root: Path, project: Path, env: dict[str, str], servers: stack.StackSettings) -> None:
        self.root, self.project, self.env, self.servers = root, project, env, servers
        self.cmdlines: helpers_stack.CmdlineWatch | None = None
        self.run_seconds = 0.0

    def run(self, *argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return helpers_stack.run_checked(argv, self.project, self.env, check, timeout)

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(self.servers.mlflow_tracking_uri)

    def bucket_keys(self, prefix: str) -> set[str]:
        """The objects under ``prefix`` in the cloud's bucket (listed with the cloud's keys, as its owner)."""
        import boto3

        s3 = boto3.client(
            "s3", endpoint_url=self.servers.s3_endpoint_url, region_name="us-east-1",
            aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
        )  # fmt: skip
        keys: set[str] = set()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            keys |= {item["Key"] for item in page.get("Contents", [])}
        return keys


def _private_home(home: Path) -> None:
    """An AWS profile as a team member has one: keys in ~/.aws/credentials, region in ~/.aws/config."""
    aws = home / ".aws"
    aws.mkdir(parents=True, mode=0o700)
    stack.write_private(
        aws / "credentials",
        f"[{PROFILE}]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n".encode(),
    )
    stack.write_private(aws / "config", f"[profile {PROFILE}]\nregion = us-east-1\n".encode())


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, real_omniglot_root: Path):
    root = tmp_path_factory.mktemp("cloud")
    project, home, elsewhere = root / "project", root / "home", root / "elsewhere"
    for folder in (project, elsewhere):
        folder.mkdir()
    copy_project(REPO, project)
    helpers_stack.use_built_venv(project)
    _private_home(home)
    # The cloud: S3 + MLflow of someone else, started apart from the project (no .dvc there to configure).
    servers = stack.StackSettings(
        state_dir=root / "cloud-state", project_dir=elsewhere, bucket=BUCKET, worker=False,
        mlflow_port=free_port_block(1), s3_port=free_port_block(1), aux_port=free_port_block(9),
    )  # fmt: skip
    servers.state_dir.mkdir(mode=0o700)
    stack.write_private(
        servers.state_dir / "credentials.env", f"AWS_ACCESS_KEY_ID={KEY_ID}\nAWS_SECRET_ACCESS_KEY={SECRET}\n".encode()
    )
    # The project's side: only the documented settings, nothing of the cloud's state.
    dropped = ("AWS_", "MLFLOW_", "PREFECT_", "FREE_S3_", "FREE_STACK_", "FREE_DATA_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(
        {
            "HOME": str(home),
            "AWS_PROFILE": PROFILE,
            "FREE_S3_ENDPOINT_URL": servers.s3_endpoint_url,  # storage.s3_endpoint_url (storage=s3's is "": AWS)
            "MLFLOW_TRACKING_URI": servers.mlflow_tracking_uri,
            "FREE_STACK_EXTERNAL": "1",
            "FREE_STATE_DIR": str(root / "state"),
            "FREE_PREFECT_PORT": str(free_port_block(1)),
            "FREE_CACHE_DIR": str(root / "cache"),
            "FREE_CONFIG_DIR": str(project / "params"),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        }
    )
    cmdlines = helpers_stack.CmdlineWatch(SECRETS)
    ours = Cloud(root, project, env, servers)
    ours.cmdlines = cmdlines
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:  # the cloud's servers and the project's stack at once
            cloud_up = pool.submit(stack.up, servers, lambda line: None, ["s3", "mlflow"])
            dvc = str(BIN / "dvc")
            ours.run(dvc, "remote", "add", "-d", "cloud", f"s3://{BUCKET}/free/dvc")
            ours.run(dvc, "remote", "modify", "cloud", "endpointurl", servers.s3_endpoint_url)
            ours.run(str(BIN / "free"), "stack", "up", timeout=900)
            cloud_up.result()
        print(f"cloud servers and FREE_STACK_EXTERNAL=1 free stack up: {time.monotonic() - started:.0f} s")
        exported = shlex.split(ours.run(str(BIN / "free"), "stack", "env").stdout)  # export K=V ...
        ours.env.update(dict(word.split("=", 1) for word in exported if "=" in word))
        yield ours
    finally:
        cmdlines.stop()
        stack.down(stack.StackSettings.load(root / "state"), say=lambda line: None)
        stack.down(servers, say=lambda line: None)


@pytest.fixture(scope="module")
def deployment_run(cloud: Cloud) -> subprocess.CompletedProcess:
    """The deployment once, on the cloud settings and the Dask runner."""
    overrides = json.dumps([*SMALL, *CLOUD, *DASK])
    started = time.monotonic()
    proc = cloud.run(
        str(BIN / "prefect"), "deployment", "run", "free/full-pipeline", "-p", "experiment=tiny",
        "-p", f"overrides={overrides}", "--watch", timeout=900,
    )  # fmt: skip
    cloud.run_seconds = time.monotonic() - started
    stages = [line.split("free.stage * ")[-1] for line in proc.stdout.splitlines() if "free.stage * " in line]
    print(f"deployment run (runner=dask, cloud settings): {cloud.run_seconds:.0f} s; {'; '.join(stages)}")
    return proc


def test_the_stack_runs_only_prefect_and_the_worker(cloud: Cloud) -> None:
    report = json.loads(cloud.run(str(BIN / "free"), "stack", "status", "--json").stdout)
    assert sorted(report["services"]) == ["prefect", "worker"]
    assert all(s["healthy"] for s in report["services"].values()), report["services"]
    assert report["mlflow_tracking_uri"] == cloud.servers.mlflow_tracking_uri
    exported = cloud.run(str(BIN / "free"), "stack", "env").stdout
    assert "AWS_" not in exported and "MLFLOW_" not in exported, exported  # the user's own settings stay


def test_deployment_pushes_and_tracks_into_the_cloud(cloud: Cloud, deployment_run) -> None:
    assert "Completed" in deployment_run.stdout, deployment_run.stdout[-3000:]
    watched = " ".join(deployment_run.stdout.split())  # rich wraps the watched lines
    for service, uri in (("MLflow", cloud.servers.mlflow_tracking_uri), ("S3", cloud.servers.s3_endpoint_url)):
        assert f"{service} at {uri}: ok" in watched, watched[-3000:]  # the preflight checked the cloud's
    assert not (cloud.project / ".dvc" / "config.local").exists()  # no keys written for DVC anywhere
    # DVC's push: every cached output of dvc.lock (cache: false metrics aside) is in the cloud's bucket under the
    # remote's prefix (a directory as its .dir listing), and DVC finds the remote in sync with the cache.
    lock = yaml.safe_load((cloud.project / "dvc.lock").read_text())["stages"]
    uncached = {"artifacts/metrics/metatest.json"}  # `cache: false` in dvc.yaml: in git's hands, never pushed
    outs = {o["md5"] for stage in lock.values() for o in stage.get("outs", []) if o["path"] not in uncached}
    pushed = cloud.bucket_keys("free/dvc/")
    assert len(outs) >= 6 and {f"free/dvc/files/md5/{m[:2]}/{m[2:]}" for m in outs} <= pushed, (outs, pushed)
    assert len(pushed) >= 20, pushed
    assert "in sync" in cloud.run(str(BIN / "dvc"), "status", "--cloud").stdout
    # MLflow: the run is on the cloud's server, its files in the cloud's bucket (the server's artifact store).
    client = cloud.mlflow()
    version = client.get_model_version_by_alias("free-meta-learner", "challenger")
    parent = client.get_run(version.tags["mlflow.run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tracking.tracking_uri"] == "https://mlflow.invalid"  # params.yaml: the placeholder
    assert parent.data.params["runner.name"] == "dask" and parent.data.params["storage.bucket"] == BUCKET
    stored = cloud.bucket_keys("mlflow/")
    assert any(key.endswith(f"{parent.info.run_id}/artifacts/params.yaml") for key in stored), sorted(stored)[:20]
    assert any("/metatrain.log" in key or key.endswith("metatrain.log") for key in stored)
    # The runner=dask tasks' results: in the cloud's bucket, found with the profile's keys (flows/fanout.py).
    assert cloud.bucket_keys("prefect-results/"), "no task result in s3://free-team/prefect-results/"


def test_dask_through_the_deployment_gives_the_local_runners_bytes(cloud: Cloud, deployment_run) -> None:
    """runner=dask in the deployment vs the stage commands with runner=local on the same parameters:
    the teacher files (sha256) and metatest.json (on the deployment's meta-learner) are identical."""
    fanned_out = _task_runs(cloud)
    assert {"teacher-0", "teacher-1", "metatest-1shot-0-2", "metatest-5shot-2-4"} <= fanned_out, fanned_out
    made, local = cloud.project / "artifacts", cloud.root / "local"
    free = [str(BIN / "python"), "-m", "free", "--params", "params.yaml"]
    here = ["runner.name=local", "runner.workers=1", f"paths.artifacts_dir={local}"]
    cloud.run(str(BIN / "free"), "config", "params", "experiment=tiny", *SMALL, *CLOUD, *DASK)  # the run's params
    try:
        (local / "data").mkdir(parents=True)  # the deployment's class split (and its tensor cache, shared)
        shutil.copy2(made / "data" / "splits.json", local / "data" / "splits.json")
        cloud.run(*free, "teachers", *here)
        shutil.copytree(made / "metalearner", local / "metalearner")
        cloud.run(*free, "metatest", *here)
    finally:
        cloud.run("git", "checkout", "params.yaml")
    assert {f"teacher_{i:03d}.safetensors" for i in range(2)} <= _digests(made / "teachers").keys()
    assert _digests(made / "teachers") == _digests(local / "teachers")
    assert (local / "metrics" / "metatest.json").read_bytes() == (made / "metrics" / "metatest.json").read_bytes()


def test_no_credential_in_params_tracked_files_mlflow_or_prefect(cloud: Cloud, deployment_run, tmp_path: Path) -> None:
    found = helpers_stack.tracked_leaks(cloud.project, SECRETS)  # params.yaml and .dvc/config among them
    assert f"s3://{BUCKET}/free/dvc" in (cloud.project / ".dvc" / "config").read_text()  # the URL is there
    hits, n_runs = helpers_stack.mlflow_leaks(cloud.mlflow(), SECRETS, tmp_path, "free-meta-learner")
    assert n_runs >= 5, n_runs
    found += hits
    hits, flow_runs, n_logs = helpers_stack.prefect_leaks(cloud.env["PREFECT_API_URL"], SECRETS)
    assert any("storage=s3" in json.dumps(r["parameters"]) for r in flow_runs) and n_logs > 0
    found += hits
    blocks = helpers_stack.post_json(
        f"{cloud.env['PREFECT_API_URL']}/block_documents/filter", {"limit": 200, "include_secrets": True}
    )
    assert "free-fanout-results" in {b["name"] for b in blocks}, blocks  # the task results' S3 block
    found += helpers_stack.leaks("prefect blocks", json.dumps(blocks).encode(), SECRETS)
    assert cloud.cmdlines is not None and cloud.cmdlines.samples > 10
    found += [f"command line of pid {hit}" for hit in cloud.cmdlines.hits]
    assert found == [], "\n".join(found)


def test_the_scan_catches_a_key_in_params_and_in_mlflow(cloud: Cloud, deployment_run, tmp_path: Path) -> None:
    """The checks above can fail: a key put into params.yaml and into a run's params is found."""
    params = cloud.project / "params.yaml"
    original = params.read_bytes()
    try:
        params.write_text(params.read_text() + f"leaked: {SECRET}\n")
        assert helpers_stack.tracked_leaks(cloud.project, SECRETS) == ["tracked params.yaml: secret"]
    finally:
        params.write_bytes(original)
    client = cloud.mlflow()
    experiment = client.get_experiment_by_name("free").experiment_id
    bad = client.create_run(experiment, run_name="leaky")
    try:
        client.log_param(bad.info.run_id, "aws_access_key_id", KEY_ID)
        hits, _ = helpers_stack.mlflow_leaks(client, SECRETS, tmp_path)
        assert hits == [f"mlflow run {bad.info.run_id}: key id"], hits
    finally:
        client.delete_run(bad.info.run_id)


def test_cloud_groups_keep_machine_settings_out_of_params_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint and tracking URI come from the environment at run time; params.yaml (logged to MLflow)
    stays the same file on every machine."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.team.example")
    monkeypatch.setenv("FREE_S3_ENDPOINT_URL", "https://s3.team.example")
    cfg = compose(CLOUD)
    assert cfg.tracking.tracking_uri == "https://mlflow.team.example"
    assert cfg.storage.s3_endpoint_url == "https://s3.team.example" and cfg.storage.bucket == BUCKET
    written = yaml.safe_load(params_yaml(CLOUD))
    assert written["tracking"]["tracking_uri"] == "https://mlflow.invalid"
    assert written["storage"] == {"s3_endpoint_url": "", "bucket": BUCKET, "dvc_prefix": "free/dvc",
                                  "mlflow_prefix": "free/mlflow"}  # fmt: skip


def test_preflight_refuses_a_password_in_the_tracking_uri(tmp_path: Path) -> None:
    with pytest.raises(preflight.PreflightError) as refused:
        preflight.check(tmp_path, f"https://bob:{SECRET}@mlflow.team.example/", push=False, prefect=False)
    message = str(refused.value)
    assert SECRET not in message and "https://bob:***@mlflow.team.example/" in message
    assert "MLFLOW_TRACKING_PASSWORD" in message


def test_external_stack_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.team.example")
    settings = stack.StackSettings(state_dir=tmp_path, project_dir=tmp_path, external=True)
    assert [s.name for s in stack.services(settings)] == ["prefect", "worker"]
    assert sorted(stack.client_env(settings)) == ["PREFECT_API_URL", "PREFECT_HOME"]
    worker = next(s for s in stack.services(settings) if s.name == "worker")
    assert not any(k.startswith(("AWS_", "MLFLOW_", "FREE_S3_")) for k in worker.env)  # the user's own reach it
    (tmp_path / "stack.json").write_text(json.dumps({"settings": {"external": True}}))
    monkeypatch.delenv(stack.EXTERNAL_ENV, raising=False)
    assert stack.StackSettings.load(tmp_path).external  # recorded: status/down in a new shell keep it
    monkeypatch.setenv(stack.EXTERNAL_ENV, "0")
    assert not stack.StackSettings.load(tmp_path).external  # chosen now: wins over the record
    assert stack.StackSettings.load(tmp_path, external=True).external  # `up --external`: the flag wins
    settings = stack.StackSettings(state_dir=tmp_path, project_dir=tmp_path, work_pool=True)
    worker = next(s for s in stack.services(settings) if s.name == "worker")
    assert worker.argv[1:] == ["-m", "flows.pool_worker"]  # `up --work-pool`


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _task_runs(cloud: Cloud) -> set[str]:
    """The names of the task runs the stack's Prefect server saw (the fan-outs' tasks ran against it)."""
    runs = helpers_stack.post_json(f"{cloud.env['PREFECT_API_URL']}/task_runs/filter", {"limit": 200})
    return {r["name"] for r in runs}
