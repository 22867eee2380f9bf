"""`make run`'s preflight (infra/preflight.py): each check fails with its fix, in seconds, before any install."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from free.stack import free_port_block

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "preflight.py"


def preflight(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    port = free_port_block(12)
    base = {
        "PATH": os.environ["PATH"],
        "PYTHON": sys.executable,
        "FREE_STATE_DIR": str(tmp_path / "state"),
        "FREE_PREFECT_PORT": str(port),
        "FREE_MLFLOW_PORT": str(port + 1),
        "FREE_S3_PORT": str(port + 2),
        "FREE_S3_AUX_PORT": str(port + 3),
    }
    # No virtual environment of ours: the script must run on the bare system Python, standard library only.
    return subprocess.run(
        [sys.executable, "-I", str(SCRIPT), *args], env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def test_passes_on_the_shipped_data_and_free_ports(tmp_path: Path) -> None:
    done = preflight(tmp_path, "--need-gb", "0")
    assert done.returncode == 0, done.stderr
    assert "preflight: ok" in done.stdout and str(REPO / "data" / "omniglot") in done.stdout


def test_missing_or_corrupt_archives_name_the_file_and_the_fix(tmp_path: Path) -> None:
    missing = preflight(tmp_path, "--need-gb", "0", FREE_DATA_DIR=str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert "images_background_small1.zip" in missing.stderr and "git checkout -- data/omniglot" in missing.stderr
    copy = tmp_path / "data" / "omniglot"
    shutil.copytree(REPO / "data" / "omniglot", copy)
    blob = bytearray((copy / "images_background_small2.zip").read_bytes())
    blob[1000] ^= 0xFF
    (copy / "images_background_small2.zip").write_bytes(bytes(blob))
    corrupt = preflight(tmp_path, "--need-gb", "0", FREE_DATA_DIR=str(tmp_path / "data"))
    assert corrupt.returncode == 1
    assert "images_background_small2.zip does not match its SHA256SUMS" in corrupt.stderr
    assert "small1" not in corrupt.stderr


def test_a_taken_port_is_named_unless_our_own_stack_holds_it(tmp_path: Path) -> None:
    port = free_port_block(12)
    ports = {"FREE_PREFECT_PORT": str(port), "FREE_MLFLOW_PORT": str(port + 1), "FREE_S3_PORT": str(port + 2),
             "FREE_S3_AUX_PORT": str(port + 3)}  # fmt: skip
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port + 1))
        squatter.listen()
        taken = preflight(tmp_path, "--need-gb", "0", **ports)
        assert taken.returncode == 1
        assert f"port {port + 1} " in taken.stderr and "mlflow" in taken.stderr and "FREE_MLFLOW_PORT" in taken.stderr
        # The same port held by this project's running stack (a live PID recorded in stack.json) is fine.
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / "stack.json").write_text(json.dumps({"services": {"mlflow": {"pid": os.getpid()}}}))
        assert preflight(tmp_path, "--need-gb", "0", **ports).returncode == 0


def test_too_little_disk_and_a_missing_python_fail(tmp_path: Path) -> None:
    disk = preflight(tmp_path, "--need-gb", "1000000")
    assert disk.returncode == 1 and "GB free" in disk.stderr
    python = preflight(tmp_path, "--need-gb", "0", PYTHON="python3.11-not-installed")
    assert python.returncode == 1 and "python3.11-not-installed not found" in python.stderr


@pytest.mark.parametrize("target", ["run", "stack-up"])
def test_make_runs_preflight_before_setup(target: str) -> None:
    plan = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert plan.index("infra/preflight.py") < plan.index("setup")
