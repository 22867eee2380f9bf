"""Meta-testing: vmap equals the loop, episodes are reproducible, adaptation helps, the stage writes its metrics."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import free.stages.metatest as stage
from free.checkpoints import CheckpointError, classifier_meta, save_classifier
from free.config import compose
from free.config.schema import Config, EvaluateConfig
from free.data.episodes import EpisodeSampler
from free.data.splits import FewShotSplit
from free.evaluate import episode_accuracies, evaluate, metatest, query_logits, summarize
from free.maml import split_state
from free.models import build_classifier

# Small models: one torch thread is faster than two and independent of earlier tests (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def learner(n_way: int = 5, width: int = 8, seed: int = 0, mean: float = 0.5, std: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_classifier("conv4", 1, n_way, 28, width, [mean], [std], track_running_stats=False).eval()


def noise_split(n_classes: int = 10, per_class: int = 6, seed: int = 0) -> FewShotSplit:
    """Random images: no learnable structure, only for comparing implementations."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_classes * per_class, 1, 28, 28), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return FewShotSplit("test", images, labels, [f"noise{c}" for c in range(n_classes)])


def intensity_split(n_classes: int = 10, per_class: int = 8, seed: int = 0) -> FewShotSplit:
    """Class ``c`` = a flat grey image of intensity ``~25 c`` plus small noise: solvable from one shot."""
    gen = torch.Generator().manual_seed(seed)
    level = (torch.arange(n_classes) * (240 // (n_classes - 1))).repeat_interleave(per_class)
    noise = torch.randint(0, 8, (n_classes * per_class, 1, 28, 28), generator=gen)
    images = (level.view(-1, 1, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return FewShotSplit("test", images, labels, [f"grey{c}" for c in range(n_classes)])


# ---- core ------------------------------------------------------------------------------------


def test_vmap_matches_python_loop() -> None:
    model = learner()
    params, buffers = split_state(model)
    episodes = EpisodeSampler(noise_split(), n_way=5, k_shot=2, q_query=3, seed=1).sample(5)
    fast = query_logits(model, params, buffers, episodes, inner_steps=3, inner_lr=0.4, vectorised=True)
    slow = query_logits(model, params, buffers, episodes, inner_steps=3, inner_lr=0.4, vectorised=False)
    assert fast.shape == (5, 15, 5)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    # Adaptation changed the logits (otherwise agreement would be trivial).
    unadapted = query_logits(model, params, buffers, episodes, inner_steps=0, inner_lr=0.4)
    assert (fast - unadapted).abs().max() > 1e-2
    a_fast = episode_accuracies(model, params, buffers, episodes, 3, 0.4, vectorised=True)
    a_slow = episode_accuracies(model, params, buffers, episodes, 3, 0.4, vectorised=False)
    assert a_fast.shape == (5,)
    assert (a_fast - a_slow).abs().max().item() <= 1e-6
    # The initialisation is shared by the episodes, not modified by adapting.
    for name, p in model.named_parameters():
        assert torch.equal(params[name], p.detach())


def test_evaluate_is_chunking_invariant_and_seeded() -> None:
    model = learner(seed=3)
    params, buffers = split_state(model)
    split = noise_split()

    def run(batch: int, seed: int = 7, vectorised: bool = True) -> torch.Tensor:
        return evaluate(model, params, buffers, split, 5, 1, 3, 20, 2, 0.4, seed, batch, vectorised=vectorised)

    in_chunks = run(7)
    assert in_chunks.shape == (20,)
    assert torch.equal(in_chunks, run(20))
    assert torch.equal(in_chunks, run(7, vectorised=False))
    assert torch.equal(in_chunks, run(7))  # same seed, same result
    assert not torch.equal(in_chunks, run(7, seed=8))  # another seed draws other episodes


def test_evaluate_reports_progress_per_chunk() -> None:
    model = learner()
    params, buffers = split_state(model)
    seen = []

    def progress(items, description, total):
        seen.append((description, total))
        yield from items

    accs = evaluate(model, params, buffers, noise_split(), 5, 1, 1, 5, 0, 0.1, 0, 2, progress=progress)
    assert accs.shape == (5,)
    assert seen == [("meta-test 5way_1shot", 3)]


def test_summarize_matches_hand_computation() -> None:
    accs = torch.tensor([0.2, 0.4, 0.6, 1.0])
    mean = (0.2 + 0.4 + 0.6 + 1.0) / 4  # 0.55
    var = sum((a - mean) ** 2 for a in (0.2, 0.4, 0.6, 1.0)) / 3  # Bessel: divide by E - 1 (= 0.35 / 3)
    result = summarize(accs)
    assert result["acc"] == pytest.approx(0.55)
    assert result["ci95"] == pytest.approx(1.96 * math.sqrt(var) / 2)
    assert result["ci95"] == pytest.approx(0.33473, abs=1e-5)  # sqrt(0.35 / 3) * 1.96 / 2
    assert summarize(torch.tensor([0.8])) == {"acc": pytest.approx(0.8), "ci95": 0.0}
    assert isinstance(result["acc"], float) and isinstance(result["ci95"], float)


def test_adaptation_solves_a_learnable_task_and_no_adaptation_is_chance() -> None:
    split = intensity_split()
    model = learner(width=16, seed=5, mean=0.5, std=0.3)
    params, buffers = split_state(model)

    def mean_acc(steps: int) -> float:
        return evaluate(model, params, buffers, split, 5, 1, 3, 20, steps, 0.5, seed=0, episode_batch=10).mean().item()

    assert mean_acc(0) < 0.4  # random init: near chance (1/5)
    assert mean_acc(15) > 0.75  # adapted on one shot per class: well above chance (0.9-0.98 over init seeds)


def test_metatest_keys_seeds_and_values() -> None:
    model = learner()
    params, buffers = split_state(model)
    ev = EvaluateConfig(episodes=4, n_way=5, shots=[1, 2], q_query=2, inner_steps=1, episode_batch=3, seed=11)
    result = metatest(model, params, buffers, noise_split(), ev, inner_lr=0.3)
    assert list(result) == ["5way_1shot", "5way_2shot", "episodes"]
    assert result["episodes"] == 4
    for key, k_shot in (("5way_1shot", 1), ("5way_2shot", 2)):
        entry = result[key]
        assert len(entry["accs"]) == 4 and all(0 <= a <= 1 for a in entry["accs"])
        assert entry == {**summarize(torch.tensor(entry["accs"])), "accs": entry["accs"]}
        same = evaluate(model, params, buffers, noise_split(), 5, k_shot, 2, 4, 1, 0.3, 11 + k_shot, 4)
        assert entry["accs"] == same.tolist()  # seed + k per setting, deterministic


# ---- stage -----------------------------------------------------------------------------------


def stage_config(fake_omniglot: Path, tmp_path: Path, *extra: str) -> Config:
    return compose(
        [
            f"dataset.root={fake_omniglot}",
            f"paths.artifacts_dir={tmp_path / 'artifacts'}",
            "evaluate.episodes=6",
            "evaluate.q_query=2",
            "evaluate.shots=[1,2]",
            "evaluate.inner_steps=2",
            "evaluate.episode_batch=4",
            "model.width=8",
            *extra,
        ]
    )


def write_checkpoint(cfg: Config, path: Path, n_classes: int | None = None) -> Path:
    ds = cfg.dataset
    n = n_classes or cfg.evaluate.n_way
    torch.manual_seed(0)
    model = build_classifier("conv4", ds.channels, n, ds.image_size, cfg.model.width, ds.mean, ds.std, False)
    meta = classifier_meta("conv4", ds.channels, n, ds.image_size, cfg.model.width, ds.mean, ds.std, False)
    save_classifier(path, model.state_dict(), {**meta, "inner_lr": cfg.metalearn.inner_lr})
    return path


def test_stage_writes_metrics_on_the_test_split(
    fake_omniglot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = stage_config(fake_omniglot, tmp_path)
    write_checkpoint(cfg, stage.default_checkpoint(cfg))

    requested, evaluated = [], []

    class SpyDict(dict):
        def __getitem__(self, key):
            requested.append(key)
            return super().__getitem__(key)

    real_load, real_metatest = stage.load_splits, stage.metatest
    monkeypatch.setattr(stage, "load_splits", lambda *a, **k: SpyDict(real_load(*a, **k)))

    def spy_metatest(model, params, buffers, split, *args, **kwargs):
        evaluated.append(split)
        return real_metatest(model, params, buffers, split, *args, **kwargs)

    monkeypatch.setattr(stage, "metatest", spy_metatest)
    summary = stage.run(cfg)

    assert requested == ["test"]
    test_classes = real_load(cfg.dataset, cfg.paths.cache_dir)["test"].class_names
    assert [s.class_names for s in evaluated] == [test_classes]
    artifacts = Path(cfg.paths.artifacts_dir)
    metrics = json.loads((artifacts / "metrics" / "metatest.json").read_text())
    assert metrics == summary
    assert list(metrics) == ["5way_1shot", "5way_2shot", "episodes"]
    assert metrics["episodes"] == 6
    for key in ("5way_1shot", "5way_2shot"):
        assert set(metrics[key]) == {"acc", "ci95"}
        assert 0 <= metrics[key]["acc"] <= 1 and 0 <= metrics[key]["ci95"] <= 1
    episodes = json.loads((artifacts / "metrics" / "metatest_episodes.json").read_text())
    assert list(episodes) == ["5way_1shot", "5way_2shot"]
    assert all(len(v) == 6 for v in episodes.values())
    assert summarize(torch.tensor(episodes["5way_1shot"]))["acc"] == pytest.approx(metrics["5way_1shot"]["acc"])
    plot = artifacts / "plots" / "metatest.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Same settings, same checkpoint: nothing is recomputed.
    def fail(*args, **kwargs):
        raise AssertionError("a finished stage must not evaluate again")

    monkeypatch.setattr(stage, "metatest", fail)
    assert stage.run(cfg) == summary
    # Another inner learning rate is another result.
    monkeypatch.setattr(stage, "metatest", real_metatest)
    with pytest.warns(UserWarning, match="inner_lr"):
        stage.run(stage_config(fake_omniglot, tmp_path, "metalearn.inner_lr=0.2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # done now: no evaluation, so no warning either
        stage.run(stage_config(fake_omniglot, tmp_path, "metalearn.inner_lr=0.2"))


def test_stage_needs_a_fitting_checkpoint(fake_omniglot: Path, tmp_path: Path) -> None:
    cfg = stage_config(fake_omniglot, tmp_path)
    with pytest.raises(FileNotFoundError, match="run `free metatrain` first"):
        stage.run(cfg)
    ds = cfg.dataset
    teacher_like = classifier_meta("conv4", ds.channels, 5, ds.image_size, 8, ds.mean, ds.std, True)
    model = build_classifier("conv4", ds.channels, 5, ds.image_size, 8, ds.mean, ds.std, True)
    other = tmp_path / "teacher.safetensors"
    save_classifier(other, model.state_dict(), teacher_like)
    with pytest.raises(CheckpointError, match="running statistics"):
        stage.run(cfg, checkpoint=other)


def test_stage_tests_any_way_whatever_the_trained_head(fake_omniglot: Path, tmp_path: Path) -> None:
    """A 3-way checkpoint tested 5-way, a 5-way one tested 3-way: the head for N classes comes from
    the support prototypes (free.maml.head_for_classes), no CheckpointError."""
    cfg = stage_config(fake_omniglot, tmp_path)
    three_way = write_checkpoint(cfg, tmp_path / "three_way.safetensors", n_classes=3)
    wider = stage.run(cfg, checkpoint=three_way)
    assert list(wider) == ["5way_1shot", "5way_2shot", "episodes"]
    five_way = write_checkpoint(cfg, tmp_path / "five_way.safetensors", n_classes=5)
    narrower = stage.run(stage_config(fake_omniglot, tmp_path, "evaluate.n_way=3"), checkpoint=five_way)
    assert list(narrower) == ["3way_1shot", "3way_2shot", "episodes"]
    for result in (wider, narrower):
        assert all(0 <= result[k]["acc"] <= 1 for k in result if k != "episodes")


def test_query_logits_for_another_way_match_a_naive_prototype_loop() -> None:
    """A 5-way linear-head learner on 10-way (and 3-way) episodes: the head is replaced by the
    prototype-initialised N-way head (W_k = 2 c_k, b_k = -||c_k||^2), then plain SGD on the support
    set. Checked against that recipe written out by hand with autograd, for vmap and the loop."""
    model = learner(n_way=5, seed=2)
    params, buffers = split_state(model)
    steps, lr = 3, 0.3
    for n_way in (10, 3):
        episodes = EpisodeSampler(noise_split(n_classes=12), n_way=n_way, k_shot=2, q_query=2, seed=4).sample(3)
        fast = query_logits(model, params, buffers, episodes, steps, lr, vectorised=True)
        slow = query_logits(model, params, buffers, episodes, steps, lr, vectorised=False)
        assert fast.shape == (3, 2 * n_way, n_way)
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
        for i in range(3):
            torch.testing.assert_close(
                slow[i], naive_prototype_maml(model, episodes[i], n_way, steps, lr), rtol=1e-4, atol=1e-4
            )
        accs = episode_accuracies(model, params, buffers, episodes, steps, lr)
        assert accs.shape == (3,) and ((0 <= accs) & (accs <= 1)).all()
    assert evaluate(model, params, buffers, noise_split(n_classes=12), 10, 1, 2, 4, 1, lr, 0, 2).shape == (4,)


def naive_prototype_maml(model: torch.nn.Module, episode, n_way: int, steps: int, lr: float) -> torch.Tensor:
    """Query logits ``(N*Q, N)``: prototypes by a per-class loop, head set by hand, SGD with autograd
    on a deep copy of the network (no torch.func)."""
    net = copy.deepcopy(model)
    with torch.no_grad():
        features = net.features(episode.support_x)  # (N*K, D)
        prototypes = torch.stack([features[episode.support_y == k].mean(0) for k in range(n_way)])  # (N, D)
        head = torch.nn.Linear(prototypes.shape[1], n_way)
        head.weight.copy_(2 * prototypes)
        head.bias.copy_(-(prototypes**2).sum(1))
    net.net.classifier = head
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(net(episode.support_x), episode.support_y)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads, strict=True):
                p -= lr * g
    with torch.no_grad():
        return net(episode.query_x)
