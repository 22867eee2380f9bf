"""Recovering pseudo data from a teacher: FREE's meta-generator and two baselines.

FREE (Wei et al., CVPR 2024, §3.2) meta-learns the *initialisation* of a generator ``G`` so that a
few inner steps on (a copy of ``G``, a fresh latent ``z``) make it produce images that one teacher
classifies as the intended labels. The outer update is first-order: the sum over the sampled
teachers of the adapted copies' gradients (FO-MAML) or of ``theta - theta_adapted`` (Reptile),
applied to the shared initialisation with Adam.

Baselines through the same loss and loop: ``from_scratch`` (a freshly initialised generator trained
for many steps per teacher) and ``pixels`` (PURER / DeepInversion: optimise the images directly).

The inversion loss on a batch ``x`` with intended labels ``y``::

    L = w_ce * CE(T(aug(x)), y)                         # the teacher sees the intended classes
      + w_bn * sum_l ||mu_l(x) - mu_l^T||_2 + ||var_l(x) - var_l^T||_2   # DeepInversion feature statistics
      + w_tv * TV(x)                                    # smoothness
      - w_adv * JS(T(aug(x)) || S(aug(x)))              # samples where the meta-learner S disagrees

The adversarial term uses the Jensen-Shannon divergence (bounded by log 2, so maximising it cannot
diverge) between softmax distributions computed from logits; it is only on when a student is given.
Both distributions are over the *teacher's* classes, whatever the meta-learner's way: the student is
asked about the teacher's ``N`` classes (:func:`meta_learner_student`).
Everything here is pure torch; callers pass a ``torch.Generator`` for every random draw.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from free.maml import Params, head_for_classes, logits
from free.models import Generator

# The adversarial term's student: (images (B, C, H, W) in [0, 1], their intended labels (B,) in
# 0..N-1, the teacher's class count N) -> (B, N) logits over the teacher's classes.
Student = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# Called at every step of a recovery with (step, the batch at that step, detached, seconds spent on
# the recovery so far, this call excluded); returns True to stop after this step. Benchmarks use it
# to measure quality without the measurement counting as recovery time.
Probe = Callable[[int, torch.Tensor, float], bool]
CURVE_KEYS = ("loss", "ce", "bn", "tv", "adv", "teacher_acc")


@dataclass(frozen=True)
class LossWeights:
    ce: float = 1.0
    bn: float = 1.0
    tv: float = 0.0
    adv: float = 0.0


@dataclass(frozen=True)
class InversionSettings:
    """What one recovery does; built from :class:`free.config.schema.InversionConfig`."""

    steps: int = 5  # inner steps (meta) or scratch_steps (baselines)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    weights: LossWeights = field(default_factory=LossWeights)
    augment: bool = True
    max_shift: int = 2  # random translation in pixels (augmentation)


@dataclass
class Recovery:
    """The outcome of recovering one batch from one teacher.

    Attributes:
        images: ``(n_way * per_class, C, H, W)`` in [0, 1], detached.
        labels: ``(n_way * per_class,)`` class-major intended labels.
        curve: per step (``0..steps``; the last is after the final update): ``loss``, each term,
            and ``teacher_acc`` (teacher accuracy on the batch, augmented as in training).
        seconds: wall time of the recovery.
        outer_grad: for the meta-generator, this task's contribution to the outer update.
    """

    images: torch.Tensor
    labels: torch.Tensor
    curve: list[dict[str, float]]
    seconds: float
    outer_grad: dict[str, torch.Tensor] | None = None


class FeatureStatistics:
    """Forward hooks on a teacher's BatchNorm layers that measure how far a batch's feature statistics
    are from the statistics the teacher saw in training (its running mean and variance).

    Use as a context manager around the teacher's forward pass; :meth:`loss` sums over layers
    ``||mu - running_mean||_2 + ||var - running_var||_2`` (DeepInversion, Yin et al. 2020, Eq. 4).
    """

    def __init__(self, teacher: nn.Module) -> None:
        self.layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
        self._terms: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        x = inputs[0]  # (B, C, H, W)
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self._terms.append(
            torch.linalg.vector_norm(mean - module.running_mean) + torch.linalg.vector_norm(var - module.running_var)
        )

    def __enter__(self) -> FeatureStatistics:
        self._terms = []
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def loss(self) -> torch.Tensor:
        return torch.stack(self._terms).sum() if self._terms else torch.zeros(())


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels of ``(B, C, H, W)`` images."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def jensen_shannon(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Mean JS divergence between the softmax distributions of two ``(B, N)`` logit tensors.

    Computed from log-probabilities (``kl_div`` expects log-probabilities as its first argument; the
    official code's feeding of probabilities is a known mistake we do not copy).

    Raises:
        ValueError: the two have different widths: they are not distributions over the same classes.
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(
            f"JS divergence needs logits over one label space, got {tuple(logits_p.shape)} and "
            f"{tuple(logits_q.shape)}; map the student to the teacher's classes first (meta_learner_student)"
        )
    log_p, log_q = F.log_softmax(logits_p, dim=1), F.log_softmax(logits_q, dim=1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_pm = F.kl_div(log_m, log_p, log_target=True, reduction="batchmean")
    kl_qm = F.kl_div(log_m, log_q, log_target=True, reduction="batchmean")
    return 0.5 * (kl_pm + kl_qm)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate the whole batch by a random offset in ``[-max_shift, max_shift]`` (reflect padding).

    Differentiable in ``x``: the teacher must recognise the class wherever the stroke sits.
    """
    if max_shift <= 0:
        return x
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    padded = F.pad(x, (max_shift,) * 4, mode="reflect")
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def inversion_loss(
    teacher: nn.Module,
    stats: FeatureStatistics,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: InversionSettings,
    generator: torch.Generator,
    student: Student | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted inversion loss of a batch and its parts (detached 0-d tensors, for curves).

    The parts stay tensors so that a recovery syncs with the device once at its end, not six times
    per step (see :func:`_optimise`).
    """
    w = settings.weights
    seen = random_shift(x, settings.max_shift, generator) if settings.augment else x
    with stats:
        teacher_logits = teacher(seen)  # (B, n_way)
    ce = F.cross_entropy(teacher_logits, y)
    zero = x.new_zeros(())  # on x's device, so the curve's parts stack without a copy
    bn = stats.loss() if (w.bn > 0 and stats.layers) else zero
    tv = total_variation(x) if w.tv > 0 else zero
    adv = zero
    if student is not None and w.adv > 0:
        adv = jensen_shannon(teacher_logits, student(seen, y, teacher_logits.shape[1]))  # both (B, N_teacher)
    loss = w.ce * ce + w.bn * bn + w.tv * tv - w.adv * adv
    acc = (teacher_logits.argmax(dim=1) == y).float().mean()
    parts = dict(zip(CURVE_KEYS, (loss, ce, bn, tv, adv, acc), strict=True))
    return loss, {key: value.detach() for key, value in parts.items()}


def meta_learner_student(model: nn.Module, params: Params, buffers: Params) -> Student:
    """The meta-learner as the adversarial term's student, asked about the teacher's own classes.

    The term rewards samples on which the meta-learner disagrees with the teacher *about the
    teacher's classes*, so the student must score the teacher's ``N`` classes, whatever the learner's
    way. It is the meta-learner exactly as it starts an ``N``-way task, before any inner step:
    :func:`free.maml.head_for_classes` (the one place the project chooses that head, shared with
    meta-testing and serving) with the batch being recovered, under its intended labels, as the
    support set. So:

    * linear head and ``N`` equal to its width: the meta-learned head as it is - the official code's
      construction (FREE/PURER synthesizers compare ``student(x)`` with ``teacher(x)`` element-wise,
      which assumes the teacher and the meta-learner have the same number of classes), and runs with
      equal widths are unchanged;
    * any other ``N`` (a 10- or 3-class teacher, a zoo imported with mixed widths) or a proto head:
      nearest class prototype in the learner's feature space (``W_k = 2 c_k``, ``b_k = -||c_k||^2``),
      the head an ``N``-way adaptation starts from. A sample is then "hard" when the meta-learner
      puts it nearer another class's prototype than the teacher's answer.

    The support is the batch itself because it is the only labelled set of this teacher's classes
    at hand (a teacher met for the first time has nothing in the bank yet); it is detached, so the
    generator is scored on where each sample falls relative to fixed prototypes and cannot gain by
    moving the prototypes. No inner steps, as in the official code (and one more forward pass per
    step, not an adaptation).

    Args:
        model: the meta-learner's architecture; params, buffers: its current initialisation (detached).

    Returns:
        A :data:`Student`: ``(images (B, C, H, W), labels (B,), N) -> (B, N)`` logits.
    """

    def student(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
        start = head_for_classes(model, params, buffers, x.detach(), y, n_classes)
        return logits(model, start, buffers, x)  # (B, N), differentiable in x

    return student


def intended_labels(n_way: int, per_class: int, device: torch.device | None = None) -> torch.Tensor:
    """``(n_way * per_class,)`` labels ``[0]*per_class + [1]*per_class + ...`` (class-major)."""
    return torch.arange(n_way, device=device).repeat_interleave(per_class)


# The wall clock of recoveries; tests replace it to check the probe's time is not counted.
clock = time.perf_counter


def _optimise(
    variables: list[torch.Tensor],
    render: Callable[[], torch.Tensor],
    teacher: nn.Module,
    y: torch.Tensor,
    settings: InversionSettings,
    rng: torch.Generator,
    student: Student | None,
    probe: Probe | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, float]]]:
    """``settings.steps`` Adam steps on ``variables``, where ``render()`` draws the batch from them.

    Returns (final images, final loss, curve). The final forward pass after the last update gives
    both the recovered images and the loss whose gradient is the task's first-order meta-gradient.
    A ``probe`` (see :data:`Probe`) may stop the recovery early; its own time is not counted.
    """
    teacher.eval()  # running statistics are the target of the BN term; never update them
    stats = FeatureStatistics(teacher)
    optimiser = torch.optim.Adam(variables, lr=settings.lr, betas=settings.betas)
    parts_per_step: list[dict[str, torch.Tensor]] = []
    start, probing = clock(), 0.0
    for step in range(settings.steps + 1):
        x = render()
        loss, parts = inversion_loss(teacher, stats, x, y, settings, rng, student)
        parts_per_step.append(parts)
        stop = False
        if probe is not None:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)  # host time means device time only after a sync
            now = clock()
            stop = probe(step, x.detach(), now - start - probing)
            probing += clock() - now
        if step == settings.steps or stop:
            break
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return x.detach(), loss, _curve(parts_per_step)


def _curve(parts_per_step: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    """Per-step floats from per-step tensors, with a single device-to-host copy."""
    table = torch.stack([torch.stack([parts[k] for k in CURVE_KEYS]) for parts in parts_per_step]).tolist()
    return [{"step": step, **dict(zip(CURVE_KEYS, row, strict=True))} for step, row in enumerate(table)]


def _optimise_generator(
    g: Generator,
    teacher: nn.Module,
    y: torch.Tensor,
    settings: InversionSettings,
    rng: torch.Generator,
    student: Student | None,
    probe: Probe | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, float]]]:
    """Optimise a generator and a fresh latent ``z`` (one per image) together."""
    z = g.sample_latent(len(y), generator=rng).requires_grad_(True)
    return _optimise([*g.parameters(), z], lambda: g(z), teacher, y, settings, rng, student, probe)


class MetaGenerator:
    """FREE's meta-learned generator initialisation and its first-order outer update.

    Args:
        generator: the shared initialisation ``theta_G`` (its weights are meta-learned in place).
        outer_lr: Adam learning rate of the outer update; betas as the inner loop's.
        outer_update: ``"gradient"`` (FO-MAML: the adapted copies' gradients) or ``"reptile"``
            (``theta - theta_adapted``).
    """

    def __init__(
        self,
        generator: Generator,
        outer_lr: float,
        betas: tuple[float, float] = (0.5, 0.999),
        outer_update: str = "gradient",
    ) -> None:
        if outer_update not in ("gradient", "reptile"):
            raise ValueError(f"inversion.outer_update must be gradient or reptile, got {outer_update!r}")
        self.generator = generator.train()
        self.outer_update = outer_update
        self.optimiser = torch.optim.Adam(self.generator.parameters(), lr=outer_lr, betas=betas)

    def recover(
        self,
        teacher: nn.Module,
        n_way: int,
        per_class: int,
        settings: InversionSettings,
        rng: torch.Generator,
        student: Student | None = None,
        probe: Probe | None = None,
    ) -> Recovery:
        """Adapt a copy of the initialisation to ``teacher`` in ``settings.steps`` steps."""
        start = time.perf_counter()
        adapted = copy.deepcopy(self.generator)
        y = intended_labels(n_way, per_class, device=next(adapted.parameters()).device)
        images, loss, curve = _optimise_generator(adapted, teacher, y, settings, rng, student, probe)
        names = [name for name, _ in adapted.named_parameters()]
        if self.outer_update == "gradient":
            grads = torch.autograd.grad(loss, list(adapted.parameters()))
            outer = {name: g.detach() for name, g in zip(names, grads, strict=True)}
        else:
            initial = dict(self.generator.named_parameters())
            outer = {name: (initial[name] - p).detach() for name, p in adapted.named_parameters()}
        return Recovery(images, y, curve, time.perf_counter() - start, outer)

    def outer_step(self, recoveries: list[Recovery]) -> None:
        """Apply the sum of the tasks' contributions to the initialisation with Adam."""
        contributions = [r.outer_grad for r in recoveries if r.outer_grad is not None]
        if not contributions:
            return
        self.optimiser.zero_grad(set_to_none=True)
        for name, p in self.generator.named_parameters():
            p.grad = torch.stack([c[name] for c in contributions]).sum(dim=0)
        self.optimiser.step()


def recover_from_scratch(
    teacher: nn.Module,
    image_size: int,
    channels: int,
    latent_dim: int,
    n_way: int,
    per_class: int,
    settings: InversionSettings,
    rng: torch.Generator,
    student: Student | None = None,
    probe: Probe | None = None,
) -> Recovery:
    """Baseline: a freshly initialised generator (init drawn from ``rng``) trained for ``settings.steps``."""
    start = time.perf_counter()
    device = next(teacher.parameters()).device
    g = _fresh_generator(image_size, channels, latent_dim, rng).to(device)
    y = intended_labels(n_way, per_class, device=device)
    images, _, curve = _optimise_generator(g, teacher, y, settings, rng, student, probe)
    return Recovery(images, y, curve, time.perf_counter() - start)


def recover_pixels(
    teacher: nn.Module,
    image_size: int,
    channels: int,
    n_way: int,
    per_class: int,
    settings: InversionSettings,
    rng: torch.Generator,
    student: Student | None = None,
    probe: Probe | None = None,
) -> Recovery:
    """Baseline (PURER / DeepInversion): optimise the images themselves, as ``sigmoid(logits)``."""
    start = time.perf_counter()
    device = next(teacher.parameters()).device
    y = intended_labels(n_way, per_class, device=device)
    pixel_logits = torch.randn(len(y), channels, image_size, image_size, generator=rng).to(device).requires_grad_(True)
    render = lambda: torch.sigmoid(pixel_logits)  # noqa: E731 - images stay in [0, 1]
    images, _, curve = _optimise([pixel_logits], render, teacher, y, settings, rng, student, probe)
    return Recovery(images, y, curve, time.perf_counter() - start)


def _fresh_generator(image_size: int, channels: int, latent_dim: int, rng: torch.Generator) -> Generator:
    """A generator whose initial weights come from ``rng`` (not the global RNG), for reproducibility."""
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    with torch.random.fork_rng(devices=[]):  # leave the global RNG as it was
        torch.manual_seed(seed)
        return Generator(image_size, channels, latent_dim)
