"""Orchestration pieces that need no running service: promotion gate, params.yaml, stack state,
progress file, the pyfunc's episode prediction. The live services are in test_orchestration.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.promotion import PromotionError, gate
from flows.tracking import flatten
from free import stack
from free.config import ConfigError, load_params, params_yaml, with_default_experiment
from free.serving import FewShotRequestError, predict_episode

REPO = Path(__file__).resolve().parents[1]


def _tags(acc1: float, acc5: float, ci: float = 0.01, split: str = "s") -> dict[str, str]:
    return {
        "metatest.5way_1shot.acc": str(acc1),
        "metatest.5way_1shot.ci95": str(ci),
        "metatest.5way_5shot.acc": str(acc5),
        "metatest.5way_5shot.ci95": str(ci),
        "dataset.splits_sha256": split,
    }


def test_gate_first_model_is_promoted() -> None:
    assert gate(_tags(0.5, 0.7), None).promote


def test_gate_uses_the_ci_of_the_difference() -> None:
    champion = _tags(0.80, 0.90, ci=0.03)
    margin = (0.03**2 * 2) ** 0.5  # 0.0424
    assert gate(_tags(0.80 - margin + 0.002, 0.90, ci=0.03), champion).promote
    rejected = gate(_tags(0.80 - margin - 0.002, 0.90, ci=0.03), champion)
    assert not rejected.promote and "5way_1shot" in rejected.reason and "5way_5shot" not in rejected.reason
    assert not gate(_tags(0.80, 0.90 - margin - 0.002, ci=0.03), champion).promote  # 5-shot counts too
    assert gate(_tags(0.95, 0.99, ci=0.03), champion).promote


def test_gate_force_and_incomparable_splits() -> None:
    champion = _tags(0.8, 0.9)
    forced = gate(_tags(0.1, 0.1), champion, force=True)
    assert forced.promote and forced.reason.startswith("forced")
    other_split = gate(_tags(0.9, 0.95, split="other"), champion)
    assert not other_split.promote and "different class split" in other_split.reason


def test_gate_names_a_missing_metric() -> None:
    incomplete = _tags(0.8, 0.9)
    del incomplete["metatest.5way_5shot.ci95"]
    with pytest.raises(PromotionError, match=r"challenger lacks tag metatest.5way_5shot.ci95"):
        gate(incomplete, _tags(0.8, 0.9))


def test_committed_params_yaml_is_the_tiny_composition_and_dvc_writes_the_same(tmp_path: Path, monkeypatch) -> None:
    from dvc.utils.hydra import compose_and_dump

    monkeypatch.setenv("FREE_DATA_DIR", "/somewhere/else")  # machine settings must not leak into the file
    ours = params_yaml(with_default_experiment([]))
    committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True)
    assert ours == (committed.stdout if committed.returncode == 0 else (REPO / "params.yaml").read_text())
    compose_and_dump(tmp_path / "p.yaml", str(REPO / "params"), None, "config", str(tmp_path), ["experiment=tiny"])
    assert (tmp_path / "p.yaml").read_text() == ours
    assert "/somewhere" not in ours and "root: omniglot" in ours


def test_params_file_then_environment_then_overrides(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("FREE_DATA_DIR", raising=False)  # make sets it; this test sets it itself below
    path = tmp_path / "params.yaml"
    path.write_text(params_yaml(["experiment=tiny", "paths.data_dir=/from/file"]))
    assert load_params(path).dataset.root == "/from/file/omniglot"
    monkeypatch.setenv("FREE_DATA_DIR", "/from/env")
    assert load_params(path).dataset.root == "/from/env/omniglot"
    cfg = load_params(path, ["paths.data_dir=/explicit", "evaluate.episodes=7"])
    assert (cfg.dataset.root, cfg.evaluate.episodes) == ("/explicit/omniglot", 7)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    path.write_text(path.read_text().replace("episodes: 20", "episodes: many"))
    with pytest.raises(ConfigError, match="episodes"):
        load_params(path)


def test_stage_reads_the_params_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(params_yaml(["experiment=tiny", "evaluate.episodes=13"]))
    shown = subprocess.run(
        [sys.executable, "-m", "free", "--params", str(path), "config", "show"], capture_output=True, text=True
    )
    assert shown.returncode == 0 and "episodes: 13" in shown.stdout


def test_credentials_are_generated_once_private_and_env_wins(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("FREE_S3_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("FREE_S3_SECRET_ACCESS_KEY", raising=False)
    settings = stack.StackSettings(state_dir=tmp_path)
    first = stack.credentials(settings)
    assert first == stack.credentials(settings) and len(first["AWS_SECRET_ACCESS_KEY"]) == 40
    assert (tmp_path / "credentials.env").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("FREE_S3_ACCESS_KEY_ID", "mine")
    monkeypatch.setenv("FREE_S3_SECRET_ACCESS_KEY", "secret")
    assert stack.credentials(settings)["AWS_ACCESS_KEY_ID"] == "mine"


def test_stack_refuses_a_taken_port_and_names_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = stack.StackSettings(state_dir=tmp_path, project_dir=tmp_path, s3_port=port)
        with pytest.raises(stack.StackError, match=f"s3: port {port} .* taken"):
            stack.up(settings, say=lambda line: None)
    assert stack.status(settings)["services"]["s3"]["running"] is False


def test_status_of_a_stopped_stack_exits_1_with_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "free", "stack", "status", "--json", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    report = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert {"prefect_api_url", "mlflow_tracking_uri", "s3_endpoint_url"} <= report.keys()
    assert not any(s["running"] for s in report["services"].values())


def test_progress_file_follows_the_bar(tmp_path: Path, monkeypatch) -> None:
    from free.progress import bar

    target = tmp_path / "progress.json"
    monkeypatch.setenv("FREE_PROGRESS_FILE", str(target))
    seen = []
    for i in bar(range(3), "work", 3):
        seen.append(i)
    assert seen == [0, 1, 2]
    assert json.loads(target.read_text()) == {"description": "work", "completed": 3, "total": 3}


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}


def _tiny_model(head: str = "linear"):
    from free.checkpoints import build_from_meta

    meta = {"arch": "conv4", "channels": 1, "n_classes": 5, "image_size": 28, "width": 8, "mean": [0.5],
            "std": [0.5], "track_running_stats": False, "head": head}  # fmt: skip
    torch.manual_seed(0)
    return build_from_meta(meta).eval(), meta


def test_predict_episode_maps_labels_and_matches_an_explicit_loop() -> None:
    from free.maml import logits, split_state

    model, meta = _tiny_model()
    rng = np.random.default_rng(0)
    support = rng.random((5, 1, 28, 28), dtype=np.float32)
    query = rng.random((4, 1, 28, 28), dtype=np.float32)
    labels = np.array([42, 7, 13, 99, 2])
    predicted = predict_episode(model, meta, support, labels, query, steps=3, lr=0.1)

    # Naive reference: relabel by sorted value, three explicit SGD steps on a copy of the weights.
    order = {v: i for i, v in enumerate(sorted(labels.tolist()))}
    y = torch.tensor([order[v] for v in labels.tolist()])
    params, buffers = split_state(model)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(logits(model, params, buffers, torch.from_numpy(support)), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        params = {
            k: (v - 0.1 * g).detach().requires_grad_(True) for (k, v), g in zip(params.items(), grads, strict=True)
        }
    with torch.no_grad():
        expected = logits(model, params, buffers, torch.from_numpy(query)).argmax(1).numpy()
    assert predicted.tolist() == [sorted(labels.tolist())[i] for i in expected]


def test_predict_episode_rejects_bad_requests() -> None:
    model, meta = _tiny_model()
    ok = np.zeros((5, 1, 28, 28), dtype=np.float32)
    with pytest.raises(FewShotRequestError, match=r"query_images must have shape \(n, 1, 28, 28\)"):
        predict_episode(model, meta, ok, np.arange(5), np.zeros((2, 3, 28, 28), np.float32), 1, 0.1)
    with pytest.raises(FewShotRequestError, match="at least 2 classes"):  # any N >= 2 is answered
        predict_episode(model, meta, ok, np.zeros(5, np.int64), ok, 1, 0.1)
    with pytest.raises(FewShotRequestError, match="4 support_labels for 5"):
        predict_episode(model, meta, ok, np.arange(4), ok, 1, 0.1)


@pytest.mark.parametrize("path", ["state/credentials.env", ".dvc/config.local"])
def test_credentials_files_are_git_ignored(path: str) -> None:
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path
