"""The ``free`` command line: help, config show, data build/info, and its error contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from free.cli import app

runner = CliRunner()


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "data" in result.output and "config" in result.output
    data_help = runner.invoke(app, ["data", "--help"])
    assert "build" in data_help.output and "info" in data_help.output


def test_python_dash_m_is_the_same_command() -> None:
    done = subprocess.run([sys.executable, "-m", "free", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "free-pipeline" in done.stdout


def test_config_show_prints_resolved_yaml() -> None:
    result = runner.invoke(app, ["config", "show", "experiment=tiny", "seed=7"])
    assert result.exit_code == 0
    assert "seed: 7" in result.output and "n_teachers: 4" in result.output


def test_config_show_unknown_key_fails_clearly() -> None:
    result = runner.invoke(app, ["config", "show", "no_such_key=1"])
    assert result.exit_code == 2
    assert "config error" in result.output and "no_such_key" in result.output
    assert "Traceback" not in result.output


def test_data_info_missing_data_exits_1(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "info", f"dataset.root={tmp_path}/none"])
    assert result.exit_code == 1
    assert "data error" in result.output and "not found" in result.output


def test_data_build_writes_manifest_then_info_json(fake_omniglot: Path, tmp_path: Path) -> None:
    args = [f"dataset.root={fake_omniglot}", f"paths.artifacts_dir={tmp_path}/artifacts"]
    built = runner.invoke(app, ["data", "build", *args])
    assert built.exit_code == 0, built.output
    assert "24 classes" in built.output and "decoded" in built.output
    manifest = json.loads((tmp_path / "artifacts" / "data" / "splits.json").read_text())
    classes = manifest["classes"]
    assert sum(len(names) for names in classes.values()) == 24
    assert not set(classes["test"]) & (set(classes["train"]) | set(classes["val"]))
    assert "root" not in manifest["settings"]  # no machine-specific paths in a versioned artifact
    again = runner.invoke(app, ["data", "build", *args])
    assert "cached already" in again.output
    result = runner.invoke(app, ["data", "info", "--json", *args, "dataset.split.train=0.5", "dataset.split.val=0.25"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert [row["classes"] for row in info["splits"]] == [12, 6, 6]
    assert sum(row["images"] for row in info["splits"]) == 24 * 4


@pytest.mark.data
def test_data_info_real_omniglot(real_omniglot_root: Path) -> None:
    result = runner.invoke(app, ["data", "info", f"dataset.root={real_omniglot_root}"])
    assert result.exit_code == 0, result.output
    for needle in ("train", "150", "val", "40", "test", "52", "images_background_small1.zip"):
        assert needle in result.output


@pytest.mark.data
def test_one_line_episode_from_the_meta_test_split(real_omniglot_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FREE_DATA_DIR", str(real_omniglot_root.parent))
    from free.data import load_split

    episode = load_split("test").sample_episode(n_way=5, k_shot=1)
    assert episode.support_x.shape == (5, 1, 28, 28) and episode.query_x.shape == (75, 1, 28, 28)
    test_classes = set(load_split("test").class_names)
    train_classes = set(load_split("train").class_names)
    assert not test_classes & train_classes


def test_config_params_starts_from_the_committed_tiny_preset(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "params.yaml"
    assert runner.invoke(app, ["config", "params", "--out", str(out)]).exit_code == 0
    assert out.read_text() == (repo / "params.yaml").read_text()  # back to the committed defaults
    assert runner.invoke(app, ["config", "params", "--out", str(out), "evaluate.episodes=30"]).exit_code == 0
    assert "episodes: 30" in out.read_text() and "n_teachers: 4" in out.read_text()  # tiny + the override
    assert runner.invoke(app, ["config", "params", "--out", str(out), "~experiment"]).exit_code == 0
    assert "episodes: 600" in out.read_text()  # the bare params/config.yaml defaults
    bad = runner.invoke(app, ["config", "params", "--out", str(out), "experiment=null"])
    assert bad.exit_code == 2 and "config error" in bad.output  # one line, no traceback
