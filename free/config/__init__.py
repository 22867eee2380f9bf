"""Configuration: typed schema, composition of the Hydra tree in ``params/``, validation."""

from free.config.compose import (
    DEFAULT_EXPERIMENT,
    compose,
    config_dir,
    load_params,
    params_config,
    params_yaml,
    to_yaml,
    with_default_experiment,
)
from free.config.schema import Config
from free.config.validate import ConfigError, validate

__all__ = [
    "DEFAULT_EXPERIMENT",
    "Config",
    "ConfigError",
    "compose",
    "config_dir",
    "load_params",
    "params_config",
    "params_yaml",
    "to_yaml",
    "validate",
    "with_default_experiment",
]
