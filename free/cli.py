"""Command line: ``free …`` or ``python -m free …``.

Every command takes Hydra overrides as trailing arguments (``experiment=tiny dataset.image_size=32``),
composed over ``params/``. Errors are one readable line on stderr: exit 2 for a bad configuration,
1 for missing or corrupt data.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from free import __version__
from free.cli_serve import serve_app
from free.progress import bar

app = typer.Typer(help="FREE: data-free meta-learning pipeline.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(
    help="Few-shot data sets: decode into the tensor cache, show class splits.", no_args_is_help=True
)
config_app = typer.Typer(help="The configuration tree in params/.", no_args_is_help=True)
stack_app = typer.Typer(
    help="The local stack: Prefect server, MLflow server, S3 server (SeaweedFS), deployment worker.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
bench_app = typer.Typer(
    help="Benchmarks: recovery speed-up, accuracy table, evaluation throughput, pipeline overhead. "
    "Each writes JSON + PNG under benchmarks/results/.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")
app.add_typer(bench_app, name="bench")
app.add_typer(serve_app, name="serve")

out = Console(soft_wrap=True)
err = Console(stderr=True)
Overrides = Annotated[
    list[str] | None, typer.Argument(help="Hydra overrides, e.g. experiment=tiny dataset.image_size=32")
]
F = TypeVar("F", bound=Callable[..., object])


def friendly_errors(command: F) -> F:
    """Turn the errors a user can fix into one line on stderr and a non-zero exit code."""
    from free.checkpoints import CheckpointError
    from free.config import ConfigError
    from free.data import DatasetIntegrityError

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return command(*args, **kwargs)
        except ConfigError as e:
            err.print(f"[bold red]config error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
        except (FileNotFoundError, DatasetIntegrityError, CheckpointError) as e:  # missing/corrupt inputs
            kind = "checkpoint error" if isinstance(e, CheckpointError) else "data error"
            err.print(f"[bold red]{kind}:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


# Set by the global --params option: stages read a resolved params file (how DVC runs them).
_params_file: Path | None = None


def _compose(overrides: list[str] | None):
    from free.config import compose, load_params

    if _params_file is not None:
        return load_params(_params_file, overrides or [])
    return compose(overrides or [])


def _version(value: bool) -> None:
    if value:
        out.print(f"free-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    params: Annotated[
        Path | None,
        typer.Option(
            "--params",
            help="Read the resolved config from this file (params.yaml, as DVC runs the stages) instead of "
            "composing params/; trailing key=value arguments still override it.",
        ),
    ] = None,
) -> None:
    """FREE: recover pseudo data from a zoo of pre-trained classifiers and meta-learn from it."""
    global _params_file
    _params_file = params


@config_app.command("show")
@friendly_errors
def config_show(overrides: Overrides = None) -> None:
    """Print the resolved configuration (after overrides, interpolations and validation)."""
    from free.config import to_yaml

    sys.stdout.write(to_yaml(_compose(overrides)))


@config_app.command("params")
@friendly_errors
def config_params(
    overrides: Overrides = None,
    out_file: Annotated[Path, typer.Option("--out", help="Where to write it.")] = Path("params.yaml"),
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 if the file differs from the composition.")
    ] = False,
) -> None:
    """Write the resolved, machine-independent params.yaml that the DVC stages read (same as `dvc exp run -S`).

    Starts from the committed default, experiment=tiny, unless the overrides choose an experiment
    (`~experiment` for the bare defaults of params/config.yaml)."""
    from free.config import params_yaml, with_default_experiment

    overrides = with_default_experiment(overrides or [])
    text = params_yaml(overrides)
    if check:
        current = out_file.read_text(encoding="utf-8") if out_file.is_file() else None
        if current != text:
            err.print(f"{out_file} is not the composition of params/ with {overrides}; run `free config params`")
            raise typer.Exit(1)
        out.print(f"{out_file} is up to date")
        return
    out_file.write_text(text, encoding="utf-8")
    out.print(f"wrote {out_file} ({' '.join(overrides)})")


@data_app.command("build")
@friendly_errors
def data_build(
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option("--force", help="Decode again even if the cache exists.")] = False,
) -> None:
    """Decode the data set into the tensor cache and write artifacts/data/splits.json (class splits)."""
    from free.stages import data

    summary = data.run(_compose(overrides), force=force, progress=bar)
    state = "cached already" if summary["from_cache"] else "decoded"
    out.print(
        f"{summary['dataset']}: {summary['classes']} classes, {summary['images']} images {state} -> {summary['cache']}"
    )
    counts = ", ".join(f"{name} {n}" for name, n in summary["split_classes"].items())
    out.print(f"classes per split: {counts} -> {summary['manifest']}")


@data_app.command("info")
@friendly_errors
def data_info(
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show the class splits of the configured data set: classes and images per split."""
    from free.data import build_splits, load_dataset, split_summary

    cfg = _compose(overrides)
    ds = cfg.dataset
    raw, path, _ = load_dataset(ds, cfg.paths.cache_dir, progress=bar)
    rows = split_summary(build_splits(raw, ds.split.train, ds.split.val, ds.split_seed, ds.rotations))
    info = {
        "dataset": ds.name,
        "root": ds.root,
        "cache": str(path),
        "sources": raw.sources,
        "split": "standard" if raw.class_splits else f"seeded (seed {ds.split_seed}), stratified by group",
        "rotations": ds.rotations,
        "splits": rows,
    }
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    table = Table(title=f"{ds.name}: class splits (disjoint)")
    for column in ("split", "classes", "images", "images/class", "image (C, H, W)"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for row in rows:
        table.add_row(
            row["split"],
            str(row["classes"]),
            str(row["images"]),
            str(row["images_per_class"]),
            str(tuple(row["image_shape"])),
        )
    out.print(table)
    out.print(f"split: {info['split']}; rotations as new classes: {'yes (x4)' if ds.rotations else 'no'}")
    out.print(f"root: {ds.root}")
    for name, digest in raw.sources.items():
        out.print(f"  source {name}: sha256 {digest}")
    out.print(f"cache: {path}")


@app.command(context_settings={"allow_extra_args": False})
@friendly_errors
def teachers(
    args: Annotated[
        list[str] | None,
        typer.Argument(help="Hydra overrides; or `import DIR [overrides]` to import your own checkpoints + cards."),
    ] = None,
) -> None:
    """Train the teacher zoo (resumable), or `free teachers import DIR` to bring your own teachers."""
    from free.stages import teachers as stage

    args = list(args or [])
    if args[:1] == ["import"]:
        if len(args) < 2:
            raise typer.BadParameter("usage: free teachers import DIR [overrides]")
        summary = stage.import_teachers(_compose(args[2:]), Path(args[1]))
    else:
        summary = stage.run(_compose(args), progress=bar)
    out.print_json(data=summary)


@app.command()
@friendly_errors
def metatrain(overrides: Overrides = None) -> None:
    """Meta-train: recover pseudo data, fill the memory bank, train the meta-learner (resumable)."""
    from free.stages import metatrain as stage

    out.print_json(data=stage.run(_compose(overrides), progress=bar))


@app.command()
@friendly_errors
def metatest(overrides: Overrides = None) -> None:
    """Meta-test on real images of the meta-test classes; writes artifacts/metrics/metatest.json."""
    from free.stages import metatest as stage

    out.print_json(data=_headline(stage.run(_compose(overrides), progress=bar)))


@app.command()
@friendly_errors
def pipeline(overrides: Overrides = None) -> None:
    """All stages in order on this machine (data, teachers, metatrain, metatest); no services needed."""
    from free.stages import data, metatest, metatrain
    from free.stages import teachers as teacher_stage

    cfg = _compose(overrides)
    for name, stage in (("data", data), ("teachers", teacher_stage), ("metatrain", metatrain), ("metatest", metatest)):
        out.rule(f"stage {name}")
        summary = stage.run(cfg, progress=bar)
    out.print_json(data=_headline(summary))


StateDir = Annotated[
    Path | None, typer.Option("--state-dir", help="The stack's state directory (env FREE_STATE_DIR; default state/).")
]


def _stack_settings(state_dir: Path | None, **given: int | None):
    from free.stack import StackSettings

    return StackSettings.load(state_dir, **given)


def stack_errors(command: F) -> F:
    """A service that cannot start: one paragraph with its log tail on stderr, exit 1."""

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> object:
        from free.stack import StackError

        try:
            return command(*args, **kwargs)
        except StackError as e:
            err.print(f"[bold red]stack error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


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
) -> None:
    """Start (or keep) the Prefect server, MLflow server, S3 server and the deployment worker, on loopback."""
    from free import stack

    settings = _stack_settings(
        state_dir, prefect_port=prefect_port, mlflow_port=mlflow_port, s3_port=s3_port, aux_port=aux_port, worker=worker
    )
    report = stack.up(settings, say=lambda line: out.print(line, highlight=False))
    out.print(f"Prefect UI  {report['prefect_ui_url']}")
    out.print(f"MLflow UI   {report['mlflow_tracking_uri']}")
    out.print(f"S3 files    {report['s3_browse_url']}  (DVC remote {report['dvc_remote']})")
    endpoint = report["s3_endpoint_url"].removeprefix("http://")  # not a link: the S3 API answers a browser 403
    out.print(f"S3 API      {endpoint}  (endpoint for S3 clients, not a web page)")
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
        f"  S3 files    {r['s3_browse_url']}  (dvc/: the DVC remote, mlflow/: artifacts)",
    ):
        out.print(line, highlight=False)


@stack_app.command("down")
@stack_errors
def stack_down(state_dir: StateDir = None) -> None:
    """Stop the stack's processes (by the PIDs recorded in the state directory). Data stays."""
    from free import stack

    stack.down(_stack_settings(state_dir), say=lambda line: out.print(line, highlight=False))


@stack_app.command("status")
@stack_errors
def stack_status(
    state_dir: StateDir = None, as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False
) -> None:
    """What runs where; exit 1 if a service is down."""
    from free import stack

    report = stack.status(_stack_settings(state_dir))
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        table = Table("service", "state", "pid", "url", "log")
        for name, s in report["services"].items():
            state = "[green]healthy" if s["healthy"] else ("[yellow]starting" if s["running"] else "[red]down")
            table.add_row(name, state, str(s["pid"] or "-"), s["url"], s["log"])
        out.print(table)
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


@app.command()
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


BenchOut = Annotated[
    Path | None, typer.Option("--out", help="Result JSON (default benchmarks/results/<benchmark>.json); PNG beside it.")
]
BENCH_WORK = Path("benchmarks") / "work"


def _override_key(override: str) -> str:
    """``+a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def _bench_overrides(overrides: list[str] | None, work: str) -> list[str]:
    """The user's overrides, with the bench's own artifacts dir unless the user chose one."""
    given = list(overrides or [])
    if not any(_override_key(o) == "paths.artifacts_dir" for o in given):
        given.append(f"paths.artifacts_dir={BENCH_WORK / work}")
    return given


def _bench_command() -> str:
    return " ".join(["free", *sys.argv[1:]])


def _bench_done(name: str, result: dict, out_file: Path | None, plot) -> None:
    """Write the result file and its plot, and print the same tables docs/RESULTS.md shows."""
    from free.bench.common import write_result
    from free.bench.report import RENDERERS

    path = write_result(name, result, out_file, _bench_command())
    png = plot(result, path)
    out.print(RENDERERS[name](result), highlight=False, markup=False)
    out.print(f"wrote {path} and {png}", highlight=False)


@bench_app.command("recovery")
@friendly_errors
def bench_recovery(
    overrides: Overrides = None,
    seeds: Annotated[int, typer.Option(help="Recoveries per held-out teacher and method.")] = 3,
    heldout: Annotated[int, typer.Option(help="The zoo's last teachers, unseen in meta-training.")] = 2,
    max_steps: Annotated[int, typer.Option(help="Cap on any method's steps when a target is not reached.")] = 1000,
    downstream: Annotated[
        bool, typer.Option(help="Target (c): meta-train every method for FREE's wall time and meta-test.")
    ] = True,
    out_file: BenchOut = None,
) -> None:
    """Meta-generator vs from-scratch generator vs pixels on unseen teachers: speed-up at equal quality."""
    from free.bench import recovery

    settings = recovery.RecoveryBench(seeds, heldout, max_steps, downstream)
    given = _bench_overrides(overrides, "recovery")
    result = recovery.run(lambda method: _compose([*given, f"method={method}"]), settings, progress=bar, say=out.print)
    _bench_done("recovery", result, out_file, recovery.plot)


@bench_app.command("accuracy")
@friendly_errors
def bench_accuracy(
    overrides: Overrides = None,
    seeds: Annotated[int, typer.Option(help="Seeds per row (teacher zoo, initialisations, pseudo tasks).")] = 1,
    mixed_archs: Annotated[
        str, typer.Option(help="Comma-separated teacher archs of the heterogeneous-zoo table ('' skips it).")
    ] = "conv4,resnet10",
    out_file: BenchOut = None,
) -> None:
    """The method table (FREE, w/o alignment, from scratch, random init, oracle), 1-/5-shot +- 95% CI."""
    from free.bench import accuracy

    given = _bench_overrides(overrides, "accuracy")
    archs = [a.strip() for a in mixed_archs.split(",") if a.strip()]

    def configs(extra: list[str]):
        replaced = {_override_key(o) for o in extra}  # the bench's own settings win over the user's
        return _compose([*(o for o in given if _override_key(o) not in replaced), *extra])

    result = accuracy.run(configs, seeds, archs, progress=bar, say=out.print)
    _bench_done("accuracy", result, out_file, accuracy.plot)


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{option} takes positive integers, got {text!r}")
    return values


@bench_app.command("eval")
@friendly_errors
def bench_eval(
    overrides: Overrides = None,
    episodes: Annotated[int, typer.Option(help="Episodes per measurement.")] = 50,
    batches: Annotated[str, typer.Option(help="Comma-separated vmap chunk sizes (episode_batch).")] = "10,50",
    threads: Annotated[str, typer.Option(help="Comma-separated torch thread counts.")] = "1,2",
    out_file: BenchOut = None,
) -> None:
    """Meta-test episodes per second, vectorised (vmap) vs loop, and peak memory."""
    from free.bench import evaluation

    cfg = _compose(overrides)
    result = evaluation.run(
        cfg, episodes, _int_list(batches, "--batches"), _int_list(threads, "--threads"), say=out.print
    )
    _bench_done("eval", result, out_file, evaluation.plot)


@bench_app.command("pipeline")
@friendly_errors
@stack_errors
def bench_pipeline(
    out_file: BenchOut = None,
    work: Annotated[Path, typer.Option(help="Scratch folder for the project copies (emptied first).")] = BENCH_WORK
    / "pipeline",
) -> None:
    """The tiny pipeline (params.yaml) through `prefect deployment run` vs `dvc repro` vs bare `free pipeline`,
    and each rerun with nothing changed."""
    from free.bench import pipeline

    source = Path.cwd()
    if not (source / "dvc.yaml").is_file() or not (source / "params.yaml").is_file():
        raise FileNotFoundError(
            f"run `free bench pipeline` from the project root (no dvc.yaml/params.yaml in {source})"
        )
    cache = Path(_compose([]).paths.cache_dir)
    result = pipeline.run(source, work.resolve(), cache, say=out.print)
    _bench_done("pipeline", result, out_file, pipeline.plot)


def _headline(metrics: dict) -> dict:
    """metatest.json without the per-episode lists."""
    return {k: ({m: v[m] for m in ("acc", "ci95")} if isinstance(v, dict) else v) for k, v in metrics.items()}


if __name__ == "__main__":  # pragma: no cover
    app()
