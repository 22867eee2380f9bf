"""N-way K-shot Q-query episodes, sampled in batches.

All episodes of a batch are drawn with a handful of tensor ops (no Python loop over episodes or
classes), so meta-testing can evaluate many episodes at once. Labels are relabelled ``0..N-1`` by
the order in which an episode's classes were drawn; support and query sets are class-major
(``[class 0 x K, class 1 x K, ...]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from free.data.splits import FewShotSplit


@dataclass
class Episode:
    """One episode, or a batch of ``E`` episodes when the tensors have a leading ``E`` dimension.

    Attributes:
        support_x: ``([E,] N*K, C, H, W)`` float in [0, 1].
        support_y: ``([E,] N*K)`` int64 in ``0..N-1``.
        query_x: ``([E,] N*Q, C, H, W)`` float in [0, 1].
        query_y: ``([E,] N*Q)`` int64.
        classes: ``([E,] N)`` split-local class index of each episode label.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor

    def __len__(self) -> int:
        return self.classes.shape[0] if self.classes.dim() == 2 else 1

    def __getitem__(self, i: int) -> Episode:
        """The ``i``-th episode of a batch, without the batch dimension."""
        if self.classes.dim() != 2:
            raise IndexError("not a batch of episodes")
        return Episode(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i], self.classes[i])

    def to(self, device: torch.device | str) -> Episode:
        return Episode(
            *(t.to(device) for t in (self.support_x, self.support_y, self.query_x, self.query_y, self.classes))
        )


class EpisodeSampler:
    """Seeded sampler of episodes from one split.

    The same ``(split, n_way, k_shot, q_query, seed)`` and the same sequence of ``sample`` calls give
    the same episodes. Within an episode, classes are distinct and images are drawn without
    replacement, so support and query never share an image.

    Args:
        split: the images to draw from.
        n_way, k_shot, q_query: classes per episode, support and query images per class.
        seed: seed of the sampler's own random stream.

    Raises:
        ValueError: the split has fewer than ``n_way`` classes, or a class has fewer than
            ``k_shot + q_query`` images (messages name the setting to change).
    """

    def __init__(self, split: FewShotSplit, n_way: int, k_shot: int, q_query: int, seed: int = 0) -> None:
        if n_way < 1 or k_shot < 1 or q_query < 0:
            raise ValueError(f"need n_way >= 1, k_shot >= 1, q_query >= 0; got {n_way}, {k_shot}, {q_query}")
        if n_way > split.n_classes:
            raise ValueError(f"n_way={n_way} is more than the {split.n_classes} classes of split {split.name!r}")
        counts = split.class_counts()
        if int(counts.min()) < k_shot + q_query:
            poorest = split.class_names[int(counts.argmin())]
            raise ValueError(
                f"k_shot + q_query = {k_shot + q_query} but class {poorest!r} of split {split.name!r} has only "
                f"{int(counts.min())} images"
            )
        self.split, self.n_way, self.k_shot, self.q_query = split, n_way, k_shot, q_query
        self.generator = torch.Generator().manual_seed(seed)
        # (n_classes, max_count) image indices per class, padded with 0 where a class has fewer.
        order = torch.argsort(split.labels, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(int(counts.max()))
        self._valid = slot[None, :] < counts[:, None]  # (n_classes, max_count)
        self._index = torch.where(self._valid, order[(starts[:, None] + slot[None, :]).clamp(max=len(order) - 1)], 0)

    def sample(self, n_episodes: int = 1) -> Episode:
        """Draw ``n_episodes`` episodes as one batch (leading dimension ``E``)."""
        e, n, k, q = n_episodes, self.n_way, self.k_shot, self.q_query
        classes = torch.rand(e, self.split.n_classes, generator=self.generator).argsort(dim=1)[:, :n]  # (E, N)
        # Random keys per image slot; padding slots get key 2 so they sort last and are never chosen.
        keys = torch.rand(e, n, self._index.shape[1], generator=self.generator)
        keys = torch.where(self._valid[classes], keys, 2.0)
        chosen = keys.argsort(dim=2)[:, :, : k + q]  # (E, N, K+Q) slots
        image_idx = torch.gather(self._index[classes], 2, chosen)  # (E, N, K+Q)
        labels = torch.arange(n).view(1, n, 1)

        def take(idx: torch.Tensor) -> torch.Tensor:  # (E, N, m) indices -> (E, N*m, C, H, W) in [0, 1]
            return self.split.images[idx.reshape(e, -1)].float().div_(255)

        return Episode(
            support_x=take(image_idx[:, :, :k]),
            support_y=labels.expand(e, n, k).reshape(e, n * k),
            query_x=take(image_idx[:, :, k:]),
            query_y=labels.expand(e, n, q).reshape(e, n * q),
            classes=classes,
        )
