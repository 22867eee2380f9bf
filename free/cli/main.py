"""``free`` itself, its configuration and data commands, and the pipeline stages."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from free import __version__
from free.cli import common
from free.cli.common import Overrides, compose_config, err, friendly_errors, out
from free.progress import bar

app = typer.Typer(help="FREE: data-free meta-learning pipeline.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(
    help="Few-shot data sets: decode into the tensor cache, show class splits.", no_args_is_help=True
)
config_app = typer.Typer(help="The configuration tree in params/.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")


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
    common.params_file = params


@config_app.command("show")
@friendly_errors
def config_show(overrides: Overrides = None) -> None:
    """Print the resolved configuration (after overrides, interpolations and validation)."""
    from free.config import to_yaml

    sys.stdout.write(to_yaml(compose_config(overrides)))


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

    summary = data.run(compose_config(overrides), force=force, progress=bar)
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

    cfg = compose_config(overrides)
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
        summary = stage.import_teachers(compose_config(args[2:]), Path(args[1]))
    else:
        summary = stage.run(compose_config(args), progress=bar)
    out.print_json(data=summary)


@app.command()
@friendly_errors
def metatrain(overrides: Overrides = None) -> None:
    """Meta-train: recover pseudo data, fill the memory bank, train the meta-learner (resumable)."""
    from free.stages import metatrain as stage

    out.print_json(data=stage.run(compose_config(overrides), progress=bar))


@app.command()
@friendly_errors
def metatest(overrides: Overrides = None) -> None:
    """Meta-test on real images of the meta-test classes; writes artifacts/metrics/metatest.json."""
    from free.stages import metatest as stage

    out.print_json(data=_headline(stage.run(compose_config(overrides), progress=bar)))


@app.command()
@friendly_errors
def pipeline(overrides: Overrides = None) -> None:
    """All stages in order on this machine (data, teachers, metatrain, metatest); no services needed."""
    from free.stages import data, metatest, metatrain
    from free.stages import teachers as teacher_stage

    cfg = compose_config(overrides)
    for name, stage in (("data", data), ("teachers", teacher_stage), ("metatrain", metatrain), ("metatest", metatest)):
        out.rule(f"stage {name}")
        summary = stage.run(cfg, progress=bar)
    out.print_json(data=_headline(summary))


def _headline(metrics: dict) -> dict:
    """metatest.json without the per-episode lists."""
    return {k: ({m: v[m] for m in ("acc", "ci95")} if isinstance(v, dict) else v) for k, v in metrics.items()}
