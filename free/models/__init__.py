"""Neural networks of FREE: few-shot classifier backbones and the inversion generator."""

from __future__ import annotations

from free.models.classifier import Classifier, Normalize, build_classifier
from free.models.conv4 import Conv4
from free.models.generator import Generator
from free.models.registry import (
    CLASSIFIER_ARCHS,
    MODEL_REGISTRY,
    build_generator,
    build_model,
    feature_dim,
)
from free.models.resnet import ResNet, ResNet10, ResNet12, ResNet18

__all__ = [
    "CLASSIFIER_ARCHS",
    "Classifier",
    "Normalize",
    "build_classifier",
    "MODEL_REGISTRY",
    "Conv4",
    "Generator",
    "ResNet",
    "ResNet10",
    "ResNet12",
    "ResNet18",
    "build_generator",
    "build_model",
    "feature_dim",
]
