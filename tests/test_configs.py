"""Every config group and preset composes and validates; bad values fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from free.config import Config, ConfigError, compose, config_dir, to_yaml

GROUPS = (
    "dataset",
    "model",
    "teachers",
    "inversion",
    "taskcache",
    "metalearn",
    "evaluate",
    "method",
    "tracking",
    "storage",
    "experiment",
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def test_every_group_exists_with_options() -> None:
    for group in GROUPS:
        assert options(group), f"params/{group}/ has no options"
    assert {"tiny", "medium", "omniglot", "cifar_fs", "mini_imagenet", "cub"} <= set(options("experiment"))
    assert set(options("method")) == {"free", "free_noalign", "scratch", "pixels", "random_init", "oracle"}


@pytest.mark.parametrize("preset", ["tiny", "medium", "omniglot"])
def test_every_training_preset_checkpoints_before_it_ends(preset: str) -> None:
    """A kill must not lose a whole meta-training: at least two checkpoints before the end."""
    ml = compose([f"experiment={preset}"]).metalearn
    assert 2 * ml.checkpoint_every <= ml.iterations


@pytest.mark.parametrize("update", ["first_order", "official"])
def test_medium_preset_takes_a_separate_5_shot_learner_and_either_update(update: str) -> None:
    """The medium preset exists to run the accuracy table on a CPU: a 5-shot learner must fit its bank."""
    cfg = compose(["experiment=medium", "metalearn.k_shot=5", f"metalearn.update={update}"])
    assert cfg.metalearn.k_shot + cfg.metalearn.q_query <= cfg.taskcache.images_per_slot
    assert cfg.dataset.name == "omniglot" and cfg.threads == 1


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    assert isinstance(cfg, Config)
    if group == "dataset":
        assert cfg.dataset.name == option
    if group == "method":
        assert cfg.method.name == option


@pytest.mark.parametrize(
    "method,mode,align,data,meta_trains",
    [
        ("free", "meta", True, "pseudo", True),
        ("free_noalign", "meta", False, "pseudo", True),
        ("scratch", "from_scratch", True, "pseudo", True),
        ("pixels", "pixels", True, "pseudo", True),
        ("oracle", "meta", True, "real", True),
        ("random_init", "meta", True, "pseudo", False),
    ],
)
def test_method_presets_set_their_switches(method: str, mode: str, align: bool, data: str, meta_trains: bool) -> None:
    # With a preset that sets iterations too: the method must still win (random_init stays untrained).
    cfg = compose([f"method={method}", "experiment=omniglot"])
    assert (cfg.inversion.mode, cfg.metalearn.align, cfg.metalearn.data) == (mode, align, data)
    assert (cfg.metalearn.iterations > 0) == meta_trains


def test_tiny_is_small() -> None:
    cfg = compose(["experiment=tiny"])
    assert cfg.teachers.n_teachers <= 8 and cfg.evaluate.episodes <= 50 and cfg.metalearn.iterations <= 50


def test_paper_presets_use_their_data_sets() -> None:
    for preset, name, size in (
        ("cifar_fs", "cifar_fs", 32),
        ("mini_imagenet", "mini_imagenet", 84),
        ("cub", "cub", 84),
    ):
        cfg = compose([f"experiment={preset}"])
        assert (cfg.dataset.name, cfg.dataset.image_size, cfg.dataset.channels) == (name, size, 3)
        assert cfg.teachers.n_teachers == 100


def test_env_points_the_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FREE_DATA_DIR", str(tmp_path))
    assert compose([]).dataset.root == f"{tmp_path}/omniglot"
    assert compose(["dataset.root=/elsewhere"]).dataset.root == "/elsewhere"


def test_yaml_round_trip_is_resolved() -> None:
    text = to_yaml(compose(["experiment=tiny"]))
    assert "${" not in text and "n_teachers: 4" in text


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["no_such_key=1"], "no_such_key"),
        (["dataset.no_such_field=1"], "no_such_field"),
        (["dataset.image_size=abc"], "dataset.image_size"),
        (["dataset=imagenet22k"], "imagenet22k"),
        (["model.arch=resnet99"], "model.arch"),
        (["teachers.archs=[conv4,vgg]"], "teachers.archs[1]"),
        (["inversion.inner_steps=-3"], "inversion.inner_steps"),
        (["metalearn.update=sgd"], "metalearn.update"),
        (["metalearn.update=official", "method=oracle"], "metalearn.update"),
        (["metalearn.update=official", "metalearn.distill=0.5"], "metalearn.distill"),
        (
            ["metalearn.update=official", "metalearn.official.max_replay_batches=0"],
            "metalearn.official.max_replay_batches",
        ),
        (["metalearn.inner_steps=0"], "metalearn.inner_steps"),
        (["evaluate.episodes=-1"], "evaluate.episodes"),
        (["taskcache.mix_teachers=false", "metalearn.n_way=10"], "metalearn.n_way"),
        (["dataset.image_size=30"], "dataset.image_size"),
        (["dataset.channels=3"], "dataset.channels"),
        (["dataset.split.train=0.9", "dataset.split.val=0.2"], "dataset.split"),
        (["inversion.mode=magic"], "inversion.mode"),
        (["method.name=nonsense"], "method.name"),
        (["method=random_init", "metalearn.iterations=5"], "metalearn.iterations"),
        (["device=tpu"], "device"),
        (["teachers.n_teachers=2", "inversion.teachers_per_step=3"], "inversion.teachers_per_step"),
        (["metalearn.k_shot=10", "metalearn.q_query=15"], "taskcache.images_per_slot"),
        (["inversion.images_per_class=10"], "inversion.images_per_class"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert key in str(info.value)


def test_teacher_class_check_allows_mixing() -> None:
    # Pseudo tasks that mix teachers may have more classes than one teacher knows.
    assert compose(["taskcache.mix_teachers=true", "metalearn.n_way=10"]).metalearn.n_way == 10


def test_missing_config_dir_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FREE_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="FREE_CONFIG_DIR"):
        compose([])


def test_the_validator_knows_every_backbone_and_the_flow_path_imports_no_torch() -> None:
    import importlib
    import subprocess
    import sys

    import free.models

    validator = importlib.import_module("free.config.validate")  # free.config.validate is also a function's name
    # Written out in the validator so that reading a config needs no torch (free/config/validate.py).
    assert set(validator.CLASSIFIER_ARCHS) == set(free.models.CLASSIFIER_ARCHS)
    probe = "import sys, flows.pipeline; print('torch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"  # the flow-run process imports torch only if a stage runs in it
