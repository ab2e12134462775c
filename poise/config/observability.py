"""Config models for what operators see of poise: metrics, access logs, tracing."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metrics(_Strict):
    """Prometheus metrics, served at ``GET /metrics`` on the admin listener.

    Workers count in plain integers either way; ``enabled: false`` also skips the
    per-request counting (status codes, latency histograms) on the request path."""

    enabled: bool = True


class AccessLog(_Strict):
    """One line per response, JSON lines or the Combined Log Format.

    ``path``: ``stdout`` or a file (appended to; reopened on SIGUSR1 for logrotate).
    Lines are buffered and written on a timer and at shutdown, never in the request."""

    format: Literal["json", "combined"] = "json"
    path: str = "stdout"

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be 'stdout' or a file path")
        return v


class Tracing(_Strict):
    """OpenTelemetry traces sent over OTLP/HTTP (needs the ``[otel]`` extra).

    A request whose ``traceparent`` says sampled is traced (parent-based); one without
    starts a trace with probability ``sample_ratio``."""

    otlp_endpoint: str = "http://127.0.0.1:4318"
    sample_ratio: float = Field(0.1, ge=0.0, le=1.0)
    service_name: str = Field("poise", min_length=1)
