"""
The C load generator (benchmarks/loadgen.c) against a real daemon over loopback, and against a
small relay in this file that loses, reorders or repeats one message, so its checks can fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, utils
from twisted.internet.interfaces import IListeningPort

from wschat.bench.frames import (
    OP_CLOSE,
    OP_TEXT,
    SENDER_DIGITS,
    SEQ_DIGITS,
    Frames,
    serverFrame,
)

SOURCE = Path(__file__).resolve().parent.parent / "benchmarks" / "loadgen.c"


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> str:
    """loadgen.c built as compare.py builds it; a warning fails the build."""
    gcc = shutil.which("gcc")
    assert gcc is not None, "gcc is needed to build benchmarks/loadgen.c"
    binary = str(tmp_path_factory.mktemp("loadgen") / "loadgen")
    done = subprocess.run(
        [gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", binary, str(SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return binary


async def run(binary: str, *args: str, status: int = 0) -> dict[str, Any]:
    """Run loadgen with ``args``; its JSON result, after checking its exit status."""
    out, err, code = await utils.getProcessOutputAndValue(
        binary, list(args), env=dict(os.environ), path="/"
    )
    assert code == status, err.decode()
    assert b"loadgen: window-start\nloadgen: window-end\n" in err
    result: dict[str, Any] = json.loads(out)
    return result


#: A short closed-loop run: 20 clients, 2 senders with 2 messages in flight each, one second.
SHORT = (
    "--clients", "20", "--senders", "2", "--inflight", "2", "--duration", "1",
    "--warmup", "0.2", "--drain", "5",
)  # fmt: skip


def assertClean(result: dict[str, Any], clients: int, verified: int | None = None) -> None:
    """Every client connected and received every message once, in order."""
    assert result["connected"] == clients
    assert result["verified_clients"] == (clients if verified is None else verified)
    assert result["deliveries_per_s"] > 0 and result["sent_total"] > 0
    counts = (result["lost"], result["reordered"], result["duplicated"], result["foreign"])
    assert counts == (0, 0, 0, 0)
    assert result["min_received"] == result["max_received"] == result["sent_total"]
    assert result["drained"] is True and result["dropped"] == 0


@pytest_twisted.ensureDeferred
async def test_throughput_against_raw_daemon(daemon, loadgen):
    """Through the raw daemon every client receives every message of every sender, in order."""
    service, url = daemon("--format", "raw", "--welcome", "", "--no-message-log")
    result = await run(loadgen, "throughput", "--url", f"wschat={url}/", *SHORT)
    assertClean(result, 20)
    assert result["server"] == "wschat" and result["mode"] == "throughput"
    assert result["latency_ms"]["samples"] > 0
    assert 0 < result["bench_cpu"] < 1


@pytest_twisted.ensureDeferred
async def test_throughput_against_prefixed_daemon(daemon, loadgen):
    """With a greeting and prefixed messages, the marker is found after the prefix."""
    service, url = daemon("--no-message-log")
    result = await run(loadgen, "throughput", "--url", url, *SHORT, "--verify", "3")
    assertClean(result, 20, verified=5)
    # The senders and three others check order; the rest count.
    assert result["verified_clients"] == 2 + 3


@pytest_twisted.ensureDeferred
async def test_idle_holds_every_connection(daemon, loadgen):
    """Idle mode opens every connection, holds it, and reports handshakes/s."""
    service, url = daemon("--welcome", "", "--no-message-log")
    result = await run(
        loadgen, "idle", "--url", url, "--clients", "30", "--concurrency", "7", "--duration", "0.3"
    )
    assert (result["connected"], result["held"], result["dropped"]) == (30, 30, 0)
    assert result["handshakes_per_s"] > 0
    assert result["warnings"] == []


GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Relay(protocol.Protocol):
    """
    A hand-written relay-to-all server that misbehaves on purpose, once: ``drop`` loses the
    fourth message (sequence 3) of the first sender, ``swap`` relays it after the fifth,
    ``repeat`` relays it twice; ``big`` sends a 70 000-byte greeting (a 64-bit length) and
    relays each message inside a 300-byte one (a 16-bit length) written in two parts;
    ``accept`` answers the handshake with a wrong Sec-WebSocket-Accept.
    """

    factory: RelayFactory

    def connectionMade(self) -> None:
        self.head = b""
        self.open = False
        self.frames = Frames()

    def dataReceived(self, data: bytes) -> None:
        if not self.open:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            if self.factory.mode == "accept":
                key += b"x"
            answer = base64.b64encode(hashlib.sha1(key + GUID).digest())
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + answer + b"\r\n\r\n"
            )
            self.open = True
            self.factory.members.append(self)
            if self.factory.mode == "big":
                self.transport.write(serverFrame(b"g" * 70000))
        for opcode, body in self.frames.feed(data):
            if opcode == OP_TEXT:
                self.factory.relay(body)
            elif opcode == OP_CLOSE:
                self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        if self in self.factory.members:
            self.factory.members.remove(self)


class RelayFactory(protocol.Factory):
    protocol = Relay

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.members: list[Relay] = []
        self.held: bytes | None = None
        self.firstSender: int | None = None
        self.parts: list[bytes] = []

    def relay(self, body: bytes) -> None:
        sender = int(body[9 : 9 + SENDER_DIGITS])
        seq = int(body[9 + SENDER_DIGITS : 9 + SENDER_DIGITS + SEQ_DIGITS])
        if self.firstSender is None:
            self.firstSender = sender
        chosen = sender == self.firstSender
        if self.mode == "drop" and chosen and seq == 3:
            return
        if self.mode == "swap" and chosen and seq == 3:
            self.held = body
            return
        self.broadcast(body)
        if self.mode == "swap" and chosen and seq == 4 and self.held is not None:
            self.broadcast(self.held)
        if self.mode == "repeat" and chosen and seq == 3:
            self.broadcast(body)

    def broadcast(self, body: bytes) -> None:
        frame = serverFrame(body)
        if self.mode == "big":
            # Each frame in two parts, one part per reactor turn, so reads split frames.
            frame = serverFrame(b"p" * (300 - len(body)) + body)
            if not self.parts:
                reactor.callLater(0, self.writePart)  # type: ignore[attr-defined]
            self.parts += [frame[:150], frame[150:]]
            return
        for member in self.members:
            member.transport.write(frame)

    def writePart(self) -> None:
        part = self.parts.pop(0)
        for member in self.members:
            member.transport.write(part)
        if self.parts:
            reactor.callLater(0, self.writePart)  # type: ignore[attr-defined]


@pytest_twisted.async_yield_fixture
async def relay():
    """Start a :class:`RelayFactory` with ``relay(mode)``, which returns its URL."""
    started: list[tuple[RelayFactory, IListeningPort]] = []

    def start(mode: str) -> str:
        factory = RelayFactory(mode)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        started.append((factory, port))
        return f"ws://127.0.0.1:{port.getHost().port}/"

    yield start
    for factory, port in started:
        for member in list(factory.members):
            member.transport.abortConnection()
        await defer.maybeDeferred(port.stopListening)


#: Ten clients, 2 senders with 2 in flight, half a second; a short drain (loss never drains).
RELAY_RUN = (
    "--clients", "10", "--senders", "2", "--inflight", "2", "--duration", "0.5",
    "--warmup", "0.1", "--drain", "0.5",
)  # fmt: skip


@pytest.mark.parametrize(
    "mode, counts",
    [("drop", (10, 0, 0)), ("swap", (0, 10, 0)), ("repeat", (0, 10, 10))],
)
@pytest_twisted.ensureDeferred
async def test_detects_loss_reordering_and_duplicates(loadgen, relay, mode, counts):
    """One message lost, late or repeated is counted once by each of the ten clients."""
    result = await run(loadgen, "throughput", "--url", relay(mode), *RELAY_RUN)
    assert result["connected"] == 10
    assert (result["lost"], result["reordered"], result["duplicated"]) == counts
    assert any("lost" in w for w in result["warnings"])


@pytest_twisted.ensureDeferred
async def test_long_and_split_frames(loadgen, relay):
    """A 64-bit-length greeting and 16-bit-length messages split across writes are read."""
    result = await run(loadgen, "throughput", "--url", relay("big"), *RELAY_RUN)
    assertClean(result, 10)


@pytest_twisted.ensureDeferred
async def test_wrong_accept_fails_the_handshake(loadgen, relay):
    """A 101 answer whose Sec-WebSocket-Accept is not the key's is a failed connection."""
    out, err, code = await utils.getProcessOutputAndValue(
        loadgen,
        ["idle", "--url", relay("accept"), "--clients", "3"],
        env=dict(os.environ),
        path="/",
    )
    result = json.loads(out)
    assert code == 1
    assert (result["connected"], result["failed"]) == (0, 3)
    assert result["connect_errors"][0] == "wrong Sec-WebSocket-Accept"
