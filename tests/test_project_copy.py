"""Tests that run the project copy it from git: what a user ran before must not leak into them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from free.bench.pipeline import copy_project

REPO = Path(__file__).resolve().parents[1]


def test_copy_takes_the_code_not_the_users_runs(tmp_path: Path) -> None:
    user = tmp_path / "user"
    copy_project(REPO, user)
    committed = (user / "params.yaml").read_text()
    # What following the README leaves behind: an overridden params.yaml, services' state, outputs,
    # run records, machine credentials; plus a new file of the change under test, staged, not committed.
    (user / "params.yaml").write_text(committed.replace("episodes: 20", "episodes: 25"))
    (user / "state").mkdir()
    (user / "state" / "stack.json").write_text("{}")
    (user / "artifacts" / "metrics").mkdir(parents=True, exist_ok=True)
    (user / "artifacts" / "metrics" / "metatest.json").write_text("{}")
    (user / ".dvc" / "config.local").write_text("[core]\n")
    (user / "dvc.lock").write_text("schema: '2.0'\n")
    (user / "free" / "new_module.py").write_text("X = 1\n")
    subprocess.run(["git", "add", "free/new_module.py"], cwd=user, check=True)

    test_copy = tmp_path / "test"
    copy_project(user, test_copy)
    assert (test_copy / "params.yaml").read_text() == committed  # the defaults, whatever the user ran
    assert (test_copy / "free" / "new_module.py").read_text() == "X = 1\n"
    for leftover in ("state", "artifacts/metrics/metatest.json", "dvc.lock", ".dvc/config.local"):
        assert not (test_copy / leftover).exists(), leftover
    assert (test_copy / "data" / "omniglot" / "images_background_small1.zip").is_file()  # data travels with the code
    status = subprocess.run(["git", "status", "--porcelain"], cwd=test_copy, capture_output=True, text=True, check=True)
    assert status.stdout == ""


def test_copy_with_overrides_runs_the_tiny_preset_with_them(tmp_path: Path) -> None:
    """`free bench pipeline metalearn.iterations=100`: each copy's params.yaml is that composition,
    the one the deployment run composes from its parameters."""
    from free.config import params_yaml, with_default_experiment

    copy_project(REPO, tmp_path / "copy", ["metalearn.iterations=7"])
    written = (tmp_path / "copy" / "params.yaml").read_text()
    assert written == params_yaml(with_default_experiment(["metalearn.iterations=7"]))
    assert "iterations: 7" in written and written != (REPO / "params.yaml").read_text()


def test_bench_pipeline_rejects_a_bad_override_before_copying_anything(tmp_path: Path) -> None:
    import pytest

    from free.bench import pipeline
    from free.config import ConfigError

    with pytest.raises(ConfigError, match="metalearn.iteratoins"):
        pipeline.run(REPO, tmp_path / "work", tmp_path / "cache", overrides=["metalearn.iteratoins=7"])
    assert not (tmp_path / "work" / "bare").exists()
