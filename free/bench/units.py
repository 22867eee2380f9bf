"""``free bench units``: what one unit of work costs at paper scale, and how many units a paper run does.

A paper-scale run (``experiment=mini_imagenet``: 100 teachers, 84 px, 2000 meta-iterations, 600
episodes per shot) is far beyond a 2-core CPU: one ResNet-18 meta-test episode there is several
TFLOP. So the costs are built from **primitives** measured at the paper's shapes (image size,
channels, widths) on a small batch of ``batch`` images, each one real call of the project's code:

* ``teacher/train``: one teacher training step (:func:`free.teachers._train_epoch` on exactly one
  batch: random shift, forward, backward, Adam), ``teacher/forward`` its evaluation pass;
* ``teacher/input_grad``: the teacher in the inversion loss (eval mode, BN-statistics hooks, random
  shift), backward to the images only (teachers are frozen);
* ``generator/train``: the generator forward and backward to its weights and latents;
* per meta-learner: ``forward`` (query logits), ``train`` (:func:`free.maml.loss_grad`, one inner
  step or a task's query gradient), ``input_grad`` (the adversarial term's student,
  :func:`free.inversion.meta_learner_student`, backward to the images).

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix products,
forward and backward; element-wise ops and optimiser steps are not counted) on the first, untimed
call, so they do not depend on the machine's load. Every counted op is linear in the batch, so
FLOPs per image are exact. Seconds are the median of ``repeats`` timed calls; the 1-minute load
average before and after each is recorded because the CPU is shared. The process's peak resident set
(``/proc/self/clear_refs``; device peak allocation on CUDA) is recorded too, but on CPU the allocator
reuses freed memory, so a unit's memory is its activations, from :class:`ActivationMeter`.

**Units** are then composed from the primitives by the structure of the code (``compose_*``;
``tests/test_bench_units.py`` checks each composition against the FLOPs counted on the real
function at small shapes): a recovery is ``K + 1`` passes of ``B`` images through generator,
teacher and student; a meta-update ``meta_batch`` tasks of ``inner_steps`` support steps plus one
query gradient; an episode ``inner_steps`` support steps plus one query forward. A unit cheap
enough (``direct_gflop`` and below) is also run whole, through the real function at the full
shape, and its counted FLOPs and measured seconds are stored beside the composed ones.

Composed CPU seconds assume time linear in images (a small batch uses the CPU less well than a big
one, so they lean high); GPU seconds are FLOPs / an *assumed* achieved throughput, floored by an
assumed cost per sequential pass. Both assumptions are stored in the result; neither is a measurement.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from free.artifacts import resolve_device, set_threads
from free.bench.common import PeakMemory, pyplot, rss_mib, savefig, timed
from free.config import to_yaml
from free.config.schema import Config
from free.data.episodes import Episode
from free.evaluate import episode_accuracies
from free.inversion import (
    FeatureStatistics,
    InversionSettings,
    LossWeights,
    MetaGenerator,
    meta_learner_student,
    random_shift,
)
from free.maml import logits, loss_grad, split_state
from free.metalearn import MetaSettings, meta_update
from free.models import Generator, build_classifier
from free.stages.teachers import SHIFT
from free.teachers import EVAL_CHUNK, _train_epoch
from free.teachers import evaluate as evaluate_teacher

#: Images per class of MiniImageNet and CIFAR-FS (the data set is not needed to count a paper run).
PAPER_IMAGES_PER_CLASS = 600


@dataclass(frozen=True)
class Learner:
    """A meta-learner backbone to cost: ``arch`` of :data:`free.models.CLASSIFIER_ARCHS` at ``width``."""

    arch: str
    width: int

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.width}"


@dataclass(frozen=True)
class UnitsBench:
    """The command's settings (see ``free bench units --help``)."""

    learners: tuple[Learner, ...]
    batch: int = 4  # images per primitive measurement
    repeats: int = 3  # timed calls per measurement (median)
    images_per_class: int = PAPER_IMAGES_PER_CLASS  # of the data set, for the teacher counts
    direct_gflop: float = 15.0  # run a unit whole when it costs at most this
    assumed_tflops: float = 20.0  # achieved GPU throughput (an assumption, see docs/SCALING.md)
    assumed_ms_per_pass: float = 1.0  # GPU cost floor per sequential forward/backward pass (assumption)
    gpus: tuple[int, ...] = (1, 4, 16)


def parse_learners(text: str) -> tuple[Learner, ...]:
    """``"conv4:32,resnet18:64"`` -> learners; a name without ``:width`` is refused."""
    learners = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        arch, _, width = item.partition(":")
        if not width.isdigit() or int(width) < 1:
            raise ValueError(f"--learners takes ARCH:WIDTH items such as conv4:32,resnet18:64, got {item!r}")
        learners.append(Learner(arch.strip().lower(), int(width)))
    if not learners:
        raise ValueError("--learners is empty; give at least one ARCH:WIDTH, e.g. conv4:32")
    return tuple(learners)


# ---- measuring one call ------------------------------------------------------------------------


class ActivationMeter:
    """Activation memory of a call from its leaf modules' outputs (forward hooks on every module).

    ``kept_bytes``: the sum of all leaf outputs, what a pass with a backward keeps until the backward
    (an estimate: autograd saves about one tensor per layer); ``transient_bytes``: twice the largest
    leaf output, what a forward without grad holds at its peak (one layer's input and output). Both
    are linear in the batch and exclude the weights; on a GPU (fp32) the same bytes are needed.
    """

    def __init__(self) -> None:
        self.kept_bytes, self.largest = 0, 0

    def _hook(self, module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if next(module.children(), None) is None and isinstance(output, torch.Tensor):
            size = output.numel() * output.element_size()
            self.kept_bytes += size
            self.largest = max(self.largest, size)

    def __enter__(self) -> ActivationMeter:
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    @property
    def transient_bytes(self) -> int:
        return 2 * self.largest


def measure(work: Callable[[], Any], images: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """FLOPs and activation memory (first, untimed call), median seconds of ``repeats`` calls, the
    process's peak memory, load averages."""
    with FlopCounterMode(display=False) as counter, ActivationMeter() as activations:
        work()  # also the warm-up
    load_before = os.getloadavg()[0]
    before = rss_mib()
    with PeakMemory(device) as peak:
        seconds = [timed(work, device)[1] for _ in range(repeats)]
    extra = peak.peak_mib - before if device.type == "cpu" else peak.peak_mib
    return {
        "images": images,
        "flops": counter.get_total_flops(),
        "seconds": statistics.median(seconds),
        "seconds_each": seconds,
        "activation_mib": activations.kept_bytes / 2**20,
        "transient_mib": activations.transient_bytes / 2**20,
        "peak_mib": peak.peak_mib,
        "extra_mib": max(extra, 0.0),
        "peak_is_process_wide": not peak.reset,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def count_flops(work: Callable[[], Any]) -> int:
    """FLOPs of one call of ``work`` (convolutions and matrix products, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


# ---- the networks, as the stages build them ------------------------------------------------------


def build_teacher(cfg: Config, device: torch.device) -> torch.nn.Module:
    ds, t = cfg.dataset, cfg.teachers
    return build_classifier(t.archs[0], ds.channels, t.n_way, ds.image_size, t.width, ds.mean, ds.std).to(device)


def build_learner(cfg: Config, learner: Learner, device: torch.device) -> torch.nn.Module:
    ds = cfg.dataset
    return build_classifier(
        learner.arch,
        ds.channels,
        cfg.metalearn.n_way,
        ds.image_size,
        learner.width,
        ds.mean,
        ds.std,
        track_running_stats=False,
        head=cfg.model.head,
    ).to(device)


def _images(n: int, cfg: Config, device: torch.device, requires_grad: bool = False) -> torch.Tensor:
    ds = cfg.dataset
    return torch.rand(n, ds.channels, ds.image_size, ds.image_size, device=device, requires_grad=requires_grad)


def _labels(n: int, n_way: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device) % n_way


# ---- primitives: one real call on `n` images -----------------------------------------------------


def primitive_calls(cfg: Config, learners: tuple[Learner, ...], n: int, device: torch.device):
    """``{(network, pass): work}`` for every primitive, each a closure over ``n`` images."""
    teacher = build_teacher(cfg, device)
    frozen = build_teacher(cfg, device).eval().requires_grad_(False)  # as metatrain.load_zoo
    n_way = cfg.teachers.n_way
    x, y = _images(n, cfg, device), _labels(n, n_way, device)
    optimiser = torch.optim.Adam(teacher.parameters(), lr=cfg.teachers.lr)
    rng = torch.Generator().manual_seed(cfg.seed)
    calls: dict[tuple[str, str], Callable[[], Any]] = {
        ("teacher", "train"): lambda: _train_epoch(teacher, optimiser, x, y, n, rng, SHIFT),
        ("teacher", "forward"): lambda: evaluate_teacher(teacher, x, y),
        ("teacher", "input_grad"): _teacher_input_grad(frozen, cfg, n, device, rng),
        ("generator", "train"): _generator_train(cfg, n, device),
    }
    for learner in learners:
        model = build_learner(cfg, learner, device)
        params, buffers = split_state(model)
        calls[(learner.name, "forward")] = _learner_forward(model, params, buffers, x)
        calls[(learner.name, "train")] = lambda m=model, p=params, b=buffers: loss_grad(m, p, b, x, y)
        calls[(learner.name, "input_grad")] = _student_input_grad(model, params, buffers, cfg, n, device)
    return calls


def _learner_forward(model, params, buffers, x):
    def work():
        with torch.no_grad():
            return logits(model, params, buffers, x)

    return work


def _teacher_input_grad(teacher, cfg: Config, n: int, device: torch.device, rng: torch.Generator):
    """The teacher's part of the inversion loss (:func:`free.inversion.inversion_loss`), to the images."""
    x, y = _images(n, cfg, device, requires_grad=True), _labels(n, cfg.teachers.n_way, device)
    stats = FeatureStatistics(teacher)

    def work():
        with stats:
            out = teacher(random_shift(x, InversionSettings.max_shift, rng))
        return torch.autograd.grad(F.cross_entropy(out, y) + stats.loss(), x)

    return work


def _generator_train(cfg: Config, n: int, device: torch.device):
    ds = cfg.dataset
    g = Generator(ds.image_size, ds.channels, cfg.inversion.latent_dim).to(device)
    z = g.sample_latent(n).requires_grad_(True)

    def work():
        g.zero_grad(set_to_none=True)
        z.grad = None
        g(z).mean().backward()

    return work


def _student_input_grad(model, params, buffers, cfg: Config, n: int, device: torch.device):
    """The meta-learner as the adversarial term's student, backward to the images (its weights are fixed)."""
    student = meta_learner_student(model, params, buffers)
    n_way = cfg.teachers.n_way
    x, y = _images(n, cfg, device, requires_grad=True), _labels(n, n_way, device)

    def work():
        x.grad = None  # backward(), not autograd.grad: the FLOP counter's module hooks refuse the latter here
        student(x, y, n_way).logsumexp(dim=1).mean().backward()

    return work


# ---- units: real functions at full shape (what the compositions are checked against) -------------


def unit_calls(cfg: Config, learner: Learner, device: torch.device) -> dict[str, Callable[[], Any]]:
    """``{unit: work}``: each unit as the stages run it, at the configured (full) shape."""
    t, inv, ml, ev = cfg.teachers, cfg.inversion, cfg.metalearn, cfg.evaluate
    rng = torch.Generator().manual_seed(cfg.seed)
    teacher = build_teacher(cfg, device)
    optimiser = torch.optim.Adam(teacher.parameters(), lr=t.lr)
    xb, yb = _images(t.batch_size, cfg, device), _labels(t.batch_size, t.n_way, device)
    n_val = held_out_images(cfg, PAPER_IMAGES_PER_CLASS)
    xv, yv = _images(n_val, cfg, device), _labels(n_val, t.n_way, device)
    frozen = build_teacher(cfg, device).eval().requires_grad_(False)
    model = build_learner(cfg, learner, device)
    params, buffers = split_state(model)
    generator = Generator(cfg.dataset.image_size, cfg.dataset.channels, inv.latent_dim).to(device)
    meta_generator = MetaGenerator(generator, inv.outer_lr, tuple(inv.betas), inv.outer_update)
    weights = LossWeights(inv.loss.ce, inv.loss.bn, inv.loss.tv, inv.loss.adv)
    settings = InversionSettings(inv.inner_steps, inv.inner_lr, tuple(inv.betas), weights, inv.augment)
    student = meta_learner_student(model, params, buffers) if inv.loss.adv > 0 else None
    meta_settings = MetaSettings(ml.inner_steps, ml.inner_lr, ml.outer_lr, ml.reptile_beta, ml.align)
    tasks = [_episode(cfg, ml.n_way, ml.k_shot, ml.q_query, device, batch=False) for _ in range(ml.meta_batch)]
    calls = {
        "teacher_step": lambda: _train_epoch(teacher, optimiser, xb, yb, t.batch_size, rng, SHIFT),
        "teacher_eval": lambda: evaluate_teacher(teacher, xv, yv),
        "recovery": lambda: meta_generator.recover(frozen, t.n_way, inv.images_per_class, settings, rng, student),
        "meta_update": lambda: meta_update(model, params, buffers, tasks, meta_settings),
        "val_episode": _episode_call(model, params, buffers, cfg, ml.k_shot, ml.q_query, ml.inner_steps, device),
    }
    for k in dict.fromkeys(ev.shots):
        test = _episode_call(model, params, buffers, cfg, k, ev.q_query, ev.inner_steps, device)
        calls[f"test_episode_{k}shot"] = test
    return calls


def _episode(cfg: Config, n_way: int, k: int, q: int, device: torch.device, batch: bool = True) -> Episode:
    lead = (1,) if batch else ()
    support_y, query_y = (torch.arange(n_way).repeat_interleave(m).expand(*lead, -1) for m in (k, q))
    shape = (cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    episode = Episode(
        torch.rand(*lead, n_way * k, *shape),
        support_y.contiguous(),
        torch.rand(*lead, n_way * q, *shape),
        query_y.contiguous(),
        torch.arange(n_way).expand(*lead, -1).contiguous(),
    )
    return episode.to(device)


def _episode_call(model, params, buffers, cfg: Config, k: int, q: int, steps: int, device: torch.device):
    """One episode as :func:`free.evaluate.evaluate` runs it on CPU (the loop; vmap only batches it)."""
    episode = _episode(cfg, cfg.evaluate.n_way, k, q, device)
    return lambda: episode_accuracies(model, params, buffers, episode, steps, cfg.metalearn.inner_lr, False)


# ---- compositions: units from primitives ---------------------------------------------------------


def held_out_images(cfg: Config, images_per_class: int) -> int:
    """A teacher's held-out images, as :func:`free.teachers.holdout_split` draws them."""
    t = cfg.teachers
    n_val = min(max(1, math.ceil(t.holdout_fraction * images_per_class)), images_per_class - 1)
    return t.n_way * n_val


def unit_structure(cfg: Config, learner: Learner) -> dict[str, dict[str, Any]]:
    """Per unit: ``terms`` = [(images, network, pass)] summed per image; ``memory`` = groups of terms
    alive at once (the unit needs its largest group); ``passes`` = sequential forward/backward passes
    (CPU loop; ``gpu_passes`` where the stage batches episodes with vmap off-CPU)."""
    t, inv, ml, ev = cfg.teachers, cfg.inversion, cfg.metalearn, cfg.evaluate
    L = learner.name
    n_val = held_out_images(cfg, PAPER_IMAGES_PER_CLASS)
    b = t.n_way * inv.images_per_class  # a recovered batch
    k_steps = inv.inner_steps + 1  # K updates, and the final pass whose gradient is the outer one
    student = [(k_steps * b, L, "input_grad")] if inv.loss.adv > 0 else []
    nk, nq = ml.n_way * ml.k_shot, ml.n_way * ml.q_query

    def episode(k: int, q: int, steps: int) -> dict[str, Any]:
        n_s, n_q = ev.n_way * k, ev.n_way * q
        return {
            "terms": [(steps * n_s, L, "train"), (n_q, L, "forward")],
            "memory": [[(n_s, L, "train")], [(n_q, L, "forward")]],  # the support graph, then the query
            "passes": steps + 1,
            "gpu_passes": (steps + 1) / ev.episode_batch,
        }

    units = {
        "teacher_step": {"terms": [(t.batch_size, "teacher", "train")], "passes": 1},
        "teacher_eval": {
            "terms": [(n_val, "teacher", "forward")],
            "memory": [[(min(n_val, EVAL_CHUNK), "teacher", "forward")]],
            "passes": math.ceil(n_val / EVAL_CHUNK),
        },
        "recovery": {
            "terms": [(k_steps * b, "generator", "train"), (k_steps * b, "teacher", "input_grad"), *student],
            "memory": [[(b, "generator", "train"), (b, "teacher", "input_grad"), *[(b, n, p) for _, n, p in student]]],
            "passes": k_steps,
        },
        "meta_update": {
            "terms": [(ml.meta_batch * (ml.inner_steps * nk + nq), L, "train")],
            "memory": [[(nk, L, "train")], [(nq, L, "train")]],
            "passes": ml.meta_batch * (ml.inner_steps + 1),
        },
        "val_episode": episode(ml.k_shot, ml.q_query, ml.inner_steps),
    }
    for k in dict.fromkeys(ev.shots):
        units[f"test_episode_{k}shot"] = episode(k, ev.q_query, ev.inner_steps)
    for unit in units.values():
        unit.setdefault("memory", [unit["terms"]])
        unit.setdefault("gpu_passes", unit["passes"])
    return units


def compose(structure: dict[str, Any], per_image: dict[tuple[str, str], dict[str, float]]) -> dict[str, float]:
    """FLOPs, CPU seconds and memory of a unit from its primitives' per-image costs."""
    return {
        "flops": sum(n * per_image[(net, p)]["flops"] for n, net, p in structure["terms"]),
        "seconds": sum(n * per_image[(net, p)]["seconds"] for n, net, p in structure["terms"]),
        "memory_mib": max(
            sum(n * per_image[(net, p)]["memory_mib"] for n, net, p in group) for group in structure["memory"]
        ),
    }


def paper_counts(cfg: Config, images_per_class: int) -> dict[str, int]:
    """How many times a run of ``cfg`` does each unit (teachers: no early stop, an upper bound)."""
    t, inv, ml, ev = cfg.teachers, cfg.inversion, cfg.metalearn, cfg.evaluate
    n_train = t.n_way * images_per_class - held_out_images(cfg, images_per_class)
    epochs = t.n_teachers * t.max_epochs
    validations = sum(1 for it in range(ml.iterations) if (it + 1) % ml.val_every == 0 or it + 1 == ml.iterations)
    counts = {
        "teacher_step": epochs * math.ceil(n_train / t.batch_size),
        "teacher_eval": epochs,
        "recovery": ml.iterations * inv.teachers_per_step,
        "meta_update": ml.iterations,
        "val_episode": validations * ml.val_episodes,
    }
    counts |= {f"test_episode_{k}shot": ev.episodes for k in dict.fromkeys(ev.shots)}
    return counts


STAGE_OF = {"teacher_step": "teachers", "teacher_eval": "teachers", "recovery": "metatrain", "meta_update": "metatrain"}


def stage_of(unit: str) -> str:
    return STAGE_OF.get(unit, "metatrain" if unit == "val_episode" else "metatest")


# ---- the run ---------------------------------------------------------------------------------------


def run(cfg: Config, settings: UnitsBench, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the primitives, compose the units (running the cheap ones whole), count a paper run."""
    original_threads = torch.get_num_threads()
    set_threads(cfg.threads)
    try:
        return _run(cfg, settings, say)
    finally:
        torch.set_num_threads(original_threads)  # a caller's process keeps its own setting


def _run(cfg: Config, settings: UnitsBench, say: Callable[[str], None]) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    if cfg.model.head != "linear" or cfg.teachers.n_way != cfg.metalearn.n_way:
        raise ValueError(
            "free bench units models the linear head with teachers.n_way == metalearn.n_way (the paper's "
            f"setting); got model.head={cfg.model.head}, teachers.n_way={cfg.teachers.n_way}, "
            f"metalearn.n_way={cfg.metalearn.n_way}"
        )
    load_start = os.getloadavg()
    torch.manual_seed(cfg.seed)
    per_image: dict[tuple[str, str], dict[str, float]] = {}
    primitives = []
    for (network, kind), work in primitive_calls(cfg, settings.learners, settings.batch, device).items():
        m = measure(work, settings.batch, settings.repeats, device)
        memory = m["transient_mib"] if kind == "forward" else m["activation_mib"]
        per_image[(network, kind)] = {k: m[k] / m["images"] for k in ("flops", "seconds")}
        per_image[(network, kind)]["memory_mib"] = memory / m["images"]
        primitives.append({"network": network, "pass": kind, **m})
        say(
            f"{network:12s} {kind:10s} {m['flops'] / m['images'] / 1e9:8.3f} GFLOP/img "
            f"{m['seconds'] / m['images']:8.3f} s/img  load {m['load_before']:.1f}"
        )
    counts = paper_counts(cfg, settings.images_per_class)
    units = []
    shared: dict[str, dict[str, Any]] = {}  # the teacher units' direct runs: the same for every learner
    for learner in settings.learners:
        calls = None
        for name, unit in unit_structure(cfg, learner).items():
            composed = compose(unit, per_image)
            row = {"unit": name, "learner": learner.name, "stage": stage_of(name), **composed}
            row |= {"passes": unit["passes"], "gpu_passes": unit["gpu_passes"], "count": counts[name]}
            if name in shared:
                row["direct"] = shared[name]
            elif composed["flops"] <= settings.direct_gflop * 1e9:
                calls = calls or unit_calls(cfg, learner, device)
                m = measure(calls[name], 1, settings.repeats, device)
                keep = ("flops", "seconds", "seconds_each", "activation_mib", "extra_mib", "load_before")
                row["direct"] = {k: m[k] for k in keep}
                if name.startswith("teacher"):
                    shared[name] = row["direct"]
            units.append(row)
            seen = f", whole: {row['direct']['seconds']:.2f} s" if "direct" in row else ""
            gflop = composed["flops"] / 1e9
            say(f"{learner.name:12s} {name:20s} {gflop:10.1f} GFLOP {composed['seconds']:9.2f} s{seen}")
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "settings": {
            "learners": [learner.name for learner in settings.learners],
            "batch": settings.batch,
            "repeats": settings.repeats,
            "images_per_class": settings.images_per_class,
            "direct_gflop": settings.direct_gflop,
        },
        "assumptions": {
            "gpu_tflops": settings.assumed_tflops,
            "gpu_ms_per_pass": settings.assumed_ms_per_pass,
            "teacher_epochs": "teachers.max_epochs (no early stop: an upper bound)",
        },
        "primitives": primitives,
        "units": units,
        "config": to_yaml(cfg),
    }
    result["paper_run"] = paper_run(result, cfg, settings)
    return result


def gpu_seconds(row: dict[str, Any], assumptions: dict[str, float]) -> float:
    """One unit on one GPU: FLOPs / assumed throughput, at least the assumed cost of its passes."""
    compute = row["flops"] / (assumptions["gpu_tflops"] * 1e12)
    return max(compute, row["gpu_passes"] * assumptions["gpu_ms_per_pass"] / 1000)


def paper_run(result: dict[str, Any], cfg: Config, settings: UnitsBench) -> dict[str, Any]:
    """Per learner: each stage's FLOPs, CPU seconds (this machine) and GPU seconds on 1, 4, 16 GPUs.

    Teachers are independent (one task each: ``ceil(n / G)`` rounds); meta-test episodes too (shards,
    at least one chunk of ``episode_batch`` each); meta-training is one sequential chain of iterations
    (each needs the previous parameters), so it takes the same time on any number of GPUs.
    """
    out: dict[str, Any] = {}
    n_teachers, chunk = cfg.teachers.n_teachers, cfg.evaluate.episode_batch
    for learner in result["settings"]["learners"]:
        rows = [r for r in result["units"] if r["learner"] == learner]
        stages: dict[str, dict[str, float]] = {}
        for r in rows:
            s = stages.setdefault(r["stage"], {"flops": 0.0, "cpu_seconds": 0.0, "gpu_seconds": 0.0, "gpu_chunk": 0.0})
            s["flops"] += r["count"] * r["flops"]
            s["cpu_seconds"] += r["count"] * r["seconds"]
            s["gpu_seconds"] += r["count"] * gpu_seconds(r, result["assumptions"])
            if r["stage"] == "metatest":
                s["gpu_chunk"] = max(s["gpu_chunk"], chunk * gpu_seconds(r, result["assumptions"]))
        wall = {}
        for g in settings.gpus:
            teachers = math.ceil(n_teachers / g) * stages["teachers"]["gpu_seconds"] / max(n_teachers, 1)
            metatest = max(stages["metatest"]["gpu_seconds"] / g, stages["metatest"]["gpu_chunk"])
            metatrain = stages["metatrain"]["gpu_seconds"]
            wall[str(g)] = {"teachers": teachers, "metatrain": metatrain, "metatest": metatest}
            wall[str(g)]["total"] = teachers + metatrain + metatest
        for s in stages.values():
            s.pop("gpu_chunk")
        out[learner] = {"stages": stages, "gpu_wall_seconds": wall}
    return out


def plot(result: dict[str, Any], json_path) -> Any:
    """Paper-run FLOPs per unit and learner (log scale), and estimated GPU wall time by GPU count."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    learners = result["settings"]["learners"]
    names = list(dict.fromkeys(r["unit"] for r in result["units"]))
    width = 0.8 / len(learners)
    for i, learner in enumerate(learners):
        totals = {r["unit"]: r["count"] * r["flops"] / 1e15 for r in result["units"] if r["learner"] == learner}
        axes[0].bar([j + i * width for j in range(len(names))], [totals[n] for n in names], width, label=learner)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    axes[0].set(yscale="log", ylabel="PFLOP in a paper run", title="where the FLOPs go (all units of a run)")
    axes[0].legend(fontsize=8)
    gpus = list(result["paper_run"][learners[0]]["gpu_wall_seconds"])
    for learner in learners:
        wall = result["paper_run"][learner]["gpu_wall_seconds"]
        axes[1].plot([int(g) for g in gpus], [wall[g]["total"] / 3600 for g in gpus], marker="o", label=learner)
    a = result["assumptions"]
    axes[1].set(
        xscale="log",
        xlabel="GPUs",
        ylabel="hours (estimate)",
        title=f"paper run, assumed {a['gpu_tflops']:g} TFLOP/s, {a['gpu_ms_per_pass']:g} ms/pass",
    )
    axes[1].set_xticks([int(g) for g in gpus], gpus)
    axes[1].legend(fontsize=8)
    return savefig(fig, json_path)
