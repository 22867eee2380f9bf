"""Files the local stack writes for its clients: secrets private, paths under the project, never ./mlflow.db."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from free import stack
from free.paths import in_project, project_root

REPO = Path(__file__).resolve().parents[1]


def test_dvc_config_local_holding_the_s3_secret_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FREE_S3_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("FREE_S3_SECRET_ACCESS_KEY", raising=False)
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    shutil.copy(REPO / ".dvc" / "config", project / ".dvc" / "config")
    settings = stack.StackSettings(state_dir=tmp_path / "state", project_dir=project)
    stack.configure_dvc_remote(settings)
    local = project / ".dvc" / "config.local"
    assert stack.credentials(settings)["AWS_SECRET_ACCESS_KEY"] in local.read_text()
    assert local.stat().st_mode & 0o777 == 0o600


def test_relative_folders_are_under_the_project_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FREE_STATE_DIR", raising=False)
    monkeypatch.delenv("FREE_CONFIG_DIR", raising=False)
    assert project_root() == REPO
    assert in_project("state") == REPO / "state" and in_project("/abs/x") == Path("/abs/x")
    settings = stack.StackSettings()
    assert settings.state_dir == REPO / "state" and settings.project_dir == REPO


def test_client_commands_never_fall_back_to_a_stray_mlflow_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(stack.StackError, match="free promote needs an MLflow server.*make stack-up"):
        stack.use_running_stack("free promote", state_dir=tmp_path / "no-stack")
    assert not (tmp_path / "mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert stack.use_running_stack("free promote", state_dir=tmp_path / "no-stack") == "http://tracking.example:5000"
