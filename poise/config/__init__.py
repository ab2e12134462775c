"""Configuration: YAML or TOML files validated into :class:`Config`."""

from poise.config.load import load_config, parse_config
from poise.config.model import Cluster, Config, Listener, Route

__all__ = ["Cluster", "Config", "Listener", "Route", "load_config", "parse_config"]
