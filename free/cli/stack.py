"""``free stack …`` (the local Prefect, MLflow and S3 servers) and ``free promote`` (the registry's
champion alias): the face of :mod:`free.stack` and :mod:`flows.promotion`."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from free.cli.common import err, out, stack_errors

stack_app = typer.Typer(
    help="The local stack: Prefect server, MLflow server, S3 server (SeaweedFS), deployment worker.",
    no_args_is_help=True,
)


StateDir = Annotated[
    Path | None, typer.Option("--state-dir", help="The stack's state directory (env FREE_STATE_DIR; default state/).")
]


def _stack_settings(state_dir: Path | None, **given: int | str | None):
    from free.stack import StackSettings

    return StackSettings.load(state_dir, **given)


class Backend(StrEnum):
    sqlite = "sqlite"
    postgres = "postgres"


def _s3_line(report: dict) -> str:
    # Not a link: the S3 API answers a browser 403. (SeaweedFS's filer UI would list the files, but
    # without credentials; it is not advertised.) MLflow's UI shows the artifacts.
    endpoint = report["s3_endpoint_url"].removeprefix("http://")
    return f"s3://{report['s3_bucket']} at {endpoint} (an API for DVC and MLflow, not a web page): dvc/, mlflow/"


@stack_app.command("up")
@stack_errors
def stack_up(
    state_dir: StateDir = None,
    prefect_port: Annotated[int | None, typer.Option(help="env FREE_PREFECT_PORT; default 4200")] = None,
    mlflow_port: Annotated[int | None, typer.Option(help="env FREE_MLFLOW_PORT; default 5000")] = None,
    s3_port: Annotated[int | None, typer.Option(help="env FREE_S3_PORT; default 8333")] = None,
    aux_port: Annotated[
        int | None, typer.Option(help="first of 9 more SeaweedFS ports; env FREE_S3_AUX_PORT; default 18334")
    ] = None,
    worker: Annotated[bool, typer.Option(help="Also serve the Prefect deployments (free/full-pipeline).")] = True,
    external: Annotated[
        bool | None,
        typer.Option(
            "--external/--local-services",
            help="S3 and MLflow are real clouds' (docs/SERVICES.md, 'Pointing at real clouds'): start only "
            "the Prefect server and the worker, which takes this shell's MLFLOW_TRACKING_URI and AWS settings. "
            "Recorded; env FREE_STACK_EXTERNAL=1; default --local-services",
        ),
    ] = None,
    work_pool: Annotated[
        bool | None,
        typer.Option(
            "--work-pool/--serve",
            help="The worker: a process worker of work pool free-local running prefect.yaml's deployments "
            "(`prefect deploy --all`), or serve() of flows/serve.py. Recorded; env FREE_STACK_WORK_POOL=1; "
            "default --serve",
        ),
    ] = None,
    backend: Annotated[
        Backend | None,
        typer.Option(
            help="Where MLflow and Prefect keep their data: SQLite files, or a local PostgreSQL server "
            "(docs/SERVICES.md). Recorded: later commands keep it. env FREE_STACK_BACKEND; default sqlite",
        ),
    ] = None,
    postgres_port: Annotated[
        int | None,
        typer.Option(help="PostgreSQL's port (postgres backend); env FREE_POSTGRES_PORT; default: a free one"),
    ] = None,
) -> None:
    """Start (or keep) the Prefect server, MLflow server, S3 server and the deployment worker, on loopback."""
    from free import stack

    ports = {"prefect_port": prefect_port, "mlflow_port": mlflow_port, "s3_port": s3_port, "aux_port": aux_port}
    settings = _stack_settings(
        state_dir,
        **ports,
        worker=worker,
        work_pool=work_pool,
        external=external,
        backend=backend and backend.value,
        postgres_port=postgres_port,
    )
    report = stack.up(settings, say=lambda line: out.print(line, highlight=False))
    out.print(f"Prefect UI  {report['prefect_ui_url']}")
    out.print(f"MLflow UI   {report['mlflow_tracking_uri']}")
    out.print(f"S3          {_s3_line(report)}")
    if settings.backend == "postgres":
        out.print(f"PostgreSQL  {report['services']['postgres']['url']}: databases mlflow, prefect", highlight=False)
    out.print(f'Clients:    eval "$(free stack env)"   (credentials in {settings.state_dir}/credentials.env)')


@stack_app.command("links")
@stack_errors
def stack_links(state_dir: StateDir = None) -> None:
    """Where to look in a browser: the Prefect runs, the MLflow experiment and the S3 bucket's files."""
    from free import stack

    r = stack.status(_stack_settings(state_dir))
    if not r["services"]["prefect"]["healthy"]:
        raise stack.StackError(f"the local stack in {r['state_dir']} is not running: start it with `make stack-up`")
    for line in (
        "Where to look (the stack keeps running; stop it with: make stack-down):",
        f"  Prefect UI  {r['prefect_ui_url']}/runs  (flow runs, stage logs, report artifact)",
        f"  MLflow UI   {r['mlflow_tracking_uri']}  (experiment 'free', model free-meta-learner)",
        f"  S3          {_s3_line(r)}",
    ):
        out.print(line, highlight=False)


@stack_app.command("down")
@stack_errors
def stack_down(state_dir: StateDir = None) -> None:
    """Stop each recorded service's whole process group (state directory's stack.json). Data stays."""
    from free import stack

    stack.down(_stack_settings(state_dir), say=lambda line: out.print(line, highlight=False))


@stack_app.command("status")
@stack_errors
def stack_status(
    state_dir: StateDir = None, as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False
) -> None:
    """What runs where; exit 1 if a service is not healthy (down, starting or half-dead)."""
    from free import stack

    report = stack.status(_stack_settings(state_dir))
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        table = Table("service", "state", "pid", "url", "log")
        colour = {"healthy": "green", "starting": "yellow", "half-dead": "red", "down": "red"}
        for name, s in report["services"].items():
            state = f"[{colour[s['state']]}]{s['state']}"
            if s["state"] == "half-dead":  # the leader's PID is gone; name what is left of its group
                state += f" (group {s['pgid']}: pids {', '.join(map(str, s['members']))} left)"
            table.add_row(name, state, str(s["pid"] or "-"), s["url"], s["log"])
        out.print(table)
        if any(s["state"] == "half-dead" for s in report["services"].values()):
            out.print("`free stack up` restarts a half-dead service; `free stack down` stops its whole group.")
    if not all(s["healthy"] for s in report["services"].values()):
        raise typer.Exit(1)


@stack_app.command("env")
@stack_errors
def stack_env(state_dir: StateDir = None) -> None:
    """Print `export` lines that point DVC, MLflow and Prefect clients at the stack: eval "$(free stack env)"."""
    import shlex

    from free import stack

    for key, value in stack.client_env(_stack_settings(state_dir)).items():
        sys.stdout.write(f"export {key}={shlex.quote(value)}\n")


@stack_errors
def promote(
    model: Annotated[str, typer.Option(help="Registered model name.")] = "free-meta-learner",
    force: Annotated[bool, typer.Option("--force", help="Promote even if worse; recorded in the tags.")] = False,
) -> None:
    """Move alias champion to the challenger unless it is worse beyond the CI.

    Talks to $MLFLOW_TRACKING_URI, else to the running local stack (`free stack up`)."""
    from mlflow import MlflowClient

    from flows.promotion import PromotionError
    from flows.promotion import promote as apply
    from free.stack import use_running_stack

    tracking_uri = use_running_stack("free promote")
    try:
        result = apply(MlflowClient(tracking_uri), model, force)
    except PromotionError as e:
        err.print(f"[bold red]promotion error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    verdict = "promoted to champion" if result["promoted"] else "not promoted"
    out.print(f"{model} v{result['version']}: {verdict} ({result['reason']})", highlight=False)
    if not result["promoted"] and result.get("promotion.decision") == "rejected":
        raise typer.Exit(3)
