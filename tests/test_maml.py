"""The functional inner loop equals an explicit autograd loop on a copied module."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from free.maml import accuracy, adapt, logits, loss_grad, split_state
from free.models import build_classifier


def small_learner(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_classifier("conv4", 1, 3, 28, 8, [0.5], [0.25], track_running_stats=False)


def test_adapt_matches_explicit_sgd_loop() -> None:
    model = small_learner()
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 0, 1, 1, 2, 2])
    params, buffers = split_state(model)
    adapted = adapt(model, params, buffers, x, y, steps=3, lr=0.1)

    reference = copy.deepcopy(model)  # naive reference: autograd + manual SGD on a module copy
    for _ in range(3):
        loss = F.cross_entropy(reference(x), y)
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads, strict=True):
                p -= 0.1 * g
    for name, p in reference.named_parameters():
        torch.testing.assert_close(adapted[name], p, rtol=1e-5, atol=1e-6)
    # The initialisation itself is untouched (functional).
    for name, p in model.named_parameters():
        assert torch.equal(params[name], p.detach())


def test_zero_steps_is_identity_and_grad_matches_autograd() -> None:
    model = small_learner(1)
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2])
    params, buffers = split_state(model)
    assert adapt(model, params, buffers, x, y, steps=0, lr=0.5) is params
    grads = loss_grad(model, params, buffers, x, y)
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(grads[name], g)


def test_adaptation_fits_the_support_set() -> None:
    model = small_learner(2)
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 0, 1, 1, 2, 2])
    params, buffers = split_state(model)
    adapted = adapt(model, params, buffers, x, y, steps=25, lr=0.5)
    assert accuracy(logits(model, adapted, buffers, x), y).item() == 1.0


def test_accuracy_over_last_dim() -> None:
    scores = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.9, 0.1], [0.9, 0.1]]])
    assert accuracy(scores, torch.tensor([[0, 1], [0, 1]])).tolist() == [1.0, 0.5]


def test_prototype_head_is_a_nearest_prototype_classifier_before_any_step() -> None:
    torch.manual_seed(3)
    model = build_classifier("conv4", 1, 3, 28, 8, [0.5], [0.25], track_running_stats=False, head="proto")
    x_s, y_s = torch.rand(9, 1, 28, 28), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    x_q = torch.rand(12, 1, 28, 28)
    params, buffers = split_state(model)
    adapted = adapt(model, params, buffers, x_s, y_s, steps=0, lr=0.1)
    with torch.no_grad():  # naive reference: distances to class means of the support features
        f_s, f_q = model.features(x_s), model.features(x_q)
        prototypes = torch.stack([f_s[y_s == k].mean(0) for k in range(3)])
        nearest = torch.cdist(f_q, prototypes).argmin(dim=1)
    assert torch.equal(logits(model, adapted, buffers, x_q).argmax(dim=1), nearest)
    linear = build_classifier("conv4", 1, 3, 28, 8, [0.5], [0.25], track_running_stats=False)
    linear.load_state_dict(model.state_dict())
    assert adapt(linear, params, buffers, x_s, y_s, steps=0, lr=0.1) is params  # linear head: untouched
