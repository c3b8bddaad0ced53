"""
The envelopes daemons exchange over the Redis bus, and their codec.

A message envelope (version 1) is a MessagePack array, chosen over JSON for being ten times
faster to build and read here, half the overhead, and binary-safe without base64::

    [1, node, sender, isBinary, time, payload, id, epoch, seq]

``node`` (str) names the daemon that received the message from its client, ``sender`` (str) is
that client's address as the prefix shows it, ``isBinary`` (bool) the WebSocket opcode, ``time``
(float, seconds since the epoch) when the origin daemon received it and ``payload`` (bin) the
message as sent. ``id`` (str, or nil when a position follows) is the id its sender gave the
message (a JSON ``send`` command), so that its relayed copies carry it on every daemon; with
history on, Redis adds the message's position (``epoch``, str; ``seq``, int). The envelope
stops after the last element it has: ``payload`` for a message without id or position.
Readers of version 1 ignore any further elements, so fields can be added without a new
version; anything else (not MessagePack, another version, wrong types, a text payload that is
not UTF-8) is refused with :class:`MalformedEnvelope`.

A presence envelope tells the other daemons of the room about one daemon's connections::

    ["presence", node, version, count, [[kind, who, countAfter], ...]]

``count`` is how many connections ``node`` has now (0: it is leaving the room), ``version``
grows with each report of that node (the highest wins), and each event says who joined or left
(``kind`` is ``"join"`` or ``"leave"``) and the node's count just after. Its first element is
not a version number, so a reader that knows only message envelopes skips it as malformed
instead of relaying it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgpack

# An epoch and a message id are checked as the query (since=) and a JSON send command are.
from wschat.history import EPOCH, Position
from wschat.wire import MESSAGE_ID, Message

ENVELOPE_VERSION = 1
#: The first element of a presence envelope.
PRESENCE = "presence"


@dataclass(frozen=True, slots=True)
class Envelope:
    """
    A message as it travels between daemons: what was sent, where and when it came in, and
    (history on) the position Redis gave it.
    """

    message: Message
    node: str
    time: float
    position: Position | None = None


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """Someone joined or left one daemon; ``count``: that daemon's connections just after."""

    kind: Literal["join", "leave"]
    who: str
    count: int


@dataclass(frozen=True, slots=True)
class PresenceEnvelope:
    """One daemon's connections: how many now, and who joined or left since its last report."""

    node: str
    version: int
    count: int
    events: tuple[PresenceEvent, ...] = ()


class MalformedEnvelope(ValueError):
    """What came in on the channel is not an envelope this daemon can relay."""


def _head(message: Message, node: str, time: float, length: int) -> bytes:
    """The array header for ``length`` elements and the first six (seven: and the id)."""
    packer = msgpack.Packer()
    fields = [
        packer.pack_array_header(length),
        packer.pack(ENVELOPE_VERSION),
        packer.pack(node),
        packer.pack(message.sender),
        packer.pack(message.isBinary),
        packer.pack(time),
        packer.pack(message.payload),
    ]
    if length > 6:
        fields.append(packer.pack(message.id))
    return b"".join(fields)


def encodeEnvelope(envelope: Envelope) -> bytes:
    message = envelope.message
    position = envelope.position
    if position is None:
        return _head(message, envelope.node, envelope.time, 6 if message.id is None else 7)
    data: bytes = (
        _head(message, envelope.node, envelope.time, 9)
        + msgpack.packb([position.epoch, position.seq])[1:]
    )
    return data


def envelopeHead(message: Message, node: str, time: float) -> bytes:
    """
    A message envelope without its position, for Redis to complete: the envelope is
    ``head + pack(epoch) + pack(seq)`` (what the Redis script builds).
    """
    return _head(message, node, time, 9)


def encodePresence(presence: PresenceEnvelope) -> bytes:
    data: bytes = msgpack.packb(
        [
            PRESENCE,
            presence.node,
            presence.version,
            presence.count,
            [[e.kind, e.who, e.count] for e in presence.events],
        ]
    )
    return data


def decodeEnvelope(data: bytes) -> Envelope | PresenceEnvelope:
    """
    Read an envelope; raise :class:`MalformedEnvelope` for anything that is not one.
    """
    if not isinstance(data, bytes):
        raise MalformedEnvelope(f"not bytes but {type(data).__name__}")
    try:
        fields = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise MalformedEnvelope(f"not MessagePack: {e}") from None
    if not isinstance(fields, list) or not fields:
        raise MalformedEnvelope("not a MessagePack array")
    if fields[0] == PRESENCE:
        return _decodePresence(fields)
    if fields[0] != ENVELOPE_VERSION or type(fields[0]) is not int:
        raise MalformedEnvelope(f"unknown version {fields[0]!r}")
    if len(fields) < 6:
        raise MalformedEnvelope(f"{len(fields)} fields, version 1 has 6")
    _, node, sender, isBinary, time, payload = fields[:6]
    if not (
        isinstance(node, str)
        and isinstance(sender, str)
        and isinstance(isBinary, bool)
        and isinstance(time, int | float)
        and not isinstance(time, bool)
        and isinstance(payload, bytes)
    ):
        raise MalformedEnvelope("a field has the wrong type")
    if not isBinary:
        # A text frame that is not UTF-8 makes every client fail the connection (1007).
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedEnvelope("a text payload that is not UTF-8") from None
    mid, epoch, seq = (fields[6:9] + [None, None, None])[:3]
    position = None
    if epoch is not None or seq is not None:
        if not (
            isinstance(epoch, str) and EPOCH.fullmatch(epoch) and type(seq) is int and seq >= 1
        ):
            raise MalformedEnvelope("a malformed position")
        position = Position(epoch, seq)
    if mid is not None and not (isinstance(mid, str) and MESSAGE_ID.fullmatch(mid)):
        raise MalformedEnvelope("a malformed message id")
    return Envelope(Message(sender, payload, isBinary, mid), node, float(time), position)


def _decodePresence(fields: list[object]) -> PresenceEnvelope:
    if len(fields) < 5:
        raise MalformedEnvelope(f"{len(fields)} fields, a presence envelope has 5")
    _, node, version, count, events = fields[:5]
    if not (
        isinstance(node, str)
        and type(version) is int
        and type(count) is int
        and count >= 0
        and isinstance(events, list)
    ):
        raise MalformedEnvelope("a presence field has the wrong type")
    decoded = []
    for event in events:
        if not (isinstance(event, list) and len(event) >= 3):
            raise MalformedEnvelope("a malformed presence event")
        kind, who, after = event[:3]
        if kind not in ("join", "leave") or not isinstance(who, str) or type(after) is not int:
            raise MalformedEnvelope("a malformed presence event")
        decoded.append(PresenceEvent(kind, who, after))
    return PresenceEnvelope(node, version, count, tuple(decoded))
