"""Value checks on a composed :class:`~free.config.schema.Config`.

Types and unknown keys are already caught when the YAML tree is merged onto the schema; here we
check ranges, choices and rules that span groups. Every message starts with the full key, so a user
can fix the right override without reading code. Checks that need the data (e.g. ``n_way`` against
the number of classes of a split) are made by the data layer when it loads the split.
"""

from __future__ import annotations

import re

from free.config.schema import Config
from free.data import DATASET_NAMES, NATIVE_CHANNELS  # constants of the package: no torch import

# free.models.CLASSIFIER_ARCHS, written out: importing free.models imports torch (~2 s), which a process
# that only composes and validates configs (the Prefect flow run, `free config`) never needs otherwise.
# Keep the two equal when adding a backbone to free/models/registry.py.
CLASSIFIER_ARCHS = ("conv4", "resnet10", "resnet12", "resnet18")


class ConfigError(ValueError):
    """The configuration is invalid. The message names the offending key(s)."""


INVERSION_MODES = ("meta", "from_scratch", "pixels")
OUTER_UPDATES = ("gradient", "reptile")
HEADS = ("linear", "proto")
METALEARN_DATA = ("pseudo", "real")
METALEARN_UPDATES = ("first_order", "official")
METHODS = ("free", "free_noalign", "scratch", "pixels", "random_init", "oracle")
RUNNERS = ("local", "dask")
_SCHEDULER = re.compile(r"^(tcp|tls|inproc|ucx|ws|wss)://\S+$")
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def validate(cfg: Config) -> Config:
    """Check a composed config; return it unchanged or raise :class:`ConfigError` listing all problems."""
    errors: list[str] = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            errors.append(f"{key}: {message}")

    def at_least(key: str, value: float, low: float) -> None:
        need(value >= low, key, f"must be >= {low}, got {value}")

    def positive(key: str, value: float) -> None:
        need(value > 0, key, f"must be > 0, got {value}")

    def one_of(key: str, value: str, choices: tuple[str, ...], what: str = "value") -> None:
        need(value in choices, key, f"{value!r} is not a known {what}; choose one of: {', '.join(choices)}")

    need(bool(_DEVICE.match(cfg.device)), "device", f"{cfg.device!r} is not cpu, mps, cuda or cuda:N")
    need(cfg.threads is None or cfg.threads >= 1, "threads", f"must be >= 1 or null, got {cfg.threads}")

    ds = cfg.dataset
    one_of("dataset.name", ds.name, DATASET_NAMES, "data set")
    need(
        ds.image_size >= 8 and ds.image_size % 4 == 0,
        "dataset.image_size",
        f"must be a multiple of 4 and >= 8 (the generator upsamples s/4 twice), got {ds.image_size}",
    )
    native = NATIVE_CHANNELS.get(ds.name, ds.channels)
    need(ds.channels == native, "dataset.channels", f"{ds.name} images have {native} channel(s), got {ds.channels}")
    need(
        0 < ds.split.train < 1 and 0 < ds.split.val < 1 and ds.split.train + ds.split.val < 1,
        "dataset.split",
        f"train and val fractions must be in (0, 1) and leave classes for test, "
        f"got train={ds.split.train} val={ds.split.val}",
    )
    for key, stats in (("dataset.mean", ds.mean), ("dataset.std", ds.std)):
        need(len(stats) == ds.channels, key, f"needs one value per channel ({ds.channels}), got {len(stats)}")
    need(all(s > 0 for s in ds.std), "dataset.std", f"must be > 0, got {ds.std}")

    one_of("model.arch", cfg.model.arch, CLASSIFIER_ARCHS, "architecture")
    at_least("model.width", cfg.model.width, 1)
    one_of("model.head", cfg.model.head, HEADS, "head")

    t = cfg.teachers
    at_least("teachers.n_teachers", t.n_teachers, 1)
    at_least("teachers.n_way", t.n_way, 2)
    need(len(t.archs) > 0, "teachers.archs", "needs at least one architecture")
    for i, arch in enumerate(t.archs):
        one_of(f"teachers.archs[{i}]", arch, CLASSIFIER_ARCHS, "architecture")
    at_least("teachers.width", t.width, 1)
    at_least("teachers.max_epochs", t.max_epochs, 1)
    at_least("teachers.patience", t.patience, 0)
    positive("teachers.lr", t.lr)
    at_least("teachers.batch_size", t.batch_size, 1)
    need(0 < t.holdout_fraction < 1, "teachers.holdout_fraction", f"must be in (0, 1), got {t.holdout_fraction}")

    inv = cfg.inversion
    one_of("inversion.mode", inv.mode, INVERSION_MODES, "inversion mode")
    at_least("inversion.latent_dim", inv.latent_dim, 1)
    at_least("inversion.inner_steps", inv.inner_steps, 1)
    positive("inversion.inner_lr", inv.inner_lr)
    need(
        len(inv.betas) == 2 and all(0 <= b < 1 for b in inv.betas),
        "inversion.betas",
        f"must be two values in [0, 1), got {inv.betas}",
    )
    positive("inversion.outer_lr", inv.outer_lr)
    one_of("inversion.outer_update", inv.outer_update, OUTER_UPDATES, "outer update")
    at_least("inversion.teachers_per_step", inv.teachers_per_step, 1)
    need(
        inv.teachers_per_step <= t.n_teachers,
        "inversion.teachers_per_step",
        f"{inv.teachers_per_step} is more than the zoo has (teachers.n_teachers={t.n_teachers})",
    )
    at_least("inversion.images_per_class", inv.images_per_class, 1)
    at_least("inversion.scratch_steps", inv.scratch_steps, 1)
    positive("inversion.pixels_lr", inv.pixels_lr)
    for term in ("ce", "bn", "tv", "adv"):
        at_least(f"inversion.loss.{term}", getattr(inv.loss, term), 0)
    at_least("inversion.adv_warmup", inv.adv_warmup, 0)

    tc = cfg.taskcache
    at_least("taskcache.slots", tc.slots, 1)
    at_least("taskcache.images_per_slot", tc.images_per_slot, 1)

    ml = cfg.metalearn
    at_least("metalearn.n_way", ml.n_way, 2)
    at_least("metalearn.k_shot", ml.k_shot, 1)
    at_least("metalearn.q_query", ml.q_query, 1)
    at_least("metalearn.inner_steps", ml.inner_steps, 1)
    positive("metalearn.inner_lr", ml.inner_lr)
    positive("metalearn.outer_lr", ml.outer_lr)
    at_least("metalearn.meta_batch", ml.meta_batch, 1)
    at_least("metalearn.iterations", ml.iterations, 0)
    need(0 < ml.reptile_beta <= 1, "metalearn.reptile_beta", f"must be in (0, 1], got {ml.reptile_beta}")
    at_least("metalearn.distill", ml.distill, 0)
    positive("metalearn.distill_temperature", ml.distill_temperature)
    need(0 <= ml.replay_fraction <= 1, "metalearn.replay_fraction", f"must be in [0, 1], got {ml.replay_fraction}")
    at_least("metalearn.checkpoint_every", ml.checkpoint_every, 1)
    one_of("metalearn.data", ml.data, METALEARN_DATA, "data source")
    at_least("metalearn.val_every", ml.val_every, 1)
    at_least("metalearn.val_episodes", ml.val_episodes, 1)
    one_of("metalearn.update", ml.update, METALEARN_UPDATES, "update rule")
    need(
        ml.update == "first_order" or ml.data == "pseudo" or ml.iterations == 0,
        "metalearn.update",
        "official distils the teachers and replays the memory bank, so it needs pseudo data; "
        f"metalearn.data={ml.data} (method=oracle) uses update=first_order",
    )
    need(
        ml.update == "first_order" or ml.distill == 0,
        "metalearn.distill",
        f"{ml.distill} weights the first_order update's distillation term; update=official distils each fresh "
        "teacher by itself (metalearn.official.temperature) - set metalearn.distill=0",
    )
    positive("metalearn.official.lr", ml.official.lr)
    positive("metalearn.official.reptile_scale", ml.official.reptile_scale)
    positive("metalearn.official.temperature", ml.official.temperature)
    at_least("metalearn.official.replay_batch", ml.official.replay_batch, 1)
    at_least("metalearn.official.patience", ml.official.patience, 1)
    at_least("metalearn.official.max_replay_batches", ml.official.max_replay_batches, 1)
    # Teacher widths against the learner's way. Any width works for the adversarial term and for
    # distillation (both map to the right label space); what cannot work is a pseudo task that has
    # fewer classes to draw from than metalearn.n_way. An imported zoo's widths are its own
    # (teachers.n_way does not describe it): `validate_zoo` checks them when metatrain loads it.
    if not t.import_dir:
        if not tc.mix_teachers:
            need(
                ml.n_way <= t.n_way,
                "metalearn.n_way",
                f"{ml.n_way} is larger than the {t.n_way} classes a teacher knows (teachers.n_way); "
                "lower it or let pseudo tasks mix teachers (taskcache.mix_teachers=true)",
            )
        elif ml.data == "pseudo":
            # Fresh pseudo tasks draw from the teachers just inverted, and at the first iteration the
            # bank holds nothing else.
            need(
                ml.n_way <= inv.teachers_per_step * t.n_way,
                "metalearn.n_way",
                f"{ml.n_way} classes per pseudo task, but the teachers inverted per step know at most "
                f"inversion.teachers_per_step x teachers.n_way = {inv.teachers_per_step} x {t.n_way} = "
                f"{inv.teachers_per_step * t.n_way}; lower metalearn.n_way or raise one of those",
            )
    # A fresh teacher's class holds one slot after its first recovery, and pseudo tasks are drawn
    # from fresh teachers at once: one slot must already hold a support + query set.
    need(
        ml.k_shot + ml.q_query <= tc.images_per_slot,
        "taskcache.images_per_slot",
        f"{tc.images_per_slot} images per class and slot cannot hold metalearn.k_shot + metalearn.q_query = "
        f"{ml.k_shot + ml.q_query}",
    )
    need(
        inv.images_per_class >= tc.images_per_slot,
        "inversion.images_per_class",
        f"{inv.images_per_class} recovered images per class cannot fill a bank slot of "
        f"taskcache.images_per_slot={tc.images_per_slot}",
    )

    ev = cfg.evaluate
    at_least("evaluate.episodes", ev.episodes, 1)
    at_least("evaluate.n_way", ev.n_way, 2)
    need(
        len(ev.shots) > 0 and all(k >= 1 for k in ev.shots),
        "evaluate.shots",
        f"must be a non-empty list of values >= 1, got {ev.shots}",
    )
    at_least("evaluate.q_query", ev.q_query, 1)
    at_least("evaluate.inner_steps", ev.inner_steps, 0)
    at_least("evaluate.episode_batch", ev.episode_batch, 1)

    one_of("method.name", cfg.method.name, METHODS, "method")
    need(
        cfg.method.name != "random_init" or ml.iterations == 0,
        "metalearn.iterations",
        f"method=random_init means no meta-training, but metalearn.iterations={ml.iterations}",
    )

    run = cfg.runner
    one_of("runner.name", run.name, RUNNERS, "runner")
    at_least("runner.workers", run.workers, 1)
    need(run.shards is None or run.shards >= 1, "runner.shards", f"must be >= 1 or null, got {run.shards}")
    need(
        run.address is None or bool(_SCHEDULER.match(run.address)),
        "runner.address",
        f"{run.address!r} is not a Dask scheduler address like tcp://host:8786; null starts a LocalCluster",
    )
    need(
        run.address is None or run.name == "dask",
        "runner.address",
        f"a scheduler address needs runner=dask, but runner.name={run.name!r}",
    )

    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return cfg


def validate_zoo(cfg: Config, widths: list[int]) -> None:
    """Check the loaded zoo's class counts against the pseudo tasks (for imported zoos, whose widths
    the config does not state; a trained zoo passes whenever :func:`validate` did).

    Args:
        widths: each teacher's number of classes, in zoo order.

    Raises:
        ConfigError: naming the keys, when some draw of teachers cannot make a pseudo task.
    """
    ml, tc, inv = cfg.metalearn, cfg.taskcache, cfg.inversion
    if ml.data != "pseudo" or not widths:
        return
    if not tc.mix_teachers:
        narrow = [i for i, w in enumerate(widths) if w < ml.n_way]
        if narrow:
            raise ConfigError(
                f"invalid configuration:\n  metalearn.n_way: {ml.n_way}, but with taskcache.mix_teachers=false "
                f"each pseudo task uses one teacher, and teachers {narrow} of the zoo know only "
                f"{sorted({widths[i] for i in narrow})} classes; lower metalearn.n_way or set "
                "taskcache.mix_teachers=true"
            )
        return
    per_step = min(inv.teachers_per_step, len(widths))
    fewest = sum(sorted(widths)[:per_step])  # the unluckiest draw of teachers in one step
    if fewest < ml.n_way:
        raise ConfigError(
            f"invalid configuration:\n  metalearn.n_way: {ml.n_way} classes per pseudo task, but the "
            f"{per_step} narrowest teachers of the zoo (inversion.teachers_per_step={inv.teachers_per_step}) "
            f"know only {fewest} classes together; lower metalearn.n_way or raise inversion.teachers_per_step"
        )
