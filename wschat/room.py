"""
The chat room: who is connected, and fan-out of one message to all of them.

Data flows one way: a protocol hands a received message to :meth:`Room.broadcast`, which
frames it once and gives the same frame to every member through :meth:`Member.deliver`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from autobahn.websocket.protocol import PreparedMessage

from wschat.wire import Format, Message, relayPayload

Prepare = Callable[[bytes, bool], PreparedMessage]


class Member(Protocol):
    """What the room needs of a connection."""

    def deliver(self, frame: PreparedMessage) -> None:
        """
        Send one already-framed message; never raise for a peer that is closing.
        """


class Room:
    """
    The set of open connections and the fan-out to them.

    @param prepare: frames a payload once, for every member (the factory's
        ``prepareMessage``).
    @param fmt: how a relayed message is built from what its sender sent.
    """

    def __init__(self, prepare: Prepare, fmt: Format = Format.PREFIXED) -> None:
        self._prepare = prepare
        self.format = fmt
        # A dict keeps join order, so deliveries go out in a stable order.
        self._members: dict[Member, None] = {}

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[Member]:
        return iter(tuple(self._members))

    def join(self, member: Member) -> None:
        self._members[member] = None

    def leave(self, member: Member) -> None:
        self._members.pop(member, None)

    def broadcast(self, message: Message) -> None:
        """
        Relay ``message`` to every member, its sender included.
        """
        frame = self._prepare(relayPayload(self.format, message), message.isBinary)
        # A snapshot: a delivery may make a member leave (a slow reader dropped).
        for member in tuple(self._members):
            member.deliver(frame)
