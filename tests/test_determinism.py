"""Same numbers on any machine of the same kind: the tiny preset pins torch's intra-op threads, so the
result does not follow the machine's core count (or ``OMP_NUM_THREADS``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.data


def _teacher_sha256(tmp_path: Path, machine_threads: int, threads: str, cache: Path) -> str:
    """Train one small teacher in a fresh process on a machine that offers ``machine_threads``."""
    out = tmp_path / f"omp{machine_threads}-threads{threads}"
    argv = [sys.executable, "-m", "free", "teachers", "experiment=tiny", "teachers.n_teachers=1",
            "inversion.teachers_per_step=1", "teachers.max_epochs=2", f"threads={threads}",
            f"paths.artifacts_dir={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(machine_threads), "FREE_CACHE_DIR": str(cache)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return hashlib.sha256((out / "teachers" / "teacher_000.safetensors").read_bytes()).hexdigest()


def test_pinned_threads_give_the_same_bits_whatever_the_machine_offers(
    tmp_path: Path, real_omniglot_root: Path
) -> None:
    cache = tmp_path / "cache"
    # Unpinned, the weights follow the machine: 1 thread and 3 threads sum in different orders.
    assert _teacher_sha256(tmp_path, 1, "null", cache) != _teacher_sha256(tmp_path, 3, "null", cache)
    # Pinned (as the tiny preset does), they do not.
    assert _teacher_sha256(tmp_path, 1, "2", cache) == _teacher_sha256(tmp_path, 3, "2", cache)


def test_the_tiny_preset_pins_its_threads() -> None:
    from free.config import compose

    assert compose(["experiment=tiny"]).threads == 2
