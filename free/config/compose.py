"""Compose the Hydra tree in ``params/`` into a typed, validated :class:`Config`.

This is the only place (with the CLI) that imports Hydra: the core receives plain dataclasses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from free.config.schema import Config
from free.config.validate import ConfigError, validate
from free.paths import CONFIG_DIR_ENV, in_project, project_root


def config_dir() -> Path:
    """The Hydra config tree: ``$FREE_CONFIG_DIR``, else ``params/`` of the source checkout."""
    configured = os.environ.get(CONFIG_DIR_ENV)
    path = Path(configured) if configured else project_root() / "params"
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"no config.yaml in {path}; run from a checkout of free-pipeline (editable install) "
            f"or set {CONFIG_DIR_ENV} to the folder that holds the params/ tree"
        )
    return path


# Where things are on this machine comes from the environment, never from params/: the resolved
# params.yaml (a DVC dependency) must be the same file on every machine. Explicit overrides win.
ENV_SETTINGS = {
    "FREE_DATA_DIR": "paths.data_dir",
    "FREE_CACHE_DIR": "paths.cache_dir",
    "MLFLOW_TRACKING_URI": "tracking.tracking_uri",
    "FREE_S3_ENDPOINT_URL": "storage.s3_endpoint_url",
}


def env_settings() -> dict[str, str]:
    """``{config key: value}`` for the machine settings set in the environment."""
    return {key: os.environ[var] for var, key in ENV_SETTINGS.items() if os.environ.get(var)}


def hydra_compose_raw(overrides: Sequence[str] = ()) -> DictConfig:
    """Plain Hydra composition of ``config.yaml``, exactly as DVC's Hydra integration composes it."""
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir()), job_name="free"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as err:  # ValueError: e.g. `group=null`
        raise ConfigError(_one_paragraph(err)) from err


def compose_dictconfig(overrides: Sequence[str] = (), environment: bool = True) -> DictConfig:
    """Compose ``config.yaml`` with Hydra override strings, merged onto the typed schema.

    Machine settings from the environment (:data:`ENV_SETTINGS`) apply before ``overrides``.

    Raises:
        ConfigError: unknown key or group, bad override syntax, or a value of the wrong type.
    """
    env = [f"{key}={_quoted(value)}" for key, value in env_settings().items()] if environment else []
    composed = hydra_compose_raw([*env, *overrides])
    return _typed(composed)


def compose(overrides: Sequence[str] = ()) -> Config:
    """Compose, resolve interpolations, apply the environment, type-check and validate the config."""
    return _finish(compose_dictconfig(overrides))


def load_params(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config from a resolved params file (``params.yaml``), then the environment, then ``key=value`` overrides.

    This is how the DVC stages read their parameters: DVC tracks the keys of the file, so the stage
    must read that file and not compose the Hydra tree again.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found; write it with `free config params` (or `dvc exp run`)")
    return params_config(path.read_text(), overrides, source=str(path))


def params_config(text: str, overrides: Sequence[str] = (), source: str = "params.yaml") -> Config:
    """:func:`load_params` of a params file holding ``text`` (what a run reads once it is written)."""
    try:
        loaded = OmegaConf.create(text)
        env = OmegaConf.from_dotlist([f"{key}={value}" for key, value in env_settings().items()])
        explicit = OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{source}: {_one_paragraph(err)}") from err
    return _finish(_typed(OmegaConf.merge(loaded, env, explicit), source=source))


# The preset that the committed params.yaml holds (what `dvc repro`, `make repro` and the flow's
# default run): small enough for a laptop. `free config params` starts from it too.
DEFAULT_EXPERIMENT = "tiny"


def override_key(override: str) -> str:
    """The key a Hydra override sets: ``+a.b=1`` -> ``a.b``, ``~experiment`` -> ``experiment``."""
    return override.split("=", 1)[0].lstrip("+~")


def with_default_experiment(overrides: Sequence[str]) -> list[str]:
    """``overrides`` with ``experiment=tiny`` in front unless they choose an experiment themselves."""
    chosen = any(override_key(o) == "experiment" for o in overrides)
    return list(overrides) if chosen else [f"experiment={DEFAULT_EXPERIMENT}", *overrides]


def params_yaml(overrides: Sequence[str] = ()) -> str:
    """The resolved ``params.yaml`` for these overrides: machine-independent, byte-identical to
    what ``dvc exp run -S`` writes with the ``[hydra]`` section of ``.dvc/config``.

    Raises:
        ConfigError: if the composition is invalid (checked exactly as :func:`compose` checks it).
    """
    raw = hydra_compose_raw(overrides)
    _finish(_typed(raw.copy()))  # validate, discard
    OmegaConf.resolve(raw)
    return OmegaConf.to_yaml(raw)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, as ``free config show`` prints it."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _typed(composed: DictConfig, source: str = "config") -> DictConfig:
    # Merging onto the structured schema checks types and rejects keys the schema lacks.
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), composed)
    except OmegaConfBaseException as err:
        prefix = "" if source == "config" else f"{source}: "
        raise ConfigError(prefix + _one_paragraph(err)) from err


def _finish(merged: DictConfig) -> Config:
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_paragraph(err)) from err
    assert isinstance(cfg, Config)
    # Relative folders are under the project root, not the cwd, so a command works from anywhere;
    # a relative dataset root is a folder under paths.data_dir (params stay machine-independent).
    cfg.paths.data_dir = str(in_project(cfg.paths.data_dir))
    cfg.paths.cache_dir = str(in_project(cfg.paths.cache_dir))
    if not Path(cfg.dataset.root).is_absolute():
        cfg.dataset.root = str(Path(cfg.paths.data_dir) / cfg.dataset.root)
    return validate(cfg)


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _one_paragraph(err: Exception) -> str:
    # Hydra/OmegaConf messages carry a multi-line "full_key/object_type" trailer; keep it, compactly.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " | ".join(lines) or type(err).__name__
