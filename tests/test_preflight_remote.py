"""The preflight cross-checks the DVC remote against ``storage.*`` (issue 14, item 5): params/storage/*.yaml say
the remote must be ``s3://<bucket>/<dvc_prefix>`` (at ``s3_endpoint_url`` when set); a remote elsewhere gives a
WARNING line naming both values and where each is set, never a failure. Temporary ``.dvc/config`` files,
no service (push=False, prefect=False: no probe); seconds in all.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows import preflight
from free.config.schema import StorageConfig

ENDPOINT = "https://s3.team.example"


@pytest.fixture(autouse=True)
def no_endpoint_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "FREE_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def _dvc(project: Path, url: str, endpoint: str = "", local: dict[str, str] | None = None) -> Path:
    (project / ".dvc").mkdir(exist_ok=True)
    lines = ["[core]", "    remote = cloud", "['remote \"cloud\"']", f"    url = {url}"]
    lines += [f"    endpointurl = {endpoint}"] if endpoint else []
    (project / ".dvc" / "config").write_text("\n".join(lines) + "\n")
    if local:
        body = "".join(f"    {k} = {v}\n" for k, v in local.items())
        (project / ".dvc" / "config.local").write_text(f"['remote \"cloud\"']\n{body}")
    return project


def _storage(endpoint: str = ENDPOINT, bucket: str = "team", prefix: str = "free/dvc") -> StorageConfig:
    return StorageConfig(s3_endpoint_url=endpoint, bucket=bucket, dvc_prefix=prefix)


def _lines(project: Path, storage: StorageConfig | None) -> list[str]:
    return preflight.check(project, "file:./mlruns", push=False, prefect=False, storage=storage)


def test_a_matching_remote_gives_no_warning(tmp_path: Path) -> None:
    _dvc(tmp_path, "s3://team/free/dvc/", ENDPOINT + "/")  # trailing slashes are the same place
    assert preflight.remote_mismatch(tmp_path, _storage()) == []
    assert not any("WARNING" in line for line in _lines(tmp_path, _storage(prefix="/free/dvc/")))


def test_another_bucket_warns_naming_both_and_where_each_is_set(tmp_path: Path) -> None:
    _dvc(tmp_path, "s3://mirror/free/dvc", ENDPOINT)
    lines = _lines(tmp_path, _storage())
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1, lines
    assert "s3://mirror/free/dvc (.dvc/config)" in warnings[0] and "s3://team/free/dvc" in warnings[0]
    assert "params/storage/" in warnings[0] and "dvc remote modify cloud url s3://team/free/dvc" in warnings[0]


def test_a_url_from_config_local_is_named_there(tmp_path: Path) -> None:
    _dvc(tmp_path, "s3://team/free/dvc", ENDPOINT, local={"url": "s3://team/other"})
    (warning,) = preflight.remote_mismatch(tmp_path, _storage())
    assert "s3://team/other (.dvc/config.local)" in warning


def test_another_endpoint_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _dvc(tmp_path, "s3://team/free/dvc", "http://127.0.0.1:8333")
    (warning,) = preflight.remote_mismatch(tmp_path, _storage())
    assert "http://127.0.0.1:8333 (endpointurl of DVC remote cloud, .dvc/config)" in warning
    assert f"storage.s3_endpoint_url is {ENDPOINT} (params/storage/<choice>.yaml)" in warning
    monkeypatch.setenv("FREE_S3_ENDPOINT_URL", ENDPOINT)  # the config takes it from there: named as its source
    assert "(FREE_S3_ENDPOINT_URL)" in preflight.remote_mismatch(tmp_path, _storage())[0]


def test_a_remote_without_endpoint_against_a_configured_one_warns(tmp_path: Path) -> None:
    _dvc(tmp_path, "s3://team/free/dvc")
    (warning,) = preflight.remote_mismatch(tmp_path, _storage())
    assert "(AWS)" in warning and "has no endpointurl" in warning


def test_aws_own_endpoint_in_storage_accepts_any_remote_endpoint(tmp_path: Path) -> None:
    """storage=s3 leaves s3_endpoint_url "" (AWS's own, or set by FREE_S3_ENDPOINT_URL): nothing to compare."""
    _dvc(tmp_path, "s3://team/free/dvc", "http://127.0.0.1:8333")
    assert preflight.remote_mismatch(tmp_path, _storage(endpoint="")) == []


def test_no_storage_or_a_remote_not_on_s3_gives_no_warning(tmp_path: Path) -> None:
    _dvc(tmp_path, "s3://mirror/elsewhere", "http://127.0.0.1:1")
    assert not any("WARNING" in line for line in _lines(tmp_path, None))  # today's call: unchanged
    _dvc(tmp_path, "/mnt/dvc-store")
    assert preflight.remote_mismatch(tmp_path, _storage()) == []
