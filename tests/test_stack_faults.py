"""The local stack's real services under faults (issue 13, items 3 and 4): a service whose leader was
``kill -9``-ed while its group serves on, a port held by a stranger, ``down`` leaving nothing of a
group behind, and SeaweedFS's non-S3 ports shut to anonymous clients.

One stack of two services (the S3 server and MLflow; Prefect's start is a minute on 2 cores and
adds nothing here) on free ports with a private state folder, shared by the tests in file order.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from free import stack
from free.stack import HOST
from tests.helpers_stack import free_port_settings, group_members

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + an empty SETTINGS frame


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("faults")
    (root / "project").mkdir()  # no .dvc/config there: `up` leaves DVC alone
    settings = free_port_settings(root, root / "project", worker=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FREE_S3_ACCESS_KEY_ID", "faults-test-key-id")
        mp.setenv("FREE_S3_SECRET_ACCESS_KEY", "faults-test-secret-0123456789")
        try:
            stack.up(settings, say=lambda line: None, only=["s3", "mlflow"])
            yield settings
        finally:
            stack.down(settings, say=lambda line: None)


def _load_preflight():
    spec = importlib.util.spec_from_file_location("preflight", REPO / "infra" / "preflight.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _request(method: str, url: str, data: bytes | None = None) -> int | str:
    """The HTTP status, or the name of the error when there is no HTTP answer (refused, reset)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method, data=data), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError) as e:
        return type(e).__name__


def _s3(settings: stack.StackSettings, key: str, secret: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=settings.s3_endpoint_url, aws_access_key_id=key, aws_secret_access_key=secret,
        region_name="us-east-1", config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30),
    )  # fmt: skip


def _put_with_retries(client, key: str, body: bytes) -> None:
    """The first write to a fresh SeaweedFS waits for its first volumes to grow; a few tries."""
    for attempt in range(20):
        try:
            client.put_object(Bucket="free", Key=key, Body=body)
            return
        except Exception:
            if attempt == 19:
                raise
            time.sleep(1)


def _speaks_http2(port: int, tls: ssl.SSLContext | None = None) -> bool:
    """Whether a gRPC (HTTP/2) session opens on ``port``: its server answers our preface with SETTINGS."""
    try:
        with socket.create_connection((HOST, port), timeout=10) as raw:
            sock = tls.wrap_socket(raw, server_hostname=HOST) if tls else raw
            sock.sendall(H2_PREFACE)
            reply = sock.recv(9)
            return len(reply) >= 4 and reply[3] == 0x04  # a frame header, type SETTINGS
    except (OSError, ssl.SSLError):
        return False


def test_only_the_s3_api_with_credentials_serves_the_data(two: stack.StackSettings) -> None:
    good = _s3(two, "faults-test-key-id", "faults-test-secret-0123456789")
    body = b"dvc object " * 100
    _put_with_retries(good, "dvc/files/md5/ab/cdef", body)
    assert good.get_object(Bucket="free", Key="dvc/files/md5/ab/cdef")["Body"].read() == body
    with pytest.raises(Exception, match="AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|403"):
        _s3(two, "faults-test-key-id", "a-wrong-secret").get_object(Bucket="free", Key="dvc/files/md5/ab/cdef")

    weed = stack.status(two)["services"]["s3"]
    ports = {c.laddr.port for pid in weed["members"] for c in psutil.Process(pid).net_connections("tcp")
             if c.status == psutil.CONN_LISTEN}  # fmt: skip
    others = sorted(ports - {two.s3_port})
    assert len(others) >= 6, ports  # master, volume, filer (HTTP + gRPC each), s3 gRPC, admin
    assert all(p == two.s3_port or two.aux_port <= p < two.aux_port + 9 for p in ports), ports  # all recorded
    for port in others:
        base = f"http://{HOST}:{port}"
        answers = {
            "read": _request("GET", f"{base}/buckets/free/dvc/files/md5/ab/cdef"),
            "write": _request("PUT", f"{base}/buckets/free/dvc/files/md5/ab/evil", b"evil"),
            "form": _request("POST", f"{base}/buckets/free/dvc/files/md5/ab/evil", b"evil"),
            "delete": _request("DELETE", f"{base}/buckets/free/dvc/files/md5/ab/cdef"),
            "assign": _request("GET", f"{base}/dir/assign"),  # the master's volume-write grant
            "drop": _request("GET", f"{base}/col/delete?collection=free"),  # the master's collection delete
        }
        assert not [k for k, v in answers.items() if isinstance(v, int) and 200 <= v < 300], (port, answers)
        assert not _speaks_http2(port), port  # no plaintext gRPC (what `weed shell` uses)
    # The gRPC ports take a TLS client only with the stack's certificate: without it, no session;
    # with it, an HTTP/2 session opens (so the refusal above is the certificate's doing).
    tls_dir = two.state_dir / "s3" / "tls"
    anonymous = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
    anonymous.set_alpn_protocols(["h2"])
    holder = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
    holder.set_alpn_protocols(["h2"])
    holder.load_cert_chain(tls_dir / "stack.crt", tls_dir / "stack.key")
    grpc = [p for p in others if _speaks_http2(p, holder)]
    assert len(grpc) >= 4, others  # s3, master, volume, filer gRPC
    assert not [p for p in grpc if _speaks_http2(p, anonymous)], grpc
    # Nothing was changed through the side doors.
    assert good.get_object(Bucket="free", Key="dvc/files/md5/ab/cdef")["Body"].read() == body
    listed = good.list_objects_v2(Bucket="free", Prefix="dvc/files/md5/ab/").get("Contents", [])
    assert [o["Key"] for o in listed] == ["dvc/files/md5/ab/cdef"]


def test_secrets_are_in_owner_only_files_and_on_no_command_line(two: stack.StackSettings) -> None:
    assert two.state_dir.stat().st_mode & 0o077 == 0
    for path in [*(two.state_dir / "logs").rglob("*"), *(two.state_dir / "s3" / "tls").iterdir()]:
        if path.is_file() and not path.is_symlink():
            assert path.stat().st_mode & 0o077 == 0, path
    for port in range(two.aux_port, two.aux_port + 9):
        for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            assert sock.stat().st_mode & 0o077 == 0, sock
    weed = stack.status(two)["services"]["s3"]["members"]
    jwt = psutil.Process(weed[0]).environ()["WEED_JWT_FILER_SIGNING_KEY"]
    for pid in psutil.pids():
        try:
            line = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        assert "faults-test-secret" not in line and jwt not in line, (pid, line[:200])


def test_kill_9_of_the_leader_is_half_dead_and_up_restarts_it(two: stack.StackSettings) -> None:
    before = stack.status(two)["services"]["mlflow"]
    assert before["state"] == "healthy" and len(before["members"]) >= 2, before  # mlflow + uvicorn (+ helpers)
    leader, pgid = before["pid"], before["pgid"]
    os.kill(leader, signal.SIGKILL)
    try:
        os.waitpid(leader, 0)  # the test started it: reap it, as init would a user's
    except ChildProcessError:
        pass  # subprocess reaped it already
    # What the issue saw: the leader gone, its group still serving MLflow on the port.
    half = stack.status(two)["services"]["mlflow"]
    assert half["state"] == "half-dead" and half["pid"] is None and half["pgid"] == pgid, half
    assert half["members"] and set(half["members"]) <= set(group_members(pgid)), half
    shown = subprocess.run(
        [str(BIN / "free"), "stack", "status", "--state-dir", str(two.state_dir)],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"},
    )  # fmt: skip
    assert shown.returncode == 1 and "half-dead" in shown.stdout, shown.stdout + shown.stderr
    # `make run`'s preflight takes the port for ours too (it would stop `make run` before `up` otherwise).
    preflight = _load_preflight()
    ports = {"FREE_MLFLOW_PORT": two.mlflow_port, "FREE_S3_PORT": two.s3_port, "FREE_S3_AUX_PORT": two.aux_port,
             "FREE_PREFECT_PORT": two.prefect_port}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ports.items():
            mp.setenv(key, str(value))
        assert preflight.check_ports(two.state_dir) == []

    lines: list[str] = []
    stack.up(two, say=lines.append, only=["mlflow"])
    assert not [line for line in lines if "another program" in line], lines
    assert any("half-dead" in line and str(pgid) in line for line in lines), lines
    after = stack.status(two)["services"]["mlflow"]
    assert after["state"] == "healthy" and after["pid"] != leader, after
    assert group_members(pgid) == []  # the old group stopped, all of it
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def test_a_port_held_outside_our_groups_is_another_program(two: stack.StackSettings, tmp_path: Path) -> None:
    with socket.socket() as stranger:
        stranger.bind((HOST, 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        other = stack.StackSettings(
            state_dir=tmp_path / "state", project_dir=two.project_dir, mlflow_port=port, s3_port=two.s3_port,
            aux_port=two.aux_port, prefect_port=two.prefect_port, worker=False,
        )  # fmt: skip
        with pytest.raises(stack.StackError, match=rf"port {port} .* taken by another program \(pid {os.getpid()} "):
            stack.up(other, say=lambda line: None, only=["mlflow"])
    assert stack.status(two)["services"]["mlflow"]["state"] == "healthy"  # the real stack untouched


def test_down_stops_every_process_of_every_group(two: stack.StackSettings) -> None:
    groups = {name: s["pgid"] for name, s in stack.status(two)["services"].items() if s["pgid"]}
    assert set(groups) == {"s3", "mlflow"}, groups
    lines: list[str] = []
    stack.down(two, say=lines.append)
    for name, pgid in groups.items():
        assert group_members(pgid) == [], (name, lines)
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
    assert all(s["state"] == "down" for s in stack.status(two)["services"].values())


def test_down_kills_what_ignores_sigterm_and_half_dead_groups(tmp_path: Path) -> None:
    """A recorded service (a stand-in: a real one cannot be made to ignore SIGTERM on demand) whose
    leader is gone and whose remaining child ignores SIGTERM: down SIGKILLs the group."""
    settings = stack.StackSettings(state_dir=tmp_path / "state", project_dir=tmp_path, worker=True)
    settings.state_dir.mkdir()
    tag = f"{settings.state_dir}#worker"
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(600)"
    leader = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {child!r}]); "
         "sys.stdin.read()"],  # the leader waits for us; the child outlives it
        stdin=subprocess.PIPE, env={**os.environ, stack.TAG: tag}, start_new_session=True,
    )  # fmt: skip
    pgid = leader.pid
    while len(group_members(pgid)) < 2:
        time.sleep(0.1)
    record = {"pid": leader.pid, "pgid": pgid, "tag": tag, "port": 1, "url": "-", "log": "-", "started": 0}
    stack._write_state(settings, {"services": {"worker": record}})
    leader.communicate(b"")  # the leader exits; its child, in its group, lives on
    assert stack.status(settings)["services"]["worker"]["state"] == "half-dead"
    lines: list[str] = []
    stack.down(settings, say=lines.append, grace=1)
    assert group_members(pgid) == [], lines
    assert "half-dead" in lines[0] and f"process group {pgid}: 1 processes" in lines[0], lines


def test_down_stops_the_runs_a_pool_worker_started_in_sessions_of_their_own(tmp_path: Path) -> None:
    """A stand-in ``worker`` service whose child leads a session of its own (as Prefect's process worker
    starts each flow run) with a grandchild (the run's stage), and a stranger's session beside it:
    down stops the worker's run group with all in it, then the worker; the stranger lives on."""
    settings = stack.StackSettings(state_dir=tmp_path / "state", project_dir=tmp_path, worker=True)
    settings.state_dir.mkdir()
    tag = f"{settings.state_dir}#worker"
    sleep = "import time; time.sleep(600)"
    run = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleep!r}]); time.sleep(600)"
    leader = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {run!r}], "
         "start_new_session=True); print(p.pid, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, stack.TAG: tag}, start_new_session=True,
    )  # fmt: skip
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    run_group = int(leader.stdout.readline())
    try:
        while len(group_members(run_group)) < 2:
            time.sleep(0.1)
        record = {"pid": leader.pid, "pgid": leader.pid, "tag": tag, "port": 1, "url": "-", "log": "-", "started": 0}
        stack._write_state(settings, {"services": {"worker": record}})
        lines: list[str] = []
        stack.down(settings, say=lines.append, grace=5)
        assert lines[0] == f"worker   stopped its flow runs (process groups {run_group})", lines
        assert group_members(run_group) == [] and group_members(leader.pid) == [], lines
        assert stranger.poll() is None  # not the worker's: untouched
    finally:
        for group in (run_group, leader.pid, stranger.pid):
            if group_members(group):
                os.killpg(group, signal.SIGKILL)
        leader.wait()
        stranger.wait()
