"""``free bench serve-load``: a bounded load test of the served meta-learner on loopback.

It saves a meta-learner (a freshly initialised Conv4 on Omniglot-sized images, or a given
checkpoint) as the registry holds it - a models-from-code pyfunc with its weights and card - into a
private temporary folder, starts the server `free serve model` runs (MLflow's scoring app behind
:mod:`free.serving_app`'s guard, under uvicorn) on a free port of 127.0.0.1, and then:

1. answers each of ``distinct`` different N-way K-shot requests once, one at a time: the reference;
2. runs ``clients`` threads for ``seconds``, each sending those requests over its own keep-alive
   connection, and checks every answer against the reference for the same request;
3. reports requests/s, p50/p99 latency, errors (non-200 or no answer), mismatches, and the
   server's resident memory at the start, at the end and at its peak (sampled every 0.2 s);
4. stops the server by its process group and reports that it did.

Weights are random unless ``checkpoint`` is given: the server's work (parse, adapt, predict) is the
same, and the answers are deterministic either way, which is what the load test checks.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

HOST = "127.0.0.1"  # never anything else: a load test must not leave this machine


@dataclass
class ServeLoadBench:
    clients: int = 4
    seconds: float = 30.0
    n_way: int = 5
    k_shot: int = 1
    queries: int = 15  # per class, as in meta-testing
    distinct: int = 16  # different requests, each answered alone first
    width: int = 64  # Conv4 width of the random meta-learner (the default model.width)
    inner_steps: int = 10  # the served inner loop (evaluate.inner_steps's default)
    inner_lr: float = 0.1
    startup_timeout: float = 180.0


def run(settings: ServeLoadBench, checkpoint: Path | None = None, say=print) -> dict[str, Any]:
    """Run the load test; return its numbers (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="free-serve-load-") as tmp:
        model_dir, meta = save_model(Path(tmp), settings, checkpoint)
        bodies = [_body(meta, settings, seed) for seed in range(settings.distinct)]
        server, port = start_server(model_dir, Path(tmp) / "server.log", settings.startup_timeout)
        try:
            say(f"server pid {server.pid} on http://{HOST}:{port}; {settings.distinct} reference answers ...")
            reference = [_post(http.client.HTTPConnection(HOST, port, timeout=120), body) for body in bodies]
            bad = [i for i, (status, _, _) in enumerate(reference) if status != 200]
            if bad:
                raise RuntimeError(f"reference requests {bad} failed: {reference[bad[0]][1][:300]!r}")
            answers = [answer for _, answer, _ in reference]
            rss_start = server_rss(server.pid)
            say(f"{settings.clients} clients for {settings.seconds:g} s ...")
            load = _load(port, bodies, answers, settings, server.pid)
            rss_end = server_rss(server.pid)
        finally:
            stopped = stop_server(server)
    latencies = sorted(load["latencies"])
    return {
        "settings": asdict(settings),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "request_bytes": int(statistics.mean(len(b) for b in bodies)),
        "requests": len(latencies) + load["errors"],
        "errors": load["errors"],
        "mismatches": load["mismatches"],
        "requests_per_s": round(len(latencies) / load["wall_s"], 2),
        "latency_p50_ms": round(1000 * _quantile(latencies, 0.50), 1) if latencies else None,
        "latency_p99_ms": round(1000 * _quantile(latencies, 0.99), 1) if latencies else None,
        "latency_max_ms": round(1000 * latencies[-1], 1) if latencies else None,
        "wall_s": round(load["wall_s"], 2),
        "server_rss_mb": {
            "start": _mb(rss_start),
            "end": _mb(rss_end),
            "peak": _mb(max(load["rss"], default=rss_start)),
        },
        "server_pid": server.pid,
        "server_stopped": stopped,
    }


def save_model(folder: Path, settings: ServeLoadBench, checkpoint: Path | None) -> tuple[Path, dict[str, Any]]:
    """A pyfunc model folder as the registry holds it; returns ``(folder, checkpoint description)``."""
    import mlflow.pyfunc
    import torch

    from free import serving_model
    from free.checkpoints import build_from_meta, load_classifier, save_classifier
    from free.serving import CARD, WEIGHTS, input_example, signature

    card = folder / "card.json"
    if checkpoint is None:
        meta = {"arch": "conv4", "channels": 1, "n_classes": settings.n_way, "image_size": 28, "width": settings.width,
                "mean": [0.5], "std": [0.5], "track_running_stats": False}  # fmt: skip
        torch.manual_seed(0)
        weights = folder / "metalearner.safetensors"
        save_classifier(weights, build_from_meta(meta).state_dict(), meta)
        card.write_text(json.dumps({"test_inner_steps": settings.inner_steps, "inner_lr": settings.inner_lr}))
    else:
        weights = Path(checkpoint)
        _, meta = load_classifier(weights)
        card.write_text((weights.parent / "card.json").read_text())
    path = folder / "model"
    mlflow.pyfunc.save_model(
        str(path),
        python_model=serving_model.__file__,
        artifacts={WEIGHTS: str(weights), CARD: str(card)},
        signature=signature(meta),
        input_example=input_example(meta, 2),
    )
    return path, meta


def start_server(model_dir: Path, log: Path, timeout: float) -> tuple[subprocess.Popen, int]:
    """`free serve model`'s server for a local model folder, in its own process group; waits for /ping."""
    from free.serving_app import MODEL_URI_ENV
    from free.stack import free_port_block

    port = free_port_block(1)
    command = [sys.executable, "-m", "uvicorn", "--factory", "free.serving_app:app_from_env",
               "--host", HOST, "--port", str(port), "--log-level", "warning"]  # fmt: skip
    with open(log, "wb") as sink:
        server = subprocess.Popen(
            command, env={**os.environ, MODEL_URI_ENV: str(model_dir)}, stdout=sink, stderr=sink, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}): {log.read_text()[-2000:]}")
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=5)
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                return server, port
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"the server did not answer /ping within {timeout:g} s: {log.read_text()[-2000:]}")


def stop_server(server: subprocess.Popen) -> bool:
    """SIGTERM to the server's process group (SIGKILL after 30 s); True once it has exited."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    return server.poll() is not None


def server_rss(pid: int) -> int:
    """Resident bytes of the server process and its children (0 when it is gone)."""
    try:
        import psutil

        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except ImportError:  # Linux without psutil: the server itself (no workers) from /proc
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except Exception:  # noqa: BLE001 - gone between two samples
        return 0
    return 0


def _load(port: int, bodies: list[bytes], answers: list[Any], settings: ServeLoadBench, pid: int) -> dict[str, Any]:
    lock = threading.Lock()
    totals: dict[str, Any] = {"latencies": [], "errors": 0, "mismatches": 0, "rss": []}
    stop_at = time.monotonic() + settings.seconds

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=120)
        latencies, errors, mismatches, k = [], 0, 0, index
        while time.monotonic() < stop_at:
            i = k % len(bodies)
            k += settings.clients  # each client walks the requests in its own order
            try:
                status, answer, seconds = _post(connection, bodies[i])
            except (OSError, http.client.HTTPException):
                errors += 1
                connection = http.client.HTTPConnection(HOST, port, timeout=120)
                continue
            if status != 200:
                errors += 1
                continue
            latencies.append(seconds)
            mismatches += answer != answers[i]
        with lock:
            totals["latencies"] += latencies
            totals["errors"] += errors
            totals["mismatches"] += mismatches

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(settings.clients)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        totals["rss"].append(server_rss(pid))
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    totals["wall_s"] = time.monotonic() - started
    return totals


def _post(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, Any, float]:
    started = time.perf_counter()
    connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    seconds = time.perf_counter() - started
    if response.status != 200:
        return response.status, payload.decode("utf-8", "replace"), seconds
    return 200, json.loads(payload)["predictions"], seconds


def _body(meta: dict[str, Any], settings: ServeLoadBench, seed: int) -> bytes:
    """One N-way K-shot request (random intensities, string labels, shuffled support), as JSON bytes."""
    rng = np.random.default_rng(seed)
    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    labels = [f"class-{seed}-{c}" for c in range(settings.n_way) for _ in range(settings.k_shot)]
    order = rng.permutation(len(labels))
    # 4 decimals, as `free serve request` writes pixels (float64, so that they print as 4 decimals).
    support = rng.random((len(labels), *shape)).round(4)
    query = rng.random((settings.n_way * settings.queries, *shape)).round(4)
    inputs = {"support_images": support.tolist(), "support_labels": [labels[i] for i in order],
              "query_images": query.tolist()}  # fmt: skip
    return json.dumps({"inputs": inputs}, separators=(",", ":")).encode()


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted values."""
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q * len(ordered))) - 1))]


def _mb(rss: int) -> float:
    return round(rss / 2**20, 1)


def render(result: dict[str, Any]) -> str:
    """The table docs/RELIABILITY.md shows."""
    s, rss = result["settings"], result["server_rss_mb"]
    return "\n".join(
        [
            f"serve-load: {s['clients']} clients x {s['seconds']:g} s, {s['n_way']}-way {s['k_shot']}-shot, "
            f"{s['n_way'] * s['queries']} queries/request, {result['request_bytes']} bytes/request",
            "| requests | req/s | p50 ms | p99 ms | max ms | errors | mismatches | RSS start/end/peak MB | stopped |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {result['requests']} | {result['requests_per_s']} | {result['latency_p50_ms']} | "
            f"{result['latency_p99_ms']} | {result['latency_max_ms']} | {result['errors']} | {result['mismatches']} | "
            f"{rss['start']} / {rss['end']} / {rss['peak']} | {result['server_stopped']} |",
        ]
    )
