"""The HTTP app `free serve model` runs: MLflow's scoring server for the meta-learner behind a guard
that refuses hostile requests before MLflow reads them, and answers every error with its reason only.

What the guard adds to plain ``mlflow models serve`` (same routes, same success responses; MLflow
3.x's scoring server, ``mlflow/pyfunc/scoring_server/__init__.py``, has none of these):

* a request size cap: a ``Content-Length`` over ``max_bytes`` is answered 413 before any of the
  body is read, and a body without one (chunked) is counted as it arrives and cut off at the cap.
  MLflow reads the whole body and parses it into Python lists and numpy arrays (~80 bytes of memory
  per byte of JSON: a 50 MB request peaked at 3.9 GB and stalled other clients);
* JSON only (415 otherwise): the CSV and Parquet paths put a stack trace in their 400s;
* invalid or deeply nested JSON is a 400 that says so (MLflow echoes the whole body after a parse
  error, and 100k-deep JSON raised ``RecursionError``: a 500);
* every error response is ``{"error_code", "message"}`` with the reason alone: no ``stack_trace``,
  and MLflow's own messages (e.g. a missing input) lose the dump of the request they start with.

The model itself (:mod:`free.serving`) checks the values - finite intensities in [0, 1], at least 2
classes, shapes - under both servers.

Run as ``uvicorn --factory free.serving_app:app_from_env`` with ``FREE_SERVE_MODEL_URI`` (and
optionally ``FREE_SERVE_MAX_BYTES``) in the environment; `free serve model` does that.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

MODEL_URI_ENV = "FREE_SERVE_MODEL_URI"
MAX_BYTES_ENV = "FREE_SERVE_MAX_BYTES"

#: Default request cap. A 5-way 5-shot request of 15 queries per class is ~0.4 MB at 28x28x1 and
#: ~17 MB at 84x84x3 (as `free serve request` writes it: 4 decimals per pixel).
DEFAULT_MAX_BYTES = 32 * 1024 * 1024

#: Deepest JSON nesting accepted. A request is 6 deep ({"inputs": {name: [[[[...]]]]}}); MLflow's
#: other formats are shallower.
MAX_JSON_DEPTH = 32

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')  # a JSON string literal, escapes included

#: Longest reason kept from an error that is not JSON (e.g. a proxy's or uvicorn's plain text).
_MAX_PLAIN_ERROR = 300

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestGuard:
    """ASGI middleware in front of MLflow's scoring app; only ``POST /invocations`` is guarded."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length and (not length.isdigit() or int(length) > self.max_bytes):
            await _reply(send, 413, "REQUEST_LIMIT_EXCEEDED", self._too_large(length))
            return
        content_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if content_type != "application/json":
            reason = f"send the request as JSON (Content-Type: application/json), not {content_type or 'nothing'}"
            await _reply(send, 415, "BAD_REQUEST", reason)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:  # no (or a false) Content-Length: stop reading at the cap
                await _reply(send, 413, "REQUEST_LIMIT_EXCEEDED", self._too_large(f"more than {len(body)}"))
                return
            if not message.get("more_body", False):
                break
        problem = json_problem(bytes(body))
        if problem:
            await _reply(send, 400, "BAD_REQUEST", problem)
            return
        await self.app(scope, _replay(bytes(body), receive), _reason_only(send))

    def _too_large(self, size: str) -> str:
        return (
            f"the request is {size} bytes, over this server's limit of {self.max_bytes} bytes; "
            f"send fewer or smaller images, or raise the limit ({MAX_BYTES_ENV} / free serve model --max-request-mb)"
        )


def json_problem(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``body`` is not a JSON document MLflow can parse, or ``None`` when it is.

    Checked here so that a body MLflow would fail on never reaches it: its parse error echoes the
    body, and nesting near Python's recursion limit raised ``RecursionError`` (HTTP 500, or a 400
    depending on which thread parsed it). The depth is counted on the raw bytes, before parsing.
    """
    depth = json_depth(body)
    if depth > max_depth:
        return (
            f"the JSON is nested too deeply ({depth} levels, at most {max_depth}); a request is "
            '{"inputs": {name: array}} with 4-D image arrays'
        )
    try:
        json.loads(body)
    except UnicodeDecodeError as err:
        return f"the body is not UTF-8 text (byte {err.start})"
    except json.JSONDecodeError as err:
        return f"the body is not valid JSON ({err.msg}: line {err.lineno} column {err.colno})"
    return None


def json_depth(body: bytes) -> int:
    """Deepest nesting of ``[``/``{`` in a JSON text, ignoring brackets inside strings.

    Vectorised (numpy over the bytes, after blanking strings) because a request is up to
    ``max_bytes`` long and a Python loop over it would cost more than the prediction.
    """
    blanked = _STRINGS.sub(b'""', body)
    chars = np.frombuffer(blanked, dtype=np.uint8)
    if chars.size == 0:
        return 0
    opens = (chars == ord("[")) | (chars == ord("{"))
    closes = (chars == ord("]")) | (chars == ord("}"))
    return int(np.cumsum(opens.astype(np.int64) - closes.astype(np.int64)).max())


def reason_of(message: str) -> str:
    """The reason in an error message of MLflow's scoring server, without the request it quotes.

    MLflow wraps errors as ``Failed to predict data '<the request>'. \\nError: <reason>`` and schema
    errors as ``Failed to enforce schema of data '<the request>' with schema '...'. Error: <reason>``;
    the reason is what follows the last ``Error:``. Messages of :mod:`free.serving` are reasons already.
    """
    if message.startswith(("Failed to predict data", "Failed to enforce schema")) and "Error: " in message:
        message = message.rsplit("Error: ", 1)[1]
    return message.split("\nInput:", 1)[0].strip()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the inner app the body already read, then the real channel (disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _reason_only(send: Send) -> Send:
    """A ``send`` that rewrites error responses (status >= 400) to ``{"error_code", "message"}``."""
    start: Message = {}
    chunks: list[bytes] = []

    async def rewrite(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            if message["status"] < 400:
                await send(message)
            return
        if start["status"] < 400:
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        code, reason = _error_fields(start["status"], b"".join(chunks))
        await _reply(send, start["status"], code, reason)

    return rewrite


def _error_fields(status: int, body: bytes) -> tuple[str, str]:
    try:
        error = json.loads(body)
    except ValueError:
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error.get("error_code", "BAD_REQUEST")), reason_of(error["message"])
    if status >= 500:  # e.g. an exception MLflow did not catch: the details are in the server's log
        return "INTERNAL_ERROR", "the server failed on this request; the details are in its log"
    text = body.decode("utf-8", "replace").strip()
    return "BAD_REQUEST", text[:_MAX_PLAIN_ERROR]


async def _reply(send: Send, status: int, code: str, reason: str) -> None:
    body = json.dumps({"error_code": code, "message": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 413:
        headers.append((b"connection", b"close"))  # the unread rest of the body is not ours to wait for
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def guarded_app(model: Any, max_bytes: int = DEFAULT_MAX_BYTES) -> ASGIApp:
    """MLflow's scoring app for a loaded pyfunc ``model``, behind :class:`RequestGuard`."""
    from mlflow.pyfunc import scoring_server

    return RequestGuard(scoring_server.init(model), max_bytes)


def app_from_env() -> ASGIApp:
    """uvicorn factory: load ``$FREE_SERVE_MODEL_URI`` and guard it with ``$FREE_SERVE_MAX_BYTES``."""
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(os.environ[MODEL_URI_ENV])
    return guarded_app(model, int(os.environ.get(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)))
