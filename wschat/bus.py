"""
How a message travels from the client that sent it to the room(s) that relay it.

A protocol hands every message it accepts to the server's ``bus.publish(message, origin)``:

:class:`LocalBus` (the default)
    Gives it straight to this daemon's room: one daemon, one room, as without a bus. The
    room numbers the messages itself (its history's counter); a message whose client-chosen
    id the room's history still holds is not relayed again: its sender is told
    (``origin.duplicate``).

:class:`wschat.redisbus.RedisBus` (``--redis``)
    Publishes it once to a Redis pub/sub channel shared by several daemons, and gives every
    message it receives on that channel to this daemon's room; a message it cannot relay gets
    its sender a notice through ``origin.refused(reason)``.

Positions (history on): a bus either lets the room number messages (``room.broadcast(message,
when)``, as :class:`LocalBus` does) or assigns each message's position itself and hands it in
(``room.broadcast(message, when, position)``), so that every daemon of a room gives the same
message the same position; such a bus may also keep the room's history where every daemon
reads it (``backfill``), for clients recovering through a daemon whose window lacks it.
Exactly-once sending is the bus's job too: before relaying a
message with an ``id``, it checks that id against the window (atomically with assigning the
position, for a shared bus) and calls ``origin.duplicate(id, position)`` instead of relaying.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from wschat.history import Position
from wschat.room import Room
from wschat.wire import Message


class Origin(Protocol):
    """Who sent a message: told when the bus could not relay it."""

    def refused(self, reason: str) -> None:
        """
        Tell the sender its message was not (or may not have been) relayed, and why.
        """

    def duplicate(self, mid: str, position: Position) -> None:
        """
        Tell the sender its message with id ``mid`` was already relayed, at ``position``,
        and so was not relayed again.
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

    def backfill(self, since: Position) -> Deferred[None] | None:
        """
        For a client recovering after ``since`` that the room's history cannot serve:
        bring in what a shared store still holds (messages older than the window, or ones
        this daemon has not received yet). None when there is nothing to wait for; else
        fires (never fails) once the history holds what could be brought in.
        """


class LocalBus:
    """The room of this daemon alone: a message goes straight to it."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.published = 0
        self.refused = 0

    def publish(self, message: Message, origin: Origin) -> None:
        self.published += 1
        history = self.room.history
        if message.id is not None and history is not None:
            original = history.byId(message.id)
            if original is not None:
                origin.duplicate(message.id, Position(history.epoch, original.seq))
                return
        self.room.broadcast(message)

    def backfill(self, since: Position) -> None:
        # The room's history is all there is.
        return None
