"""The MAML inner loop (Finn et al., ICML 2017) as pure functions over parameter dicts.

A model's state is split into ``params`` (adapted) and ``buffers`` (e.g. normalisation constants),
and the network is run with :func:`torch.func.functional_call`, so one initialisation can be
adapted to many tasks - in a Python loop, or under :func:`torch.func.vmap` over a batch of
episodes - without copying modules. Everything here is first-order: the outer update uses the
gradient at the adapted weights (FO-MAML) or the displacement ``theta - theta_adapted`` (Reptile),
so no graph is kept through the inner steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

Params = dict[str, torch.Tensor]


def split_state(model: nn.Module) -> tuple[Params, Params]:
    """``(params, buffers)`` of ``model``, detached: the functional state of the network."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    return params, buffers


def logits(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, n_classes)`` with the given weights."""
    return functional_call(model, (params, buffers), (x,))


def task_loss(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the network with ``params`` on ``(x, y)``."""
    return F.cross_entropy(logits(model, params, buffers, x), y)


def loss_grad(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
    """``d task_loss / d params`` at ``params`` (a dict shaped like ``params``)."""
    return grad(lambda p: task_loss(model, p, buffers, x, y))(params)


def adapt(
    model: nn.Module, params: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float
) -> Params:
    """``steps`` steps of gradient descent on the support set: ``phi <- phi - lr * grad L_S(phi)``.

    Args:
        model: the architecture (its own weights are not used).
        params: the initialisation ``theta``.
        buffers: the model's buffers (normalisation; BN without running statistics has none).
        x: ``(N*K, C, H, W)`` support images; y: ``(N*K,)`` labels in ``0..N-1``.
        steps: inner steps (0 returns ``params`` unchanged).
        lr: inner learning rate ``alpha``.

    Returns:
        The adapted parameters ``phi``.
    """
    if getattr(model, "head", "linear") == "proto":
        params = prototype_head(model, params, buffers, x, y)
    for _ in range(steps):
        grads = loss_grad(model, params, buffers, x, y)
        params = {name: p - lr * grads[name] for name, p in params.items()}
    return params


def prototype_head(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
    """Set the linear head from class prototypes ``c_k`` (mean support feature of class ``k``):
    ``W_k = 2 c_k``, ``b_k = -||c_k||^2``, so that ``logits_k = -||f - c_k||^2 + ||f||^2`` - a
    nearest-prototype classifier (ProtoNets, Snell et al. 2017) that the inner steps then refine.
    """
    weight_name, bias_name = model.HEAD_WEIGHT, model.HEAD_BIAS
    n_classes = params[weight_name].shape[0]
    features = functional_call(model, (params, buffers), (x,), {"features_only": True})  # (N*K, D)
    one_hot = F.one_hot(y, n_classes).to(features.dtype)  # (N*K, N)
    prototypes = (one_hot.T @ features) / one_hot.sum(dim=0).clamp(min=1).unsqueeze(1)  # (N, D)
    return {**params, weight_name: 2 * prototypes, bias_name: -(prototypes**2).sum(dim=1)}


def accuracy(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of ``argmax(scores, -1) == y`` over the last dimension of ``y``."""
    return (scores.argmax(dim=-1) == y).float().mean(dim=-1)
