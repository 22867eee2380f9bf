"""prefect.yaml against a real Prefect server: ``prefect deploy --all`` registers the process-pool
deployments as declared; a real ``prefect worker`` (process type) picks up a flow run of
``smoke/smoke`` and completes it in a checkout of the project; the Kubernetes deployment file
registers against a pool made from its template (registering needs no cluster). 47-75 s on 2 idle
cores (server start 11 s, deploy 11 s, worker run 13-40 s, kubernetes registration 9 s); 4 minutes
when the cores are shared with other test runs.

One Prefect server for the module (loopback, a free port, a private PREFECT_HOME and SQLite
database under tmp_path), in its own process group, stopped in the end; the commands run in a fresh
copy of the project, as a user would run them from its root.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from free.bench.pipeline import copy_project
from free.stack import free_port_block

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "free-local"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


class Prefect:
    """A Prefect server of this module, and the commands run against it from the project copy."""

    def __init__(self, project: Path, env: dict[str, str]) -> None:
        self.project, self.env = project, env
        self.api = env["PREFECT_API_URL"]
        self.deploy_output: str | None = None

    def deploy_all(self) -> str:
        """What a user does first: create the process pool and ``prefect deploy --all`` (once per module)."""
        if self.deploy_output is None:
            self.cli("work-pool", "create", POOL, "--type", "process")
            self.deploy_output = self.cli("deploy", "--all")
        return self.deploy_output

    def cli(self, *args: str, timeout: float = 180) -> str:
        proc = subprocess.run(
            [str(BIN / "prefect"), *args], cwd=self.project, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if proc.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")  # fmt: skip
        return proc.stdout

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.api}{path}", timeout=10) as response:  # noqa: S310 (loopback)
            return json.load(response)

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{self.api}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
            return json.load(response)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started, SIGKILL what is left after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pools")
    project, home = root / "project", root / "prefect"
    project.mkdir()
    home.mkdir()
    port = free_port_block(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "FREE_"))}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",  # prefect deploy asks nothing (as --no-prompt)
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # the worker polls every 2 s, not every 10
        "FREE_CACHE_DIR": str(root / "cache"),
    })  # fmt: skip
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        copy_project(REPO, project)  # while the server starts
        live = Prefect(project, env)
        deadline = time.monotonic() + 180
        while True:
            try:
                live.get("/health")
                break
            except OSError as err:
                if server.poll() is not None or time.monotonic() > deadline:
                    tail = (root / "server.log").read_text()[-3000:]
                    raise AssertionError(f"the Prefect server did not start:\n{tail}") from err
                time.sleep(1)
        yield live
    finally:
        _stop_group(server)
        log.close()


def _deployment(live: Prefect, name: str) -> dict:
    return live.get(f"/deployments/name/{name}")


def test_deploy_all_registers_the_declared_deployments(prefect: Prefect) -> None:
    out = prefect.deploy_all()
    declared = yaml.safe_load((prefect.project / "prefect.yaml").read_text())
    assert {d["name"] for d in declared["deployments"]} == {"full-pipeline", "promote", "smoke"}, out

    pipeline = _deployment(prefect, "free/full-pipeline")
    assert pipeline["entrypoint"] == "flows/pipeline.py:full_pipeline"
    assert pipeline["parameters"] == {"experiment": "tiny", "overrides": []}
    assert pipeline["work_pool_name"] == POOL
    assert pipeline["job_variables"] == {"working_dir": ".", "env": {"PYTHONUNBUFFERED": "1"}}
    assert pipeline["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "."}}]
    limit = pipeline["global_concurrency_limit"]
    assert limit and limit["limit"] == 1, pipeline  # one pipeline at a time on a checkout
    assert pipeline["concurrency_options"]["collision_strategy"] == "ENQUEUE"

    promote = _deployment(prefect, "promote/promote")
    assert promote["entrypoint"] == "flows/promotion.py:promote_flow"
    assert promote["work_pool_name"] == POOL and promote["job_variables"] == pipeline["job_variables"]
    smoke = _deployment(prefect, "smoke/smoke")
    assert smoke["parameters"] == {"experiment": "tiny", "require_services": True}
    # Every job variable a deployment sets is one the process pool declares.
    pool = prefect.get(f"/work_pools/{POOL}")
    declared_vars = set(pool["base_job_template"]["variables"]["properties"])
    assert set(pipeline["job_variables"]) <= declared_vars


def test_a_process_worker_runs_a_flow_run_to_completion(prefect: Prefect, tmp_path: Path) -> None:
    prefect.deploy_all()
    smoke = _deployment(prefect, "smoke/smoke")
    run = prefect.post(f"/deployments/{smoke['id']}/create_flow_run", {"parameters": {"require_services": False}})
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1",
         "--install-policy", "never", "--name", "test-worker"],
        cwd=prefect.project, env=prefect.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        while (state := prefect.get(f"/flow_runs/{run['id']}")["state"])["type"] not in FINAL:
            tail = (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"flow run still {state['type']}:\n{tail}"
            assert worker.poll() is None, f"the worker exited:\n{tail}"
            time.sleep(2)
    finally:
        _stop_group(worker)
        log.close()
    worker_log = (tmp_path / "worker.log").read_text()
    assert state["type"] == "COMPLETED", f"{state}\n{worker_log[-3000:]}"
    finished = prefect.get(f"/flow_runs/{run['id']}")
    assert finished["work_pool_name"] == POOL
    # The run ran in the worker's checkout, with this checkout's code (the smoke flow checks that itself):
    # its report line, as the process worker streams the flow run's output. Not the server's copy of the
    # run's logs: the flow-run process ships them in batches, and under load its last batch (the tasks' and
    # the flow body's lines) can be lost as it exits (CI, 2026-12-01: missing 30 s after Completed, while
    # the worker's stream had them); that is Prefect's delivery, not what this test is about.
    assert f"worker ready in {prefect.project}" in worker_log, worker_log[-3000:]


def test_kubernetes_deployments_register(prefect: Prefect) -> None:
    """infra/prefect-kubernetes.yaml against a pool made from infra/k8s/work-pool-template.json: the
    server checks the job variables against the pool's template (no cluster is needed to register).
    infra/prefect-docker.yaml is only checked statically (tests/test_infra.py): prefect-docker is
    not installed here, so a docker pool would get an older template from Prefect's bundled list."""
    prefect.cli("work-pool", "create", "free-k8s", "--type", "kubernetes",
                "--base-job-template", "infra/k8s/work-pool-template.json")  # fmt: skip
    prefect.cli("deploy", "--all", "--prefect-file", "infra/prefect-kubernetes.yaml")
    pipeline = _deployment(prefect, "free/full-pipeline-k8s")
    assert pipeline["work_pool_name"] == "free-k8s" and pipeline["parameters"]["experiment"] == "tiny"
    assert pipeline["job_variables"]["gpu_limit"] == 1
    assert pipeline["job_variables"]["env_secret_name"] == "free-secrets"  # the Secret's name, not its values
    assert pipeline["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/free"}}]
    pool = prefect.get("/work_pools/free-k8s")
    assert pool["type"] == "kubernetes" and "gpu_limit" in pool["base_job_template"]["variables"]["properties"]
