"""``free bench tune``: choose hyperparameters on meta-val only.

A grid of overrides (``--grid metalearn.inner_lr=0.05,0.1``, several ``--grid`` options make the
cartesian product) is meta-trained point by point, and each point is scored by what ``metatrain``
itself selects its checkpoint on: ``best_val_acc`` of its card, the mean accuracy on episodes of
real *meta-val* images. Nothing here runs ``metatest`` or touches the meta-test classes' images:
this module calls only the ``data``, ``teachers`` and ``metatrain`` stages (a test checks its imports
and that no ``metrics/`` folder appears), so a tuned value cannot have seen meta-test numbers.

Layout under ``paths.artifacts_dir`` (the bench work dir): ``seed<s>/zoo`` holds the data manifest
and the teacher zoo, trained once per seed and copied into every point's folder
``seed<s>/<point>``; each point then runs ``data`` and ``teachers`` again (a no-op by fingerprint
unless the grid changes their settings) and ``metatrain``. The stages' fingerprints make an
interrupted sweep resume where it stopped.

Score of a point: the mean over seeds (``seed`` = base seed + 0..n-1) of ``best_val_acc``, +- a
95% interval over seeds (``1.96 * std / sqrt(n)``). metatrain keeps only the mean of each
validation, not its episodes, so the interval is over seeds; with one seed there is none. Note that
``best_val_acc`` is a maximum over validations, hence optimistic for every point alike; it ranks
points, it does not estimate accuracy on new classes.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from free.artifacts import read_json
from free.bench.common import pyplot, savefig
from free.config import ConfigError, to_yaml
from free.config.compose import override_key
from free.config.schema import Config
from free.data.base import Progress
from free.stages import data, metatrain, teachers

#: Keys a grid may not vary: the bench owns them (seeds come from ``--seeds``, folders from the bench).
RESERVED = ("seed", "paths.artifacts_dir")

Grid = dict[str, list[str]]


def parse_grid(specs: list[str]) -> Grid:
    """``["a.b=1,2", "c=x"]`` -> ``{"a.b": ["1", "2"], "c": ["x"]}``, in the order given.

    Commas inside brackets or quotes belong to a value (``teachers.archs=[conv4,resnet10],[conv4]``
    is two values). Whether a key exists is checked later, when each point's config is composed.

    Raises:
        ConfigError: naming the spec that has no ``=``, an empty key or value, a repeated or
            reserved key, or no spec at all.
    """
    if not specs:
        raise ConfigError("--grid is required: e.g. --grid metalearn.inner_lr=0.05,0.1")
    grid: Grid = {}
    for spec in specs:
        key, sep, values_text = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid {spec!r}: expected KEY=v1,v2,... (e.g. metalearn.inner_lr=0.05,0.1)")
        if key in RESERVED:
            raise ConfigError(f"--grid {spec!r}: {key} is set by the bench (seeds: --seeds); grid other keys")
        if key in grid:
            raise ConfigError(f"--grid {spec!r}: {key} appears in two --grid options; list its values once")
        values = _split_values(values_text)
        if not values or any(not v for v in values):
            raise ConfigError(f"--grid {spec!r}: empty value (values are comma-separated, none empty)")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {spec!r}: a value is repeated")
        grid[key] = values
    return grid


def _split_values(text: str) -> list[str]:
    """Split at commas outside brackets and quotes; strip each value."""
    values, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return values


def grid_points(grid: Grid) -> list[dict[str, str]]:
    """Every combination, the last key varying fastest (``itertools.product`` order)."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def point_overrides(point: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in point.items()]


def point_label(point: dict[str, str]) -> str:
    return " ".join(point_overrides(point))


def point_dir(point: dict[str, str]) -> str:
    """A folder name that reads like the point and stays the same when the grid grows (so a sweep
    with more values resumes the old points); a short hash keeps sanitised names apart. No ``=`` or
    ``,``: the folder goes into a Hydra override (``paths.artifacts_dir=...``), whose grammar they break."""
    label = ",".join(point_overrides(point))
    safe = "__".join(f"{key}-{value}" for key, value in point.items())
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", safe)[:80]
    return f"{safe}-{hashlib.sha256(label.encode()).hexdigest()[:6]}"


def check_overrides(given: list[str], grid: Grid) -> None:
    """A key both fixed by an override and swept by the grid is ambiguous: say which."""
    both = sorted({override_key(o) for o in given} & set(grid))
    if both:
        raise ConfigError(f"{', '.join(both)} is both an override and a --grid key; give it only in --grid")


def _needs_zoo(cfg: Config) -> bool:
    """Whether metatrain reads the teacher zoo (oracle and random init do not; see metatrain.load_zoo)."""
    return cfg.metalearn.data != "real" and cfg.metalearn.iterations > 0


def run(
    configs: Callable[[list[str]], Config],
    grid: Grid,
    seeds: int,
    progress: Progress | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``configs(extra_overrides)`` composes the user's config plus ``extra_overrides``.

    Every point's config is composed before any work, so an unknown key or a bad value fails at once.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    first = configs([])
    work, base_seed = Path(first.paths.artifacts_dir), first.seed
    points = grid_points(grid)
    checked = [configs(point_overrides(p)) for p in points]  # fail fast on a bad point
    needs_zoo = any(_needs_zoo(cfg) for cfg in checked)
    runs: list[list[dict[str, Any]]] = [[] for _ in points]
    for seed in range(base_seed, base_seed + seeds):
        base = work / f"seed{seed}"
        zoo_cfg = configs([f"seed={seed}", f"paths.artifacts_dir={base / 'zoo'}"])
        say(f"seed {seed}: data" + (" + teacher zoo" if needs_zoo else ""))
        data.run(zoo_cfg, progress=progress)
        if needs_zoo:
            teachers.run(zoo_cfg, progress=progress)
        for i, point in enumerate(points):
            root = base / point_dir(point)
            for part in ("data", "teachers"):  # the seed's zoo, shared by every point
                if (base / "zoo" / part).is_dir():
                    shutil.copytree(base / "zoo" / part, root / part, dirs_exist_ok=True)
            cfg = configs([*point_overrides(point), f"seed={seed}", f"paths.artifacts_dir={root}"])
            say(f"seed {seed}: {point_label(point)}")
            started = time.perf_counter()
            data.run(cfg, progress=progress)  # no-op content unless the point changes the data settings
            if _needs_zoo(cfg):
                teachers.run(cfg, progress=progress)  # fingerprint: retrains only if the point changes teachers.*
            metatrain.run(cfg, progress=progress)
            runs[i].append({"seed": seed, **_collect(root, time.perf_counter() - started)})
    rows = [_row(point, per_seed) for point, per_seed in zip(points, runs, strict=True)]
    rows.sort(key=lambda r: -r["val_acc"])  # stable: ties keep the grid's order
    return {
        "selected_on": "meta-val",
        "grid": grid,
        "seeds": seeds,
        "rows": rows,
        "best": rows[0]["point"],
        "config": to_yaml(first),
    }


def _collect(root: Path, seconds: float) -> dict[str, Any]:
    """One point's outcome from what metatrain wrote (its card and curves; nothing of meta-test)."""
    card = read_json(root / "metalearner" / "card.json")
    curves = read_json(root / "metalearner" / "curves.json")
    return {
        "best_val_acc": card["best_val_acc"],
        "best_iteration": card["best_iteration"],
        "iterations": card["iterations"],
        "val_curve": [[c["iteration"], c["val_acc"]] for c in curves if "val_acc" in c],
        "metatrain_seconds": sum(c.get("seconds", 0.0) for c in curves),
        "wall_seconds_this_run": seconds,  # ~0 when the point was already done (resumed sweep)
    }


def _row(point: dict[str, str], per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    accs = [r["best_val_acc"] for r in per_seed]
    if any(a is None for a in accs):  # 0 iterations: metatrain never validated
        raise ConfigError(f"{point_label(point)}: metatrain ran no validation (metalearn.iterations=0?)")
    mean = sum(accs) / len(accs)
    ci95 = None
    if len(accs) > 1:
        std = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5
        ci95 = 1.96 * std / len(accs) ** 0.5
    return {"point": point, "label": point_label(point), "val_acc": mean, "ci95": ci95, "per_seed": per_seed}


def plot(result: dict[str, Any], json_path: Path) -> Path:
    """Left: each point's meta-val accuracy (best marked); right: its validation curves, seed 0."""
    plt = pyplot()
    rows = result["rows"]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    ys = list(range(len(rows)))[::-1]
    bars.barh(
        ys,
        [r["val_acc"] for r in rows],
        xerr=[r["ci95"] or 0.0 for r in rows],
        color=["tab:green" if i == 0 else "tab:blue" for i in range(len(rows))],
        capsize=3,
    )
    bars.set_yticks(ys, [r["label"] for r in rows], fontsize=8)
    bars.set(xlabel=f"best meta-val accuracy (mean of {result['seeds']} seed(s))", xlim=(0, 1))
    for r in rows:
        its, accs = zip(*r["per_seed"][0]["val_curve"], strict=True) if r["per_seed"][0]["val_curve"] else ((), ())
        curves.plot(its, accs, marker="o", label=r["label"])
    curves.set(xlabel="meta-iteration", ylabel="meta-val accuracy (first seed)", ylim=(0, 1))
    curves.legend(fontsize=7)
    return savefig(fig, json_path)
