"""Stage ``metatest``: the meta-learner on real images of the held-out meta-test classes.

Reads the meta-learner that ``free metatrain`` wrote (``artifacts/metalearner/metalearner.safetensors``),
adapts it to ``evaluate.episodes`` episodes per shot setting drawn from the **meta-test** split
(never val or train), and writes:

* ``artifacts/metrics/metatest.json`` - ``{"5way_1shot": {"acc": .., "ci95": ..}, ..., "episodes": E}``
  with accuracies in [0, 1] and ``ci95 = 1.96 * std / sqrt(E)`` (DVC metric);
* ``artifacts/metrics/metatest_episodes.json`` - per-episode accuracies per setting (DVC plots);
* ``artifacts/plots/metatest.png`` - sorted per-episode accuracies with mean +- CI.

A finished stage with the same settings and the same checkpoint file does nothing. The stage keeps
no resume state (a killed run starts over and writes the same files); before any episode it checks
that its folders take a write, and a failed write raises :class:`free.artifacts.StorageError` naming
the file and the fix.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from free.artifacts import (
    check_writable,
    fingerprint,
    is_done,
    mark_done,
    read_json,
    remove_stale_tmp,
    resolve_device,
    set_threads,
    write_atomic,
    write_json,
)
from free.checkpoints import CheckpointError, load_classifier
from free.config.schema import Config, dataset_settings
from free.data import load_splits
from free.data.base import Progress
from free.evaluate import evaluate, metatest, metatest_result, setting_arguments
from free.maml import split_state

METRICS_FILE = "metatest.json"
EPISODES_FILE = "metatest_episodes.json"
PLOT_FILE = "metatest.png"


def default_checkpoint(cfg: Config) -> Path:
    """Where the meta-training stage writes the meta-learner."""
    return Path(cfg.paths.artifacts_dir) / "metalearner" / "metalearner.safetensors"


def run(cfg: Config, checkpoint: Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Meta-test the meta-learner and write the metrics and the plot.

    Args:
        cfg: the resolved configuration (``evaluate``, ``metalearn.inner_lr``, ``dataset``, ``paths``).
        checkpoint: the meta-learner to test; default :func:`default_checkpoint`.
        progress: optional progress-bar wrapper (see :mod:`free.progress`).

    Returns:
        The content of ``metatest.json``.

    Raises:
        FileNotFoundError: no checkpoint (run ``free metatrain`` first).
        CheckpointError: the checkpoint is unusable or does not fit the configured data / way.
    """
    set_threads(cfg.threads)
    checkpoint = Path(checkpoint) if checkpoint is not None else default_checkpoint(cfg)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"meta-learner checkpoint {checkpoint} not found: run `free metatrain` first")
    root = Path(cfg.paths.artifacts_dir)
    metrics_dir, plot_file = root / "metrics", root / "plots" / PLOT_FILE
    fp = fingerprint(_settings(cfg), inputs=[checkpoint])
    outputs = (metrics_dir / METRICS_FILE, metrics_dir / EPISODES_FILE, plot_file)
    if is_done(metrics_dir, fp) and all(p.is_file() for p in outputs):
        return read_json(metrics_dir / METRICS_FILE)
    for folder in (metrics_dir, plot_file.parent):
        check_writable(folder)  # a full or read-only disk fails now, before the episodes run
        remove_stale_tmp(folder)  # files a killed run was writing

    device = resolve_device(cfg.device)
    model, meta = load_classifier(checkpoint)
    _check_fits(checkpoint, meta, cfg)
    model = model.to(device)
    params, buffers = split_state(model)
    # Only the meta-test classes: they are the ones no teacher and no model selection has seen.
    split = load_splits(cfg.dataset, cfg.paths.cache_dir)["test"]
    # Same numbers either way (tests/test_evaluate.py); measured with Conv4-64, 28x28, 10 steps: vmap
    # is 20-40x faster than the loop on an H100, but the loop is 1.3-2x faster on a 2-core CPU.
    vectorised = device.type != "cpu"
    if cfg.runner.name == "dask":
        result = _metatest_on_dask(cfg, checkpoint)
    else:
        result = metatest(
            model, params, buffers, split, cfg.evaluate, cfg.metalearn.inner_lr, progress, vectorised=vectorised
        )

    headline = {k: ({"acc": v["acc"], "ci95": v["ci95"]} if isinstance(v, dict) else v) for k, v in result.items()}
    per_episode = {k: v["accs"] for k, v in result.items() if isinstance(v, dict)}
    write_json(metrics_dir / EPISODES_FILE, per_episode)
    _plot(result, plot_file)
    write_json(metrics_dir / METRICS_FILE, headline)
    mark_done(metrics_dir, fp, checkpoint=checkpoint.name, split="test", classes=split.n_classes)
    return headline


def evaluate_shard(
    cfg: Config, checkpoint: Path, k_shot: int, start: int, stop: int, threads: int | None
) -> list[float]:
    """Accuracies of episodes ``start .. stop - 1`` of shot setting ``k_shot``: the unit of fan-out.

    What a ``runner=dask`` task runs (flows/fanout.py), in a worker process: it loads the checkpoint
    and the meta-test split itself and returns plain floats, which :func:`run` concatenates in order
    into the same metrics as the local loop (:func:`free.evaluate.metatest`).
    ``threads``: the stage process's intra-op thread count, which the numbers depend on.
    """
    set_threads(threads)
    device = resolve_device(cfg.device)
    model, _ = load_classifier(checkpoint)
    params, buffers = split_state(model.to(device))
    split = load_splits(cfg.dataset, cfg.paths.cache_dir)["test"]
    arguments = setting_arguments(cfg.evaluate, cfg.metalearn.inner_lr, k_shot)
    vectorised = device.type != "cpu"  # as run() chooses
    accs = evaluate(model, params, buffers, split, episodes=range(start, stop), vectorised=vectorised, **arguments)
    return accs.tolist()


def _metatest_on_dask(cfg: Config, checkpoint: Path) -> dict[str, Any]:
    """Episode shards of every shot setting as mapped Prefect tasks on Dask, assembled in order."""
    import torch

    from flows.fanout import metatest_shards  # Prefect and Dask live in flows/, loaded for this runner only

    accs = metatest_shards(cfg, checkpoint.resolve(), torch.get_num_threads())
    return metatest_result({k: torch.tensor(v) for k, v in accs.items()}, cfg.evaluate.n_way, cfg.evaluate.episodes)


def _settings(cfg: Config) -> dict[str, Any]:
    """What the metrics depend on besides the checkpoint (machine paths excluded)."""
    dataset = dataset_settings(cfg.dataset)
    settings = {"evaluate": asdict(cfg.evaluate), "inner_lr": cfg.metalearn.inner_lr, "dataset": dataset}
    return {**settings, "threads": cfg.threads}  # the summation order, so the bits


def _check_fits(path: Path, meta: dict[str, Any], cfg: Config) -> None:
    """The checkpoint must take the configured images and adapt without writing buffers.

    Its head width need not be ``evaluate.n_way``: each episode starts from the head for its ``N``
    classes (:func:`free.maml.head_for_classes`; prototypes when ``N`` differs from the trained way).
    """
    ds = cfg.dataset
    problems = []
    if meta["channels"] != ds.channels or meta["image_size"] != ds.image_size:
        problems.append(
            f"it takes {meta['channels']}x{meta['image_size']}x{meta['image_size']} images but the data set "
            f"gives {ds.channels}x{ds.image_size}x{ds.image_size}"
        )
    if meta["track_running_stats"]:
        # Running BN statistics would be updated while adapting, and vmap over episodes would mix them.
        problems.append("its BatchNorm tracks running statistics (not a MAML meta-learner)")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    trained_lr = meta.get("inner_lr")
    if trained_lr is not None and trained_lr != cfg.metalearn.inner_lr:
        warnings.warn(
            f"{path} was meta-trained with inner_lr={trained_lr}; testing with metalearn.inner_lr="
            f"{cfg.metalearn.inner_lr}",
            stacklevel=3,
        )


def _plot(result: dict[str, Any], path: Path) -> None:
    """Sorted per-episode accuracies of each setting, with mean +- 95% CI in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, value in result.items():
        if not isinstance(value, dict):
            continue
        accs = sorted(value["accs"])
        quantile = [(i + 0.5) / len(accs) for i in range(len(accs))]
        label = f"{key}: {100 * value['acc']:.2f}% ± {100 * value['ci95']:.2f}%"
        (line,) = ax.plot(quantile, accs, label=label)
        ax.axhspan(value["acc"] - value["ci95"], value["acc"] + value["ci95"], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("episode quantile (sorted)")
    ax.set_ylabel("query accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"meta-test, {result['episodes']} episodes per setting (band: mean ± 95% CI)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, png.getvalue())  # atomic like every other artifact; a full disk names the file
