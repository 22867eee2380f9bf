"""Markdown tables from benchmark result files, for docs/RESULTS.md.

``python -m free.bench.report benchmarks/results/recovery.json`` prints the table(s) of that result;
``tests/test_docs.py`` checks that docs/RESULTS.md contains exactly these tables for the committed
results, so the document cannot drift from the numbers.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _num(value: float | None, digits: int = 2) -> str:
    return "not reached" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pct(cell: dict[str, float]) -> str:
    return f"{100 * cell['acc']:.2f} ± {100 * cell['ci95']:.2f}"


def recovery(result: dict[str, Any]) -> str:
    targets = result["targets"]
    lines = [
        "| method | (a) s to target | steps | (b) s to 90% | s to 95% | s / step | reached (a) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, entry in targets.items():
        a, b90, b95 = entry["quality_target"], entry["acc90"], entry["acc95"]
        lines.append(
            f"| {method} | {_num(a['seconds'])} | {_num(a['steps'], 0)} | {_num(b90['seconds'])} | "
            f"{_num(b95['seconds'])} | {_num(entry['seconds_per_step'], 3)} | {a['reached']}/{a['of']} |"
        )
    bound = {m: ("≥ " if result[f"speedup_vs_{m}_is_lower_bound"] else "") for m in ("scratch", "pixels")}
    lines += [
        "",
        f"`speedup_vs_scratch` = {bound['scratch']}{_num(result['speedup_vs_scratch'])}×, "
        f"`speedup_vs_pixels` = {bound['pixels']}{_num(result['speedup_vs_pixels'])}× (target (a)); "
        f"to 90% teacher accuracy: {_num(result['speedup_acc90_vs_scratch'])}× vs scratch, "
        f"{_num(result['speedup_acc90_vs_pixels'])}× vs pixels.",
    ]
    if result.get("curve"):  # results from before the curve existed render as they did
        lines += ["", *_recovery_curve(result["curve"])]
    down = result.get("downstream")
    if down:
        settings = [k for k in down["free"] if k.endswith("shot")]
        lines += [
            "",
            "| recovery used in meta-training | iterations | seconds | " + " | ".join(settings) + " |",
            "|---|---|---|" + "---|" * len(settings),
        ]
        for name, row in down.items():
            cells = " | ".join(_pct(row[k]) for k in settings)
            lines.append(f"| {name} | {row['iterations']} | {row['seconds']:.0f} | {cells} |")
    return "\n".join(lines)


def _recovery_curve(curve: list[dict[str, Any]]) -> list[str]:
    """Speed-ups against the meta-generator's meta-iterations (≥: a lower bound, the baseline mostly
    never reached the target; —: a ratio with a target not reached)."""

    def times(value: float | None, bound: bool = False) -> str:
        return "—" if value is None or not math.isfinite(value) else f"{'≥ ' if bound else ''}{value:.2f}×"

    lines = [
        "| meta-iterations | (a) vs scratch | (a) vs pixels | 90% vs scratch | 90% vs pixels "
        "| meta loss after K | meta teacher acc after K |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in curve:
        a = [times(e[f"speedup_vs_{m}"], e[f"speedup_vs_{m}_is_lower_bound"]) for m in ("scratch", "pixels")]
        b = [times(e[f"speedup_acc90_vs_{m}"]) for m in ("scratch", "pixels")]
        lines.append(
            f"| {e['iterations']} | {' | '.join(a + b)} | {_num(e['meta_quality_after_k'], 3)} | "
            f"{_num(e['meta_teacher_acc_after_k'])} |"
        )
    return lines


def accuracy(result: dict[str, Any]) -> str:
    if "base_shot" not in result:  # a result from before separate learners per shot (docs/RESULTS.md shows one)
        return _accuracy_one_learner(result)
    base = result["base_shot"]
    blocks = []
    for zoo, table in result["tables"].items():
        rows = table["rows"]
        columns = [c for c in next(iter(rows.values())) if "shot" in c]
        main = [c for c in columns if "_from_" not in c]
        names = [c.replace(f"_from_{base}shot_learner", f", {base}-shot learner") for c in columns]
        lines = [
            f"**{zoo} zoo** ({result['seeds']} seed(s))",
            "",
            "| method | " + " | ".join(names) + " | " + " | ".join(f"− FREE, {c}" for c in main) + " |",
            "|---|" + "---|" * (len(columns) + len(main)),
        ]
        for row in rows.values():
            paired = " | ".join(_pct(row[c]["paired_vs_free"]) if row[c]["paired_vs_free"] else "—" for c in main)
            lines.append(f"| {row['label']} | " + " | ".join(_pct(row[c]) for c in columns) + f" | {paired} |")
        variants = [row for row in rows.values() if any(row[c].get("paired_vs_best_baseline") for c in main)]
        if variants:
            lines += [
                "",
                "| FREE variant − best data-free baseline | " + " | ".join(main) + " |",
                "|---|" + "---|" * len(main),
            ]
            for row in variants:
                cells = []
                for c in main:
                    diff = row[c]["paired_vs_best_baseline"]
                    cells.append(f"{_pct(diff)} ({result['rows'][diff['baseline']]})")
                lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines += _accuracy_notes(result, rows)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _accuracy_notes(result: dict[str, Any], rows: dict[str, Any]) -> list[str]:
    """Which learner fills which column, lowered query sets, the equal-time budgets."""
    base = result["base_shot"]
    notes = [
        f'Each `<N>way_<k>shot` column: a learner meta-trained on k-shot tasks; ", {base}-shot learner" columns: '
        f"the {base}-shot learner tested at more shots; random init: one untrained learner for every column."
    ]
    for k, learner in result["learners"].items():
        if "q_query_lowered_from" in learner:
            notes.append(
                f"{k}-shot learners: metalearn.q_query {learner['q_query_lowered_from']} → {learner['q_query']} "
                "(k_shot + q_query must fit taskcache.images_per_slot)."
            )
    if "scratch_equal_time" in rows:
        budgets = []
        for seed, per_learner in enumerate(rows["scratch_equal_time"]["learners"]):
            for k, r in per_learner.items():
                t = r["equal_time"]
                budgets.append(
                    f"seed {seed}, {k}-shot: {t['iterations']} iterations (val_every {t['val_every']}) in FREE's "
                    f"{t['free_metatrain_seconds']:.1f} s at {t['scratch_seconds_per_iteration']:.2f} s per iteration"
                )
        notes.append("scratch, equal wall time: " + "; ".join(budgets) + ".")
    return ["", *(f"* {n}" for n in notes)]


def _accuracy_one_learner(result: dict[str, Any]) -> str:
    blocks = []
    for zoo, table in result["tables"].items():
        rows = table["rows"]
        settings = [k for k in rows["free"] if k.endswith("shot")]
        lines = [
            f"**{zoo} zoo** ({result['seeds']} seed(s))",
            "",
            "| method | " + " | ".join(settings) + " | " + " | ".join(f"− FREE, {k}" for k in settings) + " |",
            "|---|" + "---|" * (2 * len(settings)),
        ]
        for row in rows.values():
            diffs = [row[k]["paired_vs_free"] for k in settings]
            paired = " | ".join(_pct(d) if d else "—" for d in diffs)
            lines.append(f"| {row['label']} | " + " | ".join(_pct(row[k]) for k in settings) + f" | {paired} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def evaluation(result: dict[str, Any]) -> str:
    lines = [
        "| setting | mode | episode batch | threads | episodes/s | peak MiB (above baseline) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['setting']} | {r['mode']} | {r['episode_batch']} | {r['threads']} | "
            f"{r['episodes_per_s']:.2f} | {r['peak_mib']:.0f} (+{r['extra_mib']:.0f}) |"
        )
    ratios = ", ".join(f"{k} {v:.2f}×" for k, v in result["vmap_speedup_best_vs_best_loop"].items())
    lines += ["", f"Best vmap / best loop: {ratios}."]
    return "\n".join(lines)


def pipeline(result: dict[str, Any]) -> str:
    lines = ["| front door | first run (s) | no-op rerun (s) | command |", "|---|---|---|---|"]
    if result.get("overrides"):  # on top of the tiny preset, for all three front doors
        lines[:0] = [f"The tiny preset with `{' '.join(result['overrides'])}`, for each front door:", ""]
    for name, r in result["runs"].items():
        program, _, rest = r["command"].partition(" ")  # drop the venv path of the program
        command = f"{Path(program).name} {rest}"
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['noop_seconds']:.1f} | `{command}` |")
    lines.append("")
    reruns = {name: r["noop_runs"] for name, r in result["runs"].items() if r.get("noop_runs")}
    if reruns:  # the no-op column is their median
        each = "; ".join(f"{name} {', '.join(f'{s:.1f}' for s in runs)}" for name, runs in reruns.items())
        lines.append(f"No-op reruns: {len(next(iter(reruns.values())))} per front door, the median above ({each} s).")
        lines.append("")
    same = "identical" if result["identical_metrics"] else "**different**"
    from free.bench.pipeline import FRONT_DOORS

    order = result.get("order", FRONT_DOORS)  # benches from before the option ran in this order
    lines.append(
        f"`free stack up` (once per machine): {result['stack_up_seconds']:.1f} s. "
        f"Metatest numbers of the three runs: {same}. Order: {', '.join(order)}."
    )
    clocks = {name: r["stage_clocks"] for name, r in result["runs"].items() if r.get("stage_clocks")}
    if clocks:
        lines += ["", *pipeline_clocks(result["runs"], clocks)]
    parts = result["runs"].get("prefect", {}).get("breakdown")
    if parts:
        lines += ["", *pipeline_breakdown(parts)]
        cpu = {kind: parts[kind].get("servers_cpu_seconds") for kind in ("first", "noop")}
        if all(cpu.values()):  # benches from before it was measured have none
            each = {kind: ", ".join(f"{name} {s:.1f}" for name, s in used.items()) for kind, used in cpu.items()}
            lines += ["", f"CPU seconds the stack's servers used during the deployment's first run: {each['first']}; "
                          f"during the median no-op rerun: {each['noop']}."]  # fmt: skip
    return "\n".join(lines)


def pipeline_clocks(runs: dict[str, dict[str, Any]], clocks: dict[str, dict[str, int]]) -> list[str]:
    """The stages' own clocks per front door (free.bench.pipeline.stage_clocks), and each first run's
    time outside them: what the front door added, less sensitive to the machine's drift than a ratio."""
    labels = list(dict.fromkeys(label for door in clocks.values() for label in door))
    names = list(clocks)
    outside = [f"**{runs[n]['seconds'] - sum(clocks[n].values()):.1f}**" for n in names]
    return [
        f"| stages' own clocks, first run (s) | {' | '.join(names)} |",
        "|---|" + "---|" * len(names),
        *(f"| {label} | {' | '.join(str(clocks[n].get(label, '')) for n in names)} |" for label in labels),
        f"| **first run outside them** | {' | '.join(outside)} |",
    ]


def pipeline_breakdown(parts: dict[str, dict[str, Any]]) -> list[str]:
    """The deployment's two runs split into parts (free.bench.pipeline.breakdown); tasks of one name summed."""
    runs = list(parts)  # first, noop

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> str:
        return f"| {label} | {' | '.join(cell(parts[run]) for run in runs)} |"

    def task(name: str) -> Callable[[dict[str, Any]], str]:
        def cell(part: dict[str, Any]) -> str:
            times = [seconds for task_name, seconds in part["tasks"] if task_name == name]
            return f"{sum(times):.2f}" + (f" ({len(times)}×)" if len(times) > 1 else "")

        return cell

    names = list(dict.fromkeys(name for run in runs for name, _ in parts[run]["tasks"]))
    return [
        f"| part of `prefect deployment run --watch` | {' | '.join(f'{run} (s)' for run in runs)} |",
        "|---|" + "---|" * len(runs),
        row("the CLI: its start, creating the run", lambda p: f"{p['cli_to_created']:.2f}"),
        row("created → running: the worker's poll, the process's start", lambda p: f"{p['created_to_running']:.2f}"),
        *(row(f"task `{name}`", task(name)) for name in names),
        row("the flow's own code between tasks", lambda p: f"{p['untasked']:.2f}"),
        row("the CLI after the run ended (it waits 3 s for late events)", lambda p: f"{p['after_end']:.2f}"),
        row("**total**", lambda p: f"**{p['seconds']:.1f}**"),
    ]


def hotpaths(result: dict[str, Any]) -> str:
    lines = ["| hot path | variant | ms per call |", "|---|---|---|"]
    for r in result["rows"]:
        extra = f" (+ {r['compile_seconds']:.0f} s compile)" if "compile_seconds" in r else ""
        lines.append(f"| {r['path']} | {r['variant']} | {1000 * r['seconds_per_call']:.1f}{extra} |")
    return "\n".join(lines)


def tune(result: dict[str, Any]) -> str:
    """Grid points by meta-val accuracy, best first (the mean over seeds of each card's best_val_acc)."""
    seeds = result["seeds"]
    lines = [
        f"Selected on meta-val ({seeds} seed(s); ± = 1.96·sd/√seeds over seeds). Meta-test not run.",
        "",
        "| rank | setting | meta-val acc (%) | per seed | best iteration |",
        "|---|---|---|---|---|",
    ]
    for rank, row in enumerate(result["rows"], start=1):
        acc = f"{100 * row['val_acc']:.2f}" + (f" ± {100 * row['ci95']:.2f}" if row["ci95"] is not None else "")
        per_seed = ", ".join(f"{100 * r['best_val_acc']:.1f}" for r in row["per_seed"])
        iters = ", ".join(str(r["best_iteration"]) for r in row["per_seed"])
        best = " **(best)**" if rank == 1 else ""
        lines.append(f"| {rank} | `{row['label']}`{best} | {acc} | {per_seed} | {iters} |")
    return "\n".join(lines)


def _memory(primitive: dict[str, Any]) -> float:
    """A forward without grad holds one layer at a time; a pass with a backward keeps every layer."""
    return primitive["transient_mib"] if primitive["pass"] == "forward" else primitive["activation_mib"]


def units(result: dict[str, Any]) -> str:
    """Primitives measured, units composed from them (and run whole where cheap), a paper run's totals."""
    settings, a = result["settings"], result["assumptions"]
    start, end = result["load_average_start"][0], result["load_average_end"][0]
    lines = [
        f"{result['device']}, {result['threads']} threads, load average {start:.1f} → {end:.1f}; primitives on "
        f"{settings['batch']} images, median of {settings['repeats']} calls.",
        "",
        "| network | pass | GFLOP / image | s / image | GFLOP/s | activation MiB / image | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in result["primitives"]:
        n = p["images"]
        lines.append(
            f"| {p['network']} | {p['pass']} | {p['flops'] / n / 1e9:.3f} | {p['seconds'] / n:.3f} | "
            f"{p['flops'] / p['seconds'] / 1e9:.1f} | {_memory(p) / n:.2f} | {p['load_before']:.1f} |"
        )
    lines += [
        "",
        "| unit | learner | GFLOP | s here (composed) | s here (whole unit) | activations MiB | per run | "
        "PFLOP per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    shown: set[str] = set()
    for r in result["units"]:
        teacher = r["stage"] == "teachers"
        if teacher and r["unit"] in shown:
            continue  # the same for every learner
        shown.add(r["unit"])
        whole = f"{r['direct']['seconds']:.2f}" if "direct" in r else "—"
        lines.append(
            f"| {r['unit']} | {'—' if teacher else r['learner']} | {r['flops'] / 1e9:,.1f} | {r['seconds']:,.2f} | "
            f"{whole} | {r['memory_mib']:,.0f} | {r['count']:,} | {r['count'] * r['flops'] / 1e15:,.2f} |"
        )
    gpus = list(next(iter(result["paper_run"].values()))["gpu_wall_seconds"])
    lines += [
        "",
        f"GPU hours assume {a['gpu_tflops']:g} TFLOP/s achieved and at least {a['gpu_ms_per_pass']:g} ms per "
        "sequential pass (estimates, not measurements); teacher counts assume no early stop.",
        "",
        "| learner | stage | PFLOP | CPU hours here | " + " | ".join(f"GPU h, {g} GPU" for g in gpus) + " |",
        "|---|---|---|---|" + "---|" * len(gpus),
    ]
    for learner, run in result["paper_run"].items():
        for stage, s in run["stages"].items():
            wall = " | ".join(f"{run['gpu_wall_seconds'][g][stage] / 3600:.2f}" for g in gpus)
            lines.append(
                f"| {learner} | {stage} | {s['flops'] / 1e15:,.1f} | {s['cpu_seconds'] / 3600:,.0f} | {wall} |"
            )
        flops = sum(s["flops"] for s in run["stages"].values()) / 1e15
        cpu = sum(s["cpu_seconds"] for s in run["stages"].values()) / 3600
        wall = " | ".join(f"**{run['gpu_wall_seconds'][g]['total'] / 3600:.2f}**" for g in gpus)
        lines.append(f"| {learner} | **total** | {flops:,.1f} | {cpu:,.0f} | {wall} |")
    return "\n".join(lines)


def fanout(result: dict[str, Any]) -> str:
    """The teacher stage's wall time per runner (free.bench.fanout), each variant from nothing."""
    lines = [
        f"The teacher stage with `{' '.join(result['overrides'])}` on {result['cpu_count']} CPUs, each runner "
        "training the whole zoo from nothing:",
        "",
        "| runner | wall (s) | in the stage (s) | stage ÷ teachers (s) | the tasks' own, summed (s) | teachers | "
        "same files as local | load before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        stage = r["stage_seconds"]  # None: the stage printed no summary
        per = _num(stage / r["teachers"]) if stage is not None and r["teachers"] else "—"
        lines.append(
            f"| {r['runner']} | {r['wall_seconds']:.2f} | {'—' if stage is None else _num(stage)} | {per} | "
            f"{'—' if r.get('tasks_seconds') is None else _num(r['tasks_seconds'])} | {r['teachers']} | "
            f"{'yes' if r['identical'] else '**no**'} | {r['load_before']:.2f} → {r['load_after']:.2f} |"
        )
    return "\n".join(lines)


RENDERERS = {
    "fanout": fanout,
    "recovery": recovery,
    "accuracy": accuracy,
    "eval": evaluation,
    "pipeline": pipeline,
    "hotpaths": hotpaths,
    "tune": tune,
    "units": units,
}


def render(path: Path) -> str:
    result = json.loads(Path(path).read_text())
    return RENDERERS[result["benchmark"]](result)


if __name__ == "__main__":  # pragma: no cover
    for name in sys.argv[1:]:
        print(render(Path(name)))
        print()
