"""The local stack's PostgreSQL backend: ``free stack up --backend postgres``.

One PostgreSQL server (Debian's ``postgresql`` package) becomes a stack service (``postgres``) that
starts before MLflow and Prefect; their stores move onto it, one database each (``mlflow``,
``prefect``). MLflow's artifacts stay on the S3 server, as with SQLite.

* Data: ``<state>/postgres`` (``initdb`` on the first start). Listens on 127.0.0.1 only, on
  ``postgres_port`` (a free port chosen at the first ``up``, recorded in ``stack.json``); no Unix
  socket. ``pg_hba.conf`` admits one thing: password logins (scram-sha-256) from 127.0.0.1.
* Password: generated on first use into ``<state>/postgres.pgpass`` (libpq's password-file format,
  0600; ``PGPASSFILE`` points psql at it). It reaches ``initdb`` as a file (``--pwfile``, a 0600 copy
  deleted afterwards) and MLflow and Prefect as their database URLs in their environment
  (``MLFLOW_BACKEND_STORE_URI``, ``PREFECT_API_DATABASE_CONNECTION_URL``), set only when ``up``
  starts them; never on a command line, in ``stack.json`` or in a log.
* Root: PostgreSQL refuses to run as root. Started by root, ``initdb`` and the server run in a user
  namespace of their own where they are an ordinary user (the ``postgres`` user where it exists,
  else ``nobody``) mapped to root outside: they own what they write (``<state>`` stays root's,
  0700, which the real ``postgres`` user could not even enter) and have no privilege over anything
  else. Started by anyone else, they run as that user.
* Process group: the postmaster leads the service's group; its helper processes each start a
  session of their own (PostgreSQL does so) and leave by themselves when the postmaster is gone.
  ``down`` sends the postmaster SIGTERM (a clean shutdown: MLflow and Prefect are stopped first).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from free.stack_security import write_private

if TYPE_CHECKING:
    from free.stack import Service, StackSettings

HOST = "127.0.0.1"
USER = "free"  # the one role (the superuser initdb makes); MLflow and Prefect log in as it
DATABASES = ("mlflow", "prefect")
INSTALL_HINT = (
    "install Debian's PostgreSQL server: apt-get install -y --no-install-recommends postgresql "
    "(.ci/run does so on a clean CI machine)"
)


def data_dir(settings: StackSettings) -> Path:
    return settings.state_dir / "postgres"


def pgpass_path(settings: StackSettings) -> Path:
    return settings.state_dir / "postgres.pgpass"


def password(settings: StackSettings) -> str:
    """The server's password: read from ``<state>/postgres.pgpass``, generated there (0600) on first use.

    Raises:
        StackError: the file is missing while the data folder was initialised with an earlier one,
            or it is not in the format written here.
    """
    from free.stack import StackError

    path = pgpass_path(settings)
    if not path.is_file():
        if (data_dir(settings) / "PG_VERSION").is_file():
            raise StackError(
                f"{path} is gone but {data_dir(settings)} was initialised with the password it held: restore "
                f"the file, or delete {data_dir(settings)} (its databases go with it) to start afresh"
            )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # host:port:database:user:password (libpq); hex holds none of the characters it escapes.
        write_private(path, f"{HOST}:*:*:{USER}:{secrets.token_hex(24)}\n".encode())
    fields = path.read_text().strip().split(":")
    if len(fields) != 5 or fields[3] != USER or not fields[4]:
        raise StackError(f"{path} is not a line `{HOST}:*:*:{USER}:<password>`; delete it and {data_dir(settings)}")
    return fields[4]


def database_url(settings: StackSettings, database: str, driver: str) -> str:
    """SQLAlchemy URL of ``database`` with the password in it: for a service's environment only."""
    return f"postgresql+{driver}://{USER}:{password(settings)}@{HOST}:{settings.postgres_port}/{database}"


def health_url(settings: StackSettings) -> str:
    """A libpq URL that names the password *file*, not the password (it shows in ``stack.json`` and status)."""
    passfile = urllib.parse.quote(str(pgpass_path(settings)), safe="/")
    return f"postgresql://{USER}@{HOST}:{settings.postgres_port}/postgres?passfile={passfile}&connect_timeout=2"


def accepts_connections(url: str) -> bool:
    """Whether the server at libpq ``url`` lets us log in and answers a query."""
    import psycopg2

    try:
        connection = psycopg2.connect(url)
    except psycopg2.Error:
        return False
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            return cursor.fetchone() == (1,)
    except psycopg2.Error:
        return False
    finally:
        connection.close()


def binaries() -> Path:
    """The folder holding ``initdb`` and ``postgres``: Debian keeps them in /usr/lib/postgresql/<version>/bin."""
    from free.stack import StackError

    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version(p.parent.name), reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise StackError(
        f"the postgres backend needs PostgreSQL's initdb and postgres, found in neither PATH nor "
        f"/usr/lib/postgresql/*/bin: {INSTALL_HINT}"
    )


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def as_server_user() -> list[str]:
    """The command prefix that runs PostgreSQL's programs as an ordinary user (see the module docstring)."""
    if os.geteuid() != 0:
        return []
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        account = pwd.getpwnam("nobody")
    # initdb looks its user up by id: a mapped id with a name in /etc/passwd.
    return ["unshare", "--user", f"--map-user={account.pw_uid}", f"--map-group={account.pw_gid}", "--"]


def server_argv(settings: StackSettings) -> list[str]:
    return [
        *as_server_user(), str(binaries() / "postgres"), "-D", str(data_dir(settings)),
        "-p", str(settings.postgres_port), "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories=",
        "-c", "logging_collector=off", "-c", "max_connections=60",
    ]  # fmt: skip


def initialise(settings: StackSettings) -> None:
    """``initdb`` into ``<state>/postgres`` unless done before; then pg_hba.conf admits loopback passwords only.

    Waits first for helpers of an earlier server on this folder to leave (after a ``kill -9`` of the
    postmaster they do within seconds): a new server refuses the shared memory they still hold.

    Raises:
        StackError: initdb failed (the log says why), or this machine forbids the user namespace
            root needs to run PostgreSQL.
    """
    from free.stack import StackError

    folder = data_dir(settings)
    log = settings.state_dir / "logs" / "postgres.log"
    _wait_for_leftovers(folder)
    if not (folder / "PG_VERSION").is_file():
        if folder.exists() and any(folder.iterdir()):
            raise StackError(f"{folder} is neither empty nor a PostgreSQL data folder (no PG_VERSION): move it away")
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        pwfile = settings.state_dir / f".initdb-{secrets.token_hex(4)}"
        write_private(pwfile, (password(settings) + "\n").encode())
        argv = [
            *as_server_user(), str(binaries() / "initdb"), "-D", str(folder), "-U", USER, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C",
        ]  # fmt: skip
        log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT, umask=0o077)
        finally:
            os.close(log_fd)
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)  # half-made: the next try starts clean
            hint = ""
            if as_server_user() and "unshare" in _tail(log):
                hint = " (as root, PostgreSQL runs in a user namespace; this machine refuses one: run as a plain user)"
            raise StackError(f"initdb exited with code {done.returncode}{hint}; end of {log}:\n{_tail(log)}")
    # Replaced at every start: loopback, password (scram-sha-256); no Unix socket, no other host.
    hba = f"# written by free stack up\nhost all all {HOST}/32 scram-sha-256\n"
    write_private(folder / "pg_hba.conf", hba.encode())


def create_databases(settings: StackSettings) -> None:
    """Create MLflow's and Prefect's databases where missing (the server is up)."""
    import psycopg2

    connection = psycopg2.connect(health_url(settings).replace("connect_timeout=2", "connect_timeout=10"))
    try:
        connection.autocommit = True  # CREATE DATABASE refuses to run in a transaction
        with connection.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database")
            present = {row[0] for row in cursor.fetchall()}
            for name in DATABASES:
                if name not in present:
                    cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()


def _wait_for_leftovers(folder: Path, timeout: float = 20.0) -> None:
    """Wait until no process works in ``folder`` (PostgreSQL's processes all have it as their cwd)."""
    from free.stack import StackError

    deadline = time.time() + timeout
    while left := _working_in(folder):
        if time.time() > deadline:
            pids = ", ".join(map(str, left))
            raise StackError(
                f"processes of an earlier PostgreSQL server on {folder} are still running (pids {pids}): "
                "stop them, then run `free stack up` again"
            )
        time.sleep(0.2)


def _working_in(folder: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and Path(proc.cwd()) == folder.resolve():
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def server_processes(settings: StackSettings) -> list[int]:
    """Every live process of this stack's PostgreSQL server (the postmaster and its helpers)."""
    return _working_in(data_dir(settings))


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


def use_postgres(settings: StackSettings, listed: list[Service]) -> None:
    """Turn the SQLite stack's service list into the PostgreSQL one: the server goes in after S3, and
    MLflow's and Prefect's stores move onto it (their database URLs are added to their environment
    by ``up`` just before each starts, through ``prepare``)."""
    from free.stack import Service

    by_name = {service.name: service for service in listed}
    mlflow, prefect = by_name["mlflow"], by_name["prefect"]
    at = mlflow.argv.index("--backend-store-uri")
    del mlflow.argv[at : at + 2]  # the URL holds the password: environment only
    mlflow.prepare = lambda: {"MLFLOW_BACKEND_STORE_URI": database_url(settings, "mlflow", "psycopg2")}
    prefect.env.pop("PREFECT_API_DATABASE_CONNECTION_URL")
    prefect.prepare = lambda: {"PREFECT_API_DATABASE_CONNECTION_URL": database_url(settings, "prefect", "asyncpg")}

    def prepare() -> dict[str, str]:
        server.argv[:] = server_argv(settings)  # here, not above: status and down need no PostgreSQL installed
        initialise(settings)
        return {}

    shown = f"postgresql://{USER}@{HOST}:{settings.postgres_port} (password in {pgpass_path(settings)})"
    server = Service(
        "postgres", [], settings.postgres_port, health_url(settings), shown, "postgres", 60,
        ports=[settings.postgres_port], prepare=prepare, ready=lambda: create_databases(settings),
    )  # fmt: skip
    listed.insert(listed.index(by_name["s3"]) + 1, server)
