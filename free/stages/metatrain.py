"""Stage ``metatrain``: FREE's interleaved loop, resumable, with its three versioned outputs.

Each meta-iteration (Wei et al., CVPR 2024, Alg. 1):

1. pick ``inversion.teachers_per_step`` teachers of the zoo;
2. recover a batch from each (meta-generator: ``inner_steps`` steps from the shared initialisation;
   baselines: a fresh generator or raw pixels for ``scratch_steps``), then update the meta-generator;
3. store the batches in the memory bank (per teacher and class, ring buffers);
4. sample ``metalearn.meta_batch`` pseudo tasks - from the fresh teachers and, with replay, from
   the whole bank - and update the meta-learner (aligned or averaged, :mod:`free.metalearn`);
5. every ``val_every`` iterations, meta-validate on real images of the *meta-val* classes and keep
   the best initialisation (never the meta-test classes).

``method=oracle`` replaces 1-3 by real meta-train episodes; ``method=random_init`` has 0 iterations.

Outputs: ``artifacts/metalearner/`` (best initialisation + card + curves), ``artifacts/generator/``
(meta-generator weights, recovery curves, sample grids), ``artifacts/taskcache/`` (the bank).
Resume state lives under ``<artifacts>/.state/metatrain-<fingerprint>/`` and is written every
``checkpoint_every`` iterations and after the last one; a rerun continues from it and ends with the
same artifacts as an unbroken run. A finished stage with the same inputs does nothing.

A checkpoint is ``state.safetensors`` (weights, optimisers, RNG, curves) plus the memory bank in
``bank/``. The state names the bank it belongs to (its manifest's sha256) and is the commit point:
the next bank is built beside the current one (``bank.next/``, unchanged shards hard-linked), the
state is replaced, then the folders are swapped. A ``kill -9`` anywhere in between leaves a state
and a bank that belong together (:func:`_committed_bank` finishes an interrupted swap), so the
resumed run is byte for byte the unbroken one (tests/test_kill_resume.py). Before any work the
stage checks that its output folders take a write; a write that fails later (disk full, read-only)
raises :class:`free.artifacts.StorageError` naming the file and the fix, with the previous
checkpoint intact (tests/test_disk_faults.py).
"""

from __future__ import annotations

import io
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from free.artifacts import (
    check_writable,
    fingerprint,
    is_done,
    load_tensors,
    mark_done,
    read_json,
    remove_stale_tmp,
    resolve_device,
    save_tensors,
    set_threads,
    write_atomic,
    write_json,
)
from free.checkpoints import CheckpointError, classifier_meta, load_classifier, save_classifier
from free.config.schema import Config, dataset_settings
from free.config.validate import validate_zoo
from free.data import EpisodeSampler, load_splits
from free.data.base import Progress, sha256_file
from free.evaluate import evaluate
from free.inversion import (
    InversionSettings,
    LossWeights,
    MetaGenerator,
    Recovery,
    meta_learner_student,
    recover_from_scratch,
    recover_pixels,
)
from free.maml import Params, split_state
from free.metalearn import MetaSettings, distillation_targets, meta_update
from free.models import Generator, build_classifier
from free.official import OfficialSettings, OfficialUpdate, TeacherBatch
from free.taskcache import MANIFEST, MemoryBank


def run(cfg: Config, progress: Progress | None = None) -> dict[str, Any]:
    """Meta-train (or resume) and write the stage's artifacts; return a summary."""
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    root = Path(cfg.paths.artifacts_dir)
    out = {name: root / name for name in ("metalearner", "generator", "taskcache")}
    zoo_file, splits_file = root / "teachers" / "zoo.json", root / "data" / "splits.json"
    fp = fingerprint(_settings(cfg), inputs=[p for p in (zoo_file, splits_file) if p.is_file()])
    if is_done(out["metalearner"], fp):
        return read_json(out["metalearner"] / "card.json")

    state_dir = root / ".state" / f"metatrain-{fp[:16]}"  # beside its outputs, not shared between runs
    for directory in (*out.values(), state_dir):
        check_writable(directory)  # a full disk fails now, not at the first checkpoint
        remove_stale_tmp(directory)  # what a killed run was writing: never part of the outputs
    loop = MetaTrainLoop(cfg, device, load_zoo(root / "teachers", cfg, device))
    loop.restore(state_dir)
    iterations = range(loop.iteration, cfg.metalearn.iterations)
    if progress is not None and len(iterations):
        iterations = progress(iterations, f"meta-training ({cfg.method.name})", len(iterations))
    for it in iterations:
        loop.step()
        if (it + 1) % cfg.metalearn.val_every == 0 or it + 1 == cfg.metalearn.iterations:
            loop.validate()
        if (it + 1) % cfg.metalearn.checkpoint_every == 0 or it + 1 == cfg.metalearn.iterations:
            loop.save_state(state_dir)  # also after the last: a failure writing the outputs loses no work
    summary = loop.write_artifacts(out, fp)
    mark_done(out["metalearner"], fp, best_val_acc=summary["best_val_acc"])
    shutil.rmtree(state_dir, ignore_errors=True)
    return summary


def _settings(cfg: Config) -> dict[str, Any]:
    """What this stage's result depends on (machine paths and tracking excluded)."""
    dataset = dataset_settings(cfg.dataset)
    return {
        "dataset": dataset,
        "model": asdict(cfg.model),
        "inversion": asdict(cfg.inversion),
        "taskcache": asdict(cfg.taskcache),
        "metalearn": asdict(cfg.metalearn),
        "method": cfg.method.name,
        "seed": cfg.seed,
        "device": cfg.device,
        "threads": cfg.threads,  # the summation order, so the bits (see params/experiment/tiny.yaml)
    }


def load_zoo(directory: Path, cfg: Config, device: torch.device) -> list[tuple[torch.nn.Module, dict[str, Any]]]:
    """Teachers of ``teachers/zoo.json`` (not needed by oracle / random_init)."""
    if cfg.metalearn.data == "real" or cfg.metalearn.iterations == 0:
        return []
    manifest = directory / "zoo.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: run `free teachers` (or `free teachers import DIR`) first")
    zoo = []
    for card in read_json(manifest)["teachers"]:
        model, meta = load_classifier(directory / card["file"])
        zoo.append((model.to(device).eval().requires_grad_(False), meta))
    return zoo


class MetaTrainLoop:
    """The state of one meta-training run and its iteration; kept out of :func:`run` to checkpoint it."""

    def __init__(self, cfg: Config, device: torch.device, zoo: list[tuple[torch.nn.Module, dict[str, Any]]]) -> None:
        validate_zoo(cfg, [meta["n_classes"] for _, meta in zoo])  # an imported zoo's widths, before any work
        self.cfg, self.device, self.zoo = cfg, device, zoo
        ds, ml, inv = cfg.dataset, cfg.metalearn, cfg.inversion
        with torch.random.fork_rng(devices=[]):  # initialisations from the seed, not from whatever ran before
            torch.manual_seed(cfg.seed)
            self.learner = build_classifier(
                cfg.model.arch,
                ds.channels,
                ml.n_way,
                ds.image_size,
                cfg.model.width,
                ds.mean,
                ds.std,
                track_running_stats=False,
                head=cfg.model.head,
            ).to(device)
            generator = Generator(ds.image_size, ds.channels, inv.latent_dim).to(device)
        self.params, self.buffers = split_state(self.learner)
        self.best_params: Params = dict(self.params)
        self.best_val_acc, self.best_iteration = -1.0, 0
        self.meta_generator = MetaGenerator(generator, inv.outer_lr, tuple(inv.betas), inv.outer_update)
        self.bank = MemoryBank(
            cfg.taskcache.slots, cfg.taskcache.images_per_slot, (ds.channels, ds.image_size, ds.image_size)
        )
        self.rng = torch.Generator().manual_seed(cfg.seed + 1)
        self.iteration = 0
        self.curves: list[dict[str, float]] = []
        self.recovery_curves: list[dict[str, Any]] = []
        splits = load_splits(ds, cfg.paths.cache_dir)
        self.val_split = splits["val"]
        self.real_sampler = (
            EpisodeSampler(splits["train"], ml.n_way, ml.k_shot, ml.q_query, seed=cfg.seed + 2)
            if ml.data == "real"
            else None
        )
        self.meta_settings = MetaSettings(
            ml.inner_steps, ml.inner_lr, ml.outer_lr, ml.reptile_beta, ml.align, ml.distill, ml.distill_temperature
        )
        official = ml.official
        self.official = (
            OfficialUpdate(
                self.params,
                OfficialSettings(
                    ml.inner_steps,
                    ml.inner_lr,
                    official.lr,
                    official.reptile_scale,
                    official.temperature,
                    official.replay_batch,
                    official.patience,
                    official.max_replay_batches,
                    official.second_order,
                    ml.align,
                ),
            )
            if ml.update == "official"
            else None
        )

    # ---- one meta-iteration -------------------------------------------------------------------

    def step(self) -> None:
        started = time.perf_counter()
        stats = self._official_step() if self.official is not None else self._first_order_step()
        self.iteration += 1
        self.curves.append({"iteration": self.iteration, **stats, "seconds": time.perf_counter() - started})

    def _official_step(self) -> dict[str, float]:
        """The authors' update (:mod:`free.official`): distil each fresh teacher into a fast copy in
        sequence, Reptile-move the initialisation with Adam, replay bank tasks with MAML."""
        _, recovery_stats, batches = self._recover()

        def replay_task():
            return self._bank_task(None).episode.to(self.device)

        self.params, stats = self.official.step(self.learner, self.params, self.buffers, batches, replay_task)
        return {**stats, **recovery_stats}

    def _first_order_step(self) -> dict[str, float]:
        """Ours (:mod:`free.metalearn`): FO-MAML over fresh and replayed pseudo tasks, aligned or averaged."""
        ml = self.cfg.metalearn
        if self.real_sampler is not None:  # oracle: real meta-train episodes, no inversion
            batch = self.real_sampler.sample(ml.meta_batch).to(self.device)
            tasks, targets, recovery_stats = [batch[i] for i in range(ml.meta_batch)], None, {}
        else:
            fresh, recovery_stats, _ = self._recover()
            tasks, targets = self._pseudo_tasks(fresh)
            if ml.distill > 0:
                # Share of query images whose own teacher knows >= 2 of their task's classes: those the
                # distillation term can teach anything. Tasks mixing teachers lower it; it is logged so
                # that a distillation with little to act on is seen, not silent.
                known = torch.cat([torch.isfinite(t).sum(dim=1) >= 2 for t in targets])
                recovery_stats["distill_informative"] = known.float().mean().item()
        order = torch.randperm(len(tasks), generator=self.rng).tolist()  # random order: alignment is symmetric
        tasks = [tasks[i] for i in order]
        targets = [targets[i] for i in order] if targets is not None else None
        self.params, stats = meta_update(self.learner, self.params, self.buffers, tasks, self.meta_settings, targets)
        return {**stats, **recovery_stats}

    def _recover(self) -> tuple[list[int], dict[str, float], list[TeacherBatch]]:
        """Recover one batch from each of ``teachers_per_step`` teachers and store it in the bank.

        Returns the teachers chosen, the recovery's stats, and each fresh batch with its teacher's
        logits (the official update distils on them)."""
        inv, ds = self.cfg.inversion, self.cfg.dataset
        chosen = torch.randperm(len(self.zoo), generator=self.rng)[: inv.teachers_per_step].tolist()
        adversarial = inv.loss.adv > 0 and self.iteration >= inv.adv_warmup
        weights = LossWeights(inv.loss.ce, inv.loss.bn, inv.loss.tv, inv.loss.adv if adversarial else 0.0)
        steps = inv.inner_steps if inv.mode == "meta" else inv.scratch_steps
        lr = inv.pixels_lr if inv.mode == "pixels" else inv.inner_lr
        settings = InversionSettings(steps, lr, tuple(inv.betas), weights, inv.augment)
        student = self._student() if adversarial else None
        recoveries: list[Recovery] = []
        batches: list[TeacherBatch] = []
        for teacher_id in chosen:
            teacher, meta = self.zoo[teacher_id]
            n_way = meta["n_classes"]
            if inv.mode == "meta":
                r = self.meta_generator.recover(teacher, n_way, inv.images_per_class, settings, self.rng, student)
            elif inv.mode == "from_scratch":
                r = recover_from_scratch(
                    teacher,
                    ds.image_size,
                    ds.channels,
                    inv.latent_dim,
                    n_way,
                    inv.images_per_class,
                    settings,
                    self.rng,
                    student,
                )
            else:
                r = recover_pixels(
                    teacher, ds.image_size, ds.channels, n_way, inv.images_per_class, settings, self.rng, student
                )
            self.bank.add(teacher_id, meta["class_names"], r.images, r.labels)
            self.recovery_curves.append(
                {"iteration": self.iteration, "teacher": teacher_id, "seconds": r.seconds, "curve": r.curve}
            )
            recoveries.append(r)
            if self.official is not None:
                with torch.no_grad():
                    batches.append(TeacherBatch(r.images, r.labels, teacher(r.images)))
        if inv.mode == "meta":
            self.meta_generator.outer_step(recoveries)
        final = [r.curve[-1] for r in recoveries]
        return (
            chosen,
            {
                "teacher_acc": sum(f["teacher_acc"] for f in final) / len(final),
                "inversion_loss": sum(f["loss"] for f in final) / len(final),
                "recovery_seconds": sum(r.seconds for r in recoveries),
            },
            batches,
        )

    def _student(self):
        """The current meta-learner initialisation as the adversarial term's student, scoring each
        teacher's own classes whatever the teacher's width (:func:`free.inversion.meta_learner_student`)."""
        params = {k: v.detach() for k, v in self.params.items()}
        return meta_learner_student(self.learner, params, self.buffers)

    def _pseudo_tasks(self, fresh: list[int]):
        """Tasks from the fresh teachers and, with replay, from the whole bank; with distillation targets."""
        ml = self.cfg.metalearn
        n_replay = round(ml.meta_batch * ml.replay_fraction) if ml.replay else 0
        sources = [fresh] * (ml.meta_batch - n_replay) + [None] * n_replay
        tasks, targets = [], []
        for teachers in sources:
            pseudo = self._bank_task(teachers)
            tasks.append(pseudo.episode.to(self.device))
            targets.append(self._teacher_targets(pseudo) if ml.distill > 0 else None)
        return tasks, targets

    def _bank_task(self, teachers: list[int] | None):
        """One pseudo task of the configured shape from the bank: from ``teachers``, or the whole bank."""
        ml = self.cfg.metalearn
        return self.bank.sample_task(
            ml.n_way, ml.k_shot, ml.q_query, self.rng, teachers=teachers, mix_teachers=self.cfg.taskcache.mix_teachers
        )

    def _teacher_targets(self, pseudo) -> torch.Tensor:
        """``(N*Q, N)`` distillation targets: each query image's logits from the teacher that produced
        it, at the task's classes that teacher knows, ``-inf`` elsewhere (tasks mixing teachers
        included; see :func:`free.metalearn.distillation_targets`)."""
        ep = pseudo.episode
        teachers = {int(t): (self.zoo[int(t)][0], self.zoo[int(t)][1]["class_names"]) for t in pseudo.teacher_ids}
        return distillation_targets(
            ep.query_x.to(self.device), ep.query_y.to(self.device), pseudo.teacher_ids, pseudo.class_names, teachers
        )

    # ---- validation, checkpointing, outputs ---------------------------------------------------

    def validate(self) -> float:
        """Mean accuracy on meta-val episodes (real images of meta-val classes); keeps the best init."""
        ml, ev = self.cfg.metalearn, self.cfg.evaluate
        accs = evaluate(
            self.learner,
            self.params,
            self.buffers,
            self.val_split,
            ml.n_way,
            ml.k_shot,
            ml.q_query,
            ml.val_episodes,
            ml.inner_steps,
            ml.inner_lr,
            seed=self.cfg.seed + 3,
            episode_batch=ev.episode_batch,
            vectorised=self.device.type != "cpu",  # vmap is slower than the loop on CPU (measured)
        )
        acc = accs.mean().item()
        self.curves[-1]["val_acc"] = acc
        if acc > self.best_val_acc:
            self.best_val_acc, self.best_iteration = acc, self.iteration
            self.best_params = dict(self.params)
        return acc

    def save_state(self, directory: Path) -> None:
        """Everything needed to continue exactly where we are, committed by one rename.

        The bank goes to ``bank.next/`` first (shards unchanged since the last checkpoint hard-linked
        from ``bank/``), then ``state.safetensors`` - naming that bank by its manifest's sha256 - is
        replaced atomically, then ``bank.next/`` becomes ``bank/``. Until the state is replaced the
        previous checkpoint is untouched; after, the state names a complete bank. A failed write
        (:class:`free.artifacts.StorageError`) leaves the previous checkpoint as it was.
        """
        directory.mkdir(parents=True, exist_ok=True)
        current, staged = directory / "bank", directory / "bank.next"
        tensors = {f"params/{k}": v for k, v in self.params.items()}
        tensors |= {f"best/{k}": v for k, v in self.best_params.items()}
        tensors |= {f"generator/{k}": v for k, v in self.meta_generator.generator.state_dict().items()}
        opt_tensors, opt_meta = _optimizer_state(self.meta_generator.optimiser)
        tensors |= {f"generator_opt/{k}": v for k, v in opt_tensors.items()}
        learner_opt_meta = None
        if self.official is not None:  # the initialisation's Adam (official update)
            learner_opt, learner_opt_meta = _optimizer_state(self.official.adam.optimiser)
            tensors |= {f"learner_opt/{k}": v for k, v in learner_opt.items()}
        tensors["rng"] = self.rng.get_state()
        shutil.rmtree(staged, ignore_errors=True)  # an uncommitted leftover (restore already judged it)
        try:
            self.bank.save(staged, link_from=current)
            save_tensors(
                directory / "state.safetensors",
                tensors,
                {
                    "iteration": self.iteration,
                    "bank_manifest": sha256_file(staged / MANIFEST),
                    "best_val_acc": self.best_val_acc,
                    "best_iteration": self.best_iteration,
                    "generator_opt": opt_meta,
                    "learner_opt": learner_opt_meta,
                    "curves": self.curves,
                    "recovery_curves": self.recovery_curves,
                },
            )
        except OSError:
            self.bank.forget(staged)
            shutil.rmtree(staged, ignore_errors=True)  # frees the space the failed checkpoint took
            raise
        shutil.rmtree(current, ignore_errors=True)
        staged.rename(current)
        self.bank.moved(staged, current)

    def restore(self, directory: Path) -> None:
        if not (directory / "state.safetensors").is_file():
            return
        tensors, meta = load_tensors(directory / "state.safetensors")
        part = lambda prefix: {k[len(prefix) :]: v.to(self.device) for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        self.params, self.best_params = part("params/"), part("best/")
        self.meta_generator.generator.load_state_dict(part("generator/"))
        _load_optimizer_state(self.meta_generator.optimiser, part("generator_opt/"), meta["generator_opt"])
        if self.official is not None:
            _load_optimizer_state(self.official.adam.optimiser, part("learner_opt/"), meta["learner_opt"])
        self.rng.set_state(tensors["rng"])
        self.bank = MemoryBank.load(_committed_bank(directory, meta.get("bank_manifest")))
        self.iteration, self.best_val_acc, self.best_iteration = (
            meta["iteration"],
            meta["best_val_acc"],
            meta["best_iteration"],
        )
        self.curves, self.recovery_curves = meta["curves"], meta["recovery_curves"]

    def write_artifacts(self, out: dict[str, Path], fp: str) -> dict[str, Any]:
        ds, cfg = self.cfg.dataset, self.cfg
        if self.best_val_acc < 0:  # no validation ran (0 iterations): the initialisation is the result
            self.best_params = dict(self.params)
        meta = classifier_meta(
            cfg.model.arch,
            ds.channels,
            cfg.metalearn.n_way,
            ds.image_size,
            cfg.model.width,
            ds.mean,
            ds.std,
            track_running_stats=False,
        )
        card = {
            **meta,
            "head": cfg.model.head,
            "method": cfg.method.name,
            "iterations": self.iteration,
            "best_iteration": self.best_iteration,
            "best_val_acc": self.best_val_acc if self.best_val_acc >= 0 else None,
            "inner_steps": cfg.metalearn.inner_steps,
            "inner_lr": cfg.metalearn.inner_lr,
            "k_shot": cfg.metalearn.k_shot,  # the task shape it was meta-trained on (a 5-shot learner says 5)
            "q_query": cfg.metalearn.q_query,
            "selected_on": "meta-val",
            "fingerprint": fp,
        }
        state = {**self.best_params, **self.buffers}
        card["sha256"] = save_classifier(out["metalearner"] / "metalearner.safetensors", state, card)
        write_json(out["metalearner"] / "card.json", card)
        write_json(out["metalearner"] / "curves.json", self.curves)
        generator_sha = save_tensors(
            out["generator"] / "generator.safetensors",
            self.meta_generator.generator.state_dict(),
            {
                "image_size": ds.image_size,
                "channels": ds.channels,
                "latent_dim": cfg.inversion.latent_dim,
                "mode": cfg.inversion.mode,
            },
        )
        write_json(out["generator"] / "recovery.json", {"sha256": generator_sha, "tasks": self.recovery_curves})
        self.bank.save(out["taskcache"])
        _save_sample_grids(self.bank, out["generator"] / "samples")
        _plot_curves(self.curves, self.recovery_curves, out)
        return {
            "best_val_acc": card["best_val_acc"],
            "best_iteration": self.best_iteration,
            "iterations": self.iteration,
            "method": cfg.method.name,
        }


def _optimizer_state(optimiser: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as flat tensors + JSON (so it can live in safetensors, not a pickle)."""
    state = optimiser.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer_state(
    optimiser: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    optimiser.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _committed_bank(directory: Path, digest: str | None) -> Path:
    """The bank folder of the checkpoint in ``directory`` whose state names manifest sha256 ``digest``.

    Finishes what a killed :meth:`MetaTrainLoop.save_state` left: if the state was committed but the
    folders not yet swapped, ``bank.next/`` becomes ``bank/``; an uncommitted ``bank.next/`` is removed.
    A state from before the bank was named in it (``digest`` is ``None``) uses ``bank/``.
    """
    current, staged = directory / "bank", directory / "bank.next"
    if digest is not None:
        for candidate in (staged, current):  # staged first: ``bank/`` may be half-deleted by the swap
            manifest = candidate / MANIFEST
            if manifest.is_file() and sha256_file(manifest) == digest:
                if candidate == staged:
                    shutil.rmtree(current, ignore_errors=True)
                    staged.rename(current)
                break
        else:
            raise CheckpointError(
                f"{directory / 'state.safetensors'} names memory bank manifest sha256 {digest[:12]}..., found in "
                f"neither {current} nor {staged}; delete {directory} to start the meta-training over"
            )
    shutil.rmtree(staged, ignore_errors=True)
    return current


def _save_sample_grids(bank: MemoryBank, directory: Path, per_class: int = 8) -> None:
    """One PNG per teacher: a row per class, its newest recovered images (people want to look at them)."""
    from torchvision.utils import save_image

    for teacher_id in bank.teachers():
        grid = bank.to_grid_tensor(teacher_id, per_class)  # (n_classes * per_class, C, H, W)
        png = io.BytesIO()
        save_image(grid, png, format="png", nrow=per_class, padding=1)
        write_atomic(directory / f"teacher_{teacher_id:03d}.png", png.getvalue())  # atomic, like every output


def _plot_curves(curves: list[dict[str, float]], recovery: list[dict[str, Any]], out: dict[str, Path]) -> None:
    """Training curves (query loss/acc, meta-val acc) and recovery curves (teacher acc per inner step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if curves:
        its = [c["iteration"] for c in curves]
        axes[0].plot(its, [c["query_acc"] for c in curves], label="pseudo-task query acc", alpha=0.6)
        val = [(c["iteration"], c["val_acc"]) for c in curves if "val_acc" in c]
        if val:
            axes[0].plot(*zip(*val, strict=True), "o-", label="meta-val acc")
        axes[0].set_xlabel("meta-iteration")
        axes[0].legend()
    if recovery:
        steps = len(recovery[-1]["curve"])
        tenth = max(1, len(recovery) // 10)
        for label, chunk in (("first", recovery[:tenth]), ("last", recovery[-tenth:])):
            mean = [sum(t["curve"][s]["teacher_acc"] for t in chunk) / len(chunk) for s in range(steps)]
            axes[1].plot(range(steps), mean, "o-", label=f"{label} 10% of recoveries")
        axes[1].set_xlabel("inner step")
        axes[1].set_ylabel("teacher accuracy on recovered batch")
        axes[1].legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(out["metalearner"] / "curves.png", png.getvalue())
