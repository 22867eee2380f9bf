"""Meta-testing: adapt an initialisation to many N-way K-shot episodes and report accuracy +- CI.

Each episode is solved the way the meta-learner was trained to solve tasks: ``inner_steps`` steps
of gradient descent from the initialisation on the support set (:func:`free.maml.adapt`), then the
accuracy of the adapted network on the query set. The result is the mean over ``E`` episodes and
the 95% confidence interval ``1.96 * std / sqrt(E)`` (DESIGN.md §1, "Meta-testing").

Episodes of a chunk are adapted together with :func:`torch.func.vmap` over the episode dimension:
every episode gets its own copy of the weights, but one batched kernel call per layer. This is
valid because the meta-learner's BatchNorm uses batch statistics (``track_running_stats=False``),
so no buffer is written while adapting. A plain Python loop (``vectorised=False``) is kept as the
reference implementation; the two agree to float rounding.

Memory: a vmapped chunk holds the activations of all its episodes at once; ``episode_batch``
bounds it (Conv4-64, 28x28, 5-way 5-shot 15-query: ~60 MB per episode, 200 episodes ~11.5 GiB).
Speed (same setting, 10 inner steps): vmap is 20-40x faster than the loop on an H100, but on a
2-core CPU the loop is 1.3-2x faster, so the stage picks the loop on CPU.

Pure core: no disk, no Hydra; :func:`metatest` reads plain fields of the evaluate config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import vmap

from free.data.base import Progress
from free.data.episodes import Episode, EpisodeSampler
from free.maml import Params, accuracy, adapt, logits

if TYPE_CHECKING:
    from free.data.splits import FewShotSplit


def setting_key(n_way: int, k_shot: int) -> str:
    """Name of one evaluation setting in the metrics, e.g. ``"5way_1shot"``."""
    return f"{n_way}way_{k_shot}shot"


def _adapted_query_logits(
    model: nn.Module,
    params: Params,
    buffers: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    inner_steps: int,
    inner_lr: float,
    n_way: int,
) -> torch.Tensor:
    """One episode: adapt on ``(support_x, support_y)``, return ``(N*Q, N)`` query logits.

    The head for the ``N`` classes comes from :func:`free.maml.head_for_classes`, so a meta-learner
    trained ``5``-way can be tested ``N``-way (the same head the served model uses for a request).
    """
    adapted = adapt(model, params, buffers, support_x, support_y, inner_steps, inner_lr, n_classes=n_way)
    return logits(model, adapted, buffers, query_x)


def query_logits(
    model: nn.Module,
    params: Params,
    buffers: Params,
    episodes: Episode,
    inner_steps: int,
    inner_lr: float,
    vectorised: bool = True,
) -> torch.Tensor:
    """Query logits of the network adapted separately to each episode of a batch.

    Args:
        model: the architecture (its own weights are not used).
        params, buffers: the initialisation ``theta`` and the model's buffers (not modified).
        episodes: a batch of ``E`` episodes, on the device of ``params``.
        inner_steps: gradient steps on each support set (0: no adaptation).
        inner_lr: inner learning rate ``alpha``.
        vectorised: ``vmap`` over the episodes (``True``) or a Python loop (the reference).

    Returns:
        ``(E, N*Q, N)`` logits of each episode's query images, ``N = episodes.classes.shape[-1]``
        (any way: the head for ``N`` classes is built from the support set when ``N`` differs from
        the model's head, see :func:`free.maml.head_for_classes`).
    """
    n_way = episodes.classes.shape[-1]  # a Python int: a static shape inside vmap

    def one(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
        return _adapted_query_logits(model, params, buffers, sx, sy, qx, inner_steps, inner_lr, n_way)

    # No outer graph is needed: torch.func.grad inside adapt() computes its own gradients even
    # under no_grad, and the initialisation may require grad when called from meta-training.
    with torch.no_grad():
        if vectorised:
            # params/buffers are closed over, i.e. shared by all episodes (in_dims None).
            return vmap(one, in_dims=(0, 0, 0))(episodes.support_x, episodes.support_y, episodes.query_x)
        return torch.stack(
            [one(episodes.support_x[i], episodes.support_y[i], episodes.query_x[i]) for i in range(len(episodes))]
        )


def episode_accuracies(
    model: nn.Module,
    params: Params,
    buffers: Params,
    episodes: Episode,
    inner_steps: int,
    inner_lr: float,
    vectorised: bool = True,
) -> torch.Tensor:
    """Query accuracy after adapting to each episode of a batch.

    Args: as :func:`query_logits`.

    Returns:
        ``(E,)`` float accuracies in [0, 1], on the device of ``params``.
    """
    scores = query_logits(model, params, buffers, episodes, inner_steps, inner_lr, vectorised)
    return accuracy(scores, episodes.query_y)


def _device_of(params: Params) -> torch.device:
    return next(iter(params.values())).device


def evaluate(
    model: nn.Module,
    params: Params,
    buffers: Params,
    split: FewShotSplit,
    n_way: int,
    k_shot: int,
    q_query: int,
    episodes: int | range,
    inner_steps: int,
    inner_lr: float,
    seed: int,
    episode_batch: int,
    vectorised: bool = True,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Per-episode accuracies on ``episodes`` episodes drawn from ``split``.

    Episodes come from one :class:`EpisodeSampler` seeded with ``seed`` and are drawn and evaluated
    in chunks of ``episode_batch``. Episodes are drawn one after the other from the sampler's
    stream, so the episodes (and the result) depend on the seed only, not on the chunk size, which
    merely bounds memory.

    A ``range(start, stop)`` evaluates only episodes ``start .. stop - 1`` of that stream: the unit
    of a meta-test shard (``runner=dask``, :func:`episode_shards`). The sampler is replayed past the
    first ``start`` episodes (drawing indices and images only, no adaptation), so episode ``i`` is
    the same episode whichever shard evaluates it, and the shards' results concatenated in order are
    the whole run's. Chunks stay on the global grid of ``episode_batch`` (a chunk never straddles a
    multiple of it), so a vectorised shard batches the same episodes together as the whole run does.

    Args:
        model, params, buffers: the network and its initialisation (see :func:`query_logits`).
        split: the real images to draw episodes from (meta-test, or meta-val for model selection).
        n_way, k_shot, q_query: episode shape.
        episodes: number of episodes ``E`` (episodes ``0 .. E - 1``), or a ``range`` of them.
        inner_steps, inner_lr: the inner loop.
        seed: seed of the episode sampler.
        episode_batch: episodes per vectorised chunk.
        vectorised: see :func:`query_logits`.
        progress: optional ``progress(iterable, description, total)`` wrapper over the chunks.

    Returns:
        ``(E,)`` float accuracies on the CPU, in episode order (``E = len(episodes)`` for a range).
    """
    span = range(episodes) if isinstance(episodes, int) else episodes
    if len(span) < 1 or span.start < 0 or span.step != 1 or episode_batch < 1:
        raise ValueError(
            f"need episodes >= 1 (or a range(start, stop) with 0 <= start < stop) and episode_batch >= 1, "
            f"got {episodes!r} and {episode_batch}"
        )
    start, stop = span.start, span.stop
    sampler = EpisodeSampler(split, n_way, k_shot, q_query, seed=seed)
    for _ in range(start):
        sampler.sample(1)  # the stream of one episode per call, as _draw consumes it
    device = _device_of(params)
    bounds = [start, *range((start // episode_batch + 1) * episode_batch, stop, episode_batch), stop]
    sizes = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    chunks: Iterable[int] = sizes
    if progress is not None:
        chunks = progress(sizes, f"meta-test {setting_key(n_way, k_shot)}", len(sizes))
    accs = []
    for size in chunks:
        batch = _draw(sampler, size).to(device)
        accs.append(episode_accuracies(model, params, buffers, batch, inner_steps, inner_lr, vectorised).cpu())
    return torch.cat(accs)


def episode_shards(episodes: int, episode_batch: int, shards: int) -> list[tuple[int, int]]:
    """Split episodes ``0 .. episodes - 1`` into at most ``shards`` contiguous ``(start, stop)`` ranges.

    Boundaries fall on multiples of ``episode_batch`` (whole chunks per shard, see
    :func:`evaluate`), as evenly as the chunks allow; never an empty range.
    """
    if episodes < 1 or episode_batch < 1 or shards < 1:
        raise ValueError(f"need episodes, episode_batch and shards >= 1, got {episodes}, {episode_batch}, {shards}")
    n_chunks = math.ceil(episodes / episode_batch)
    n = min(shards, n_chunks)
    cuts = [min(episodes, (n_chunks * k // n) * episode_batch) for k in range(n + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def _draw(sampler: EpisodeSampler, size: int) -> Episode:
    """``size`` episodes drawn one at a time and stacked.

    ``sampler.sample(E)`` draws all classes of a batch before any image, so its stream depends on
    ``E``; one episode per call makes episode ``i`` the same whatever the chunking.
    """
    one = [sampler.sample(1) for _ in range(size)]
    fields = ("support_x", "support_y", "query_x", "query_y", "classes")
    return Episode(*(torch.cat([getattr(e, f) for e in one]) for f in fields))


def summarize(accs: torch.Tensor) -> dict[str, float]:
    """Mean accuracy and its 95% confidence interval over episodes.

    ``ci95 = 1.96 * std / sqrt(E)`` with ``std`` the *unbiased* sample standard deviation
    (Bessel's correction, divisor ``E - 1``), the normal-approximation half-width of the interval
    around the mean. A single episode gives ``ci95 = 0.0``.

    Args:
        accs: ``(E,)`` per-episode accuracies.

    Returns:
        ``{"acc": mean, "ci95": half-width}`` as Python floats.
    """
    accs = accs.double().flatten()
    if accs.numel() == 0:
        raise ValueError("no episodes to summarize")
    n = accs.numel()
    ci95 = 1.96 * accs.std(correction=1).item() / math.sqrt(n) if n > 1 else 0.0
    return {"acc": accs.mean().item(), "ci95": ci95}


def metatest(
    model: nn.Module,
    params: Params,
    buffers: Params,
    split: FewShotSplit,
    cfg_evaluate: Any,
    inner_lr: float,
    progress: Progress | None = None,
    vectorised: bool = True,
) -> dict[str, Any]:
    """Meta-test one initialisation on every configured shot setting.

    Args:
        model, params, buffers: the meta-learner and its initialisation.
        split: the meta-test split (real images of held-out classes).
        cfg_evaluate: an :class:`~free.config.schema.EvaluateConfig` (``episodes``, ``n_way``,
            ``shots``, ``q_query``, ``inner_steps``, ``episode_batch``, ``seed``).
        inner_lr: the inner learning rate (the meta-training one, ``metalearn.inner_lr``).
        progress, vectorised: see :func:`evaluate`.

    Returns:
        ``{"5way_1shot": {"acc", "ci95", "accs": [E floats]}, ..., "episodes": E}``. Each shot
        setting ``k`` uses the sampler seed ``seed + k``: deterministic, and different episodes
        for different settings.
    """
    ev = cfg_evaluate
    accs = {
        k_shot: evaluate(
            model,
            params,
            buffers,
            split,
            episodes=ev.episodes,
            vectorised=vectorised,
            progress=progress,
            **setting_arguments(ev, inner_lr, k_shot),
        )
        for k_shot in shot_settings(ev)
    }
    return metatest_result(accs, ev.n_way, ev.episodes)


def setting_arguments(cfg_evaluate: Any, inner_lr: float, k_shot: int) -> dict[str, Any]:
    """:func:`evaluate`'s episode shape, inner loop, seed and chunk size for shot setting ``k_shot``.

    The one place that maps the evaluate config onto :func:`evaluate`: :func:`metatest` evaluates
    all ``evaluate.episodes`` of a setting with them, a ``runner=dask`` shard a ``range`` of them
    (:func:`free.stages.metatest.evaluate_shard`), so both draw the same episodes.
    """
    ev = cfg_evaluate
    return {
        "n_way": ev.n_way,
        "k_shot": k_shot,
        "q_query": ev.q_query,
        "inner_steps": ev.inner_steps,
        "inner_lr": inner_lr,
        "seed": shot_seed(ev, k_shot),
        "episode_batch": ev.episode_batch,
    }


def shot_settings(cfg_evaluate: Any) -> list[int]:
    """The shot settings :func:`metatest` evaluates, in order (``evaluate.shots`` without repeats)."""
    return _unique(cfg_evaluate.shots)


def shot_seed(cfg_evaluate: Any, k_shot: int) -> int:
    """Seed of the episode sampler of shot setting ``k_shot``: ``evaluate.seed + k_shot``."""
    return cfg_evaluate.seed + k_shot


def metatest_result(accs: dict[int, torch.Tensor], n_way: int, episodes: int) -> dict[str, Any]:
    """:func:`metatest`'s result from the per-episode accuracies of each shot setting (in order);
    the runner=dask path assembles its shards' accuracies with it too."""
    result: dict[str, Any] = {
        setting_key(n_way, k_shot): {**summarize(shot_accs), "accs": shot_accs.tolist()}
        for k_shot, shot_accs in accs.items()
    }
    result["episodes"] = episodes
    return result


def _unique(values: Sequence[int]) -> list[int]:
    """``values`` without repeats, in order (a repeated shot would only overwrite its own key)."""
    return list(dict.fromkeys(values))
