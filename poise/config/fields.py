"""Field types and the base model shared by the configuration schema's modules.

Durations accept ``250ms``/``2s``/``1m`` or numbers of seconds; sizes accept
``64KiB``/``1MiB`` or numbers of bytes; percentages accept ``10%`` or numbers of percent
and are stored as fractions (``10%`` → 0.1).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from poise.config.units import parse_address, parse_duration, parse_size
from poise.core.units import parse_percent

Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Size = Annotated[int, BeforeValidator(parse_size)]


def dump_percent(fraction: float) -> str:
    # A bare number would read back as percent, so dumps say "20%" to round-trip.
    return f"{round(fraction * 100, 9):.12g}%"


# A fraction 0..1 written as ``10%`` or ``10`` (percent).
Percent = Annotated[float, BeforeValidator(parse_percent), PlainSerializer(dump_percent)]


def _check_address(value: object) -> str:
    parse_address(value)
    return value  # type: ignore[return-value]


Address = Annotated[str, BeforeValidator(_check_address)]




def printable(v: str) -> bool:
    return v.isascii() and v.isprintable() and " " not in v


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

