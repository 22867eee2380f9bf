"""Name -> constructor registry for the classifier backbones, plus the generator factory.

Configuration files name a backbone by string (``"conv4"``, ``"resnet12"``, ...); this module is the
single place where those strings are turned into modules, so the config validator and the rest of
the pipeline agree on the set of valid names (:data:`CLASSIFIER_ARCHS`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from free.models.conv4 import Conv4
from free.models.generator import Generator
from free.models.resnet import ResNet10, ResNet12, ResNet18

#: Classifier backbones. Every constructor takes
#: ``(in_channels, n_classes, image_size, width=64, track_running_stats=True)``.
MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "conv4": Conv4,
    "resnet10": ResNet10,
    "resnet12": ResNet12,
    "resnet18": ResNet18,
}

#: The valid classifier architecture names, in a stable order (imported by the config validator).
CLASSIFIER_ARCHS: tuple[str, ...] = tuple(MODEL_REGISTRY)


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a classifier backbone by name.

    Args:
        name: one of :data:`CLASSIFIER_ARCHS` (case-insensitive).
        **kwargs: constructor arguments: ``in_channels``, ``n_classes``, ``image_size`` and optionally
            ``width`` and ``track_running_stats``.

    Returns:
        The freshly initialised module.

    Raises:
        ValueError: if ``name`` is not a known architecture.
    """
    key = name.lower()
    if key not in MODEL_REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(CLASSIFIER_ARCHS)}")
    return MODEL_REGISTRY[key](**kwargs)


def build_generator(image_size: int, channels: int, latent_dim: int = 256) -> Generator:
    """Build the inversion :class:`~free.models.generator.Generator` (kept apart: it is not a classifier)."""
    return Generator(image_size=image_size, channels=channels, latent_dim=latent_dim)


def feature_dim(model: nn.Module) -> int:
    """Length of the feature vector returned by ``model.features(x)`` for any registered backbone."""
    dim = getattr(model, "feature_dim", None)
    if not isinstance(dim, int):
        raise TypeError(f"{type(model).__name__} does not expose an integer 'feature_dim'")
    return dim
