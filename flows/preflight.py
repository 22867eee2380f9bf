"""Preflight of a pipeline run: can the services it will talk to be reached at all?

Checked at flow start, before ``params.yaml`` is written or a stage runs, each with a short timeout
and all at once, so a stack that is down fails the run in seconds (before: MLflow's own retries
kept a run with MLflow down going for 17 minutes) with one message naming every unreachable URI:

* MLflow: the tracking URI (``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri``), ``GET /health``;
* S3: the endpoint of the DVC remote that ``dvc push`` will use (``core.remote`` and its
  ``endpointurl`` from ``.dvc/config`` and ``.dvc/config.local``, where ``free stack up`` writes it);
  skipped, and said so, when the remote is not an ``s3://`` one or nothing will be pushed;
* Prefect: ``PREFECT_API_URL``, ``GET /health``; skipped when unset (a temporary server runs the flow).

Given the run's ``storage`` config, it also cross-checks the DVC remote against it (:func:`remote_mismatch`):
an ``s3://`` default remote that is not ``s3://<storage.bucket>/<storage.dvc_prefix>``, or whose endpoint
is not ``storage.s3_endpoint_url`` (when that is set), gives a WARNING line naming both values and where
each is set. Not a failure: a team may push to a mirror on purpose.

A tracking URI with a password in it (``https://user:pass@host``) fails the run before any probe: the
URI is shown in logs, events and the run's links. The login goes in ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``), which MLflow's client reads.

Reachable means an HTTP answer below 500 (an S3 endpoint answers an anonymous ``GET /`` with 403, a
proxy in front of a dead server with 502). Standard library only.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from free.config.schema import StorageConfig

TIMEOUT = 3.0  # seconds per endpoint; the endpoints are checked at the same time
FIX = (
    "Is the stack up? `free stack status` shows it, `free stack up` starts it (or `make stack-up`); "
    "or point the settings above at running servers."
)


class PreflightError(RuntimeError):
    """An endpoint the run needs does not answer; the message names each one and the fix."""


@dataclass(frozen=True)
class Endpoint:
    service: str  # MLflow | S3 | Prefect
    uri: str  # as configured (what the user recognises)
    probe: str  # the URL requested
    setting: str  # where the URI comes from


def dvc_remote(project: Path) -> tuple[str, str, str] | None:
    """``(name, url, endpointurl)`` of the default DVC remote of ``project``, from ``.dvc/config``
    with ``.dvc/config.local`` over it (DVC's own precedence; its global and system files are not
    read), or None when no default remote is set. ``endpointurl`` is "" when not set."""
    merged: dict[str, dict[str, str]] = {}
    for _, sections in _dvc_config_files(project):
        for section, values in sections.items():
            merged.setdefault(section, {}).update(values)
    remote = merged.get("core", {}).get("remote")
    if not remote:
        return None
    section = merged.get(f'remote "{remote}"', {})
    return remote, section.get("url", ""), section.get("endpointurl", "")


def _dvc_config_files(project: Path) -> list[tuple[str, dict[str, dict[str, str]]]]:
    """``(".dvc/config", its sections)`` then the same for ``.dvc/config.local``, those that exist."""
    from configobj import ConfigObj  # DVC's own reader of its config files

    found = []
    for name in ("config", "config.local"):
        path = project / ".dvc" / name
        if path.is_file():
            parsed = ConfigObj(str(path), interpolation=False)
            found.append((f".dvc/{name}", {k: dict(v) for k, v in parsed.items() if isinstance(v, dict)}))
    return found


def _dvc_origin(project: Path, remote: str, key: str) -> str:
    """Which DVC config file sets ``key`` of ``remote`` (the last one: ``.dvc/config.local`` wins)."""
    origin = ".dvc/config(.local)"
    for name, sections in _dvc_config_files(project):
        if key in sections.get(f'remote "{remote}"', {}):
            origin = name
    return origin


def remote_mismatch(project: Path, storage: StorageConfig) -> list[str]:
    """WARNING lines where the default DVC remote, an ``s3://`` one, is not where ``storage`` says DVC's
    outputs go: ``s3://<bucket>/<dvc_prefix>`` (trailing slashes aside), and ``s3_endpoint_url`` when that
    is set ("" = AWS's own: the remote may name any). Empty when they agree or the remote is not S3."""
    remote = dvc_remote(project)
    if remote is None or not remote[1].startswith("s3://"):
        return []
    name, url, endpoint = remote
    lines = []
    expected = f"s3://{storage.bucket.strip('/')}/{storage.dvc_prefix.strip('/')}".rstrip("/")
    if url.rstrip("/") != expected:
        lines.append(
            f"WARNING: DVC remote {name} is {url} ({_dvc_origin(project, name, 'url')}), but storage.bucket and "
            f"storage.dvc_prefix say {expected} (params/storage/<the storage= choice>.yaml and the run's overrides): "
            f"`dvc push` goes to {url}; if that is not meant, `dvc remote modify {name} url {expected}`"
        )
    if storage.s3_endpoint_url:
        if endpoint:
            remote_setting = f"endpointurl of DVC remote {name}, {_dvc_origin(project, name, 'endpointurl')}"
        else:
            env = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
            endpoint = os.environ.get(env, "")
            remote_setting = env if endpoint else f"DVC remote {name} has no endpointurl: AWS's own"
        wanted = storage.s3_endpoint_url
        if endpoint.rstrip("/") != wanted.rstrip("/"):
            where = "FREE_S3_ENDPOINT_URL" if os.environ.get("FREE_S3_ENDPOINT_URL") else "params/storage/<choice>.yaml"
            lines.append(
                f"WARNING: DVC pushes to the S3 endpoint {endpoint or '(AWS)'} ({remote_setting}), but "
                f"storage.s3_endpoint_url is {wanted} ({where}): if that is not meant, "
                f"`dvc remote modify {name} endpointurl {wanted}`"
            )
    return lines


def endpoints(
    project: Path, tracking_uri: str, push: bool = True, prefect_api_url: str | None = None, prefect: bool = True
) -> tuple[list[Endpoint], list[str]]:
    """What to check for a run of ``project``, and one line for each check that is skipped (why).
    ``prefect_api_url``: default ``$PREFECT_API_URL``; ``prefect=False``: no Prefect check at all."""
    checks, skipped = [], []
    if urlparse(tracking_uri).scheme in ("http", "https"):
        health = f"{tracking_uri.rstrip('/')}/health"
        checks.append(Endpoint("MLflow", tracking_uri, health, "MLFLOW_TRACKING_URI / tracking.tracking_uri"))
    else:
        skipped.append(f"MLflow: {tracking_uri} is not a server (no HTTP check)")
    remote = dvc_remote(project)
    if not push:
        skipped.append("S3: not checked (this run pushes nothing: push=false)")
    elif remote is None:
        skipped.append("S3: no default DVC remote in .dvc/config(.local) (`dvc push` would fail: see `dvc remote`)")
    elif not remote[1].startswith("s3://"):
        skipped.append(f"S3: DVC remote {remote[0]} is {remote[1] or '(no url)'}, not an s3:// one: not checked")
    else:
        endpoint = remote[2] or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            setting = f"endpointurl of DVC remote {remote[0]}, `dvc remote list`"
            checks.append(Endpoint("S3", endpoint, endpoint.rstrip("/") + "/", setting))
        else:
            skipped.append(f"S3: DVC remote {remote[0]} ({remote[1]}) has no endpointurl: AWS's S3, not checked")
    api = prefect_api_url if prefect_api_url is not None else os.environ.get("PREFECT_API_URL", "")
    if prefect and api:
        checks.append(Endpoint("Prefect", api, f"{api.rstrip('/')}/health", "PREFECT_API_URL"))
    elif prefect:
        skipped.append("Prefect: PREFECT_API_URL is not set (a temporary local server runs this flow): not checked")
    return checks, skipped


def refuse_secret_in_uri(tracking_uri: str) -> None:
    """Raise :class:`PreflightError` when ``tracking_uri`` carries a password; the message hides it."""
    parts = urlparse(tracking_uri)
    if parts.password:
        host = parts.netloc.rsplit("@", 1)[1]
        shown = parts._replace(netloc=f"{parts.username}:***@{host}")
        raise PreflightError(
            f"preflight: the MLflow tracking URI {shown.geturl()} (MLFLOW_TRACKING_URI / tracking.tracking_uri) holds "
            "a password, which the run would show in its logs and links: remove it from the URI and set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
        )


def probe(endpoint: Endpoint, timeout: float = TIMEOUT) -> str | None:
    """None when ``endpoint`` answers with an HTTP status below 500, else why not (one phrase)."""
    try:
        with urllib.request.urlopen(endpoint.probe, timeout=timeout) as response:  # noqa: S310 (configured URL)
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except urllib.error.URLError as e:
        return str(e.reason)
    except (OSError, ValueError) as e:  # a timeout, a reset, a malformed URL
        return str(e) or type(e).__name__
    return None if status < 500 else f"HTTP {status}"


def check(
    project: Path, tracking_uri: str, push: bool = True, prefect_api_url: str | None = None,
    prefect: bool = True, timeout: float = TIMEOUT, storage: StorageConfig | None = None,
) -> list[str]:  # fmt: skip
    """Probe every endpoint at once; the report lines when all answer, then, given the run's
    ``storage`` config, :func:`remote_mismatch`'s warnings (none without it).

    Raises:
        PreflightError: one or more do not answer; names each URI, the setting it comes from, the
            reason, and what to do. Or the tracking URI holds a password (:func:`refuse_secret_in_uri`).
    """
    refuse_secret_in_uri(tracking_uri)
    checks, skipped = endpoints(project, tracking_uri, push, prefect_api_url, prefect)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, len(checks))) as pool:
        failures = list(pool.map(lambda e: probe(e, timeout), checks))
    seconds = time.monotonic() - started
    down = [(e, why) for e, why in zip(checks, failures, strict=True) if why]
    if down:
        lines = [f"{e.service} at {e.uri} ({e.setting}): {why}" for e, why in down]
        raise PreflightError(
            f"preflight: {len(down)} of {len(checks)} endpoints unreachable after {seconds:.1f} s:\n  "
            + "\n  ".join(lines) + f"\n{FIX}"
        )
    warnings = remote_mismatch(project, storage) if storage is not None else []
    return [f"{e.service} at {e.uri}: ok" for e in checks] + skipped + warnings
