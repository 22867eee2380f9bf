"""Conv4: the standard four-block convolutional backbone of few-shot learning.

Design from Vinyals et al., "Matching Networks for One Shot Learning" (NeurIPS 2016), as used by
Finn et al., "Model-Agnostic Meta-Learning" (ICML 2017): four blocks of
``conv3x3 -> BatchNorm -> ReLU -> MaxPool(2)``, then a linear classifier on the flattened features.
"""

from __future__ import annotations

import torch
from torch import nn

N_BLOCKS = 4


def conv4_spatial_size(image_size: int) -> int:
    """Spatial side length after the four ``MaxPool2d(2)`` layers (each floors odd sizes).

    Examples: 28 -> 1, 32 -> 2, 84 -> 5.
    """
    size = image_size
    for _ in range(N_BLOCKS):
        size //= 2
    return size


def conv_block(in_channels: int, out_channels: int, track_running_stats: bool = True) -> nn.Sequential:
    """One Conv4 block: ``conv3x3 (pad 1) -> BN -> ReLU -> MaxPool2d(2)``; halves H and W (floor)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        nn.ReLU(inplace=False),  # not in place: functional_call / torch.func must not see mutations
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """Four conv blocks followed by a linear classifier.

    Args:
        in_channels: number of image channels ``C`` (1 for Omniglot, 3 for RGB data sets).
        n_classes: number of output logits (the way ``N`` of an N-way task).
        image_size: side length ``S`` of the square input images.
        width: number of channels of every conv block.
        track_running_stats: passed to every ``BatchNorm2d``; ``False`` makes BN always use batch
            statistics (the usual transductive MAML setting).

    Attributes:
        feature_dim: length of the flattened feature vector fed to the classifier.

    Raises:
        ValueError: if ``image_size`` is too small to survive four 2x poolings (``S < 16``).
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        image_size: int,
        width: int = 64,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        spatial = conv4_spatial_size(image_size)
        if spatial < 1:
            raise ValueError(
                f"Conv4 needs image_size >= {2**N_BLOCKS} (four 2x max-pools), got image_size={image_size}"
            )
        self.encoder = nn.Sequential(
            conv_block(in_channels, width, track_running_stats),
            *(conv_block(width, width, track_running_stats) for _ in range(N_BLOCKS - 1)),
        )
        self.feature_dim = width * spatial * spatial
        self.classifier = nn.Linear(self.feature_dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the classifier.

        Args:
            x: images, ``(B, C, S, S)``.

        Returns:
            ``(B, feature_dim)``.
        """
        return self.encoder(x).flatten(start_dim=1)  # (B, width * s * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, ``(B, C, S, S) -> (B, n_classes)``."""
        return self.classifier(self.features(x))
