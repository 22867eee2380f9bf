"""The meta-learner as an MLflow pyfunc model: give it a labelled support set and query images, it
adapts (the same inner loop as meta-testing) and returns one predicted label per query image.

Request (``mlflow models serve`` → ``POST /invocations``)::

    {"inputs": {"support_images": [[[[...]]]],   # (S, C, H, W) float32 in [0, 1]
                "support_labels": [3, 3, 7, ...],  # (S,) int64, any label values (N distinct)
                "query_images":   [[[[...]]]]}}    # (Q, C, H, W) float32 in [0, 1]

Response: ``{"predictions": [7, 3, ...]}``, labels from ``support_labels``. Normalisation is inside
the network, so images are raw intensities. MLflow is imported here only: the core does not need it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from free.checkpoints import load_classifier
from free.maml import adapt, logits, split_state

WEIGHTS, CARD = "metalearner", "card"


class FewShotRequestError(ValueError):
    """The request does not fit the model (shapes, number of classes); the message says what."""


def predict_episode(
    model: torch.nn.Module,
    meta: dict[str, Any],
    support_images: np.ndarray,
    support_labels: np.ndarray,
    query_images: np.ndarray,
    steps: int,
    lr: float,
) -> np.ndarray:
    """Adapt ``model`` on the support set, return the predicted label of each query image."""
    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    for name, images in (("support_images", support_images), ("query_images", query_images)):
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise FewShotRequestError(f"{name} must have shape (n, {', '.join(map(str, shape))}), got {images.shape}")
    labels = np.asarray(support_labels).reshape(-1)
    if len(labels) != len(support_images):
        raise FewShotRequestError(f"{len(labels)} support_labels for {len(support_images)} support_images")
    classes, y = np.unique(labels, return_inverse=True)  # any label values -> 0..N-1
    if meta.get("head", "linear") != "proto" and len(classes) > meta["n_classes"]:
        raise FewShotRequestError(f"{len(classes)} classes in the support set; this model handles {meta['n_classes']}")
    x_support = torch.as_tensor(np.asarray(support_images, dtype=np.float32))
    x_query = torch.as_tensor(np.asarray(query_images, dtype=np.float32))
    params, buffers = split_state(model)
    with torch.enable_grad():
        adapted = adapt(model, params, buffers, x_support, torch.as_tensor(y, dtype=torch.long), steps, lr)
    with torch.no_grad():
        scores = logits(model, adapted, buffers, x_query)[:, : len(classes)]
    return classes[scores.argmax(dim=1).numpy()]


class FewShotMetaLearner(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a meta-learner checkpoint (safetensors) and its card (JSON)."""

    def load_context(self, context: Any) -> None:
        self.model, self.meta = load_classifier(Path(context.artifacts[WEIGHTS]))
        card = json.loads(Path(context.artifacts[CARD]).read_text())
        self.steps, self.lr = int(card["test_inner_steps"]), float(card["inner_lr"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (MLflow reads type hints as a schema)
        """``model_input``: dict of arrays ``support_images``, ``support_labels``, ``query_images``."""
        missing = {"support_images", "support_labels", "query_images"} - set(model_input)
        if missing:
            raise FewShotRequestError(f"request lacks {sorted(missing)}")
        return predict_episode(
            self.model,
            self.meta,
            model_input["support_images"],
            model_input["support_labels"],
            model_input["query_images"],
            self.steps,
            self.lr,
        )


def signature(meta: dict[str, Any]) -> ModelSignature:
    """Tensor signature: a support set with labels and query images in; a label per query out."""
    image = (-1, meta["channels"], meta["image_size"], meta["image_size"])
    inputs = Schema(
        [
            TensorSpec(np.dtype(np.float32), image, "support_images"),
            TensorSpec(np.dtype(np.int64), (-1,), "support_labels"),
            TensorSpec(np.dtype(np.float32), image, "query_images"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]))


def input_example(meta: dict[str, Any], n_way: int, shots: int = 1, queries: int = 2) -> dict[str, np.ndarray]:
    """A small valid request (random images), stored with the model as its input example."""
    rng = np.random.default_rng(0)
    image = (meta["channels"], meta["image_size"], meta["image_size"])
    return {
        "support_images": rng.random((n_way * shots, *image), dtype=np.float32),
        "support_labels": np.repeat(np.arange(n_way, dtype=np.int64), shots),
        "query_images": rng.random((queries, *image), dtype=np.float32),
    }
