"""What every benchmark shares: the machine description, medians, peak memory, the result file.

A result file is JSON: ``{"benchmark", "created", "command", "machine", "versions", "config", ...numbers}``
so that a number can always be traced to the hardware, the library versions and the settings that
produced it. Results go under ``benchmarks/results/`` by default, a PNG plot beside each.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from free.artifacts import write_json

RESULTS_DIR = Path("benchmarks") / "results"


def machine() -> dict[str, Any]:
    """Where the numbers come from: CPU, cores, threads, memory, accelerator."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries the numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("free-pipeline", "torch", "torchvision", "prefect", "mlflow", "dvc"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def write_result(name: str, payload: dict[str, Any], out: Path | None, command: str) -> Path:
    """Write ``payload`` with the machine, versions and command to ``out`` (default
    ``benchmarks/results/<name>.json``); return the path."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    record = {
        "benchmark": name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(),
        "versions": versions(),
        **payload,
    }
    write_json(path, _finite(record))
    return path


def _finite(value: Any) -> Any:
    """JSON has no infinity: an unreached target is stored as ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def median(values: Iterable[float]) -> float:
    """Median where ``inf`` stands for "not reached": finite only if more than half were reached."""
    values = sorted(values)
    return statistics.median(values) if values else math.nan


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so host clocks measure device time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``(work(), seconds)``, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - start


class PeakMemory:
    """Peak memory of a block: device memory on CUDA, resident set size of the process on CPU.

    On Linux the kernel's high-water mark (``VmHWM``) is reset by writing ``5`` to
    ``/proc/self/clear_refs``, so the CPU peak is that of the block alone (plus what the process
    already held). Where that is impossible, ``reset`` is ``False`` and the peak is the process's.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = math.nan
        self.reset = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset = True
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.reset = True
            except OSError:
                self.reset = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mib = _proc_status_kib("VmHWM") / 1024


def rss_mib() -> float:
    """Resident set size of this process now."""
    return _proc_status_kib("VmRSS") / 1024


def _proc_status_kib(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def savefig(fig: Any, json_path: Path) -> Path:
    """Save a matplotlib figure beside its result file (same name, ``.png``)."""
    import matplotlib.pyplot as plt

    png = Path(json_path).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
