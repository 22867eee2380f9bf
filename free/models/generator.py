"""Image generator used for data-free model inversion.

The architecture is the one used by FREE (Wei et al., "FREE: Faster and Better Data-Free
Meta-Learning", CVPR 2024), itself the CMI generator (Fang et al., "Contrastive Model Inversion for
Data-Free Knowledge Distillation", IJCAI 2021): a linear projection of a Gaussian latent to a
``128 x S/4 x S/4`` map, two (upsample -> conv -> BN -> LeakyReLU) stages and a final conv with a
sigmoid, so images lie in ``[0, 1]``.
"""

from __future__ import annotations

import torch
from torch import nn

BASE_CHANNELS = 128
LEAKY_SLOPE = 0.2


class Generator(nn.Module):
    """Maps latents ``z ~ N(0, I)`` to images in ``[0, 1]``.

    Args:
        image_size: side length ``S`` of the generated square images; must be divisible by 4
            because the generator upsamples twice by 2.
        channels: number of image channels ``C``.
        latent_dim: dimension ``D`` of the latent vector.

    Raises:
        ValueError: if ``image_size`` is not a positive multiple of 4.
    """

    def __init__(self, image_size: int, channels: int, latent_dim: int = 256) -> None:
        super().__init__()
        if image_size <= 0 or image_size % 4 != 0:
            raise ValueError(f"Generator needs image_size divisible by 4, got image_size={image_size}")
        self.image_size = image_size
        self.channels = channels
        self.latent_dim = latent_dim
        self.init_size = image_size // 4
        self.fc = nn.Linear(latent_dim, BASE_CHANNELS * self.init_size**2)
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(BASE_CHANNELS),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(BASE_CHANNELS, BASE_CHANNELS, 3, padding=1),
            nn.BatchNorm2d(BASE_CHANNELS),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(BASE_CHANNELS, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(64, channels, 3, padding=1),
            nn.Sigmoid(),
        )

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` latents from ``N(0, I)``, returned on this module's device.

        Args:
            n: number of latents.
            generator: optional RNG for reproducible draws; sampling happens on its device and the
                result is moved to the model's device, so a CPU RNG also works for a GPU model.

        Returns:
            ``(n, latent_dim)`` float tensor.
        """
        device = self.fc.weight.device
        rng_device = generator.device if generator is not None else device
        z = torch.randn(n, self.latent_dim, generator=generator, device=rng_device)
        return z.to(device=device, dtype=self.fc.weight.dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generate images, ``(B, latent_dim) -> (B, C, S, S)`` with values in ``[0, 1]``."""
        out = self.fc(z)  # (B, 128 * (S/4)^2)
        out = out.view(z.shape[0], BASE_CHANNELS, self.init_size, self.init_size)  # (B, 128, S/4, S/4)
        return self.conv_blocks(out)  # (B, C, S, S)
