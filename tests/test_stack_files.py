"""Files the local stack writes for its clients: secrets private, paths under the project, never ./mlflow.db."""

from __future__ import annotations

import shutil
import subprocess
import sys
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
    local = project / ".dvc" / "config.local"
    # A user's own local setting and an old world-readable file with a stale remote.
    local.write_text("[core]\n    autostage = true\n['remote \"local-s3\"']\n    url = s3://old/dvc\n")
    local.chmod(0o644)
    settings = stack.StackSettings(state_dir=tmp_path / "state", project_dir=project)
    stack.configure_dvc_remote(settings)
    creds = stack.credentials(settings)
    assert local.stat().st_mode & 0o777 == 0o600
    assert (settings.state_dir / "credentials.env").stat().st_mode & 0o777 == 0o600
    # Written directly (no `dvc remote modify … secret_access_key <secret>` command line); DVC reads it.
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "config", "--local", "--list"], cwd=project, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert sorted(shown.stdout.splitlines()) == sorted([
        "core.autostage=true",
        "remote.local-s3.url=s3://free/dvc",
        f"remote.local-s3.endpointurl={settings.s3_endpoint_url}",
        f"remote.local-s3.access_key_id={creds['AWS_ACCESS_KEY_ID']}",
        f"remote.local-s3.secret_access_key={creds['AWS_SECRET_ACCESS_KEY']}",
    ])  # fmt: skip


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
