"""The authors' meta-learner update, ``metalearn.update=official`` (WalkerWorldPeace/FREE, ``main.py``).

One meta-iteration, after a batch has been recovered from each chosen teacher:

1. **distillation on a fast copy** - copy the initialisation ``theta`` to ``fast`` and give it a
   fresh Adam; for each teacher *in sequence*, one Adam step on a distillation loss between the
   copy and that teacher on the teacher's fresh batch. Each step starts where the previous teacher
   left the copy, which is where FREE's implicit gradient alignment comes from here: alignment
   *across teachers* (expanding the sequence gives the cross terms ``<g_i, g_j>``, as for our
   update in :mod:`free.metalearn`);
2. **Reptile move** - the initialisation's own Adam takes a step along
   ``reptile_scale * (theta - fast)`` (their ``reptile_grad``, ``alpha=67``);
3. **MAML replay** - tasks drawn from the whole memory bank, ``replay_batch`` at a time; each batch
   is one Adam step on the summed query losses after the inner loop (second order by default, as
   theirs without ``--approx``); stop after ``patience`` batches in a row that did not beat the best
   mean pseudo-task accuracy of this iteration (their ``generate_interval`` loop).

``align=False`` (``method=free_noalign``) changes step 1 only: every teacher's distillation
gradient is taken at ``theta`` (the start of the copy), and the copy then takes the same Adam steps
with them - so the ablation differs from the update in the alignment alone.

Departures from the authors' code, each on purpose:

* their distillation loss is ``F.kl_div(softmax(s), softmax(t))``; ``kl_div`` expects
  log-probabilities as its input, so that is ``sum t (log t - softmax(s))`` - a "soft accuracy"
  whose gradient is not the KL's. We use the KL between the softened distributions
  (:func:`free.metalearn.distillation_loss`, temperature ``official.temperature``, theirs 1);
* a teacher whose class count differs from the learner's way is compared over the teacher's own
  classes with the head :func:`free.maml.head_for_classes` gives (prototypes), as the adversarial
  term does; theirs assumes equal widths (and gets the raw head, as here at equal widths);
* the replay loop is bounded by ``max_replay_batches`` (theirs can run unboundedly long);
* they update the meta-learner only after ``--warmup`` generator-only epochs; here the learner is
  updated from the first iteration (the adversarial warm-up, ``inversion.adv_warmup``, is kept);
* their replay batches carry over between iterations (a list never reset); ours start afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

from free.data.episodes import Episode
from free.maml import Params, accuracy, adapt, head_for_classes, logits
from free.metalearn import MetaSettings, distillation_loss, meta_gradient


@dataclass(frozen=True)
class OfficialSettings:
    """The knobs of the official update (from ``metalearn`` and ``metalearn.official``)."""

    inner_steps: int = 5
    inner_lr: float = 0.01
    lr: float = 0.001
    reptile_scale: float = 67.0
    temperature: float = 1.0
    replay_batch: int = 10
    patience: int = 10
    max_replay_batches: int = 30
    second_order: bool = True
    align: bool = True


@dataclass
class TeacherBatch:
    """A teacher's freshly recovered batch: images ``(B, C, H, W)``, intended labels ``(B,)`` in the
    teacher's label order, and the teacher's logits ``(B, n_teacher_classes)`` on them."""

    images: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor


class DictAdam:
    """``torch.optim.Adam`` for weights kept as a dict of tensors and replaced, not mutated.

    The meta-learner's weights are plain tensors passed around functionally (``best_params`` may
    hold the same tensors), so the optimiser steps private leaves and hands back fresh copies.
    """

    def __init__(self, params: Params, lr: float) -> None:
        self.leaves = {name: w.detach().clone() for name, w in params.items()}
        self.optimiser = torch.optim.Adam(list(self.leaves.values()), lr=lr)  # betas (0.9, 0.999): theirs

    def step(self, params: Params, grads: Params) -> Params:
        with torch.no_grad():
            for name, leaf in self.leaves.items():
                leaf.copy_(params[name])
                leaf.grad = grads[name].detach().clone()
        self.optimiser.step()
        return {name: leaf.detach().clone() for name, leaf in self.leaves.items()}


def teacher_distillation_loss(
    model: nn.Module, params: Params, buffers: Params, batch: TeacherBatch, temperature: float
) -> torch.Tensor:
    """KL from the teacher's to the learner's softened prediction on the teacher's batch, over the
    teacher's classes (the head for them from :func:`free.maml.head_for_classes`)."""
    n_classes = batch.teacher_logits.shape[1]
    start = head_for_classes(model, params, buffers, batch.images, batch.labels, n_classes)
    return distillation_loss(logits(model, start, buffers, batch.images), batch.teacher_logits, temperature)


def distil_fast_copy(
    model: nn.Module, params: Params, buffers: Params, batches: Sequence[TeacherBatch], settings: OfficialSettings
) -> tuple[Params, list[float]]:
    """Step 1: the fast copy after one Adam step per teacher (sequential gradients if ``align``, else
    all at ``params``). Returns the copy and each teacher's loss at the point its gradient was taken."""
    adam = DictAdam(params, settings.lr)  # fresh every iteration, as theirs

    def loss_and_grad(weights: Params, batch: TeacherBatch) -> tuple[Params, float]:
        def loss(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
            value = teacher_distillation_loss(model, p, buffers, batch, settings.temperature)
            return value, value.detach()

        g, value = grad(loss, has_aux=True)(weights)
        return g, value.item()

    fast, losses = params, []
    if settings.align:
        for batch in batches:
            g, loss = loss_and_grad(fast, batch)
            fast = adam.step(fast, g)
            losses.append(loss)
    else:
        at_start = [loss_and_grad(params, batch) for batch in batches]
        for g, loss in at_start:
            fast = adam.step(fast, g)
            losses.append(loss)
    return fast, losses


def maml_batch_gradient(
    model: nn.Module, params: Params, buffers: Params, tasks: Sequence[Episode], settings: OfficialSettings
) -> tuple[Params, float, float]:
    """Gradient of the summed query losses after the inner loop (theirs: ``loss_batch`` summed), and
    the batch's mean query loss and accuracy. Second order differentiates through the inner steps."""
    if not settings.second_order:  # first-order MAML: each task's gradient at its adapted weights
        first_order = MetaSettings(settings.inner_steps, settings.inner_lr)
        total = {name: torch.zeros_like(w) for name, w in params.items()}
        losses, accs = [], []
        for task in tasks:
            g, stats = meta_gradient(model, params, buffers, task, first_order)
            total = {name: total[name] + g[name] for name in total}
            losses.append(stats["query_loss"])
            accs.append(stats["query_acc"])
        return total, sum(losses) / len(losses), sum(accs) / len(accs)

    def summed(p: Params) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        loss, acc = 0.0, 0.0
        for task in tasks:
            adapted = adapt(model, p, buffers, task.support_x, task.support_y, settings.inner_steps, settings.inner_lr)
            scores = logits(model, adapted, buffers, task.query_x)
            loss = loss + F.cross_entropy(scores, task.query_y)
            acc = acc + accuracy(scores, task.query_y)
        return loss, (loss.detach() / len(tasks), acc.detach() / len(tasks))

    grads, (mean_loss, mean_acc) = grad(summed, has_aux=True)(params)
    return grads, mean_loss.item(), mean_acc.item()


class OfficialUpdate:
    """The official update's state across iterations: the initialisation's Adam."""

    def __init__(self, params: Params, settings: OfficialSettings) -> None:
        self.settings = settings
        self.adam = DictAdam(params, settings.lr)

    def step(
        self,
        model: nn.Module,
        params: Params,
        buffers: Params,
        batches: Sequence[TeacherBatch],
        sample_replay_task: Callable[[], Episode],
    ) -> tuple[Params, dict[str, float]]:
        """One meta-iteration (steps 1-3 of the module docstring). Returns the new initialisation and
        stats: ``distill_loss`` (mean over teachers), ``query_loss``/``query_acc`` (mean over the
        replay batches, after adaptation), ``replay_batches``."""
        s = self.settings
        fast, distill = distil_fast_copy(model, params, buffers, batches, s)
        params = self.adam.step(params, {name: s.reptile_scale * (params[name] - fast[name]) for name in params})

        best, without_gain, losses, accs = None, 0, [], []
        while without_gain < s.patience and len(accs) < s.max_replay_batches:
            tasks = [sample_replay_task() for _ in range(s.replay_batch)]
            grads, loss, acc = maml_batch_gradient(model, params, buffers, tasks, s)
            params = self.adam.step(params, grads)
            losses.append(loss)
            accs.append(acc)
            if best is None or acc > best:
                best, without_gain = acc, 0
            else:
                without_gain += 1
        return params, {
            "distill_loss": sum(distill) / len(distill) if distill else 0.0,
            "query_loss": sum(losses) / len(losses),
            "query_acc": sum(accs) / len(accs),
            "replay_batches": float(len(accs)),
        }
