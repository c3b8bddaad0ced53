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
    (messages, its welcome, join and leave events) whatever the daemon's format; see
    :func:`jsonMessage` and the README's "JSON subprotocol" section.
"""

from __future__ import annotations

import base64
import json
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


def jsonMessage(message: Message, when: float) -> bytes:
    """
    ``message`` as a JSON client receives it: ``{"type": "message", "from", "text", "time"}``;
    a binary message (``raw`` format only) carries ``data`` (base64) instead of ``text``.
    """
    obj: dict[str, Any] = {"type": "message", "from": message.sender}
    if message.isBinary:
        obj["data"] = base64.b64encode(message.payload).decode("ascii")
    else:
        obj["text"] = message.payload.decode("utf-8")
    obj["time"] = isoTime(when)
    return _json(obj)


def jsonWelcome(you: str, online: int, text: str, when: float) -> bytes:
    """
    The first object a JSON client receives: its own address, how many are online, the greeting.
    """
    return _json(
        {"type": "welcome", "you": you, "online": online, "text": text, "time": isoTime(when)}
    )


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
