"""Config models of health and resilience: active health checks, outlier detection,
retries (with their backoff), and the status lists they take."""

from __future__ import annotations

import re
from functools import partial
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)

from poise.config.fields import (
    Duration,
    Percent,
    PositiveDuration,
    Size,
    Strict,
    dump_percent,
    printable,
)
from poise.config.units import parse_duration
from poise.core.units import parse_percent

_STATUS_RANGE = re.compile(r"^\s*(\d{3})\s*(?:-\s*(\d{3})\s*)?$")
_STATUS_CLASS = re.compile(r"^\s*([1-5])xx\s*$", re.IGNORECASE)
_STATUS_HELP = "expected a status 100..599, a range like 500-599, or a class like 5xx"


def _status(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise ValueError(_STATUS_HELP)
    return value


def _status_range(value: object) -> tuple[int, int]:
    if isinstance(value, str):
        if m := _STATUS_CLASS.match(value):
            lo = int(m.group(1)) * 100
            return lo, lo + 99
        if m := _STATUS_RANGE.match(value):
            lo = _status(int(m.group(1)))
            hi = _status(int(m.group(2) or lo))
        else:
            raise ValueError(_STATUS_HELP)
    elif isinstance(value, list | tuple) and len(value) == 2:   # (lo, hi), as dumped
        lo, hi = _status(value[0]), _status(value[1])
    else:
        lo = hi = _status(value)
    if lo > hi:
        raise ValueError(f"empty status range {lo}-{hi}")
    return lo, hi


def _status_list(value: object) -> object:
    # A lone status or range stands for a list of one.
    return [value] if isinstance(value, int | str) else value


# Response statuses as ``[200, "300-399", "5xx"]``, normalised to ``((lo, hi), ...)``.
StatusRanges = Annotated[
    tuple[Annotated[tuple[int, int], BeforeValidator(_status_range)], ...],
    BeforeValidator(_status_list),
    Field(min_length=1),
]

_RETRY_CONDITIONS = ("connect_failure", "reset", "timeout")
_RETRY_HELP = "expected connect_failure, reset, timeout or a status 500..599"


def _retry_on(value: object) -> str | int:
    if isinstance(value, str) and value in _RETRY_CONDITIONS:
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 500 <= value <= 599:
        raise ValueError(_RETRY_HELP)
    return value


# What makes an attempt worth retrying: a failure kind, or a response status 500..599.
RetryOn = Annotated[Literal["connect_failure", "reset", "timeout"] | int,
                    PlainValidator(_retry_on)]

# A retry budget may exceed 100%: 10 (1000%) allows ten retries per request.
RetryBudget = Annotated[float, BeforeValidator(partial(parse_percent, maximum=10.0)),
                        PlainSerializer(dump_percent)]

# RFC 9110 token characters, which a method consists of.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class HealthCheck(Strict):
    """Active probes of every backend: ``rise`` passes in a row mark a backend up,
    ``fall`` failures in a row mark it down.  An ``http`` probe passes when the status
    is in ``expect_status`` and the body contains ``expect_body`` (if set); a ``tcp``
    probe passes when a connection opens (``path``, ``method``, ``host`` and the
    ``expect_*`` fields are then unused); a ``grpc`` probe calls the gRPC health
    protocol for ``service`` and passes on SERVING (``host`` is its authority)."""

    type: Literal["http", "tcp", "grpc"] = "http"
    # grpc: the service asked about ("": the server as a whole).
    service: str = ""
    path: str = "/health"
    method: str = "GET"
    # Host header sent; None = the backend's address.
    host: str | None = None
    expect_status: StatusRanges = ((200, 399),)
    # A substring the response body must contain.
    expect_body: str | None = None
    interval: PositiveDuration = 2.0
    # Must not exceed ``interval``: probes of one backend never overlap.  Default: 1 s,
    # or ``interval`` when that is shorter (filled in when the settings are read, so
    # that a config written back out checks the same).
    timeout: PositiveDuration = 1.0
    # Each wait is interval × (1 ± jitter), so that workers do not probe in lockstep.
    jitter: Percent = 0.10
    rise: int = Field(2, ge=1)
    fall: int = Field(3, ge=1)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with /")
        if not printable(v):
            raise ValueError("must not contain spaces or control characters")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if not _TOKEN.match(v):
            raise ValueError("expected an HTTP method such as GET or HEAD")
        return v.upper()

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not (v and printable(v)):
            raise ValueError("expected a host name, without spaces or control characters")
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: float, info: ValidationInfo) -> float:
        interval = info.data.get("interval")
        if interval is not None and v > interval:
            raise ValueError(f"must not exceed interval ({interval:g}s)")
        return v

    @field_validator("jitter")
    @classmethod
    def _jitter(cls, v: float) -> float:
        if v > 0.5:
            raise ValueError("must be at most 50%")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_timeout(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("timeout") is None and "interval" in data:
            try:
                interval = parse_duration(data["interval"])
            except (TypeError, ValueError):
                return data     # (the interval field reports it)
            if 0 < interval < 1.0:
                data = {**data, "timeout": interval}
        return data


class OutlierDetection(Strict):
    """Passive ejection of backends whose requests keep failing.  The n-th ejection of
    a backend lasts n × ``base_ejection_time``, capped at ``max_ejection_time``."""

    # Failures in a row (any status in failure_statuses, or no response) that eject.
    consecutive_failures: int = Field(5, ge=1)
    # 502/503/504 or no response at all, in a row, that eject.
    consecutive_gateway_errors: int = Field(5, ge=1)
    failure_statuses: StatusRanges = ((500, 599),)
    base_ejection_time: PositiveDuration = 30.0
    max_ejection_time: Duration = 300.0
    # A fraction of the cluster's backends: more are never ejected at once.
    max_ejection_percent: Percent = 0.5

    @field_validator("max_ejection_time")
    @classmethod
    def _max_time(cls, v: float, info: ValidationInfo) -> float:
        base = info.data.get("base_ejection_time")
        if base is not None and v < base:
            raise ValueError(f"must be at least base_ejection_time ({base:g}s)")
        return v


class Backoff(Strict):
    """The wait before retry n: exponential from ``base``, capped at ``max``, jittered.
    Also written as the string ``"25ms..250ms"``."""

    base: Duration = 0.025
    max: Duration = 0.25

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: object) -> object:
        if not isinstance(data, str):
            return data
        parts = data.split("..")
        if len(parts) != 2:
            raise ValueError("expected {base, max} or a range like 25ms..250ms")
        return {"base": parts[0].strip(), "max": parts[1].strip()}

    @field_validator("max")
    @classmethod
    def _max(cls, v: float, info: ValidationInfo) -> float:
        base = info.data.get("base")
        if base is not None and v < base:
            raise ValueError(f"must be at least base ({base:g}s)")
        return v


def _default_retry_on() -> list[str | int]:
    return ["connect_failure", "reset", "timeout", 502, 503, 504]


class Retries(Strict):
    """Sending a failed request again, to another backend where one is left."""

    # Total tries, including the first.
    attempts: int = Field(2, ge=1, le=10)
    retry_on: list[RetryOn] = Field(default_factory=_default_retry_on)
    # Deadline of each try's response head; None = response_header_timeout applies.
    per_try_timeout: PositiveDuration | None = None
    backoff: Backoff = Backoff()
    # Retries allowed per request, on average (over 10 s), besides min_per_second.
    budget: RetryBudget = 0.2
    min_per_second: float = Field(10.0, ge=0, allow_inf_nan=False)
    # Retry POST, PATCH, ... too (only idempotent methods otherwise).
    retry_non_idempotent: bool = False
    # Requests with larger bodies are not retried (the body is not kept to replay).
    max_buffered_body: Size = 64 * 1024
