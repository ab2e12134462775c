"""TLS contexts: termination with SNI certificate selection, and origination.

:class:`ServerTls` owns one ``ssl.SSLContext`` per certificate plus a *base* context
that listeners are bound with. The base context's SNI callback switches each handshake
to the context whose certificate serves the requested name, so :meth:`ServerTls.reload`
can swap certificates for new handshakes without rebinding the listener.

Everything here is built at config time; the handshake path does one dict lookup.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from poise.config.tls import ClusterTls, ListenerTls

if TYPE_CHECKING:
    from poise.config.model import Config

# Mozilla's server-side TLS "intermediate" TLS 1.2 suites: forward secret AEADs only.
# DHE suites stay inert unless DH parameters are loaded, which poise does not do.
INTERMEDIATE_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-CHACHA20-POLY1305",
])

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What a loaded certificate serves: DNS names (lowercase) and its expiry (UTC)."""

    cert: str
    key: str
    names: tuple[str, ...]
    not_after: datetime


def load_certificate(cert: str, key: str) -> CertInfo:
    """Read and check a PEM certificate chain and its key.

    Raises :class:`TlsConfigError` naming the file for an unreadable file, a file that
    holds no PEM certificate or key, or a key that does not belong to the certificate.
    The names are the subjectAltName DNS entries, else the subject's commonName.
    """
    return _load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)


def _load_into(ctx: ssl.SSLContext, cert: str, key: str) -> CertInfo:
    cert_pem = _read(cert, "certificate")
    if "-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise TlsConfigError(f"certificate file {cert}: no PEM certificate in it")
    key_pem = _read(key, "key")
    if "PRIVATE KEY-----" not in key_pem:
        raise TlsConfigError(f"key file {key}: no PEM private key in it")
    if "ENCRYPTED" in key_pem:
        raise TlsConfigError(f"key file {key} is encrypted: poise needs an unencrypted key "
                             f"(openssl pkey -in {key} -out NEW.pem)")
    names, not_after = _describe(cert, cert_pem)
    try:
        # (A password callback that gives none: OpenSSL must never prompt a terminal.)
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise TlsConfigError(f"key file {key} does not match certificate {cert}") from None
        raise TlsConfigError(f"certificate {cert} with key {key}: {e.reason or e}") from None
    return CertInfo(cert, key, names, not_after)


def _no_password() -> str:
    raise TlsConfigError("encrypted private keys are not supported")


def _read(path: str, what: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError as e:
        raise TlsConfigError(f"{what} file {path}: {e.strerror or e}") from None


def _describe(path: str, pem: str) -> tuple[tuple[str, ...], datetime]:
    try:
        return _describe_cryptography(path, pem)
    except ImportError:
        pass
    try:
        # The stdlib has no public decoder for a certificate that is not a peer's;
        # this one has been stable since Python 2.7 and backs ssl's own tests.
        decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except (ssl.SSLError, ValueError) as e:
        raise TlsConfigError(f"certificate file {path}: not a valid PEM certificate ({e})") from None
    names = [v for k, v in decoded.get("subjectAltName", ()) if k == "DNS"]
    if not names:
        names = [v for rdn in decoded.get("subject", ()) for k, v in rdn if k == "commonName"]
    expiry = datetime.fromtimestamp(ssl.cert_time_to_seconds(decoded["notAfter"]), UTC)
    return tuple(n.lower() for n in names), expiry


def _describe_cryptography(path: str, pem: str) -> tuple[tuple[str, ...], datetime]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        crt = x509.load_pem_x509_certificate(pem.encode())
        san = crt.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    except ValueError as e:
        raise TlsConfigError(f"certificate file {path}: not a valid PEM certificate ({e})") from None
    if not names:
        names = [str(a.value) for a in crt.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(n.lower() for n in names), crt.not_valid_after_utc


def _server_context(spec: ListenerTls) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[spec.min_version]
    ctx.set_ciphers(spec.ciphers or INTERMEDIATE_CIPHERS)
    # Compression leaks secrets (CRIME); client renegotiation is a cheap DoS lever.
    # Session tickets stay on (OpenSSL's default) so clients resume cheaply.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if spec.alpn:
        ctx.set_alpn_protocols(spec.alpn)
    return ctx


@dataclass(frozen=True, slots=True)
class _SniTable:
    """Name → context lookup, built whole and swapped whole on reload."""

    default: ssl.SSLContext
    exact: dict[str, ssl.SSLContext]
    # "*.example.com" is stored under "example.com": one label only (RFC 6125 §6.4.3).
    wildcard: dict[str, ssl.SSLContext]
    infos: tuple[CertInfo, ...]

    def pick(self, server_name: str | None) -> ssl.SSLContext:
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        ctx = self.exact.get(name)
        if ctx is not None:
            return ctx
        _, dot, parent = name.partition(".")
        if dot:
            ctx = self.wildcard.get(parent)
            if ctx is not None:
                return ctx
        return self.default


def _build_table(spec: ListenerTls) -> _SniTable:
    contexts, infos = [], []
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    for c in spec.certificates:
        ctx = _server_context(spec)
        info = _load_into(ctx, c.cert, c.key)
        contexts.append(ctx)
        infos.append(info)
        for name in info.names:
            # The first certificate listed for a name wins, as operators read the list.
            if name.startswith("*.") and "*" not in name[2:]:
                wildcard.setdefault(name[2:], ctx)
            elif "*" not in name:
                exact.setdefault(name, ctx)
    return _SniTable(contexts[0], exact, wildcard, tuple(infos))


class ServerTls:
    """TLS termination for one listener.

    ``context`` is what the listener is bound with (``loop.create_server(ssl=...)``);
    it stays the same object for the life of the listener. Raises
    :class:`TlsConfigError` if any certificate cannot be loaded.
    """

    def __init__(self, spec: ListenerTls) -> None:
        self._table = _build_table(spec)
        self.context = _server_context(spec)
        # The base context serves the default certificate itself too, so a handshake
        # is never left without one.
        first = spec.certificates[0]
        self.context.load_cert_chain(first.cert, first.key, password=_no_password)
        self.context.sni_callback = self._on_sni

    def _on_sni(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # Called for every ClientHello, with None when the client sent no SNI.
        sslobj.context = self._table.pick(server_name)
        sslobj.sni_name = server_name  # type: ignore[attr-defined]  # (see ClientConnection.sni)

    @property
    def certificates(self) -> tuple[CertInfo, ...]:
        """The certificates in use, in config order (the first is the default)."""
        return self._table.infos

    def reload(self, spec: ListenerTls) -> None:
        """Re-read the files and serve ``spec`` to new handshakes.

        All certificates are loaded before anything changes: on error the old ones stay
        in use and :class:`TlsConfigError` is raised. Connections already established
        keep the certificate they were handshaken with.
        """
        table = _build_table(spec)
        self._table = table
        # Version and cipher list are fixed when a connection is created from the base
        # context, before SNI switches it, so the base carries them for new handshakes.
        self.context.minimum_version = _VERSIONS[spec.min_version]
        self.context.set_ciphers(spec.ciphers or INTERMEDIATE_CIPHERS)
        self.context.set_alpn_protocols(spec.alpn)
        first = spec.certificates[0]
        self.context.load_cert_chain(first.cert, first.key, password=_no_password)

    def __repr__(self) -> str:
        names = ",".join(n for i in self._table.infos for n in i.names)
        return f"<ServerTls certificates={len(self._table.infos)} names={names}>"


def listener_tls(current: ServerTls | None, spec: ListenerTls | None) -> ServerTls | None:
    """A listener's ServerTls after a (re)configure: ``current`` reloaded with ``spec``
    (certificate files are read again), a new one, or None without TLS.  Raises
    TlsConfigError, leaving ``current`` as it was."""
    if spec is None:
        return None
    if current is None:
        return ServerTls(spec)
    current.reload(spec)
    return current


def client_context(spec: ClusterTls,
                   alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for connecting to a cluster's backends.

    With ``verify`` the chain is checked against ``ca`` (else the system store) and the
    name is checked: the caller passes ``server_hostname=`` :func:`origination_name`.
    Offers TLS 1.2+ and the ``alpn`` protocols (default ``http/1.1``; empty: no ALPN
    extension). Raises :class:`TlsConfigError` for an
    unusable CA bundle or client certificate.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if spec.verify:
        if spec.ca is None:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            _read(spec.ca, "CA")
            try:
                ctx.load_verify_locations(cafile=spec.ca)
            except ssl.SSLError as e:
                raise TlsConfigError(f"CA file {spec.ca}: no usable PEM certificates ({e})") from None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if spec.client_cert is not None and spec.client_key is not None:
        _load_into(ctx, spec.client_cert, spec.client_key)
    return ctx


def origination_name(spec: ClusterTls, host: str) -> str | None:
    """The SNI name to send (and verify) to a backend at ``host``.

    ``spec.sni`` if set; else ``host``, unless it is an IP address, which TLS does not
    carry as SNI (verification then matches the certificate's IP entries).
    """
    return spec.sni or host


def check(spec: ListenerTls | ClusterTls) -> list[str]:
    """Human-readable problems that make ``spec`` unusable; empty when it is usable.

    Used by ``poise check``. An expired certificate is not an error here: it loads,
    and whether clients accept it is their call.
    """
    problems: list[str] = []
    if isinstance(spec, ListenerTls):
        for c in spec.certificates:
            try:
                load_certificate(c.cert, c.key)
            except TlsConfigError as e:
                problems.append(str(e))
    else:
        try:
            client_context(spec)
        except TlsConfigError as e:
            problems.append(str(e))
    return problems


def config_errors(config: Config) -> list[tuple[str, str]]:
    """``(field, message)`` for every listener and cluster whose TLS files cannot be
    used (see :func:`check`): for ``poise check`` and to refuse a reload."""
    errors = []
    for i, listener in enumerate(config.listeners):
        if listener.tls is not None:
            errors += [(f"listeners[{i}].tls", p) for p in check(listener.tls)]
    for i, cluster in enumerate(config.clusters):
        if cluster.tls is not None:
            errors += [(f"clusters[{i}].tls", p) for p in check(cluster.tls)]
    return errors
