"""The authors' update (``metalearn.update=official``) against a hand-written reference with nn.Modules,
``torch.autograd`` and ``torch.optim.Adam`` - the way their ``main.py`` does it."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from free.data.episodes import Episode
from free.maml import split_state
from free.models import build_classifier
from free.official import (
    DictAdam,
    OfficialSettings,
    OfficialUpdate,
    TeacherBatch,
    distil_fast_copy,
    maml_batch_gradient,
)

WAY, SIZE = 5, 28


def learner(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_classifier("conv4", 1, WAY, SIZE, 4, [0.5], [0.5], track_running_stats=False).double()


def teacher_batch(seed: int, n_classes: int = WAY, per_class: int = 3) -> TeacherBatch:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n_classes * per_class, 1, SIZE, SIZE, generator=gen, dtype=torch.float64)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return TeacherBatch(images, labels, 3 * torch.randn(len(labels), n_classes, generator=gen, dtype=torch.float64))


def task(seed: int, shots: int = 1, queries: int = 2) -> Episode:
    gen = torch.Generator().manual_seed(seed)
    x = lambda n: torch.rand(WAY * n, 1, SIZE, SIZE, generator=gen, dtype=torch.float64)  # noqa: E731
    y = lambda n: torch.arange(WAY).repeat_interleave(n)  # noqa: E731
    return Episode(x(shots), y(shots), x(queries), y(queries), torch.arange(WAY))


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD with torch's own kl_div, log-probabilities as its input (not the authors' softmax)."""
    return (
        F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1), reduction="batchmean")
        * temperature**2
    )


def naive_replay_loss(model: torch.nn.Module, tasks: list[Episode], settings: OfficialSettings):
    """Their ``Maml.run`` summed over a batch: inner SGD with ``create_graph`` (second order)."""
    names = [n for n, _ in model.named_parameters()]
    total, correct = 0.0, 0.0
    for t in tasks:
        fast = list(model.parameters())
        for _ in range(settings.inner_steps):
            out = functional_call(model, dict(zip(names, fast, strict=True)), (t.support_x,))
            grads = torch.autograd.grad(F.cross_entropy(out, t.support_y), fast, create_graph=settings.second_order)
            fast = [w - settings.inner_lr * g for w, g in zip(fast, grads, strict=True)]
        if not settings.second_order:
            fast = [w.detach().requires_grad_() for w in fast]  # FO-MAML: the query gradient at the adapted weights
        scores = functional_call(model, dict(zip(names, fast, strict=True)), (t.query_x,))
        loss = F.cross_entropy(scores, t.query_y)
        if not settings.second_order:
            for w, g in zip(model.parameters(), torch.autograd.grad(loss, fast), strict=True):
                w.grad = g if w.grad is None else w.grad + g
        total = total + loss
        correct += (scores.argmax(-1) == t.query_y).double().mean().item()
    return total, correct / len(tasks)


def naive_official_step(model, batches, replay_batches, settings: OfficialSettings):
    """One iteration as their main.py: fast copy + Adam per teacher, reptile_grad + Adam, replay loop."""
    model = copy.deepcopy(model)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    fast = copy.deepcopy(model)
    fast_optimiser = torch.optim.Adam(fast.parameters(), lr=settings.lr)
    if settings.align:
        for b in batches:
            fast_optimiser.zero_grad()
            kd_loss(fast(b.images), b.teacher_logits, settings.temperature).backward()
            fast_optimiser.step()
    else:  # every teacher's gradient at the start, then the same Adam steps
        start = copy.deepcopy(fast)
        grads = [
            torch.autograd.grad(kd_loss(start(b.images), b.teacher_logits, settings.temperature), start.parameters())
            for b in batches
        ]
        for g in grads:
            for w, gw in zip(fast.parameters(), g, strict=True):
                w.grad = gw.clone()
            fast_optimiser.step()
    optimiser.zero_grad()
    for w, fw in zip(model.parameters(), fast.parameters(), strict=True):
        w.grad = settings.reptile_scale * (w.data - fw.data)
    optimiser.step()
    best, without_gain, used = None, 0, 0
    while without_gain < settings.patience and used < settings.max_replay_batches:
        optimiser.zero_grad()
        loss, acc = naive_replay_loss(model, replay_batches[used], settings)
        if settings.second_order:
            loss.backward()
        optimiser.step()
        used += 1
        if best is None or acc > best:
            best, without_gain = acc, 0
        else:
            without_gain += 1
    return dict(model.named_parameters()), used


def run_official(model, batches, replay_batches, settings: OfficialSettings):
    params, buffers = split_state(model)
    queue = iter([t for batch in replay_batches for t in batch])
    new, stats = OfficialUpdate(params, settings).step(model, params, buffers, batches, lambda: next(queue))
    return new, stats


SETTINGS = OfficialSettings(
    inner_steps=2, inner_lr=0.1, lr=0.01, reptile_scale=67.0, temperature=1.0, replay_batch=2, patience=1,
    max_replay_batches=2, second_order=True, align=True,
)  # fmt: skip


@pytest.mark.parametrize(
    "settings",
    [
        SETTINGS,
        replace(SETTINGS, align=False),
        replace(SETTINGS, second_order=False),
        replace(SETTINGS, temperature=4.0, patience=2),
    ],
    ids=["aligned-second-order", "not-aligned", "first-order-replay", "temperature-4"],
)
def test_one_official_iteration_equals_the_authors_loop_written_with_modules(settings: OfficialSettings) -> None:
    model = learner()
    batches = [teacher_batch(1), teacher_batch(2), teacher_batch(3)]
    replay = [[task(10 + 2 * i), task(11 + 2 * i)] for i in range(settings.max_replay_batches)]
    expected, used = naive_official_step(model, batches, replay, settings)
    new, stats = run_official(model, batches, replay, settings)
    assert stats["replay_batches"] == used
    compared = 0
    for name in with_a_gradient(model, batches[0]):
        torch.testing.assert_close(new[name], expected[name].detach(), rtol=1e-7, atol=1e-9, msg=name)
        compared += 1
    assert compared >= 10


def with_a_gradient(model: torch.nn.Module, batch: TeacherBatch) -> list[str]:
    """Parameters whose gradient is not identically zero. A conv bias right before BatchNorm has none
    (the normalisation removes it), and Adam turns its float round-off (~1e-17) into a full ``lr``
    step whose sign is noise, different in any two correct implementations: compare the others."""
    grads = torch.autograd.grad(kd_loss(model(batch.images), batch.teacher_logits, 1.0), list(model.parameters()))
    return [n for (n, _), g in zip(model.named_parameters(), grads, strict=True) if g.abs().max() > 1e-10]


def test_alignment_is_the_only_difference_and_vanishes_with_one_teacher() -> None:
    model = learner()
    params, buffers = split_state(model)
    one, two = [teacher_batch(1)], [teacher_batch(1), teacher_batch(2)]
    aligned, _ = distil_fast_copy(model, params, buffers, one, SETTINGS)
    averaged, _ = distil_fast_copy(model, params, buffers, one, replace(SETTINGS, align=False))
    for name in params:
        torch.testing.assert_close(aligned[name], averaged[name])
    aligned, _ = distil_fast_copy(model, params, buffers, two, SETTINGS)
    averaged, _ = distil_fast_copy(model, params, buffers, two, replace(SETTINGS, align=False))
    assert any(not torch.allclose(aligned[n], averaged[n]) for n in params)


def test_second_order_replay_differs_from_first_order() -> None:
    model = learner()
    params, buffers = split_state(model)
    tasks = [task(5), task(6)]
    second, *_ = maml_batch_gradient(model, params, buffers, tasks, SETTINGS)
    first, *_ = maml_batch_gradient(model, params, buffers, tasks, replace(SETTINGS, second_order=False))
    assert any(not torch.allclose(second[n], first[n], atol=1e-8) for n in params)


def test_a_teacher_with_another_class_count_is_distilled_over_its_own_classes() -> None:
    model = learner()
    params, buffers = split_state(model)
    for n_classes in (3, 10):
        fast, losses = distil_fast_copy(model, params, buffers, [teacher_batch(1, n_classes)], SETTINGS)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert any(not torch.equal(fast[n], params[n]) for n in params)


def test_replay_stops_after_patience_batches_without_gain_and_never_beyond_the_bound() -> None:
    model = learner()
    params, buffers = split_state(model)
    counter = iter(range(10**6))
    sampler = lambda: task(next(counter))  # noqa: E731
    for patience, bound in ((1, 5), (2, 2), (50, 4)):
        settings = replace(SETTINGS, patience=patience, max_replay_batches=bound, replay_batch=1, inner_steps=1)
        _, stats = OfficialUpdate(params, settings).step(model, params, buffers, [teacher_batch(1)], sampler)
        assert 1 <= stats["replay_batches"] <= bound
        if patience >= bound:
            assert stats["replay_batches"] == bound


def test_dict_adam_matches_torch_adam_on_a_module() -> None:
    model = learner()
    reference = copy.deepcopy(model)
    optimiser = torch.optim.Adam(reference.parameters(), lr=0.01)
    params, _ = split_state(model)
    adam = DictAdam(params, 0.01)
    before = {n: w.clone() for n, w in params.items()}
    for step in range(3):
        grads = {n: torch.full_like(w, float(step + 1)) * torch.randn_like(w) for n, w in params.items()}
        for name, w in reference.named_parameters():
            w.grad = grads[name].clone()
        optimiser.step()
        params = adam.step(params, grads)
    for name, w in reference.named_parameters():
        torch.testing.assert_close(params[name], w.detach())
    assert all(torch.equal(before[n], split_state(model)[0][n]) for n in before), "the input weights were mutated"
