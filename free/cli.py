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

app = typer.Typer(help="FREE: data-free meta-learning pipeline.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(
    help="Few-shot data sets: decode into the tensor cache, show class splits.", no_args_is_help=True
)
config_app = typer.Typer(help="The configuration tree in params/.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

out = Console(soft_wrap=True)
err = Console(stderr=True)
Overrides = Annotated[
    list[str] | None, typer.Argument(help="Hydra overrides, e.g. experiment=tiny dataset.image_size=32")
]
F = TypeVar("F", bound=Callable[..., object])


def friendly_errors(command: F) -> F:
    """Turn the errors a user can fix into one line on stderr and a non-zero exit code."""
    from free.config import ConfigError
    from free.data import DatasetIntegrityError, DatasetNotFoundError

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return command(*args, **kwargs)
        except ConfigError as e:
            err.print(f"[bold red]config error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
        except (DatasetNotFoundError, DatasetIntegrityError) as e:
            err.print(f"[bold red]data error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out.print(f"free-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """FREE: recover pseudo data from a zoo of pre-trained classifiers and meta-learn from it."""


@config_app.command("show")
@friendly_errors
def config_show(overrides: Overrides = None) -> None:
    """Print the resolved configuration (after overrides, interpolations and validation)."""
    from free.config import compose, to_yaml

    sys.stdout.write(to_yaml(compose(overrides or [])))


@data_app.command("build")
@friendly_errors
def data_build(
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option("--force", help="Decode again even if the cache exists.")] = False,
) -> None:
    """Decode the configured data set into the tensor cache and write the split manifest.

    The manifest, ``<artifacts_dir>/data/splits.json``, lists the classes of each split and the
    sources' hashes: the versioned input of every later stage.
    """
    from dataclasses import asdict

    from free.config import compose
    from free.data import build_splits, load_dataset, split_manifest
    from free.progress import bar

    cfg = compose(overrides or [])
    ds = cfg.dataset
    raw, path, from_cache = load_dataset(ds, cfg.paths.cache_dir, rebuild=force, progress=bar)
    state = "cached already" if from_cache else "decoded"
    out.print(f"{ds.name}: {len(raw.class_names)} classes, {len(raw.labels)} images {state} -> {path}")
    splits = build_splits(raw, ds.split.train, ds.split.val, ds.split_seed, ds.rotations)
    settings = {k: v for k, v in asdict(ds).items() if k not in ("root", "download")}  # not machine paths
    manifest = Path(cfg.paths.artifacts_dir) / "data" / "splits.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(split_manifest(raw, splits, settings), indent=2) + "\n")
    counts = ", ".join(f"{split.name} {split.n_classes}" for split in splits.values())
    out.print(f"classes per split: {counts} -> {manifest}")


@data_app.command("info")
@friendly_errors
def data_info(
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show the class splits of the configured data set: classes and images per split."""
    from free.config import compose
    from free.data import build_splits, load_dataset, split_summary
    from free.progress import bar

    cfg = compose(overrides or [])
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


if __name__ == "__main__":  # pragma: no cover
    app()
