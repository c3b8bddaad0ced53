"""
How a message travels from the client that sent it to the room(s) that relay it.

A protocol hands every message it accepts to the server's ``bus.publish(message, origin)``:

:class:`LocalBus` (the default)
    Gives it straight to this daemon's room: one daemon, one room, as without a bus.

:class:`wschat.redisbus.RedisBus` (``--redis``)
    Publishes it once to a Redis pub/sub channel shared by several daemons, and gives every
    message it receives on that channel to this daemon's room; a message it cannot relay gets
    its sender a notice through ``origin.refused(reason)``.
"""

from __future__ import annotations

from typing import Protocol

from wschat.room import Room
from wschat.wire import Message


class Origin(Protocol):
    """Who sent a message: told when the bus could not relay it."""

    def refused(self, reason: str) -> None:
        """
        Tell the sender its message was not (or may not have been) relayed, and why.
        """


class Bus(Protocol):
    """What a protocol hands its messages to."""

    #: Messages accepted from this daemon's clients.
    published: int
    #: Messages refused (their sender told so) instead of relayed.
    refused: int

    def publish(self, message: Message, origin: Origin) -> None:
        """
        Relay ``message`` to the room; tell ``origin`` if that cannot be done.
        """


class LocalBus:
    """The room of this daemon alone: a message goes straight to it."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.published = 0
        self.refused = 0

    def publish(self, message: Message, origin: Origin) -> None:
        self.published += 1
        self.room.broadcast(message)
