"""The one hand-written RFC 6455 framer (wschat.bench.frames) and the [host]:port formatter."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from wschat.bench import frames
from wschat.wire import formatAddress, hostPort

SIZES = [0, 125, 126, 65535, 65536]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mask", [None, frames.ZERO_MASK, b"\x37\xfa\x21\x3d"])
def test_frames_read_back_whatever_the_mask(size, mask):
    """A frame of any length, unmasked or masked with any key, parses back to its payload."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    data = frames.frame(frames.OP_BINARY, payload, mask=mask)
    assert bool(data[1] & 0x80) == (mask is not None)
    assert frames.parseFrames(data) == [(frames.OP_BINARY, payload)]


def test_masking_changes_the_bytes_on_the_wire():
    """A non-zero key masks the payload: its bytes do not appear in the frame as sent."""
    data = frames.frame(frames.OP_TEXT, b"hello", mask=b"\x01\x02\x03\x04")
    assert b"hello" not in data
    assert data == bytes([0x81, 0x85, 1, 2, 3, 4]) + bytes(
        b ^ k for b, k in zip(b"hello", b"\x01\x02\x03\x04\x01", strict=True)
    )


def test_fin_and_reserved_bits():
    """``fin=False`` clears the FIN bit and ``rsv`` sets the reserved bits, in the first byte."""
    assert frames.frame(frames.OP_CONTINUATION, b"", fin=False, rsv=0b100)[0] == 0x40
    assert frames.frame(frames.OP_TEXT, b"", rsv=0b111)[0] == 0xF1


def test_partial_frame_is_left_out():
    """Bytes of a frame not yet complete are not reported as a frame."""
    data = frames.serverFrame(b"one") + frames.serverFrame(b"two" * 100)
    assert frames.parseFrames(data[:-1]) == [(frames.OP_TEXT, b"one")]


@pytest.mark.parametrize("size", [0, 125, 126, 1000])
def test_stream_of_frames_split_at_every_byte(size):
    """Fed a byte at a time, Frames yields each frame once, when its last byte comes."""
    one, two = bytes(n % 251 for n in range(size)), b"two"
    data = frames.serverFrame(one, frames.OP_BINARY) + frames.serverFrame(two)
    stream = frames.Frames()
    seen = [(at, f) for at in range(len(data)) for f in stream.feed(data[at : at + 1])]
    cut = len(data) - len(frames.serverFrame(two))
    assert seen == [(cut - 1, (frames.OP_BINARY, one)), (len(data) - 1, (frames.OP_TEXT, two))]


def test_opening_handshake_with_extra_headers():
    """The opening handshake carries the Host given, the fixed key and any extra lines."""
    request = frames.openingHandshake("example.com", "/room", ["Origin: https://x"])
    assert request == (
        b"GET /room HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nOrigin: https://x\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("127.0.0.1", 2000, "127.0.0.1:2000"),
        ("::1", 2000, "[::1]:2000"),
        ("localhost", 80, "localhost:80"),
    ],
)
def test_host_port(host, port, expected):
    """IPv6 addresses are bracketed; IPv4 addresses and names are not."""
    assert hostPort(host, port) == expected


def test_format_address_uses_the_same_form():
    """A peer's address is named as hostPort names it; a UNIX socket is ``unix``."""
    assert formatAddress(IPv6Address("TCP", "::1", 5)) == hostPort("::1", 5)
    assert formatAddress(IPv4Address("TCP", "10.0.0.1", 5)) == "10.0.0.1:5"
    assert formatAddress(UNIXAddress(b"/tmp/s")) == "unix"
