"""A small threaded HTTP/1.1 backend for TLS and PROXY protocol tests, run inside the
test process (so a test can read what it saw directly).

``StreamBackend(name, tls=ctx, proxy=True)``: with ``proxy`` every connection must
start with a PROXY header (parsed with :func:`poise.proxy.proxy_protocol.parse`; a
connection without one is closed and counted in ``refused``; ``proxy="optional"``
takes connections either way); with ``tls`` the
connection then handshakes with ``ctx`` (as a server: the SNI name sent and the
client certificate, if any, are recorded).  Requests are answered, keep-alive, with
200 and a JSON body describing the request and its connection (:meth:`_describe`);
``X-Backend`` carries the backend's name.

Everything it sees is in ``connections`` (one :class:`Seen` per connection that got
through its header and handshake), ``handshake_failures`` and ``refused``.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from dataclasses import dataclass, field

from poise.proxy.proxy_protocol import ProxyHeader, ProxyProtocolError, parse

LOOPBACK = "127.0.0.1"
_TIMEOUT = 10.0


@dataclass
class Seen:
    """One connection as the backend saw it."""

    index: int
    proxy: ProxyHeader | None = None
    sni: str | None = None
    client_cn: str | None = None
    targets: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.targets)


class StreamBackend:
    """See the module docstring; ``address`` is ``"127.0.0.1:PORT"``."""

    def __init__(self, name: str, *, tls: ssl.SSLContext | None = None,
                 proxy: bool | str = False) -> None:
        self.name = name
        self.tls = tls
        self.proxy = proxy
        self.lock = threading.Lock()
        self.connections: list[Seen] = []
        self.accepted = 0
        self.refused = 0
        self.handshake_failures = 0
        if tls is not None:
            tls.sni_callback = _remember_sni
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"{LOOPBACK}:{self.port}"
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._start(self._accept)

    # -- what was seen ---------------------------------------------------------------

    def seen(self, *, probes: bool = False) -> list[Seen]:
        """The connections that carried requests (with ``probes``: all, health checks'
        included)."""
        with self.lock:
            conns = list(self.connections)
        return conns if probes else [c for c in conns if any(
            t != "/health" for t in c.targets)]

    def reset(self) -> None:
        with self.lock:
            self.connections.clear()
            self.accepted = self.refused = self.handshake_failures = 0

    # -- serving -----------------------------------------------------------------------

    def _start(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self._open.add(conn)
            self._start(self._serve, conn)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(_TIMEOUT)
        sock: socket.socket = raw
        try:
            header = self._read_header(raw) if self.proxy else None
            if self.proxy is True and header is None:
                with self.lock:
                    self.refused += 1
                return
            client_cn = sni = None
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(raw, server_side=True)
                except (ssl.SSLError, OSError):
                    with self.lock:
                        self.handshake_failures += 1
                    return
                with self.lock:     # (the TLS socket took the file descriptor over)
                    self._open.discard(raw)
                    self._open.add(sock)
                sni = getattr(sock, "poise_sni", None)
                cert = sock.getpeercert()
                if cert:
                    client_cn = next(v for rdn in cert["subject"] for k, v in rdn
                                     if k == "commonName")
            with self.lock:
                seen = Seen(len(self.connections) + 1, header, sni, client_cn)
                self.connections.append(seen)
            self._http(sock, seen)
        except (OSError, ValueError):
            pass
        finally:
            with self.lock:
                self._open.discard(raw)
                self._open.discard(sock)
            sock.close()

    @staticmethod
    def _read_header(sock: socket.socket) -> ProxyHeader | None:
        """The PROXY header, consuming exactly its bytes (what follows may be a TLS
        ClientHello); None when the connection does not start with a valid one."""
        while True:
            peeked = sock.recv(4096, socket.MSG_PEEK)
            if not peeked:
                return None
            try:
                header, consumed = parse(peeked)
            except ProxyProtocolError:
                return None
            if header is not None:
                sock.recv(consumed)
                return header
            if len(peeked) >= 4096:
                return None
            # (Only part of the header has arrived: wait for more.)
            threading.Event().wait(0.005)

    def _http(self, sock: socket.socket, seen: Seen) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
            length = next((int(v) for n, v in headers if n.lower() == "content-length"), 0)
            while len(buf) < length:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
            buf = buf[length:]
            with self.lock:
                seen.targets.append(target)
            body = json.dumps(self._describe(seen, method, target, headers)).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"X-Backend: %b\r\nContent-Length: %d\r\n\r\n%b"
                         % (self.name.encode(), len(body), body))

    def _describe(self, seen: Seen, method: str, target: str, headers: list) -> dict:
        proxy = seen.proxy
        return {
            "backend": self.name, "conn": seen.index, "request": seen.requests,
            "method": method, "target": target, "headers": headers,
            "sni": seen.sni, "client_cn": seen.client_cn,
            "proxy": None if proxy is None else {
                "version": proxy.version, "command": proxy.command,
                "source": proxy.source and list(proxy.source),
                "destination": proxy.destination and list(proxy.destination)},
        }

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept(); shutdown() does.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self.lock:
            open_now = list(self._open)
        for s in open_now:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)

    def __repr__(self) -> str:
        return f"<StreamBackend {self.name} {self.address}>"


def _remember_sni(sslobj, server_name, _ctx) -> None:
    # Server-side SSL objects do not keep the name the client asked for: note it.
    sslobj.poise_sni = server_name


def server_context(cert, *, client_ca: str | None = None,
                   max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A server context for ``cert`` (a poise Certificate); with ``client_ca`` a client
    certificate signed by it is required (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert, cert.key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=client_ca)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx
