"""Config models of TLS: termination on listeners, origination towards clusters.

Paths are only checked for shape here; whether the files exist, parse and match is
:func:`poise.proxy.tls.check`'s job (``poise check``), so loading a config never
touches the disk beyond the config file itself.
"""

from __future__ import annotations

import ssl
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _version_text(value: object) -> object:
    # YAML reads an unquoted ``1.2`` as a float; accept it as the operator meant it.
    if isinstance(value, float):
        return f"{value:.1f}"
    return value


_Path = Annotated[str, Field(min_length=1)]


class Certificate(_Strict):
    """One certificate chain (PEM, leaf first) and its private key (PEM, unencrypted)."""

    cert: _Path
    key: _Path


class ListenerTls(_Strict):
    """TLS termination on a listener.

    ``certificates``: at least one; the handshake's SNI name picks one by its names
    (exact, then a one-label ``*.`` wildcard); the first is served when nothing matches
    or the client sends no SNI.
    ``min_version``: ``"1.2"`` (default) or ``"1.3"``; older versions are never offered.
    ``alpn``: protocols offered in preference order, default ``["http/1.1"]``; empty
    turns ALPN off.
    ``ciphers``: an OpenSSL cipher string for TLS 1.2; None (default) is Mozilla's
    "intermediate" list. TLS 1.3 suites are OpenSSL's defaults either way.
    """

    certificates: list[Certificate] = Field(min_length=1)
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_version_text)] = "1.2"
    alpn: list[str] = ["http/1.1"]
    ciphers: str | None = None

    @field_validator("alpn")
    @classmethod
    def _alpn(cls, v: list[str]) -> list[str]:
        for proto in v:
            # The wire format prefixes each name with a one-byte length.
            if not 1 <= len(proto.encode()) <= 255:
                raise ValueError(f"ALPN protocol names are 1..255 bytes, got {proto!r}")
        return v

    @field_validator("ciphers")
    @classmethod
    def _ciphers(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(v)
        except ssl.SSLError:
            raise ValueError(f"OpenSSL selects no cipher from {v!r}") from None
        return v


class ClusterTls(_Strict):
    """TLS origination towards a cluster's backends.

    ``verify`` (default true): check the backend's chain and name. ``ca``: a PEM bundle
    of trusted CAs; None (default) is the system store. ``sni``: the name sent and
    verified; None means the backend's host. ``client_cert``/``client_key``: a client
    certificate for mutual TLS, both or neither.
    """

    verify: bool = True
    ca: _Path | None = None
    sni: Annotated[str, Field(min_length=1)] | None = None
    client_cert: _Path | None = None
    client_key: _Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> ClusterTls:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together: give both or neither")
        return self
