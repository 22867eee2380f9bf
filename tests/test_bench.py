"""Benchmarks: their arithmetic against hand computations, and each command end to end on a tiny
setting (real Omniglot) producing the promised JSON keys and plot. No test here times anything."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from free import inversion
from free.bench import accuracy, recovery
from free.bench.common import PeakMemory, median, write_result
from free.cli import app
from free.inversion import InversionSettings, LossWeights, recover_pixels
from free.models import build_classifier

runner = CliRunner()
# Everything small: 3 teachers (2 seen in meta-training, 1 held out), 2 meta-iterations, 2 episodes.
TINY = [
    "experiment=tiny",
    "teachers.n_teachers=3",
    "teachers.max_epochs=2",
    "metalearn.iterations=2",
    "metalearn.val_every=1",
    "metalearn.val_episodes=2",
    "evaluate.episodes=2",
    "evaluate.inner_steps=1",
    "inversion.scratch_steps=3",
    "inversion.inner_steps=2",
]


def _invoke(args: list[str]):
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_median_treats_inf_as_not_reached() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, math.inf, 2.0]) == 2.0  # one of three not reached: still finite
    assert median([1.0, math.inf, math.inf]) == math.inf  # most not reached: no finite median


def _record(teacher: int, meta: float, scratch: float, pixels: float) -> dict:
    def measured(seconds: float) -> dict:
        reached = {"seconds": seconds, "steps": seconds * 10}
        return {
            "quality_target": reached,
            "acc90": reached,
            "acc95": reached,
            "seconds_per_step": 0.1,
            "at_standard_budget": {"seconds": 1.0, "quality": 1.0, "teacher_acc": 1.0},
            "curve": [[seconds if math.isfinite(seconds) else 50.0, 1.0, 1.0]],
        }

    return {"teacher": teacher, "meta": measured(meta), "scratch": measured(scratch), "pixels": measured(pixels)}


def test_speedup_is_the_ratio_of_medians_over_teachers_of_medians_over_seeds() -> None:
    records = [
        _record(0, 1.0, 10.0, 4.0),
        _record(0, 3.0, 30.0, 2.0),  # teacher 0: medians over seeds meta 2, scratch 20, pixels 3
        _record(1, 2.0, 40.0, 6.0),
        _record(1, 2.0, 60.0, 6.0),  # teacher 1: meta 2, scratch 50, pixels 6
        _record(2, 4.0, 80.0, math.inf),
        _record(2, 4.0, 80.0, math.inf),  # teacher 2: meta 4, scratch 80, pixels never
    ]
    summary = recovery._summarise(records)
    assert summary["meta"]["quality_target"]["seconds"] == 2.0  # median(2, 2, 4)
    assert summary["scratch"]["quality_target"]["seconds"] == 50.0  # median(20, 50, 80)
    assert summary["pixels"]["quality_target"]["seconds"] == 6.0  # median(3, 6, inf)
    assert summary["pixels"]["quality_target"]["reached"] == 4
    ratios = recovery._speedups(summary)
    assert ratios["speedup_vs_scratch"] == 25.0 and ratios["speedup_vs_pixels"] == 3.0
    assert not ratios["speedup_vs_scratch_is_lower_bound"]


def test_speedup_becomes_a_lower_bound_when_the_baseline_mostly_never_reaches_the_target() -> None:
    records = [_record(t, 1.0, math.inf, 5.0) for t in range(3)]  # scratch never reached; ran 50 s
    ratios = recovery._speedups(recovery._summarise(records))
    assert ratios["speedup_vs_scratch_is_lower_bound"]
    assert ratios["speedup_vs_scratch"] == 50.0


def test_first_reaching_reports_the_first_step_that_meets_the_target() -> None:
    rows = [{"step": s, "seconds": 0.5 * s, "quality": 5.0 - s} for s in range(6)]
    assert recovery.first_reaching(rows, lambda r: r["quality"] <= 2.0) == {"seconds": 1.5, "steps": 3}
    assert recovery.first_reaching(rows, lambda r: r["quality"] <= -1.0)["seconds"] == math.inf


def _rows(qualities: list[float], accs: list[float], dt: float) -> list[dict[str, float]]:
    """Probed rows of a synthetic recovery: ``dt`` seconds per step."""
    return [
        {"step": i, "seconds": dt * i, "quality": q, "ce": q, "bn": 0.0, "teacher_acc": a}
        for i, (q, a) in enumerate(zip(qualities, accs, strict=True))
    ]


def _stopped(rows: list[dict[str, float]], standard: int, target: float) -> list[dict[str, float]]:
    """The rows a run to ``target`` would have probed: QualityProbe's stop rule, written out."""
    for i, row in enumerate(rows):
        best = min(r["quality"] for r in rows[: i + 1])
        accurate = max(r["teacher_acc"] for r in rows[: i + 1]) >= 0.95
        if row["step"] >= standard and best <= target and accurate:
            return rows[: i + 1]
    return rows  # never: it ran to max_steps


def test_every_snapshots_speedups_from_one_long_baseline_run_equal_separate_runs_to_its_target() -> None:
    max_steps, standard, k = 60, 10, 2
    snapshots = {0: 1.0, 5: 0.5, 10: 0.3}  # meta-iterations -> the meta-generator's loss after K steps
    acc = [min(1.0, i / 30) for i in range(max_steps + 1)]  # 95% at step 29
    floors = {(0, 0): 0.1, (0, 1): 0.6, (1, 0): 0.4, (1, 1): 0.2}  # where each scratch run levels off
    raw, separate = [], {it: [] for it in snapshots}
    for (teacher, seed), floor in floors.items():
        scratch = _rows([floor + (2 - floor) * 0.9**i for i in range(max_steps + 1)], acc, 0.1)
        pixels = _rows([0.05 + 1.5 * 0.95**i for i in range(max_steps + 1)], acc, 0.01)
        metas = {
            it: {"standard_steps": k, "curve": _rows([3.0, 2.0, q, q], [0.5, 0.9, 0.96 - it / 100, 0.97], 0.1)}
            for it, q in snapshots.items()
        }
        hardest = min(snapshots.values())
        raw.append(
            {
                "teacher": teacher,
                "seed": seed,
                "target_quality": dict(snapshots),
                "meta": metas,
                "scratch": {"standard_steps": standard, "curve": _stopped(scratch, standard, hardest)},
                "pixels": {"standard_steps": standard, "curve": _stopped(pixels, standard, hardest)},
            }
        )
        for it, target in snapshots.items():  # the naive way: one baseline run per snapshot target
            record = {"teacher": teacher, "meta": recovery._measure(metas[it], target, True)}
            for method, rows in (("scratch", scratch), ("pixels", pixels)):
                run_ = {"standard_steps": standard, "curve": _stopped(rows, standard, target)}
                record[method] = recovery._measure(run_, target, False)
            separate[it].append(record)

    curve = recovery._curve(raw, snapshots)
    assert [e["iterations"] for e in curve] == [0, 5, 10]
    for entry in curve:
        expected = recovery._speedups(recovery._summarise(separate[entry["iterations"]]))
        for key, value in expected.items():
            assert value == pytest.approx(entry[key], nan_ok=True), (entry["iterations"], key)
    # Snapshot 5: teacher 0's second seed never gets to 0.5, so its median is a lower bound; the long
    # run of its first seed went on to 0.3, the separate one stopped at 0.5: the bound must not see it.
    assert curve[1]["speedup_vs_scratch_is_lower_bound"] and not curve[0]["speedup_vs_scratch_is_lower_bound"]
    assert curve[2]["meta_quality_after_k"] == 0.3 and curve[2]["meta_teacher_acc_after_k"] == pytest.approx(0.86)


def test_snapshots_default_to_five_spread_points_and_must_lie_in_the_run() -> None:
    assert recovery.default_snapshots(60) == (0, 15, 30, 45, 60)
    assert recovery.default_snapshots(2) == (0, 1, 2)
    assert recovery.snapshot_iterations(None, 100) == (0, 25, 50, 75, 100)
    assert recovery.snapshot_iterations([20, 0, 20], 60) == (0, 20, 60)  # the last one always measured
    with pytest.raises(ValueError, match=r"--snapshots .* 0\.\.60 \(metalearn.iterations\), got \[61\]"):
        recovery.snapshot_iterations([0, 61], 60)


@pytest.mark.parametrize(
    ("given", "message"), [("ten", "comma-separated meta-iteration counts"), ("0,5", "metalearn.iterations")]
)
def test_bench_recovery_rejects_bad_snapshots(given: str, message: str) -> None:
    result = runner.invoke(app, ["bench", "recovery", *TINY, "--snapshots", given])
    assert result.exit_code == 2 and "--snapshots" in result.output and message in result.output, result.output


class FakeClock:
    """A clock that moves 1 s per reading, plus whatever a test adds: no wall time involved."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_probe_stops_a_recovery_and_its_time_is_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    teacher = build_classifier("conv4", 1, 3, 16, 8, [0.5], [0.25], track_running_stats=True).eval()
    clock = FakeClock()
    monkeypatch.setattr(inversion, "clock", clock)
    calls: list[tuple[int, float]] = []

    def probe(step: int, x: torch.Tensor, seconds: float) -> bool:
        calls.append((step, seconds))
        clock.now += 100.0  # a slow probe: its time must not count as recovery time
        return step == 3

    settings = InversionSettings(steps=50, lr=0.05, weights=LossWeights(1.0, 0.1))
    r = recover_pixels(teacher, 16, 1, 3, 2, settings, torch.Generator().manual_seed(0), probe=probe)
    assert [s for s, _ in calls] == [0, 1, 2, 3] and len(r.curve) == 4
    # One clock reading per step of recovery time; counting the probe would add ~101 per step.
    assert [t for _, t in calls] == [1.0, 2.0, 3.0, 4.0]


def test_quality_probe_measures_the_unaugmented_batch_and_stops_at_both_targets() -> None:
    torch.manual_seed(0)
    teacher = build_classifier("conv4", 1, 3, 16, 8, [0.5], [0.25], track_running_stats=True).eval()
    x = torch.rand(6, 1, 16, 16)
    y = teacher(x).argmax(dim=1)  # labels the teacher agrees with: accuracy 1
    probe = recovery.QualityProbe(teacher, y, LossWeights(1.0, 0.0), min_steps=2, target=1e9)
    assert probe(0, x, 0.0) is False and probe(1, x, 0.1) is False  # before min_steps
    assert probe(2, x, 0.2) is True
    ce = torch.nn.functional.cross_entropy(teacher(x), y).item()
    assert probe.rows[0]["quality"] == pytest.approx(ce, rel=1e-5) and probe.rows[0]["teacher_acc"] == 1.0
    strict = recovery.QualityProbe(teacher, y, LossWeights(1.0, 0.0), min_steps=0, target=ce / 2)
    assert strict(0, x, 0.0) is False  # accurate, but the quality target is not met


def test_peak_memory_sees_an_allocation_inside_the_block() -> None:
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
        del block
    if not peak.reset:
        pytest.skip("this kernel cannot reset the peak resident set (/proc/self/clear_refs)")
    from free.bench.common import rss_mib

    assert peak.peak_mib - rss_mib() > 200


def test_result_file_has_machine_versions_and_no_infinity(tmp_path: Path) -> None:
    path = write_result("x", {"config": "seed: 0\n", "value": math.inf}, tmp_path / "x.json", "free bench x")
    record = json.loads(path.read_text())
    assert record["value"] is None and record["command"] == "free bench x"
    assert record["machine"]["cpu_count"] >= 1 and "torch" in record["versions"]


def test_bench_recovery_end_to_end(real_omniglot_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "recovery.json"
    args = [f"dataset.root={real_omniglot_root}", f"paths.artifacts_dir={tmp_path / 'work'}"]
    _invoke(
        ["bench", "recovery", *TINY, *args, "--seeds", "1", "--heldout", "1", "--max-steps", "6", "--out", str(out)]
        + ["--snapshots", "0,1"]
    )
    result = json.loads(out.read_text())
    curve = result["curve"]
    assert [e["iterations"] for e in curve] == [0, 1, 2] == result["snapshots"]  # the last always measured
    # Copies, not references to the weights the outer update changes in place: those would all be equal.
    shifts = [e["generator_shift"] for e in curve]
    assert shifts[0] == 0.0 and shifts[1] > 0 and shifts[2] > 0 and shifts[1] != shifts[2]
    top = {k: v for k, v in curve[-1].items() if k.startswith("speedup")}
    assert top == {k: result[k] for k in top}  # the top-level numbers are the last snapshot's
    for key in ("speedup_vs_scratch", "speedup_vs_pixels", "targets", "downstream", "machine", "versions", "config"):
        assert key in result, key
    assert result["teachers"] == {"seen": 2, "heldout": 1}
    assert set(result["downstream"]) == {"free", "scratch", "pixels"}
    budget = result["downstream"]["free"]["seconds"]
    assert all(d["seconds"] >= budget for d in result["downstream"].values())  # equal wall time, at least
    (record,) = result["recoveries"]
    assert record["teacher"] == 2  # the held-out teacher is the zoo's last
    assert record["meta"]["quality_target"]["steps"] == 2  # K = inversion.inner_steps
    assert record["scratch"]["steps_run"] >= 3  # at least its standard budget
    assert out.with_suffix(".png").stat().st_size > 0


def test_equal_time_iterations_are_as_many_scratch_iterations_as_fit_in_free_seconds() -> None:
    # scratch: 8 s over 4 iterations = 2 s each. FREE took 11 s: 5 fit (10 s), a 6th would not.
    assert accuracy.equal_time_iterations(11.0, 8.0, 4) == 5
    assert accuracy.equal_time_iterations(6.0, 6.0, 3) == 3  # exactly 3 x 2 s: all 3 fit
    assert accuracy.equal_time_iterations(0.5, 8.0, 4) == 1  # not even one fits: still one
    with pytest.raises(ValueError, match="scratch row must meta-train"):
        accuracy.equal_time_iterations(5.0, 0.0, 0)
    # validate about as often: 20 iterations / every 10 = twice; 6 iterations -> every 3 = twice
    assert accuracy.scaled_val_every(10, 20, 6) == 3
    assert accuracy.scaled_val_every(1, 4, 1) == 1 and accuracy.scaled_val_every(10, 20, 1) == 1


def test_q_query_is_lowered_for_a_learner_whose_task_does_not_fit_a_bank_slot() -> None:
    assert accuracy.fit_q_query(1, 5, 6) == 5  # 1 + 5 fits 6
    assert accuracy.fit_q_query(5, 5, 6) == 1  # 5 + 5 does not: 5 + 1 does
    with pytest.raises(ValueError, match=r"metalearn\.k_shot \+ metalearn\.q_query.*taskcache\.images_per_slot=5"):
        accuracy.fit_q_query(5, 5, 5)  # not even one query image fits


def test_rows_are_chosen_in_table_order_with_what_equal_time_needs() -> None:
    assert accuracy.select_rows(None)[0] == list(accuracy.ROWS)
    assert accuracy.select_rows(["random_init", "scratch_equal_time"]) == (
        ["free", "scratch", "scratch_equal_time", "random_init"],
        ["free", "scratch"],
    )
    with pytest.raises(ValueError, match="known: free, free_noalign, free_official"):
        accuracy.select_rows(["free", "bogus"])


def test_bench_accuracy_rejects_an_unknown_row() -> None:
    result = runner.invoke(app, ["bench", "accuracy", "--rows", "free,bogus"])
    assert result.exit_code == 2 and "bogus" in result.output and "scratch_equal_time" in result.output


def test_bench_accuracy_refuses_a_shot_whose_task_cannot_fit_a_bank_slot(tmp_path: Path) -> None:
    # 1-shot tasks fit (1 + 1 <= 5), so the config is valid; no q_query >= 1 lets a 5-shot task fit 5 images.
    small = ["taskcache.images_per_slot=5", "inversion.images_per_class=5", "metalearn.q_query=1"]
    args = ["bench", "accuracy", "experiment=tiny", *small, f"paths.artifacts_dir={tmp_path}", "--mixed-archs", ""]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "taskcache.images_per_slot" in result.output and "metalearn.q_query" in result.output
    assert not any(tmp_path.iterdir())  # refused before any stage ran


def _learners(shift: float, episodes: dict[int, list[float]], base_only: bool = False) -> dict[int, dict]:
    """A row's learners for shots 1 and 5: the k-shot learner's episodes at k; the 1-shot learner at 5 shots
    gets its own (lower) episodes, so a column taken from the wrong learner shows."""
    one = {"5way_1shot": [a + shift for a in episodes[1]], "5way_5shot": [a + shift - 0.3 for a in episodes[5]]}
    if base_only:
        return {1: {"episodes": one, "iterations": 0}}
    five = {"5way_5shot": [a + shift for a in episodes[5]]}
    return {1: {"episodes": one, "iterations": 2}, 5: {"episodes": five, "iterations": 2}}


def test_table_columns_best_baseline_and_paired_differences_match_a_hand_computation() -> None:
    seeds = [{1: [0.2, 0.4, 0.6], 5: [0.5, 0.6, 0.7]}, {1: [0.3, 0.3, 0.9], 5: [0.4, 0.8, 0.9]}]
    # Per-seed, per-episode offsets, so that the paired differences are not constants.
    shifts = {
        "free": [0.10, 0.12],
        "free_official": [0.05, 0.01],
        "scratch": [0.00, 0.02],
        "scratch_equal_time": [0.03, 0.00],
        "pixels": [0.04, 0.05],
        "random_init": [-0.1, -0.1],
    }
    runs = {}
    for key, per_seed in shifts.items():
        records = []
        for s, episodes in enumerate(seeds):
            learners = _learners(per_seed[s], episodes, base_only=key == "random_init")
            if key == "scratch_equal_time":  # 5 shots: equal-time scratch is the better baseline
                learners[5]["episodes"]["5way_5shot"] = [a + 0.2 for a in learners[5]["episodes"]["5way_5shot"]]
            records.append(accuracy.seed_record(learners, [1, 5], 1, 5))
        runs[key] = records
    assert runs["free"][0]["columns"] == {
        "5way_1shot": pytest.approx([0.3, 0.5, 0.7]),
        "5way_5shot": pytest.approx([0.6, 0.7, 0.8]),  # the 5-shot learner
        "5way_5shot_from_1shot_learner": pytest.approx([0.3, 0.4, 0.5]),  # the 1-shot learner at 5 shots
    }
    assert (
        runs["random_init"][0]["columns"]["5way_5shot"]
        == runs["random_init"][0]["columns"]["5way_5shot_from_1shot_learner"]
    )  # one untrained learner fills every column
    table = accuracy.table(runs)

    def episodes(key: str, column: str) -> list[float]:
        return [a for record in runs[key] for a in record["columns"][column]]

    def mean_ci(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), 1.96 * statistics.stdev(values) / math.sqrt(len(values))

    # Best data-free baseline by hand: the highest mean among scratch, scratch_equal_time, pixels.
    means = {
        c: {k: statistics.fmean(episodes(k, c)) for k in ("scratch", "scratch_equal_time", "pixels")}
        for c in ("5way_1shot", "5way_5shot", "5way_5shot_from_1shot_learner")
    }
    expected_best = {c: max(m, key=m.get) for c, m in means.items()}
    assert expected_best == {
        "5way_1shot": "pixels",
        "5way_5shot": "scratch_equal_time",
        "5way_5shot_from_1shot_learner": "pixels",
    }
    assert table["best_baseline"] == expected_best
    for key in shifts:
        for column, best in expected_best.items():
            cell = table["rows"][key][column]
            per_seed = [statistics.fmean(r["columns"][column]) for r in runs[key]]
            assert cell["acc"] == pytest.approx(statistics.fmean(per_seed))
            assert cell["per_seed"] == pytest.approx(per_seed)
            assert cell["ci95"] == pytest.approx(mean_ci(episodes(key, column))[1])
            if key == "free":
                assert cell["paired_vs_free"] is None
            else:
                diffs = [a - b for a, b in zip(episodes(key, column), episodes("free", column), strict=True)]
                assert (cell["paired_vs_free"]["acc"], cell["paired_vs_free"]["ci95"]) == pytest.approx(mean_ci(diffs))
            if key in ("free", "free_official"):
                diffs = [a - b for a, b in zip(episodes(key, column), episodes(best, column), strict=True)]
                vs_best = cell["paired_vs_best_baseline"]
                assert vs_best["baseline"] == best
                assert (vs_best["acc"], vs_best["ci95"]) == pytest.approx(mean_ci(diffs))
            else:
                assert "paired_vs_best_baseline" not in cell


def test_bench_accuracy_end_to_end(real_omniglot_root: Path, tmp_path: Path) -> None:
    out, work = tmp_path / "accuracy.json", tmp_path / "work"
    args = [f"dataset.root={real_omniglot_root}", f"paths.artifacts_dir={work}", "teachers.n_teachers=2"]
    # Seven learners (free, scratch, scratch_equal_time at 1 and 5 shots; random_init): one iteration each.
    args += ["inversion.teachers_per_step=1", "metalearn.iterations=1", "metalearn.meta_batch=2"]
    args += ["metalearn.inner_steps=1"]
    rows = ["--rows", "free,scratch_equal_time,random_init", "--mixed-archs", ""]  # scratch comes with equal time
    printed = _invoke(["bench", "accuracy", *TINY, *args, *rows, "--out", str(out)]).output
    result = json.loads(out.read_text())
    assert list(result["rows"]) == ["free", "scratch", "scratch_equal_time", "random_init"]
    assert result["rows_added"] == ["scratch"]
    # The tiny bank slot holds 6 images: the 5-shot learner's q_query 5 is lowered to 1.
    assert result["learners"]["5"] == {"k_shot": 5, "q_query": 1, "q_query_lowered_from": 5}
    (table,) = result["tables"].values()
    rows_out = table["rows"]
    assert list(rows_out) == list(result["rows"])
    for row in rows_out.values():
        assert [c for c in row if "shot" in c] == ["5way_1shot", "5way_5shot", "5way_5shot_from_1shot_learner"]
        assert all(0 <= row[c]["acc"] <= 1 for c in row if "shot" in c)
    assert table["best_baseline"]["5way_5shot"] in ("scratch", "scratch_equal_time")
    assert rows_out["free"]["5way_5shot"]["paired_vs_best_baseline"]["baseline"] == table["best_baseline"]["5way_5shot"]
    assert rows_out["random_init"]["5way_1shot"]["paired_vs_free"] is not None
    seed0 = work / "homogeneous" / "seed0"
    for key in ("free", "scratch", "scratch_equal_time"):
        for k in (1, 5):
            card = json.loads((seed0 / key / f"k{k}" / "metalearner" / "card.json").read_text())
            assert card["k_shot"] == k and card["q_query"] == (5 if k == 1 else 1)  # a separate 5-shot learner
            assert card["selected_on"] == "meta-val"  # checkpoints chosen on meta-val, never meta-test
    assert not (seed0 / "random_init" / "k5").exists()  # no training: one run serves every shot
    # Equal wall time, recomputed from the files the free and scratch runs wrote.
    for k in (1, 5):
        free_s, scratch_s = (
            sum(c["seconds"] for c in json.loads((seed0 / key / f"k{k}" / "metalearner" / "curves.json").read_text()))
            for key in ("free", "scratch")
        )
        budget = rows_out["scratch_equal_time"]["learners"][0][str(k)]["equal_time"]
        assert budget["iterations"] == accuracy.equal_time_iterations(free_s, scratch_s, 1)
        card = json.loads((seed0 / "scratch_equal_time" / f"k{k}" / "metalearner" / "card.json").read_text())
        assert card["iterations"] == budget["iterations"]
    assert "| FREE variant − best data-free baseline |" in printed and "equal wall time:" in printed
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_accuracy_splits_seeds_over_runs_that_share_one_folder(real_omniglot_root: Path, tmp_path: Path) -> None:
    """--first-seed runs only its seeds; a later run over all seeds reuses them and gathers one table."""
    work = tmp_path / "work"
    args = [*TINY, f"dataset.root={real_omniglot_root}", f"paths.artifacts_dir={work}", "teachers.n_teachers=2"]
    args += ["--rows", "random_init", "--mixed-archs", ""]
    _invoke(["bench", "accuracy", *args, "--first-seed", "1", "--out", str(tmp_path / "one.json")])
    assert sorted(p.name for p in (work / "homogeneous").iterdir()) == ["seed1"]
    done = (work / "homogeneous" / "seed1" / "random_init" / "k1" / "metrics" / "metatest.json").stat().st_mtime_ns
    _invoke(["bench", "accuracy", *args, "--seeds", "2", "--out", str(tmp_path / "both.json")])
    assert sorted(p.name for p in (work / "homogeneous").iterdir()) == ["seed0", "seed1"]
    assert (
        work / "homogeneous" / "seed1" / "random_init" / "k1" / "metrics" / "metatest.json"
    ).stat().st_mtime_ns == done
    one, both = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "both.json"))
    assert both["seeds"] == 2 and both["first_seed"] == 0
    seed1 = one["tables"]["homogeneous"]["rows"]["random_init"]["5way_1shot"]["per_seed"]
    assert both["tables"]["homogeneous"]["rows"]["random_init"]["5way_1shot"]["per_seed"][1:] == seed1


def test_bench_eval_end_to_end(real_omniglot_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    _invoke(
        ["bench", "eval", *TINY, f"dataset.root={real_omniglot_root}", "--episodes", "3", "--batches", "3"]
        + ["--threads", "1", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert [(r["setting"], r["mode"]) for r in result["rows"]] == [
        ("5way_1shot", "loop"),
        ("5way_1shot", "vmap"),
        ("5way_5shot", "loop"),
        ("5way_5shot", "vmap"),
    ]
    assert all(r["episodes_per_s"] > 0 and r["max_abs_diff_vs_loop"] < 1e-6 for r in result["rows"])
    assert set(result["vmap_speedup_best_vs_best_loop"]) == {"5way_1shot", "5way_5shot"}


def test_bench_eval_rejects_a_bad_list() -> None:
    result = runner.invoke(app, ["bench", "eval", "--batches", "ten"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output


def test_pipeline_noop_reruns_report_their_median_run_and_each() -> None:
    """`free bench pipeline --reruns 3`: the no-op column is a rerun that happened (the lower middle),
    and the text lists every rerun; one rerun renders as before."""
    from free.bench.pipeline import _noop
    from free.bench.report import pipeline as render

    assert _noop([9.0]) == {"noop_seconds": 9.0}
    assert _noop([12.8, 9.7, 10.1]) == {"noop_seconds": 10.1, "noop_runs": [12.8, 9.7, 10.1]}
    assert _noop([9.9, 10.4, 9.7, 11.0])["noop_seconds"] == 9.9  # even count: a run, not a mean
    runs = {
        "bare": {"command": "/v/bin/free pipeline", "seconds": 40.0, **_noop([2.0, 1.9, 2.2])},
        "dvc": {"command": "/v/bin/dvc repro", "seconds": 50.0, **_noop([0.7, 0.8, 0.7])},
    }
    text = render({"runs": runs, "identical_metrics": True, "stack_up_seconds": 12.0})
    assert "| bare | 40.0 | 2.0 | `free pipeline` |" in text
    assert "No-op reruns: 3 per front door, the median above (bare 2.0, 1.9, 2.2; dvc 0.7, 0.8, 0.7 s)." in text
    single = {name: {k: v for k, v in r.items() if k != "noop_runs"} for name, r in runs.items()}
    assert "No-op reruns" not in render({"runs": single, "identical_metrics": True, "stack_up_seconds": 12.0})


def test_pipeline_order_names_each_front_door_once_and_is_reported(tmp_path: Path) -> None:
    """`free bench pipeline --order prefect,dvc,bare`: any order of the three, reported with the result
    (a bench from before the option ran bare, dvc, prefect); anything else fails before any copy."""
    from free.bench import pipeline
    from free.bench.report import pipeline as render

    for bad in (("bare", "dvc"), ("bare", "dvc", "prefect", "bare"), ("bare", "dvc", "airflow")):
        with pytest.raises(ValueError, match="order must name each of bare, dvc, prefect once"):
            pipeline.run(Path.cwd(), tmp_path / "work", tmp_path / "cache", order=bad)
    assert not (tmp_path / "work").exists()
    runs = {"bare": {"command": "/v/bin/free pipeline", "seconds": 40.0, "noop_seconds": 2.0}}
    result = {"runs": runs, "identical_metrics": True, "stack_up_seconds": 12.0}
    assert "Order: bare, dvc, prefect." in render(result)
    assert "Order: prefect, dvc, bare." in render({**result, "order": ["prefect", "dvc", "bare"]})


def test_pipeline_reads_the_stages_own_clocks_and_the_time_outside_them() -> None:
    """The finished progress bars of a run's output (redraws end in \\r; unfinished bars and other
    lines are not clocks), and the report's table of them with each first run less their sum."""
    from free.bench.pipeline import stage_clocks
    from free.bench.report import pipeline as render

    output = (
        "training teachers ━━━━━╸━━━━ 2/4 0:00:03 eta 0:00:03\r"
        "training teachers ━━━━━━━━━━ 4/4 0:00:05 eta 0:00:00\n"
        "{\"seconds\": 4.61}\n"
        "meta-training (free) ━━━━━━━━━━ 20/20 0:01:02 eta 0:00:00\r\n"
        "meta-test 5way_1shot ━━━━━━━━━━ 2/2 0:00:00 eta 0:00:00\n"
    )
    assert stage_clocks(output) == {"training teachers": 5, "meta-training (free)": 62, "meta-test 5way_1shot": 0}
    runs = {
        "bare": {"command": "/v/bin/free pipeline", "seconds": 70.0, "noop_seconds": 2.0,
                 "stage_clocks": {"training teachers": 5, "meta-training (free)": 62}},
        "prefect": {"command": "/v/bin/prefect deployment run", "seconds": 80.5, "noop_seconds": 9.0,
                    "stage_clocks": {"training teachers": 4, "meta-training (free)": 60}},
    }  # fmt: skip
    text = render({"runs": runs, "identical_metrics": True, "stack_up_seconds": 12.0})
    assert "| meta-training (free) | 62 | 60 |" in text
    assert "| **first run outside them** | **3.0** | **16.5** |" in text


def test_group_cpu_charges_each_process_group_its_own_cpu_time() -> None:
    """The stack's servers' CPU during a deployment run (free.bench.pipeline.group_cpu): a process group
    that burns CPU is charged it, an idle one is not, and a group that no longer exists is charged 0."""
    import os
    import subprocess
    import sys
    import time

    from free.bench.pipeline import group_cpu

    burn = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(60)"
    busy = subprocess.Popen([sys.executable, "-c", burn], start_new_session=True)
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        before = group_cpu({"busy": busy.pid, "idle": idle.pid, "gone": 2**22 + 1})
        deadline = time.monotonic() + 30
        while group_cpu({"busy": busy.pid})["busy"] - before["busy"] < 0.55 and time.monotonic() < deadline:
            time.sleep(0.1)
        after = group_cpu({"busy": busy.pid, "idle": idle.pid, "gone": 2**22 + 1})
    finally:
        for proc in (busy, idle):
            os.killpg(proc.pid, 9)
            proc.wait()
    assert 0.55 <= after["busy"] - before["busy"] < 1.5, (before, after)
    assert after["idle"] - before["idle"] < 0.1 and after["gone"] == 0.0, (before, after)


def test_pipeline_report_gives_the_servers_cpu_when_measured() -> None:
    from free.bench.report import pipeline as render

    part = {"seconds": 10.0, "cli_to_created": 1.0, "created_to_running": 1.0, "flow": 5.0,
            "tasks": [["register", 1.0]], "untasked": 4.0, "after_end": 3.0}  # fmt: skip
    runs = {"prefect": {"command": "/v/bin/prefect deployment run", "seconds": 10.0, "noop_seconds": 9.0,
                        "breakdown": {"first": dict(part), "noop": dict(part)}}}  # fmt: skip
    result = {"runs": runs, "identical_metrics": True, "stack_up_seconds": 12.0}
    assert "CPU seconds" not in render(result)  # a bench from before it was measured
    runs["prefect"]["breakdown"]["first"]["servers_cpu_seconds"] = {"prefect": 2.34, "mlflow": 0.5, "s3": 0.25}
    runs["prefect"]["breakdown"]["noop"]["servers_cpu_seconds"] = {"prefect": 0.4, "mlflow": 0.1, "s3": 0.0}
    assert ("CPU seconds the stack's servers used during the deployment's first run: prefect 2.3, mlflow 0.5, "
            "s3 0.2; during the median no-op rerun: prefect 0.4, mlflow 0.1, s3 0.0.") in render(result)


def test_fanout_report_and_plot_show_each_runner_and_flag_different_files(tmp_path: Path) -> None:
    from free.bench.fanout import plot
    from free.bench.report import fanout as render

    def row(runner: str, wall: float, stage: float | None, identical: bool = True) -> dict:
        return {"runner": runner, "wall_seconds": wall, "stage_seconds": stage, "teachers": 4,
                "identical": identical, "load_before": 0.5, "load_after": 1.25}  # fmt: skip

    rows = [row("local", 11.31, 7.5), row("dask-2", 35.0, None, identical=False),
            {**row("dask-1", 45.0, 40.0), "tasks_seconds": 12.5}]  # fmt: skip
    result = {"overrides": ["experiment=tiny"], "workers": [1, 2], "cpu_count": 2, "rows": rows}
    table = render(result)
    assert "The teacher stage with `experiment=tiny` on 2 CPUs" in table
    assert "| local | 11.31 | 7.50 | 1.88 | — | 4 | yes | 0.50 → 1.25 |" in table
    assert "| dask-2 | 35.00 | — | — | — | 4 | **no** | 0.50 → 1.25 |" in table  # no summary: nothing made up
    assert "| dask-1 | 45.00 | 40.00 | 10.00 | 12.50 | 4 | yes | 0.50 → 1.25 |" in table
    assert plot(result, tmp_path / "fanout.json").is_file()
