"""Shared fixtures: isolated caches, a small Omniglot in the real archive format, the real archives."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# `make test` runs two pytest workers, so two tests' torch processes can share the 2 cores. OpenMP's
# default spin-waiting then lets one process's idle threads starve the other's (10x slower, measured
# with two Dask workers: flows/fanout.py). Passive waiting changes no number, only who waits how; set
# before any test imports torch, and inherited by every process a test starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own tensor cache, so no test sees another's (or the user's) cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("FREE_CACHE_DIR", str(cache))
    return cache


def _png(seed: int, size: int = 105) -> bytes:
    """A black-on-white 1-bit PNG like Omniglot's, with a random blob so images differ."""
    rng = np.random.default_rng(seed)
    pixels = np.full((size, size), 255, dtype=np.uint8)
    y, x = rng.integers(10, size - 30, size=2)
    pixels[y : y + 20, x : x + 20] = 0
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def write_omniglot_archive(path: Path, alphabets: dict[str, int], drawers: int = 4, seed: int = 0) -> Path:
    """Write ``path`` (e.g. ``images_background_small1.zip``) in Omniglot's layout:
    ``<stem>/<alphabet>/characterNN/<id>_<drawer>.png``. The same (alphabet, character, drawer)
    gives the same image in every archive, as in the real duplicated Greek/Latin sets."""
    stem = path.stem
    with zipfile.ZipFile(path, "w") as zf:
        for a_idx, (alphabet, n_chars) in enumerate(sorted(alphabets.items())):
            for c in range(1, n_chars + 1):
                for d in range(1, drawers + 1):
                    image_seed = hash((alphabet, c, d, seed)) % (2**32)
                    zf.writestr(f"{stem}/{alphabet}/character{c:02d}/{a_idx:02d}{c:02d}_{d:02d}.png", _png(image_seed))
    return path


@pytest.fixture
def fake_omniglot(tmp_path: Path) -> Path:
    """Two small archives (with their SHA256SUMS) sharing the alphabet 'Greek' (deduplicated on load): 4 alphabets, 24
    distinct characters (Greek 6, Alpha 5, Beta 6, Gamma 7), 4 drawers each."""
    return write_fake_omniglot(tmp_path / "omniglot")


def write_fake_omniglot(root: Path) -> Path:
    """The archives of :func:`fake_omniglot` in the new folder ``root``."""
    root.mkdir()
    write_omniglot_archive(root / "images_background_small1.zip", {"Greek": 6, "Alpha": 5})
    write_omniglot_archive(root / "images_background_small2.zip", {"Greek": 6, "Beta": 6, "Gamma": 7})
    write_sha256sums(root)
    return root


def write_sha256sums(folder: Path) -> None:
    """List the archives' digests next to them, as the real data folder does."""
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(folder.glob("*.zip"))]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def real_omniglot_root() -> Path:
    """The real offline Omniglot archives (``$FREE_DATA_DIR/omniglot``, else the copy shipped in ``data/omniglot``).

    Skipped where they are absent, except under ``FREE_REQUIRE_DATA=1`` (set by CI), where absence fails.
    """
    candidates = [Path(os.environ["FREE_DATA_DIR"]) / "omniglot"] if os.environ.get("FREE_DATA_DIR") else []
    candidates.append(REPO / "data" / "omniglot")
    for root in candidates:
        if (root / "images_background_small1.zip").is_file():
            return root
    message = f"real Omniglot archives not found in {[str(c) for c in candidates]}"
    if os.environ.get("FREE_REQUIRE_DATA") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch's intra-op threads pinned to 1 for the test, then set back.

    The in-process tests run models of a few thousand weights, where a second thread only adds
    synchronisation: with two threads on 2 busy cores a Conv4-8 forward took 88 ms instead of 3 ms,
    and test_evaluate.py 70 s instead of 14 s. It also makes a test's speed independent of the
    thread count an earlier test (a stage with ``threads=2``) left in the pytest process.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fake_metatrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(archives, artifacts)``: a fake Omniglot and an unbroken run of ``tests.helpers_stages.FAKE``
    through metatrain on it, built once per session for the tests that break a run and compare it with
    the unbroken one (about 5 s each time). A shared reference: copy what a test writes to."""
    from free.stages import metatrain
    from tests.helpers_stages import fake_inputs

    base = tmp_path_factory.mktemp("fake-metatrained")
    root = write_fake_omniglot(base / "omniglot")
    with pytest.MonkeyPatch.context() as env:  # session-scoped: no test's isolated cache exists yet
        env.setenv("FREE_CACHE_DIR", str(base / "cache"))
        metatrain.run(fake_inputs(root, base / "artifacts"))
    return root, base / "artifacts"
