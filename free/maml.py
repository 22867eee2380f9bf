"""The MAML inner loop (Finn et al., ICML 2017) as pure functions over parameter dicts.

A model's state is split into ``params`` (adapted) and ``buffers`` (e.g. normalisation constants),
and the network is run with :func:`torch.func.functional_call`, so one initialisation can be
adapted to many tasks - in a Python loop, or under :func:`torch.func.vmap` over a batch of
episodes - without copying modules. Everything here is first-order: the outer update uses the
gradient at the adapted weights (FO-MAML) or the displacement ``theta - theta_adapted`` (Reptile),
so no graph is kept through the inner steps.

:func:`~torch.func.functional_call` swaps the given tensors into ``model`` for the duration of the
call, so one module object must not be run by two threads at once; the served model gives each
request its own weightless copy of the architecture (:mod:`free.serving`).
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
    model: nn.Module,
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    n_classes: int | None = None,
) -> Params:
    """``steps`` steps of gradient descent on the support set: ``phi <- phi - lr * grad L_S(phi)``,
    starting from the head :func:`head_for_classes` gives for an ``n_classes``-way task.

    Args:
        model: the architecture (its own weights are not used).
        params: the initialisation ``theta``.
        buffers: the model's buffers (normalisation; BN without running statistics has none).
        x: ``(N*K, C, H, W)`` support images; y: ``(N*K,)`` labels in ``0..N-1``.
        steps: inner steps (0 returns the starting parameters unchanged).
        lr: inner learning rate ``alpha``.
        n_classes: the way ``N`` of the task; default the width of the model's head.

    Returns:
        The adapted parameters ``phi``; the head has ``N`` rows.
    """
    params = head_for_classes(model, params, buffers, x, y, n_classes)
    for _ in range(steps):
        grads = loss_grad(model, params, buffers, x, y)
        params = {name: p - lr * grads[name] for name, p in params.items()}
    return params


def head_for_classes(
    model: nn.Module, params: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor, n_classes: int | None = None
) -> Params:
    """The parameters an ``N``-way adaptation starts from: the one place where the head is chosen,
    shared by meta-training, meta-testing (any ``evaluate.n_way``) and the served model (any request).

    * ``model.head == "proto"``: the head is always set from the support prototypes
      (:func:`prototype_head`, Proto-MAML), ``N`` rows.
    * linear head (plain MAML) and ``N`` equal to its width: ``params`` unchanged - the meta-learned
      head, exactly what meta-training optimised and meta-testing at the training way measures.
    * linear head and any other ``N``: plain MAML has no answer (its head is a fixed ``N_train x D``
      layer whose rows stand for no particular class), so the head is replaced by the
      prototype-initialised ``N``-way head. This departs from MAML on purpose: the meta-learned
      body is kept, and the prototypes give every one of the ``N`` classes a starting row that
      already classifies by nearest class mean, which the inner steps then refine.

    Args:
        model, params, buffers, x, y: as :func:`adapt`.
        n_classes: the way ``N``; default the width of the head in ``params``. A Python int, so
            that this works under :func:`torch.func.vmap` (labels are data there).

    Returns:
        ``params`` itself, or a new dict with the head ``(N, D)`` weight and ``(N,)`` bias replaced.
    """
    weight_name = getattr(model, "HEAD_WEIGHT", None)
    width = params[weight_name].shape[0] if weight_name in params else None
    n_classes = width if n_classes is None else n_classes
    if getattr(model, "head", "linear") == "proto" or (width is not None and n_classes != width):
        return prototype_head(model, params, buffers, x, y, n_classes)
    return params


def prototype_head(
    model: nn.Module, params: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor, n_classes: int | None = None
) -> Params:
    """Set the linear head from class prototypes ``c_k`` (mean support feature of class ``k``):
    ``W_k = 2 c_k``, ``b_k = -||c_k||^2``, so that ``logits_k = -||f - c_k||^2 + ||f||^2`` - a
    nearest-prototype classifier (ProtoNets, Snell et al. 2017) that the inner steps then refine.

    Args:
        model, params, buffers: the network (a :class:`~free.models.Classifier`) and its weights.
        x: ``(N*K, C, H, W)`` support images; y: ``(N*K,)`` labels in ``0..N-1``.
        n_classes: ``N``, the rows of the new head; default the width of the head in ``params``.

    Returns:
        ``params`` with ``HEAD_WEIGHT`` ``(N, D)`` and ``HEAD_BIAS`` ``(N,)`` replaced.
    """
    weight_name, bias_name = model.HEAD_WEIGHT, model.HEAD_BIAS
    if n_classes is None:
        n_classes = params[weight_name].shape[0]
    features = functional_call(model, (params, buffers), (x,), {"features_only": True})  # (N*K, D)
    one_hot = F.one_hot(y, n_classes).to(features.dtype)  # (N*K, N)
    prototypes = (one_hot.T @ features) / one_hot.sum(dim=0).clamp(min=1).unsqueeze(1)  # (N, D)
    return {**params, weight_name: 2 * prototypes, bias_name: -(prototypes**2).sum(dim=1)}


def accuracy(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of ``argmax(scores, -1) == y`` over the last dimension of ``y``."""
    return (scores.argmax(dim=-1) == y).float().mean(dim=-1)
