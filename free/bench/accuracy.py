"""``free bench accuracy``: the method table - FREE against its ablation, a baseline and two bounds.

Rows (each a ``method=`` preset through the same stage code): FREE, FREE without gradient
alignment, from-scratch inversion + the same meta-learner, random initialisation (no
meta-training), oracle (the same learner on real meta-train images; not data-free). Columns:
5-way 1-shot and 5-shot meta-test accuracy +- 95% CI.

Two tables: the configured zoo (``homogeneous``) and a heterogeneous zoo whose teachers cycle over
``--mixed-archs`` (Conv4 and ResNet-10 by default). Every (zoo, seed) trains its teacher zoo once;
every method then runs ``metatrain`` and ``metatest`` on a copy of it, under
``paths.artifacts_dir/<zoo>/seed<s>/<method>``. The stages' fingerprints make an interrupted
benchmark resume where it stopped.

With several seeds (``seed`` = 0..n-1: teacher zoo, initialisations and pseudo tasks change; the
meta-test episodes do not, ``evaluate.seed`` is fixed), a cell is the mean over seeds and its CI is
``1.96 * std / sqrt(n)`` over all seeds' episodes pooled. ``paired_vs_free`` is the mean per-episode
difference to FREE on the same episodes, +- its CI.
"""

from __future__ import annotations

import importlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from free.artifacts import read_json
from free.bench.common import pyplot, savefig
from free.config import to_yaml
from free.config.schema import Config
from free.data.base import Progress
from free.evaluate import summarize

ROWS = {
    "free": "FREE",
    "free_noalign": "FREE w/o alignment",
    "scratch": "scratch + same learner",
    "random_init": "random init",
    "oracle": "oracle (real data)",
}


def run(
    configs: Callable[[list[str]], Config],
    seeds: int,
    mixed_archs: list[str] | None,
    progress: Progress | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``configs(extra_overrides)`` composes the user's config plus ``extra_overrides``."""
    zoos = {"homogeneous": []}
    if mixed_archs:
        zoos["heterogeneous"] = [f"teachers.archs=[{','.join(mixed_archs)}]"]
    tables: dict[str, Any] = {}
    first = configs([])
    for zoo, zoo_overrides in zoos.items():
        runs: dict[str, list[dict[str, Any]]] = {method: [] for method in ROWS}
        for seed in range(seeds):
            base = Path(first.paths.artifacts_dir) / zoo / f"seed{seed}"
            shared = [*zoo_overrides, f"seed={seed}", f"paths.artifacts_dir={base / 'zoo'}"]
            say(f"[{zoo}, seed {seed}] data + teacher zoo")
            _stage("data", configs([*shared, "method=free"]), progress)
            _stage("teachers", configs([*shared, "method=free"]), progress)
            for method in ROWS:
                root = base / method
                for part in ("data", "teachers"):  # the same zoo for every row
                    shutil.copytree(base / "zoo" / part, root / part, dirs_exist_ok=True)
                extra = ["metalearn.iterations=0"] if method == "random_init" else []  # its preset's meaning
                cfg = configs(
                    [*zoo_overrides, f"seed={seed}", f"paths.artifacts_dir={root}", f"method={method}", *extra]
                )
                say(f"[{zoo}, seed {seed}] {ROWS[method]}")
                started = time.perf_counter()
                _stage("metatrain", cfg, progress)
                _stage("metatest", cfg, progress)
                runs[method].append(_collect(root, time.perf_counter() - started))
        tables[zoo] = {"overrides": zoo_overrides, "rows": _table(runs)}
    return {"rows": ROWS, "seeds": seeds, "tables": tables, "config": to_yaml(first)}


def _stage(name: str, cfg: Config, progress: Progress | None) -> None:
    importlib.import_module(f"free.stages.{name}").run(cfg, progress=progress)


def _collect(root: Path, seconds: float) -> dict[str, Any]:
    """One method's outcome from the files its stages wrote."""
    card = read_json(root / "metalearner" / "card.json")
    curves = read_json(root / "metalearner" / "curves.json")
    return {
        "metrics": read_json(root / "metrics" / "metatest.json"),
        "episodes": read_json(root / "metrics" / "metatest_episodes.json"),
        "best_val_acc": card.get("best_val_acc"),
        "iterations": card.get("iterations"),
        "metatrain_seconds": sum(c.get("seconds", 0.0) for c in curves),
        "wall_seconds_this_run": seconds,  # ~0 when the stages were already done (resumed benchmark)
    }


def _table(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method and setting: mean over seeds, pooled CI, per-seed values, paired difference to FREE."""
    table: dict[str, Any] = {}
    settings = list(runs["free"][0]["episodes"])
    free = {key: torch.tensor([a for r in runs["free"] for a in r["episodes"][key]]) for key in settings}
    for method, per_seed in runs.items():
        row: dict[str, Any] = {
            "label": ROWS[method],
            "metatrain_seconds": [r["metatrain_seconds"] for r in per_seed],
            "iterations": [r["iterations"] for r in per_seed],
        }
        for key in settings:
            pooled = torch.tensor([a for r in per_seed for a in r["episodes"][key]])
            seed_means = [r["metrics"][key]["acc"] for r in per_seed]
            row[key] = {
                "acc": sum(seed_means) / len(seed_means),
                "ci95": summarize(pooled)["ci95"],
                "per_seed": seed_means,
                "paired_vs_free": summarize(pooled - free[key]) if method != "free" else None,
            }
        table[method] = row
    return table


def plot(result: dict[str, Any], json_path: Path) -> Path:
    """One panel per zoo: a bar per method and setting, with its CI."""
    plt = pyplot()
    tables = result["tables"]
    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 4), squeeze=False)
    for ax, (zoo, table) in zip(axes[0], tables.items(), strict=True):
        methods = list(table["rows"])
        settings = [k for k in table["rows"]["free"] if k.endswith("shot")]
        for i, key in enumerate(settings):
            xs = [j + 0.4 * i for j in range(len(methods))]
            ax.bar(
                xs,
                [table["rows"][m][key]["acc"] for m in methods],
                width=0.38,
                yerr=[table["rows"][m][key]["ci95"] for m in methods],
                capsize=3,
                label=key,
            )
        ax.set_xticks([j + 0.2 for j in range(len(methods))], methods, rotation=20)
        ax.set(ylabel="meta-test accuracy", title=f"{zoo} zoo, {result['seeds']} seed(s)", ylim=(0, 1))
        ax.legend(fontsize=8)
    return savefig(fig, json_path)
