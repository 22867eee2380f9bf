"""Orchestration pieces that need no running service: promotion gate, params.yaml, stack state,
progress file, the pyfunc's episode prediction. The live services are in test_orchestration.py."""

from __future__ import annotations

import json
import logging
import os
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


def test_params_config_is_load_params_of_that_text(tmp_path: Path, monkeypatch) -> None:
    """The flow composes once and reads the config from the text it is about to write (params_config):
    the same config a stage gets from the written file, the environment's machine settings included."""
    from free.config import params_config

    monkeypatch.setenv("FREE_DATA_DIR", "/from/env")
    text = params_yaml(["experiment=tiny", "evaluate.episodes=9"])
    (tmp_path / "params.yaml").write_text(text)
    assert params_config(text) == load_params(tmp_path / "params.yaml")
    assert params_config(text).dataset.root == "/from/env/omniglot" and params_config(text).evaluate.episodes == 9
    with pytest.raises(ConfigError, match="episodes"):
        params_config(text.replace("episodes: 9", "episodes: many"))


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


# --- the flow free/full-pipeline: what `prefect deployment run --watch` shows, params.yaml, MLflow ---

RICH_BAR = "meta-training (free) ━━━━━━━━━━━━━━━━━━━╸━━━━━━━━━━━━━ 12/20 0:02:01 eta 0:01:20"
TQDM_BAR = "Downloading artifacts:  45%|████▌     | 9/20 [00:01<00:02,  4.50it/s]"


def test_stage_output_noise_outcome_and_summary() -> None:
    from flows.pipeline import error_line, is_noise, stage_outcome, stage_summary

    for noise in (RICH_BAR, TQDM_BAR, "Updating lock file 'dvc.lock'", "\tgit add dvc.lock", "Use `dvc push` to send"):
        assert is_noise(noise), noise
    for kept in ("omniglot: 242 classes, 4840 images", "ValueError: k_shot + q_query = 101", "> python -m free data",
                 "│ /p/free/data/episodes.py:76 in __init__ │", "ERROR: failed to reproduce 'metatest'"):  # fmt: skip
        assert not is_noise(kept), kept
    assert stage_outcome("data", ["Running stage 'data':", "> python -m free data build"]) == "ran"
    assert stage_outcome("data", ["Stage 'data' is cached - skipping run, checking out outputs"]) == "restored"
    assert stage_outcome("data", ["Stage 'data' didn't change, skipping"]) == "skipped"
    assert stage_outcome("teachers", ["Running stage 'data':"]) == "skipped"  # another stage's line
    assert stage_summary("metatrain", "ran", 234.56) == "stage metatrain: ran in 234.6 s"
    assert stage_summary("metatrain", "skipped", 0.9) == "stage metatrain: skipped (up to date)"
    # rich traceback frames: the file:line and code stay, the box drawing goes
    assert (
        error_line("│ /p/free/data/episodes.py:76 in __init__          │") == "/p/free/data/episodes.py:76 in __init__"
    )
    assert error_line("│ ❱  76 │   │   raise ValueError(      │") == "❱  76 │   │   raise ValueError("
    assert error_line("╰──────────────────────────────╯") == ""
    assert error_line("ValueError: bad") == "ValueError: bad"


def test_metrics_line() -> None:
    from flows.pipeline import metrics_line

    metrics = {
        "5way_1shot": {"acc": 0.6128, "ci95": 0.0488},
        "5way_5shot": {"acc": 0.7664, "ci95": 0.041},
        "episodes": 25,
    }
    assert metrics_line(metrics) == "metatest 5way_1shot 61.3% ± 4.9, 5way_5shot 76.6% ± 4.1 (25 episodes)"


class _Logged(list):
    def log(self, level: int, msg: str, *args, **kwargs) -> None:  # kwargs: exc_info
        self.append((level, msg % args))

    def debug(self, msg: str, *args, **kwargs) -> None:
        self.log(10, msg, *args)

    def info(self, msg: str, *args) -> None:
        self.log(20, msg, *args)


def _fake_reproduce(tmp_path: Path, script: str):
    """A stand-in for :func:`flows.stage_process.reproduce` whose stage command is ``script``: run as DVC
    runs a command (``run_shell``), its exit code raised as DVC raises it."""
    from dvc.exceptions import ReproductionError
    from dvc.stage.exceptions import StageCmdFailedError

    from flows import stage_process

    (tmp_path / "fake_stage.py").write_text(script)

    def reproduce(project: Path, stage: str, emit) -> None:
        emit(f"Running stage '{stage}':\n")
        code = stage_process.run_shell(f"{sys.executable} fake_stage.py", str(project), dict(os.environ), emit)
        if code != 0:
            cause = StageCmdFailedError(f"python -m free {stage}", code)
            raise ReproductionError(f"failed to reproduce '{stage}'") from cause

    return reproduce


def test_run_stage_logs_progress_at_debug_and_announces_one_line(tmp_path: Path, monkeypatch) -> None:
    import flows.pipeline as pipeline

    script = f"""import sys
print("> python -m free data build")
sys.stderr.write({RICH_BAR!r} + "\\r" + {RICH_BAR!r} + "\\n")
print("classes per split: train 150, val 40, test 52")
print("Updating lock file 'dvc.lock'")
"""
    logged, announced = _Logged(), []
    monkeypatch.setattr(pipeline.stage_process, "reproduce", _fake_reproduce(tmp_path, script))
    monkeypatch.setattr(pipeline, "get_run_logger", lambda: logged)
    monkeypatch.setattr(pipeline, "_announce", lambda *args: announced.append(args))
    info = pipeline.run_stage.fn(tmp_path, "data")
    assert info["outcome"] == "ran" and info["ran"] is True and info["seconds"] >= 0
    assert [text for level, text in logged if level == 10] == [RICH_BAR, RICH_BAR, "Updating lock file 'dvc.lock'"]
    assert [text for level, text in logged if level == 20][-2:] == [
        "classes per split: train 150, val 40, test 52",
        f"stage data: ran in {info['seconds']:.1f} s",
    ]
    assert announced == [("free.stage", "free.stage.data", logged[-1][1], {"free.stage.outcome": "ran"})]
    full = (tmp_path / pipeline.STAGE_LOGS / "data.log").read_text()
    assert full.count(RICH_BAR) == 2 and "Updating lock file" in full  # the full output, kept


def test_run_stage_failure_shows_the_tail_of_its_error(tmp_path: Path, monkeypatch) -> None:
    import flows.pipeline as pipeline

    script = """import sys
for i in range(30):
    print(f"line {i}")
sys.stderr.write("╭──── Traceback ────╮\\n│ /p/episodes.py:76 in __init__ │\\n╰───────────────────╯\\n")
sys.stderr.write("ValueError: k_shot + q_query = 101 but a class has only 20 images\\n")
sys.exit(1)
"""
    announced = []
    monkeypatch.setattr(pipeline.stage_process, "reproduce", _fake_reproduce(tmp_path, script))
    monkeypatch.setattr(pipeline, "get_run_logger", lambda: _Logged())
    monkeypatch.setattr(pipeline, "_announce", lambda *args: announced.append(args))
    with pytest.raises(pipeline.StageFailed, match=r"stage metatest FAILED after .* s \(full output in ") as err:
        pipeline.run_stage.fn(tmp_path, "metatest")
    ((event, resource, text, labels),) = announced
    lines = text.splitlines()
    assert lines[0].startswith("stage metatest FAILED after") and labels == {"free.stage.outcome": "failed"}
    assert len(lines) == 1 + pipeline.TAIL_LINES
    assert lines[-3:] == [
        "  /p/episodes.py:76 in __init__",
        "  ValueError: k_shot + q_query = 101 but a class has only 20 images",
        "  ERROR: failed to reproduce 'metatest': failed to run: python -m free metatest, exited with 1",
    ]
    assert "line 29" in text and "line 10" not in text
    assert str(err.value).endswith("exited with 1")


def test_params_yaml_is_written_for_the_run_and_put_back(tmp_path: Path, monkeypatch) -> None:
    import flows.pipeline as pipeline

    monkeypatch.setattr(pipeline, "get_run_logger", lambda: _Logged())
    committed = (REPO / "params.yaml").read_bytes()
    (tmp_path / "params.yaml").write_bytes(committed)
    tree = pipeline.write_params.fn(tmp_path, ["experiment=tiny", "evaluate.episodes=25"])
    assert tree["evaluate"]["episodes"] == 25 and b"episodes: 25" in (tmp_path / "params.yaml").read_bytes()
    assert pipeline.restore_params(tmp_path) is True
    assert (tmp_path / "params.yaml").read_bytes() == committed
    assert pipeline.restore_params(tmp_path) is False  # nothing left to put back
    # A run killed between the two: the next run puts the file back before anything else.
    pipeline.write_params.fn(tmp_path, ["experiment=tiny", "seed=7"])
    pipeline.write_params.fn(tmp_path, ["experiment=tiny", "seed=8"])  # keeps the first original, not seed=7
    assert pipeline.restore_params(tmp_path) is True
    assert (tmp_path / "params.yaml").read_bytes() == committed
    announced = []
    monkeypatch.setattr(pipeline, "_announce", lambda *args: announced.append(args))
    with pytest.raises(ConfigError):  # a bad override writes nothing, and says why in the watched output
        pipeline.write_params.fn(tmp_path, ["evaluate.episodes=many"])
    ((event, _, text, labels),) = announced
    assert (event, labels) == ("free.params", {"free.params.outcome": "failed"})
    assert text.startswith("params FAILED: ") and "episodes" in text
    assert (tmp_path / "params.yaml").read_bytes() == committed and not (tmp_path / pipeline.PARAMS_BEFORE).exists()


def test_experiment_is_created_and_kept_as_model_development(tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    from flows.tracking import ensure_experiment

    monkeypatch.chdir(tmp_path)  # the SQLite store's default artifact root is ./mlruns
    tracker = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    kind = "mlflow.experimentKind"
    created = ensure_experiment(tracker, "free")
    assert tracker.get_experiment(created).tags[kind] == "custom_model_development"
    old = tracker.create_experiment("made-before")  # e.g. by an earlier version of the flow: no tag
    assert ensure_experiment(tracker, "made-before") == old
    assert tracker.get_experiment(old).tags[kind] == "custom_model_development"
    chosen = tracker.create_experiment("genai", tags={kind: "genai_development"})
    ensure_experiment(tracker, "genai")
    assert tracker.get_experiment(chosen).tags[kind] == "genai_development"  # someone's explicit choice stays


def _dvc_project(root: Path, remote: Path) -> Path:
    """A DVC project (no git) with one tracked file and a local remote at ``remote``."""
    root.mkdir()
    for args in (["init", "--no-scm", "-q"], ["remote", "add", "-d", "here", str(remote)]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True)
    (root / "out.txt").write_text("an output\n")
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "out.txt"], cwd=root, check=True, capture_output=True)
    return root


def test_push_outputs_pushes_in_process_and_names_a_failure(tmp_path: Path, monkeypatch) -> None:
    """``push_outputs`` asks DVC in the flow's process (no ``dvc push`` process): it says what it pushed,
    that a second push had nothing to do, and a push that cannot write fails naming what DVC said."""
    import flows.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_logger", lambda: logging.getLogger("test.push"))
    project = _dvc_project(tmp_path / "p", tmp_path / "remote")
    assert pipeline.push_outputs.fn(project) == "dvc push: 1 file pushed"
    assert any((tmp_path / "remote").rglob("*")), "nothing in the remote"
    assert pipeline.push_outputs.fn(project) == "dvc push: everything is up to date"

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the remote's folder should be\n")
    other = _dvc_project(tmp_path / "q", blocked)
    with pytest.raises(RuntimeError, match="dvc push failed") as failed:
        pipeline.push_outputs.fn(other)
    print(failed.value)
    assert "not-a-folder" in str(failed.value), failed.value  # the remote it could not write


def test_the_forkserver_starts_early_only_when_a_stage_will_likely_run(tmp_path: Path) -> None:
    from flows.pipeline import likely_to_run

    text = "seed: 0\n"
    assert likely_to_run(tmp_path, text)  # a first run: no dvc.lock, no params.yaml
    (tmp_path / "params.yaml").write_text(text)
    assert likely_to_run(tmp_path, text)  # params written, nothing run yet
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    assert not likely_to_run(tmp_path, text)  # a no-op rerun
    assert likely_to_run(tmp_path, "seed: 1\n")  # other params for this run
    assert not likely_to_run(tmp_path, None)  # the overrides did not compose: the run fails next
