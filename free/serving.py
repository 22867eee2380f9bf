"""The meta-learner as an MLflow pyfunc model: give it a labelled support set and query images, it
adapts (the same inner loop as meta-testing) and returns one predicted label per query image.

Request (``mlflow models serve`` → ``POST /invocations``), any ``N >= 2``, ``K >= 1`` per class (not
necessarily the same for every class) and ``Q >= 1``::

    {"inputs": {"support_images": [[[[...]]]],         # (S, C, H, W) numbers in [0, 1]
                "support_labels": ["cat", "dog", ...],  # (S,) N distinct labels: all strings, or all
                                                        #   ints (or floats, or booleans), never mixed
                "query_images":   [[[[...]]]]}}         # (Q, C, H, W) numbers in [0, 1]

Response: ``{"predictions": ["dog", "cat", ...]}``, one label per query image, each exactly one of
the given labels (same JSON type). Normalisation is inside the network, so images are raw
intensities. From Python, ``mlflow.pyfunc.load_model(uri).predict({...})`` takes the same keys with
numpy arrays as values (labels: any 1-D array, e.g. ``np.array(["a", "b"])``).

The head for the request's ``N`` classes comes from :func:`free.maml.head_for_classes` (as in
meta-testing): a Proto-MAML checkpoint always starts from the support prototypes; a linear-head
(MAML) checkpoint uses its meta-learned head when ``N`` equals the way it was trained for, and the
prototype-initialised ``N``-way head otherwise. Labels are mapped to head rows in sorted order, so the
answer does not depend on the order of the support images.

Requests are independent: the loaded weights are only read, and every request runs the network on
its own weightless copy of the module tree (see :func:`private_architecture`), so MLflow's scoring
server may answer many at once on its threads. A request the model cannot answer raises
:class:`FewShotRequestError`, which the scoring server returns as HTTP 400 whose message starts
with the reason, without a stack trace.

MLflow is imported here only: the core does not need it.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types.schema import Schema, TensorSpec
from torch import nn

from free.checkpoints import load_classifier
from free.maml import adapt, logits, split_state

WEIGHTS, CARD = "metalearner", "card"
INPUTS = ("support_images", "support_labels", "query_images")
LABEL_TYPES = (str, int, float, bool)  # the JSON scalars a label may be (null is not a label)

_log = logging.getLogger(__name__)


class _ReasonFirst(MlflowException):
    """An MlflowException whose message stays the reason it was raised with.

    MLflow's scoring server (``mlflow/pyfunc/scoring_server/__init__.py``, ``invocations``) rewrites
    the message of any MlflowException that ``predict`` raises to ``"Failed to predict data
    '<the whole parsed input>'. \\nError: <message>"``: the reason would come after a dump of the
    images the client just sent. Keeping the reason as the message puts it on the first line of
    the response. (No ``stack_trace`` is passed, so none is serialised into the body.)
    """

    def __init__(self, reason: str, error_code: int) -> None:
        self.reason = reason
        super().__init__(reason, error_code=error_code)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        reason = getattr(self, "reason", None)
        self._message = reason if reason is not None and value.endswith(reason) else value


class FewShotRequestError(_ReasonFirst, ValueError):
    """The request does not fit the model (keys, shapes, values, labels); the message says what.

    An ``MlflowException`` with ``INVALID_PARAMETER_VALUE``: HTTP 400 from the scoring server.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason, INVALID_PARAMETER_VALUE)


class FewShotInternalError(_ReasonFirst):
    """A failure that is not the request's fault: HTTP 500, details in the server's log only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, INTERNAL_ERROR)


def private_architecture(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are empty ``meta`` tensors.

    :func:`torch.func.functional_call` runs a network by swapping the given tensors into the
    module's attributes and back, which is not thread-safe on a shared module (concurrent requests
    gave wrong answers and ``RuntimeError: bad optional access``). Running each request on its own
    copy makes requests independent without a lock; since the copy holds no weights (``meta``
    tensors take no memory) it costs microseconds, and the real weights are only ever read.
    """
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def predict_episode(
    model: nn.Module,
    meta: dict[str, Any],
    support_images: Any,
    support_labels: Any,
    query_images: Any,
    steps: int,
    lr: float,
) -> np.ndarray:
    """Adapt ``model`` on the support set, return the predicted label of each query image.

    Args:
        model: the meta-learner; only read (safe to share between threads).
        meta: its checkpoint description (``channels``, ``image_size``).
        support_images: ``(S, C, H, W)`` numbers in [0, 1].
        support_labels: ``(S,)`` labels, one JSON scalar type, ``N >= 2`` distinct values.
        query_images: ``(Q, C, H, W)`` numbers in [0, 1], ``Q >= 1``.
        steps, lr: the inner loop (``test_inner_steps``, ``inner_lr`` of the model card).

    Returns:
        ``(Q,)`` labels taken from ``support_labels``: the same dtype when that was a non-object
        numpy array, else an object array of the given Python values.

    Raises:
        FewShotRequestError: the request does not fit; the message names the field and the problem.
    """
    shape = (int(meta["channels"]), int(meta["image_size"]), int(meta["image_size"]))
    x_support = _images("support_images", support_images, shape)  # (S, C, H, W)
    x_query = _images("query_images", query_images, shape)  # (Q, C, H, W)
    labels = _label_values(support_labels)
    if len(labels) != len(x_support):
        raise FewShotRequestError(f"{len(labels)} support_labels for {len(x_support)} support_images")
    classes = sorted(set(labels))  # head rows in sorted label order: independent of the support order
    if len(classes) < 2:
        raise FewShotRequestError(
            f"the support set has {len(classes)} class ({classes[0]!r}); a task needs at least 2 classes"
        )
    row = {label: i for i, label in enumerate(classes)}
    y = torch.tensor([row[label] for label in labels], dtype=torch.long)  # (S,) in 0..N-1
    predicted = query_scores(model, x_support, y, x_query, len(classes), steps, lr).argmax(dim=1).tolist()

    if isinstance(support_labels, np.ndarray) and support_labels.dtype != object:
        first = {label: i for i, label in reversed(list(enumerate(labels)))}  # row -> an index of it
        return support_labels[[first[classes[r]] for r in predicted]]
    answer = np.empty(len(predicted), dtype=object)  # keeps each value's own Python type
    answer[:] = [classes[r] for r in predicted]
    return answer


def query_scores(
    model: nn.Module,
    x_support: torch.Tensor,
    y_support: torch.Tensor,
    x_query: torch.Tensor,
    n_classes: int,
    steps: int,
    lr: float,
) -> torch.Tensor:
    """Query logits after adapting to one episode, without writing to ``model``.

    Args:
        model: the meta-learner; only its weights are read.
        x_support: ``(S, C, H, W)``; y_support: ``(S,)`` rows ``0..N-1``; x_query: ``(Q, C, H, W)``.
        n_classes: ``N``; the head for ``N`` classes is :func:`free.maml.head_for_classes`'s.
        steps, lr: the inner loop.

    Returns:
        ``(Q, N)`` logits.
    """
    arch = private_architecture(model)
    params, buffers = split_state(model)  # detached views of the shared weights, never written
    # torch.func.grad inside adapt() computes its own gradients under no_grad.
    with torch.no_grad():
        adapted = adapt(arch, params, buffers, x_support, y_support, steps, lr, n_classes=n_classes)
        return logits(arch, adapted, buffers, x_query)


def _images(name: str, value: Any, shape: tuple[int, int, int]) -> torch.Tensor:
    """``value`` as a float32 ``(n, C, H, W)`` tensor with ``n >= 1``, finite, in [0, 1]."""
    expected = f"(n, {', '.join(map(str, shape))})"
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise FewShotRequestError(f"{name} must be an array of numbers of shape {expected}") from None
    if array.ndim != 4 or tuple(array.shape[1:]) != shape or len(array) == 0:
        raise FewShotRequestError(f"{name} must have shape {expected} with n >= 1, got {tuple(array.shape)}")
    finite = np.isfinite(array)
    if not finite.all():
        raise FewShotRequestError(f"{name} has {int((~finite).sum())} NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        # Normalisation is inside the network: 0..255 pixels would silently give nonsense.
        raise FewShotRequestError(f"{name} must be intensities in [0, 1] (pixels / 255), got {low:g} to {high:g}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _label_values(value: Any) -> list[Any]:
    """``value`` as a list of Python scalars of one type (``str``, ``int``, ``float`` or ``bool``)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise FewShotRequestError(f"support_labels must be a flat list, got an array of shape {value.shape}")
        items = value.tolist()  # numpy scalars -> Python scalars; object arrays keep their objects
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise FewShotRequestError(f"support_labels must be a list, got {type(value).__name__}")
    items = [v.item() if isinstance(v, np.generic) else v for v in items]
    for i, v in enumerate(items):
        if type(v) not in LABEL_TYPES:
            raise FewShotRequestError(
                f"support_labels[{i}] is {v!r}; a label must be a string or a number, not {type(v).__name__}"
            )
        if isinstance(v, float) and not math.isfinite(v):
            raise FewShotRequestError(f"support_labels[{i}] is {v!r}; a label must be finite")
    kinds = sorted({type(v).__name__ for v in items})
    if len(kinds) > 1:
        # 1 and "1" (or True and 1) would be one class or two depending on the parser: refuse to guess.
        raise FewShotRequestError(f"support_labels mix types ({', '.join(kinds)}); use one type for all labels")
    return items


class FewShotMetaLearner(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a meta-learner checkpoint (safetensors) and its card (JSON)."""

    def load_context(self, context: Any) -> None:
        model, self.meta = load_classifier(Path(context.artifacts[WEIGHTS]))
        self.model = model.requires_grad_(False)  # read-only from here on; requests never write it
        card = json.loads(Path(context.artifacts[CARD]).read_text())
        self.steps, self.lr = int(card["test_inner_steps"]), float(card["inner_lr"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (MLflow reads type hints as a schema)
        """``model_input``: dict of arrays ``support_images``, ``support_labels``, ``query_images``."""
        if not isinstance(model_input, dict):
            raise FewShotRequestError(f'the request must be {{"inputs": {{{", ".join(map(repr, INPUTS))}}}}}')
        missing = [key for key in INPUTS if key not in model_input]
        if missing:
            raise FewShotRequestError(f"the request lacks {', '.join(missing)} (it needs {', '.join(INPUTS)})")
        try:
            return predict_episode(self.model, self.meta, *(model_input[k] for k in INPUTS), self.steps, self.lr)
        except FewShotRequestError:
            raise
        except Exception as err:  # a bug, not the request: log the trace here, not in the response body
            _log.exception("few-shot prediction failed")
            raise FewShotInternalError(f"the model failed on this request ({type(err).__name__}: {err})") from err


def signature(meta: dict[str, Any]) -> ModelSignature:
    """The three named inputs and the output, declared as 1-D object tensors.

    Deliberately loose: with typed specs MLflow casts and checks the values before the model sees
    them - an int64 label spec refuses string labels, and a wrong image shape is refused with a
    message that starts with a dump of the request. Object specs hand the parsed JSON values (each
    label with its own type) to :func:`predict_episode`, which checks the shapes against ``meta``
    (``(n, channels, image_size, image_size)``), the values and the labels, and says what is wrong
    first. MLflow itself still refuses a request that lacks one of the three names.
    """
    del meta  # shapes are checked per request against the checkpoint's description, not by MLflow
    anything = np.dtype(object)
    inputs = Schema([TensorSpec(anything, (-1,), name) for name in INPUTS])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(anything, (-1,))]))


def input_example(meta: dict[str, Any], n_way: int, shots: int = 1, queries: int = 2) -> dict[str, np.ndarray]:
    """A small valid request (random images), stored with the model as its input example."""
    rng = np.random.default_rng(0)
    image = (meta["channels"], meta["image_size"], meta["image_size"])
    return {
        "support_images": rng.random((n_way * shots, *image), dtype=np.float32),
        "support_labels": np.repeat(np.arange(n_way, dtype=np.int64), shots),
        "query_images": rng.random((queries, *image), dtype=np.float32),
    }
