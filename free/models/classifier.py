"""A backbone with its input normalisation built in, so that every caller feeds images in [0, 1].

Real images, generator outputs and pixel-optimised images all live in [0, 1]; teachers and the
meta-learner were trained (or meta-trained) on normalised inputs. Keeping the normalisation inside
the module (as buffers) means a checkpoint carries it, and nobody can forget it at one call site.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from free.models.registry import build_model


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``mean`` and ``std`` are (non-trainable) buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0, 1]
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``Normalize`` then a registered backbone; parameters are named ``net.*``.

    ``head`` is ``"linear"`` (MAML: the linear layer ``net.classifier`` is meta-learned like every
    other weight) or ``"proto"`` (Proto-MAML, Triantafillou et al. 2020: at the start of each
    adaptation the linear layer is set from the support prototypes; see :func:`free.maml.adapt`).
    """

    HEAD_WEIGHT, HEAD_BIAS = "net.classifier.weight", "net.classifier.bias"

    def __init__(self, norm: Normalize, net: nn.Module, head: str = "linear") -> None:
        super().__init__()
        if head not in ("linear", "proto"):
            raise ValueError(f"head must be linear or proto, got {head!r}")
        self.norm, self.net, self.head = norm, net, head

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        """``(B, C, H, W)`` in [0, 1] -> logits ``(B, n_classes)``, or features ``(B, D)``."""
        z = self.norm(x)
        return self.net.features(z) if features_only else self.net(z)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x, features_only=True)


def build_classifier(
    arch: str,
    channels: int,
    n_classes: int,
    image_size: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
    track_running_stats: bool = True,
    head: str = "linear",
) -> Classifier:
    """A normalising classifier: teachers use running BN statistics (``track_running_stats=True``);
    the meta-learner uses batch statistics (``False``), as MAML does, which also keeps it free of
    buffer mutation under ``torch.func`` transforms."""
    net = build_model(
        arch,
        in_channels=channels,
        n_classes=n_classes,
        image_size=image_size,
        width=width,
        track_running_stats=track_running_stats,
    )
    return Classifier(Normalize(mean, std), net, head)
