"""TLS contexts over real loopback handshakes, with certificates minted per test run
(``openssl`` CLI: see tests/support/certs.py)."""

from __future__ import annotations

import socket
import ssl
import threading
import warnings

import pytest
from pydantic import ValidationError

from poise.config.tls import Certificate, ClusterTls, ListenerTls
from poise.proxy.tls import ServerTls, TlsConfigError, check, client_context, load_certificate
from tests.support.certs import Pki, needs_openssl

pytestmark = needs_openssl


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.default = p.leaf("default", "default.example", ["default.example"])
    p.a = p.leaf("a", "a.example", ["a.example"])
    p.wild = p.leaf("wild", "wild", ["*.wild.example"])
    p.other = p.leaf("other", "other.example", ["other.example"])
    p.cn_only = p.leaf("cn", "cn-only.example", [])
    return p


class TlsServer:
    """A thread that completes handshakes with ``context`` and sends b"ok"."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = self.sock.getsockname()
        self.context = context
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError):
                    pass

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept(); shutdown() does.
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def serve():
    servers: list[TlsServer] = []

    def start(context: ssl.SSLContext) -> TlsServer:
        servers.append(TlsServer(context))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def trusting(pki: Pki, *, check_hostname: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.check_hostname = check_hostname
    return ctx


def handshake(server: TlsServer, ctx: ssl.SSLContext, name: str | None) -> ssl.SSLSocket:
    sock = socket.create_connection(server.addr, timeout=5)
    tls = ctx.wrap_socket(sock, server_hostname=name)
    assert tls.recv(2) == b"ok"
    return tls


def served_names(server: TlsServer, pki: Pki, name: str | None) -> list[str]:
    with handshake(server, trusting(pki), name) as tls:
        return [v for k, v in tls.getpeercert()["subjectAltName"] if k == "DNS"]


def listener(*certs: Certificate, **kw) -> ListenerTls:
    return ListenerTls(certificates=list(certs), **kw)


@pytest.mark.parametrize(("name", "expected"), [
    ("a.example", "a.example"),
    ("A.Example.", "a.example"),
    ("x.wild.example", "*.wild.example"),
    ("a.b.wild.example", "default.example"),  # wildcards cover one label only
    ("wild.example", "default.example"),
    ("unknown.example", "default.example"),
    (None, "default.example"),
])
def test_sni_picks_certificate(pki, serve, name, expected):
    tls = ServerTls(listener(pki.default, pki.a, pki.wild))
    server = serve(tls.context)
    assert served_names(server, pki, name) == [expected]


def test_alpn_negotiated_in_server_preference(pki, serve):
    server = serve(ServerTls(listener(pki.default)).context)
    client = trusting(pki)
    client.set_alpn_protocols(["h2", "http/1.1"])
    with handshake(server, client, "default.example") as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"

    server = serve(ServerTls(listener(pki.default, alpn=["h2", "http/1.1"])).context)
    with handshake(server, client, "default.example") as tls:
        assert tls.selected_alpn_protocol() == "h2"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_10_and_11_refused(pki, serve, version):
    server = serve(ServerTls(listener(pki.default)).context)
    client = trusting(pki)
    # Let the client itself offer the old versions, so the refusal is the server's.
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = version
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(server, client, "default.example")


def test_min_version_13_refuses_12(pki, serve):
    server = serve(ServerTls(listener(pki.default, min_version=1.3)).context)
    client = trusting(pki)
    with handshake(server, client, "default.example") as tls:
        assert tls.version() == "TLSv1.3"
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(server, client, "default.example")


def test_tls12_uses_intermediate_ciphers(pki, serve):
    server = serve(ServerTls(listener(pki.default)).context)
    client = trusting(pki)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with handshake(server, client, "default.example") as tls:
        assert tls.cipher()[0].startswith("ECDHE-")
        assert tls.compression() is None


def test_reload_swaps_certificates_without_rebinding(pki, serve):
    tls = ServerTls(listener(pki.default, pki.a))
    bound = tls.context
    server = serve(bound)
    assert served_names(server, pki, "a.example") == ["a.example"]

    tls.reload(listener(pki.other, pki.wild))
    assert tls.context is bound
    assert served_names(server, pki, "a.example") == ["other.example"]
    assert served_names(server, pki, None) == ["other.example"]
    assert served_names(server, pki, "x.wild.example") == ["*.wild.example"]


def test_reload_with_bad_file_keeps_old_certificates(pki, serve, tmp_path):
    tls = ServerTls(listener(pki.default, pki.a))
    server = serve(tls.context)
    missing = Certificate(cert=str(tmp_path / "nope.pem"), key=pki.other.key)
    with pytest.raises(TlsConfigError, match="nope.pem"):
        tls.reload(listener(pki.other, missing))
    assert served_names(server, pki, "a.example") == ["a.example"]
    assert served_names(server, pki, None) == ["default.example"]
    assert [i.names for i in tls.certificates] == [("default.example",), ("a.example",)]


def test_load_certificate_reports_names_and_expiry(pki):
    info = load_certificate(pki.wild.cert, pki.wild.key)
    assert info.names == ("*.wild.example",)
    assert info.not_after.tzinfo is not None
    # Without subjectAltName the subject's commonName is the name.
    assert load_certificate(pki.cn_only.cert, pki.cn_only.key).names == ("cn-only.example",)


def test_load_errors_name_the_file(pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    bad_body = tmp_path / "badbody.pem"
    bad_body.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")

    with pytest.raises(TlsConfigError, match=r"missing\.pem"):
        load_certificate(str(tmp_path / "missing.pem"), pki.a.key)
    with pytest.raises(TlsConfigError, match=r"missing\.key"):
        load_certificate(pki.a.cert, str(tmp_path / "missing.key"))
    with pytest.raises(TlsConfigError, match=r"garbage\.pem"):
        load_certificate(str(garbage), pki.a.key)
    with pytest.raises(TlsConfigError, match=r"badbody\.pem"):
        load_certificate(str(bad_body), pki.a.key)
    with pytest.raises(TlsConfigError, match=r"garbage\.pem"):
        load_certificate(pki.a.cert, str(garbage))
    with pytest.raises(TlsConfigError, match=r"default\.key does not match .*a\.pem"):
        load_certificate(pki.a.cert, pki.default.key)
    assert issubclass(TlsConfigError, ValueError)


def test_check_lists_unusable_files(pki, tmp_path):
    assert check(listener(pki.default, pki.a)) == []
    problems = check(listener(pki.default, Certificate(cert=pki.a.cert, key=pki.other.key)))
    assert len(problems) == 1 and "other.key" in problems[0]
    assert check(ClusterTls(ca=str(pki.ca))) == []
    assert "ca-missing.pem" in check(ClusterTls(ca=str(tmp_path / "ca-missing.pem")))[0]
    with pytest.raises(TlsConfigError, match="nope.pem"):
        ServerTls(listener(Certificate(cert=str(tmp_path / "nope.pem"), key=pki.a.key)))


def test_client_context_verifies_against_ca(pki, serve):
    server = serve(ServerTls(listener(pki.default, pki.a)).context)
    ctx = client_context(ClusterTls(ca=str(pki.ca), sni="a.example"))
    with handshake(server, ctx, "a.example") as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
    # Served the default certificate, whose name is not the one asked for.
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        handshake(server, ctx, "b.example")


def test_client_context_rejects_unknown_ca(pki, serve):
    server = serve(ServerTls(listener(pki.a)).context)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, client_context(ClusterTls()), "a.example")
    # verify: false accepts anything, knowingly.
    with handshake(server, client_context(ClusterTls(verify=False)), "b.example"):
        pass


def test_client_certificate_loaded_and_checked(pki):
    ctx = client_context(ClusterTls(ca=str(pki.ca), client_cert=pki.a.cert, client_key=pki.a.key))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(TlsConfigError, match="does not match"):
        client_context(ClusterTls(client_cert=pki.a.cert, client_key=pki.other.key))


def test_config_validation(pki):
    with pytest.raises(ValidationError):
        ListenerTls(certificates=[])
    with pytest.raises(ValidationError):
        listener(pki.a, min_version="1.1")
    with pytest.raises(ValidationError):
        listener(pki.a, ciphers="NO-SUCH-CIPHER")
    with pytest.raises(ValidationError):
        listener(pki.a, alpn=[""])
    with pytest.raises(ValidationError):
        ListenerTls(certificates=[{"cert": "a", "key": "b", "extra": 1}])
    with pytest.raises(ValidationError, match="both or neither"):
        ClusterTls(client_cert="c.pem")
    spec = listener(pki.a)
    assert (spec.min_version, spec.alpn, spec.ciphers) == ("1.2", ["http/1.1"], None)
    assert listener(pki.a, min_version=1.3).min_version == "1.3"
