"""The teacher zoo: N-way classifiers trained on random subsets of the meta-train classes.

FREE (Wei et al., CVPR 2024) starts from a zoo of pre-trained models whose training data is gone;
to build one reproducibly we train it ourselves. Each teacher knows ``n_way`` meta-train classes
(subsets of different teachers may overlap) and never sees a meta-val or meta-test image.

Teachers keep running BatchNorm statistics: the inversion later runs them in eval mode, and its
feature-statistics loss (DeepInversion) matches generated batches against ``running_mean`` and
``running_var``.

Pure core: torch only, no file I/O; the stage :mod:`free.stages.teachers` writes the artifacts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Progress = Callable[[Iterable, str, int], Iterable]

#: A new lowest val loss resets early stopping's patience only if it is lower by this much (nats), so
#: that a solved task (accuracy saturated, loss creeping towards 0) still stops.
LOSS_MIN_DELTA = 1e-3

#: Images per forward pass when evaluating (bounded memory, same result as one big batch in eval mode).
EVAL_CHUNK = 512


@dataclass
class TeacherResult:
    """The outcome of training one teacher.

    Attributes:
        state: the best epoch's ``state_dict`` (parameters and BN buffers), detached CPU copies.
        val_acc: held-out accuracy of ``state``.
        val_loss: held-out cross-entropy of ``state``.
        best_epoch: the epoch (1-based) ``state`` comes from.
        epochs_run: epochs actually trained (``< max_epochs`` when stopped early).
        history: one ``{"epoch", "train_loss", "val_loss", "val_acc"}`` per epoch.
    """

    state: dict[str, torch.Tensor]
    val_acc: float
    val_loss: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)


def sample_class_subsets(n_classes: int, n_teachers: int, n_way: int, seed: int) -> list[list[int]]:
    """Draw each teacher's classes: ``n_way`` distinct meta-train classes per teacher.

    Subsets are drawn one after another from one seeded generator, so teacher ``i``'s subset does
    not depend on how many teachers follow it (growing the zoo keeps the existing teachers' classes).

    Args:
        n_classes: number of meta-train classes (split-local indices ``0 .. n_classes-1``).
        n_teachers: number of teachers.
        n_way: classes per teacher.
        seed: seed of the draw.

    Returns:
        ``n_teachers`` sorted lists of ``n_way`` distinct class indices; label ``j`` of teacher ``i``
        is class ``subsets[i][j]``.

    Raises:
        ValueError: ``n_way`` larger than ``n_classes`` (names ``teachers.n_way``).
    """
    if n_way > n_classes:
        raise ValueError(
            f"teachers.n_way={n_way} is more than the {n_classes} meta-train classes of the data set; "
            "lower teachers.n_way or give the meta-train split more classes (dataset.split.train)"
        )
    if n_way < 1 or n_teachers < 0:
        raise ValueError(f"teachers.n_way must be >= 1 and teachers.n_teachers >= 0, got {n_way}, {n_teachers}")
    gen = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(n_classes, generator=gen)[:n_way].tolist()) for _ in range(n_teachers)]


def select_classes(
    images: torch.Tensor, labels: torch.Tensor, class_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of ``class_ids``, relabelled ``0 .. len(class_ids)-1`` in that order.

    Args:
        images: ``(N, C, H, W)`` any dtype.
        labels: ``(N,)`` int64 split-local class indices.
        class_ids: the classes to keep.

    Returns:
        ``(images_subset (M, C, H, W), labels_subset (M,))``.
    """
    remap = torch.full((int(labels.max()) + 1,), -1, dtype=torch.int64)
    remap[torch.tensor(class_ids, dtype=torch.int64)] = torch.arange(len(class_ids))
    new_labels = remap[labels]
    keep = new_labels >= 0
    return images[keep], new_labels[keep]


def holdout_split(
    labels: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out images of every class for validation and early stopping.

    Per class with ``n`` images, ``ceil(fraction * n)`` images (at least 1, and leaving at least 1
    for training) are drawn at random for validation.

    Args:
        labels: ``(N,)`` int64 class labels.
        fraction: share of each class held out, in (0, 1).
        generator: CPU generator for the draw.

    Returns:
        ``(train_index (N - V,), val_index (V,))`` int64 indices into ``labels``, each sorted.

    Raises:
        ValueError: a class with fewer than 2 images (nothing to hold out), or ``fraction`` not in (0, 1).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"teachers.holdout_fraction must be in (0, 1), got {fraction}")
    train, val = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        n = len(members)
        if n < 2:
            raise ValueError(f"class {c} has {n} image(s); a teacher needs at least 2 per class (train + held out)")
        n_val = min(max(1, math.ceil(fraction * n)), n - 1)
        shuffled = members[torch.randperm(n, generator=generator)]
        val.append(shuffled[:n_val])
        train.append(shuffled[n_val:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(val)).values


def random_shift(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels (zero padding, then a random crop of the original size).

    Args:
        x: ``(B, C, H, W)`` float images.
        pad: maximum shift in pixels.
        generator: CPU generator for the offsets.

    Returns:
        ``(B, C, H, W)``.
    """
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (running BN statistics).

    Args:
        model: a classifier taking ``(B, C, H, W)`` images in [0, 1].
        x: ``(N, C, H, W)`` float images.
        y: ``(N,)`` int64 labels.

    Returns:
        ``(loss, accuracy)``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), EVAL_CHUNK):
        xb, yb = x[start : start + EVAL_CHUNK].to(device), y[start : start + EVAL_CHUNK].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
    model.train(was_training)
    return loss_sum / len(x), correct / len(x)


def train_teacher(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    *,
    max_epochs: int,
    patience: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    shift: int = 0,
    progress: Progress | None = None,
) -> TeacherResult:
    """Train one teacher with Adam and early stopping on its held-out images.

    After each epoch the model is evaluated on ``(x_val, y_val)``; the best epoch (highest val
    accuracy, ties broken by lower val loss) is kept. Training stops when for ``patience`` epochs
    neither the val accuracy has improved nor the val loss dropped by more than
    :data:`LOSS_MIN_DELTA` (``patience=0``: never early). On return the model holds the best state,
    in eval mode.

    Args:
        model: the classifier (on its device); trained in place.
        x_train: ``(N, C, H, W)`` float images in [0, 1].
        y_train: ``(N,)`` int64 labels in ``0 .. n_way-1``.
        x_val: ``(V, C, H, W)`` float images in [0, 1].
        y_val: ``(V,)`` int64 labels.
        max_epochs: upper bound on epochs.
        patience: epochs without improvement before stopping; 0 disables early stopping.
        lr: Adam learning rate.
        batch_size: images per step.
        generator: CPU generator for the batch order (and shifts): same generator state, same result.
        shift: random-shift augmentation of up to ``shift`` pixels (0 = none).
        progress: optional ``progress(iterable, description, total)`` wrapper over the epochs.

    Returns:
        The :class:`TeacherResult`.
    """
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError("a teacher needs training and held-out images")
    device = next(model.parameters()).device
    x_train, y_train = x_train.to(device), y_train.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    history: list[dict[str, float]] = []
    best: dict[str, Any] | None = None
    since_improved, lowest_loss = 0, math.inf
    epochs: Iterable[int] = range(1, max_epochs + 1)
    if progress is not None:
        epochs = progress(epochs, "training teacher", max_epochs)
    for epoch in epochs:
        train_loss = _train_epoch(model, optimiser, x_train, y_train, batch_size, generator, shift)
        val_loss, val_acc = evaluate(model, x_val, y_val)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc})
        improved = best is None or val_acc > best["val_acc"]
        if improved or (val_acc == best["val_acc"] and val_loss < best["val_loss"]):
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best = {"state": state, "val_acc": val_acc, "val_loss": val_loss, "epoch": epoch}
        # Patience also resets on a new lowest val loss: in the first epochs the BN running statistics
        # lag behind the weights (few steps per epoch on small tasks), so eval-mode accuracy can sit at
        # chance for several epochs while the model is clearly learning.
        if improved or val_loss < lowest_loss - LOSS_MIN_DELTA:
            since_improved = 0
        else:
            since_improved += 1
        lowest_loss = min(lowest_loss, val_loss)
        if patience > 0 and since_improved >= patience:
            break
    assert best is not None  # max_epochs >= 1
    model.load_state_dict(best["state"])
    model.eval()
    return TeacherResult(
        state=best["state"],
        val_acc=best["val_acc"],
        val_loss=best["val_loss"],
        best_epoch=best["epoch"],
        epochs_run=len(history),
        history=history,
    )


def _train_epoch(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    shift: int,
) -> float:
    """One shuffled pass over ``(x (N, C, H, W), y (N,))``; returns the mean training loss."""
    model.train()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    loss_sum, seen = 0.0, 0
    for start in range(0, len(x), batch_size):
        index = order[start : start + batch_size]
        if len(index) < 2 and seen > 0:
            # BatchNorm cannot train on one image (1x1 feature maps at the end of Conv4 on 28x28);
            # the image is in another batch next epoch, as the order is reshuffled.
            continue
        xb = random_shift(x[index], shift, generator) if shift else x[index]
        loss = F.cross_entropy(model(xb), y[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        loss_sum += float(loss.detach()) * len(index)
        seen += len(index)
    return loss_sum / max(seen, 1)
