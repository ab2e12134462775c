"""Per-request Python CPU cost of sans-IO HTTP/2 server codecs, driven in memory.

Groundwork for issue 14 (HTTP/2 downstream and to backends, for gRPC).  For each
codec that is installed, one server-side connection receives N GET requests (each a
HEADERS frame with END_STREAM on a new stream, ~9 typical header fields) and answers
each with HEADERS (:status 200, content-type, content-length) plus one 64-byte DATA
frame with END_STREAM; the outgoing bytes are collected.  Streams run one after the
other (one in flight), so max_concurrent_streams is never a concern.  The client
bytes are made once, up front, with ``h2`` itself; they are not part of the timing.

    python bench/h2_codecs.py [N] [--runs R] [--no-validate]

Prints CPU microseconds per request (median of R runs, default 5).  Codecs measured
when importable: ``h2`` (hyper-h2, pure Python: hpack + hyperframe) and ``jh2`` (the
niquests fork of h2 with a Rust HPACK/buffer extension).  A codec that is not
installed is reported and skipped; without ``h2`` (needed for the client side) the
script says so and exits 0.  Install them in a throwaway venv, not poise's:

    python3 -m venv /tmp/h2venv && /tmp/h2venv/bin/pip install h2 jh2
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from typing import Any

BODY = b"x" * 64
REQUEST_HEADERS = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"api.example.com"),
    (b":path", b"/v1/items/42?fields=name,price"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) bench/1.0"),
    (b"accept", b"application/json"),
    (b"accept-encoding", b"gzip, deflate, br"),
    (b"accept-language", b"en-US,en;q=0.9"),
    (b"x-request-id", b"0f8e2c3a-5b7d-4e61-9a2b-c4d5e6f70812"),
]
RESPONSE_HEADERS = [
    (b":status", b"200"),
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
]


def load(name: str) -> dict[str, Any] | None:
    """The codec's modules (h2-style API), or None when it is not installed."""
    try:
        mod = importlib.import_module(name)
        return {
            "version": getattr(mod, "__version__", "?"),
            "config": importlib.import_module(name + ".config"),
            "connection": importlib.import_module(name + ".connection"),
            "events": importlib.import_module(name + ".events"),
        }
    except ImportError:
        return None


def client_bytes(h2: dict[str, Any], n: int) -> tuple[bytes, list[bytes]]:
    """Preface + SETTINGS + a big connection WINDOW_UPDATE, then one chunk per request."""
    cfg = h2["config"].H2Configuration(client_side=True, header_encoding=None)
    conn = h2["connection"].H2Connection(config=cfg)
    conn.initiate_connection()
    # Let the server send N * 64 body bytes without waiting for WINDOW_UPDATEs.
    conn.increment_flow_control_window(2**31 - 1 - 65535)
    preface = conn.data_to_send()
    chunks = []
    for _ in range(n):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, REQUEST_HEADERS, end_stream=True)
        chunks.append(conn.data_to_send())
        # Keep the client's stream table small: forget the stream as if answered.
        conn.streams.pop(sid, None)
    return preface, chunks


NO_VALIDATION = {
    "validate_inbound_headers": False,
    "validate_outbound_headers": False,
    "normalize_inbound_headers": False,
    "normalize_outbound_headers": False,
}


def new_server(codec: dict[str, Any], preface: bytes, options: dict[str, bool]) -> Any:
    cfg = codec["config"].H2Configuration(client_side=False, header_encoding=None, **options)
    conn = codec["connection"].H2Connection(config=cfg)
    conn.initiate_connection()
    conn.receive_data(preface)
    conn.data_to_send()
    return conn


def run_once(
    codec: dict[str, Any], preface: bytes, chunks: list[bytes], options: dict[str, bool]
) -> tuple[float, list[bytes]]:
    """One connection, len(chunks) exchanges; returns (CPU seconds, output chunks)."""
    conn = new_server(codec, preface, options)
    request_received = codec["events"].RequestReceived
    receive = conn.receive_data
    send_headers = conn.send_headers
    send_data = conn.send_data
    data_to_send = conn.data_to_send
    out: list[bytes] = []
    append = out.append
    t0 = time.process_time()
    for chunk in chunks:
        for ev in receive(chunk):
            if isinstance(ev, request_received):
                sid = ev.stream_id
                send_headers(sid, RESPONSE_HEADERS)
                send_data(sid, BODY, end_stream=True)
        append(data_to_send())
    return time.process_time() - t0, out


def verify(h2: dict[str, Any], preface: bytes, chunks: list[bytes], out: list[bytes]) -> None:
    """Replay the exchange with an h2 client: every stream must get 200 + 64 bytes."""
    cfg = h2["config"].H2Configuration(client_side=True, header_encoding=None)
    cli = h2["connection"].H2Connection(config=cfg)
    cli.initiate_connection()
    cli.increment_flow_control_window(2**31 - 1 - 65535)
    ev_mod = h2["events"]
    responses = bodies = ended = 0
    for resp in out:
        sid = cli.get_next_available_stream_id()
        cli.send_headers(sid, REQUEST_HEADERS, end_stream=True)
        cli.data_to_send()
        for ev in cli.receive_data(resp):
            if isinstance(ev, ev_mod.ResponseReceived):
                responses += dict(ev.headers)[b":status"] == b"200"
            elif isinstance(ev, ev_mod.DataReceived):
                bodies += ev.data == BODY
                cli.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, ev_mod.StreamEnded):
                ended += 1
        cli.data_to_send()
    n = len(chunks)
    if not responses == bodies == ended == n:
        raise SystemExit(f"verification failed: {responses=} {bodies=} {ended=} {n=}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", nargs="?", type=int, default=20_000, help="requests per run")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-validate", action="store_true",
                    help="also measure with header validation/normalisation off (a lower bound)")
    args = ap.parse_args()

    h2 = load("h2")
    if h2 is None:
        print("h2 is not installed: it is needed to make the client bytes; nothing measured.")
        print("  python3 -m venv /tmp/h2venv && /tmp/h2venv/bin/pip install h2 jh2")
        return 0
    preface, chunks = client_bytes(h2, args.n)
    req_bytes = sum(map(len, chunks)) / len(chunks)
    print(f"python {sys.version.split()[0]}, N={args.n} streams/connection, "
          f"{args.runs} runs, request ~{req_bytes:.0f} wire bytes (HPACK-indexed after the first)")
    print(f"{'codec':<10} {'version':<9} {'median us/req':>14} {'min':>8} {'max':>8} {'resp B/req':>11}")
    variants = [("", {})] + ([("-noval", NO_VALIDATION)] if args.no_validate else [])
    for name in ("h2", "jh2"):
        codec = load(name)
        if codec is None:
            print(f"{name:<10} not installed: skipped (pip install {name})")
            continue
        for suffix, options in variants:
            times = []
            out: list[bytes] = []
            for _ in range(args.runs):
                secs, out = run_once(codec, preface, chunks, options)
                times.append(secs * 1e6 / args.n)
            verify(h2, preface, chunks, out)
            resp_bytes = sum(map(len, out)) / len(out)
            print(f"{name + suffix:<10} {codec['version']:<9} {statistics.median(times):>14.2f} "
                  f"{min(times):>8.2f} {max(times):>8.2f} {resp_bytes:>11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
