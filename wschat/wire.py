"""
What goes on the wire: how a sender is named and how a relayed message is framed.

Formats (chosen per daemon with ``--format``):

``prefixed`` (default)
    Clients send UTF-8 text messages. Every message is relayed to every open connection,
    the sender included, as the text ``<sender>: <text>``, where ``<sender>`` is the
    address the server sees: ``127.0.0.1:54321`` for IPv4, ``[::1]:54321`` for IPv6,
    ``unix`` for a UNIX-socket peer. Binary messages are refused with close code 1003.

``raw``
    Every message, text or binary, is relayed unchanged: a pure mirror.

``json`` (per connection, never a daemon's ``--format``)
    A client that offers the WebSocket subprotocol ``wschat.json`` receives JSON objects
    (messages, its welcome, join and leave events) whatever the daemon's format, and may send
    commands (:func:`parseCommand`); see docs/protocol.md, section 4.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress


class Format(Enum):
    """How the daemon relays a message."""

    PREFIXED = "prefixed"
    RAW = "raw"
    #: What a connection that negotiated :data:`JSON_SUBPROTOCOL` receives.
    JSON = "json"


#: The WebSocket subprotocol a client offers to receive JSON objects instead of plain frames.
JSON_SUBPROTOCOL = "wschat.json"


@dataclass(frozen=True, slots=True)
class Message:
    """One message as a client sent it, and who sent it."""

    sender: str
    payload: bytes
    isBinary: bool = False
    #: The id its sender chose for it (a JSON ``send`` command), for exactly-once sending.
    id: str | None = None


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 line``, ``2 lines``: ``count`` and the noun in agreement with it."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


def hostPort(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets: ``[::1]:2000``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def formatAddress(address: IAddress) -> str:
    """
    Name a peer the way the prefix shows it: ``ip:port``, ``[ipv6]:port`` or ``unix``.
    """
    if isinstance(address, IPv4Address | IPv6Address):
        return hostPort(address.host, address.port)
    return "unix"


def relayPayload(fmt: Format, message: Message) -> bytes:
    """
    The payload every client receives for ``message``.
    """
    if fmt is Format.PREFIXED:
        return message.sender.encode("utf-8") + b": " + message.payload
    return message.payload


def isoTime(when: float) -> str:
    """
    ``when`` (seconds since the epoch) as ISO 8601 UTC with milliseconds:
    ``2024-05-01T12:00:00.000Z``.
    """
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    return stamp.removesuffix("+00:00") + "Z"


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def jsonMessage(
    message: Message, when: float, epoch: str | None = None, seq: int | None = None
) -> bytes:
    """
    ``message`` as a JSON client receives it: ``{"type": "message", "from", "text", "time"}``;
    a binary message (``raw`` format only) carries ``data`` (base64) instead of ``text``.
    With history on it carries its position (``epoch``, ``seq``), and ``id`` when its sender
    gave one.
    """
    obj: dict[str, Any] = {"type": "message", "from": message.sender}
    if message.isBinary:
        obj["data"] = base64.b64encode(message.payload).decode("ascii")
    else:
        obj["text"] = message.payload.decode("utf-8")
    obj["time"] = isoTime(when)
    if epoch is not None:
        obj["epoch"] = epoch
        obj["seq"] = seq
    if message.id is not None:
        obj["id"] = message.id
    return _json(obj)


def jsonWelcome(
    you: str,
    online: int,
    text: str,
    when: float,
    *,
    maxMessageSize: int | None = None,
    roomFormat: Format | None = None,
    epoch: str | None = None,
    seq: int = 0,
    recovered: bool | None = None,
) -> bytes:
    """
    The first object a JSON client receives: its own address, how many are online, the
    greeting, the largest message it may send, the room's format (how a plain client sees each
    message); with history on, the room's position when the welcome was sent (``epoch``,
    ``seq``), and, when it asked to recover, whether it did.
    """
    obj: dict[str, Any] = {
        "type": "welcome",
        "you": you,
        "online": online,
        "text": text,
        "time": isoTime(when),
    }
    if maxMessageSize is not None:
        obj["maxMessageSize"] = maxMessageSize
    if roomFormat is not None:
        obj["format"] = roomFormat.value
    if epoch is not None:
        obj["epoch"] = epoch
        obj["seq"] = seq
    if recovered is not None:
        obj["recovered"] = recovered
    return _json(obj)


def jsonDuplicate(mid: str, epoch: str, seq: int) -> bytes:
    """
    To the sender alone: a message with id ``mid`` was already relayed, at ``epoch``/``seq``.
    """
    return _json({"type": "duplicate", "id": mid, "epoch": epoch, "seq": seq})


def jsonPresence(kind: Literal["join", "leave"], who: str, online: int, when: float) -> bytes:
    """
    Someone else joined or left; ``online`` counts the connections after the change.
    """
    return _json({"type": kind, "who": who, "online": online, "time": isoTime(when)})


def jsonPresenceSummary(joined: int, left: int, online: int, when: float) -> bytes:
    """
    Many joined and left at once: how many of each since the last presence event, and how
    many are online now. Sent instead of one ``join`` or ``leave`` each when they come fast.
    """
    return _json(
        {
            "type": "presence",
            "joined": joined,
            "left": left,
            "online": online,
            "time": isoTime(when),
        }
    )


def jsonNotice(text: str, when: float) -> bytes:
    """
    The server tells this client alone something, e.g. that its message was not relayed.
    """
    return _json({"type": "notice", "text": text, "time": isoTime(when)})


@dataclass(frozen=True, slots=True)
class SendCommand:
    """A JSON client's ``{"type": "send", "text": ..., "id": ...}``."""

    text: str
    id: str | None = None


class BadCommand(ValueError):
    """A JSON command the daemon cannot carry out; the text says why."""


#: A message id: 1 to 64 printable ASCII characters.
MESSAGE_ID = re.compile(r"[\x20-\x7e]{1,64}")


def parseCommand(payload: bytes) -> SendCommand | None:
    """
    The command in a JSON client's text message, or None if it is not one (then the text is
    relayed as it is): a command is a JSON object with a ``"type"`` key.

    @raise BadCommand: for an unknown type, a ``send`` without a string ``text``, or a bad
        ``id``.
    """
    if payload.lstrip()[:1] != b"{":
        return None
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(obj, dict) or "type" not in obj:
        return None
    kind = obj["type"]
    if kind != "send":
        shown = kind if isinstance(kind, str) and len(kind) <= 32 else "?"
        raise BadCommand(f'unknown command type "{shown}": nothing relayed')
    text = obj.get("text")
    if not isinstance(text, str):
        raise BadCommand('a "send" command needs a string "text": nothing relayed')
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadCommand(
            '"text" is not valid Unicode (a lone surrogate): nothing relayed'
        ) from None
    mid = obj.get("id")
    if mid is not None and not (isinstance(mid, str) and MESSAGE_ID.fullmatch(mid)):
        raise BadCommand('"id" must be 1 to 64 printable ASCII characters: nothing relayed')
    return SendCommand(text, mid)
