"""``free bench accuracy``: the method table - FREE (two update rules) against its ablations, the data-free
baselines and two bounds, one learner per shot, with paired differences.

Rows (:data:`ROWS`, each a set of overrides through the same stage code, ``metatrain`` + ``metatest``):
FREE with our first-order update and with the authors' update (``metalearn.update=official``), each
with and without gradient alignment; from-scratch inversion at equal iterations and at equal wall
time; pixels (DeepInversion-style); random initialisation (no meta-training); oracle (the same
learner on real meta-train images; not data-free).

Separate learners per shot, as the paper: for each ``k`` in ``evaluate.shots`` a learner meta-trained
on k-shot pseudo tasks (``metalearn.k_shot=k``, under ``.../<row>/k<k>``) gives the ``5way_<k>shot``
column. The smallest-shot learner (the "1-shot learner") is also tested at every other shot: the
``5way_<k>shot_from_1shot_learner`` columns. random_init trains nothing: its one run fills every
column. A k-shot learner whose ``k + metalearn.q_query`` does not fit ``taskcache.images_per_slot``
(a bank slot must hold a whole support + query set) gets a lower ``metalearn.q_query``, recorded.

Equal wall time: ``scratch_equal_time`` runs as many from-scratch iterations as fit in the same seed's
and shot's FREE meta-training seconds (sum of its steps' seconds, validation excluded), at the
``scratch`` row's measured seconds per iteration.

Two tables: the configured zoo (``homogeneous``) and a heterogeneous zoo whose teachers cycle over
``--mixed-archs``. Every (zoo, seed) trains its teacher zoo once; every row copies it. The stages'
fingerprints make an interrupted benchmark resume where it stopped.

Seeds ``0..n-1`` change the teacher zoo, initialisations and pseudo tasks; the meta-test episodes do
not (``evaluate.seed`` is fixed, a setting's episodes depend only on it and the shot). A cell is the
mean over seeds, its CI ``1.96 * std / sqrt(n)`` over all seeds' episodes pooled. ``paired_vs_free``
is the mean per-episode difference to FREE (first-order) on the same episodes, +- its CI;
``paired_vs_best_baseline`` (FREE variants) the same against the data-free baseline with the highest
mean in that column - the comparison behind the paper's "+1.4 to +4.8 points".
"""

from __future__ import annotations

import importlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from free.artifacts import read_json
from free.bench.common import pyplot, savefig
from free.config import ConfigError, to_yaml
from free.config.schema import Config
from free.data.base import Progress
from free.evaluate import setting_key, summarize


@dataclass(frozen=True)
class Row:
    label: str
    overrides: tuple[str, ...]


ROWS: dict[str, Row] = {
    # The update rule named, so a user's metalearn.update=... cannot relabel these two rows.
    "free": Row("FREE (ours: first-order)", ("method=free", "metalearn.update=first_order")),
    "free_noalign": Row("FREE w/o alignment (first-order)", ("method=free_noalign", "metalearn.update=first_order")),
    "free_official": Row("FREE (authors' update)", ("method=free", "metalearn.update=official")),
    "free_official_noalign": Row(
        "FREE w/o alignment (authors' update)", ("method=free_noalign", "metalearn.update=official")
    ),
    "scratch": Row("scratch, equal iterations", ("method=scratch",)),
    # Its iterations and val_every are set per seed and shot from the free and scratch runs.
    "scratch_equal_time": Row("scratch, equal wall time", ("method=scratch",)),
    "pixels": Row("pixels (DeepInversion-style)", ("method=pixels",)),
    "random_init": Row("random init", ("method=random_init", "metalearn.iterations=0")),
    # official needs pseudo data (free/config/validate.py): the oracle learns with our update whatever the user set.
    "oracle": Row("oracle (real data)", ("method=oracle", "metalearn.update=first_order")),
}
FREE_VARIANTS = ("free", "free_noalign", "free_official", "free_official_noalign")
DATA_FREE_BASELINES = ("scratch", "scratch_equal_time", "pixels")
NEEDS = {"scratch_equal_time": ("free", "scratch")}


def select_rows(keys: list[str] | None) -> tuple[list[str], list[str]]:
    """The rows to run, in table order, and the ones added because a chosen row needs them.

    Raises:
        ValueError: an unknown key (the message lists the known ones).
    """
    chosen = list(ROWS) if not keys else keys
    unknown = [k for k in chosen if k not in ROWS]
    if unknown:
        raise ValueError(f"unknown row(s) {', '.join(unknown)}; known: {', '.join(ROWS)}")
    added = [need for k in chosen for need in NEEDS.get(k, ()) if need not in chosen]
    wanted = set(chosen) | set(added)
    return [k for k in ROWS if k in wanted], list(dict.fromkeys(added))


def fit_q_query(k_shot: int, q_query: int, images_per_slot: int) -> int:
    """``metalearn.q_query`` for a k-shot learner: unchanged when ``k + q`` fits a bank slot, else
    lowered to fit (a fresh teacher's class holds one slot when its pseudo tasks are drawn)."""
    if k_shot + q_query <= images_per_slot:
        return q_query
    if images_per_slot - k_shot < 1:
        raise ConfigError(
            f"invalid configuration:\n  taskcache.images_per_slot: a {k_shot}-shot learner needs "
            f"metalearn.k_shot + metalearn.q_query >= {k_shot + 1} images per class and bank slot, but "
            f"taskcache.images_per_slot={images_per_slot}; raise it (and inversion.images_per_class) or drop "
            f"{k_shot} from evaluate.shots"
        )
    return images_per_slot - k_shot


def equal_time_iterations(free_seconds: float, scratch_seconds: float, scratch_iterations: int) -> int:
    """How many from-scratch iterations fit in FREE's meta-training seconds (at least 1)."""
    if scratch_iterations < 1 or scratch_seconds <= 0:
        raise ConfigError(
            f"invalid configuration:\n  metalearn.iterations: scratch_equal_time needs a measured scratch run "
            f"(got {scratch_iterations} iterations in {scratch_seconds} s); the scratch row must meta-train at "
            "least one iteration"
        )
    return max(1, math.floor(free_seconds * scratch_iterations / scratch_seconds))


def scaled_val_every(val_every: int, iterations: int, new_iterations: int) -> int:
    """``val_every`` for a run of ``new_iterations`` that validates about as often as one of ``iterations``."""
    return max(1, round(val_every * new_iterations / max(iterations, 1)))


def run(
    configs: Callable[[list[str]], Config],
    seeds: int,
    mixed_archs: list[str] | None,
    rows: list[str] | None = None,
    progress: Progress | None = None,
    say: Callable[[str], None] = print,
    first_seed: int = 0,
) -> dict[str, Any]:
    """``configs(extra_overrides)`` composes the user's config plus ``extra_overrides`` (which win).

    Seeds ``first_seed .. first_seed + seeds - 1``, each in its own ``seed<s>`` folder: two processes
    given disjoint seeds can share one artifacts folder, and a later run over all of them finds every
    stage done (fingerprints) and only gathers the table."""
    keys, added = select_rows(rows)
    if added:
        say(f"rows {', '.join(added)} added: {', '.join(k for k in keys if k in NEEDS)} is measured against them")
    first = configs([])
    shots = list(dict.fromkeys(first.evaluate.shots))
    base_shot = min(shots)
    learners = {
        k: {"k_shot": k, "q_query": fit_q_query(k, first.metalearn.q_query, first.taskcache.images_per_slot)}
        for k in shots
    }
    for k, learner in learners.items():
        if learner["q_query"] != first.metalearn.q_query:
            learner["q_query_lowered_from"] = first.metalearn.q_query
            say(
                f"{k}-shot learner: metalearn.q_query {first.metalearn.q_query} -> {learner['q_query']} (fits "
                f"taskcache.images_per_slot={first.taskcache.images_per_slot})"
            )
    zoos = {"homogeneous": []}
    if mixed_archs:
        zoos["heterogeneous"] = [f"teachers.archs=[{','.join(mixed_archs)}]"]
    tables: dict[str, Any] = {}
    for zoo, zoo_overrides in zoos.items():
        runs: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
        for seed in range(first_seed, first_seed + seeds):
            base = Path(first.paths.artifacts_dir) / zoo / f"seed{seed}"
            shared = [*zoo_overrides, f"seed={seed}"]
            say(f"[{zoo}, seed {seed}] data + teacher zoo")
            zoo_cfg = configs([*shared, f"paths.artifacts_dir={base / 'zoo'}", "method=free"])
            _stage("data", zoo_cfg, progress)
            _stage("teachers", zoo_cfg, progress)
            done = _seed(configs, keys, base, shared, shots, learners, first.metalearn.val_every, progress, say)
            for key in keys:
                runs[key].append(seed_record(done[key], shots, base_shot, first.evaluate.n_way))
        tables[zoo] = {"overrides": zoo_overrides, **table(runs)}
    return {
        "rows": {key: ROWS[key].label for key in keys},
        "row_overrides": {key: list(ROWS[key].overrides) for key in keys},
        "rows_added": added,
        "seeds": seeds,
        "first_seed": first_seed,
        "shots": shots,
        "base_shot": base_shot,
        "learners": {str(k): v for k, v in learners.items()},
        "tables": tables,
        "config": to_yaml(first),
    }


def _seed(
    configs: Callable[[list[str]], Config],
    keys: list[str],
    base: Path,
    shared: list[str],
    shots: list[int],
    learners: dict[int, dict[str, Any]],
    val_every: int,
    progress: Progress | None,
    say: Callable[[str], None],
) -> dict[str, dict[int, dict[str, Any]]]:
    """Every row's learners on one (zoo, seed), whose zoo is under ``base / "zoo"``: row -> shot -> outcome."""
    base_shot = min(shots)
    done: dict[str, dict[int, dict[str, Any]]] = {}
    for key in keys:
        done[key] = {}
        for k in [base_shot] if key == "random_init" else shots:
            root = base / key / f"k{k}"
            for part in ("data", "teachers"):  # the same zoo for every row and learner
                shutil.copytree(base / "zoo" / part, root / part, dirs_exist_ok=True)
            extra = _learner_overrides(k, base_shot, shots, learners[k]["q_query"])
            if key == "scratch_equal_time":
                budget = _equal_time(done["free"][k], done["scratch"][k], val_every)
                extra += [f"metalearn.iterations={budget['iterations']}", f"metalearn.val_every={budget['val_every']}"]
            cfg = configs([*shared, f"paths.artifacts_dir={root}", *ROWS[key].overrides, *extra])
            say(f"[{base.parent.name}, {base.name}] {ROWS[key].label}, {k}-shot learner")
            started = time.perf_counter()
            _stage("metatrain", cfg, progress)
            _stage("metatest", cfg, progress)
            done[key][k] = _collect(root, time.perf_counter() - started)
            if key == "scratch_equal_time":
                done[key][k]["equal_time"] = budget
    return done


def _learner_overrides(k: int, base_shot: int, shots: list[int], q_query: int) -> list[str]:
    """The k-shot learner's task shape; only the base learner is tested at every shot."""
    tested = shots if k == base_shot else [k]
    return [f"metalearn.k_shot={k}", f"metalearn.q_query={q_query}", f"evaluate.shots=[{','.join(map(str, tested))}]"]


def _equal_time(free: dict[str, Any], scratch: dict[str, Any], val_every: int) -> dict[str, Any]:
    iterations = equal_time_iterations(free["metatrain_seconds"], scratch["metatrain_seconds"], scratch["iterations"])
    return {
        "iterations": iterations,
        "val_every": scaled_val_every(val_every, scratch["iterations"], iterations),
        "free_metatrain_seconds": free["metatrain_seconds"],
        "scratch_seconds_per_iteration": scratch["metatrain_seconds"] / scratch["iterations"],
    }


def _stage(name: str, cfg: Config, progress: Progress | None) -> None:
    importlib.import_module(f"free.stages.{name}").run(cfg, progress=progress)


def _collect(root: Path, seconds: float) -> dict[str, Any]:
    """One learner's outcome from the files its stages wrote."""
    card = read_json(root / "metalearner" / "card.json")
    curves = read_json(root / "metalearner" / "curves.json")
    return {
        "episodes": read_json(root / "metrics" / "metatest_episodes.json"),
        "best_val_acc": card.get("best_val_acc"),
        "selected_on": card.get("selected_on"),
        "iterations": card.get("iterations"),
        "k_shot": card.get("k_shot"),
        "metatrain_seconds": sum(c.get("seconds", 0.0) for c in curves),
        "wall_seconds_this_run": seconds,  # ~0 when the stages were already done (resumed benchmark)
    }


def seed_record(learners: dict[int, dict[str, Any]], shots: list[int], base_shot: int, n_way: int) -> dict[str, Any]:
    """One row's seed as table columns: ``5way_<k>shot`` from the k-shot learner (the base learner when
    the row has only that one), ``5way_<k>shot_from_<b>shot_learner`` from the base learner at k != b."""
    columns: dict[str, list[float]] = {}
    for k in shots:
        learner = learners.get(k, learners[base_shot])
        columns[setting_key(n_way, k)] = learner["episodes"][setting_key(n_way, k)]
    for k in shots:
        if k != base_shot:
            key = setting_key(n_way, k)
            columns[f"{key}_from_{base_shot}shot_learner"] = learners[base_shot]["episodes"][key]
    per_learner = {str(k): {n: v for n, v in r.items() if n != "episodes"} for k, r in learners.items()}
    return {"columns": columns, "learners": per_learner}


def _pooled(per_seed: list[dict[str, Any]], column: str) -> torch.Tensor:
    return torch.tensor([a for r in per_seed for a in r["columns"][column]], dtype=torch.float64)


def table(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per row and column: mean over seeds, pooled CI, per-seed means, paired differences.

    Args:
        runs: row key -> one :func:`seed_record` per seed (same seeds, same episodes, in order).

    Returns:
        ``{"rows": {key: {"label", "learners", <column>: cell}}, "best_baseline": {column: key}}``
    """
    first = next(iter(runs.values()))
    columns = list(first[0]["columns"])
    cells = {
        key: {
            c: {"acc": _mean([_mean(r["columns"][c]) for r in per_seed]), "pooled": _pooled(per_seed, c)}
            for c in columns
        }
        for key, per_seed in runs.items()
    }
    best = {c: best_baseline({k: cells[k][c]["acc"] for k in DATA_FREE_BASELINES if k in cells}) for c in columns}
    rows: dict[str, Any] = {}
    for key, per_seed in runs.items():
        row: dict[str, Any] = {"label": ROWS[key].label, "learners": [r["learners"] for r in per_seed]}
        for c in columns:
            pooled = cells[key][c]["pooled"]
            cell: dict[str, Any] = {
                "acc": cells[key][c]["acc"],
                "ci95": summarize(pooled)["ci95"],
                "per_seed": [_mean(r["columns"][c]) for r in per_seed],
                "paired_vs_free": summarize(pooled - cells["free"][c]["pooled"])
                if "free" in cells and key != "free"
                else None,
            }
            if key in FREE_VARIANTS:
                b = best[c]
                cell["paired_vs_best_baseline"] = (
                    {"baseline": b, **summarize(pooled - cells[b][c]["pooled"])} if b is not None else None
                )
            row[c] = cell
        rows[key] = row
    return {"rows": rows, "best_baseline": best}


def best_baseline(means: dict[str, float]) -> str | None:
    """The data-free baseline with the highest mean (the first in table order on a tie); None if none ran."""
    return max(means, key=lambda k: (means[k], -DATA_FREE_BASELINES.index(k))) if means else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def plot(result: dict[str, Any], json_path: Path) -> Path:
    """One panel per zoo: a bar per row and column, with its CI."""
    plt = pyplot()
    tables = result["tables"]
    panel_width = max(6.0, 1.2 * len(result["rows"]) + 2)
    fig, axes = plt.subplots(len(tables), 1, figsize=(panel_width, 4.5 * len(tables)), squeeze=False)
    for ax, (zoo, tab) in zip(axes[:, 0], tables.items(), strict=True):
        keys = list(tab["rows"])
        columns = [c for c in tab["rows"][keys[0]] if "shot" in c]
        width = 0.8 / len(columns)
        for i, column in enumerate(columns):
            ax.bar(
                [j + width * i for j in range(len(keys))],
                [tab["rows"][k][column]["acc"] for k in keys],
                width=width * 0.95,
                yerr=[tab["rows"][k][column]["ci95"] for k in keys],
                capsize=2,
                label=column,
                hatch="//" if "from" in column else None,
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, rotation=25, ha="right")
        ax.set(ylabel="meta-test accuracy", title=f"{zoo} zoo, {result['seeds']} seed(s)", ylim=(0, 1.2))
        ax.legend(fontsize=7, ncols=len(columns), loc="upper left")  # above the bars (accuracy <= 1)
    return savefig(fig, json_path)
