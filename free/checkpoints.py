"""Self-describing classifier checkpoints (teachers and the meta-learner), validated on load.

A checkpoint is one safetensors file: the weights (parameters and buffers by name) plus, in the
header, the JSON description needed to rebuild the network (``arch``, ``channels``, ``n_classes``,
``image_size``, ``width``, ``mean``, ``std``, ``track_running_stats``) and whatever else the stage
records (class names, accuracy, step, config). Loading never unpickles anything, rebuilds the
architecture, and rejects - naming the file - a description that is incomplete, weights whose names
or shapes do not fit the architecture, non-finite weights, and BatchNorm running variances that are
not positive (a negative one makes every forward pass NaN: ``(x - mean) / sqrt(var + eps)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from free.artifacts import load_tensors, save_tensors
from free.models import CLASSIFIER_ARCHS, build_classifier

#: Largest safetensors header (JSON: tensor offsets + our description) a checkpoint from outside may
#: have. Ours are a few kB; safetensors' own limit is 100 MB, which it parses into memory before we
#: see anything.
MAX_HEADER_BYTES = 1 << 20

ARCH_KEYS = ("arch", "channels", "n_classes", "image_size", "width", "mean", "std", "track_running_stats")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and what is wrong."""


def classifier_meta(
    arch: str,
    channels: int,
    n_classes: int,
    image_size: int,
    width: int,
    mean: list[float],
    std: list[float],
    track_running_stats: bool,
) -> dict[str, Any]:
    """The part of a checkpoint's description that rebuilds the network."""
    return {
        "arch": arch,
        "channels": channels,
        "n_classes": n_classes,
        "image_size": image_size,
        "width": width,
        "mean": list(mean),
        "std": list(std),
        "track_running_stats": track_running_stats,
    }


def build_from_meta(meta: dict[str, Any]) -> nn.Module:
    return build_classifier(
        meta["arch"],
        meta["channels"],
        meta["n_classes"],
        meta["image_size"],
        meta["width"],
        meta["mean"],
        meta["std"],
        track_running_stats=meta["track_running_stats"],
        head=meta.get("head", "linear"),
    )


def save_classifier(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Write weights ``state`` (parameters and buffers by name) and ``meta``; return the sha256."""
    missing = [k for k in ARCH_KEYS if k not in meta]
    if missing:
        raise ValueError(f"checkpoint description lacks {missing}")
    return save_tensors(path, state, meta)


def header_bytes(path: Path) -> int:
    """Length of a safetensors file's JSON header: its first 8 bytes, little-endian (the format's spec)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    return int.from_bytes(head, "little")


def check_header(path: Path, limit: int = MAX_HEADER_BYTES) -> None:
    """Refuse a safetensors file whose header is over ``limit`` bytes, before anything parses it."""
    size = header_bytes(path)
    if size > limit:
        raise CheckpointError(f"{path}: safetensors header of {size} bytes is over the limit of {limit} bytes")


def load_classifier(path: Path, meta_override: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network of a checkpoint and load its weights, checking everything on the way.

    Args:
        path: the ``.safetensors`` file.
        meta_override: description to use instead of (or to complete) the file's own, e.g. from a
            JSON card next to an imported checkpoint.

    Returns:
        ``(model, meta)`` with the model in eval mode.

    Raises:
        CheckpointError: unreadable file, incomplete description, unknown architecture, missing or
            unexpected weight names, wrong shapes, or non-finite values.
    """
    path = Path(path)
    try:
        tensors, meta = load_tensors(path)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    meta = {**meta, **(meta_override or {})}
    return model_from_state(path, tensors, meta), meta


def model_from_state(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> nn.Module:
    """Build the architecture ``meta`` describes and load ``state`` into it, validating both."""
    missing = [k for k in ARCH_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: description lacks {', '.join(missing)}")
    if meta["arch"] not in CLASSIFIER_ARCHS:
        raise CheckpointError(f"{path}: unknown arch {meta['arch']!r}; known: {', '.join(CLASSIFIER_ARCHS)}")
    try:
        model = build_from_meta(meta)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: description does not build a network ({err})") from err
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    absent = sorted(set(expected) - set(state))
    if unexpected or absent:
        raise CheckpointError(
            f"{path}: weights do not fit a {meta['arch']} (missing {absent[:3]}{'...' if len(absent) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, a {meta['arch']} with "
                f"n_classes={meta['n_classes']} width={meta['width']} needs {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: {name} has non-finite values")
        if name.endswith("running_var") and not (tensor > 0).all():
            raise CheckpointError(
                f"{path}: {name} has {int((tensor <= 0).sum())} non-positive BatchNorm variances "
                f"(min {tensor.min().item():g}); a variance must be > 0"
            )
    model.load_state_dict(state)
    return model.eval()
