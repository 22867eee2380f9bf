"""The local stack: a Prefect server, an MLflow server and an S3 server on loopback, plus the process
that serves the Prefect deployments. ``free stack up|down|status`` drives it.

Everything lives under one state directory (``$FREE_STATE_DIR``, default ``state/``, mode 0700):
data, SQLite databases, logs (0600), the generated S3 credentials (0600) and ``stack.json`` (what
runs where). Each service starts in its own session, so its process group id is its PID; a service is
the whole group (MLflow's leader runs uvicorn and its helpers, Prefect's its server), recognised by the
group id recorded here plus ``$FREE_STACK_SERVICE`` in the members' environment (so a reused group id
is never taken for ours), and stopped by signalling that group, never by name. A service whose
leader is gone while members of its group live on (``kill -9`` of MLflow's PID leaves uvicorn
serving) is *half-dead*: ``status`` says so, ``up`` stops the group and starts it again, ``down``
stops it.

Services, in start order:

* ``s3``      SeaweedFS ``weed mini``: S3 API on ``s3_port`` (8333); its master, volume, filer and
  admin ports take ``aux_port .. aux_port+9`` (18334..), all bound to 127.0.0.1 and shut to anyone
  but the server itself (:mod:`free.stack_security`). The bucket is created on first start. weed
  writes its gRPC sockets to ``/tmp/seaweedfs-*-grpc-<port>.sock`` whatever the settings (owner-only:
  it starts with umask 077); ``down`` removes the ones of this stack's ports.
* ``mlflow``  ``mlflow server``: SQLite backend store, artifacts proxied to ``s3://<bucket>/mlflow``.
* ``prefect`` ``prefect server start``: SQLite database under the state directory.
* ``worker``  ``python -m flows.serve``: serves the deployments ``free/full-pipeline`` and
  ``promote/promote`` from the project directory, with the stack's settings in its environment.

``backend`` (``sqlite``, the default, or ``postgres``, recorded in ``stack.json``): with ``postgres``
a PostgreSQL server (service ``postgres``, after ``s3``) holds MLflow's and Prefect's stores instead
of the SQLite files; see :mod:`free.stack_postgres`.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from free.paths import in_project, project_root
from free.stack_security import weed_security_env, write_private

HOST = "127.0.0.1"
DVC_REMOTE = "local-s3"
EXTERNAL_ENV = "FREE_STACK_EXTERNAL"  # 1: S3 and MLflow are real clouds' (StackSettings.external)
TAG = "FREE_STACK_SERVICE"  # in each service's environment: "<state dir>#<service>", inherited by its children
# MLflow 3's server starts a job runner and five huey consumers (six more Python processes importing MLflow
# at every start, beside the server) for its GenAI jobs (scorers, prompt optimisation), which this pipeline
# never submits: off.
MLFLOW_NO_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class StackError(RuntimeError):
    """A service could not start, or the stack's state is unusable; the message says which and why."""


@dataclass
class StackSettings:
    """Where the stack lives and which ports it takes. Each field has an environment variable."""

    state_dir: Path = field(default_factory=lambda: in_project(os.environ.get("FREE_STATE_DIR", "state")))
    project_dir: Path = field(default_factory=project_root)
    prefect_port: int = field(default_factory=lambda: int(os.environ.get("FREE_PREFECT_PORT", 4200)))
    mlflow_port: int = field(default_factory=lambda: int(os.environ.get("FREE_MLFLOW_PORT", 5000)))
    s3_port: int = field(default_factory=lambda: int(os.environ.get("FREE_S3_PORT", 8333)))
    aux_port: int = field(default_factory=lambda: int(os.environ.get("FREE_S3_AUX_PORT", 18334)))
    bucket: str = field(default_factory=lambda: os.environ.get("FREE_S3_BUCKET", "free"))
    backend: str = field(default_factory=lambda: os.environ.get("FREE_STACK_BACKEND", "sqlite"))  # or postgres
    postgres_port: int = field(default_factory=lambda: int(os.environ.get("FREE_POSTGRES_PORT", 0)))  # 0: a free one
    worker: bool = True  # serve the Prefect deployments too
    # Real clouds (docs/SERVICES.md): S3 and MLflow are elsewhere; only Prefect and the worker run here, and
    # the worker reaches them with the settings of the environment `up` runs in (MLFLOW_TRACKING_URI, AWS_*).
    external: bool = field(default_factory=lambda: os.environ.get(EXTERNAL_ENV, "") not in ("", "0"))
    # The worker: serve() of flows/serve.py (False), or a process worker of pool free-local (True).
    work_pool: bool = field(default_factory=lambda: os.environ.get("FREE_STACK_WORK_POOL", "") not in ("", "0"))

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.project_dir = Path(self.project_dir).resolve()

    @classmethod
    def load(cls, state_dir: Path | None = None, **given: object) -> StackSettings:
        """Settings of the stack in ``state_dir``: ``given`` values, else those recorded by the last
        ``up`` (so status/down/env find the ports it used), else the environment, else defaults."""
        settings = cls(**({"state_dir": state_dir} if state_dir else {}))
        path = settings.state_dir / "stack.json"
        recorded = json.loads(path.read_text()).get("settings", {}) if path.is_file() else {}
        for key, value in {**recorded, **{k: v for k, v in given.items() if v is not None}}.items():
            if key != "state_dir" and hasattr(settings, key):
                setattr(settings, key, Path(value) if key == "project_dir" else value)
        if given.get("external") is None and os.environ.get(EXTERNAL_ENV) is not None:  # wins over the record
            settings.external = os.environ[EXTERNAL_ENV] not in ("", "0")
        return settings

    @property
    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def s3_endpoint_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int
    health_url: str
    url: str  # what a user opens
    marker: str  # a word of the leader's command line (stack.json files written before the tag)
    timeout: float  # seconds to become healthy
    env: dict[str, str] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)  # every port it binds (checked free before it starts)
    prepare: Callable[[], dict[str, str]] | None = None  # run by `up` just before it starts; returns env to add
    ready: Callable[[], None] | None = None  # run by `up` once it answers (also when it was running already)


def credentials(settings: StackSettings) -> dict[str, str]:
    """S3 credentials of the local server: ``$FREE_S3_ACCESS_KEY_ID``/``$FREE_S3_SECRET_ACCESS_KEY``,
    else the file generated on first use (``<state>/credentials.env``, mode 600, never committed)."""
    key, secret = os.environ.get("FREE_S3_ACCESS_KEY_ID"), os.environ.get("FREE_S3_SECRET_ACCESS_KEY")
    if key and secret:
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    path = settings.state_dir / "credentials.env"
    if not path.is_file():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = f"AWS_ACCESS_KEY_ID=free-{secrets.token_hex(6)}\nAWS_SECRET_ACCESS_KEY={secrets.token_hex(20)}\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    pairs = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    if not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= pairs.keys():
        raise StackError(f"{path} lacks AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; delete it to generate new ones")
    return {k: pairs[k].strip() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


def client_env(settings: StackSettings) -> dict[str, str]:
    """The environment that points clients (DVC, MLflow, Prefect, the flows) at this stack. External
    (real clouds): Prefect's settings only; S3 and MLflow settings stay the user's own."""
    if settings.external:
        prefect = {"PREFECT_API_URL": settings.prefect_api_url, "PREFECT_HOME": str(settings.state_dir / "prefect")}
        return {**prefect, **(postgres_client_env(settings) if settings.backend == "postgres" else {})}
    return {
        **credentials(settings),
        "PREFECT_API_URL": settings.prefect_api_url,
        "PREFECT_HOME": str(settings.state_dir / "prefect"),
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "FREE_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "MLFLOW_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "AWS_ENDPOINT_URL_S3": settings.s3_endpoint_url,
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        **(postgres_client_env(settings) if settings.backend == "postgres" else {}),
    }


def postgres_client_env(settings: StackSettings) -> dict[str, str]:
    """libpq's settings for ``psql`` and friends: the server, the role, the password *file* (not the password)."""
    from free.stack_postgres import USER, pgpass_path

    port, passfile = str(settings.postgres_port), str(pgpass_path(settings))
    return {"PGHOST": HOST, "PGPORT": port, "PGUSER": USER, "PGPASSFILE": passfile}


def use_running_stack(purpose: str, state_dir: Path | None = None) -> str:
    """The MLflow tracking URI for a client command (``free promote``, ``free serve``, …).

    ``$MLFLOW_TRACKING_URI`` when set; else the local stack recorded in the state directory, whose
    client settings (:func:`client_env`) are then put into this process's environment. Never MLflow's
    own default (a new ``./mlflow.db`` that holds none of the pipeline's runs).

    Raises:
        StackError: no tracking URI is set and no local stack is running; says how to fix either.
    """
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    settings = StackSettings.load(state_dir)
    mlflow = status(settings)["services"].get("mlflow", {"healthy": False})  # external: none here
    if not mlflow["healthy"]:
        raise StackError(
            f"{purpose} needs an MLflow server: MLFLOW_TRACKING_URI is not set and the local stack "
            f"in {settings.state_dir} is not running. Start it with `make stack-up` (or `.venv/bin/free "
            "stack up`), or set MLFLOW_TRACKING_URI to your tracking server."
        )
    os.environ.update(client_env(settings))
    return settings.mlflow_tracking_uri


def services(settings: StackSettings) -> list[Service]:
    """The services in start order."""
    state, bin_dir = settings.state_dir, Path(sys.executable).parent
    creds = credentials(settings)
    a = settings.aux_port
    weed = [
        str(bin_dir / "weed"), f"-logdir={state / 'logs' / 's3'}", "-alsologtostderr=false",
        "mini", f"-dir={state / 's3'}", f"-ip={HOST}", f"-ip.bind={HOST}", f"-bucket={settings.bucket}",
        f"-s3.port={settings.s3_port}", f"-s3.port.grpc={a}", f"-master.port={a + 1}",
        f"-master.port.grpc={a + 2}", f"-volume.port={a + 3}", f"-volume.port.grpc={a + 4}",
        f"-filer.port={a + 5}", f"-filer.port.grpc={a + 6}", f"-admin.port={a + 7}", f"-admin.port.grpc={a + 8}",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        "-disableHttp",  # no filer HTTP API, no master admin endpoints: S3 (with credentials) is the way in
        f"-filer.localSocket={state / 's3' / 'filer.sock'}", f"-s3.localSocket={state / 's3' / 's3.sock'}",
    ]  # fmt: skip
    mlflow = [
        str(bin_dir / "mlflow"), "server", "--host", HOST, "--port", str(settings.mlflow_port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{settings.bucket}/mlflow",
    ]  # fmt: skip
    prefect = [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(settings.prefect_port)]
    prefect_env = {
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{state / 'prefect' / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    listed = [
        Service("s3", weed, settings.s3_port, f"{settings.s3_endpoint_url}/healthz",
                f"{HOST}:{settings.s3_port} (S3 API, not a web page)", "weed", 90, dict(creds),
                [settings.s3_port, *range(a, a + 9)]),
        Service("mlflow", mlflow, settings.mlflow_port, f"{settings.mlflow_tracking_uri}/health",
                settings.mlflow_tracking_uri, "mlflow", 120,
                {**creds, "MLFLOW_S3_ENDPOINT_URL": settings.s3_endpoint_url, **MLFLOW_NO_JOBS},
                [settings.mlflow_port]),
        Service("prefect", prefect, settings.prefect_port, f"{settings.prefect_api_url}/health",
                f"http://{HOST}:{settings.prefect_port}", "prefect", 180, prefect_env, [settings.prefect_port]),
    ]  # fmt: skip
    if settings.worker:
        worker_env = {
            **client_env(settings),
            "FREE_CONFIG_DIR": str(settings.project_dir / "params"),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # bin/project-python falls back to python3
        }
        listed.append(
            Service(
                "worker",
                [sys.executable, "-m", "flows.pool_worker" if settings.work_pool else "flows.serve"],
                settings.prefect_port,
                f"{settings.prefect_api_url}/deployments/name/free/full-pipeline",
                f"http://{HOST}:{settings.prefect_port}/deployments",
                "flows.serve",
                180,
                worker_env,
            )
        )
    if settings.backend == "postgres":
        from free.stack_postgres import use_postgres

        use_postgres(settings, listed)
    if settings.external:  # S3 and MLflow are the clouds'
        listed = [service for service in listed if service.name not in ("s3", "mlflow")]
    return listed


def _state_file(settings: StackSettings) -> Path:
    return settings.state_dir / "stack.json"


def _read_state(settings: StackSettings) -> dict:
    path = _state_file(settings)
    if not path.is_file():
        return {"services": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StackError(f"{path} is not valid JSON ({err}); stop leftover processes by hand and delete it") from err


def _write_state(settings: StackSettings, state: dict) -> None:
    path = _state_file(settings)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def _tag(settings: StackSettings, name: str) -> str:
    return f"{settings.state_dir}#{name}"


def _members(record: dict, marker: str) -> list[psutil.Process]:
    """The live processes of a recorded service's process group, or [] when none of them is ours.

    Membership is by process group id (the recorded one; the leader's PID for older records). A group
    counts as ours when a member carries the recorded tag in its environment (or, for records without
    one, the marker in its command line): after the whole group has died, its id can be reused by an
    unrelated group leader, which has neither.
    """
    pgid = record.get("pgid") or record.get("pid")
    if not pgid:
        return []
    group, ours = [], False
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) != pgid or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            group.append(proc)
            if not ours:
                tag = record.get("tag")
                ours = proc.environ().get(TAG) == tag if tag else any(marker in part for part in proc.cmdline())
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return group if ours else []


def _state_of(service: Service, record: dict) -> tuple[str, list[psutil.Process]]:
    """(healthy | starting | half-dead | down, the live members of its group)."""
    members = _members(record, service.marker)
    if not members:
        return "down", []
    if not any(p.pid == record.get("pid") for p in members):
        return "half-dead", members  # the leader is gone, part of its group serves on
    return ("healthy" if _healthy(service.health_url) else "starting"), members


def _healthy(url: str, timeout: float = 2.0) -> bool:
    if url.startswith("postgresql://"):  # no HTTP there: a login and a query
        from free.stack_postgres import accepts_connections

        return accepts_connections(url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback URL we built)
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def free_port_block(n: int) -> int:
    """The first of ``n`` consecutive loopback ports that :func:`up` would find free (for tests and
    benchmarks that run a second stack beside the user's)."""
    for _ in range(200):
        base = random.randint(20000, 40000)
        if all(_port_free(base + i) for i in range(n)):
            return base
    raise StackError(f"no block of {n} free loopback ports found")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def _port_holders(port: int) -> set[int]:
    """PIDs listening on ``port`` on loopback or all addresses (where this user may see them)."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return set()
    return {
        c.pid for c in conns
        if c.pid and c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
        and c.laddr.ip in (HOST, "0.0.0.0", "::", "::ffff:127.0.0.1")
    }  # fmt: skip


def _log_tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def up(settings: StackSettings, say: Callable[[str], None] = print, only: list[str] | None = None) -> dict:
    """Start what is not running yet, wait until each service answers, record it in ``stack.json``.

    Idempotent: running, healthy services are left alone. A service of ours that is half-dead or
    does not answer (its group still holding its port) is stopped, group and all, and started again;
    a port held by a process outside every group recorded here is an error naming that process. If
    a service fails to start, the ones already up stay up (``down`` stops them) and the error
    carries the tail of its log. ``only``: start just these services (tests start a part).
    """
    # logs/s3: SeaweedFS's -logdir (glog writes its INFO/WARNING files there; it does not create it).
    for sub in ("logs", "logs/s3", "s3", "mlflow", "prefect"):
        (settings.state_dir / sub).mkdir(parents=True, exist_ok=True)
    # Owner only: the folder holds the credentials, logs that name the access key, and the databases.
    settings.state_dir.chmod(0o700)
    for path in (settings.state_dir / "logs").rglob("*"):  # logs written before they were made 0600
        if path.is_file() and not path.is_symlink():
            path.chmod(0o600)
    state = _read_state(settings)
    _check_backend(settings, state)
    if settings.backend == "postgres" and not settings.postgres_port:
        settings.postgres_port = free_port_block(1)  # chosen once, recorded below, kept by later ups
    state.update(_urls(settings))
    state["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
    starting: list[tuple[Service, subprocess.Popen, dict]] = []  # launched, not yet answering
    for service in services(settings):
        if only is not None and service.name not in only:
            continue
        record = state["services"].get(service.name, {})
        condition, members = _state_of(service, record)
        if condition == "healthy":
            say(f"{service.name:8s} already running (pid {record['pid']}) {service.url}")
            if service.ready:
                service.ready()
            continue
        if members:
            why = "half-dead (its leader is gone)" if condition == "half-dead" else "not answering"
            say(f"{service.name:8s} {why}: stopping its process group {record.get('pgid') or record.get('pid')} "
                f"({len(members)} processes) to start it again")  # fmt: skip
            _stop_group(record, service.marker)
        _free_ports_or_fail(settings, state, service, say)
        alongside = _starts_alongside(service)
        if not alongside:  # it needs the ones launched before it answering
            _await_all(settings, starting, say)
        if service.prepare:
            service.env.update(service.prepare())
        starting.append(_launch(settings, state, service, say))
        if not alongside:  # and the ones after it need it
            _await_all(settings, starting, say)
    _await_all(settings, starting, say)
    if not settings.external:  # external: the DVC remote is the user's (.dvc/config), keys from AWS_* / a profile
        configure_dvc_remote(settings)
    return status(settings)


def _check_backend(settings: StackSettings, state: dict) -> None:
    """Refuse an unknown backend, and a switch of backend while services of the other one run."""
    if settings.backend not in ("sqlite", "postgres"):
        raise StackError(f"unknown stack backend {settings.backend!r}: choose sqlite or postgres")
    recorded = state.get("settings", {}).get("backend", "sqlite")
    markers = {s.name: s.marker for s in services(settings)}
    running = [name for name, record in state["services"].items() if _members(record, markers.get(name, name))]
    if recorded != settings.backend and running:
        raise StackError(
            f"the stack in {settings.state_dir} runs on the {recorded} backend ({', '.join(running)}): stop it "
            f"with `free stack down` before `free stack up --backend {settings.backend}`"
        )


def _free_ports_or_fail(settings: StackSettings, state: dict, service: Service, say: Callable[[str], None]) -> None:
    """Make sure ``service``'s ports are free: a holder in one of our recorded groups (a half-dead
    service, whichever) is stopped with its group; any other holder is an error naming it."""
    markers = {s.name: s.marker for s in services(settings)}
    for port in service.ports:
        if _port_free(port):
            continue
        for pid in _port_holders(port):
            for name, record in state["services"].items():
                members = _members(record, markers.get(name, name))
                if any(p.pid == pid for p in members):
                    say(f"{service.name:8s} port {port} is held by pid {pid} of our {name} service's process "
                        f"group {record.get('pgid') or record.get('pid')}: stopping that group")  # fmt: skip
                    _stop_group(record, markers.get(name, name))
        if not _port_free(port):
            holders = ", ".join(f"pid {pid} ({_name_of(pid)})" for pid in sorted(_port_holders(port))) or "not visible"
            raise StackError(
                f"{service.name}: port {port} on {HOST} is taken by another program ({holders}), not by a "
                f"process of this stack; choose another port (see `free stack up --help`) or stop that program"
            )


def _name_of(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:80]
    except psutil.Error:
        return "?"


# Launched together, then waited for together (on 2 cores `up` went from 46 s one after another to
# about 25 s; docs/RESULTS.md, "The cost of orchestration"): none of these needs another one answering
# to start, and the serve() worker waits for the Prefect API itself (flows/serve.py). Any other service
# (PostgreSQL, whose databases MLflow and Prefect open at start; the pool worker, which deploys at
# start) waits for those launched before it, and the ones after it wait for it.
_ALONGSIDE = ("s3", "mlflow", "prefect")


def _starts_alongside(service: Service) -> bool:
    return service.name in _ALONGSIDE or service.argv[-1:] == ["flows.serve"]


def _launch(
    settings: StackSettings, state: dict, service: Service, say: Callable[[str], None]
) -> tuple[Service, subprocess.Popen, dict]:
    """Start ``service`` in its own session and record it in ``stack.json``; :func:`_await_all` waits for it."""
    log = settings.state_dir / "logs" / f"{service.name}.log"
    say(f"{service.name:8s} starting ... (log {log})")
    started = time.time()
    env = {**os.environ, **service.env, TAG: _tag(settings, service.name)}
    if service.name == "s3":  # secrets in the environment, never on a command line
        env.update(weed_security_env(settings.state_dir / "s3" / "tls"))
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        proc = subprocess.Popen(
            service.argv,
            cwd=settings.project_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group (id = its PID): `down` stops it and its children
            umask=0o077,  # what the services write (their own logs, sockets, data) is the owner's only
        )
    finally:
        os.close(log_fd)
    record = {
        "pid": proc.pid, "pgid": proc.pid, "tag": env[TAG], "port": service.port, "url": service.url,
        "log": str(log), "started": started,
    }  # fmt: skip
    state["services"][service.name] = record
    _write_state(settings, state)
    return service, proc, record


def _await_all(
    settings: StackSettings, starting: list[tuple[Service, subprocess.Popen, dict]], say: Callable[[str], None]
) -> None:
    """Wait until each launched service answers (in launch order), then run its ``ready``; empties
    ``starting``. A service that exits or does not answer in time is stopped, group and all, and
    raises; those already up stay up (``down`` stops them)."""
    while starting:
        service, proc, record = starting.pop(0)
        log, deadline = Path(record["log"]), record["started"] + service.timeout
        while not _healthy(service.health_url):
            if proc.poll() is not None:
                _stop_group(record, service.marker)  # helpers it may have left behind
                raise StackError(
                    f"{service.name} exited with code {proc.returncode}; end of {log}:\n{_log_tail(log)}"
                )
            if time.time() > deadline:
                _stop_group(record, service.marker)
                raise StackError(
                    f"{service.name} did not answer {service.health_url} within {service.timeout:.0f} s "
                    f"(stopped it); end of {log}:\n{_log_tail(log)}"
                )
            time.sleep(0.5)
        say(f"{service.name:8s} up in {time.time() - record['started']:.1f} s (pid {proc.pid}) {service.url}")
        if service.ready:
            service.ready()


def down(settings: StackSettings, say: Callable[[str], None] = print, grace: float = 20.0) -> None:
    """Stop the recorded services in reverse start order, each by its whole process group (SIGTERM,
    then SIGKILL to what is left after ``grace`` seconds). A pool worker's flow runs, each in a process
    group of its own, are stopped first the same way: nothing of a run works on after ``down``; the
    next ``up`` records them Crashed (:func:`flows.recovery.reconcile`)."""
    state = _read_state(settings)
    markers = {s.name: s.marker for s in services(settings)}
    for name in reversed(list(state["services"])):
        record = state["services"][name]
        pgid = record.get("pgid") or record.get("pid")
        members = _members(record, markers.get(name, name))
        runs = _own_groups_of_children(members, pgid) if name == "worker" else []
        if runs:  # before the worker: it sees its runs end, and stops at once instead of waiting for them
            left = _stop_groups(runs, grace)
            said = f"{name:8s} stopped its flow runs (process groups {', '.join(map(str, runs))})"
            say(said + (f"; {', '.join(map(str, left))} did not stop even on SIGKILL" if left else ""))
        if not members:
            say(f"{name:8s} was not running")
        elif not _stop_group(record, markers.get(name, name), grace):
            say(f"{name:8s} process group {pgid} did not stop even on SIGKILL; kept in stack.json")
            continue
        else:
            leader = "" if any(p.pid == record.get("pid") for p in members) else ", half-dead: its leader was gone"
            say(f"{name:8s} stopped (process group {pgid}: {len(members)} processes{leader})")
        del state["services"][name]
        _write_state(settings, state)
    a = settings.aux_port
    for port in range(a, a + 9):  # weed's gRPC sockets are always written to /tmp
        for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            path.unlink(missing_ok=True)


def _own_groups_of_children(members: list[psutil.Process], pgid: int | None) -> list[int]:
    """Process groups other than ``pgid`` that descendants of ``members`` lead or belong to: the flow
    runs a process worker (``free stack up --work-pool``) starts each in a session of its own, which
    a signal to the worker's group does not reach (Prefect's worker, told to stop, waits for them)."""
    groups: set[int] = set()
    for proc in members:
        try:
            children = proc.children(recursive=True)
        except psutil.Error:
            continue
        for child in children:
            try:
                group = os.getpgid(child.pid)
            except (ProcessLookupError, PermissionError):
                continue
            if group != pgid:
                groups.add(group)
    return sorted(groups)


def _stop_groups(groups: list[int], grace: float, reap: int | None = None) -> list[int]:
    """SIGTERM each group (a service; a flow run's process takes it as "crash" and ends its MLflow runs),
    SIGKILL what is left after ``grace`` seconds; the groups with a live process still (none, normally).
    ``reap``: a leader to reap meanwhile (when it is our child), so its zombie does not keep it alive."""
    for group in groups:
        _signal_group(group, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(_group_alive(g) for g in groups):
        _reap(reap)
        time.sleep(0.2)
    left = [g for g in groups if _group_alive(g)]
    for group in left:
        _signal_group(group, signal.SIGKILL)
    deadline = time.time() + 5
    while left and time.time() < deadline and any(_group_alive(g) for g in left):
        _reap(reap)
        time.sleep(0.1)
    return [g for g in groups if _group_alive(g)]


def _stop_group(record: dict, marker: str, grace: float = 20.0) -> bool:
    """SIGTERM the recorded service's whole process group, SIGKILL what is left after ``grace``
    seconds; True when no process of the group is left. Signals nothing unless the group is ours."""
    if not _members(record, marker):
        return True
    pgid = record.get("pgid") or record["pid"]
    _stop_groups([pgid], grace, reap=record.get("pid"))
    # Zombies keep the group id until their parent (the leader, when it is our child; else init) reaps them.
    deadline = time.time() + 5
    while time.time() < deadline and _signal_group(pgid, 0):
        _reap(record.get("pid"))
        time.sleep(0.05)
    return not _group_alive(pgid)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when no process (zombies included) has that id."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def _group_alive(pgid: int) -> bool:
    """Whether any process, zombies aside, still has process group ``pgid``."""
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return False


def _reap(pid: int | None) -> None:
    if not pid:
        return
    try:
        os.waitpid(pid, os.WNOHANG)  # only when the service is our child (tests); else a no-op
    except ChildProcessError:
        pass


def _urls(settings: StackSettings) -> dict:
    if settings.external:  # what this environment points at (recorded by `up`)
        env = os.environ.get
        return {
            "state_dir": str(settings.state_dir), "project_dir": str(settings.project_dir),
            "prefect_api_url": settings.prefect_api_url, "prefect_ui_url": f"http://{HOST}:{settings.prefect_port}",
            "mlflow_tracking_uri": env("MLFLOW_TRACKING_URI") or "(MLFLOW_TRACKING_URI not set)",
            "s3_endpoint_url": env("FREE_S3_ENDPOINT_URL") or env("AWS_ENDPOINT_URL_S3") or "(AWS S3)",
            "s3_bucket": settings.bucket, "backend": settings.backend, "external": True,
            "dvc_remote": "(the default remote of .dvc/config)", "mlflow_artifacts": "(the tracking server's)",
        }  # fmt: skip
    return {
        "state_dir": str(settings.state_dir),
        "project_dir": str(settings.project_dir),
        "prefect_api_url": settings.prefect_api_url,
        "prefect_ui_url": f"http://{HOST}:{settings.prefect_port}",
        "mlflow_tracking_uri": settings.mlflow_tracking_uri,
        "s3_endpoint_url": settings.s3_endpoint_url,
        "s3_bucket": settings.bucket,
        "backend": settings.backend,
        "dvc_remote": f"s3://{settings.bucket}/dvc",
        "mlflow_artifacts": f"s3://{settings.bucket}/mlflow",
    }


def status(settings: StackSettings) -> dict:
    """What runs where: the URLs and, per service, state (healthy | starting | half-dead | down),
    pid (its leader, while alive), pgid and members (the live processes of its group), log."""
    state = _read_state(settings)
    recorded = state.get("services", {})
    report = {**_urls(settings), **{k: v for k, v in state.items() if k.endswith(("_url", "_uri"))}, "services": {}}
    for service in services(settings):
        record = recorded.get(service.name, {})
        condition, members = _state_of(service, record)
        report["services"][service.name] = {
            "state": condition,
            "pid": record.get("pid") if condition in ("healthy", "starting") else None,
            "pgid": (record.get("pgid") or record.get("pid")) if members else None,
            "members": sorted(p.pid for p in members),
            "running": condition in ("healthy", "starting"),
            "healthy": condition == "healthy",
            "url": record.get("url", service.url),
            "log": record.get("log", str(settings.state_dir / "logs" / f"{service.name}.log")),
        }
    return report


def configure_dvc_remote(settings: StackSettings) -> None:
    """Point the DVC remote ``local-s3`` at this stack, credentials in ``.dvc/config.local`` (git-ignored).

    The file is written here (0600 from its first byte, replaced atomically, other settings in it
    kept), not with ``dvc remote modify --local … secret_access_key <secret>``, which would show the
    secret in the process list to every local user.
    """
    from configobj import ConfigObj  # DVC's own reader of its config files

    if not (settings.project_dir / ".dvc" / "config").is_file():
        return
    path = settings.project_dir / ".dvc" / "config.local"
    config = ConfigObj(str(path) if path.is_file() else None, interpolation=False)
    creds = credentials(settings)
    section = f'remote "{DVC_REMOTE}"'
    config.setdefault(section, {})
    config[section].update(
        {
            "endpointurl": settings.s3_endpoint_url,
            "url": f"s3://{settings.bucket}/dvc",
            "access_key_id": creds["AWS_ACCESS_KEY_ID"],
            "secret_access_key": creds["AWS_SECRET_ACCESS_KEY"],
        }
    )
    config.filename = None
    write_private(path, ("\n".join(config.write()) + "\n").encode())
