"""The local stack on its PostgreSQL backend (issue 14, item 2), its worker a process worker (item 3).

``free stack up --backend postgres --work-pool`` in a fresh copy of the project, on free ports with a
private state folder: the worker makes pool ``free-local``, runs ``prefect deploy --all`` and becomes a
``prefect worker``; then the tiny ``free/full-pipeline`` deployment runs on it (shortened by overrides:
2 teachers of 3 epochs, 5 meta-iterations, 4 meta-test episodes). What it wrote is looked up where it
must be: MLflow's runs, model version and alias and Prefect's flow run and work pool in PostgreSQL
itself (psycopg2, the stored password), the artifacts in the S3 bucket; no SQLite file appears. The
password is on no command line (sampled all along), in no log, run record or stack file; ``free stack
down`` leaves no process. Last, restarts: ``up`` without ``--backend`` keeps PostgreSQL and its data,
and brings the server back after a ``kill -9``. Tests share the stack in file order.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from pathlib import Path

import psutil
import pytest

from free import stack, stack_postgres
from tests.helpers_stack import free_port_settings, fresh_project, wait_until
from tests.test_orchestration import (
    BIN,
    FAKE_KEY_ID,
    FAKE_SECRET,
    MODEL,
    REPO,
    STAGES,
    CmdlineWatch,
    Live,
    _stage_lines,
    _use_built_venv,
)

# Recognisable: it holds the fake secret CmdlineWatch looks for on every command line.
PG_PASSWORD = f"pg{FAKE_SECRET}"
SHORT = [
    "teachers.n_teachers=2", "teachers.max_epochs=3", "metalearn.iterations=5", "metalearn.val_every=5",
    "metalearn.val_episodes=2", "evaluate.episodes=4",
]  # fmt: skip


def _sql(settings: stack.StackSettings, database: str, query: str, args: tuple = ()) -> list[tuple]:
    """Rows of ``query`` on one of the stack's databases, logged in with the stored password."""
    import psycopg2

    connection = psycopg2.connect(
        host="127.0.0.1", port=settings.postgres_port, user=stack_postgres.USER,
        password=stack_postgres.password(settings), dbname=database, connect_timeout=10,
    )  # fmt: skip
    try:
        with connection.cursor() as cursor:
            cursor.execute(query, args)
            return cursor.fetchall()
    finally:
        connection.close()


def test_password_is_generated_private_and_reaches_services_by_environment_only(tmp_path: Path) -> None:
    settings = stack.StackSettings(state_dir=tmp_path / "state", project_dir=REPO, backend="postgres", postgres_port=1)
    secret = stack_postgres.password(settings)
    assert re.fullmatch(r"[0-9a-f]{48}", secret)
    assert stack_postgres.password(settings) == secret  # kept, not regenerated
    assert stack_postgres.pgpass_path(settings).stat().st_mode & 0o777 == 0o600
    listed = stack.services(settings)
    assert [s.name for s in listed] == ["s3", "postgres", "mlflow", "prefect", "worker"]
    by_name = {s.name: s for s in listed}
    assert "--backend-store-uri" not in by_name["mlflow"].argv
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in by_name["prefect"].env  # SQLite's is gone too
    shown = json.dumps([[s.argv, s.env, s.health_url, s.url] for s in listed])
    assert secret not in shown
    # The URLs with the password come only from `prepare`, which `up` merges into the service's environment.
    assert secret in by_name["mlflow"].prepare()["MLFLOW_BACKEND_STORE_URI"]
    assert by_name["prefect"].prepare()["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    # A data folder made with a password whose file is gone: refused with the fix, not a new password.
    (stack_postgres.data_dir(settings)).mkdir()
    (stack_postgres.data_dir(settings) / "PG_VERSION").write_text("15\n")
    stack_postgres.pgpass_path(settings).unlink()
    with pytest.raises(stack.StackError, match="restore the file, or delete"):
        stack_postgres.password(settings)


class PgLive(Live):
    def __init__(self, live: Live, cmdlines: CmdlineWatch) -> None:
        super().__init__(live.project, live.settings, live.env)
        self.cmdlines = cmdlines

    def free(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(str(BIN / "free"), *args, "--state-dir", str(self.settings.state_dir), check=check)


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory, real_omniglot_root: Path):
    """``free stack up --backend postgres`` in a fresh copy; stack down after."""
    root, project = fresh_project(tmp_path_factory, "pg")
    _use_built_venv(project)
    settings = free_port_settings(root, project, backend="postgres")
    machine = {
        "FREE_STATE_DIR": str(settings.state_dir), "FREE_CACHE_DIR": str(root / "cache"),
        "FREE_CONFIG_DIR": str(project / "params"), "FREE_PREFECT_PORT": str(settings.prefect_port),
        "FREE_MLFLOW_PORT": str(settings.mlflow_port), "FREE_S3_PORT": str(settings.s3_port),
        "FREE_S3_AUX_PORT": str(settings.aux_port), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }  # fmt: skip
    clients = (
        "FREE_DATA_DIR", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "FREE_S3_ENDPOINT_URL", "FREE_S3_ACCESS_KEY_ID",
        "FREE_S3_SECRET_ACCESS_KEY", "FREE_STACK_BACKEND", "FREE_POSTGRES_PORT",
    )  # fmt: skip
    env = {**{k: v for k, v in os.environ.items() if k not in clients}, **machine}
    # The stack's secret files, made before its first start as `up` would (0600), with recognisable fakes.
    settings.state_dir.mkdir(mode=0o700)
    stack.write_private(
        settings.state_dir / "credentials.env",
        f"AWS_ACCESS_KEY_ID={FAKE_KEY_ID}\nAWS_SECRET_ACCESS_KEY={FAKE_SECRET}\n".encode(),
    )
    stack.write_private(stack_postgres.pgpass_path(settings), f"127.0.0.1:*:*:free:{PG_PASSWORD}\n".encode())
    cmdlines = CmdlineWatch()
    try:
        shell = Live(project, settings, env)
        shell.run(str(BIN / "free"), "stack", "up", "--backend", "postgres", "--work-pool", timeout=600)
        settings = stack.StackSettings.load(settings.state_dir)  # the port `up` chose for PostgreSQL
        yield PgLive(Live(project, settings, {**env, **stack.client_env(settings)}), cmdlines)
    finally:
        cmdlines.stop()
        stack.down(stack.StackSettings.load(settings.state_dir), say=lambda line: None)


@pytest.fixture(scope="module")
def pipeline_run(pg: PgLive) -> subprocess.CompletedProcess:
    overrides = json.dumps(SHORT)
    return pg.run(
        str(BIN / "prefect"), "deployment", "run", "free/full-pipeline", "-p", f"overrides={overrides}", "--watch",
        timeout=600,
    )  # fmt: skip


def test_stack_runs_on_postgres_and_records_its_backend(pg: PgLive) -> None:
    report = json.loads(pg.free("stack", "status", "--json").stdout)  # no --backend: the recorded one
    assert report["backend"] == "postgres"
    assert list(report["services"]) == ["s3", "postgres", "mlflow", "prefect", "worker"]
    assert all(s["healthy"] for s in report["services"].values()), report["services"]
    port = pg.settings.postgres_port
    assert port and report["services"]["postgres"]["url"].startswith(f"postgresql://free@127.0.0.1:{port} ")
    names = {row[0] for row in _sql(pg.settings, "postgres", "SELECT datname FROM pg_database")}
    assert {"mlflow", "prefect"} <= names
    # Loopback only, password logins only: the postmaster listens on 127.0.0.1 alone, no Unix socket.
    postmaster = psutil.Process(report["services"]["postgres"]["pid"])
    listening = [c.laddr for c in postmaster.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
    assert not [c for c in postmaster.net_connections("unix") if c.laddr]
    hba = (stack_postgres.data_dir(pg.settings) / "pg_hba.conf").read_text()
    assert [line for line in hba.splitlines() if not line.startswith("#")] == [
        "host all all 127.0.0.1/32 scram-sha-256"
    ]
    import psycopg2

    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=port, user="free", password="wrong", dbname="mlflow")
    # docs/SERVICES.md's way in: psql with what `free stack env` exports (the password's file, not the password).
    exported = pg.free("stack", "env").stdout
    assert "export PGPASSFILE=" in exported and PG_PASSWORD not in exported
    query = "SELECT string_agg(datname::text, ',' ORDER BY datname) FROM pg_database WHERE datname <> 'template0'"
    psql = pg.run("bash", "-c", f'{exported}\npsql -w -tAc "{query}" postgres')
    assert psql.stdout.strip() == "mlflow,postgres,prefect,template1", psql.stdout + psql.stderr
    # Owner-only: the password file, the data folder and the state folder around them.
    assert stack_postgres.pgpass_path(pg.settings).stat().st_mode & 0o777 == 0o600
    assert stack_postgres.data_dir(pg.settings).stat().st_mode & 0o077 == 0
    assert pg.settings.state_dir.stat().st_mode & 0o077 == 0
    # Switching backends under running services is refused, naming the fix.
    with pytest.raises(stack.StackError, match="runs on the postgres backend"):
        stack.up(stack.StackSettings.load(pg.settings.state_dir, backend="sqlite"), say=lambda line: None)


def test_the_deployment_runs_and_its_records_are_in_postgres_and_s3(pg: PgLive, pipeline_run) -> None:
    assert "Completed" in pipeline_run.stdout, pipeline_run.stdout[-3000:]
    lines = _stage_lines(pipeline_run.stdout)
    assert all(re.fullmatch(rf"stage {s}: ran in \d+\.\d s", lines[s][0]) for s in STAGES), lines

    # MLflow's records, in its PostgreSQL database: the runs, the model version, its alias.
    version = pg.client().get_model_version_by_alias(MODEL, "challenger")
    parent = version.tags["mlflow.run_id"]
    runs = dict(_sql(pg.settings, "mlflow", "SELECT run_uuid, status FROM runs"))
    assert runs[parent] == "FINISHED" and len(runs) >= 5, runs  # the parent and a run per stage
    aliases = _sql(
        pg.settings, "mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = %s", (MODEL,)
    )
    assert ("challenger", int(version.version)) in aliases
    versions = _sql(pg.settings, "mlflow", "SELECT version, run_id FROM model_versions WHERE name = %s", (MODEL,))
    assert (int(version.version), parent) in versions
    # Prefect's flow run and deployment, in its PostgreSQL database.
    flow_runs = _sql(
        pg.settings, "prefect",
        "SELECT f.name, fr.state_type FROM flow_run fr JOIN flow f ON f.id = fr.flow_id",
    )  # fmt: skip
    assert ("free", "COMPLETED") in flow_runs, flow_runs
    assert ("full-pipeline",) in _sql(pg.settings, "prefect", "SELECT name FROM deployment")
    # Run by the stack's process worker (--work-pool), from prefect.yaml's deployments on pool free-local.
    pools = _sql(
        pg.settings, "prefect",
        "SELECT d.name, wp.name, wp.type FROM deployment d JOIN work_queue wq ON wq.id = d.work_queue_id "
        "JOIN work_pool wp ON wp.id = wq.work_pool_id",
    )  # fmt: skip
    assert {("full-pipeline", "free-local", "process"), ("smoke", "free-local", "process")} <= set(pools), pools
    run_pools = _sql(
        pg.settings, "prefect",
        "SELECT wp.name FROM flow_run fr JOIN work_queue wq ON wq.id = fr.work_queue_id "
        "JOIN work_pool wp ON wp.id = wq.work_pool_id WHERE fr.state_type = 'COMPLETED'",
    )  # fmt: skip
    assert ("free-local",) in run_pools, run_pools
    worker = psutil.Process(json.loads(pg.free("stack", "status", "--json").stdout)["services"]["worker"]["pid"])
    assert worker.cmdline()[-10:-2] == ["worker", "start", "--pool", "free-local", "--type", "process", "--limit", "1"]
    assert worker.cmdline()[-2] == "--name"  # the stack's own worker, known by name to the reconcile
    # Neither server made a SQLite store of its own.
    assert not list(pg.settings.state_dir.rglob("*.db")), list(pg.settings.state_dir.rglob("*.db"))

    # The artifacts, in the S3 bucket under mlflow/: the run's params.yaml, the registered model's files.
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=pg.settings.s3_endpoint_url, region_name="us-east-1",
        aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET,
    )  # fmt: skip
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=pg.settings.bucket,
            Prefix="mlflow/") for o in page.get("Contents", [])]  # fmt: skip
    assert any(k.endswith(f"/{parent}/artifacts/params.yaml") for k in keys), keys[:50]
    model_id = version.source.split("/")[-1]  # models:/<logged model id>
    assert any(f"/models/{model_id}/artifacts/MLmodel" in k for k in keys), keys[:50]
    [(location,)] = _sql(pg.settings, "mlflow", "SELECT artifact_location FROM logged_models WHERE model_id = %s",
                         (model_id,))  # fmt: skip
    assert location.startswith("mlflow-artifacts:/")  # served by the MLflow server from S3, not a local path


def test_the_password_is_nowhere_but_its_file(pg: PgLive, pipeline_run) -> None:
    found = [f"command line of pid {hit}" for hit in pg.cmdlines.hits]  # sampled since before `stack up`
    assert pg.cmdlines.samples > 10
    secret = PG_PASSWORD.encode()
    for path in pg.settings.state_dir.rglob("*"):  # logs, stack.json, Prefect's home, S3's data
        if path.is_file() and not path.is_symlink() and path != stack_postgres.pgpass_path(pg.settings):
            if secret in path.read_bytes():
                found.append(str(path))
    for args in (("stack", "status", "--json"), ("stack", "env"), ("stack", "links")):
        if PG_PASSWORD in pg.free(*args).stdout:
            found.append(f"free {' '.join(args)}")
    like = f"%{PG_PASSWORD}%"
    for table, column in (("params", "value"), ("tags", "value"), ("model_version_tags", "value")):
        if _sql(pg.settings, "mlflow", f"SELECT count(*) FROM {table} WHERE {column} LIKE %s", (like,))[0][0]:
            found.append(f"mlflow {table}")
    for table, column in (("flow_run", "parameters::text"), ("log", "message"), ("deployment", "parameters::text")):
        if _sql(pg.settings, "prefect", f"SELECT count(*) FROM {table} WHERE {column} LIKE %s", (like,))[0][0]:
            found.append(f"prefect {table}")
    assert found == [], found


def test_down_stops_every_process_and_up_keeps_the_backend_and_data(
    pg: PgLive, pipeline_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = stack.status(pg.settings)
    pids = {pid for s in report["services"].values() for pid in s["members"]}
    pids |= set(stack_postgres.server_processes(pg.settings))  # the postmaster's helpers: sessions of their own
    assert len(pids) > 5
    runs_before = _sql(pg.settings, "mlflow", "SELECT count(*) FROM runs")[0][0]
    pg.free("stack", "down")
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [(p, psutil.Process(p).cmdline()) for p in alive]
    assert not any(s["members"] for s in stack.status(pg.settings)["services"].values())

    # Up again without a backend given: PostgreSQL (recorded), on its recorded port, with the same data
    # (the server alone, to save the minute MLflow and Prefect take to start).
    monkeypatch.setenv("FREE_STACK_BACKEND", "sqlite")  # the record wins over the environment's default
    again = stack.StackSettings.load(pg.settings.state_dir)
    assert (again.backend, again.postgres_port) == ("postgres", pg.settings.postgres_port)
    stack.up(again, say=lambda line: None, only=["postgres"])
    assert _sql(again, "mlflow", "SELECT count(*) FROM runs")[0][0] == runs_before
    shutdown = (pg.settings.state_dir / "logs" / "postgres.log").read_text()
    assert "database system was shut down at" in shutdown and "not properly shut down" not in shutdown


def test_kill_9_of_the_postmaster_then_up_recovers_it_with_its_data(pg: PgLive, pipeline_run) -> None:
    """Last (the server alone runs, restarted by the test above): ``kill -9`` of the recorded PID; its
    helpers leave by themselves, ``status`` says down, ``up`` waits for them and starts it again."""
    settings = stack.StackSettings.load(pg.settings.state_dir)
    runs_before = _sql(settings, "mlflow", "SELECT count(*) FROM runs")[0][0]
    postmaster = stack.status(settings)["services"]["postgres"]["pid"]
    os.kill(postmaster, 9)

    def seen_down() -> bool:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(postmaster, os.WNOHANG)  # this process started it (the test above): reap it
        return stack.status(settings)["services"]["postgres"]["state"] not in ("healthy", "starting")

    # A readiness wait with room for busy cores: the server's helpers leave once they see the postmaster gone.
    what = f"`free stack status` to see postgres down after kill -9 of its postmaster (pid {postmaster})"
    wait_until(what, seen_down, 180, every=0.2)
    lines: list[str] = []
    stack.up(settings, say=lines.append, only=["postgres"])
    assert stack.status(settings)["services"]["postgres"]["healthy"], lines
    assert _sql(settings, "mlflow", "SELECT count(*) FROM runs")[0][0] == runs_before  # committed data survived
