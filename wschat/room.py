"""
The chat room: who is connected, and fan-out of one message to all of them.

Data flows one way: a protocol hands a received message to the server's bus
(:mod:`wschat.bus`), the bus to :meth:`Room.broadcast` (of this daemon, or of every daemon on
the Redis channel), which frames it once per format its members receive (plain, JSON) and gives
the same frame to every member of that format through :meth:`Member.deliver`.

With history on (:mod:`wschat.history`) every relayed message gets a position:
``Room.broadcast(message, when=None, position=None)`` takes the next one from the room's own
:class:`~wschat.history.History` (a counter, with :class:`~wschat.bus.LocalBus`) unless the bus
hands one in (a bus that numbers messages itself, such as Redis), and appends the message to
the history before delivering it. A member that asked for history joins as a *replaying*
member: it holds only a cursor (the next seq to send), is sent the window's messages while its
transport takes them (:meth:`Room.catchUp`, again each time the transport drains), and joins
the live stream in the same call in which its cursor passes the head: broadcasts only ever
append to the history and deliver to live members, so no message falls between the replay and
the live stream or comes twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Literal, Protocol

from autobahn.websocket.protocol import PreparedMessage
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from wschat.fastwrite import FastTransport, SharedFrames, Turns
from wschat.history import Entry, History, Position
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


class Replayer(Member, Protocol):
    """What the room needs of a member that catches up on history before going live."""

    def writable(self) -> bool:
        """Whether the member's transport takes more now (open, and not paused)."""

    def deliverNow(self, frame: PreparedMessage) -> None:
        """
        Hand one frame straight to the transport, whose flow control then pauses at once.
        """

    def fellBehind(self) -> None:
        """
        The window dropped the next message this member was to be sent: it must be told
        (closed), since continuing would leave a hole.
        """


class _Replay:
    """A replaying member's state: its format and the next position to send."""

    __slots__ = ("fmt", "epoch", "next", "writer")

    def __init__(self, fmt: Format, epoch: str, start: int, writer: FastTransport | None) -> None:
        self.fmt = fmt
        self.epoch = epoch
        self.next = start
        #: Its transport, if it can share a busy turn's frames once live.
        self.writer = writer


def _nobody() -> int:
    return 0


def _payload(
    fmt: Format, message: Message, when: float, epoch: str | None, seq: int | None
) -> tuple[bytes, bool]:
    """``message`` as members of ``fmt`` receive it (JSON: stamped ``when``, at ``epoch``/``seq``
    with history on), and whether it goes as a binary message."""
    if fmt is Format.JSON:
        return jsonMessage(message, when, epoch, seq), False
    return relayPayload(fmt, message), message.isBinary


class Room:
    """
    The set of open connections and the fan-out to them.

    @param prepare: frames a payload once, for every member (the WebSocket factory's
        ``prepareMessage``).
    @param fmt: how a relayed message is built from what its sender sent, for members that
        did not ask for JSON.
    @param metrics: counts broadcasts and deliveries (a private one when not given).
    @param now: the time JSON objects are stamped with, in seconds since the epoch.
    @param history: the window of recent messages and their positions (None: history off,
        messages carry no position).
    @param clock: times the presence window; without one every event is sent on its own.
    """

    def __init__(
        self,
        prepare: Prepare,
        fmt: Format = Format.PREFIXED,
        *,
        metrics: Metrics | None = None,
        now: Callable[[], float] = time.time,
        history: History | None = None,
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
        self.history = history
        # Members still being sent history, not yet in a group.
        self._replaying: dict[Member, _Replay] = {}
        #: How many connections the room's other daemons have (a shared bus counts them).
        self.elsewhere: Callable[[], int] = _nobody
        #: Told of every join and leave of this daemon's connections (a shared bus tells
        #: the other daemons).
        self.presenceWatcher: Callable[[Literal["join", "leave"], str], None] | None = None

    def __len__(self) -> int:
        return sum(len(group) for group in self._groups.values()) + len(self._replaying)

    def __iter__(self) -> Iterator[Member]:
        return iter(tuple(chain(chain.from_iterable(self._groups.values()), self._replaying)))

    def __contains__(self, member: object) -> bool:
        return member in self._replaying or any(member in g for g in self._groups.values())

    def online(self) -> int:
        """The connections of the room: this daemon's, and those of its other daemons."""
        return len(self) + self.elsewhere()

    def join(
        self,
        member: Member,
        fmt: Format | None = None,
        start: int | None = None,
        writer: FastTransport | None = None,
    ) -> None:
        """
        Add ``member``, which receives ``fmt`` (the room's format unless given). ``writer``:
        its transport, when the frames' bytes may be written to it as they are (plain TCP,
        no compression), so that it can share a busy turn's frames with others; the member
        is then a :class:`~wschat.fastwrite.SharedMember`.

        With ``start`` (a seq of the history, see :meth:`History.start`) it first replays the
        history from there: the caller then calls :meth:`catchUp`, after anything the member
        must receive before the replay (its greeting).
        """
        fmt = fmt if fmt is not None else self.format
        history = self.history
        if start is not None and history is not None and start <= history.head:
            self._replaying[member] = _Replay(fmt, history.epoch, start, writer)
        else:
            self._live(member, fmt, writer)

    def _live(self, member: Member, fmt: Format, writer: FastTransport | None) -> None:
        """``member`` receives every broadcast from now on."""
        self._groups.setdefault(fmt, {})[member] = None
        if writer is not None and self.turns is not None:
            shared = self._shared.get(fmt)
            if shared is None:
                shared = self._shared[fmt] = SharedFrames(self.turns)
            shared.join(member, writer)  # type: ignore[arg-type]
        else:
            self._single.setdefault(fmt, {})[member] = None

    def replaying(self, member: Member) -> bool:
        """Whether ``member`` is still being sent history."""
        return member in self._replaying

    def catchUp(self, member: Replayer) -> None:
        """
        Send ``member`` the history from its cursor while its transport takes it; once the
        cursor passes the head, make it live (in this same call). Called again when its
        transport drains. If the window dropped the next message meanwhile, the member is
        told (:meth:`Replayer.fellBehind`) and removed.
        """
        replay = self._replaying.get(member)
        history = self.history
        if replay is None or history is None:
            return
        history.expire()
        if replay.epoch != history.epoch:
            # The history started afresh (a new epoch) under this replay.
            del self._replaying[member]
            member.fellBehind()
            return
        seq = replay.next
        frames = size = 0
        try:
            while seq <= history.head:
                if not member.writable():
                    return
                entry = history.entry(seq)
                if entry is None:
                    del self._replaying[member]
                    member.fellBehind()
                    return
                frame = self._replayFrame(history, entry, replay.fmt)
                member.deliverNow(frame)
                frames += 1
                size += len(frame.payloadHybi)
                seq += 1
            del self._replaying[member]
            self._live(member, replay.fmt, replay.writer)
        finally:
            replay.next = seq
            self.metrics.delivered(frames, size)

    def _replayFrame(self, history: History, entry: Entry, fmt: Format) -> PreparedMessage:
        """``entry`` framed for ``fmt``: the frame cached at broadcast, or a new one."""
        json = fmt is Format.JSON
        frame = entry.jsonFrame if json else entry.plainFrame
        if frame is None:
            payload, isBinary = _payload(fmt, entry.message, entry.when, history.epoch, entry.seq)
            frame = self._prepare(payload, isBinary)
            if json or fmt is self.format:
                history.cacheFrame(entry, frame, json, evict=False)
        return frame

    def leave(self, member: Member) -> bool:
        """Remove ``member``; true if it was in the room."""
        if self._replaying.pop(member, None) is not None:
            return True
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

    def broadcast(
        self, message: Message, when: float | None = None, position: Position | None = None
    ) -> None:
        """
        Relay ``message`` to every member, its sender included; JSON members see it stamped
        with ``when`` (now, unless given).

        With history on, the message is appended to the history first, at ``position``: the
        one the bus assigned, or (None) the next of the room's own numbering.
        """
        history = self.history
        stamp = self._now() if when is None else when
        entry = None
        epoch: str | None = None
        seq: int | None = None
        if history is not None:
            if position is None:
                entry = history.appendNext(message, stamp)
            else:
                entry = history.append(position, message, stamp)
            epoch, seq = history.epoch, entry.seq
        frames = size = 0
        # Snapshots: a delivery may make a member leave (a slow reader dropped).
        for fmt, group in tuple(self._groups.items()):
            payload, isBinary = _payload(fmt, message, stamp, epoch, seq)
            frame = self._prepare(payload, isBinary)
            if history is not None and entry is not None:
                # Replays reuse the frames: the JSON one, and the room's own plain format.
                if fmt is Format.JSON or fmt is self.format:
                    history.cacheFrame(entry, frame, fmt is Format.JSON, evict=True)
            count = self._deliver(fmt, group, frame)
            frames += count
            size += count * len(payload)
        self.metrics.messageBroadcast(frames, size)

    def _deliver(self, fmt: Format, group: dict[Member, None], frame: PreparedMessage) -> int:
        """
        Give ``frame`` to every member of ``group`` (those of ``fmt``); how many they are.
        In a busy turn it is kept once for all that share (sent at the turn's end), and
        handed to the others one by one.
        """
        count = len(group)
        shared = self._shared.get(fmt)
        if shared is not None and shared.members and shared.turns.busy:
            shared.add(frame, frame.payloadHybi)
            members = tuple(self._single.get(fmt, ()))
        else:
            # Snapshot: a delivery may make a member leave (a slow reader dropped).
            members = tuple(group)
        for member in members:
            member.deliver(frame)
        return count

    def announce(
        self,
        kind: Literal["join", "leave"],
        who: str,
        exclude: Member | None = None,
        *,
        remote: bool = False,
    ) -> None:
        """
        Tell the JSON members (all but ``exclude``) that ``who`` joined or left: one of this
        daemon's connections, or (``remote``) one of another daemon of the room.
        """
        if not remote and self.presenceWatcher is not None:
            self.presenceWatcher(kind, who)
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
        payload = jsonPresence(kind, who, self.online(), self._now())
        self._sendPresence(payload, exclude)

    def _sumUp(self) -> None:
        """The window is over: one ``presence`` object for the events it held back."""
        self._summary = None
        joined, left, self._joined, self._left = self._joined, self._left, 0, 0
        if self._groups.get(Format.JSON):
            self._sendPresence(jsonPresenceSummary(joined, left, self.online(), self._now()))

    def _sendPresence(self, payload: bytes, exclude: Member | None = None) -> None:
        group = self._groups.get(Format.JSON)
        if not group:
            return
        frame = self._prepare(payload, False)
        members = [member for member in group if member is not exclude]
        for member in members:
            member.deliver(frame)
        self.metrics.delivered(len(members), len(members) * len(payload))
