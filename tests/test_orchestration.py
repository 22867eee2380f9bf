"""The three front doors with the real services on loopback: the local stack (SeaweedFS S3, MLflow,
Prefect, deployment worker), ``prefect deployment run free/full-pipeline`` on the tiny preset,
``dvc repro`` / ``dvc exp run`` / push / pull through the S3 server, the MLflow registry, promotion
and the served pyfunc model; last, every command block of the README, each in a fresh shell.

One stack and one pipeline run per session, started as a new user does (``make stack-up``, ``make
run``) in a fresh copy of the project from git, on free ports with a private state folder, shared by
the tests below in file order; about 8 minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.pipeline import is_noise
from free import stack
from free.bench.pipeline import breakdown
from free.stack import free_port_block
from tests import helpers_stack

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "free-meta-learner"
# Recognisable S3 credentials for this module's stack: test_no_credential_leaks looks for them everywhere,
# this file among the tracked ones (so each is spelt here in two halves).
FAKE_KEY_ID, FAKE_SECRET = "FREEFAKE" + "KEYID7Q3", "free-fake-secret" + "-9d41c7e2b58a"
SECRETS = {"key id": FAKE_KEY_ID, "secret": FAKE_SECRET}


class CmdlineWatch(helpers_stack.CmdlineWatch):
    """:class:`tests.helpers_stack.CmdlineWatch` for this module's fake S3 credentials."""

    def __init__(self) -> None:
        super().__init__(SECRETS)


class Live:
    def __init__(self, project: Path, settings: stack.StackSettings, env: dict[str, str]) -> None:
        self.project, self.settings, self.env = project, settings, env
        self.cmdlines: CmdlineWatch | None = None

    def run(self, *argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return helpers_stack.run_checked(argv, self.project, self.env, check, timeout)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.settings.mlflow_tracking_uri)


_use_built_venv = helpers_stack.use_built_venv


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, real_omniglot_root: Path):
    """``make stack-up`` in a fresh copy, on free ports with a private state folder; stack down after."""
    root, project = helpers_stack.fresh_project(tmp_path_factory, "live")
    cache = root / "cache"
    _use_built_venv(project)
    settings = helpers_stack.free_port_settings(root, project)
    # What the test machine decides (ports, state, cache, which checkout); the data are the copy's own.
    machine = {
        "FREE_STATE_DIR": str(settings.state_dir),
        "FREE_CACHE_DIR": str(cache),
        "FREE_CONFIG_DIR": str(project / "params"),
        "FREE_PREFECT_PORT": str(settings.prefect_port),
        "FREE_MLFLOW_PORT": str(settings.mlflow_port),
        "FREE_S3_PORT": str(settings.s3_port),
        "FREE_S3_AUX_PORT": str(settings.aux_port),
    }
    # The stack's credentials file, made before its first start as `up` would (0600), with fakes
    # test_no_credential_leaks can recognise.
    settings.state_dir.mkdir(mode=0o700)
    stack.write_private(
        settings.state_dir / "credentials.env",
        f"AWS_ACCESS_KEY_ID={FAKE_KEY_ID}\nAWS_SECRET_ACCESS_KEY={FAKE_SECRET}\n".encode(),
    )
    cmdlines = CmdlineWatch()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in machine.items():
            mp.setenv(key, value)
        for key in ("FREE_DATA_DIR", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "FREE_S3_ENDPOINT_URL",
                    "FREE_S3_ACCESS_KEY_ID", "FREE_S3_SECRET_ACCESS_KEY"):  # fmt: skip
            mp.delenv(key, raising=False)
        try:
            shell = Live(project, settings, dict(os.environ))
            shell.run("make", "stack-up", timeout=900)
            env = {
                **os.environ,
                **stack.client_env(settings),
                "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            }
            ready = Live(project, settings, env)
            ready.cmdlines = cmdlines
            yield ready
        finally:
            cmdlines.stop()
            stack.down(settings, say=lambda line: None)


@pytest.fixture(scope="module")
def pipeline_run(live: Live) -> subprocess.CompletedProcess:
    """``make run``: the stack is up already (left alone), then the deployment runs the tiny pipeline."""
    started = time.time()
    proc = live.run("make", "run", timeout=900)
    print(f"make run: {time.time() - started:.0f} s")
    return proc


STAGES = ("data", "teachers", "metatrain", "metatest")


def _stage_lines(watched: str) -> dict[str, list[str]]:
    """The ``free.stage`` lines of a ``--watch`` output, per stage (the flow emits one per stage)."""
    found: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for line in watched.splitlines():
        match = re.search(r"free\.stage \* stage (\w+)(:| FAILED)", line)
        if match:
            found[match.group(1)].append(line[match.start() + len("free.stage * ") :])
    return found


def _flat(text: str) -> str:
    """Whitespace collapsed: rich wraps long lines of the watched output at the terminal width."""
    return " ".join(text.split())


def _git_changes(project: Path) -> tuple[list[str], set[str]]:
    """(changed tracked files, untracked files) of the project copy, from ``git status --porcelain``."""
    lines = subprocess.run(
        ["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return [x for x in lines if not x.startswith("?? ")], {x[3:] for x in lines if x.startswith("?? ")}


RUN_RESULTS = {"dvc.lock", "artifacts/metrics/metatest.json"}  # untracked: DVC's lock and cache: false metric


def _lock(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"]


def _out_hashes(project: Path) -> dict[str, str]:
    files = sorted(p for p in (project / "artifacts").rglob("*") if p.is_file() and ".state" not in p.parts)
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_stack_reports_where_things_run(live: Live) -> None:
    proc = live.run(str(BIN / "free"), "stack", "status", "--json", "--state-dir", str(live.settings.state_dir))
    report = json.loads(proc.stdout)
    assert report["prefect_api_url"] == f"http://127.0.0.1:{live.settings.prefect_port}/api"
    assert report["mlflow_tracking_uri"] == f"http://127.0.0.1:{live.settings.mlflow_port}"
    assert report["s3_endpoint_url"] == f"http://127.0.0.1:{live.settings.s3_port}"
    assert all(s["healthy"] for s in report["services"].values()), report["services"]
    credentials = live.settings.state_dir / "credentials.env"
    assert credentials.stat().st_mode & 0o077 == 0  # readable by the owner only
    assert live.settings.state_dir.stat().st_mode & 0o077 == 0  # and the logs and databases beside it
    assert (live.project / ".dvc" / "config.local").stat().st_mode & 0o077 == 0  # the DVC remote's keys


def test_stack_up_twice_keeps_the_running_services(live: Live) -> None:
    before = {k: v["pid"] for k, v in stack.status(live.settings)["services"].items()}
    lines: list[str] = []
    stack.up(live.settings, say=lines.append)
    after = {k: v["pid"] for k, v in stack.status(live.settings)["services"].items()}
    assert before == after
    assert all("already running" in line for line in lines), lines


def test_watched_output_is_one_line_per_stage_and_the_metrics(live: Live, pipeline_run) -> None:
    watched = pipeline_run.stdout
    lines = _stage_lines(watched)
    for stage in STAGES:  # a fresh copy: every stage runs
        assert len(lines[stage]) == 1 and re.fullmatch(rf"stage {stage}: ran in \d+\.\d s", lines[stage][0]), lines
    assert not [line for line in watched.splitlines() if is_noise(line)], watched
    assert "artifact.updated" not in watched and "━" not in watched  # no progress artifacts or bars
    metrics = json.loads((live.project / "artifacts" / "metrics" / "metatest.json").read_text())
    shown = f"{metrics['5way_1shot']['acc'] * 100:.1f}% ± {metrics['5way_1shot']['ci95'] * 100:.1f}"
    assert f"free.pipeline * metatest 5way_1shot {shown}" in _flat(watched), watched
    assert _flat(watched).index("free.pipeline *") < _flat(watched).index("Flow run finished successfully")


def test_deployment_runs_the_tiny_pipeline_and_registers_a_challenger(live: Live, pipeline_run) -> None:
    assert "Completed" in pipeline_run.stdout
    client = live.client()
    version = client.get_model_version_by_alias(MODEL, "challenger")
    parent = client.get_run(version.tags["mlflow.run_id"])
    assert parent.info.status == "FINISHED"
    # MLflow 3's UI opens the experiment on its runs (not the GenAI view) with this tag.
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert "params.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.params["teachers.n_teachers"] == "4"  # the tiny preset, flattened
    for key in ("git.commit", "dvc.lock_sha256", "dataset.splits_sha256", "teachers.zoo_sha256"):
        assert len(version.tags[key]) >= 40, key
    assert version.tags["dvc.lock_sha256"] == hashlib.sha256((live.project / "dvc.lock").read_bytes()).hexdigest()
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == ["data", "metatest", "metatrain", "teachers"]
    for child in children:  # each stage's full output, progress redraws included
        assert [a.path for a in client.list_artifacts(child.info.run_id, "logs")] == [f"logs/{child.info.run_name}.log"]
    metatrain = next(r for r in children if r.info.run_name == "metatrain")
    curve = client.get_metric_history(metatrain.info.run_id, "query_acc")
    assert [m.step for m in curve] == list(range(1, 21))  # tiny: 20 meta-iterations, one point each
    artifacts = {a.path for a in client.list_artifacts(metatrain.info.run_id, "generator")}
    assert "generator/samples" in artifacts
    metrics = json.loads((live.project / "artifacts" / "metrics" / "metatest.json").read_text())
    assert float(version.tags["metatest.5way_1shot.acc"]) == pytest.approx(metrics["5way_1shot"]["acc"])
    assert parent.data.metrics["acc_5way_5shot"] == pytest.approx(metrics["5way_5shot"]["acc"])


def test_a_noop_rerun_keeps_the_challenger_version(live: Live, pipeline_run) -> None:
    client = live.client()
    version = client.get_model_version_by_alias(MODEL, "challenger").version
    versions = {v.version for v in client.search_model_versions(f"name = '{MODEL}'")}
    started, wall = time.monotonic(), time.time()
    rerun = live.run(str(BIN / "prefect"), "deployment", "run", "free/full-pipeline", "--watch")
    seconds = time.monotonic() - started
    print(f"no-op rerun through the deployment: {seconds:.1f} s")
    # `free bench pipeline`'s split of the run into parts, from the API's timestamps: they add up to the
    # wall time, and every task of the flow is there.
    parts = breakdown(live.settings.prefect_api_url, rerun.stdout, wall, wall + seconds)
    print(f"parts: {parts}")
    # The parts add up to the CLI's span by construction; what can be wrong is their order: each is an
    # interval between the API's timestamps, inside the CLI's run, and the tasks fit inside the flow.
    spans = ("cli_to_created", "created_to_running", "flow", "after_end")
    assert all(parts[key] >= 0 for key in spans), parts
    assert parts["untasked"] <= parts["flow"], parts
    names = [name for name, _ in parts["tasks"]]
    assert names.count("track_stage") == 4 and {"push_outputs", "register", "open_tracking"} <= set(names), names
    assert parts["untasked"] >= 0, parts
    assert [lines[0] for lines in _stage_lines(rerun.stdout).values()] == [
        f"stage {s}: skipped (up to date)" for s in STAGES
    ], rerun.stdout
    assert f"free.model * unchanged: challenger stays version {version} (same outputs)" in _flat(rerun.stdout)
    # Same outputs: no new version, the alias stays; the rerun's parent run names the version it kept.
    assert client.get_model_version_by_alias(MODEL, "challenger").version == version
    assert {v.version for v in client.search_model_versions(f"name = '{MODEL}'")} == versions
    experiment = client.get_experiment_by_name("free")
    newest = client.search_runs([experiment.experiment_id], "tags.`model.unchanged` = 'true'")
    assert newest and newest[0].info.status == "FINISHED", newest
    assert newest[0].data.tags["model.version"] == version


def test_dvc_repro_after_the_flow_runs_nothing(live: Live, pipeline_run) -> None:
    lock = (live.project / "dvc.lock").read_text()
    proc = live.run(str(BIN / "dvc"), "repro")
    assert "Running stage" not in proc.stdout, proc.stdout
    assert "up to date" in proc.stdout
    assert (live.project / "dvc.lock").read_text() == lock


def test_push_delete_pull_restores_identical_outputs(live: Live, pipeline_run) -> None:
    assert "in sync" in live.run(str(BIN / "dvc"), "status", "--cloud").stdout  # the flow pushed already
    before = _out_hashes(live.project)
    shutil.rmtree(live.project / ".dvc" / "cache")
    for out in ("teachers", "metalearner", "generator", "taskcache"):
        shutil.rmtree(live.project / "artifacts" / out)
    live.run(str(BIN / "dvc"), "pull")
    assert _out_hashes(live.project) == before
    assert "up to date" in live.run(str(BIN / "dvc"), "status").stdout


def test_changing_one_parameter_reruns_only_the_stages_that_read_it(live: Live, pipeline_run) -> None:
    # Through DVC's Hydra integration: composes params/ with the override and rewrites params.yaml.
    proc = live.run(str(BIN / "dvc"), "exp", "run", "-S", "experiment=tiny", "-S", "evaluate.episodes=10")
    ran = {
        stage for stage in ("data", "teachers", "metatrain", "metatest") if f"Running stage '{stage}'" in proc.stdout
    }
    assert ran == {"metatest"}, proc.stdout
    assert yaml.safe_load((live.project / "params.yaml").read_text())["evaluate"]["episodes"] == 10
    assert json.loads((live.project / "artifacts" / "metrics" / "metatest.json").read_text())["episodes"] == 10
    # Back to the committed params: DVC restores the metatest outputs from its cache, runs nothing.
    live.run("git", "checkout", "params.yaml")
    live.run(str(BIN / "dvc"), "repro")
    assert json.loads((live.project / "artifacts" / "metrics" / "metatest.json").read_text())["episodes"] == 20


def _episode(project: Path, env: dict[str, str], n_way: int = 5, queries: int = 3):
    """A real 5-way 1-shot episode of meta-test classes, labels renamed to arbitrary values."""
    from free.config import load_params
    from free.data import load_splits

    os.environ["FREE_CACHE_DIR"] = env["FREE_CACHE_DIR"]
    cfg = load_params(project / "params.yaml")
    split = load_splits(cfg.dataset, cfg.paths.cache_dir)["test"]
    images = split.images.float() / 255.0  # uint8 -> the [0, 1] intensities the model takes
    rng = np.random.default_rng(3)
    classes = rng.choice(split.n_classes, n_way, replace=False)
    support, query, labels, query_labels = [], [], [], []
    for label, c in zip([40, 7, 13, 99, 2], classes, strict=True):
        idx = np.flatnonzero(split.labels.numpy() == c)[: 1 + queries]
        support.append(images[idx[0]].numpy())
        query.extend(images[i].numpy() for i in idx[1:])
        labels.append(label)
        query_labels.extend([label] * queries)
    return {
        "support_images": np.stack(support).astype(np.float32),
        "support_labels": np.array(labels, dtype=np.int64),
        "query_images": np.stack(query).astype(np.float32),
    }, np.array(query_labels)


def test_registered_pyfunc_predicts_like_the_core_and_is_served(live: Live, pipeline_run, monkeypatch) -> None:
    import mlflow

    from free.checkpoints import load_classifier
    from free.config import load_params
    from free.serving import predict_episode

    for key in ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.setenv(key, live.env[key])
    mlflow.set_tracking_uri(live.settings.mlflow_tracking_uri)
    request, truth = _episode(live.project, live.env)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@challenger")
    predicted = np.asarray(model.predict(request))

    cfg = load_params(live.project / "params.yaml")
    network, meta = load_classifier(live.project / "artifacts" / "metalearner" / "metalearner.safetensors")
    reference = predict_episode(network, meta, **request, steps=cfg.evaluate.inner_steps, lr=cfg.metalearn.inner_lr)
    assert predicted.tolist() == reference.tolist()
    assert set(predicted.tolist()) <= set(request["support_labels"].tolist())
    assert (predicted == truth).mean() > 0.2  # above chance on real meta-test classes (5-way: 0.2)

    port = free_port_block(1)
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@challenger", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=live.project, env=live.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        body = json.dumps({"inputs": {k: v.tolist() for k, v in request.items()}}).encode()
        answer = None
        for _ in range(120):
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
                )
                answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
                break
            except OSError:
                assert server.poll() is None, "mlflow models serve exited"
                time.sleep(1)
        assert answer is not None and answer["predictions"] == reference.tolist()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _register_copy(client, source_version, acc: tuple[float, float], ci: float = 0.02) -> str:
    """A new version of the same model files with the given meta-test accuracies, made challenger."""
    new = client.create_model_version(
        MODEL, source_version.source, run_id=source_version.run_id, model_id=source_version.source.split("/")[-1]
    )  # the source is models:/<logged model id> (MLflow 3), which the server wants named
    tags = {k: v for k, v in source_version.tags.items() if not k.startswith("promotion.")}
    tags.update({"metatest.5way_1shot.acc": str(acc[0]), "metatest.5way_5shot.acc": str(acc[1])})
    tags.update({"metatest.5way_1shot.ci95": str(ci), "metatest.5way_5shot.ci95": str(ci)})
    for key, value in tags.items():
        client.set_model_version_tag(MODEL, new.version, key, value)
    client.set_registered_model_alias(MODEL, "challenger", new.version)
    return new.version


def test_promotion_gate_both_ways(live: Live, pipeline_run) -> None:
    client = live.client()
    free_cli = str(BIN / "free")
    first = client.get_model_version_by_alias(MODEL, "challenger")
    # The first model becomes champion.
    assert "promoted to champion" in live.run(free_cli, "promote").stdout
    assert client.get_model_version_by_alias(MODEL, "champion").version == first.version
    champion_acc = float(first.tags["metatest.5way_1shot.acc"]), float(first.tags["metatest.5way_5shot.acc"])
    ci = float(first.tags["metatest.5way_1shot.ci95"])

    # Clearly worse on 1-shot (beyond the CI of the difference): rejected, champion stays, reason recorded.
    worse = _register_copy(client, first, (champion_acc[0] - 3 * ci - 0.05, champion_acc[1]))
    rejected = live.run(free_cli, "promote", check=False)
    assert rejected.returncode == 3, rejected.stdout + rejected.stderr
    assert client.get_model_version_by_alias(MODEL, "champion").version == first.version
    tags = client.get_model_version(MODEL, worse).tags
    assert tags["promotion.decision"] == "rejected" and "5way_1shot" in tags["promotion.reason"]

    # Forced through the Prefect promote flow: promoted, and the force is recorded.
    live.run(str(BIN / "prefect"), "deployment", "run", "promote/promote", "-p", "force=true", "--watch")
    assert client.get_model_version_by_alias(MODEL, "champion").version == worse
    assert client.get_model_version(MODEL, worse).tags["promotion.forced"] == "true"

    # Slightly lower but within the CI: promoted. No version was deleted along the way.
    within = _register_copy(client, first, (champion_acc[0] - 3 * ci - 0.05 - 0.01, champion_acc[1]))
    assert "promoted to champion" in live.run(free_cli, "promote").stdout
    assert client.get_model_version_by_alias(MODEL, "champion").version == within
    versions = {v.version for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert {first.version, worse, within} <= versions


def test_failed_flow_keeps_earlier_stages_and_a_rerun_resumes(live: Live, pipeline_run) -> None:
    prefect = str(BIN / "prefect")
    before = _lock(live.project)
    # A real failure in the last stage: more query images than a meta-test class has (ValueError). (A 6-way
    # meta-test of the 5-way meta-learner used to fail; it works now: free.maml.head_for_classes.)
    failed = live.run(
        prefect, "deployment", "run", "free/full-pipeline", "-p", 'overrides=["evaluate.q_query=100"]', "--watch",
        check=False,
    )  # fmt: skip
    assert failed.returncode != 0 and "Failed" in failed.stdout
    # The watched output (what `make run` shows) names the stage and ends its tail with the exception.
    watched = failed.stdout
    assert [len(lines) for lines in _stage_lines(watched).values()] == [1, 1, 1, 1], watched
    assert _stage_lines(watched)["metatest"][0].startswith("stage metatest FAILED after"), watched
    stage_log = (live.project / ".dvc" / "tmp" / "free-stage-logs" / "metatest.log").read_text()
    error = [line for line in stage_log.splitlines() if re.match(r"\w+Error: ", line)][-1]
    assert _flat(error) in _flat(watched), watched
    assert _flat(watched).index("stage metatest FAILED") < _flat(watched).index(_flat(error))
    assert _flat(watched).index(_flat(error)) < _flat(watched).index("Flow run finished in state 'Failed'")
    # The run's overrides never stay in the tracked params.yaml, also when it fails.
    changed, untracked = _git_changes(live.project)
    assert changed == [] and untracked <= RUN_RESULTS, (changed, untracked)
    after = _lock(live.project)
    assert {s: after[s] for s in ("data", "teachers", "metatrain")} == {
        s: before[s] for s in ("data", "teachers", "metatrain")
    }
    assert (live.project / "artifacts" / "metalearner" / "metalearner.safetensors").is_file()
    client = live.client()
    experiment = client.get_experiment_by_name("free")
    newest = client.search_runs([experiment.experiment_id], "tags.`pipeline.overrides` LIKE '%q_query=100%'")
    assert newest and newest[0].info.status == "FAILED"
    failed_stage = client.search_runs(
        [experiment.experiment_id],
        f"tags.mlflow.parentRunId = '{newest[0].info.run_id}' and attributes.run_name = 'metatest'",
    )
    assert failed_stage and failed_stage[0].info.status == "FAILED"
    assert [a.path for a in client.list_artifacts(failed_stage[0].info.run_id, "logs")] == ["logs/metatest.log"]

    # Rerun with another override: resumes (only metatest, which reads it, runs), and leaves git clean.
    versions_before = [v.version for v in client.search_model_versions(f"name = '{MODEL}'")]
    rerun = live.run(
        prefect, "deployment", "run", "free/full-pipeline", "-p", 'overrides=["evaluate.episodes=12"]', "--watch"
    )
    shown = {stage: lines[0] for stage, lines in _stage_lines(rerun.stdout).items()}
    assert [shown[s] for s in ("data", "teachers", "metatrain")] == [
        f"stage {s}: skipped (up to date)" for s in ("data", "teachers", "metatrain")
    ], rerun.stdout
    assert re.fullmatch(r"stage metatest: ran in \d+\.\d s", shown["metatest"]), rerun.stdout
    changed, untracked = _git_changes(live.project)
    assert changed == [] and untracked <= RUN_RESULTS, (changed, untracked)
    # Other meta-test metrics, so another model: a new version (the flow registers only a changed one).
    challenger = client.get_model_version_by_alias(MODEL, "challenger")
    assert int(challenger.version) == max(int(v) for v in versions_before) + 1, (challenger.version, versions_before)
    assert f"registered: challenger is version {challenger.version}" in _flat(rerun.stdout)
    parent = challenger.tags["mlflow.run_id"]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    ran = {r.info.run_name: r.data.tags["stage.ran"] for r in children}
    assert [ran["data"], ran["teachers"], ran["metatrain"], ran["metatest"]] == ["False", "False", "False", "True"]
    assert json.loads((live.project / "artifacts" / "metrics" / "metatest.json").read_text())["episodes"] == 12
    # The overrides are in MLflow (tag + the run's params.yaml); the workspace keeps the committed file,
    # so DVC now sees metatest's outputs as made with other params: the next repro reruns (or restores) it.
    run = client.get_run(parent)
    assert run.data.tags["pipeline.overrides"] == "experiment=tiny evaluate.episodes=12"
    logged = yaml.safe_load(
        Path(client.download_artifacts(parent, "params.yaml", str(live.project / ".dvc" / "tmp"))).read_text()
    )
    assert logged["evaluate"]["episodes"] == 12
    assert yaml.safe_load((live.project / "params.yaml").read_text())["evaluate"]["episodes"] != 12
    status = live.run(str(BIN / "dvc"), "status").stdout
    assert "metatest:" in status and not any(f"{s}:" in status for s in ("data", "teachers", "metatrain")), status


def _fresh_shell_env() -> dict[str, str]:
    """A new terminal: no virtual environment on PATH, no client settings; only what the test machine
    decides (ports, state folder, cache, which checkout), as the fixture set it."""
    path = [p for p in os.environ["PATH"].split(os.pathsep) if p and Path(p).resolve() != BIN.resolve()]
    kept = ("HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "FREE_STATE_DIR", "FREE_CACHE_DIR", "FREE_CONFIG_DIR",
            "FREE_PREFECT_PORT", "FREE_MLFLOW_PORT", "FREE_S3_PORT", "FREE_S3_AUX_PORT")  # fmt: skip
    return {**{k: os.environ[k] for k in kept if k in os.environ}, "PATH": os.pathsep.join(path), "COLUMNS": "120"}


def _bash(live: Live, script: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-eo", "pipefail", "-c", script],
        cwd=live.project, env=_fresh_shell_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_every_readme_block_runs_as_written_in_a_fresh_shell(live: Live, pipeline_run) -> None:
    """After `make run` (the fixtures), each README bash block, in order, in a new shell that starts
    with the README's new-shell lines. Not run: blocks marked as hours long or needing a GPU, and the
    long-running model server, which the test starts itself (on a free port instead of 5001)."""
    from tests.test_docs import readme_blocks

    blocks = readme_blocks()
    prelude = next(b.code for b in blocks if b.new_shell)
    assert str(BIN) not in _bash(live, "command -v free || true").stdout  # a new shell: not ours until activated
    assert "Next: .venv/bin/free promote" in pipeline_run.stdout and "MLflow UI" in pipeline_run.stdout
    s3_lines = [line for line in pipeline_run.stdout.splitlines() if line.strip().startswith("S3 ")]
    assert s3_lines and not any("http" in line for line in s3_lines), s3_lines  # no printed link that answers 403
    port = free_port_block(1)
    server = subprocess.Popen(
        ["bash", "-c", f"{prelude}\nexec free serve model -p {port}"],
        cwd=live.project, env=_fresh_shell_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        for block in blocks:
            if block.skip_reason or block.new_shell:
                continue
            code = block.code.replace("localhost:5001", f"localhost:{port}")
            if "localhost:" in code:
                _wait_for(f"http://127.0.0.1:{port}/ping", server)
            done = _bash(live, f"{prelude}\n{code}")
            said = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            assert done.returncode == 0, f"README line {block.line} exited {done.returncode}:\n{code}\n{said}"
            if "free serve request" in code:
                assert '"predictions": ["' in done.stdout and "INVALID_PARAMETER_VALUE" in done.stdout, done.stdout
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    changed, _ = _git_changes(live.project)
    assert changed == [], changed  # following the README leaves the tracked files as they were


def _wait_for(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"free serve model exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def _leaks(label: str, data: bytes) -> list[str]:
    return helpers_stack.leaks(label, data, SECRETS)


def _leaks_in(folder: Path) -> list[str]:
    return helpers_stack.leaks_in(folder, SECRETS)


def test_no_credential_leaks(live: Live, pipeline_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Last, after every run of the module: the fake S3 credentials appear nowhere but in the files
    that must hold them, owner-only (issue 13, item 4)."""
    found: list[str] = []
    # MLflow: every run's params, tags and artifacts; every model version's tags and files.
    import mlflow

    client = live.client()
    hits, n_runs = helpers_stack.mlflow_leaks(client, SECRETS, tmp_path, MODEL)
    assert n_runs >= 5, n_runs  # the pipeline's parent and stage runs at least
    found += hits
    monkeypatch.chdir(tmp_path)  # whatever MLflow may create by itself lands here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", live.settings.mlflow_tracking_uri)  # models:/ resolves through it
    source = client.get_model_version_by_alias(MODEL, "challenger").source
    model = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "model")))
    found += _leaks_in(model)

    # Prefect: every flow run's parameters, every log line.
    hits, flow_runs, n_logs = helpers_stack.prefect_leaks(live.settings.prefect_api_url, SECRETS)
    assert flow_runs, "no flow runs"
    assert n_logs > 0
    found += hits

    # Tracked files, and process command lines sampled since before `make stack-up`.
    found += helpers_stack.tracked_leaks(live.project, SECRETS)
    assert live.cmdlines is not None and live.cmdlines.samples > 10
    found += [f"command line of pid {hit}" for hit in live.cmdlines.hits]

    # Files that may hold one: owner-only. The stack's logs never show the secret.
    holders = [live.project / ".dvc" / "config.local"]
    holders += [p for p in live.settings.state_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    for path in holders:
        data = path.read_bytes()
        if _leaks("", data) and path.stat().st_mode & 0o077:
            found.append(f"{path} holds a credential with mode {path.stat().st_mode & 0o777:o}")
        if path.is_relative_to(live.settings.state_dir / "logs"):
            found += [hit for hit in _leaks(f"stack log {path}", data) if hit.endswith("secret")]
    local = (live.project / ".dvc" / "config.local").read_text()
    assert FAKE_KEY_ID in local and FAKE_SECRET in local  # the DVC remote's keys are where DVC reads them
    assert found == [], "\n".join(found)
