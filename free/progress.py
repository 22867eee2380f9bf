"""Progress bars for long work, on stderr so that stdout stays parseable (``--json``).

The core takes an optional ``progress(iterable, description, total)`` callable and never draws
anything itself; entry points (CLI, stages) pass :func:`bar`.

With ``$FREE_PROGRESS_FILE`` set, :func:`bar` also keeps that file up to date (JSON: description,
completed, total), at most once a second: the Prefect flow reads it to show a progress artifact
while a stage runs in a DVC subprocess.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
_console = Console(stderr=True)


def bar(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield from ``iterable`` while drawing a progress bar with count, elapsed and remaining time."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    report, completed = _reporter(description, total), 0
    with Progress(*columns, console=_console, transient=False) as progress:
        for item in progress.track(iterable, total=total, description=description):
            report(completed)
            yield item
            completed += 1
    report(completed, force=True)


def _reporter(description: str, total: int | None):
    path = os.environ.get("FREE_PROGRESS_FILE")
    last = [0.0]

    def report(completed: int, force: bool = False) -> None:
        if not path or (not force and time.monotonic() - last[0] < 1.0):
            return
        last[0] = time.monotonic()
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps({"description": description, "completed": completed, "total": total}))
        tmp.replace(target)

    return report
