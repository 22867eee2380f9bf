"""The local stack: a Prefect server, an MLflow server and an S3 server on loopback, plus the process
that serves the Prefect deployments. ``free stack up|down|status`` drives it.

Everything lives under one state directory (``$FREE_STATE_DIR``, default ``state/``): data, SQLite
databases, logs, PID files, the generated S3 credentials and ``stack.json`` (what runs where).
Processes are started in their own session and stopped by the PIDs recorded here, never by name.

Services, in start order:

* ``s3``      SeaweedFS ``weed mini``: S3 API on ``s3_port`` (8333); its master, volume, filer and
  admin ports take ``aux_port .. aux_port+9`` (18334..), all bound to 127.0.0.1. The bucket is created
  on first start. weed writes its gRPC sockets to ``/tmp/seaweedfs-*-grpc-<port>.sock`` whatever
  the settings; ``down`` removes the ones of this stack's ports.
* ``mlflow``  ``mlflow server``: SQLite backend store, artifacts proxied to ``s3://<bucket>/mlflow``.
* ``prefect`` ``prefect server start``: SQLite database under the state directory.
* ``worker``  ``python -m flows.serve``: serves the deployments ``free/full-pipeline`` and
  ``promote/promote`` from the project directory, with the stack's settings in its environment.
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

HOST = "127.0.0.1"
DVC_REMOTE = "local-s3"


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
    worker: bool = True  # serve the Prefect deployments too

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
    marker: str  # a word of the command line, to tell our process from a reused PID
    timeout: float  # seconds to become healthy
    env: dict[str, str] = field(default_factory=dict)


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
    """The environment that points clients (DVC, MLflow, Prefect, the flows) at this stack."""
    return {
        **credentials(settings),
        "PREFECT_API_URL": settings.prefect_api_url,
        "PREFECT_HOME": str(settings.state_dir / "prefect"),
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "FREE_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "MLFLOW_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "AWS_ENDPOINT_URL_S3": settings.s3_endpoint_url,
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    }


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
    mlflow = status(settings)["services"]["mlflow"]
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
                f"{HOST}:{settings.s3_port} (S3 API, not a web page)", "weed", 90, dict(creds)),
        Service("mlflow", mlflow, settings.mlflow_port, f"{settings.mlflow_tracking_uri}/health",
                settings.mlflow_tracking_uri, "mlflow", 120,
                {**creds, "MLFLOW_S3_ENDPOINT_URL": settings.s3_endpoint_url}),
        Service("prefect", prefect, settings.prefect_port, f"{settings.prefect_api_url}/health",
                f"http://{HOST}:{settings.prefect_port}", "prefect", 180, prefect_env),
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
                [sys.executable, "-m", "flows.serve"],
                settings.prefect_port,
                f"{settings.prefect_api_url}/deployments/name/free/full-pipeline",
                f"http://{HOST}:{settings.prefect_port}/deployments",
                "flows.serve",
                180,
                worker_env,
            )
        )
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


def _ours(pid: int | None, marker: str) -> bool:
    """Whether ``pid`` runs and is the service we started (not a reused PID)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and any(marker in part for part in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _healthy(url: str, timeout: float = 2.0) -> bool:
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


def _log_tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def up(settings: StackSettings, say: Callable[[str], None] = print) -> dict:
    """Start what is not running yet, wait until each service answers, record it in ``stack.json``.

    Idempotent: running, healthy services are left alone. If a service fails to start, the ones
    already up stay up (``down`` stops them) and the error carries the tail of its log.
    """
    for sub in ("logs", "s3", "mlflow", "prefect"):
        (settings.state_dir / sub).mkdir(parents=True, exist_ok=True)
    # Owner only: the folder holds the credentials, logs that name the access key, and the databases.
    settings.state_dir.chmod(0o700)
    state = _read_state(settings)
    state.update(_urls(settings))
    state["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
    for service in services(settings):
        record = state["services"].get(service.name, {})
        if _ours(record.get("pid"), service.marker) and _healthy(service.health_url):
            say(f"{service.name:8s} already running (pid {record['pid']}) {service.url}")
            continue
        if service.name != "worker" and not _port_free(service.port):
            raise StackError(
                f"{service.name}: port {service.port} on {HOST} is taken by another program; "
                f"choose another (see `free stack up --help`) or stop that program"
            )
        log = settings.state_dir / "logs" / f"{service.name}.log"
        say(f"{service.name:8s} starting ... (log {log})")
        started = time.time()
        with log.open("ab") as log_file:
            proc = subprocess.Popen(
                service.argv,
                cwd=settings.project_dir,
                env={**os.environ, **service.env},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: `down` stops it and its children
            )
        state["services"][service.name] = {
            "pid": proc.pid, "port": service.port, "url": service.url, "log": str(log), "started": started,
        }  # fmt: skip
        _write_state(settings, state)
        deadline = started + service.timeout
        while not _healthy(service.health_url):
            if proc.poll() is not None:
                raise StackError(f"{service.name} exited with code {proc.returncode}; end of {log}:\n{_log_tail(log)}")
            if time.time() > deadline:
                _stop_pid(proc.pid, service.marker)
                raise StackError(
                    f"{service.name} did not answer {service.health_url} within {service.timeout:.0f} s "
                    f"(stopped it); end of {log}:\n{_log_tail(log)}"
                )
            time.sleep(0.5)
        say(f"{service.name:8s} up in {time.time() - started:.1f} s (pid {proc.pid}) {service.url}")
    configure_dvc_remote(settings)
    return status(settings)


def down(settings: StackSettings, say: Callable[[str], None] = print) -> None:
    """Stop the recorded services in reverse start order, by PID (its process group)."""
    state = _read_state(settings)
    markers = {s.name: s.marker for s in services(settings)}
    for name in reversed(list(state["services"])):
        record = state["services"][name]
        if _stop_pid(record.get("pid"), markers.get(name, name)):
            say(f"{name:8s} stopped (pid {record['pid']})")
        else:
            say(f"{name:8s} was not running")
        del state["services"][name]
        _write_state(settings, state)
    a = settings.aux_port
    for port in range(a, a + 9):  # weed's gRPC sockets are always written to /tmp
        for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            path.unlink(missing_ok=True)


def _stop_pid(pid: int | None, marker: str, grace: float = 20.0) -> bool:
    if not _ours(pid, marker):
        return False
    assert pid is not None
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.time() + grace
    while time.time() < deadline and _group_alive(pid):
        _reap(pid)
        time.sleep(0.2)
    if _group_alive(pid):
        os.killpg(pid, signal.SIGKILL)
    _reap(pid)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # only when the service is our child (tests); else a no-op
    except ChildProcessError:
        pass


def _urls(settings: StackSettings) -> dict:
    return {
        "state_dir": str(settings.state_dir),
        "project_dir": str(settings.project_dir),
        "prefect_api_url": settings.prefect_api_url,
        "prefect_ui_url": f"http://{HOST}:{settings.prefect_port}",
        "mlflow_tracking_uri": settings.mlflow_tracking_uri,
        "s3_endpoint_url": settings.s3_endpoint_url,
        "s3_bucket": settings.bucket,
        "dvc_remote": f"s3://{settings.bucket}/dvc",
        "mlflow_artifacts": f"s3://{settings.bucket}/mlflow",
    }


def status(settings: StackSettings) -> dict:
    """What runs where: the URLs and, per service, pid / running / healthy / log."""
    state = _read_state(settings)
    recorded = state.get("services", {})
    report = {**_urls(settings), **{k: v for k, v in state.items() if k.endswith(("_url", "_uri"))}, "services": {}}
    for service in services(settings):
        record = recorded.get(service.name, {})
        running = _ours(record.get("pid"), service.marker)
        report["services"][service.name] = {
            "pid": record.get("pid") if running else None,
            "running": running,
            "healthy": running and _healthy(service.health_url),
            "url": record.get("url", service.url),
            "log": record.get("log", str(settings.state_dir / "logs" / f"{service.name}.log")),
        }
    return report


def configure_dvc_remote(settings: StackSettings) -> None:
    """Point the DVC remote ``local-s3`` at this stack, credentials in ``.dvc/config.local`` (git-ignored)."""
    if not (settings.project_dir / ".dvc" / "config").is_file():
        return
    creds = credentials(settings)
    for key, value in (
        ("endpointurl", settings.s3_endpoint_url),
        ("url", f"s3://{settings.bucket}/dvc"),
        ("access_key_id", creds["AWS_ACCESS_KEY_ID"]),
        ("secret_access_key", creds["AWS_SECRET_ACCESS_KEY"]),
    ):
        subprocess.run(
            [sys.executable, "-m", "dvc", "remote", "modify", "--local", DVC_REMOTE, key, value],
            cwd=settings.project_dir,
            check=True,
            capture_output=True,
        )
    # DVC writes config.local with the umask's mode (often 644); it holds the S3 secret.
    (settings.project_dir / ".dvc" / "config.local").chmod(0o600)
