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

CONFIG_DIR_ENV = "FREE_CONFIG_DIR"


def config_dir() -> Path:
    """The Hydra config tree: ``$FREE_CONFIG_DIR``, else ``params/`` of the source checkout."""
    configured = os.environ.get(CONFIG_DIR_ENV)
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "params"
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"no config.yaml in {path}; run from a checkout of free-pipeline (editable install) "
            f"or set {CONFIG_DIR_ENV} to the folder that holds the params/ tree"
        )
    return path


def compose_dictconfig(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``config.yaml`` with Hydra override strings, merged onto the typed schema.

    Raises:
        ConfigError: unknown key or group, bad override syntax, or a value of the wrong type.
    """
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir()), job_name="free"):
            composed = hydra_compose(config_name="config", overrides=list(overrides))
        # Merging onto the structured schema checks types and rejects keys the schema lacks.
        return OmegaConf.merge(OmegaConf.structured(Config), composed)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_paragraph(err)) from err


def compose(overrides: Sequence[str] = ()) -> Config:
    """Compose, resolve interpolations (``${oc.env:...}``), type-check and validate the config."""
    merged = compose_dictconfig(overrides)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_paragraph(err)) from err
    assert isinstance(cfg, Config)
    return validate(cfg)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, as it is logged and written to ``params.yaml``."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _one_paragraph(err: Exception) -> str:
    # Hydra/OmegaConf messages carry a multi-line "full_key/object_type" trailer; keep it, compactly.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " | ".join(lines) or type(err).__name__
