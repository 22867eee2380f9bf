"""Checks before `make run` installs or starts anything: fail in seconds, with the fix, not minutes later.

Standard library only (it runs before the virtual environment exists):

    python3 infra/preflight.py [--need-gb N]

Checks, each printed with what to do when it fails:

* the Python that `make setup` uses (``$PYTHON``, default ``python3.11``) is on PATH;
* the Omniglot archives the default presets read are present and match their ``SHA256SUMS``
  (``$FREE_DATA_DIR/omniglot``, else the copy shipped in ``data/omniglot``);
* the local stack's ports are free on 127.0.0.1 (``FREE_PREFECT_PORT`` 4200, ``FREE_MLFLOW_PORT``
  5000, ``FREE_S3_PORT`` 8333, ``FREE_S3_AUX_PORT`` 18334..18342), unless this project's own stack
  already holds them (its process groups are recorded in ``state/stack.json``, and ``make run``
  reuses or restarts it);
* enough free disk for the virtual environment (≈ 7 GB when it is not installed yet) and a run.

Exit 0 when all pass, 1 otherwise (every failed check listed, on stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# free.paths is standard library only (free/__init__.py imports nothing): the same rule for relative
# folders as the stack and the config, without the virtual environment.
from free.paths import in_project  # noqa: E402

HOST = "127.0.0.1"
AUX_PORTS = 9  # weed mini's master, volume, filer, admin ports (see free/stack.py)
ARCHIVES = ("images_background_small1.zip", "images_background_small2.zip")
FULL_ARCHIVES = ("images_background.zip", "images_evaluation.zip")


def check_python() -> list[str]:
    python = os.environ.get("PYTHON", "python3.11")
    if shutil.which(python):
        return []
    return [f"{python} not found on PATH: free-pipeline needs Python 3.11 (or `make PYTHON=/path/to/python3.11 run`)"]


def data_root() -> Path:
    return in_project(os.environ.get("FREE_DATA_DIR") or "data") / "omniglot"


def check_data(root: Path) -> list[str]:
    """The offline archives are there and intact (the same check the loader makes, seconds earlier)."""
    for folder in (root, root / "omniglot-py"):
        if all((folder / name).exists() for name in FULL_ARCHIVES):
            return []  # the full set (e.g. downloaded by torchvision): the loader verifies its md5s
    missing = [name for name in ARCHIVES if not (root / name).exists()]
    if missing:
        return [
            f"Omniglot archives missing in {root}: {', '.join(missing)}. They ship with the project in "
            "data/omniglot/ (restore them with `git checkout -- data/omniglot`), or point FREE_DATA_DIR at "
            "a folder whose omniglot/ subfolder holds them."
        ]
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        return []
    expected = dict(reversed(line.split(None, 1)) for line in sums.read_text().splitlines() if line.strip())
    problems = []
    for name in ARCHIVES:
        path = root / name
        if path.is_file() and expected.get(name) and _sha256(path) != expected[name]:
            problems.append(f"{path} does not match its SHA256SUMS entry (corrupt or replaced): restore it with "
                            "`git checkout -- data/omniglot` or copy the original archive there")  # fmt: skip
    return problems


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stack_ports() -> dict[str, list[int]]:
    """The ports `free stack up` will take, per service, from the same variables it reads."""
    aux = int(os.environ.get("FREE_S3_AUX_PORT", 18334))
    return {
        "prefect": [int(os.environ.get("FREE_PREFECT_PORT", 4200))],
        "mlflow": [int(os.environ.get("FREE_MLFLOW_PORT", 5000))],
        "s3": [int(os.environ.get("FREE_S3_PORT", 8333)), *range(aux, aux + AUX_PORTS)],
    }


def our_running_services(state_dir: Path) -> set[str]:
    """Services of this project's stack whose recorded process group has a live process (their ports
    are ours: a half-dead service, its leader gone, is restarted by `free stack up`, not reported)."""
    path = state_dir / "stack.json"
    try:
        recorded = json.loads(path.read_text()).get("services", {})
    except (OSError, ValueError):
        return set()
    alive = set()
    for name, record in recorded.items():
        try:
            pid = int(record["pid"])
            pgid = int(record.get("pgid") or pid)
        except (KeyError, TypeError, ValueError):
            continue
        if _exists(os.kill, pid) or _exists(os.killpg, pgid):  # the leader, or what is left of its group
            alive.add(name)
    return alive


def _exists(send, target: int) -> bool:
    """Whether signal 0 reaches ``target`` through ``send`` (``os.kill``: a PID; ``os.killpg``: a group)."""
    try:
        send(target, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


ENV_OF = {"prefect": "FREE_PREFECT_PORT", "mlflow": "FREE_MLFLOW_PORT", "s3": "FREE_S3_PORT / FREE_S3_AUX_PORT"}


def check_ports(state_dir: Path) -> list[str]:
    ours = our_running_services(state_dir)
    problems = []
    for service, ports in stack_ports().items():
        if service in ours:
            continue  # our own stack holds them; `free stack up` keeps it
        taken = [p for p in ports if not port_free(p)]
        if taken:
            variable = ENV_OF[service].split(" / ")[0]
            problems.append(
                f"port {', '.join(map(str, taken))} on {HOST} (for the stack's {service} server) is taken by another "
                f"program: stop it, or choose other ports, e.g. `{variable}=<free port> make run`"
            )
    return problems


def check_disk(need_gb: float) -> list[str]:
    free_gb = shutil.disk_usage(ROOT).free / 2**30
    if free_gb >= need_gb:
        return []
    return [f"only {free_gb:.1f} GB free on the disk of {ROOT}; need about {need_gb:.0f} GB (free some space first)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--need-gb", type=float, help="free disk needed (default: 7 before .venv is set up, else 1)")
    args = parser.parse_args(argv)
    venv_ready = (ROOT / os.environ.get("VENV", ".venv") / ".setup-complete").is_file()
    need_gb = args.need_gb if args.need_gb is not None else (1.0 if venv_ready else 7.0)
    state_dir = in_project(os.environ.get("FREE_STATE_DIR", "state"))
    problems = [*check_python(), *check_data(data_root()), *check_ports(state_dir), *check_disk(need_gb)]
    if problems:
        print(f"preflight: {len(problems)} problem(s) before anything is installed or started:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"preflight: ok (Omniglot in {data_root()}, stack ports free or ours, {need_gb:.0f}+ GB disk free)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
