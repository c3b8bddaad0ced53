"""Each client's fair share of the room's inbound work, against the real daemon over loopback."""

from __future__ import annotations

import struct

import pytest_twisted
from rawws import RawClient, frame, handshake, rawConnect
from test_hostile_loopback import spyOnOpens

from wschat.bench.frames import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, parseFrames
from wschat.bench.frames import OP_CONTINUATION as OP_CONT
from wschat.testing import closeAll, connect


def closeCode(received: bytes) -> int | None:
    """The code of the close frame the daemon sent, if any (after the handshake response)."""
    _, _, rest = received.partition(b"\r\n\r\n")
    for opcode, payload in parseFrames(rest):
        if opcode == OP_CLOSE:
            return int(struct.unpack("!H", payload[:2])[0])
    return None


def pongs(received: bytes) -> int:
    """How many pongs the daemon sent."""
    _, _, rest = received.partition(b"\r\n\r\n")
    return sum(op == OP_PONG for op, _ in parseFrames(rest))


def answered(received: bytes) -> bool:
    """The daemon answered our last ping, or closed: either way it has read that far."""
    _, sep, rest = received.partition(b"\r\n\r\n")
    return bool(sep) and any(op in (OP_PONG, OP_CLOSE) for op, _ in parseFrames(rest))


@pytest_twisted.ensureDeferred
async def test_flooder_read_slowly_others_get_through(daemon):
    """
    A client sending as fast as it can is read at its share (default options): a message
    another client sends meanwhile overtakes most of the flood; the flooder is not closed and
    all it sent is relayed, in order.
    """
    service, url = daemon("--format", "raw", "--welcome", "", "--no-message-log")
    flooder, other, reader = await connect(url), await connect(url), await connect(url)
    flood = [b"flood %d" % i for i in range(1500)]
    for payload in flood:
        flooder.sendMessage(payload)
    # The room has started relaying the flood: now someone else speaks.
    first = (await reader.messages.get())[0]
    assert first == flood[0]
    other.sendMessage(b"ordinary")
    seen = [first]
    while b"ordinary" not in seen:
        seen.append((await reader.messages.get())[0])
    # 1500 frames at once is three times the default burst (500 frames): a daemon that reads
    # all it can relays them all before the other client's message.
    assert len(seen) - 1 < 1000, len(seen)
    while len(seen) < len(flood) + 1:
        seen.append((await reader.messages.get())[0])
    assert [p for p in seen if p != b"ordinary"] == flood
    assert flooder.localCloseCode is None and flooder.remoteCloseCode is None
    await closeAll([flooder, other, reader])


@pytest_twisted.ensureDeferred
async def test_ping_flood_counts_in_the_share(daemon):
    """Pings count in a client's share: a ping flood is read slowly, others overtake it."""
    service, url = daemon("--format", "raw", "--welcome", "", "--no-message-log")
    other, reader = await connect(url), await connect(url)
    pinger = await rawConnect(url, RawClient(handshake()))
    await pinger.until(lambda r: b"\r\n\r\n" in r)
    pinger.transport.write(  # type: ignore[union-attr]
        frame(OP_PING) * 1500 + frame(OP_TEXT, b"after the pings")
    )
    await pinger.until(lambda r: pongs(r) > 0)
    other.sendMessage(b"ordinary")
    assert (await reader.messages.get())[0] == b"ordinary"
    assert (await reader.messages.get())[0] == b"after the pings"
    received = await pinger.until(lambda r: pongs(r) == 1500)
    assert closeCode(received) is None
    pinger.transport.abortConnection()  # type: ignore[union-attr]
    await pinger.lost
    await closeAll([other, reader])


@pytest_twisted.ensureDeferred
async def test_sustained_flood_closed_1008(daemon):
    """A client that stays over its share past --inbound-hold is closed with 1008."""
    service, url = daemon(
        "--welcome", "", "--no-message-log", "--inbound-rate", "50", "--inbound-hold", "0.5"
    )
    flooder = await connect(url)
    for i in range(200):
        flooder.sendMessage(b"%d" % i)
    code, reason = await flooder.closed
    assert (code, reason) == (1008, "sending too fast: over its inbound share for 0.5 s")


@pytest_twisted.ensureDeferred
async def test_endless_empty_fragments_1008(daemon):
    """A message of endless empty fragments is refused (1008) once past a few."""
    service, url = daemon("--welcome", "")
    attack = frame(OP_TEXT, b"x", fin=False) + frame(OP_CONT, fin=False) * 1000 + frame(OP_PING)
    client = await rawConnect(url, RawClient(handshake() + attack))
    received = await client.until(answered)
    assert closeCode(received) == 1008
    await client.lost


@pytest_twisted.ensureDeferred
async def test_message_of_too_many_frames_1009(daemon):
    """A message in more frames than --max-message-frames is refused (1009)."""
    service, url = daemon("--welcome", "", "--max-message-frames", "100")
    attack = frame(OP_TEXT, b"x", fin=False) + frame(OP_CONT, b"y", fin=False) * 200
    client = await rawConnect(url, RawClient(handshake() + attack + frame(OP_PING)))
    received = await client.until(answered)
    assert closeCode(received) == 1009
    await client.lost


@pytest_twisted.ensureDeferred
async def test_one_byte_fragments_default_cap_1009(daemon):
    """By default a message may come in 1024 frames: 60,000 one-byte fragments are refused."""
    # Read at any rate, so that the cap, not the share, is what this test waits for.
    service, url = daemon("--welcome", "", "--no-message-log", "--inbound-rate", "0")
    attack = (
        frame(OP_TEXT, b"x", fin=False)
        + frame(OP_CONT, b"y", fin=False) * 59998
        + frame(OP_CONT, b"z")
        + frame(OP_PING)
    )
    client = await rawConnect(url, RawClient(handshake() + attack))
    received = await client.until(answered)
    assert closeCode(received) == 1009
    await client.lost


@pytest_twisted.ensureDeferred
async def test_fragmented_message_within_caps_relayed(daemon):
    """A message in many non-empty fragments, under the cap, is relayed whole."""
    service, url = daemon("--format", "raw", "--welcome", "", "--inbound-rate", "0")
    reader = await connect(url)
    message = frame(OP_TEXT, b"a", fin=False) + frame(OP_CONT, b"b", fin=False) * 500
    message += frame(OP_CONT) + frame(OP_PING)
    client = await rawConnect(url, RawClient(handshake() + message))
    received = await client.until(answered)
    assert closeCode(received) is None
    assert (await reader.messages.get())[0] == b"a" + b"b" * 500
    client.transport.abortConnection()  # type: ignore[union-attr]
    await client.lost
    await closeAll([reader])


@pytest_twisted.ensureDeferred
async def test_never_reading_pinger_dropped_once(daemon, logged):
    """A client that pings and never reads is dropped once: one log line, one drop counted."""
    service, url = daemon(
        "--welcome", "", "--max-queue", "16K", "--inbound-rate", "0", "--inbound-bytes", "0"
    )
    service.factory.setProtocolOptions(closeHandshakeTimeout=0.5)
    opened = spyOnOpens(service)
    # 32 MB of pings: past any kernel buffer, so that its pongs pile up in the daemon, and
    # more pings keep coming after the daemon has given up on it.
    pinger = await rawConnect(url, RawClient(handshake(), read=False))
    slow = await opened.get()
    pinger.transport.write(frame(OP_PING, b"p" * 125) * 250_000)  # type: ignore[union-attr]
    await slow.left
    assert slow.localCloseCode == 1008
    assert service.metrics.registry.get_sample_value("wschat_clients_dropped_total") == 1
    assert sum("bytes waiting to be sent" in line for line in logged) == 1, logged
    pinger.transport.abortConnection()  # type: ignore[union-attr]
    await pinger.lost
