"""``free serve``: serve the registered meta-learner, and write a real request for it.

``free serve model`` serves ``models:/free-meta-learner@champion`` from the tracking server
``free.stack.use_running_stack`` finds, with MLflow's scoring server behind :mod:`free.serving_app`'s
guard (request size cap, reason-only errors); ``free serve request`` writes an N-way K-shot
request JSON from meta-test images (class names as string labels, or class ids), ready for ``curl``.

MLflow and the data modules are imported inside the commands: ``free --help`` stays fast and the
core imports without MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from free.cli.common import err, out
from free.serving_app import DEFAULT_MAX_BYTES, MAX_BYTES_ENV, MODEL_URI_ENV

if TYPE_CHECKING:
    import torch

serve_app = typer.Typer(
    help="The registered meta-learner over HTTP: serve it, write a request for it.", no_args_is_help=True
)

DEFAULT_MODEL = "models:/free-meta-learner@champion"


@serve_app.command("request")
def request(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Hydra overrides choosing the data set, e.g. dataset.root=...")
    ] = None,
    n_way: Annotated[int, typer.Option("--n-way", min=2, help="Classes N in the support set.")] = 5,
    k_shot: Annotated[int, typer.Option("--k-shot", min=1, help="Support images per class.")] = 1,
    queries: Annotated[int, typer.Option("--queries", min=1, help="Query images per class.")] = 2,
    string_labels: Annotated[
        bool, typer.Option("--string-labels/--int-labels", help="Class names as labels, or split-local class ids.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Which classes and images.")] = 0,
    out_file: Annotated[Path, typer.Option("--out", help='The request JSON ({"inputs": {...}}).')] = Path(
        "request.json"
    ),
) -> None:
    """Write an N-way K-shot request from meta-test images; the true query labels go beside it (.truth.json)."""
    from free.config import ConfigError
    from free.data import DatasetIntegrityError, load_split
    from free.data.episodes import EpisodeSampler

    try:
        split = load_split("test", overrides or [])
        episode = EpisodeSampler(split, n_way, k_shot, queries, seed=seed).sample(1)[0]
    except (ConfigError, FileNotFoundError, DatasetIntegrityError, ValueError) as e:
        err.print(f"[bold red]request error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    import torch

    classes = episode.classes.tolist()  # (N,) split-local class index of each episode label
    names = [split.class_names[c] if string_labels else c for c in classes]
    order = torch.randperm(len(episode.query_y), generator=torch.Generator().manual_seed(seed))  # not by class
    body = {
        "inputs": {
            "support_images": _pixels(episode.support_x),
            "support_labels": [names[y] for y in episode.support_y.tolist()],
            "query_images": _pixels(episode.query_x[order]),
        }
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(body, separators=(",", ":")))
    truth = out_file.with_suffix(".truth.json")
    truth.write_text(json.dumps([names[y] for y in episode.query_y[order].tolist()]) + "\n")
    out.print(
        f"wrote {out_file}: {n_way}-way {k_shot}-shot, {len(episode.query_y)} query images from the meta-test "
        f"split ({split.n_classes} classes, never seen in training); true query labels in {truth}",
        highlight=False,
    )


def _pixels(images: torch.Tensor) -> list:
    """``(n, C, H, W)`` floats in [0, 1] as nested lists, 4 decimals (a smaller file, same prediction)."""
    return (images * 1e4).round().div(1e4).tolist()


@serve_app.command("model")
def model(
    model_uri: Annotated[str, typer.Option("--model", help="Registered model URI (alias or version).")] = DEFAULT_MODEL,
    port: Annotated[int, typer.Option("--port", "-p", help="HTTP port.")] = 5001,
    host: Annotated[str, typer.Option("--host", "-h", help="Interface to listen on.")] = "127.0.0.1",
    workers: Annotated[int | None, typer.Option(help="Server processes (uvicorn's default, 1, if unset).")] = None,
    max_request_mb: Annotated[
        float, typer.Option("--max-request-mb", min=0.001, help="Larger requests get HTTP 413 before being read.")
    ] = DEFAULT_MAX_BYTES / 2**20,
) -> None:
    """Serve the registered meta-learner: POST a request (see `free serve request`) to /invocations.

    Talks to $MLFLOW_TRACKING_URI, else to the running local stack (`free stack up`); runs MLflow's
    scoring server (what `mlflow models serve --env-manager local` runs) under uvicorn from this
    environment, behind free.serving_app's guard: a request size cap (413), JSON only, errors with
    their reason alone."""
    from free.stack import StackError, use_running_stack

    try:
        tracking_uri = use_running_stack("free serve model")  # also puts the stack's S3 settings in os.environ
    except StackError as e:
        err.print(f"[bold red]stack error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    command = [sys.executable, "-m", "uvicorn", "--factory", "free.serving_app:app_from_env",
               "--host", host, "--port", str(port)]  # fmt: skip
    if workers is not None:
        command += ["--workers", str(workers)]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        MODEL_URI_ENV: model_uri,
        MAX_BYTES_ENV: str(int(max_request_mb * 2**20)),
    }
    err.print(f"serving {model_uri} from {tracking_uri} on http://{host}:{port}/invocations", highlight=False)
    raise typer.Exit(_run_server(command, env))


def _run_server(command: list[str], env: dict[str, str]) -> int:
    """Run the server in its own process group and stop the whole group (mlflow, uvicorn and its
    workers) when this process is interrupted or terminated: `kill <pid of free serve model>`
    must not leave an orphaned server holding the port. Returns the exit code."""
    server = subprocess.Popen(command, env=env, start_new_session=True)
    stopped = []

    def stop(signum: int, frame: object) -> None:
        stopped.append(signum)
        try:
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # already gone

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = server.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopped else code
