"""Typed schema of the configuration tree in ``params/``.

Each dataclass mirrors one Hydra config group (``params/<group>/*.yaml``). Composition merges the
YAML tree onto these schemas, so a wrong type or an unknown key fails at start-up with the full key
in the message; :func:`free.config.validate.validate` then checks values and cross-field rules.

Fields are documented where the method gives them meaning; see the README's "The pipeline" section.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional  # OmegaConf structured configs need typing generics


@dataclass
class PathsConfig:
    """Where things live. Relative paths are relative to the working directory (the repo root)."""

    data_dir: str = "data"  # parent of each data set's folder; env FREE_DATA_DIR
    cache_dir: str = ".cache/free"  # decoded tensor caches; env FREE_CACHE_DIR
    artifacts_dir: str = "artifacts"  # stage outputs (DVC outs)


@dataclass
class SplitFractions:
    """Fractions of classes per split when a data set has no standard split (Omniglot).

    The meta-test split gets the rest. 242 Omniglot characters -> 150 / 40 / 52.
    """

    train: float = 0.62
    val: float = 0.165


@dataclass
class DatasetConfig:
    """The real few-shot data set: meta-train classes (oracle only), meta-val and meta-test."""

    name: str = "omniglot"  # omniglot | cifar_fs | mini_imagenet | cub
    root: str = "omniglot"  # folder under paths.data_dir, or an absolute path
    image_size: int = 28
    channels: int = 1
    split: SplitFractions = field(default_factory=SplitFractions)
    split_seed: int = 0  # seed of the class split (data sets without a standard split)
    rotations: bool = False  # rotate by 90/180/270 degrees as new classes (x4), within each split
    download: bool = False  # fetch with torchvision when online (Omniglot full set, CIFAR-100)
    mean: List[float] = field(default_factory=lambda: [0.5])  # input normalisation, per channel
    std: List[float] = field(default_factory=lambda: [0.5])


# Where the files are and whether they may be downloaded does not change the data: leave them out of
# what outputs are fingerprinted and described by, so artifacts are identical on every machine.
MACHINE_SPECIFIC_DATASET_KEYS = ("root", "download")


def dataset_settings(dataset: DatasetConfig) -> dict:
    """The data set's settings that determine the data (no machine paths), for fingerprints and manifests."""
    return {k: v for k, v in asdict(dataset).items() if k not in MACHINE_SPECIFIC_DATASET_KEYS}


@dataclass
class ModelConfig:
    """The meta-learner's backbone."""

    arch: str = "conv4"  # conv4 | resnet10 | resnet12 | resnet18
    width: int = 64  # channels of the first stage (Conv4: every stage)
    head: str = "linear"  # linear (MAML) | proto (ProtoNet-style head from class prototypes)


@dataclass
class TeachersConfig:
    """The zoo of pre-trained classifiers: each an N-way classifier on meta-train classes."""

    n_teachers: int = 100
    n_way: int = 5  # classes each teacher knows
    archs: List[str] = field(default_factory=lambda: ["conv4"])  # cycled over teachers
    width: int = 32
    max_epochs: int = 30
    patience: int = 5  # early stopping on held-out images of the teacher's own classes
    lr: float = 1e-3
    batch_size: int = 32
    holdout_fraction: float = 0.2
    import_dir: Optional[str] = None  # import user checkpoints instead of training a zoo


@dataclass
class LossWeights:
    """Weights of the inversion loss terms; 0 switches a term off."""

    ce: float = 1.0  # teacher cross-entropy against the sampled labels
    bn: float = 0.1  # BatchNorm feature-statistics matching (DeepInversion)
    tv: float = 0.0  # total variation (image smoothness)
    adv: float = 1.0  # disagreement between meta-learner and teacher, after warm-up


@dataclass
class InversionConfig:
    """Recovering pseudo data from teachers (FREE's meta-generator, or a baseline)."""

    mode: str = "meta"  # meta (FREE) | from_scratch (new generator per teacher) | pixels (PURER)
    latent_dim: int = 256
    inner_steps: int = 5  # adaptation steps per teacher (meta mode)
    inner_lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.5, 0.999])
    outer_lr: float = 1e-3
    outer_update: str = "gradient"  # gradient (first-order MAML) | reptile
    teachers_per_step: int = 4
    images_per_class: int = 20  # batch = n_way * images_per_class
    scratch_steps: int = 200  # steps of the from_scratch / pixels baselines
    pixels_lr: float = 0.05  # Adam learning rate of directly optimised pixels (pixels baseline)
    augment: bool = True
    loss: LossWeights = field(default_factory=LossWeights)
    adv_warmup: int = 50  # meta-iterations before the adversarial term switches on


@dataclass
class TaskCacheConfig:
    """The memory bank of recovered images and the pseudo-task sampler."""

    slots: int = 20  # ring buffer length per teacher and class
    images_per_slot: int = 20  # images per class stored per slot
    mix_teachers: bool = True  # pseudo tasks may mix classes of different teachers


@dataclass
class OfficialUpdateConfig:
    """``metalearn.update=official``: the authors' meta-learner update (WalkerWorldPeace/FREE, main.py).

    Defaults are theirs (``--outer_lr``, ``reptile_grad``'s ``alpha=67``, ``--episode_batch``,
    ``--generate_interval``, temperature 1), not tuned here; ``max_replay_batches`` is ours
    (see :mod:`free.official`)."""

    lr: float = 0.001  # Adam, for the fast copy's distillation steps and for the initialisation
    reptile_scale: float = 67.0  # the initialisation's Adam gradient is reptile_scale * (theta - fast)
    temperature: float = 1.0  # distillation softmax temperature (the authors': 1)
    replay_batch: int = 10  # memory-bank tasks per Adam step of the MAML replay
    patience: int = 10  # replay stops after this many batches without a better pseudo-task accuracy
    max_replay_batches: int = 30  # our bound on one iteration's replay (theirs has none)
    second_order: bool = True  # MAML replay through the inner steps (theirs: true unless --approx)


@dataclass
class MetaLearnConfig:
    """Meta-training of the meta-learner on pseudo tasks (MAML inner loop + alignment)."""

    n_way: int = 5
    k_shot: int = 1
    q_query: int = 15
    inner_steps: int = 5
    inner_lr: float = 0.1
    outer_lr: float = 0.01  # alpha: SGD step per task along the sequence
    meta_batch: int = 4  # pseudo tasks per meta-iteration
    iterations: int = 2000
    align: bool = True  # sequential per-task steps + Reptile move (implicit gradient alignment)
    reptile_beta: float = 1.0  # step of the initialisation towards the end point of the task sequence
    distill: float = 0.0  # weight of the teacher soft-target (KD) loss on query sets
    distill_temperature: float = 4.0
    replay: bool = True  # also sample tasks from the whole bank
    replay_fraction: float = 0.5  # share of each meta-batch drawn from the whole bank
    checkpoint_every: int = 25  # meta-iterations between resumable checkpoints
    data: str = "pseudo"  # pseudo (data-free) | real (oracle upper bound)
    val_every: int = 100
    val_episodes: int = 100
    update: str = "first_order"  # first_order (ours, free.metalearn) | official (the authors', free.official)
    official: OfficialUpdateConfig = field(default_factory=OfficialUpdateConfig)


@dataclass
class EvaluateConfig:
    """Meta-testing on real images of held-out classes."""

    episodes: int = 600
    n_way: int = 5
    shots: List[int] = field(default_factory=lambda: [1, 5])
    q_query: int = 15
    inner_steps: int = 10
    episode_batch: int = 50  # episodes evaluated together (vectorised)
    seed: int = 1234


@dataclass
class MethodConfig:
    """Which method runs; the presets in ``params/method/`` set the groups that implement it."""

    name: str = "free"  # free | free_noalign | scratch | pixels | random_init | oracle


@dataclass
class TrackingConfig:
    """MLflow tracking (used by the orchestration layer)."""

    tracking_uri: str = "http://127.0.0.1:5000"  # env MLFLOW_TRACKING_URI wins
    experiment: str = "free"
    registered_model: str = "free-meta-learner"


@dataclass
class StorageConfig:
    """S3 storage for the DVC remote and MLflow artifacts. Credentials come from the environment."""

    s3_endpoint_url: str = "http://127.0.0.1:8333"
    bucket: str = "free"
    dvc_prefix: str = "dvc"
    mlflow_prefix: str = "mlflow"


@dataclass
class RunnerConfig:
    """Where fan-out work runs: teacher training and meta-test episode shards (``params/runner/``).

    Never part of an output: no stage fingerprint and no DVC stage's params include it.
    """

    name: str = "local"  # local (in the stage's process) | dask (mapped Prefect tasks, flows/fanout.py)
    address: Optional[str] = None  # an existing Dask scheduler; None = a LocalCluster on this machine
    workers: int = 1  # LocalCluster worker processes (one task thread each)
    shards: Optional[int] = None  # meta-test episode shards per shot setting; None = one per worker


@dataclass
class Config:
    """The whole resolved configuration of one pipeline run."""

    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N | mps
    threads: Optional[int] = None  # torch intra-op threads; None = torch's default
    paths: PathsConfig = field(default_factory=PathsConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    taskcache: TaskCacheConfig = field(default_factory=TaskCacheConfig)
    metalearn: MetaLearnConfig = field(default_factory=MetaLearnConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
