"""Configuration: typed schema, composition of the Hydra tree in ``params/``, validation."""

from free.config.compose import compose, config_dir, load_params, params_yaml, to_yaml
from free.config.schema import Config
from free.config.validate import ConfigError, validate

__all__ = ["Config", "ConfigError", "compose", "config_dir", "load_params", "params_yaml", "to_yaml", "validate"]
