"""writer.Writer: transport.write, with the first transport type's write called
directly (poise.proxy.http.writer)."""

from __future__ import annotations

from poise.proxy.http.writer import Writer


class Sink:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.got.append(data)


class OtherSink(Sink):
    def write(self, data: bytes) -> None:
        self.got.append(b"other:" + data)


class Patched(Sink):
    """An instance whose ``write`` was replaced: its own must be called."""

    def __init__(self) -> None:
        super().__init__()
        self.write = lambda data: self.got.append(b"patched:" + data)


def test_every_transport_gets_its_own_write() -> None:
    writer = Writer()
    a, b, other = Sink(), Sink(), OtherSink()
    for data in (b"1", b"2"):
        writer.write(a, data)
        writer.write(other, data)
        writer.write(b, data)
    assert a.got == [b"1", b"2"] and b.got == [b"1", b"2"]
    assert other.got == [b"other:1", b"other:2"]


def test_an_instance_with_its_own_write_is_not_bypassed() -> None:
    writer = Writer()
    patched = Patched()
    writer.write(patched, b"x")
    plain = Sink()
    writer.write(plain, b"y")
    writer.write(patched, b"z")
    assert patched.got == [b"patched:x", b"patched:z"] and plain.got == [b"y"]
