"""Stage ``teachers``: train the teacher zoo (resumable), or import the user's own checkpoints.

Output, ``<artifacts>/teachers/``:

* ``teacher_NNN.safetensors``: weights + the description that rebuilds the network (see
  :mod:`free.checkpoints`), class names and ids, held-out accuracy, seed;
* ``teacher_NNN.json``: the same description as a card, plus ``file``, ``sha256``, ``fingerprint``
  and the per-epoch training history;
* ``zoo.json``: every card (without history) and a summary; later stages read the zoo from it;
* ``.done.json``: the stage fingerprint once the zoo is complete.

Nothing written here holds a machine path or a timing, so the same inputs give byte-identical
artifacts on every run (DVC and the metatrain fingerprint hash them).

Faults: before training, the folder must take a write (a full disk fails at once, naming it); the
temporary files a ``kill -9`` left are removed; a failed write raises
:class:`free.artifacts.StorageError` and the teachers finished before stay (tests/test_disk_faults.py,
tests/test_kill_resume.py).

Resume: a teacher is written (weights, then card) as soon as it is trained. A rerun reuses every
teacher whose card carries this configuration's teacher fingerprint and whose file still has the
card's sha256, and trains the others. Teacher ``i`` depends only on the data, the ``teachers``
settings (not on ``n_teachers``), the seed and ``i``, so a resumed - or grown - zoo is identical to
one trained in one go.
"""

from __future__ import annotations

import json
import pickle
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from free.artifacts import (
    check_writable,
    clear_done,
    fingerprint,
    is_done,
    load_tensors,
    mark_done,
    read_json,
    remove_stale_tmp,
    resolve_device,
    set_threads,
    write_json,
)
from free.checkpoints import CheckpointError, check_header, classifier_meta, model_from_state, save_classifier
from free.config.schema import Config, dataset_settings
from free.config.validate import ConfigError, validate_zoo
from free.data import FewShotSplit, load_splits
from free.data.base import Progress, sha256_file
from free.models import build_classifier
from free.teachers import holdout_split, sample_class_subsets, select_classes, train_teacher

#: Random-shift augmentation of the teachers' training images, in pixels. On Omniglot 5-way it lifts
#: the mean held-out accuracy of 40 Conv4-32 teachers from 0.975 to 0.99 (worst 0.90 -> 0.95).
SHIFT = 2

#: Multiplier of ``cfg.seed`` in teacher ``i``'s seed ``seed * SEED_STRIDE + i`` (a prime, so that
#: nearby seeds do not share teachers).
SEED_STRIDE = 100003

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")

#: Largest teacher card (JSON) an import reads; a card is a few hundred bytes plus its class names.
MAX_CARD_BYTES = 1 << 20
_TEACHER_FILE = re.compile(r"^teacher_(\d{3,})\.(safetensors|json)$")


# --------------------------------------------------------------------------------------------- train


def run(cfg: Config, progress: Progress | None = None) -> dict[str, Any]:
    """Train (or finish training) the zoo into ``<artifacts>/teachers/``; return a summary.

    With ``teachers.import_dir`` set, imports that folder instead (:func:`import_teachers`). A rerun
    with the same inputs does nothing.
    """
    if cfg.teachers.import_dir:
        return import_teachers(cfg, Path(cfg.teachers.import_dir))
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = teachers_dir(cfg)
    settings, inputs = _settings(cfg), _inputs(cfg)
    fp = fingerprint(settings, inputs)
    if is_done(out, fp) and (out / "zoo.json").is_file():
        summary = read_json(out / "zoo.json")["summary"]
        reused = {"trained": 0, "reused": summary["n_teachers"], "seconds": 0.0, "seconds_per_teacher": None}
        return {**summary, **reused, "dir": str(out)}
    check_writable(out)  # a full or read-only disk fails now, before any teacher trains
    remove_stale_tmp(out)  # files a killed run was writing: never part of the zoo
    # From here until mark_done the folder is "in progress": no marker and no manifest that a later
    # stage could mistake for a finished zoo.
    clear_done(out)
    (out / "zoo.json").unlink(missing_ok=True)

    teacher_fp = fingerprint(_teacher_settings(settings), inputs)
    t = cfg.teachers
    split = load_splits(cfg.dataset, cfg.paths.cache_dir)["train"]  # teachers only see meta-train classes
    subsets = sample_class_subsets(split.n_classes, t.n_teachers, t.n_way, cfg.seed)
    cards, trained, started, on_dask = [], 0, time.perf_counter(), {}
    if cfg.runner.name == "dask":
        cards, trained, on_dask = _train_on_dask(cfg, out, teacher_fp)
    else:
        indices: Any = range(t.n_teachers)
        if progress is not None:
            indices = progress(indices, "training teachers", t.n_teachers)
        for i in indices:
            card = _reusable_card(out, i, teacher_fp)
            if card is None:
                card = _train_and_save(cfg, split, i, subsets[i], device, teacher_fp, out)
                trained += 1
            cards.append(card)
    _remove_teachers(out, keep=t.n_teachers)  # leftovers of a larger zoo of an earlier config
    summary = _write_zoo(out, fp, cards, cfg.dataset.name, source="trained")
    seconds = time.perf_counter() - started
    return {
        **summary,
        "trained": trained,
        "reused": len(cards) - trained,
        "seconds": round(seconds, 2),
        "seconds_per_teacher": round(seconds / trained, 2) if trained else None,
        **on_dask,
        "dir": str(out),
    }


def teachers_dir(cfg: Config) -> Path:
    """``<artifacts>/teachers``: the stage's output folder."""
    return Path(cfg.paths.artifacts_dir) / "teachers"


def teacher_seed(seed: int, index: int) -> int:
    """Seed of teacher ``index``'s initialisation, held-out draw and batch order."""
    return seed * SEED_STRIDE + index


def train_one(
    cfg: Config, split: FewShotSplit, index: int, class_ids: list[int], device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[dict[str, float]]]:
    """Train teacher ``index`` on meta-train classes ``class_ids``.

    Returns:
        ``(state_dict, meta, history)``; ``meta`` is the checkpoint description (without file hash).
    """
    ds, t = cfg.dataset, cfg.teachers
    seed = teacher_seed(cfg.seed, index)
    arch = t.archs[index % len(t.archs)]
    images, labels = select_classes(split.images, split.labels, class_ids)
    x = images.float() / 255.0  # (M, C, H, W) in [0, 1]; normalisation is inside the classifier
    gen = torch.Generator().manual_seed(seed)
    train_idx, val_idx = holdout_split(labels, t.holdout_fraction, gen)
    # Initialisation from this teacher's seed alone (not from whatever ran before in this process),
    # on the CPU so that it does not depend on the device either.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(
            arch, ds.channels, t.n_way, ds.image_size, t.width, ds.mean, ds.std, track_running_stats=True
        )
    model = model.to(device)
    result = train_teacher(
        model,
        x[train_idx],
        labels[train_idx],
        x[val_idx],
        labels[val_idx],
        max_epochs=t.max_epochs,
        patience=t.patience,
        lr=t.lr,
        batch_size=t.batch_size,
        generator=gen,
        shift=SHIFT,
    )
    meta = {
        **classifier_meta(arch, ds.channels, t.n_way, ds.image_size, t.width, list(ds.mean), list(ds.std), True),
        "teacher_id": index,
        "dataset": ds.name,
        "class_names": [split.class_names[c] for c in class_ids],
        "class_ids": list(class_ids),
        "val_acc": result.val_acc,
        "val_loss": result.val_loss,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "seed": seed,
    }
    return result.state, meta, result.history


def _train_and_save(
    cfg: Config,
    split: FewShotSplit,
    index: int,
    class_ids: list[int],
    device: torch.device,
    teacher_fp: str,
    out: Path,
) -> dict[str, Any]:
    state, meta, history = train_one(cfg, split, index, class_ids, device)
    name = f"teacher_{index:03d}"
    digest = save_classifier(out / f"{name}.safetensors", state, meta)
    # The card is written last: it is the commit marker that lets a rerun reuse this teacher.
    card = {**meta, "file": f"{name}.safetensors", "sha256": digest, "fingerprint": teacher_fp, "history": history}
    write_json(out / f"{name}.json", card)
    return card


def train_into(cfg: Config, index: int, out: Path, teacher_fp: str, threads: int | None) -> dict[str, Any]:
    """Train teacher ``index`` into folder ``out`` unless a reusable one is there: the unit of fan-out.

    What a ``runner=dask`` task runs (flows/fanout.py), in a worker process: it takes paths and
    numbers, writes the files as the local loop does, and returns a few numbers (never tensors).
    ``threads``: the stage process's intra-op thread count, which the teacher's bits depend on.
    """
    set_threads(threads)
    started = time.perf_counter()
    if _reusable_card(out, index, teacher_fp) is not None:
        return {"index": index, "trained": False, "seconds": 0.0}
    t = cfg.teachers
    split = load_splits(cfg.dataset, cfg.paths.cache_dir)["train"]
    class_ids = sample_class_subsets(split.n_classes, t.n_teachers, t.n_way, cfg.seed)[index]
    _train_and_save(cfg, split, index, class_ids, resolve_device(cfg.device), teacher_fp, out)
    return {"index": index, "trained": True, "seconds": round(time.perf_counter() - started, 2)}


def _train_on_dask(cfg: Config, out: Path, teacher_fp: str) -> tuple[list[dict[str, Any]], int, dict[str, float]]:
    """Every teacher as a mapped Prefect task on Dask; then the cards, checked here as a rerun would, the
    number trained, and ``tasks_seconds``: the tasks' own time summed (the stage's ``seconds`` less it, per
    worker, is what Prefect and Dask added: servers, cluster, workers' imports)."""
    from flows.fanout import train_teachers  # Prefect and Dask live in flows/, loaded for this runner only

    outcomes = train_teachers(cfg, out.resolve(), teacher_fp, torch.get_num_threads())
    cards = [_reusable_card(out, i, teacher_fp) for i in range(cfg.teachers.n_teachers)]
    missing = [i for i, card in enumerate(cards) if card is None]
    if missing:
        raise RuntimeError(
            f"teachers {missing}: the dask runner reported them trained, but {out} lacks their files or they do "
            "not match their cards; with runner.address, every worker must write into this same folder "
            "(a filesystem shared with this machine)"
        )
    tasks_seconds = round(sum(o["seconds"] for o in outcomes), 2)
    return [c for c in cards if c is not None], sum(o["trained"] for o in outcomes), {"tasks_seconds": tasks_seconds}


def _reusable_card(out: Path, index: int, teacher_fp: str) -> dict[str, Any] | None:
    """The card of teacher ``index`` if it was trained with ``teacher_fp`` and its file is intact."""
    card_path = out / f"teacher_{index:03d}.json"
    weights = out / f"teacher_{index:03d}.safetensors"
    if not (card_path.is_file() and weights.is_file()):
        return None
    try:
        card = read_json(card_path)
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(card, dict) or card.get("fingerprint") != teacher_fp:
        return None
    if card.get("file") != weights.name or card.get("sha256") != sha256_file(weights):
        return None
    return card


def _settings(cfg: Config) -> dict[str, Any]:
    """What the zoo depends on: data set (without machine paths), teachers section, seed, threads."""
    dataset = dataset_settings(cfg.dataset)
    settings = {"dataset": dataset, "teachers": asdict(cfg.teachers), "seed": cfg.seed, "shift": SHIFT}
    return {**settings, "threads": cfg.threads}  # the summation order, so the bits


def _teacher_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """What one teacher depends on: as the zoo, less the zoo's size (teacher ``i`` ignores it)."""
    teachers = {k: v for k, v in settings["teachers"].items() if k not in ("n_teachers", "import_dir")}
    return {**settings, "teachers": teachers}


def _inputs(cfg: Config) -> list[Path]:
    splits = Path(cfg.paths.artifacts_dir) / "data" / "splits.json"
    return [splits] if splits.is_file() else []


# --------------------------------------------------------------------------------------------- zoo


def _write_zoo(out: Path, fp: str, cards: list[dict[str, Any]], dataset: str, source: str) -> dict[str, Any]:
    """Write ``zoo.json`` and the done marker; return the zoo summary."""
    accs = [c["val_acc"] for c in cards if isinstance(c.get("val_acc"), (int, float))]
    archs = [c["arch"] for c in cards]
    summary = {
        "source": source,
        "dataset": dataset,
        "n_teachers": len(cards),
        "archs": sorted(set(archs)),
        "arch_counts": {a: archs.count(a) for a in sorted(set(archs))},
        "n_way": sorted({c["n_classes"] for c in cards}),
        "mean_val_acc": sum(accs) / len(accs) if accs else None,
        "min_val_acc": min(accs) if accs else None,
        "max_val_acc": max(accs) if accs else None,
    }
    listed = [{k: v for k, v in c.items() if k != "history"} for c in cards]
    write_json(out / "zoo.json", {"fingerprint": fp, "summary": summary, "teachers": listed})
    mark_done(out, fp, **summary)
    return summary


def _remove_teachers(out: Path, keep: int = 0) -> None:
    """Delete ``teacher_NNN.*`` files with ``NNN >= keep`` (``keep=0``: all of them)."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        match = _TEACHER_FILE.match(path.name)
        if match and int(match.group(1)) >= keep:
            path.unlink()


# -------------------------------------------------------------------------------------------- import


def import_teachers(cfg: Config, source_dir: Path) -> dict[str, Any]:
    """Bring the user's own teachers into ``<artifacts>/teachers/``.

    Every ``*.json`` card in ``source_dir`` needs a sibling weights file with the same stem:
    ``.safetensors`` (its header description, if any, is completed/overridden by the card), or a
    ``.pt`` / ``.pth`` state dict (loaded with ``weights_only=True``: no code in it can run). The
    card gives ``arch, channels, n_classes, image_size, width, mean, std`` (``track_running_stats``
    defaults to true) and ``class_names``; optional ``val_acc``, ``class_ids``, ``dataset``, ``seed``.
    A ``.pt`` state dict may be the whole classifier's (``norm.*``, ``net.*``) or the backbone's alone.

    Refused, naming the file and the reason: a card or weights file that is (or is reached through) a
    symlink leading out of ``source_dir``; a card over :data:`MAX_CARD_BYTES` or a safetensors header
    over :data:`free.checkpoints.MAX_HEADER_BYTES`; a pickle that holds code or objects other than
    tensors (nothing in it runs; convert it to safetensors); fewer than 2 classes, duplicate class
    names, or too few classes for ``metalearn.n_way`` pseudo tasks (:func:`validate_zoo`'s rule, checked
    here so that the import fails, not meta-training); wrong names or shapes, non-finite weights and
    non-positive BatchNorm variances.

    All inputs are validated before anything is written, so a bad file leaves the output untouched.

    Raises:
        CheckpointError: naming the bad file and what is wrong.
    """
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise CheckpointError(f"{source_dir}: not a folder; pass the folder that holds your teachers' cards")
    card_paths = sorted(p for p in source_dir.glob("*.json") if not p.name.startswith(".") and p.name != "zoo.json")
    if not card_paths:
        raise CheckpointError(f"{source_dir}: no teacher cards (*.json next to *.safetensors / *.pt / *.pth)")
    set_threads(cfg.threads)
    out = teachers_dir(cfg)
    split_classes = _split_classes(cfg)
    root = source_dir.resolve()
    loaded = [_load_import(p, cfg, split_classes, root) for p in card_paths]  # validates everything first
    widths = [(card, meta["n_classes"]) for card, (_, meta, _) in zip(card_paths, loaded, strict=True)]
    _check_zoo_widths(cfg, source_dir, widths)

    sources = [*card_paths] + [weights for _, _, weights in loaded]
    ds = dataset_settings(cfg.dataset)
    fp = fingerprint({"import": True, "dataset": ds}, sources)
    if is_done(out, fp) and (out / "zoo.json").is_file():
        summary = read_json(out / "zoo.json")["summary"]
        return {**summary, "imported": 0, "dir": str(out)}
    check_writable(out)
    remove_stale_tmp(out)
    clear_done(out)
    (out / "zoo.json").unlink(missing_ok=True)
    _remove_teachers(out)  # the imported zoo replaces whatever was there; no mixing of two zoos
    cards = []
    for i, (state, meta, weights) in enumerate(loaded):
        name = f"teacher_{i:03d}"
        meta = {**meta, "teacher_id": i}
        digest = save_classifier(out / f"{name}.safetensors", state, meta)
        card = {**meta, "file": f"{name}.safetensors", "sha256": digest, "source_sha256": sha256_file(weights)}
        write_json(out / f"{name}.json", card)
        cards.append(card)
    summary = _write_zoo(out, fp, cards, cfg.dataset.name, source="imported")
    return {**summary, "imported": len(cards), "dir": str(out)}


def _load_import(
    card_path: Path, cfg: Config, split_classes: dict[str, str], root: Path
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """Read and validate one user teacher; return ``(state_dict, meta, weights_path)``.

    ``root``: the import folder, resolved; no file may lead out of it.
    """
    _check_inside(card_path, root)
    if card_path.stat().st_size > MAX_CARD_BYTES:
        raise CheckpointError(
            f"{card_path}: card of {card_path.stat().st_size} bytes is over the limit of {MAX_CARD_BYTES} bytes"
        )
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{card_path}: not a readable JSON card ({err})") from err
    except RecursionError:
        raise CheckpointError(f"{card_path}: not a readable JSON card (nested too deeply)") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"{card_path}: a card must be a JSON object")
    weights = next((card_path.with_suffix(s) for s in WEIGHT_SUFFIXES if card_path.with_suffix(s).is_file()), None)
    if weights is None:
        names = ", ".join(card_path.with_suffix(s).name for s in WEIGHT_SUFFIXES)
        raise CheckpointError(f"{card_path}: no weights file next to it (looked for {names})")
    _check_inside(weights, root)
    state, header = _read_weights(weights)
    meta = {**header, **card}
    meta.setdefault("track_running_stats", True)

    required = ("arch", "channels", "n_classes", "image_size", "width", "mean", "std", "class_names")
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(f"{card_path}: card lacks {', '.join(missing)}")
    for key in ("mean", "std"):
        if not (isinstance(meta[key], list) and len(meta[key]) == meta["channels"]):
            raise CheckpointError(f"{card_path}: {key} must be a list of one value per channel ({meta['channels']})")
    names = meta["class_names"]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{card_path}: class_names must be a list of strings")
    if len(names) != meta["n_classes"]:
        raise CheckpointError(f"{card_path}: n_classes={meta['n_classes']} but class_names has {len(names)} entries")
    if len(names) < 2:
        # Inversion samples labels among a teacher's classes: with one, every target is the same and the
        # cross-entropy is 0 from the start, and a pseudo task needs at least 2 classes.
        raise CheckpointError(f"{card_path}: a teacher needs at least 2 classes, this one has {len(names)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        # Pseudo tasks identify classes by name; two outputs with one name would be one class twice.
        raise CheckpointError(f"{card_path}: class_names repeat {repeated}; each output needs its own class")
    ds = cfg.dataset
    for key, expected in (("image_size", ds.image_size), ("channels", ds.channels)):
        if meta[key] != expected:
            raise CheckpointError(
                f"{card_path}: {key}={meta[key]} but the data set has dataset.{key}={expected}; "
                "teachers must take the data set's images"
            )
    for name in names:
        if split_classes.get(name) in ("val", "test"):
            raise CheckpointError(
                f"{card_path}: class {name!r} is a meta-{split_classes[name]} class; teachers may only know "
                "meta-train classes (or classes outside the data set)"
            )

    state = _as_classifier_state(state, meta)
    model = model_from_state(weights, state, meta)  # names, shapes, finite values
    for key in ("mean", "std"):
        stored = model.state_dict()[f"norm.{key}"].flatten().tolist()
        if any(abs(a - float(b)) > 1e-6 for a, b in zip(stored, meta[key], strict=True)):
            raise CheckpointError(
                f"{weights}: normalisation norm.{key}={stored} contradicts the card's {key}={meta[key]}"
            )
    train_names = [n for n, s in split_classes.items() if s == "train"]
    class_ids = meta.get("class_ids")
    if class_ids is None and train_names:
        index = {n: i for i, n in enumerate(train_names)}
        class_ids = [index.get(n) for n in names]
    description = classifier_meta(
        meta["arch"],
        meta["channels"],
        meta["n_classes"],
        meta["image_size"],
        meta["width"],
        list(meta["mean"]),
        list(meta["std"]),
        bool(meta["track_running_stats"]),
    )
    return (
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        {
            **description,
            "dataset": meta.get("dataset", ds.name),
            "class_names": list(names),
            "class_ids": class_ids,
            "val_acc": meta.get("val_acc"),
            "epochs_run": meta.get("epochs_run"),
            "seed": meta.get("seed"),
            "imported_from": card_path.name,  # the name only: no machine paths in artifacts
        },
        weights,
    )


def _check_inside(path: Path, root: Path) -> None:
    """Refuse ``path`` if it (or a folder on the way) is a symlink that leads out of ``root``."""
    target = path.resolve()
    if not target.is_relative_to(root):
        raise CheckpointError(
            f"{path}: a symlink to {target}, outside the import folder {root}; copy the file in instead"
        )


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, header_meta)`` of a ``.safetensors`` file or a ``.pt``/``.pth`` state dict."""
    if path.suffix == ".safetensors":
        check_header(path)
        try:
            return load_tensors(path)
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        # weights_only: a pickle that holds anything but tensors and containers is refused, not run.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises loading it with weights_only=False or allow-listing its globals,
        # i.e. running the code in it: never repeated here. Only the name of what it wanted is kept.
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" (it would call or build {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused: this pickle holds code or objects other than tensors{what}, and loading it "
            "would run them; convert it to safetensors where it was made "
            "(safetensors.torch.save_file(model.state_dict(), 'teacher.safetensors')) and import that"
        ) from None
    except Exception as err:  # RuntimeError, EOFError, ... depending on the damage
        raise CheckpointError(f"{path}: not a readable torch state dict ({type(err).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors)")
    return {str(k): v for k, v in obj.items()}, {}


def _check_zoo_widths(cfg: Config, source_dir: Path, widths: list[tuple[Path, int]]) -> None:
    """The pseudo tasks' check on the zoo's class counts (:func:`validate_zoo`, which meta-training
    runs too), at import time and naming the narrowest teachers' cards."""
    try:
        validate_zoo(cfg, [w for _, w in widths])
    except ConfigError as err:
        narrow = sorted(widths, key=lambda cw: cw[1])[: max(1, cfg.inversion.teachers_per_step)]
        listed = ", ".join(f"{card.name} ({w} classes)" for card, w in narrow)
        reason = str(err).removeprefix("invalid configuration:").strip()
        raise CheckpointError(
            f"{source_dir}: too few classes for the meta-learner's tasks: {reason} [{listed}]"
        ) from None


def _as_classifier_state(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Complete a backbone-only state dict to a :class:`~free.models.Classifier`'s (``norm.*``, ``net.*``).

    The card's ``mean``/``std`` give the normalisation buffers when the file lacks them.
    """
    if not any(k.startswith(("net.", "norm.")) for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
    state = dict(state)
    channels = len(meta["mean"]) if isinstance(meta["mean"], list) else 1
    for key in ("mean", "std"):
        state.setdefault(f"norm.{key}", torch.tensor(meta[key], dtype=torch.float32).view(1, channels, 1, 1))
    return state


def _split_classes(cfg: Config) -> dict[str, str]:
    """``class name -> split`` from the data stage's manifest, if it exists (else no check)."""
    manifest = Path(cfg.paths.artifacts_dir) / "data" / "splits.json"
    if not manifest.is_file():
        return {}
    classes = read_json(manifest).get("classes", {})
    return {name: split for split, names in classes.items() for name in names}


__all__ = ["SEED_STRIDE", "SHIFT", "import_teachers", "run", "teacher_seed", "teachers_dir", "train_into", "train_one"]
