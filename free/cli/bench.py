"""``free bench …``: the benchmarks behind docs/RESULTS.md; each writes JSON + PNG and prints its tables."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from free.cli.common import Overrides, compose_config, friendly_errors, out, stack_errors
from free.config.compose import override_key
from free.progress import bar

bench_app = typer.Typer(
    help="Benchmarks: recovery speed-up, accuracy table, evaluation throughput, pipeline overhead; meta-val tuning. "
    "Each writes JSON + PNG under benchmarks/results/.",
    no_args_is_help=True,
)


BenchOut = Annotated[
    Path | None, typer.Option("--out", help="Result JSON (default benchmarks/results/<benchmark>.json); PNG beside it.")
]
BENCH_WORK = Path("benchmarks") / "work"


def _bench_overrides(overrides: list[str] | None, work: str) -> list[str]:
    """The user's overrides, with the bench's own artifacts dir unless the user chose one."""
    given = list(overrides or [])
    if not any(override_key(o) == "paths.artifacts_dir" for o in given):
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
    snapshots: Annotated[
        str,
        typer.Option(
            help="Comma-separated meta-iteration counts (0..metalearn.iterations) at which the meta-generator "
            "is measured: the speed-up curve over meta-training. Default: 5 spread over 0..iterations; "
            "the last iteration is always measured."
        ),
    ] = "",
    out_file: BenchOut = None,
) -> None:
    """Meta-generator vs from-scratch generator vs pixels on unseen teachers: speed-up at equal quality,
    and its curve over the meta-generator's meta-iterations."""
    from free.bench import recovery

    given = _bench_overrides(overrides, "recovery")

    def configs(method: str):
        return compose_config([*given, f"method={method}"])

    iterations = configs("free").metalearn.iterations
    try:
        chosen = recovery.snapshot_iterations(_snapshot_list(snapshots) if snapshots.strip() else None, iterations)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--snapshots") from None
    settings = recovery.RecoveryBench(seeds, heldout, max_steps, downstream, chosen)

    result = recovery.run(configs, settings, progress=bar, say=out.print)
    _bench_done("recovery", result, out_file, recovery.plot)


def _snapshot_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise typer.BadParameter(f"takes comma-separated meta-iteration counts, got {text!r}", param_hint="--snapshots")
    return values


@bench_app.command("accuracy")
@friendly_errors
def bench_accuracy(
    overrides: Overrides = None,
    seeds: Annotated[int, typer.Option(help="Seeds per row (teacher zoo, initialisations, pseudo tasks).")] = 1,
    first_seed: Annotated[
        int, typer.Option(min=0, help="Seeds first-seed .. first-seed+seeds-1 (split seeds over processes).")
    ] = 0,
    mixed_archs: Annotated[
        str, typer.Option(help="Comma-separated teacher archs of the heterogeneous-zoo table ('' skips it).")
    ] = "conv4,resnet10",
    rows: Annotated[
        str,
        typer.Option(
            help="Comma-separated rows (default all): free, free_noalign, free_official, free_official_noalign, "
            "scratch, scratch_equal_time (adds free and scratch), pixels, random_init, oracle."
        ),
    ] = "",
    out_file: BenchOut = None,
) -> None:
    """The method table (FREE both updates +- alignment, scratch at equal iterations and wall time, pixels,
    random init, oracle): one learner per shot, 1-/5-shot +- 95% CI, paired differences."""
    from free.bench import accuracy

    chosen = [r.strip() for r in rows.split(",") if r.strip()]
    try:
        accuracy.select_rows(chosen)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--rows") from None
    given = _bench_overrides(overrides, "accuracy")
    archs = [a.strip() for a in mixed_archs.split(",") if a.strip()]

    def configs(extra: list[str]):
        replaced = {override_key(o) for o in extra}  # the bench's own settings win over the user's
        return compose_config([*(o for o in given if override_key(o) not in replaced), *extra])

    result = accuracy.run(configs, seeds, archs, chosen, progress=bar, say=out.print, first_seed=first_seed)
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

    cfg = compose_config(overrides)
    result = evaluation.run(
        cfg, episodes, _int_list(batches, "--batches"), _int_list(threads, "--threads"), say=out.print
    )
    _bench_done("eval", result, out_file, evaluation.plot)


@bench_app.command("pipeline")
@friendly_errors
@stack_errors
def bench_pipeline(
    overrides: Overrides = None,
    out_file: BenchOut = None,
    work: Annotated[Path, typer.Option(help="Scratch folder for the project copies (emptied first).")] = BENCH_WORK
    / "pipeline",
    reruns: Annotated[
        int, typer.Option(min=1, help="No-op reruns after each first run; their median is reported.")
    ] = 1,
    order: Annotated[
        str, typer.Option(help="Which front door runs first, second, third (the host's speed may drift meanwhile).")
    ] = "bare,dvc,prefect",
) -> None:
    """The tiny pipeline through `prefect deployment run` vs `dvc repro` vs bare `free pipeline`, and each
    rerun with nothing changed. Overrides (e.g. metalearn.iterations=100) apply to all three."""
    from free.bench import pipeline

    source = Path.cwd()
    if not (source / "dvc.yaml").is_file() or not (source / "params.yaml").is_file():
        raise FileNotFoundError(
            f"run `free bench pipeline` from the project root (no dvc.yaml/params.yaml in {source})"
        )
    cache = Path(compose_config([]).paths.cache_dir)
    doors = tuple(name.strip() for name in order.split(",") if name.strip())
    result = pipeline.run(
        source, work.resolve(), cache, say=out.print, overrides=overrides, reruns=reruns, order=doors
    )
    _bench_done("pipeline", result, out_file, pipeline.plot)


@bench_app.command("tune")
@friendly_errors
def bench_tune(
    overrides: Overrides = None,
    grid: Annotated[
        list[str] | None,
        typer.Option("--grid", help="KEY=v1,v2,... to sweep; repeat for a cartesian product."),
    ] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per point (teacher zoo, initialisations, val episodes).")] = 1,
    out_file: BenchOut = None,
) -> None:
    """Meta-train every point of a grid and rank the points by meta-val accuracy (never meta-test)."""
    from free.bench import tune

    given = _bench_overrides(overrides, "tune")
    swept = tune.parse_grid(grid or [])
    tune.check_overrides(given, swept)
    result = tune.run(lambda extra: compose_config([*given, *extra]), swept, seeds, progress=bar, say=out.print)
    _bench_done("tune", result, out_file, tune.plot)


@bench_app.command("serve-load")
def bench_serve_load(
    clients: Annotated[int, typer.Option(min=1, help="Concurrent clients, each with its own connection.")] = 4,
    seconds: Annotated[float, typer.Option(min=0.1, help="How long the clients send requests.")] = 30.0,
    n_way: Annotated[int, typer.Option("--n-way", min=2, help="Classes per request.")] = 5,
    k_shot: Annotated[int, typer.Option("--k-shot", min=1, help="Support images per class.")] = 1,
    queries: Annotated[int, typer.Option(min=1, help="Query images per class.")] = 15,
    distinct: Annotated[int, typer.Option(min=1, help="Different requests, each answered alone first.")] = 16,
    checkpoint: Annotated[
        Path | None, typer.Option(help="A metalearner.safetensors (card.json beside it); default: a random Conv4.")
    ] = None,
    out_file: BenchOut = None,
) -> None:
    """Load test of `free serve model`'s server on 127.0.0.1: req/s, p50/p99, errors, mismatches, memory."""
    from free.bench import serve_load
    from free.bench.common import write_result

    settings = serve_load.ServeLoadBench(clients, seconds, n_way, k_shot, queries, distinct)
    result = serve_load.run(settings, checkpoint, say=lambda m: out.print(m, highlight=False))
    path = write_result("serve_load", result, out_file, _bench_command())
    out.print(serve_load.render(result), highlight=False, markup=False)
    out.print(f"wrote {path}", highlight=False)
    if result["errors"] or result["mismatches"] or not result["server_stopped"]:
        raise typer.Exit(1)


@bench_app.command("units")
@friendly_errors
def bench_units(
    overrides: Overrides = None,
    learners: Annotated[
        str, typer.Option(help="Comma-separated meta-learners ARCH:WIDTH to cost.")
    ] = "conv4:32,conv4:64,resnet18:32,resnet18:64",
    batch: Annotated[int, typer.Option(min=1, help="Images per primitive measurement.")] = 2,
    repeats: Annotated[int, typer.Option(min=1, help="Timed calls per measurement (median).")] = 3,
    images_per_class: Annotated[
        int, typer.Option(min=2, help="Images per class of the data set (teacher steps per epoch).")
    ] = 600,
    direct_gflop: Annotated[float, typer.Option(help="Also run a unit whole when it costs at most this.")] = 12.0,
    assumed_tflops: Annotated[float, typer.Option(help="Assumed achieved GPU throughput (estimates only).")] = 20.0,
    assumed_ms_per_pass: Annotated[float, typer.Option(help="Assumed GPU floor per sequential pass (ms).")] = 1.0,
    out_file: BenchOut = None,
) -> None:
    """Per-unit FLOPs, seconds and memory at the configured shapes (e.g. experiment=mini_imagenet, no data
    needed), the unit counts of a run, and its estimated wall time on 1, 4 and 16 GPUs (docs/SCALING.md)."""
    from free.bench import units

    try:
        chosen = units.parse_learners(learners)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--learners") from None
    settings = units.UnitsBench(
        chosen, batch, repeats, images_per_class, direct_gflop, assumed_tflops, assumed_ms_per_pass
    )
    result = units.run(compose_config(overrides), settings, say=lambda m: out.print(m, highlight=False))
    _bench_done("units", result, out_file, units.plot)


@bench_app.command("fanout")
@friendly_errors
def bench_fanout(
    overrides: Overrides = None,
    workers: Annotated[str, typer.Option(help="Comma-separated LocalCluster sizes to time runner=dask at.")] = "1,2",
    out_file: BenchOut = None,
) -> None:
    """Wall time of the teacher stage with runner=local vs runner=dask at each --workers (each from nothing)."""
    from free.bench import fanout

    sizes = [int(w) for w in workers.split(",") if w.strip()]
    given = [o for o in (overrides or []) if override_key(o) != "paths.artifacts_dir"]
    result = fanout.run(given or ["experiment=tiny"], sizes, BENCH_WORK / "fanout", say=lambda m: out.print(m))
    _bench_done("fanout", result, out_file, fanout.plot)
