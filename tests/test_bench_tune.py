"""``free bench tune``: the grid against a naive cartesian product, its errors, that it never reaches
the meta-test split, and one short sweep end to end on the tiny preset (real Omniglot)."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from free.bench import report, tune
from free.cli import app
from free.config import ConfigError
from free.stages import data, metatrain, teachers

runner = CliRunner()


# ------------------------------------------------------------------------------------------- grid


def test_grid_points_are_the_cartesian_product_in_order() -> None:
    grid = tune.parse_grid(["a.x=1,2,3", "b=p,q", "c.y=z"])
    assert grid == {"a.x": ["1", "2", "3"], "b": ["p", "q"], "c.y": ["z"]}
    naive = []
    for x in grid["a.x"]:
        for b in grid["b"]:
            for y in grid["c.y"]:
                naive.append({"a.x": x, "b": b, "c.y": y})
    assert tune.grid_points(grid) == naive
    assert tune.point_overrides(naive[0]) == ["a.x=1", "b=p", "c.y=z"]


def test_grid_values_keep_commas_inside_brackets_and_quotes() -> None:
    grid = tune.parse_grid(["teachers.archs=[conv4,resnet10], [conv4]", "tag='a,b',c"])
    assert grid == {"teachers.archs": ["[conv4,resnet10]", "[conv4]"], "tag": ["'a,b'", "c"]}


@pytest.mark.parametrize(
    ("specs", "culprit"),
    [
        ([], "--grid is required"),
        (["metalearn.inner_lr"], "'metalearn.inner_lr'"),  # no '='
        (["=0.1,0.2"], "'=0.1,0.2'"),  # no key
        (["metalearn.inner_lr="], "empty value"),
        (["metalearn.inner_lr=0.1,,0.2"], "empty value"),
        (["metalearn.inner_lr=0.1,0.1"], "repeated"),
        (["metalearn.inner_lr=0.1", "metalearn.inner_lr=0.2"], "two --grid options"),
        (["seed=0,1"], "--seeds"),
    ],
)
def test_bad_grid_is_an_error_naming_the_culprit(specs: list[str], culprit: str) -> None:
    with pytest.raises(ConfigError, match=culprit.replace("[", r"\[")):
        tune.parse_grid(specs)


def test_point_folders_are_distinct_and_free_of_hydra_syntax() -> None:
    points = tune.grid_points(tune.parse_grid(["teachers.archs=[a,b],[a]", "metalearn.inner_lr=0.1,0.2"]))
    names = [tune.point_dir(p) for p in points]
    assert len(set(names)) == len(names)
    assert not any(ch in name for name in names for ch in "=,[]/ ")  # they go into paths.artifacts_dir=...


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["--grid", "metalearn.no_such_key=1,2"], "no_such_key"),  # unknown key: the composer's error
        (["--grid", "metalearn.inner_lr"], "metalearn.inner_lr"),
        (["metalearn.inner_lr=0.3", "--grid", "metalearn.inner_lr=0.1,0.2"], "both an override and a --grid key"),
    ],
)
def test_bad_grid_reaches_the_terminal_as_a_config_error(args: list[str], culprit: str, tmp_path: Path) -> None:
    # Every point is composed before any stage runs, so these fail without data or training.
    result = runner.invoke(app, ["bench", "tune", "experiment=tiny", f"paths.artifacts_dir={tmp_path}", *args])
    assert result.exit_code == 2, result.output
    assert "config error" in result.output and culprit in result.output
    assert "Traceback" not in result.output
    assert not any(tmp_path.iterdir())  # nothing ran


# ----------------------------------------------------------------------------- meta-test stays out


def _imports_and_test_subscripts(module) -> tuple[set[str], int]:
    tree = ast.parse(inspect.getsource(module))
    imported: set[str] = set()
    subscripts = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "test":
            subscripts += 1
    return imported, subscripts


@pytest.mark.parametrize("module", [tune, data, teachers, metatrain], ids=lambda m: m.__name__)
def test_tune_and_the_stages_it_runs_never_touch_the_meta_test_split(module) -> None:
    imported, test_subscripts = _imports_and_test_subscripts(module)
    assert not any("metatest" in name or name.endswith(".evaluate.summarize") for name in imported), imported
    assert test_subscripts == 0  # no splits["test"]


def test_importing_tune_does_not_load_the_metatest_stage() -> None:
    code = "import sys, free.bench.tune; print('free.stages.metatest' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "False"


# ------------------------------------------------------------------------------------ end to end

TINY = [
    "experiment=tiny",
    "method=free",
    "threads=1",
    "teachers.n_teachers=2",
    "teachers.max_epochs=2",
    "inversion.inner_steps=2",
    "metalearn.iterations=4",
    "metalearn.val_every=2",
    "metalearn.val_episodes=3",
    "evaluate.episodes=2",
]


def test_bench_tune_end_to_end(real_omniglot_root: Path, tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "tune.json"
    args = [
        "bench",
        "tune",
        *TINY,
        f"dataset.root={real_omniglot_root}",
        f"paths.artifacts_dir={work}",
        "--grid",
        "metalearn.inner_lr=0.0001,0.4",  # barely adapts (near chance, 0.2) vs adapts: a ranking that cannot tie
        "--out",
        str(out),
    ]
    first = runner.invoke(app, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output

    cards = {p.parent.parent.name: json.loads(p.read_text()) for p in work.glob("seed0/*/metalearner/card.json")}
    assert len(cards) == 2 and all(c["selected_on"] == "meta-val" for c in cards.values())
    assert all(isinstance(c["best_val_acc"], float) for c in cards.values())
    # Never meta-tested: no metrics anywhere under the work dir.
    assert not list(work.rglob("metatest*.json")) and not list(work.rglob("metrics"))
    # One zoo for the seed, copied into both points (not retrained there).
    zoo = json.loads((work / "seed0" / "zoo" / "teachers" / "zoo.json").read_text())
    for name in cards:
        assert json.loads((work / "seed0" / name / "teachers" / "zoo.json").read_text()) == zoo

    result = json.loads(out.read_text())
    assert result["benchmark"] == "tune" and result["selected_on"] == "meta-val"
    acc = {name: card["best_val_acc"] for name, card in cards.items()}  # by point folder
    values = result["grid"]["metalearn.inner_lr"]
    ranked = sorted(values, key=lambda v: -acc[tune.point_dir({"metalearn.inner_lr": v})])
    assert [r["point"]["metalearn.inner_lr"] for r in result["rows"]] == ranked  # by meta-val, best first
    assert ranked == ["0.4", "0.0001"] and result["rows"][0]["val_acc"] > result["rows"][1]["val_acc"]
    assert [r["val_acc"] for r in result["rows"]] == [acc[tune.point_dir(r["point"])] for r in result["rows"]]
    assert result["best"] == result["rows"][0]["point"]
    assert out.with_suffix(".png").is_file()
    table = report.render(out)
    assert table in first.output and "(best)" in table.splitlines()[4]  # header, blank, 2 table heads, then rank 1

    again = runner.invoke(app, args, catch_exceptions=False)  # fingerprints: nothing retrains
    assert again.exit_code == 0, again.output
    rerun = json.loads(out.read_text())
    assert [(r["label"], r["val_acc"]) for r in rerun["rows"]] == [(r["label"], r["val_acc"]) for r in result["rows"]]
