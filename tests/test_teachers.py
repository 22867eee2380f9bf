"""The teacher zoo: class subsets, training with early stopping, the resumable stage, imports."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import free.stages.teachers as stage
from free.artifacts import DONE_FILE, save_tensors
from free.checkpoints import CheckpointError, classifier_meta, load_classifier, save_classifier
from free.config import compose
from free.data import load_splits
from free.data.base import sha256_file
from free.models import build_classifier
from free.teachers import LOSS_MIN_DELTA, evaluate, holdout_split, sample_class_subsets, train_teacher

# These models are tiny: one intra-op thread is as fast, and a 2-thread OpenMP pool slows down
# ~100x when another process holds one of the 2 cores (parallel test runs). See conftest.py.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------ core


def test_class_subsets_are_distinct_in_range_and_seeded() -> None:
    subsets = sample_class_subsets(n_classes=12, n_teachers=20, n_way=5, seed=3)
    assert len(subsets) == 20
    for s in subsets:
        assert len(s) == 5 and len(set(s)) == 5
        assert all(0 <= c < 12 for c in s)
    assert subsets == sample_class_subsets(12, 20, 5, seed=3)
    assert subsets != sample_class_subsets(12, 20, 5, seed=4)
    assert len({tuple(s) for s in subsets}) > 1  # teachers differ
    # Teacher i's classes do not depend on how many teachers follow it.
    assert sample_class_subsets(12, 7, 5, seed=3) == subsets[:7]


def test_class_subsets_reject_more_ways_than_classes() -> None:
    with pytest.raises(ValueError, match=r"teachers\.n_way"):
        sample_class_subsets(n_classes=4, n_teachers=2, n_way=5, seed=0)


def test_holdout_split_keeps_images_on_both_sides() -> None:
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 2)
    train, val = holdout_split(labels, 0.2, torch.Generator().manual_seed(0))
    assert sorted(train.tolist() + val.tolist()) == list(range(16))
    val_counts = torch.bincount(labels[val], minlength=3).tolist()
    assert val_counts == [math.ceil(0.2 * 10), 1, 1]  # at least one, and one left for training
    assert torch.bincount(labels[train], minlength=3).min() >= 1
    again, _ = holdout_split(labels, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(train, again)
    with pytest.raises(ValueError, match="at least 2"):
        holdout_split(torch.tensor([0, 0, 1]), 0.2, torch.Generator())


def _quadrants(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 trivially separable classes: class c lights up quadrant c of a noisy 28x28 image."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(4):
        x = 0.1 * torch.rand(n_per_class, 1, 28, 28, generator=g)
        r, q = divmod(c, 2)
        x[:, :, r * 14 : (r + 1) * 14, q * 14 : (q + 1) * 14] += 0.9
        xs.append(x)
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def _tiny_teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_classifier("conv4", 1, 4, 28, 8, [0.5], [0.5])


def test_train_teacher_solves_a_separable_problem_and_stops_early() -> None:
    x_train, y_train = _quadrants(16, seed=0)
    x_val, y_val = _quadrants(4, seed=1)
    result = train_teacher(
        _tiny_teacher(),
        x_train,
        y_train,
        x_val,
        y_val,
        max_epochs=60,
        patience=1,
        lr=1e-2,
        batch_size=16,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.val_acc == 1.0
    assert result.epochs_run < 60  # stopped once accuracy and loss stopped improving
    assert [h["epoch"] for h in result.history] == list(range(1, result.epochs_run + 1))
    # The stopping rule, replayed from the history: the last epoch improved neither the best accuracy
    # nor the lowest loss (by LOSS_MIN_DELTA), and every earlier epoch improved one of them.
    best_acc, low_loss, improvements = -1.0, math.inf, []
    for h in result.history:
        improvements.append(h["val_acc"] > best_acc or h["val_loss"] < low_loss - LOSS_MIN_DELTA)
        best_acc, low_loss = max(best_acc, h["val_acc"]), min(low_loss, h["val_loss"])
    assert improvements[-1] is False and all(improvements[:-1])


def test_train_teacher_without_patience_runs_every_epoch_and_is_deterministic() -> None:
    x_train, y_train = _quadrants(8, seed=0)
    x_val, y_val = _quadrants(2, seed=1)
    kwargs = dict(max_epochs=3, patience=0, lr=1e-2, batch_size=7, shift=2)
    a = train_teacher(
        _tiny_teacher(), x_train, y_train, x_val, y_val, generator=torch.Generator().manual_seed(5), **kwargs
    )
    b = train_teacher(
        _tiny_teacher(), x_train, y_train, x_val, y_val, generator=torch.Generator().manual_seed(5), **kwargs
    )
    assert a.epochs_run == 3
    assert a.history == b.history
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_train_teacher_returns_the_best_epoch_not_the_last() -> None:
    # A linear model that starts out perfect on the held-out set and is then trained on flipped
    # labels: it gets worse every epoch, so the best state is the first epoch's.
    g = torch.Generator().manual_seed(0)

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 2
        return 0.2 * torch.rand(n, 1, 4, 4, generator=g) + 0.6 * y.view(-1, 1, 1, 1), y

    x_train, y_train = data(32)
    x_val, y_val = data(16)

    def perfect() -> nn.Module:
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        with torch.no_grad():
            model[1].weight.copy_(torch.stack([-torch.ones(16), torch.ones(16)]))
            model[1].bias.copy_(torch.tensor([5.6, -5.6]))
        return model

    model = perfect()
    result = train_teacher(
        model,
        x_train,
        1 - y_train,
        x_val,
        y_val,
        max_epochs=6,
        patience=0,
        lr=0.05,
        batch_size=8,
        generator=torch.Generator().manual_seed(0),
    )
    accs = [h["val_acc"] for h in result.history]
    assert result.epochs_run == 6 and accs[-1] < max(accs)
    assert result.val_acc == max(accs) == 1.0
    # Ties on accuracy go to the lower loss.
    tied = [h for h in result.history if h["val_acc"] == max(accs)]
    assert len(tied) >= 2
    assert result.best_epoch == min(tied, key=lambda h: h["val_loss"])["epoch"]
    # The returned state really is that epoch's: recompute its accuracy on a fresh model.
    fresh = perfect()
    fresh.load_state_dict(result.state)
    loss, acc = evaluate(fresh, x_val, y_val)
    assert acc == result.val_acc and loss == pytest.approx(result.val_loss)
    assert evaluate(model, x_val, y_val) == (loss, acc)  # the model is left at the best state


# ----------------------------------------------------------------------------------------- stage


def _cfg(fake_root: Path, artifacts: Path, *extra: str):
    return compose(
        [
            f"dataset.root={fake_root}",
            f"paths.artifacts_dir={artifacts}",
            "dataset.split.train=0.5",
            "dataset.split.val=0.25",
            "teachers.n_teachers=3",
            "teachers.width=8",
            "teachers.max_epochs=2",
            "teachers.batch_size=8",
            "inversion.teachers_per_step=1",
            *extra,
        ]
    )


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def count_training(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the training function inside the stage."""
    calls: list[int] = []
    real = stage.train_teacher

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "train_teacher", counting)
    return calls


def test_stage_writes_a_zoo_of_meta_train_teachers(fake_omniglot: Path, tmp_path: Path) -> None:
    cfg = _cfg(fake_omniglot, tmp_path / "artifacts")
    summary = stage.run(cfg)
    out = tmp_path / "artifacts" / "teachers"
    assert summary["n_teachers"] == 3 and summary["trained"] == 3
    assert {p.name for p in out.iterdir()} == {
        *(f"teacher_{i:03d}.{ext}" for i in range(3) for ext in ("safetensors", "json")),
        "zoo.json",
        DONE_FILE,
    }
    splits = load_splits(cfg.dataset, cfg.paths.cache_dir)
    held_out = set(splits["val"].class_names) | set(splits["test"].class_names)
    zoo = json.loads((out / "zoo.json").read_text())
    assert [c["teacher_id"] for c in zoo["teachers"]] == [0, 1, 2]
    for i in range(3):
        card = json.loads((out / f"teacher_{i:03d}.json").read_text())
        weights = out / card["file"]
        assert card["sha256"] == sha256_file(weights)
        assert len(card["class_names"]) == len(set(card["class_names"])) == cfg.teachers.n_way
        assert not set(card["class_names"]) & held_out  # teachers only know meta-train classes
        assert card["class_names"] == [splits["train"].class_names[c] for c in card["class_ids"]]
        assert 0.0 <= card["val_acc"] <= 1.0 and 1 <= card["epochs_run"] <= 2
        assert len(card["history"]) == card["epochs_run"]
        model, meta = load_classifier(weights)
        assert meta["class_names"] == card["class_names"] and meta["teacher_id"] == i
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, cfg.teachers.n_way)
        # Running BN statistics: the inversion's feature-statistics loss reads them.
        assert any(k.endswith("running_var") for k in model.state_dict())
    assert summary["mean_val_acc"] == pytest.approx(sum(c["val_acc"] for c in zoo["teachers"]) / 3)


def test_stage_rerun_does_nothing(fake_omniglot: Path, tmp_path: Path, count_training: list[int]) -> None:
    cfg = _cfg(fake_omniglot, tmp_path / "artifacts")
    stage.run(cfg)
    assert len(count_training) == 3
    out = tmp_path / "artifacts" / "teachers"
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = stage.run(cfg)
    assert len(count_training) == 3 and again["trained"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_stage_resumes_to_identical_artifacts(fake_omniglot: Path, tmp_path: Path, count_training: list[int]) -> None:
    cfg = _cfg(fake_omniglot, tmp_path / "artifacts")
    stage.run(cfg)
    out = tmp_path / "artifacts" / "teachers"
    unbroken = _digests(out)
    # As if the stage had been killed while training teacher 2.
    for name in ("teacher_002.safetensors", "teacher_002.json", DONE_FILE, "zoo.json"):
        (out / name).unlink()
    count_training.clear()
    torch.manual_seed(987)  # a new process: whatever state the global RNG has must not matter
    summary = stage.run(cfg)
    assert len(count_training) == 1 and summary["trained"] == 1 and summary["reused"] == 2
    assert _digests(out) == unbroken


def test_stage_retrains_on_config_change_and_drops_extra_teachers(
    fake_omniglot: Path, tmp_path: Path, count_training: list[int]
) -> None:
    artifacts = tmp_path / "artifacts"
    stage.run(_cfg(fake_omniglot, artifacts))
    out = artifacts / "teachers"
    before = json.loads((out / "teacher_000.json").read_text())
    count_training.clear()
    stage.run(_cfg(fake_omniglot, artifacts, "teachers.lr=0.01", "teachers.n_teachers=2"))
    assert len(count_training) == 2  # no teacher of the old config is reused
    assert not (out / "teacher_002.safetensors").exists() and not (out / "teacher_002.json").exists()
    after = json.loads((out / "teacher_000.json").read_text())
    assert after["fingerprint"] != before["fingerprint"]
    assert len(json.loads((out / "zoo.json").read_text())["teachers"]) == 2


def test_stage_cycles_mixed_archs(fake_omniglot: Path, tmp_path: Path) -> None:
    cfg = _cfg(fake_omniglot, tmp_path / "artifacts", "teachers.archs=[conv4,resnet12]", "teachers.max_epochs=1")
    stage.run(cfg)
    zoo = json.loads((tmp_path / "artifacts" / "teachers" / "zoo.json").read_text())
    assert [c["arch"] for c in zoo["teachers"]] == ["conv4", "resnet12", "conv4"]
    assert zoo["summary"]["arch_counts"] == {"conv4": 2, "resnet12": 1}
    model, _ = load_classifier(tmp_path / "artifacts" / "teachers" / "teacher_001.safetensors")
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 5)


# ---------------------------------------------------------------------------------------- import


def _user_teacher(n_classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_classifier("conv4", 1, n_classes, 28, 8, [0.5], [0.5])


def _card(n_classes: int = 5, **changes) -> dict:
    card = {
        **classifier_meta("conv4", 1, n_classes, 28, 8, [0.5], [0.5], True),
        "class_names": [f"Mine/char{j:02d}" for j in range(n_classes)],
        "val_acc": 0.9,
    }
    return {**card, **changes}


def _write_card(folder: Path, stem: str, card: dict) -> None:
    (folder / f"{stem}.json").write_text(json.dumps(card))


@pytest.fixture
def user_teachers(tmp_path: Path) -> Path:
    """A folder with one safetensors teacher and one `.pt` state dict of the backbone alone."""
    src = tmp_path / "mine"
    src.mkdir()
    save_classifier(src / "a.safetensors", _user_teacher(seed=1).state_dict(), _card())
    _write_card(src, "a", _card())
    torch.save(_user_teacher(seed=2).net.state_dict(), src / "b.pt")
    _write_card(src, "b", _card(val_acc=0.8))
    return src


def test_import_safetensors_and_weights_only_pt(fake_omniglot: Path, tmp_path: Path, user_teachers: Path) -> None:
    cfg = _cfg(fake_omniglot, tmp_path / "artifacts")
    summary = stage.import_teachers(cfg, user_teachers)
    out = tmp_path / "artifacts" / "teachers"
    assert summary["n_teachers"] == 2 and summary["source"] == "imported"
    assert summary["mean_val_acc"] == pytest.approx(0.85)
    zoo = json.loads((out / "zoo.json").read_text())
    assert [c["imported_from"] for c in zoo["teachers"]] == ["a.json", "b.json"]
    reference = _user_teacher(seed=2)
    x = torch.rand(3, 1, 28, 28)
    for card in zoo["teachers"]:
        assert card["sha256"] == sha256_file(out / card["file"])
        model, meta = load_classifier(out / card["file"])
        assert meta["class_names"] == _card()["class_names"]
        assert model(x).shape == (3, 5)
    b, _ = load_classifier(out / "teacher_001.safetensors")
    assert torch.allclose(b(x), reference.eval()(x))  # the .pt weights, not a fresh init
    # Importing the same files again does nothing.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert stage.import_teachers(cfg, user_teachers)["imported"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def _nan_state() -> dict[str, torch.Tensor]:
    state = _user_teacher().state_dict()
    state["net.classifier.weight"][0, 0] = float("nan")
    return state


BAD_TEACHERS = {
    # card says 4 classes (with 4 names), the weights have 5 outputs
    "wrong_n_classes": (lambda: _user_teacher(5).state_dict(), _card(4), "bad.safetensors"),
    "names_vs_n_classes": (lambda: _user_teacher(5).state_dict(), _card(5, class_names=["x"]), "bad.json"),
    "wrong_shapes": (lambda: _user_teacher(5).state_dict(), _card(5, width=16), "bad.safetensors"),
    "nan_weights": (_nan_state, _card(5), "bad.safetensors"),
    "image_size": (lambda: _user_teacher(5).state_dict(), _card(5, image_size=32), "image_size"),
    "channels": (
        lambda: _user_teacher(5).state_dict(),
        _card(5, channels=3, mean=[0.5] * 3, std=[0.5] * 3),
        "channels",
    ),
    "missing_key": (lambda: _user_teacher(5).state_dict(), {k: v for k, v in _card(5).items() if k != "arch"}, "arch"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEACHERS))
def test_import_rejects_bad_teachers_and_leaves_output_alone(
    case: str, fake_omniglot: Path, tmp_path: Path, user_teachers: Path
) -> None:
    cfg = _cfg(fake_omniglot, tmp_path / "artifacts")
    stage.import_teachers(cfg, user_teachers)  # an existing zoo that must survive the failed import
    out = tmp_path / "artifacts" / "teachers"
    before = _digests(out)
    make_state, card, named = BAD_TEACHERS[case]
    # A safetensors file without a header description: the card alone describes it.
    save_tensors(user_teachers / "bad.safetensors", make_state())
    _write_card(user_teachers, "bad", card)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        stage.import_teachers(cfg, user_teachers)
    assert _digests(out) == before


def _negative_var_state() -> dict[str, torch.Tensor]:
    state = _user_teacher().state_dict()
    name = next(k for k in state if k.endswith("running_var"))
    state[name][0] = -0.5  # (x - mean) / sqrt(var + eps) is NaN for this channel: every loss NaN
    return state


# (make weights, card, pattern the refusal must match: the file it names, then the reason)
HOSTILE_TEACHERS = {
    "negative_bn_variance": (_negative_var_state, _card(5), r"bad\.safetensors: .*running_var has 1 non-positive"),
    "one_class": (lambda: _user_teacher(1).state_dict(), _card(1), r"bad\.json: a teacher needs at least 2 classes"),
    "duplicate_names": (
        lambda: _user_teacher(5).state_dict(),
        _card(5, class_names=["x", "y", "x", "z", "x"]),
        r"bad\.json: class_names repeat \['x'\]",
    ),
    # metalearn.n_way=5 and inversion.teachers_per_step=1 (the test config): a 3-class teacher can be
    # the only one a step inverts, and a 5-way pseudo task cannot be drawn from it.
    "fewer_than_n_way": (
        lambda: _user_teacher(3).state_dict(),
        _card(3),
        r"too few classes for the meta-learner's tasks: metalearn\.n_way: 5 .* \[bad\.json \(3 classes\)\]",
    ),
    "oversized_header": (
        lambda: _user_teacher(5).state_dict(),
        _card(5),
        r"bad\.safetensors: safetensors header of \d+ bytes is over the limit of 1048576 bytes",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TEACHERS))
def test_import_refuses_hostile_teachers_naming_file_and_reason(
    case: str, fake_omniglot: Path, tmp_path: Path, user_teachers: Path
) -> None:
    cfg = _cfg(fake_omniglot, tmp_path / "artifacts")
    stage.import_teachers(cfg, user_teachers)  # an earlier zoo that must stay as it was
    out = tmp_path / "artifacts" / "teachers"
    before = _digests(out)
    make_state, card, pattern = HOSTILE_TEACHERS[case]
    header = {"padding": "x" * (1 << 20)} if case == "oversized_header" else None
    save_tensors(user_teachers / "bad.safetensors", make_state(), header)
    _write_card(user_teachers, "bad", card)
    with pytest.raises(CheckpointError, match=pattern):
        stage.import_teachers(cfg, user_teachers)
    assert _digests(out) == before


@pytest.mark.parametrize("which", ["weights", "card", "folder"])
def test_import_refuses_symlinks_that_leave_the_folder(
    which: str, fake_omniglot: Path, tmp_path: Path, user_teachers: Path
) -> None:
    cfg = _cfg(fake_omniglot, tmp_path / "artifacts")
    stage.import_teachers(cfg, user_teachers)
    out = tmp_path / "artifacts" / "teachers"
    before = _digests(out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_classifier(elsewhere / "c.safetensors", _user_teacher().state_dict(), _card())
    _write_card(elsewhere, "c", _card())
    if which == "weights":
        _write_card(user_teachers, "c", _card())
        (user_teachers / "c.safetensors").symlink_to(elsewhere / "c.safetensors")
        named = r"c\.safetensors: a symlink to .*elsewhere/c\.safetensors, outside the import folder"
    elif which == "card":
        (user_teachers / "c.json").symlink_to(elsewhere / "c.json")
        (user_teachers / "c.safetensors").symlink_to(elsewhere / "c.safetensors")
        named = r"c\.json: a symlink to .*elsewhere/c\.json, outside the import folder"
    else:  # the import folder itself is fine; a file reached through a symlinked subfolder is not
        (user_teachers / "sub").symlink_to(elsewhere)
        linked = tmp_path / "linked"
        linked.mkdir()
        (linked / "c.json").symlink_to(user_teachers / "sub" / "c.json")
        (linked / "c.safetensors").symlink_to(user_teachers / "sub" / "c.safetensors")
        with pytest.raises(CheckpointError, match=r"c\.json: a symlink to .*elsewhere/c\.json, outside"):
            stage.import_teachers(cfg, linked)
        assert _digests(out) == before
        return
    with pytest.raises(CheckpointError, match=named):
        stage.import_teachers(cfg, user_teachers)
    assert _digests(out) == before


def test_import_follows_symlinks_that_stay_in_the_folder(
    fake_omniglot: Path, tmp_path: Path, user_teachers: Path
) -> None:
    (user_teachers / "real").mkdir()
    (user_teachers / "a.safetensors").rename(user_teachers / "real" / "a.safetensors")
    (user_teachers / "a.safetensors").symlink_to(user_teachers / "real" / "a.safetensors")
    assert stage.import_teachers(_cfg(fake_omniglot, tmp_path / "artifacts"), user_teachers)["n_teachers"] == 2


class _Payload:
    """A pickle that runs code when unpickled: ``open(marker, "w")`` creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_import_refuses_a_pickle_that_would_run_code_and_runs_nothing(fake_omniglot: Path, tmp_path: Path) -> None:
    src = tmp_path / "evil"
    src.mkdir()
    marker = tmp_path / "payload_ran"
    torch.save({"net.classifier.weight": _Payload(marker)}, src / "t.pt")
    _write_card(src, "t", _card())
    with pytest.raises(CheckpointError) as refused:
        stage.import_teachers(_cfg(fake_omniglot, tmp_path / "artifacts"), src)
    message = str(refused.value)
    assert re.match(r".*t\.pt: refused: this pickle holds code or objects other than tensors \(.*open\)", message)
    assert "convert it to safetensors" in message
    assert "weights_only" not in message and "safe_globals" not in message  # no advice to run it anyway
    assert not marker.exists()  # nothing in it ran
    assert not (tmp_path / "artifacts" / "teachers").exists()  # and nothing was written
    # The payload is live: what unpickling would call creates the file (called by hand, not unpickled).
    call, args = _Payload(tmp_path / "control").__reduce__()
    call(*args).close()
    assert (tmp_path / "control").exists()


def test_import_needs_weights_next_to_each_card(fake_omniglot: Path, tmp_path: Path) -> None:
    src = tmp_path / "cards_only"
    src.mkdir()
    _write_card(src, "lonely", _card())
    with pytest.raises(CheckpointError, match=r"lonely\.json.*no weights"):
        stage.import_teachers(_cfg(fake_omniglot, tmp_path / "artifacts"), src)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no teacher cards"):
        stage.import_teachers(_cfg(fake_omniglot, tmp_path / "artifacts"), empty)


def test_import_rejects_meta_test_classes(fake_omniglot: Path, tmp_path: Path) -> None:
    from free.stages import data

    cfg = _cfg(fake_omniglot, tmp_path / "artifacts")
    data.run(cfg)  # writes the split manifest the import checks classes against
    test_class = load_splits(cfg.dataset, cfg.paths.cache_dir)["test"].class_names[0]
    src = tmp_path / "mine"
    src.mkdir()
    save_classifier(src / "t.safetensors", _user_teacher().state_dict(), _card())
    _write_card(src, "t", _card(class_names=[test_class, "a", "b", "c", "d"]))
    with pytest.raises(CheckpointError, match=r"t\.json.*meta-test"):
        stage.import_teachers(cfg, src)


def test_run_with_import_dir_imports(fake_omniglot: Path, tmp_path: Path, user_teachers: Path) -> None:
    cfg = _cfg(fake_omniglot, tmp_path / "artifacts", f"teachers.import_dir={user_teachers}")
    assert stage.run(cfg)["source"] == "imported"
