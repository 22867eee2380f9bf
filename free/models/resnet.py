"""Few-shot ResNet backbones: ResNet-12, ResNet-10 and ResNet-18.

* ResNet-12 follows Lee et al., "Meta-Learning with Differentiable Convex Optimization" (MetaOptNet,
  CVPR 2019) and Oreshkin et al. (TADAM, NeurIPS 2018): four residual blocks of three
  ``conv3x3 -> BN -> LeakyReLU(0.1)`` layers with a ``conv1x1 -> BN`` shortcut, each followed by a
  2x max-pool; channels ``(64, 160, 320, 640)``. DropBlock is left out.
* ResNet-10 / ResNet-18 are He et al. (CVPR 2016) BasicBlock ResNets with ``[1, 1, 1, 1]`` and
  ``[2, 2, 2, 2]`` blocks and a small-image stem (``conv3x3`` stride 1, no max-pool), as commonly
  used for 32x32 / 84x84 few-shot images.

All convolutions use ``bias=False`` because every one of them is followed by BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

LEAKY_SLOPE = 0.1


def _bn(channels: int, track_running_stats: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=track_running_stats)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _init_weights(module: nn.Module) -> None:
    """He (fan-out) init for convolutions, as in torchvision's ResNets; BN keeps weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


# --------------------------------------------------------------------------------------------------
# ResNet-12
# --------------------------------------------------------------------------------------------------


class ResNet12Block(nn.Module):
    """``3 x (conv3x3 -> BN -> LeakyReLU)`` + ``conv1x1 -> BN`` shortcut, then ``MaxPool2d(2)``.

    The last LeakyReLU is applied after adding the shortcut. Halves H and W (floor).
    """

    def __init__(self, in_channels: int, out_channels: int, track_running_stats: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.bn1 = _bn(out_channels, track_running_stats)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = _bn(out_channels, track_running_stats)
        self.conv3 = _conv3x3(out_channels, out_channels)
        self.bn3 = _bn(out_channels, track_running_stats)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            _bn(out_channels, track_running_stats),
        )
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, C_out, H // 2, W // 2)``."""
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.act(out + self.shortcut(x))  # (B, C_out, H, W)
        return self.pool(out)


class ResNet12(nn.Module):
    """ResNet-12 (MetaOptNet / TADAM style) with global average pooling and a linear classifier.

    Args:
        in_channels: number of image channels ``C``.
        n_classes: number of output logits.
        image_size: side length ``S`` of the square input images (must be >= 16: four 2x pools).
        width: base width ``w``; stage widths are ``(w, 2.5w, 5w, 10w)`` rounded, i.e. the standard
            ``(64, 160, 320, 640)`` for ``w = 64``.
        track_running_stats: passed to every ``BatchNorm2d``.

    Attributes:
        feature_dim: length of the pooled feature vector (``10w``).

    Raises:
        ValueError: if ``image_size`` is smaller than 16.
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
        if image_size < 16:
            raise ValueError(f"ResNet12 needs image_size >= 16 (four 2x max-pools), got image_size={image_size}")
        widths = tuple(round(width * m) for m in (1.0, 2.5, 5.0, 10.0))
        blocks = []
        prev = in_channels
        for w in widths:
            blocks.append(ResNet12Block(prev, w, track_running_stats))
            prev = w
        self.encoder = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[-1]
        self.classifier = nn.Linear(self.feature_dim, n_classes)
        _init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features, ``(B, C, S, S) -> (B, feature_dim)``."""
        return self.pool(self.encoder(x)).flatten(start_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, ``(B, C, S, S) -> (B, n_classes)``."""
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------------------------------
# ResNet-10 / ResNet-18
# --------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """He et al. BasicBlock: ``conv3x3 -> BN -> ReLU -> conv3x3 -> BN`` + shortcut, then ReLU.

    The shortcut is the identity unless the stride or the channel count changes, in which case it is
    ``conv1x1 (stride) -> BN``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, track_running_stats: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = _bn(out_channels, track_running_stats)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = _bn(out_channels, track_running_stats)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                _bn(out_channels, track_running_stats),
            )
        self.act = nn.ReLU(inplace=False)  # not in place: keeps functional_call / torch.func safe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))``."""
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    """BasicBlock ResNet with a small-image stem, for few-shot classification.

    Args:
        in_channels: number of image channels ``C``.
        n_classes: number of output logits.
        image_size: side length ``S`` of the square input images (any ``S >= 1`` works thanks to
            the global average pool; kept for a uniform constructor signature).
        blocks_per_stage: number of BasicBlocks in each of the four stages.
        width: base width ``w``; stage widths are ``(w, 2w, 4w, 8w)``.
        track_running_stats: passed to every ``BatchNorm2d``.

    Attributes:
        feature_dim: length of the pooled feature vector (``8w``).
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        image_size: int,
        blocks_per_stage: tuple[int, int, int, int],
        width: int = 64,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got image_size={image_size}")
        widths = (width, 2 * width, 4 * width, 8 * width)
        strides = (1, 2, 2, 2)
        # Small-image stem: no 7x7 stride-2 conv and no max-pool, which would destroy 28-84 px inputs.
        self.stem = nn.Sequential(
            _conv3x3(in_channels, widths[0]),
            _bn(widths[0], track_running_stats),
            nn.ReLU(inplace=False),
        )
        stages = []
        prev = widths[0]
        for w, stride, n_blocks in zip(widths, strides, blocks_per_stage, strict=True):
            layers = []
            for i in range(n_blocks):
                layers.append(BasicBlock(prev, w, stride if i == 0 else 1, track_running_stats))
                prev = w
            stages.append(nn.Sequential(*layers))
        self.encoder = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[-1]
        self.classifier = nn.Linear(self.feature_dim, n_classes)
        _init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features, ``(B, C, S, S) -> (B, feature_dim)``."""
        out = self.encoder(self.stem(x))  # (B, 8w, ceil(S / 8), ceil(S / 8))
        return self.pool(out).flatten(start_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, ``(B, C, S, S) -> (B, n_classes)``."""
        return self.classifier(self.features(x))


class ResNet10(ResNet):
    """ResNet-10: BasicBlock ResNet with ``[1, 1, 1, 1]`` blocks. See :class:`ResNet` for arguments."""

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        image_size: int,
        width: int = 64,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(in_channels, n_classes, image_size, (1, 1, 1, 1), width, track_running_stats)


class ResNet18(ResNet):
    """ResNet-18: BasicBlock ResNet with ``[2, 2, 2, 2]`` blocks. See :class:`ResNet` for arguments."""

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        image_size: int,
        width: int = 64,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(in_channels, n_classes, image_size, (2, 2, 2, 2), width, track_running_stats)
