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


class Classifier(nn.Sequential):
    """``Normalize`` then a registered backbone; parameters are named ``net.*``."""

    def __init__(self, norm: Normalize, net: nn.Module) -> None:
        super().__init__()
        self.add_module("norm", norm)
        self.add_module("net", net)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.norm(x))


def build_classifier(
    arch: str,
    channels: int,
    n_classes: int,
    image_size: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
    track_running_stats: bool = True,
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
    return Classifier(Normalize(mean, std), net)
