"""Where runner=dask's task results go (issue 14, item 1): S3 whenever the flow talks to a Prefect API and
botocore finds credentials (keys in the environment, or an AWS profile in ``~/.aws``), with the configured
endpoint or AWS's own; the local Prefect home otherwise, which a remote Dask cluster cannot use.

botocore resolves the credentials for real, in a private ``HOME`` with no ``AWS_*`` setting of this machine
(instance metadata off, so the answer does not depend on where the tests run). Seconds in all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flows.fanout import FanOutError, results_block, results_location
from free.config import Config, compose

API = "http://127.0.0.1:4200/api"  # never called: the decision only needs to know a server is configured
KEY_ID, SECRET = "FANOUTFAKE" + "KEYID7Q2", "fanout-fake-secret" + "-5d1e9b"


@pytest.fixture(autouse=True)
def no_aws_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home of its own and none of this machine's AWS settings; returns the home."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role look-up (1 s, or a real role)
    return home


def _cfg(endpoint: str = "http://127.0.0.1:8333", address: str | None = None) -> Config:
    cfg = Config()
    cfg.storage.s3_endpoint_url, cfg.storage.bucket, cfg.runner.address = endpoint, "team-bucket", address
    return cfg


def _profile(home: Path, name: str = "free-team") -> None:
    aws = home / ".aws"
    aws.mkdir()
    (aws / "credentials").write_text(f"[{name}]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")


def test_keys_in_the_environment_send_results_to_s3_at_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    where = results_location(_cfg(), API)
    assert where == ("s3", "s3://team-bucket/prefect-results", "http://127.0.0.1:8333")
    block = results_block(where)
    assert block.basepath == "s3://team-bucket/prefect-results"
    assert block.settings == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:8333"}}
    saved = json.dumps(block.model_dump(mode="json"))  # what block.save() sends to Prefect's database
    assert KEY_ID not in saved and SECRET not in saved and "key" not in saved.lower(), saved


def test_an_aws_profile_sends_results_to_s3(no_aws_settings: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _profile(no_aws_settings)
    monkeypatch.setenv("AWS_PROFILE", "free-team")
    assert results_location(_cfg(), API)[0] == "s3"


def test_a_profile_that_is_not_there_keeps_results_local_and_says_so(
    no_aws_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _profile(no_aws_settings, "someone-else")
    monkeypatch.setenv("AWS_PROFILE", "free-team")
    where = results_location(_cfg(), API)
    assert where[0] == "local" and "free-team" in where[1], where


def test_no_credentials_keep_results_local() -> None:
    where = results_location(_cfg(), API)
    assert where[0] == "local" and "no S3 credentials" in where[1] and "AWS_PROFILE" in where[1], where
    assert results_block(where) is None


def test_no_prefect_api_keeps_results_local_even_with_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PREFECT_API_URL a temporary server of the stage's process runs the fan-out on this machine."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert results_location(_cfg(), "")[0] == "local"


def test_a_remote_cluster_without_s3_fails_naming_what_is_missing() -> None:
    with pytest.raises(FanOutError) as no_keys:
        results_location(_cfg(address="tcp://10.0.0.5:8786"), API)
    message = str(no_keys.value)
    assert "runner.address=tcp://10.0.0.5:8786" in message and "AWS_ACCESS_KEY_ID" in message
    assert "PREFECT_API_URL" not in message  # it is set: not named as missing
    with pytest.raises(FanOutError) as neither:
        results_location(_cfg(address="tcp://10.0.0.5:8786"), "")
    assert "PREFECT_API_URL is not set" in str(neither.value) and "AWS_PROFILE" in str(neither.value)


def test_a_remote_cluster_with_a_profile_gets_s3(no_aws_settings: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _profile(no_aws_settings)
    monkeypatch.setenv("AWS_PROFILE", "free-team")
    assert results_location(_cfg(address="tcp://10.0.0.5:8786"), API)[0] == "s3"


def test_aws_own_endpoint_gives_the_block_no_endpoint_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """storage=s3 leaves s3_endpoint_url "" (AWS's own, which s3fs finds from the region); FREE_S3_ENDPOINT_URL
    is what the config puts there for an S3-compatible store."""
    monkeypatch.delenv("FREE_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    where = results_location(compose(["storage=s3", "storage.bucket=team-bucket"]), API)
    assert where == ("s3", "s3://team-bucket/prefect-results", "")
    assert results_block(where).settings == {}
    monkeypatch.setenv("FREE_S3_ENDPOINT_URL", "https://s3.team.example")
    assert results_location(compose(["storage=s3"]), API)[2] == "https://s3.team.example"
