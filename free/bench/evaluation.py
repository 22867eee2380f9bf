"""``free bench eval``: meta-test throughput (episodes/s), vectorised vs loop, and peak memory.

Meta-testing adapts the initialisation to every episode (``evaluate.inner_steps`` SGD steps on the
support set), so it is the pipeline's other hot loop. This measures :func:`free.evaluate.evaluate`
exactly as the metatest stage calls it, on real meta-test episodes of the configured data set, for:

* ``loop`` - one episode at a time (what the stage uses on CPU);
* ``vmap`` - ``torch.func.vmap`` over chunks of ``episode_batch`` episodes (the stage's choice off-CPU);

for every shot setting, every ``--batches`` chunk size and every ``--threads`` count. Speed does not
depend on the weights, so a freshly initialised meta-learner of the configured architecture is used
(no training needed). One untimed warm-up chunk precedes every measurement. Peak memory is the
device's peak allocation on CUDA, the process's peak resident set on CPU (reset before each
measurement via ``/proc/self/clear_refs``); ``extra_mib`` is that peak minus the resident set before.
Both modes must give the same per-episode accuracies (``max_abs_diff``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from free.artifacts import resolve_device
from free.bench.common import PeakMemory, pyplot, rss_mib, savefig, timed
from free.config import to_yaml
from free.config.schema import Config
from free.data import load_splits
from free.evaluate import evaluate, setting_key
from free.maml import split_state
from free.models import build_classifier


def run(
    cfg: Config,
    episodes: int,
    batches: list[int],
    threads: list[int],
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    ds, ev, ml = cfg.dataset, cfg.evaluate, cfg.metalearn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_classifier(
            cfg.model.arch,
            ds.channels,
            ev.n_way,
            ds.image_size,
            cfg.model.width,
            ds.mean,
            ds.std,
            track_running_stats=False,
            head=cfg.model.head,
        ).to(device)
    params, buffers = split_state(model)
    split = load_splits(ds, cfg.paths.cache_dir)["test"]
    original_threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for k_shot in dict.fromkeys(ev.shots):
                modes = [("loop", 1), *(("vmap", b) for b in batches)]
                reference = None
                for mode, batch in modes:

                    def measure(count: int, mode=mode, batch=batch, k_shot=k_shot) -> torch.Tensor:
                        return evaluate(
                            model,
                            params,
                            buffers,
                            split,
                            ev.n_way,
                            k_shot,
                            ev.q_query,
                            count,
                            ev.inner_steps,
                            ml.inner_lr,
                            seed=ev.seed + k_shot,
                            episode_batch=batch,
                            vectorised=mode == "vmap",
                        )

                    measure(min(batch, episodes))  # warm-up
                    before = rss_mib()
                    with PeakMemory(device) as peak:
                        accs, seconds = timed(lambda measure=measure: measure(episodes), device)
                    reference = accs if reference is None else reference
                    row = {
                        "setting": setting_key(ev.n_way, k_shot),
                        "mode": mode,
                        "episode_batch": batch,
                        "threads": n_threads,
                        "episodes": episodes,
                        "seconds": seconds,
                        "episodes_per_s": episodes / seconds,
                        "peak_mib": peak.peak_mib,
                        "extra_mib": peak.peak_mib - before if device.type == "cpu" else peak.peak_mib,
                        "peak_is_process_wide": not peak.reset,
                        "max_abs_diff_vs_loop": (accs - reference).abs().max().item(),
                    }
                    rows.append(row)
                    say(
                        f"{row['setting']} {mode:4s} batch {batch:3d} threads {n_threads}: "
                        f"{row['episodes_per_s']:.2f} episodes/s, peak {row['peak_mib']:.0f} MiB "
                        f"(+{row['extra_mib']:.0f})"
                    )
    finally:
        torch.set_num_threads(original_threads)
    best = {}
    for row in rows:
        key = (row["setting"], row["mode"])
        if key not in best or row["episodes_per_s"] > best[key]["episodes_per_s"]:
            best[key] = row
    speedups = {
        setting: best[(setting, "vmap")]["episodes_per_s"] / best[(setting, "loop")]["episodes_per_s"]
        for setting, mode in best
        if mode == "loop" and (setting, "vmap") in best
    }
    return {
        "device": str(device),
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "inner_steps": ev.inner_steps,
        "q_query": ev.q_query,
        "rows": rows,
        "vmap_speedup_best_vs_best_loop": speedups,
        "config": to_yaml(cfg),
    }


def plot(result: dict[str, Any], json_path) -> Any:
    """Episodes/s and peak memory per configuration."""
    plt = pyplot()
    rows = result["rows"]
    labels = [f"{r['setting']}\n{r['mode']} b{r['episode_batch']} t{r['threads']}" for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.9 * len(rows)), 6), sharex=True)
    colours = ["tab:orange" if r["mode"] == "loop" else "tab:blue" for r in rows]
    axes[0].bar(range(len(rows)), [r["episodes_per_s"] for r in rows], color=colours)
    axes[0].set(ylabel="episodes / s", title=f"meta-test throughput on {result['device']} ({result['arch']})")
    axes[1].bar(range(len(rows)), [r["extra_mib"] for r in rows], color=colours)
    axes[1].set(ylabel="peak memory above baseline (MiB)")
    axes[1].set_xticks(range(len(rows)), labels, fontsize=7)
    return savefig(fig, json_path)
