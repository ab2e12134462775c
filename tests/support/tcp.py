"""Support of the tcp-listener tests: threaded in-process TCP/TLS backends, clients over
raw (and TLS) sockets, seeded payloads, TLS contexts (certificates: see
:mod:`tests.support.certs`) and metrics.

A :class:`TcpBackend` listens on loopback and runs a *handler* per accepted connection
in a thread of its own.  Handlers here: :func:`echo` (passing the client's FIN on) and
:func:`hello` (server speaks first: its name and a newline, then echo); tests write
their own for half-close, reset and back-pressure behaviours.  The backend counts the
connections it accepted, knows which are open, and records what each received
(``record=True``), after a leading PROXY header parsed with
:func:`poise.proxy.proxy_protocol.parse` when ``proxy_header=True``.

poise's start-up check (:class:`tests.support.procs.Poise` connects once and closes)
is relayed like any connection on a plain tcp listener: :func:`settle_probe` waits
for it and forgets it.

Every socket has a timeout, so that a proxy that hangs fails a test instead of
blocking it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from poise.config.tls import Certificate
from poise.proxy.proxy_protocol import ProxyHeader, ProxyProtocolError
from poise.proxy.proxy_protocol import parse as parse_proxy_header
from tests.support.certs import openssl
from tests.support.waiting import wait_for

LOOPBACK = "127.0.0.1"
TIMEOUT = 20.0
CHUNK = 1 << 20


# -- backends -----------------------------------------------------------------------------

class Conn:
    """One connection accepted by a :class:`TcpBackend`, as its handler sees it."""

    def __init__(self, backend: TcpBackend, sock: socket.socket, peer: tuple, index: int) -> None:
        self.backend = backend
        self.sock: socket.socket = sock
        self.peer = peer                    # (ip, port) of poise's side
        self.index = index
        self.header: ProxyHeader | None = None
        self.received = bytearray()         # (with ``record``) every payload byte
        self.count = 0                      # payload bytes received
        self.sent = 0
        self.eof = threading.Event()        # the other side's FIN (or reset) was read
        self.reset = False                  # ... and it was a reset
        self.closed = threading.Event()     # the handler is done and the socket closed
        self.release = threading.Event()    # for handlers that wait to be told
        self.error: BaseException | None = None
        self.peer_cert: dict | None = None  # the client certificate (mutual TLS)
        self._pending = b""                 # read together with the PROXY header

    def recv(self, size: int = CHUNK) -> bytes:
        """Up to ``size`` bytes; b"" at EOF (a reset counts as EOF)."""
        if self._pending:
            data, self._pending = self._pending[:size], self._pending[size:]
        else:
            try:
                data = self.sock.recv(size)
            except ConnectionResetError:
                self.reset = True
                data = b""
            except ssl.SSLEOFError:         # (a TCP FIN without TLS close_notify)
                data = b""
        if not data:
            self.eof.set()
            return b""
        self.count += len(data)
        if self.backend.record:
            self.received += data
        return data

    def recv_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = self.recv(n - len(out))
            if not data:
                raise EOFError(f"EOF after {len(out)} of {n} bytes")
            out += data
        return bytes(out)

    def recv_line(self) -> bytes:
        out = bytearray()
        while not out.endswith(b"\n"):
            data = self.recv(1)
            if not data:
                raise EOFError(f"EOF in a line: {bytes(out)!r}")
            out += data
        return bytes(out)

    def drain(self) -> int:
        """Read until EOF; the bytes read."""
        n = 0
        while data := self.recv():
            n += len(data)
        return n

    def sendall(self, data) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def shutdown_write(self) -> None:
        """Half-close (FIN); a TLS connection cannot, and is left as it is."""
        if not isinstance(self.sock, ssl.SSLSocket):
            self.sock.shutdown(socket.SHUT_WR)

    def _read_proxy_header(self) -> None:
        got = b""
        while True:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError(f"EOF in the PROXY header: {got!r}")
            got += data
            header, used = parse_proxy_header(got)
            if header is not None:
                self.header = header
                self._pending = got[used:]
                return

    def __repr__(self) -> str:
        return f"<Conn {self.backend.name}#{self.index} from {self.peer} got {self.count}B>"


Handler = Callable[[Conn], None]


def echo(conn: Conn) -> None:
    """Send back whatever arrives; pass the client's FIN on; then close."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    record = conn.backend.record
    while True:
        if conn._pending or record or isinstance(conn.sock, ssl.SSLSocket):
            data = conn.recv()
            if not data:
                break
            conn.sendall(data)
            continue
        try:
            n = conn.sock.recv_into(buf)
        except ConnectionResetError:
            conn.reset = True
            n = 0
        if not n:
            conn.eof.set()
            break
        conn.count += n
        conn.sendall(view[:n])
    conn.shutdown_write()


def hello(conn: Conn) -> None:
    """Speak first: the backend's name and a newline; then echo."""
    conn.sendall(f"{conn.backend.name}\n".encode())
    echo(conn)


class TcpBackend:
    """A loopback TCP server running ``handler`` per connection, in threads.

    ``tls``: a server SSLContext (the handshake is done after any PROXY header).
    ``proxy_header``: every connection starts with one (parsed into ``Conn.header``).
    """

    def __init__(self, name: str = "t1", handler: Handler = echo, *,
                 tls: ssl.SSLContext | None = None, proxy_header: bool = False,
                 record: bool = True, port: int = 0) -> None:
        self.name = name
        self.handler = handler
        self.tls = tls
        self.proxy_header = proxy_header
        self.record = record
        self.connections: list[Conn] = []
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOOPBACK, port))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.address = f"{LOOPBACK}:{self.port}"
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name=f"tcp-{name}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return
            sock.settimeout(TIMEOUT)
            with self.lock:
                conn = Conn(self, sock, peer, len(self.connections))
                self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Conn) -> None:
        try:
            if self.proxy_header:
                conn._read_proxy_header()
            if self.tls is not None:
                conn.sock = self.tls.wrap_socket(conn.sock, server_side=True)
                conn.peer_cert = conn.sock.getpeercert() or None
            self.handler(conn)
        except (OSError, EOFError, ProxyProtocolError) as e:
            conn.error = e
        finally:
            conn.eof.set()
            with contextlib.suppress(OSError):
                conn.sock.close()
            conn.closed.set()

    # -- what it saw ------------------------------------------------------------------------

    @property
    def accepted(self) -> int:
        """Connections accepted since the start (or :meth:`reset`)."""
        with self.lock:
            return len(self.connections)

    def open(self) -> list[Conn]:
        """Connections whose handler still runs."""
        with self.lock:
            return [c for c in self.connections if not c.closed.is_set()]

    def wait_accepted(self, n: int, timeout: float = 5.0) -> list[Conn]:
        wait_for(lambda: self.accepted >= n, timeout,
                 lambda: f"{n} connection(s) at {self.name} (now {self.accepted})")
        with self.lock:
            return list(self.connections)

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Until no connection is open."""
        wait_for(lambda: not self.open(), timeout,
                 lambda: f"no connection open at {self.name} (now {self.open()})")

    def reset(self) -> None:
        """Forget the connections seen so far (open ones run on)."""
        with self.lock:
            self.connections = []

    # -- control ----------------------------------------------------------------------------

    def close_all(self) -> None:
        """Close every open connection from this side (FIN to poise)."""
        for conn in self.open():
            conn.release.set()
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def stop_listening(self) -> None:
        """Close the listening socket: new connects are refused; open ones go on."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(5)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.stop_listening()
        self.close_all()

    def __repr__(self) -> str:
        return f"<TcpBackend {self.name} {self.address}>"


@contextlib.contextmanager
def backends(*names: str, **options) -> Iterator[list[TcpBackend]]:
    """``TcpBackend(name, **options)`` for each name, stopped on exit."""
    started = [TcpBackend(n, **options) for n in names]
    try:
        yield started
    finally:
        for b in started:
            b.stop()


# -- clients ------------------------------------------------------------------------------

def connect(addr: tuple[str, int], source: str | None = None,
            timeout: float = TIMEOUT) -> socket.socket:
    """A TCP connection to ``addr``, from ``source`` (an IP of 127/8) if given."""
    sock = socket.socket()
    sock.settimeout(timeout)
    if source is not None:
        sock.bind((source, 0))
    sock.connect(addr)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(min(n - len(out), CHUNK))
        if not data:
            raise EOFError(f"EOF after {len(out)} of {n} bytes: {bytes(out[:200])!r}")
        out += data
    return bytes(out)


def recv_line(sock: socket.socket) -> bytes:
    """One line (through its newline), read a byte at a time (nothing after it is taken)."""
    out = bytearray()
    while not out.endswith(b"\n"):
        data = sock.recv(1)
        if not data:
            raise EOFError(f"EOF in a line: {bytes(out)!r}")
        out += data
    return bytes(out)


def greeting(addr: tuple[str, int], source: str | None = None) -> str:
    """The name a :func:`hello` backend sends on a new connection through ``addr``."""
    with connect(addr, source) as s:
        return recv_line(s).decode().strip()


def read_to_close(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Everything until the peer closes (EOF or reset); AssertionError if it does not
    within ``timeout``."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"still open after {timeout}s; got {bytes(data[:200])!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(CHUNK)
        except TimeoutError:
            continue
        except (ConnectionResetError, ssl.SSLEOFError):
            return bytes(data)
        except ssl.SSLError as e:
            if "UNEXPECTED_EOF" in str(e) or "EOF" in str(e):
                return bytes(data)
            raise
        if not chunk:
            return bytes(data)
        data += chunk


def closed_within(sock: socket.socket, timeout: float) -> float:
    """Until the peer closes ``sock`` without sending a byte; the seconds it took
    (AssertionError if it sends bytes or stays open)."""
    start = time.monotonic()
    data = read_to_close(sock, timeout)
    assert data == b"", f"got {data[:200]!r} before the close"
    return time.monotonic() - start


def still_open(sock: socket.socket, wait: float) -> bool:
    """True when nothing arrives and the peer does not close within ``wait`` seconds
    (a plain socket; bytes arriving are an AssertionError)."""
    sock.settimeout(wait)
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    except OSError:
        return False
    assert not data, f"unexpected bytes {data!r}"
    return False


def round_trip(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` and read as many bytes back (through an echo backend)."""
    sock.sendall(data)
    return recv_exactly(sock, len(data))


def tls_client(ca: Path | None = None, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context trusting ``ca`` (names checked unless told otherwise), or
    verifying nothing without ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.check_hostname = check_hostname
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_connect(addr: tuple[str, int], ctx: ssl.SSLContext, server_hostname: str | None,
                source: str | None = None) -> ssl.SSLSocket:
    return ctx.wrap_socket(connect(addr, source), server_hostname=server_hostname)


def peer_names(tls: ssl.SSLSocket) -> list[str]:
    """The DNS names of the certificate the other side presented."""
    return [v for k, v in tls.getpeercert().get("subjectAltName", ()) if k == "DNS"]


class BioTls:
    """A TLS client over a plain socket, driven through memory BIOs so that the test
    decides how its ClientHello is cut: sent ``piece`` bytes at a time, ``pause``
    seconds apart (TCP_NODELAY: one segment each)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str,
                 piece: int, pause: float = 0.003) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.do_handshake()
        hello = self._out.read()
        for i in range(0, len(hello), piece):
            sock.sendall(hello[i:i + piece])
            time.sleep(pause)
        self._call(self.obj.do_handshake)

    def _call(self, fn, *args):
        while True:
            try:
                result = fn(*args)
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("closed during TLS") from None
                self._in.write(data)
                continue
            self._flush()
            return result

    def _flush(self) -> None:
        if data := self._out.read():
            self.sock.sendall(data)

    def sendall(self, data: bytes) -> None:
        self._call(self.obj.write, data)

    def recv(self, size: int) -> bytes:
        return self._call(self.obj.read, size)

    def getpeercert(self) -> dict:
        return self.obj.getpeercert()


# -- payloads ----------------------------------------------------------------------------

_POOL = 16 << 20


@functools.lru_cache(maxsize=4)
def _pool(seed: int) -> bytes:
    return random.Random(seed).randbytes(_POOL)


class Payload:
    """``size`` seeded pseudo-random bytes, produced in chunks of random lengths (up to
    ``max_chunk``), each a window at a random offset of a 16 MiB pool of random bytes:
    cheap at gigabytes, and a byte lost, doubled or moved changes the digest."""

    def __init__(self, size: int, seed: int = 0, max_chunk: int = CHUNK) -> None:
        self.size = size
        self.seed = seed
        self.max_chunk = max_chunk

    def chunks(self) -> Iterator[memoryview]:
        rng = random.Random(self.seed * 7919 + self.size)
        pool = memoryview(_pool(self.seed))
        left = self.size
        while left:
            n = min(left, rng.randint(1, self.max_chunk))
            at = rng.randrange(_POOL - n + 1)
            yield pool[at:at + n]
            left -= n

    def bytes(self) -> bytes:
        return b"".join(self.chunks())

    @functools.cached_property
    def digest(self) -> str:
        h = hashlib.sha256()
        for chunk in self.chunks():
            h.update(chunk)
        return h.hexdigest()


class _Reader(threading.Thread):
    """Reads a socket to EOF in the background: the sha256 and count of what came."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.count = 0
        self.sha = hashlib.sha256()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            while n := self.sock.recv_into(buf):
                self.count += n
                self.sha.update(view[:n])
        except BaseException as e:      # reported by result()
            self.error = e

    def result(self, timeout: float) -> tuple[int, str]:
        self.join(timeout)
        assert not self.is_alive(), f"no EOF within {timeout}s after {self.count} bytes"
        if self.error is not None:
            raise self.error
        return self.count, self.sha.hexdigest()


def exchange(sock: socket.socket, payload: Payload, timeout: float = 120.0) -> tuple[int, str]:
    """Send ``payload`` then a FIN on ``sock`` while reading what comes back until EOF,
    both at once; ``(bytes received, their sha256)``."""
    reader = _Reader(sock)
    for chunk in payload.chunks():
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    return reader.result(timeout)


def pump(conn: Conn, payload: Payload) -> None:
    """Send ``payload`` on a backend connection (a handler's helper)."""
    for chunk in payload.chunks():
        conn.sendall(chunk)


# -- certificates --------------------------------------------------------------------------

def self_signed(root: Path, stem: str, name: str) -> Certificate:
    """A self-signed certificate for DNS ``name`` (no CA vouches for it)."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", f"{stem}.key", "-out", f"{stem}.pem", "-days", "2",
            "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}", cwd=root)
    return Certificate(cert=str(root / f"{stem}.pem"), key=str(root / f"{stem}.key"))


def server_context(cert: Certificate, client_ca: Path | None = None) -> ssl.SSLContext:
    """A TLS server context serving ``cert``; requiring a client certificate signed by
    ``client_ca`` if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert, cert.key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def listener_tls(*certs: Certificate) -> dict:
    """A listener's ``tls:`` block serving ``certs`` (the first is the default)."""
    return {"certificates": [{"cert": c.cert, "key": c.key} for c in certs]}


# -- metrics ------------------------------------------------------------------------------

def scrape(px) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` from poise's ``GET /metrics``."""
    r = px.admin.get("/metrics")
    assert r.status == 200, r
    out = {}
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(px, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(v for (n, lbl), v in scrape(px).items()
               if n == name and all(dict(lbl).get(k) == x for k, x in labels.items()))


def rejected(px, reason: str, listener: str = "web") -> float:
    return metric(px, "poise_connections_rejected_total", listener=listener, reason=reason)


def wait_metric(px, name: str, value: float, timeout: float = 5.0, **labels: str) -> None:
    """Until :func:`metric` equals ``value`` (workers report about every second)."""
    wait_for(lambda: metric(px, name, **labels) == value, timeout,
             lambda: f"{name}{labels} == {value} (now {metric(px, name, **labels)})",
             step=0.1)


def connect_errors(px, address: str, cluster: str = "app") -> float:
    """Failed connects to backend ``address`` (poise_upstream_connect_errors_total)."""
    return metric(px, "poise_upstream_connect_errors_total", cluster=cluster, backend=address)


def backend_states(px, cluster: str = "app") -> dict[str, str]:
    """``{address: state}`` of ``cluster``'s backends from the admin API."""
    r = px.admin.get(f"/clusters/{cluster}")
    assert r.status == 200, r
    return {b["address"]: b["state"] for b in r.json()["backends"]}


def wait_state(px, address: str, state: str, cluster: str = "app",
               timeout: float = 5.0) -> None:
    wait_for(lambda: backend_states(px, cluster).get(address) == state, timeout,
             lambda: f"{address} {state} (now {backend_states(px, cluster)})", step=0.05)


# -- configs ------------------------------------------------------------------------------

def tcp(**fields) -> dict:
    """Listener fields of a ``protocol: tcp`` listener."""
    return {"protocol": "tcp", **fields}


def settle_probe(px, *bs: TcpBackend, timeout: float = 5.0) -> None:
    """Wait until the connection poise's start-up check opened (and closed at once)
    has reached one of ``bs`` and is closed there, then forget it, so that a test
    counts its own connections only."""
    wait_for(lambda: sum(b.accepted for b in bs) >= 1 and not any(b.open() for b in bs),
             timeout, "the start-up probe relayed and closed")
    for b in bs:
        b.reset()
