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
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress


class Format(Enum):
    """How the daemon relays a message."""

    PREFIXED = "prefixed"
    RAW = "raw"


@dataclass(frozen=True, slots=True)
class Message:
    """One message as a client sent it, and who sent it."""

    sender: str
    payload: bytes
    isBinary: bool = False


def formatAddress(address: IAddress) -> str:
    """
    Name a peer the way the prefix shows it: ``ip:port``, ``[ipv6]:port`` or ``unix``.
    """
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    return "unix"


def relayPayload(fmt: Format, message: Message) -> bytes:
    """
    The payload every client receives for ``message``.
    """
    if fmt is Format.PREFIXED:
        return message.sender.encode("utf-8") + b": " + message.payload
    return message.payload
