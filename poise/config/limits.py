"""Config models for rate limits and client address trust (docs/rate-limiting.md)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from poise.config.units import parse_duration
from poise.core.ratelimit import parse_rate

# A header name: an RFC 9110 token.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_KEY_HELP = "expected client_ip, route, cluster or header:NAME"
# The default number of slots in the shared rate-limit table (16 bytes each: 4 MiB).
DEFAULT_TABLE_SLOTS = 1 << 18


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_rate(value: object) -> str:
    parse_rate(value)       # (a str, or ValueError)
    return str(value).strip()


def _check_key(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(_KEY_HELP)
    if value in ("client_ip", "route", "cluster"):
        return value
    kind, sep, name = value.partition(":")
    if kind != "header" or not sep or not _TOKEN.match(name):
        raise ValueError(_KEY_HELP)
    return f"header:{name.lower()}"


def _check_redis(value: object) -> object:
    if isinstance(value, str) and not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected a URL like redis://127.0.0.1:6379/0")
    return value


Rate = Annotated[str, BeforeValidator(_check_rate)]


class RateLimit(_Strict):
    """One limit: ``rate`` requests per second/minute/hour per ``key``, GCRA.

    ``burst``: requests admitted at once by an idle key (default: the rate's count, so
    ``100/s`` admits 100 at once and then one per 10 ms).  ``mode: shadow`` only counts
    what would be denied.  ``scope: global`` shares the limit through Redis with every
    poise using the same ``redis`` and ``name``."""

    # client_ip | route | cluster | header:NAME (requests without it share one key)
    key: Annotated[str, BeforeValidator(_check_key)] = "client_ip"
    rate: Rate
    burst: int | None = Field(None, ge=1)
    mode: Literal["enforce", "shadow"] = "enforce"
    # The policy's name in RateLimit headers, metrics and Redis keys (default: derived
    # from where the limit is and what it says).
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    scope: Literal["local", "global"] = "local"
    redis: Annotated[str | None, BeforeValidator(_check_redis)] = None
    # A Redis call slower than this counts as a failure (then ``on_redis_error``).
    redis_timeout: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 0.05
    on_redis_error: Literal["allow", "deny"] = "allow"

    @model_validator(mode="after")
    def _global_needs_redis(self) -> RateLimit:
        if self.scope == "global" and self.redis is None:
            raise ValueError("scope: global needs redis: URL")
        if self.scope == "local" and self.redis is not None:
            raise ValueError("redis: is only for scope: global")
        return self

    def per_second(self) -> float:
        count, seconds = parse_rate(self.rate)
        return count / seconds

    def burst_size(self) -> int:
        return self.burst if self.burst is not None else parse_rate(self.rate)[0]


def _limit_list(value: object) -> object:
    # One mapping stands for a list of one.
    return [value] if isinstance(value, dict) else value


# ``rate_limit:`` on a route or listener: one mapping or a list (any one denies).
RateLimits = Annotated[list[RateLimit], BeforeValidator(_limit_list)]


def _check_cidr(value: object) -> str:
    try:
        return str(ipaddress.ip_network(str(value).strip(), strict=False))
    except ValueError:
        raise ValueError(f"expected an address or CIDR like 10.0.0.0/8, not {value!r}") \
            from None


Cidr = Annotated[str, BeforeValidator(_check_cidr)]


def _power_of_two(value: int) -> int:
    if value & (value - 1):
        raise ValueError(f"must be a power of two (like {1 << value.bit_length()}), not {value}")
    return value


# The shared rate-limit table's size in keys (16 bytes each).
TableSlots = Annotated[int, Field(ge=1024, le=1 << 26), AfterValidator(_power_of_two)]
