"""
The chat room: who is connected, and fan-out of one message to all of them.

Data flows one way: a protocol hands a received message to the server's bus
(:mod:`wschat.bus`), the bus to :meth:`Room.broadcast` (of this daemon, or of every daemon on
the Redis channel), which frames it once per format its members receive (plain, JSON) and gives
the same frame to every member of that format through :meth:`Member.deliver`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Literal, Protocol

from autobahn.websocket.protocol import PreparedMessage
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from wschat.fastwrite import FastTransport, SharedFrames, Turns
from wschat.metrics import Metrics
from wschat.wire import (
    Format,
    Message,
    jsonMessage,
    jsonPresence,
    jsonPresenceSummary,
    relayPayload,
)

Prepare = Callable[[bytes, bool], PreparedMessage]

#: Presence events sent one by one (``join``, ``leave``) within :data:`PRESENCE_WINDOW`
#: seconds; past them, the rest of the window is summed up in one ``presence`` object. A room
#: where people come and go a few times a second sees every event; a reconnect storm costs each
#: JSON client at most this many frames and one summary a second.
PRESENCE_EVENTS = 10
PRESENCE_WINDOW = 1.0


class Member(Protocol):
    """What the room needs of a connection."""

    def deliver(self, frame: PreparedMessage) -> None:
        """
        Send one already-framed message; never raise for a peer that is closing.
        """


class Room:
    """
    The set of open connections and the fan-out to them.

    @param prepare: frames a payload once, for every member (the WebSocket factory's
        ``prepareMessage``).
    @param fmt: how a relayed message is built from what its sender sent, for members that
        did not ask for JSON.
    @param metrics: counts broadcasts and deliveries (a private one when not given).
    @param now: the time JSON objects are stamped with, in seconds since the epoch.
    @param clock: times the presence window; without one every event is sent on its own.
    """

    def __init__(
        self,
        prepare: Prepare,
        fmt: Format = Format.PREFIXED,
        *,
        metrics: Metrics | None = None,
        now: Callable[[], float] = time.time,
        clock: IReactorTime | None = None,
    ) -> None:
        self._prepare = prepare
        self._clock = clock
        # The presence window: when it ends, events sent in it, and those summed up.
        self._windowEnd = -1.0
        self._events = 0
        self._joined = self._left = 0
        self._summary: IDelayedCall | None = None
        self.format = fmt
        self.metrics = metrics if metrics is not None else Metrics()
        self._now = now
        # Members grouped by the format they receive, so that a broadcast frames each format
        # once. Dicts keep join order, so deliveries go out in a stable order.
        self._groups: dict[Format, dict[Member, None]] = {}
        #: The reactor's turns as the connections' writers see them; with it, members on
        #: plain TCP without compression get a busy turn's frames as one shared buffer.
        self.turns: Turns | None = None
        # Per format: the members written through a FastTransport (their frames shared in a
        # busy turn), and the others (TLS, compression, other transports), delivered to
        # one by one.
        self._shared: dict[Format, SharedFrames] = {}
        self._single: dict[Format, dict[Member, None]] = {}

    def __len__(self) -> int:
        return sum(len(group) for group in self._groups.values())

    def __iter__(self) -> Iterator[Member]:
        return iter(tuple(chain.from_iterable(self._groups.values())))

    def __contains__(self, member: object) -> bool:
        return any(member in group for group in self._groups.values())

    def join(
        self, member: Member, fmt: Format | None = None, writer: FastTransport | None = None
    ) -> None:
        """
        Add ``member``, which receives ``fmt`` (the room's format unless given). ``writer``:
        its transport, when the frames' bytes may be written to it as they are (plain TCP,
        no compression), so that it can share a busy turn's frames with others.
        """
        fmt = fmt if fmt is not None else self.format
        self._groups.setdefault(fmt, {})[member] = None
        if writer is not None and self.turns is not None and hasattr(member, "takesShared"):
            shared = self._shared.get(fmt)
            if shared is None:
                shared = self._shared[fmt] = SharedFrames(self.turns)
            shared.join(member, writer)  # type: ignore[arg-type]
        else:
            self._single.setdefault(fmt, {})[member] = None

    def leave(self, member: Member) -> bool:
        """Remove ``member``; true if it was in the room."""
        for fmt, group in self._groups.items():
            if member in group:
                del group[member]
                if not group:
                    del self._groups[fmt]
                shared = self._shared.get(fmt)
                if shared is None or not shared.leave(member):  # type: ignore[arg-type]
                    self._single.get(fmt, {}).pop(member, None)
                return True
        return False

    def broadcast(self, message: Message, when: float | None = None) -> None:
        """
        Relay ``message`` to every member, its sender included; JSON members see it stamped
        with ``when`` (now, unless given).
        """
        frames = size = 0
        # Snapshots: a delivery may make a member leave (a slow reader dropped).
        for fmt, group in tuple(self._groups.items()):
            if fmt is Format.JSON:
                stamp = self._now() if when is None else when
                payload, isBinary = jsonMessage(message, stamp), False
            else:
                payload, isBinary = relayPayload(fmt, message), message.isBinary
            frame = self._prepare(payload, isBinary)
            count = len(group)
            shared = self._shared.get(fmt)
            if shared is not None and shared.members and shared.turns.busy:
                # A busy turn: kept once for every member that shares, sent at its end.
                shared.add(frame, frame.payloadHybi)
                members = tuple(self._single.get(fmt, ()))
            else:
                members = tuple(group)
            for member in members:
                member.deliver(frame)
            frames += count
            size += count * len(payload)
        self.metrics.messageBroadcast(frames, size)

    def announce(
        self, kind: Literal["join", "leave"], who: str, exclude: Member | None = None
    ) -> None:
        """
        Tell the JSON members (all but ``exclude``) that ``who`` joined or left.
        """
        group = self._groups.get(Format.JSON)
        if not group:
            return
        clock = self._clock
        if clock is not None:
            now = clock.seconds()
            if now >= self._windowEnd and self._summary is None:
                self._windowEnd = now + PRESENCE_WINDOW
                self._events = 0
            if self._events >= PRESENCE_EVENTS:
                if kind == "join":
                    self._joined += 1
                else:
                    self._left += 1
                if self._summary is None:
                    self._summary = clock.callLater(self._windowEnd - now, self._sumUp)
                return
            self._events += 1
        payload = jsonPresence(kind, who, len(self), self._now())
        self._sendPresence(payload, exclude)

    def _sumUp(self) -> None:
        """The window is over: one ``presence`` object for the events it held back."""
        self._summary = None
        joined, left, self._joined, self._left = self._joined, self._left, 0, 0
        if self._groups.get(Format.JSON):
            self._sendPresence(jsonPresenceSummary(joined, left, len(self), self._now()))

    def _sendPresence(self, payload: bytes, exclude: Member | None = None) -> None:
        group = self._groups.get(Format.JSON)
        if not group:
            return
        frame = self._prepare(payload, False)
        members = [member for member in group if member is not exclude]
        for member in members:
            member.deliver(frame)
        self.metrics.delivered(len(members), len(members) * len(payload))
