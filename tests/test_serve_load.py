"""`free bench serve-load` (free/bench/serve_load.py): short runs against the real server (uvicorn
with MLflow's scoring app behind the guard) on loopback - no errors, every concurrent answer equal to
the answer the request gets alone, and the server stopped afterwards; the checks can fail."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from free.bench import serve_load

SMALL = serve_load.ServeLoadBench(clients=2, seconds=3, distinct=4, width=8, inner_steps=2)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_quantile_is_the_nearest_rank() -> None:
    values = sorted(np.random.default_rng(0).random(101).tolist())
    assert serve_load._quantile(values, 0.5) == values[50]
    assert serve_load._quantile(values, 0.99) == values[99]  # ceil(0.99 * 101) = 100th value
    assert serve_load._quantile([3.0], 0.99) == 3.0


def test_requests_are_distinct_and_reproducible() -> None:
    meta = {"channels": 1, "image_size": 28}
    bodies = [serve_load._body(meta, SMALL, seed) for seed in range(3)]
    assert len(set(bodies)) == 3 and bodies[0] == serve_load._body(meta, SMALL, 0)


@pytest.mark.slow
def test_short_load_has_no_errors_no_mismatches_and_stops_the_server() -> None:
    result = serve_load.run(SMALL, say=lambda _: None)
    assert result["requests"] > 0 and result["errors"] == 0 and result["mismatches"] == 0
    assert result["requests_per_s"] > 0 and result["latency_p50_ms"] <= result["latency_p99_ms"]
    assert result["server_stopped"] and _gone(result["server_pid"])


def test_concurrent_answers_match_and_the_checks_can_fail(tmp_path: Path) -> None:
    """The CI-sized load test (one server, 2 s of good load, 0.5 s per fault): concurrent clients get exactly
    the answers the requests get alone, with no error; then, as fault injection the server cannot produce by
    itself, references rotated by one must all count as mismatches and bodies the server refuses as
    errors; the server's process group is gone afterwards. The full run is `free bench serve-load`."""
    import http.client

    model_dir, meta = serve_load.save_model(tmp_path, SMALL, None)
    bodies = [serve_load._body(meta, SMALL, seed) for seed in range(SMALL.distinct)]
    server, port = serve_load.start_server(model_dir, tmp_path / "server.log", SMALL.startup_timeout)
    try:
        answers = [serve_load._post(http.client.HTTPConnection("127.0.0.1", port), b)[1] for b in bodies]
        short = serve_load.ServeLoadBench(**{**SMALL.__dict__, "seconds": 2.0})
        good = serve_load._load(port, bodies, answers, short, server.pid)
        assert len(good["latencies"]) > 0 and good["errors"] == 0 and good["mismatches"] == 0
        # The injected faults show in every request: a few requests each are enough.
        brief = serve_load.ServeLoadBench(**{**SMALL.__dict__, "seconds": 0.5})
        wrong = serve_load._load(port, bodies, answers[1:] + answers[:1], brief, server.pid)
        assert wrong["mismatches"] == len(wrong["latencies"]) > 0 and wrong["errors"] == 0
        refused = serve_load._load(port, [b"[" + b[1:] for b in bodies], answers, brief, server.pid)
        assert refused["errors"] > 0 and refused["latencies"] == []
    finally:
        assert serve_load.stop_server(server)
    assert _gone(server.pid)
