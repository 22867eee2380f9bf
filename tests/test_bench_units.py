"""`free bench units`: FLOPs are linear in the batch, each unit's composition equals the FLOPs of the real
function it stands for, and the command writes positive numbers that the report renders."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from free.bench import units
from free.cli import app
from free.config import compose

# The tiny preset, cut further so that every real unit runs in a fraction of a second.
SMALL = [
    "experiment=tiny",
    "threads=1",
    "teachers.batch_size=4",
    "inversion.images_per_class=2",
    "taskcache.images_per_slot=2",
    "inversion.inner_steps=1",
    "metalearn.meta_batch=2",
    "metalearn.q_query=1",
    "metalearn.inner_steps=2",
    "evaluate.inner_steps=3",
    "evaluate.q_query=2",
]
LEARNER = units.Learner("conv4", 4)


@pytest.fixture(scope="module")
def cfg():
    return compose(SMALL)


def _per_image_flops(cfg, n: int) -> dict[tuple[str, str], int]:
    torch.manual_seed(0)
    calls = units.primitive_calls(cfg, (LEARNER,), n, torch.device("cpu"))
    return {key: units.count_flops(work) for key, work in calls.items()}


def test_doubling_the_batch_doubles_every_primitive_flops(cfg) -> None:
    two, four = _per_image_flops(cfg, 2), _per_image_flops(cfg, 4)
    assert set(two) == {(net, p) for net in ("teacher", LEARNER.name) for p in ("train", "forward", "input_grad")} | {
        ("generator", "train")
    }
    for key in two:
        assert two[key] > 0, key
        assert four[key] == 2 * two[key], key


def test_each_composition_equals_the_flops_of_the_real_function(cfg) -> None:
    per_image = {k: {"flops": f / 2, "seconds": 0.0, "memory_mib": 0.0} for k, f in _per_image_flops(cfg, 2).items()}
    structure = units.unit_structure(cfg, LEARNER)
    calls = units.unit_calls(cfg, LEARNER, torch.device("cpu"))
    expected = {"teacher_step", "teacher_eval", "recovery", "meta_update", "val_episode"}
    assert set(structure) == set(calls) == expected | {"test_episode_1shot", "test_episode_5shot"}
    for name, unit in structure.items():
        composed, real = units.compose(unit, per_image)["flops"], units.count_flops(calls[name])
        if name == "recovery":
            # The last of the K+1 passes takes the generator's gradient without the latent's
            # (autograd.grad on the weights only): the primitive counts the latent's too.
            assert real < composed < 1.01 * real, (name, composed, real)
        else:
            assert composed == real, (name, composed, real)


def test_paper_counts_follow_the_config(cfg) -> None:
    counts = units.paper_counts(cfg, images_per_class=20)
    t, ml = cfg.teachers, cfg.metalearn
    # 20 images per class: 4 held out (ceil 0.2 * 20), 16 trained on, per class.
    assert counts["teacher_step"] == t.n_teachers * t.max_epochs * -(-(t.n_way * 16) // t.batch_size)
    assert counts["recovery"] == ml.iterations * cfg.inversion.teachers_per_step
    assert counts["val_episode"] == ml.val_episodes * -(-ml.iterations // ml.val_every)


def test_the_command_writes_positive_numbers_the_report_renders(tmp_path) -> None:
    out = tmp_path / "units.json"
    args = ["bench", "units", *SMALL, "--learners", "conv4:4", "--batch", "2", "--repeats", "1"]
    result = CliRunner().invoke(app, [*args, "--images-per-class", "20", "--direct-gflop", "0.01", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    for p in data["primitives"]:
        assert p["flops"] > 0 and p["seconds"] > 0, p
    assert any("direct" in r for r in data["units"])  # the cheap units also ran whole
    for r in data["units"]:
        assert r["flops"] > 0 and r["seconds"] > 0 and r["count"] > 0, r
        if "direct" in r and r["unit"] != "recovery":
            assert r["direct"]["flops"] == r["flops"], r
    wall = data["paper_run"]["conv4-4"]["gpu_wall_seconds"]
    assert wall["1"]["total"] >= wall["4"]["total"] >= wall["16"]["total"] > 0
    assert wall["16"]["metatrain"] == wall["1"]["metatrain"]  # the sequential part does not shrink
    from free.bench.report import render

    assert "| recovery | conv4-4 |" in render(out)


def test_learners_must_name_a_width() -> None:
    assert units.parse_learners("conv4:32, resnet18:64") == (units.Learner("conv4", 32), units.Learner("resnet18", 64))
    with pytest.raises(ValueError, match="ARCH:WIDTH"):
        units.parse_learners("resnet18")
