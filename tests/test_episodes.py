"""Episode sampler: shapes, relabelling, class purity, no shared images, reproducibility."""

from __future__ import annotations

import pytest
import torch

from free.data import EpisodeSampler, FewShotSplit


def traceable_split(n_classes: int = 12, per_class: int = 7) -> FewShotSplit:
    """Each image's pixels say which class and which image it is (for exact checks)."""
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # shuffled storage order
    labels = labels[perm]
    images = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    images[:, 0, 0, 1] = torch.arange(len(labels)).to(torch.uint8)  # unique image id
    return FewShotSplit("test", images, labels, [f"class{c}" for c in range(n_classes)])


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 1, 2, 2) float images -> (class id, image id)."""
    raw = (x * 255).round().long()
    return raw[..., 0, 0, 0], raw[..., 0, 0, 1]


def test_batched_shapes_and_labels() -> None:
    ep = EpisodeSampler(traceable_split(), n_way=5, k_shot=2, q_query=3, seed=0).sample(8)
    assert ep.support_x.shape == (8, 10, 1, 2, 2) and ep.query_x.shape == (8, 15, 1, 2, 2)
    assert ep.support_x.dtype == torch.float32 and 0 <= ep.support_x.min() and ep.support_x.max() <= 1
    assert ep.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ep.query_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert ep.classes.shape == (8, 5) and len(ep) == 8


def test_images_match_their_episode_class_and_never_repeat() -> None:
    sampler = EpisodeSampler(traceable_split(), n_way=5, k_shot=2, q_query=5, seed=1)
    ep = sampler.sample(50)
    s_class, s_id = decode(ep.support_x)
    q_class, q_id = decode(ep.query_x)
    # Naive reference: label j of episode e must be original class ep.classes[e, j].
    assert torch.equal(s_class, torch.gather(ep.classes, 1, ep.support_y))
    assert torch.equal(q_class, torch.gather(ep.classes, 1, ep.query_y))
    for e in range(50):
        ids = torch.cat([s_id[e], q_id[e]])
        assert len(set(ids.tolist())) == len(ids), "an image appears twice in one episode"
        assert len(set(ep.classes[e].tolist())) == 5, "a class appears twice in one episode"


def test_uses_every_class_and_image_eventually() -> None:
    split = traceable_split(n_classes=6, per_class=5)
    ep = EpisodeSampler(split, n_way=3, k_shot=1, q_query=1, seed=2).sample(400)
    _, ids = decode(torch.cat([ep.support_x, ep.query_x], dim=1))
    assert set(ep.classes.flatten().tolist()) == set(range(6))
    assert set(ids.flatten().tolist()) == set(range(30))


def test_reproducible_per_seed() -> None:
    split = traceable_split()
    a = EpisodeSampler(split, 5, 1, 3, seed=7).sample(4)
    b = EpisodeSampler(split, 5, 1, 3, seed=7).sample(4)
    c = EpisodeSampler(split, 5, 1, 3, seed=8).sample(4)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.classes, c.classes)


def test_indexing_a_batch_gives_one_episode() -> None:
    ep = EpisodeSampler(traceable_split(), 5, 1, 2, seed=0).sample(3)
    one = ep[1]
    assert one.support_x.shape == (5, 1, 2, 2) and torch.equal(one.query_y, ep.query_y[1])
    with pytest.raises(IndexError):
        one[0]


def test_errors_name_the_setting() -> None:
    split = traceable_split(n_classes=4, per_class=3)
    with pytest.raises(ValueError, match="n_way=5 is more than the 4 classes"):
        EpisodeSampler(split, n_way=5, k_shot=1, q_query=1)
    with pytest.raises(ValueError, match="k_shot \\+ q_query = 4 .* only 3 images"):
        EpisodeSampler(split, n_way=2, k_shot=1, q_query=3)


def test_uneven_class_sizes_never_pick_padding() -> None:
    labels = torch.tensor([0] * 2 + [1] * 9 + [2] * 3)
    images = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    images[:, 0, 0, 1] = torch.arange(len(labels)).to(torch.uint8)
    split = FewShotSplit("val", images, labels, ["a", "b", "c"])
    ep = EpisodeSampler(split, n_way=3, k_shot=1, q_query=1, seed=0).sample(200)
    cls, _ = decode(torch.cat([ep.support_x, ep.query_x], dim=1))
    labels_all = torch.cat([ep.support_y, ep.query_y], dim=1)
    assert torch.equal(cls, torch.gather(ep.classes, 1, labels_all))
