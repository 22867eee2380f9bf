"""Meta-learner updates: first-order MAML meta-gradients and FREE's implicit gradient alignment.

For a batch of tasks ``T_1..T_n`` and an initialisation ``theta`` (FREE, Wei et al. CVPR 2024, §3.3):

* **aligned** (``align=True``): walk through the tasks *sequentially*; task ``i``'s first-order
  meta-gradient is evaluated at the weights already moved by tasks ``1..i-1``::

      theta_0 = theta;   theta_i = theta_{i-1} - alpha * g_i(theta_{i-1})
      theta  <- theta + beta * (theta_n - theta)          # Reptile-style move to the end point

  To second order, ``theta_n - theta = -alpha * sum_i g_i(theta) + alpha^2 * sum_{i<j} H_j g_i + ...``;
  the cross terms are the gradient of ``sum_{i<j} <g_i, g_j>``, so the update also *increases the
  inner product* between tasks' gradients: it aligns heterogeneous teachers' tasks at first-order cost.
* **averaged** (``align=False``, the ablation): every ``g_i`` at ``theta``; ``theta_n = theta - alpha *
  sum_i g_i(theta)``, then the same move. Same scale, no cross terms.

``g_i(w)`` is the FO-MAML meta-gradient: adapt ``w`` on the support set (``inner_steps`` SGD steps),
then the gradient of the query loss at the adapted weights - optionally plus a distillation term
that matches the teacher's softened predictions on the query set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

from free.data.episodes import Episode
from free.maml import Params, accuracy, adapt, logits

T = TypeVar("T")


@dataclass(frozen=True)
class MetaSettings:
    """The meta-update's knobs (from :class:`free.config.schema.MetaLearnConfig`)."""

    inner_steps: int = 5
    inner_lr: float = 0.01
    meta_lr: float = 0.01  # alpha: SGD step per task along the sequence
    beta: float = 1.0  # move of the initialisation towards the sequence's end point
    align: bool = True
    distill: float = 0.0
    temperature: float = 4.0


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, from log-probabilities on both sides (Hinton et al., 2015)."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


def meta_gradient(
    model: nn.Module,
    params: Params,
    buffers: Params,
    task: Episode,
    settings: MetaSettings,
    teacher_logits: torch.Tensor | None = None,
) -> tuple[Params, dict[str, float]]:
    """First-order meta-gradient of one task at ``params``, and the query loss/accuracy after adaptation.

    Args:
        task: one episode (no batch dimension).
        teacher_logits: ``(N*Q, N)`` the teacher's logits on the query images in task-label order,
            used when ``settings.distill > 0``; ``None`` skips distillation for this task.
    """
    adapted = adapt(model, params, buffers, task.support_x, task.support_y, settings.inner_steps, settings.inner_lr)

    def query_loss(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        scores = logits(model, p, buffers, task.query_x)
        loss = F.cross_entropy(scores, task.query_y)
        if teacher_logits is not None and settings.distill > 0:
            loss = loss + settings.distill * distillation_loss(scores, teacher_logits, settings.temperature)
        return loss, scores

    grads, scores = grad(query_loss, has_aux=True)(adapted)
    stats = {
        "query_acc": accuracy(scores, task.query_y).item(),
        "query_loss": F.cross_entropy(scores, task.query_y).item(),
    }
    return grads, stats


def aligned_or_averaged(
    params: Params,
    tasks: Sequence[T],
    task_gradient: Callable[[Params, T], tuple[Params, dict[str, float]]],
    meta_lr: float,
    beta: float,
    align: bool,
) -> tuple[Params, list[dict[str, float]]]:
    """The update rule alone, for any per-task gradient ``task_gradient(weights, task)``.

    ``align=True``: ``theta_i = theta_{i-1} - meta_lr * g_i(theta_{i-1})``; ``align=False``:
    ``theta_n = theta - meta_lr * sum_i g_i(theta)``. Both end with
    ``theta + beta * (theta_n - theta)``. Returns the new weights and each task's stats.
    """
    stats: list[dict[str, float]] = []
    if align:
        end = params
        for task in tasks:
            g, s = task_gradient(end, task)
            end = {name: w - meta_lr * g[name] for name, w in end.items()}
            stats.append(s)
    else:
        total = {name: torch.zeros_like(w) for name, w in params.items()}
        for task in tasks:
            g, s = task_gradient(params, task)
            total = {name: total[name] + g[name] for name in total}
            stats.append(s)
        end = {name: w - meta_lr * total[name] for name, w in params.items()}
    return {name: w + beta * (end[name] - w) for name, w in params.items()}, stats


def meta_update(
    model: nn.Module,
    params: Params,
    buffers: Params,
    tasks: Sequence[Episode],
    settings: MetaSettings,
    teacher_logits: Sequence[torch.Tensor | None] | None = None,
) -> tuple[Params, dict[str, float]]:
    """One meta-iteration of the meta-learner over ``tasks`` (aligned or averaged, then the move).

    Args:
        teacher_logits: per task, the teacher's query logits for distillation, or ``None``.

    Returns:
        The new initialisation and the mean query loss/accuracy over the tasks (after adaptation).
    """
    targets = list(teacher_logits) if teacher_logits is not None else [None] * len(tasks)

    def task_gradient(weights: Params, item: tuple[Episode, torch.Tensor | None]) -> tuple[Params, dict[str, float]]:
        return meta_gradient(model, weights, buffers, item[0], settings, item[1])

    new, stats = aligned_or_averaged(
        params, list(zip(tasks, targets, strict=True)), task_gradient, settings.meta_lr, settings.beta, settings.align
    )
    return new, {key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}
