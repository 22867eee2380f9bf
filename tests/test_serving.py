"""The served meta-learner (free/serving.py through MLflow's pyfunc and scoring server): any N-way
K-shot request against a hand-built reference, labels returned as given, independent concurrent
requests on one loaded model, and request errors that say what is wrong (HTTP 400, no stack trace)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch

from free import serving_model
from free.checkpoints import build_from_meta, save_classifier
from free.serving import (
    CARD,
    WEIGHTS,
    FewShotRequestError,
    input_example,
    predict_episode,
    query_scores,
    signature,
)

# Small models: one torch thread is faster than two and independent of earlier tests (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

BIN = Path(sys.executable).parent
STEPS, LR = 3, 0.1
META = {"arch": "conv4", "channels": 1, "n_classes": 5, "image_size": 28, "width": 8, "mean": [0.5], "std": [0.5],
        "track_running_stats": False}  # fmt: skip


def tiny_model(head: str = "linear") -> tuple[torch.nn.Module, dict[str, Any]]:
    meta = {**META, "head": head}
    torch.manual_seed(0)
    return build_from_meta(meta).eval(), meta


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny meta-learner saved as the registry holds it: models-from-code pyfunc, weights + card."""
    root = tmp_path_factory.mktemp("served")
    model, meta = tiny_model()
    weights, card = root / "metalearner.safetensors", root / "card.json"
    save_classifier(weights, model.state_dict(), meta)
    card.write_text(json.dumps({"test_inner_steps": STEPS, "inner_lr": LR}))
    path = root / "model"
    mlflow.pyfunc.save_model(
        str(path),
        python_model=serving_model.__file__,
        artifacts={WEIGHTS: str(weights), CARD: str(card)},
        signature=signature(meta),
        input_example=input_example(meta, 5),
    )
    return path


@pytest.fixture(scope="module")
def pyfunc(saved_model: Path):
    return mlflow.pyfunc.load_model(str(saved_model))


def request(n_way: int, k_shot: int | list[int], queries: int, labels: list[Any], seed: int) -> dict[str, np.ndarray]:
    """Random images; class ``i`` has ``k_shot`` (or ``k_shot[i]``) support images labelled ``labels[i]``,
    shuffled so that the support set is not grouped by class."""
    rng = np.random.default_rng(seed)
    shots = [k_shot] * n_way if isinstance(k_shot, int) else k_shot
    support_labels = [labels[i] for i in range(n_way) for _ in range(shots[i])]
    order = rng.permutation(len(support_labels))
    return {
        "support_images": rng.random((len(support_labels), 1, 28, 28), dtype=np.float32),
        "support_labels": np.array([support_labels[i] for i in order]),
        "query_images": rng.random((queries, 1, 28, 28), dtype=np.float32),
    }


def label_set(kind: str, n_way: int) -> list[Any]:
    """Distinct labels that are neither 0..N-1 nor in sorted order."""
    values = (
        [f"class-{chr(97 + i % 26)}{i}" for i in range(n_way)] if kind == "str" else [7 * i - 40 for i in range(n_way)]
    )
    random.Random(n_way).shuffle(values)
    return values


def naive_reference(
    model: torch.nn.Module, req: dict[str, np.ndarray], steps: int, lr: float
) -> tuple[torch.Tensor, list]:
    """``(Q, N)`` query logits and the predicted labels, written out by hand: labels -> rows in sorted
    order; the head for N classes is the meta-learned one if N is its width, else prototypes
    (W_k = 2 c_k, b_k = -||c_k||^2 from a per-class loop); then plain SGD with autograd on a copy."""
    labels = req["support_labels"].tolist()
    classes = sorted(set(labels))
    n_way = len(classes)
    y = torch.tensor([classes.index(v) for v in labels])
    x_s, x_q = torch.from_numpy(req["support_images"]), torch.from_numpy(req["query_images"])
    net = copy.deepcopy(model)
    if n_way != net.net.classifier.out_features:
        with torch.no_grad():
            features = net.features(x_s)  # (S, D)
            prototypes = torch.stack([features[y == k].mean(0) for k in range(n_way)])  # (N, D)
            head = torch.nn.Linear(prototypes.shape[1], n_way)
            head.weight.copy_(2 * prototypes)
            head.bias.copy_(-(prototypes**2).sum(1))
        net.net.classifier = head
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(net(x_s), y)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads, strict=True):
                p -= lr * g
    with torch.no_grad():
        scores = net(x_q)
    return scores, [classes[i] for i in scores.argmax(1).tolist()]


def weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---- any N, any K, labels as given -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int", "str"])
@pytest.mark.parametrize("k_shot", [1, 3])
@pytest.mark.parametrize("n_way", [2, 5, 10, 20, 50])
def test_any_way_and_shot_matches_a_naive_reference(pyfunc, n_way: int, k_shot: int, kind: str) -> None:
    model, meta = tiny_model()
    req = request(n_way, k_shot, queries=7, labels=label_set(kind, n_way), seed=n_way * 10 + k_shot)
    reference, expected = naive_reference(model, req, STEPS, LR)

    classes = sorted(set(req["support_labels"].tolist()))
    y = torch.tensor([classes.index(v) for v in req["support_labels"].tolist()])
    x_s, x_q = torch.from_numpy(req["support_images"]), torch.from_numpy(req["query_images"])
    scores = query_scores(model, x_s, y, x_q, n_way, STEPS, LR)
    assert scores.shape == (7, n_way)
    torch.testing.assert_close(scores, reference, rtol=1e-5, atol=1e-5)

    predicted = pyfunc.predict(req)
    assert isinstance(predicted, np.ndarray) and predicted.dtype == req["support_labels"].dtype
    assert len(predicted) == 7 and set(predicted.tolist()) <= set(classes)
    top2 = reference.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1] > 1e-4).tolist()  # a near-tie may go either way at float precision
    assert [p for p, c in zip(predicted.tolist(), clear, strict=True) if c] == [
        e for e, c in zip(expected, clear, strict=True) if c
    ]
    assert sum(clear) >= 5


def test_uneven_shots_and_json_labels_keep_their_type() -> None:
    model, meta = tiny_model("proto")
    req = request(4, [1, 3, 2, 5], queries=6, labels=[3, 10, 200, -1], seed=1)
    expected = nearest_prototype(model, req)
    as_json = {**req, "support_labels": np.array(req["support_labels"].tolist(), dtype=object)}  # what MLflow parses
    predicted = predict_episode(model, meta, **as_json, steps=0, lr=LR)
    assert predicted.dtype == object and all(type(v) is int for v in predicted)
    assert predicted.tolist() == expected
    strings = {**req, "support_labels": np.array([str(v) for v in req["support_labels"].tolist()], dtype=object)}
    answer = predict_episode(model, meta, **strings, steps=2, lr=LR)
    assert all(type(v) is str for v in answer) and set(answer.tolist()) <= {"3", "10", "200", "-1"}


def nearest_prototype(model: torch.nn.Module, req: dict[str, np.ndarray]) -> list[Any]:
    """Proto head, no step: the nearest prototype (Euclidean) of each query image."""
    labels = req["support_labels"].tolist()
    classes = sorted(set(labels))
    with torch.no_grad():
        f_s = model.features(torch.from_numpy(req["support_images"]))
        f_q = model.features(torch.from_numpy(req["query_images"]))
    prototypes = torch.stack([f_s[[i for i, v in enumerate(labels) if v == c]].mean(0) for c in classes])
    return [classes[i] for i in torch.cdist(f_q, prototypes).argmin(1).tolist()]


# ---- concurrency ------------------------------------------------------------------------------


def test_concurrent_requests_are_independent_and_never_change_the_weights(pyfunc) -> None:
    """8 threads, 48 overlapping requests on one loaded model: every answer equals the answer the
    request gets alone, and the weights hash the same before and after. The requests are 3- and
    5-way with int labels, which the pre-fix model also accepted; on it (one nn.Module swapped by
    torch.func.functional_call from every thread) this test fails."""
    network = pyfunc.unwrap_python_model().model
    before = weights_sha256(network)
    requests = [request(n, 2, 9, [10 * i + 1 for i in range(n)], seed=s) for s, n in enumerate([5, 3, 5, 3, 5, 5])]
    alone = [pyfunc.predict(r).tolist() for r in requests]

    jobs = [i % len(requests) for i in range(48)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda i: pyfunc.predict(requests[i]).tolist(), jobs))

    wrong = [(i, answers[j], alone[i]) for j, i in enumerate(jobs) if answers[j] != alone[i]]
    assert not wrong, f"{len(wrong)} of {len(jobs)} concurrent answers differ from the answer alone: {wrong[:2]}"
    assert weights_sha256(network) == before
    assert [pyfunc.predict(r).tolist() for r in requests] == alone  # and nothing lingers afterwards


# ---- request errors ---------------------------------------------------------------------------

GOOD = request(3, 1, 2, ["a", "b", "c"], seed=5)


def bad_requests() -> list[tuple[str, dict[str, Any], str]]:
    """(name, request, the reason its message must start with)."""
    img = GOOD["support_images"]
    nan = img.copy()
    nan[0, 0, 0, :2] = np.nan
    return [
        ("wrong channels", {**GOOD, "query_images": np.zeros((2, 3, 28, 28), np.float32)},
         "query_images must have shape (n, 1, 28, 28) with n >= 1, got (2, 3, 28, 28)"),
        ("not 4-D", {**GOOD, "support_images": np.zeros((3, 28, 28), np.float32)},
         "support_images must have shape (n, 1, 28, 28) with n >= 1, got (3, 28, 28)"),
        ("no query", {**GOOD, "query_images": np.zeros((0, 1, 28, 28), np.float32)},
         "query_images must have shape (n, 1, 28, 28) with n >= 1, got (0, 1, 28, 28)"),
        ("ragged", {**GOOD, "support_images": np.array([img[0].tolist(), [[1.0]], img[2].tolist()], dtype=object)},
         "support_images must be an array of numbers of shape (n, 1, 28, 28)"),
        ("NaN", {**GOOD, "support_images": nan}, "support_images has 2 NaN or infinite values"),
        ("0..255", {**GOOD, "query_images": GOOD["query_images"] * 255},
         "query_images must be intensities in [0, 1] (pixels / 255), got"),
        ("1e38", {**GOOD, "support_images": np.full_like(img, 1e38)},
         "support_images must be intensities in [0, 1] (pixels / 255), got 1e+38 to 1e+38"),
        ("-inf", {**GOOD, "query_images": np.full_like(GOOD["query_images"], -np.inf)},
         "query_images has 1568 NaN or infinite values"),
        ("label count", {**GOOD, "support_labels": np.array(["a", "b"])}, "2 support_labels for 3 support_images"),
        ("one class", {**GOOD, "support_labels": np.array(["a", "a", "a"])},
         "the support set has 1 class ('a'); a task needs at least 2 classes"),
        ("mixed", {**GOOD, "support_labels": np.array(["a", 1, "c"], dtype=object)},
         "support_labels mix types (int, str); use one type for all labels"),
        ("null label", {**GOOD, "support_labels": np.array(["a", None, "c"], dtype=object)},
         "support_labels[1] is None; a label must be a string or a number, not NoneType"),
        ("nested labels", {**GOOD, "support_labels": np.array([["a"], ["b"], ["c"]], dtype=object)},
         "support_labels must be a flat list, got an array of shape (3, 1)"),
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "req", "reason"), bad_requests(), ids=[b[0] for b in bad_requests()])
def test_bad_requests_say_why(pyfunc, name: str, req: dict[str, Any], reason: str) -> None:
    model, meta = tiny_model()
    with pytest.raises(FewShotRequestError) as core:
        predict_episode(model, meta, **req, steps=1, lr=LR)
    assert str(core.value).startswith(reason)
    with pytest.raises(mlflow.exceptions.MlflowException) as served:
        pyfunc.predict(req)
    assert served.value.message.startswith(reason)
    assert served.value.get_http_status_code() == 400


def test_missing_inputs_are_named(pyfunc) -> None:
    learner = pyfunc.unwrap_python_model()
    with pytest.raises(FewShotRequestError, match="^the request lacks query_images"):
        learner.predict(None, {k: v for k, v in GOOD.items() if k != "query_images"})
    with pytest.raises(mlflow.exceptions.MlflowException, match="missing inputs \\['query_images'\\]"):
        pyfunc.predict({k: v for k, v in GOOD.items() if k != "query_images"})  # MLflow's own check, first


# ---- HTTP ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(pyfunc):
    """MLflow's scoring server app (what `mlflow models serve` runs under uvicorn), in-process."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    return TestClient(scoring_server.init(pyfunc))


def as_json(req: dict[str, Any]) -> dict[str, Any]:
    return {"inputs": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in req.items()}}


def test_http_answers_string_labels_as_given(http, pyfunc) -> None:
    req = request(20, 1, 4, label_set("str", 20), seed=3)
    answer = http.post("/invocations", json=as_json(req))
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == pyfunc.predict(req).tolist()
    numbers = http.post("/invocations", json=as_json({**req, "support_labels": list(range(100, 120))}))
    assert numbers.status_code == 200 and all(type(v) is int and 100 <= v < 120 for v in numbers.json()["predictions"])


@pytest.mark.parametrize(
    ("name", "body", "reason"),
    [
        ("mixed labels", as_json({**GOOD, "support_labels": ["a", 1, "c"]}), "support_labels mix types (int, str)"),
        ("one class", as_json({**GOOD, "support_labels": [4, 4, 4]}), "the support set has 1 class (4)"),
        ("wrong shape", as_json({**GOOD, "query_images": np.zeros((2, 28, 28)).tolist()}),
         "query_images must have shape (n, 1, 28, 28) with n >= 1, got (2, 28, 28)"),
        ("ragged", as_json({**GOOD, "support_images": [[[[0.5]]], [[[0.5, 0.5]]], [[[0.5]]]]}),
         "support_images must be an array of numbers of shape (n, 1, 28, 28)"),
        ("NaN", None, "query_images has 1 NaN or infinite values"),
    ],
)  # fmt: skip
def test_http_bad_request_is_400_with_the_reason_first(http, name: str, body: Any, reason: str) -> None:
    if body is None:  # JSON has no NaN; Python's json (and so the server) reads the literal anyway
        text = re.sub(r'("query_images": \[\[\[\[)[^,]+', r"\1NaN", json.dumps(as_json(GOOD)), count=1)
        response = http.post("/invocations", content=text, headers={"Content-Type": "application/json"})
    else:
        response = http.post("/invocations", json=body)
    assert response.status_code == 400, response.text
    payload = response.json()
    assert payload["message"].splitlines()[0].startswith(reason), payload["message"][:300]
    assert "stack_trace" not in payload and "Traceback" not in response.text
    assert payload["error_code"] == "INVALID_PARAMETER_VALUE"


def test_http_missing_input_is_400_without_a_trace(http) -> None:
    """MLflow checks the signature's names before the model runs; its message ends with the reason."""
    response = http.post("/invocations", json=as_json({k: v for k, v in GOOD.items() if k != "support_labels"}))
    assert response.status_code == 400
    assert "missing inputs ['support_labels']" in response.json()["message"]
    assert "stack_trace" not in response.json() and "Traceback" not in response.text


@pytest.mark.slow
def test_mlflow_models_serve_answers_and_refuses(saved_model: Path) -> None:
    """The real `mlflow models serve` process (uvicorn, several requests at once)."""
    from free.stack import free_port_block

    port = free_port_block(1)
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", str(saved_model), "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},  # mlflow runs `uvicorn`
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:

        def post(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
                break
            except OSError:
                assert server.poll() is None, "mlflow models serve exited"
                time.sleep(1)
        good = [request(n, 1, 5, label_set("str", n), seed=n) for n in (2, 10, 20)]
        alone = [post(as_json(r)) for r in good]
        assert all(status == 200 for status, _ in alone)
        with ThreadPoolExecutor(max_workers=6) as pool:
            together = list(pool.map(lambda i: post(as_json(good[i % 3])), range(12)))
        assert [t[1] for t in together] == [alone[i % 3][1] for i in range(12)]
        status, body = post(as_json({**GOOD, "support_labels": ["a", 1, "c"]}))
        assert status == 400 and body["message"].splitlines()[0].startswith("support_labels mix types")
        assert "stack_trace" not in body
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


# ---- the guard `free serve model` puts in front of MLflow's scoring app -------------------------


@pytest.fixture(scope="module")
def guarded(pyfunc):
    from fastapi.testclient import TestClient

    from free.serving_app import guarded_app

    return TestClient(guarded_app(pyfunc, max_bytes=200_000), raise_server_exceptions=False)


def _assert_reason_only(response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text[:300]
    assert set(response.json()) == {"error_code", "message"}  # no stack_trace, nothing else
    assert response.json()["message"].startswith(reason), response.json()["message"]
    if status == 413:
        assert "bytes, over this server's limit of 200000 bytes" in response.json()["message"]
    assert len(response.content) < 600  # the reason, not an echo of the request


GOOD_BODY = json.dumps(as_json(GOOD))


GUARD_CASES = [
    ("deep JSON", "[" * 100_000 + "]" * 100_000, "application/json", 400,
     "the JSON is nested too deeply (100000 levels, at most 32)"),
    ("deep inputs", '{"inputs": {"support_images": ' + "[" * 31 + "]" * 31 + ', "x": "[[[[[[[[[[[[[[[[[[[["}}',
     "application/json", 400, "the JSON is nested too deeply (33 levels, at most 32)"),
    ("brackets in strings", json.dumps(as_json({**GOOD, "support_labels": ["[" * 40, "{" * 40, "]]"]})),
     "application/json", 200, ""),
    ("invalid JSON", GOOD_BODY[:-9], "application/json", 400, "the body is not valid JSON (Expecting"),
    ("not UTF-8", b'{"inputs": "\xff"}', "application/json", 400, "the body is not UTF-8 text"),
    ("missing input", json.dumps(as_json({k: v for k, v in GOOD.items() if k != "support_labels"})),
     "application/json", 400, "Model is missing inputs ['support_labels']"),
    ("CSV", "a,b\n1,2\n", "text/csv", 415, "send the request as JSON (Content-Type: application/json)"),
    ("1e38", json.dumps(as_json({**GOOD, "query_images": np.full((2, 1, 28, 28), 1e38).tolist()})),
     "application/json", 400, "query_images must be intensities in [0, 1] (pixels / 255), got 1e+38"),
    ("one class", json.dumps(as_json({**GOOD, "support_labels": ["a", "a", "a"]})), "application/json", 400,
     "the support set has 1 class ('a')"),
    ("too large", json.dumps(as_json(request(5, 5, 20, list("abcde"), seed=1))), "application/json", 413,
     "the request is "),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "body", "content_type", "status", "reason"), GUARD_CASES, ids=[c[0] for c in GUARD_CASES]
)  # fmt: skip
def test_guard_refuses_with_the_reason_only(
    http, guarded, name: str, body: str | bytes, content_type: str, status: int, reason: str
) -> None:
    response = guarded.post("/invocations", content=body, headers={"Content-Type": content_type})
    if status == 200:
        assert response.status_code == 200, response.text[:300]
        return
    _assert_reason_only(response, status, reason)


def test_plain_mlflow_app_fails_where_the_guard_does_not(http) -> None:
    """What the guard is for: MLflow's own app answers these with a 500, an echo of the body, a trace."""
    from fastapi.testclient import TestClient

    http = TestClient(http.app, raise_server_exceptions=False)
    deep = http.post(
        "/invocations", content="[" * 100_000 + "]" * 100_000, headers={"Content-Type": "application/json"}
    )
    assert deep.status_code == 500
    missing = http.post("/invocations", json=as_json({k: v for k, v in GOOD.items() if k != "support_labels"}))
    assert missing.status_code == 400 and len(missing.content) > 5_000  # the support images, echoed
    csv = http.post("/invocations", content="a,b\n1,2\n", headers={"Content-Type": "text/csv"})
    assert "stack_trace" in csv.json()


def test_guard_passes_good_requests_and_other_routes_unchanged(http, guarded) -> None:
    req = request(5, 1, 3, label_set("str", 5), seed=9)
    plain, guard = http.post("/invocations", json=as_json(req)), guarded.post("/invocations", json=as_json(req))
    assert guard.status_code == plain.status_code == 200
    assert guard.content == plain.content
    assert guarded.get("/ping").status_code == 200 and guarded.get("/version").text == http.get("/version").text


def _asgi_post(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[list[dict], list[int], list[int]]:
    """Drive the guard by hand: ``(messages sent, chunk indices read, calls of the inner app)``."""
    import asyncio

    from free.serving_app import RequestGuard

    read, sent, inner = [], [], []

    async def receive() -> dict:
        read.append(len(read))
        i = len(read) - 1
        return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}

    async def send(message: dict) -> None:
        sent.append(message)

    async def app(scope, receive, send) -> None:  # noqa: ANN001
        inner.append(1)

    scope = {"type": "http", "path": "/invocations", "method": "POST", "headers": headers}
    asyncio.run(RequestGuard(app, max_bytes=1000)(scope, receive, send))
    return sent, read, inner


def test_guard_refuses_a_large_content_length_without_reading_the_body() -> None:
    json_type = (b"content-type", b"application/json")
    sent, read, inner = _asgi_post([(b"content-length", b"50000000"), json_type], [b"x" * 100] * 10)
    assert sent[0]["status"] == 413 and read == [] and inner == []
    assert json.loads(sent[1]["body"])["message"].startswith("the request is 50000000 bytes, over this server's limit")


def test_guard_stops_reading_a_chunked_body_at_the_limit() -> None:
    """No Content-Length (chunked upload): counted as it arrives; the 11th of 100 chunks ends it."""
    sent, read, inner = _asgi_post([(b"content-type", b"application/json")], [b" " * 100] * 100)
    assert sent[0]["status"] == 413 and len(read) == 11 and inner == []


# ---- free serve request / free serve model ------------------------------------------------------


def test_serve_request_writes_a_request_the_served_model_answers(
    fake_omniglot: Path, tmp_path: Path, http, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from free.cli import app

    monkeypatch.setenv("FREE_CACHE_DIR", str(tmp_path / "cache"))
    runner = CliRunner()
    for labels, n_way in (("--string-labels", 3), ("--int-labels", 4)):
        out = tmp_path / f"{labels[2:]}.json"
        args = ["serve", "request", f"dataset.root={fake_omniglot}", "--n-way", str(n_way), "--k-shot", "2"]
        result = runner.invoke(app, [*args, "--queries", "2", labels, "--seed", "3", "--out", str(out)])
        assert result.exit_code == 0, result.output
        body = json.loads(out.read_text())
        assert list(body) == ["inputs"]
        inputs = body["inputs"]
        assert np.asarray(inputs["support_images"]).shape == (2 * n_way, 1, 28, 28)
        assert np.asarray(inputs["query_images"]).shape == (2 * n_way, 1, 28, 28)
        kinds = {type(v) for v in inputs["support_labels"]}
        assert kinds == ({str} if labels == "--string-labels" else {int})
        assert len(set(inputs["support_labels"])) == n_way
        truth = json.loads(out.with_suffix(".truth.json").read_text())
        assert sorted(truth) == sorted(inputs["support_labels"])  # 2 queries and 2 shots per class
        answer = http.post("/invocations", json=body)
        assert answer.status_code == 200, answer.text
        assert set(answer.json()["predictions"]) <= set(inputs["support_labels"])
    too_many = runner.invoke(app, ["serve", "request", f"dataset.root={fake_omniglot}", "--n-way", "50"])
    assert too_many.exit_code == 1 and "n_way=50 is more than the 5 classes" in too_many.output


def test_serve_model_runs_the_guarded_scoring_app_on_the_tracking_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import free.cli.serve
    from free.cli import app
    from free.stack import free_port_block

    calls = []

    class FakeServer:
        def __init__(self, cmd: list[str], env: dict[str, str], start_new_session: bool) -> None:
            assert start_new_session  # its own process group, stopped as a whole
            calls.append((cmd, env))
            self.pid = -1

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(free.cli.serve.subprocess, "Popen", FakeServer)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    result = CliRunner().invoke(app, ["serve", "model", "-p", "5123"])
    assert result.exit_code == 0, result.output
    ((command, env),) = calls
    assert command[1:] == ["-m", "uvicorn", "--factory", "free.serving_app:app_from_env",
                           "--host", "127.0.0.1", "--port", "5123"]  # fmt: skip
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    assert env["FREE_SERVE_MODEL_URI"] == "models:/free-meta-learner@champion"
    assert env["FREE_SERVE_MAX_BYTES"] == str(32 * 2**20)

    # No tracking URI and no local stack: one line that says how to fix it, exit 1, nothing run.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("FREE_MLFLOW_PORT", str(free_port_block(1)))
    monkeypatch.setenv("FREE_STATE_DIR", str(tmp_path / "state"))  # no stack was started there
    refused = CliRunner().invoke(app, ["serve", "model"])
    assert refused.exit_code == 1 and "free serve model needs an MLflow server" in refused.output
    assert len(calls) == 1
