"""``free bench recovery``: how fast each method recovers data from teachers it has never seen.

Three methods, the same held-out teachers, the same machine, one run:

* ``meta``    - FREE's meta-generator after meta-training (on the *other* teachers of the zoo),
  adapted to the teacher from its learned initialisation;
* ``scratch`` - a freshly initialised generator (the from-scratch baseline);
* ``pixels``  - the images optimised directly (PURER / DeepInversion).

Every recovery is probed at every step (a forward pass that is *not* timed): the combined inversion
loss ``w_ce * CE + w_bn * BN (+ w_tv * TV)`` of the current batch seen without augmentation, and the
teacher's accuracy on it. Three targets:

(a) *equal quality* - the combined loss the meta-generator reaches after its K inner steps
    (``inversion.inner_steps``) on that teacher and seed. Each baseline runs its standard budget
    (``inversion.scratch_steps``) and on, up to ``max_steps``, until it is as good.
    ``speedup_vs_scratch = T_scratch(a) / T_meta(a)`` and ``speedup_vs_pixels`` likewise, with
    ``T`` the median over held-out teachers of the median over seeds of the wall time to the
    target. A median that never reached the target makes the ratio a lower bound (flagged).
(b) *teacher accuracy* - time to >= 90% and >= 95% teacher accuracy.
(c) *downstream* - the same meta-learner meta-trained for the same wall time (FREE's time for
    ``metalearn.iterations`` iterations) on tasks recovered by each method, then meta-tested.

Meta-training uses only the zoo's first ``n - heldout`` teachers, so (a) and (b) measure teachers
the meta-generator never saw. Work files go under ``paths.artifacts_dir`` (the CLI points it at
``benchmarks/work/recovery``), so the pipeline's own artifacts are not touched.

*Curve over meta-training* (``curve``): the meta-generator's weights are copied at a few
meta-iteration counts (``snapshots``; 0 is the untrained initialisation, a sanity point whose
speed-up should be about 1 or below) during the one FREE meta-training, and (a) and (b) are measured
for each copy. The baselines do not depend on the snapshot: each (teacher, seed) runs once, until it
meets the hardest of the snapshots' targets (or ``max_steps``), and every snapshot's times are read
off that one curve - a run to an easier target, same seed, is a prefix of it. The top-level numbers
are the last snapshot's: the fully meta-trained generator.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from free.artifacts import resolve_device, set_threads
from free.bench.common import median, pyplot, savefig, synchronize, timed
from free.config import to_yaml
from free.config.schema import Config
from free.data import load_splits
from free.data.base import Progress
from free.evaluate import metatest
from free.inversion import (
    FeatureStatistics,
    InversionSettings,
    LossWeights,
    MetaGenerator,
    intended_labels,
    recover_from_scratch,
    recover_pixels,
    total_variation,
)

METHODS = ("meta", "scratch", "pixels")
DOWNSTREAM = {"meta": "free", "scratch": "scratch", "pixels": "pixels"}  # method preset per recovery method
ACCURACY_TARGETS = (0.90, 0.95)


@dataclass(frozen=True)
class RecoveryBench:
    """The benchmark's own knobs (the method's are in the config)."""

    seeds: int = 3  # recoveries per held-out teacher and method
    heldout: int = 2  # the zoo's last teachers, never seen in meta-training
    max_steps: int = 1000  # cap for every method when a target is not reached
    downstream: bool = True  # target (c): meta-train scratch/pixels for FREE's wall time and meta-test
    snapshots: tuple[int, ...] | None = None  # meta-iterations whose generator is measured; None: default_snapshots


def default_snapshots(iterations: int, points: int = 5) -> tuple[int, ...]:
    """About ``points`` meta-iteration counts spread evenly over ``0..iterations``, both ends included."""
    return tuple(sorted({round(i * iterations / (points - 1)) for i in range(points)}))


def snapshot_iterations(requested: Iterable[int] | None, iterations: int) -> tuple[int, ...]:
    """The meta-iterations to measure: ``requested`` (each in ``0..iterations``) or the default spread.
    The last iteration is always measured, so the top-level numbers are the fully trained generator's."""
    if requested is None:
        return default_snapshots(iterations)
    requested = list(requested)
    bad = [s for s in requested if not 0 <= s <= iterations]
    if bad:
        raise ValueError(
            f"--snapshots must be meta-iteration counts in 0..{iterations} (metalearn.iterations), got {bad}"
        )
    return tuple(sorted({*requested, iterations}))


class QualityProbe:
    """Measures a recovery at every step (untimed; see :data:`free.inversion.Probe`) and stops it
    once it is past ``min_steps`` and has reached both the quality target and 95% teacher accuracy."""

    def __init__(
        self, teacher: nn.Module, y: torch.Tensor, weights: LossWeights, min_steps: int, target: float | None
    ) -> None:
        self.teacher, self.y, self.weights = teacher, y, weights
        self.min_steps, self.target = min_steps, target
        self.stats = FeatureStatistics(teacher)
        self.rows: list[dict[str, float]] = []

    def __call__(self, step: int, x: torch.Tensor, seconds: float) -> bool:
        w = self.weights
        with torch.no_grad(), self.stats:
            scores = self.teacher(x)
        with torch.no_grad():
            ce = F.cross_entropy(scores, self.y)
            bn = self.stats.loss().to(ce.device)
            tv = total_variation(x)
            quality = w.ce * ce + w.bn * bn + w.tv * tv
            acc = (scores.argmax(dim=1) == self.y).float().mean()
        values = dict(
            zip(("quality", "ce", "bn", "teacher_acc"), torch.stack([quality, ce, bn, acc]).tolist(), strict=True)
        )
        self.rows.append({"step": step, "seconds": seconds, **values})
        if step < self.min_steps:
            return False
        accurate = max(r["teacher_acc"] for r in self.rows) >= max(ACCURACY_TARGETS)
        good = self.target is None or min(r["quality"] for r in self.rows) <= self.target
        return accurate and good


def first_reaching(rows: list[dict[str, float]], ok: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    """Seconds and steps at the first probed step satisfying ``ok`` (``inf`` if none)."""
    for row in rows:
        if ok(row):
            return {"seconds": row["seconds"], "steps": row["step"]}
    return {"seconds": math.inf, "steps": math.inf}


def run(
    configs: Callable[[str], Config],
    bench: RecoveryBench,
    progress: Progress | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the benchmark. ``configs(method_preset)`` composes the user's config with ``method=<preset>``."""
    from free.stages import data, teachers
    from free.stages.metatrain import load_zoo

    cfg = configs("free")
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    data.run(cfg, progress=progress)
    teachers.run(cfg, progress=progress)
    zoo = load_zoo(Path(cfg.paths.artifacts_dir) / "teachers", cfg, device)
    if not 1 <= bench.heldout < len(zoo):
        raise ValueError(f"--heldout {bench.heldout} must be in 1..{len(zoo) - 1} (teachers.n_teachers={len(zoo)})")
    seen, heldout = zoo[: -bench.heldout], zoo[-bench.heldout :]
    snapshots = snapshot_iterations(bench.snapshots, cfg.metalearn.iterations)

    say(f"meta-training FREE on {len(seen)} teachers ({cfg.metalearn.iterations} iterations)")
    free_loop, free_result, kept = _meta_train(cfg, device, seen, None, progress, snapshots)
    downstream = {"free": free_result}
    if bench.downstream:
        budget = free_result["seconds"]
        for method in ("scratch", "pixels"):
            say(f"meta-training with {method} recovery for the same wall time ({budget:.1f} s)")
            downstream[method] = _meta_train(configs(method), device, seen, budget, progress)[1]

    generators = {it: _generator_at(free_loop.meta_generator, state) for it, state in kept.items()}
    raw = _recover_heldout(cfg, device, heldout, len(seen), generators, bench, progress)
    curve = _curve(raw, snapshots)
    for entry in curve:  # how far meta-training has moved the initialisation (0 at snapshot 0)
        entry["generator_shift"] = _distance(kept[entry["iterations"]], kept[snapshots[0]])
    records = _records_at(raw, snapshots[-1])
    summary = _summarise(records)
    result: dict[str, Any] = {
        "definition": {
            "speedup": "T_scratch(a) / T_meta(a): median over held-out teachers of the median over seeds of the "
            "wall time (probe excluded) to reach the combined inversion loss the meta-generator reaches after "
            "K inner steps; same for pixels",
            "quality": "w_ce*CE + w_bn*BN + w_tv*TV on the current batch without augmentation",
            "teacher_acc": "teacher accuracy on the current batch without augmentation",
            "downstream": "meta-test accuracy after meta-training for FREE's wall time (steps only, validation "
            "excluded), best meta-val checkpoint",
            "lower_bound": "where the median never reached target (a), the median of the time to the target or, "
            "where not reached, the time run instead",
            "curve": "targets (a) and (b) with the meta-generator's weights after each number of meta-iterations "
            "(snapshots of the one FREE meta-training); the top-level numbers are the last snapshot's. "
            "generator_shift: L2 distance of the weights from the first snapshot's",
        },
        "bench": asdict(bench),
        "inner_steps": cfg.inversion.inner_steps,
        "scratch_steps": cfg.inversion.scratch_steps,
        "teachers": {"seen": len(seen), "heldout": len(heldout)},
        "snapshots": list(snapshots),
        **_speedups(summary),
        "targets": summary,
        "curve": curve,
        "downstream": downstream if bench.downstream else None,
        "recoveries": records,
        "config": to_yaml(cfg),
    }
    return result


def _meta_train(
    cfg: Config,
    device: torch.device,
    zoo: list,
    budget: float | None,
    progress: Progress | None,
    snapshots: Collection[int] = (),
) -> tuple[Any, dict[str, Any], dict[int, dict[str, torch.Tensor]]]:
    """Meta-train for ``metalearn.iterations`` (``budget=None``) or ``budget`` seconds of steps,
    validating on meta-val as often as the stage does; meta-test the best initialisation.

    Also returns a copy of the meta-generator's weights after each iteration count in ``snapshots``
    (``budget=None`` only; taken outside the timed steps)."""
    from free.stages.metatrain import MetaTrainLoop

    ml = cfg.metalearn
    loop = MetaTrainLoop(cfg, device, zoo)
    checks = max(1, ml.iterations // ml.val_every)  # validations per run, as in the stage
    spent = 0.0
    kept: dict[int, dict[str, torch.Tensor]] = {}

    def keep() -> None:  # clones: the outer update changes the weights in place
        if loop.iteration in snapshots:
            kept[loop.iteration] = {
                k: v.detach().clone() for k, v in loop.meta_generator.generator.state_dict().items()
            }

    if budget is None:
        keep()
        ticks = progress(range(ml.iterations), f"meta-train {cfg.method.name}", ml.iterations) if progress else None
        for it in ticks or range(ml.iterations):
            spent += timed(loop.step, device)[1]
            keep()
            if (it + 1) % ml.val_every == 0 or it + 1 == ml.iterations:
                loop.validate()
    else:  # the same number of validations, spread evenly over the budget
        label = f"meta-train {cfg.method.name} for {budget:.0f} s"
        for k in progress(range(checks), label, checks) if progress else range(checks):
            while spent < budget * (k + 1) / checks:
                spent += timed(loop.step, device)[1]
            loop.validate()
    split = load_splits(cfg.dataset, cfg.paths.cache_dir)["test"]
    tested = metatest(
        loop.learner,
        loop.best_params,
        loop.buffers,
        split,
        cfg.evaluate,
        ml.inner_lr,
        vectorised=device.type != "cpu",
    )
    result = {
        "method": cfg.method.name,
        "iterations": loop.iteration,
        "seconds": spent,
        "best_val_acc": loop.best_val_acc,
        "best_iteration": loop.best_iteration,
        **{k: {"acc": v["acc"], "ci95": v["ci95"]} for k, v in tested.items() if isinstance(v, dict)},
    }
    return loop, result, kept


def _generator_at(trained: MetaGenerator, state: dict[str, torch.Tensor]) -> MetaGenerator:
    """A meta-generator with ``trained``'s settings and the snapshot's weights (never outer-stepped here)."""
    generator = copy.deepcopy(trained.generator)
    generator.load_state_dict(state)
    return MetaGenerator(generator, 0.0, outer_update=trained.outer_update)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance between two state dicts' floating-point entries."""
    squares = [(a[k].double() - b[k].double()).pow(2).sum() for k in a if a[k].is_floating_point()]
    return torch.stack(squares).sum().sqrt().item()


def _recover_heldout(
    cfg: Config,
    device: torch.device,
    heldout: list,
    first_id: int,
    generators: dict[int, MetaGenerator],
    bench: RecoveryBench,
    progress: Progress | None,
) -> list[dict[str, Any]]:
    """Every (held-out teacher, seed): the meta-generator at every snapshot first (each sets its target
    (a)), then each baseline once, until it meets the hardest of those targets (or ``max_steps``).

    Returns raw runs, ``{"teacher", "seed", "target_quality": {iteration: target}, "meta": {iteration:
    run}, "scratch": run, "pixels": run}`` with ``run = {"standard_steps", "curve": probed rows}``;
    :func:`_records_at` measures them for one snapshot."""
    inv, ds = cfg.inversion, cfg.dataset
    weights = LossWeights(inv.loss.ce, inv.loss.bn, inv.loss.tv, 0.0)  # no student here: no adversarial term

    def recover(
        method: str,
        teacher: nn.Module,
        n_way: int,
        seed: int,
        target: float | None,
        cap: int | None = None,
        generator: MetaGenerator | None = None,
    ) -> dict[str, Any]:
        standard = inv.inner_steps if method == "meta" else inv.scratch_steps
        lr = inv.pixels_lr if method == "pixels" else inv.inner_lr
        steps = cap if cap is not None else max(bench.max_steps, standard)
        settings = InversionSettings(steps, lr, tuple(inv.betas), weights, inv.augment)
        y = intended_labels(n_way, inv.images_per_class, device=device)
        probe = QualityProbe(teacher, y, weights, standard, target)
        rng = torch.Generator().manual_seed(seed)  # the same for every snapshot and method: like with like
        per_class = inv.images_per_class
        synchronize(device)
        if method == "meta":  # the recovered images are not needed: the probe has measured them
            generator.recover(teacher, n_way, per_class, settings, rng, probe=probe)
        elif method == "scratch":
            recover_from_scratch(
                teacher, ds.image_size, ds.channels, inv.latent_dim, n_way, per_class, settings, rng, probe=probe
            )
        else:
            recover_pixels(teacher, ds.image_size, ds.channels, n_way, per_class, settings, rng, probe=probe)
        return {"standard_steps": standard, "curve": probe.rows}

    # One untimed warm-up per method: first calls pay for allocations and lazy initialisation.
    warm_teacher, warm_meta = heldout[0]
    last = generators[max(generators)]
    for method in METHODS:
        recover(method, warm_teacher, warm_meta["n_classes"], 10**6, None, cap=3, generator=last)

    pairs = [(t, s) for t in range(len(heldout)) for s in range(bench.seeds)]
    raw = []
    for t, s in progress(pairs, "recovery (held-out teachers x seeds)", len(pairs)) if progress else pairs:
        teacher, meta = heldout[t]
        n_way, seed = meta["n_classes"], cfg.seed * 1000 + s
        metas = {it: recover("meta", teacher, n_way, seed, None, generator=g) for it, g in generators.items()}
        targets = {it: run_["curve"][inv.inner_steps]["quality"] for it, run_ in metas.items()}
        record: dict[str, Any] = {"teacher": first_id + t, "seed": seed, "target_quality": targets, "meta": metas}
        for method in ("scratch", "pixels"):
            record[method] = recover(method, teacher, n_way, seed, min(targets.values()))
        raw.append(record)
    return raw


def _records_at(raw: list[dict[str, Any]], iteration: int) -> list[dict[str, Any]]:
    """The raw runs measured against one snapshot's targets: one record per (teacher, seed)."""
    records = []
    for r in raw:
        target = r["target_quality"][iteration]
        record: dict[str, Any] = {"teacher": r["teacher"], "seed": r["seed"], "target_quality": target}
        record["meta"] = _measure(r["meta"][iteration], target, True)
        for method in ("scratch", "pixels"):
            record[method] = _measure(r[method], target, False)
        records.append(record)
    return records


def _curve(raw: list[dict[str, Any]], snapshots: Iterable[int]) -> list[dict[str, Any]]:
    """Per snapshot: the speed-ups, and the meta-generator's quality and teacher accuracy after K steps
    (median over teachers of the median over seeds)."""
    curve = []
    for iteration in snapshots:
        summary = _summarise(_records_at(raw, iteration))
        after_k = summary["meta"]["at_standard_budget"]
        curve.append(
            {
                "iterations": iteration,
                **_speedups(summary),
                "meta_quality_after_k": after_k["quality"],
                "meta_teacher_acc_after_k": after_k["teacher_acc"],
                "targets": summary,
            }
        )
    return curve


def _measure(run_: dict[str, Any], target: float, is_meta: bool) -> dict[str, Any]:
    """The three targets of one recovery, plus its cost per step and its curve."""
    rows, standard = run_["curve"], run_["standard_steps"]
    at_standard = rows[min(standard, len(rows) - 1)]
    if is_meta:  # by definition the meta-generator meets target (a) at step K
        quality = {"seconds": at_standard["seconds"], "steps": standard}
    else:
        quality = first_reaching(rows, lambda r: r["quality"] <= target)
    measured = {
        "quality_target": quality,
        **{
            f"acc{round(thr * 100)}": first_reaching(rows, lambda r, thr=thr: r["teacher_acc"] >= thr)
            for thr in ACCURACY_TARGETS
        },
        "at_standard_budget": {k: at_standard[k] for k in ("seconds", "quality", "ce", "bn", "teacher_acc")},
        "seconds_per_step": rows[-1]["seconds"] / max(1, rows[-1]["step"]),
        "steps_run": rows[-1]["step"],
        "curve": [[r["seconds"], r["quality"], r["teacher_acc"]] for r in rows],
    }
    return measured


def _summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method and target: median over teachers of the median over seeds (``inf``: not reached)."""
    teachers = sorted({r["teacher"] for r in records})

    def med(method: str, pick: Callable[[dict[str, Any]], float]) -> float:
        per_teacher = [median(pick(r[method]) for r in records if r["teacher"] == t) for t in teachers]
        return median(per_teacher)

    summary: dict[str, Any] = {}
    for method in METHODS:
        entry: dict[str, Any] = {}
        for target in ("quality_target", *(f"acc{round(t * 100)}" for t in ACCURACY_TARGETS)):
            entry[target] = {
                "seconds": med(method, lambda m, target=target: m[target]["seconds"]),
                "seconds_at_least": med(method, lambda m, target=target: _censored(m, target)),
                "steps": med(method, lambda m, target=target: m[target]["steps"]),
                "reached": sum(math.isfinite(r[method][target]["seconds"]) for r in records),
                "of": len(records),
            }
        entry["seconds_per_step"] = med(method, lambda m: m["seconds_per_step"])
        entry["at_standard_budget"] = {
            k: med(method, lambda m, k=k: m["at_standard_budget"][k]) for k in ("seconds", "quality", "teacher_acc")
        }
        entry["seconds_run"] = med(method, lambda m: m["curve"][-1][0])
        summary[method] = entry
    return summary


def _censored(measured: dict[str, Any], target: str) -> float:
    """Seconds to ``target``, or the seconds run where it was not reached (at most the true time)."""
    seconds = measured[target]["seconds"]
    return seconds if math.isfinite(seconds) else measured["curve"][-1][0]


def _speedups(summary: dict[str, Any]) -> dict[str, Any]:
    """Target (a) ratios; a baseline whose median never reached the target gives a lower bound.

    The bound's numerator is the median of the censored times (:func:`_censored`): each is at most
    the true time, so their median is at most the true median. It depends only on where a run reached
    the target or gave up (``max_steps``), not on how long a run went on after reaching it - which is
    what lets every snapshot's bound be read off one long baseline run."""
    meta_seconds = summary["meta"]["quality_target"]["seconds"]
    out: dict[str, Any] = {}
    for method in ("scratch", "pixels"):
        seconds = summary[method]["quality_target"]["seconds"]
        bound = not math.isfinite(seconds)
        at_least = summary[method]["quality_target"]["seconds_at_least"]
        out[f"speedup_vs_{method}"] = (at_least if bound else seconds) / meta_seconds
        out[f"speedup_vs_{method}_is_lower_bound"] = bound
        out[f"speedup_acc90_vs_{method}"] = summary[method]["acc90"]["seconds"] / summary["meta"]["acc90"]["seconds"]
        out[f"speedup_acc95_vs_{method}"] = summary[method]["acc95"]["seconds"] / summary["meta"]["acc95"]["seconds"]
    return out


def plot(result: dict[str, Any], json_path: Path) -> Path:
    """Quality and teacher accuracy against wall time per method; downstream accuracy bars; speed-up
    against meta-iterations (results without a curve, from before it existed, plot without it)."""
    plt = pyplot()
    colours = {"meta": "tab:green", "scratch": "tab:red", "pixels": "tab:blue"}
    down, over_training = result.get("downstream"), result.get("curve")
    panels = 2 + bool(down) + bool(over_training)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    for record in result["recoveries"]:
        for method in METHODS:
            curve = record[method]["curve"]
            secs = [max(c[0], 1e-4) for c in curve]
            label = method if record is result["recoveries"][0] else None
            axes[0].plot(secs, [c[1] for c in curve], color=colours[method], alpha=0.35, lw=1, label=label)
            axes[1].plot(secs, [c[2] for c in curve], color=colours[method], alpha=0.35, lw=1, label=label)
    targets = [r["target_quality"] for r in result["recoveries"]]
    axes[0].axhline(median(targets), color="k", ls="--", lw=1, label="target (a): meta after K steps (median)")
    axes[0].set(xscale="log", yscale="log", xlabel="wall time (s)", ylabel="combined inversion loss")
    axes[0].set_title(
        f"(a) x{result['speedup_vs_scratch']:.1f} vs scratch, x{result['speedup_vs_pixels']:.1f} vs pixels"
    )
    axes[0].legend(fontsize=7)
    for thr in ACCURACY_TARGETS:
        axes[1].axhline(thr, color="grey", ls=":", lw=1)
    axes[1].set(xscale="log", xlabel="wall time (s)", ylabel="teacher accuracy", title="(b) teacher accuracy")
    axes[1].legend(fontsize=7)
    if down:
        names = list(down)
        settings = [k for k in down["free"] if k.endswith("shot")]
        for i, key in enumerate(settings):
            accs = [down[n][key]["acc"] for n in names]
            cis = [down[n][key]["ci95"] for n in names]
            xs = [j + 0.38 * i for j in range(len(names))]
            axes[2].bar(xs, accs, width=0.36, yerr=cis, capsize=3, label=key)
        axes[2].set_xticks([j + 0.19 for j in range(len(names))], names)
        axes[2].set(ylabel="meta-test accuracy", title=f"(c) equal wall time ({down['free']['seconds']:.0f} s)")
        axes[2].legend(fontsize=7)
    if over_training:
        _plot_curve(axes[-1], over_training, colours)
    return savefig(fig, json_path)


def _plot_curve(ax: Any, curve: list[dict[str, Any]], colours: dict[str, str]) -> None:
    """Target (a) speed-up against the meta-generator's meta-iterations; hollow markers: lower bounds."""
    iterations = [e["iterations"] for e in curve]
    for method in ("scratch", "pixels"):
        values = [e[f"speedup_vs_{method}"] for e in curve]
        ax.plot(iterations, values, color=colours[method], marker="o", label=f"vs {method}")
        bounds = [
            (i, v)
            for i, v, e in zip(iterations, values, curve, strict=True)
            if e[f"speedup_vs_{method}_is_lower_bound"]
        ]
        if bounds:
            ax.scatter(*zip(*bounds, strict=True), s=80, facecolors="none", edgecolors=colours[method])
    ax.axhline(1.0, color="k", ls="--", lw=1, label="equal speed")
    ax.set(xlabel="meta-iterations of the meta-generator", ylabel="speed-up at equal quality (a)")
    ax.set_title("(a) speed-up vs meta-training")
    ax.legend(fontsize=7)
