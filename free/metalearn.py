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
that matches the teachers' softened predictions on the query set.

Distillation on tasks that mix teachers (departure from the authors' code, which distils one
teacher per task): each query image learns from the teacher that produced it
(:func:`distillation_targets`), over the task's classes that teacher knows. A teacher's softmax is
a distribution over its own classes only, so it says nothing about a task class it never saw; the
KL is taken between the teacher's and the student's distributions *conditioned on the known
classes* (both renormalised over them, :func:`distillation_loss`). Giving the unknown classes
probability 0 instead would claim the image is surely not of a class the teacher cannot judge, and
would reduce to a tempered hard-label loss wherever the teacher knows one class of the task. A task
from a single teacher is the usual Hinton KD, as before; an image whose teacher knows only its own
class of the task adds nothing (there is nothing for that teacher to teach about the others).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    """``T^2 * mean_i KL(softmax(t_i/T) || softmax(s_i/T))`` over the classes row ``i``'s teacher knows
    (Hinton et al., 2015), from log-probabilities on both sides.

    Args:
        student_logits: ``(B, N)`` the student's logits over the task's classes.
        teacher_logits: ``(B, N)`` the teacher's logits at the same classes; ``-inf`` where the row's
            teacher does not know the class. Both softmaxes are then taken over the finite entries
            only (the KL of the distributions conditioned on the known classes); a row without
            ``-inf`` is the usual KD, a row with one finite entry contributes 0.
        temperature: ``T``.

    Returns:
        A 0-d tensor, the sum over rows divided by ``B`` (``batchmean``).
    """
    known = torch.isfinite(teacher_logits)  # (B, N)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)  # -inf (probability 0) where unknown
    log_s = F.log_softmax((student_logits / temperature).masked_fill(~known, float("-inf")), dim=-1)
    # Zero the unknown entries before subtracting: -inf - -inf would put NaN into the gradient.
    gap = log_t.masked_fill(~known, 0.0) - log_s.masked_fill(~known, 0.0)
    return (log_t.exp() * gap).sum() / student_logits.shape[0] * temperature**2


def distillation_targets(
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    task_teachers: torch.Tensor,
    task_classes: Sequence[str],
    teachers: Mapping[int, tuple[Callable[[torch.Tensor], torch.Tensor], Sequence[str]]],
) -> torch.Tensor:
    """Each query image's soft target from the teacher that produced it, over the task's classes.

    Args:
        query_x: ``(M, C, H, W)`` query images; query_y: ``(M,)`` their task labels in ``0..N-1``.
        task_teachers: ``(N,)`` the teacher each task label was recovered from.
        task_classes: the ``N`` original class names of the task's labels.
        teachers: teacher id -> (the teacher, its class names in its own label order).

    Returns:
        ``(M, N)``: entry ``(i, j)`` is the logit that image ``i``'s teacher gives class
        ``task_classes[j]``, matched by original class name (a teacher may know a task class that
        was drawn from another teacher), or ``-inf`` when that teacher does not know it. Column
        ``query_y[i]`` is always finite.
    """
    out = torch.full((len(query_y), len(task_classes)), float("-inf"), device=query_x.device)
    image_teacher = task_teachers.to(query_y.device)[query_y]  # (M,)
    for t in image_teacher.unique().tolist():
        teacher, names = teachers[t]
        rows = (image_teacher == t).nonzero().squeeze(1).to(query_x.device)
        index = {name: k for k, name in enumerate(names)}
        columns = [(j, index[name]) for j, name in enumerate(task_classes) if name in index]
        task_cols = torch.tensor([j for j, _ in columns], device=query_x.device)
        teacher_cols = torch.tensor([k for _, k in columns], device=query_x.device)
        with torch.no_grad():
            scores = teacher(query_x[rows])  # (R, teacher's classes)
        out[rows.unsqueeze(1), task_cols] = scores[:, teacher_cols].to(out.dtype)
    return out


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
        teacher_logits: ``(N*Q, N)`` each query image's teacher's logits in task-label order, ``-inf``
            at classes that teacher does not know (:func:`distillation_targets`); used when
            ``settings.distill > 0``; ``None`` skips distillation for this task.
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
