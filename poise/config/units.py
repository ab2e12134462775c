"""Config units; the parsers live in :mod:`poise.core.units` so that pure core code
(policy options) can use them without importing the config layer."""

from poise.core.units import parse_address, parse_duration, parse_size

__all__ = ["parse_address", "parse_duration", "parse_size"]
