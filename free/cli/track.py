"""``free register``: track and register a pipeline run whose stages finished, without running any
stage again (e.g. after a flow run whose tracking failed because MLflow was down). The face of
:func:`flows.tracking.register_finished`; MLflow and Prefect are imported only when it runs."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from free.cli.common import err, out, stack_errors


@stack_errors
def register(
    push: Annotated[bool, typer.Option("--push", help="Also `dvc push` the outputs to the DVC remote.")] = False,
) -> None:
    """Log the finished stages to MLflow and register the model (alias challenger); recomputes nothing.

    Refuses (exit 1) unless `dvc status` says every stage is up to date.
    Talks to $MLFLOW_TRACKING_URI, else to the running local stack (`free stack up`)."""
    from mlflow.exceptions import MlflowException

    from flows import preflight
    from flows.tracking import NotUpToDate, register_finished
    from free.paths import project_root
    from free.stack import use_running_stack

    project = project_root()
    # MLflow prints a "View run" link per run it ends (5 here); the summary below names the run.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        use_running_stack("free register")  # sets MLFLOW_TRACKING_URI (and S3 settings) if unset
        result = register_finished(project, push=push)
    except (NotUpToDate, preflight.PreflightError) as e:
        err.print(f"[bold red]register error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except MlflowException as e:
        err.print(f"[bold red]tracking error:[/] {e.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    for line in result["preflight"]:
        out.print(f"preflight: {line}", highlight=False)
    model = result["model"]
    pushed = "; outputs pushed to the DVC remote" if result["pushed"] else ""
    if model.get("unchanged"):  # the challenger holds this very model: no new version (flows.pipeline.register)
        said = f"unchanged: challenger stays version {model['version']} (same outputs)"
    else:
        said = f"{model['name']} v{model['version']}: alias challenger"
    out.print(f"{said}; MLflow run {result['mlflow_run_id']} (a nested run per stage){pushed}", highlight=False)
