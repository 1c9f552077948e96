"""Configuration: the schema (``schema``), units (``units``) and file loading (``loader``)."""

from proxy.config.loader import ConfigError, load_config, parse_config
from proxy.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config", "parse_config"]
