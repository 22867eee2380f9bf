"""Checks a pipeline run makes before it touches the working tree.

:func:`ensure_dvc_idle` refuses to start while another DVC command works on the project: a run
rewrites ``params.yaml`` (a tracked file and a dependency of every stage), and doing that under a
running stage would give its outputs parameters that did not make them (issue 13: a run started by
a restarted worker rewrote ``params.yaml`` under an orphaned ``dvc repro`` of the killed one).

DVC has two locks, and a running ``dvc repro`` always holds at least one of them (checked on DVC
3.67): the repository lock ``.dvc/tmp/lock`` (``dvc.lock.Lock``, a ``zc.lockfile`` holding the
holder's PID) while DVC itself reads and writes, and, while a stage's command runs (DVC releases
the repository lock then, so that the command may call DVC), entries in ``.dvc/tmp/rwlock`` naming
the PID and command line of the ``dvc`` process that reads the stage's dependencies and writes its
outputs. So the check takes the repository lock (DVC's own object, with the project's settings)
and, holding it, reads the rwlock: nothing can move from one lock to the other in between.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil

from free.paths import project_root

RWLOCK = Path(".dvc") / "tmp" / "rwlock"
REPO_LOCK = Path(".dvc") / "tmp" / "lock"


class RepoBusy(RuntimeError):
    """Another DVC process works on the project; the message names it and the way out."""


def ensure_dvc_idle(project: Path | None = None) -> None:
    """Return if no DVC process holds the project's repository lock or a stage's rwlock entries.

    Takes DVC's repository lock for a moment (waiting at most DVC's own 3 s when it is held) and
    releases it at once; writes nothing else.

    Raises:
        RepoBusy: another DVC process holds a lock; names its PID and command line, what it writes,
            and what to do.
    """
    from dvc.lock import LockError
    from dvc.repo import Repo

    project = Path(project or project_root())
    repo = Repo(str(project))  # DVC's own lock object: the project's core.hardlink_lock setting applies
    try:
        try:
            repo.lock.lock()
        except LockError:
            raise RepoBusy(_busy_message(project, _repo_lock_holder(project), what=None)) from None
        try:
            writers = live_rwlock_holders(project)
        finally:
            repo.lock.unlock()
    finally:
        repo.close()
    if writers:
        (pid, cmd), paths = next(iter(writers.items()))
        raise RepoBusy(_busy_message(project, (pid, cmd), what=paths))


def live_rwlock_holders(project: Path) -> dict[tuple[int, str], list[str]]:
    """``{(pid, command line): [paths it reads or writes]}`` of the live processes in DVC's rwlock
    (entries of dead processes are stale: DVC itself ignores them)."""
    path = project / RWLOCK
    try:
        lock = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError:
        lock = {}  # DVC rewrites it in place: caught mid-write; an empty file means no holder either
    holders: dict[tuple[int, str], list[str]] = {}
    entries = [(p, i) for p, i in lock.get("write", {}).items()]
    entries += [(p, i) for p, infos in lock.get("read", {}).items() for i in infos]
    for target, info in entries:
        pid = int(info.get("pid", 0))
        if _alive(pid):
            holders.setdefault((pid, str(info.get("cmd", "?"))), []).append(_relative(target, project))
    return holders


def _repo_lock_holder(project: Path) -> tuple[int, str] | None:
    """(pid, command line) written into ``.dvc/tmp/lock`` by ``zc.lockfile`` (`` 1234\\n``), when alive."""
    try:
        pid = int((project / REPO_LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # a hardlink lock (core.hardlink_lock) keeps no PID there
    return (pid, _cmdline(pid)) if _alive(pid) else None


def _busy_message(project: Path, holder: tuple[int, str] | None, what: list[str] | None) -> str:
    who = f"pid {holder[0]} ({holder[1]})" if holder else "another DVC process (its PID is not recorded)"
    lock = f"holds DVC's locks on {', '.join(sorted(set(what)))}" if what else f"holds {project / REPO_LOCK}"
    fix = (
        f"wait for it to finish, or stop it with its process group (`kill -TERM -- -{_pgid(holder[0])}`), "
        "then run again; a run left behind by a killed worker is stopped by `free stack up`"
        if holder
        else "wait for it to finish (`ps` shows `dvc` processes), then run again"
    )
    return (
        f"{project}: {who} {lock}. This run changed nothing (params.yaml untouched): rewriting params.yaml "
        f"under a running stage would give its outputs parameters that did not make them. Fix: {fix}."
    )


def _alive(pid: int) -> bool:
    try:
        return pid > 0 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:200] or "?"
    except psutil.Error:
        return "?"


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return pid


def _relative(target: str, project: Path) -> str:
    try:
        return str(Path(target).relative_to(project))
    except ValueError:
        return target
