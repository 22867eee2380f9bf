"""Regressions of issue 12 end to end: teachers whose class count differs from the learner's way, and
the configurations that remain impossible (refused at start, naming the keys)."""

from __future__ import annotations

from pathlib import Path

import pytest

from free.artifacts import read_json
from free.config import compose
from free.config.validate import ConfigError
from free.stages import data, metatrain, teachers

# The fake Omniglot (24 classes x 4 drawers) split 12 / 6 / 6; the adversarial term switches on at
# iteration 2 of 4, and distillation is on (its mixed-task path runs too).
FAKE = [
    "dataset.split.train=0.5",
    "dataset.split.val=0.25",
    "teachers.n_teachers=3",
    "teachers.width=8",
    "teachers.max_epochs=1",
    "model.width=8",
    "inversion.teachers_per_step=2",
    "inversion.images_per_class=4",
    "inversion.inner_steps=2",
    "inversion.adv_warmup=2",
    "taskcache.slots=2",
    "taskcache.images_per_slot=4",
    "metalearn.k_shot=1",
    "metalearn.q_query=3",
    "metalearn.iterations=4",
    "metalearn.val_every=4",
    "metalearn.val_episodes=2",
    "metalearn.distill=0.5",
    "threads=1",
]


def fake_config(root: Path, artifacts: Path, *extra: str):
    return compose([f"dataset.root={root}", f"paths.artifacts_dir={artifacts}", *FAKE, *extra])


@pytest.mark.parametrize(
    "extra",
    [
        ["teachers.n_way=10"],  # wider teachers than the 5-way learner, tasks mixing teachers
        ["teachers.n_way=10", "taskcache.mix_teachers=false"],  # 5 of one 10-class teacher's classes
        ["teachers.n_way=3", "inversion.teachers_per_step=3"],  # narrower teachers, 9 classes per step
    ],
    ids=["10-mixed", "10-unmixed", "3-mixed"],
)
def test_metatrain_runs_past_adv_warmup_with_any_teacher_width(
    fake_omniglot: Path, tmp_path: Path, extra: list[str]
) -> None:
    cfg = fake_config(fake_omniglot, tmp_path, *extra)
    data.run(cfg)
    teachers.run(cfg)
    summary = metatrain.run(cfg)
    assert summary["iterations"] == 4
    curves = read_json(tmp_path / "metalearner" / "curves.json")
    assert len(curves) == 4 and all(c["query_loss"] == c["query_loss"] for c in curves)  # finite, no NaN
    recoveries = read_json(tmp_path / "generator" / "recovery.json")["tasks"]
    after_warmup = [step for r in recoveries if r["iteration"] >= 2 for step in r["curve"]]
    assert after_warmup and all(step["adv"] > 0 for step in after_warmup)  # the term ran, in the teacher's space
    # Distillation (metalearn.distill=0.5) acts on these tasks, mixed or not, and says on how much.
    assert all(0 < c["distill_informative"] <= 1 for c in curves)


@pytest.mark.parametrize(
    "overrides,keys",
    [
        # Fresh pseudo tasks draw from the classes of inversion.teachers_per_step teachers only.
        (
            ["teachers.n_way=2", "inversion.teachers_per_step=2", "metalearn.n_way=5"],
            ("metalearn.n_way", "teachers.n_way", "inversion.teachers_per_step"),
        ),
        # Unmixed tasks take all their classes from one teacher (the existing rule, kept).
        (["teachers.n_way=3", "taskcache.mix_teachers=false"], ("metalearn.n_way", "teachers.n_way")),
    ],
)
def test_teacher_widths_that_cannot_make_a_task_are_config_errors(overrides: list[str], keys: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert all(key in str(info.value) for key in keys), info.value


def test_possible_teacher_widths_are_accepted() -> None:
    for overrides in (
        ["teachers.n_way=10"],
        ["teachers.n_way=3"],  # 4 teachers per step x 3 classes >= 5
        ["teachers.n_way=10", "taskcache.mix_teachers=false"],
        ["teachers.n_way=2", "inversion.teachers_per_step=3", "metalearn.distill=1.0"],
    ):
        compose(overrides)


@pytest.mark.parametrize(
    "overrides,widths,keys",
    [
        (["taskcache.mix_teachers=false"], [5, 3, 10], ("metalearn.n_way", "taskcache.mix_teachers", "[1]")),
        ([], [3, 10, 1], ("metalearn.n_way", "inversion.teachers_per_step")),
    ],
)
def test_an_imported_zoo_too_narrow_for_the_tasks_is_refused_by_name(
    overrides: list[str], widths: list[int], keys: tuple[str, ...]
) -> None:
    from free.config.validate import validate_zoo

    cfg = compose(["teachers.n_teachers=3", "inversion.teachers_per_step=2", *overrides])
    with pytest.raises(ConfigError) as info:
        validate_zoo(cfg, widths)
    assert all(key in str(info.value) for key in keys), info.value
    validate_zoo(cfg, [5, 10, 7])  # wide enough either way
    validate_zoo(
        compose(["metalearn.data=real", "teachers.n_teachers=3", "inversion.teachers_per_step=2", *overrides]), widths
    )  # oracle: no zoo use
