"""What a process forked from a forkserver needs to look and end like the process it replaces.

Used for the stages (:mod:`flows.stage_process`) and for the flow runs (:mod:`flows.warm_runs`): each
is forked from a forkserver that imported the heavy libraries once, and each stands for a command
(``python -m free ...``, ``python -m prefect.engine``) that would otherwise start a fresh interpreter.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def main_unnamed() -> Iterator[None]:
    """Without a name or file on ``__main__`` while a process starts: multiprocessing would otherwise have
    the child import this process's main module first (as ``__mp_main__``). A flow run's main is
    Prefect's runner (``flows.serve``, ``prefect.engine``): importing Prefect, MLflow and the flow cost
    each stage 1-2.5 s. The children here run a function of their own, which needs none of it."""
    main = sys.modules["__main__"]
    saved = {key: main.__dict__[key] for key in ("__spec__", "__file__") if key in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        for key in ("__spec__", "__file__"):
            if key in saved:
                main.__dict__[key] = saved[key]
            else:
                main.__dict__.pop(key, None)


def set_title(title: str) -> None:
    """Show ``title`` as this process's command line (``ps``, psutil's ``cmdline()``): a forked child
    would otherwise show its forkserver's. Call it before ``os.environ`` changes (setproctitle reads the
    C environment when it starts). With ``SPT_NOENV`` it writes argv's space only: the environment stays
    readable in /proc, where recovery finds a run's processes by ``$FREE_FLOW_RUN_ID``."""
    os.environ["SPT_NOENV"] = "1"
    import setproctitle

    setproctitle.setproctitle(title)


def finish_as_interpreter() -> None:
    """End as an interpreter does: wait for non-daemon threads (and what they registered to run then:
    Prefect's log and event flushes), then the atexit handlers (log handlers, a Dask cluster's close).
    multiprocessing ends its children with ``os._exit``, which skips both."""
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()


def mark_environ(name: str, value: str) -> bool:
    """Make ``/proc/<pid>/environ`` of this process, and of every process forked from it later, read
    ``name=value``. Returns whether it could.

    That file is the environment block the process was exec'd with, whatever ``os.environ`` says now:
    a process forked from a forkserver shows its forkserver's, and nothing it sets there shows. Recovery
    finds a flow run's processes by ``$FREE_FLOW_RUN_ID`` in it (:func:`flows.recovery.run_processes`).
    So the block itself is overwritten, in place, with the one variable (the rest zeroed). Call it only
    after ``os.environ`` was replaced as a whole (``clear()`` then ``update()``): the C library's
    environment then lives in copies of its own, and nothing reads the old block any more."""
    import ctypes

    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[50 - 3]), int(fields[51 - 3])  # env_start, env_end (proc(5): fields 50, 51)
    except (OSError, IndexError, ValueError):
        return False
    text = f"{name}={value}".encode() + b"\0"
    if not start or end - start < len(text):
        return False
    ctypes.memset(start, 0, end - start)
    ctypes.memmove(start, text, len(text))
    return True
