"""
The room's recent history: every relayed message's position, and the window of recent
messages a reconnecting client recovers from (docs/protocol.md, "History and recovery").

A position is an ``epoch`` (16 lowercase hex characters naming one generation of the room's
history) and a ``seq`` (1 for the first message of an epoch, +1 per message). Who assigns it:

- with :class:`~wschat.bus.LocalBus` the room asks its history for the next one
  (:meth:`History.nextPosition`: this daemon's epoch, a counter);
- a bus that assigns positions itself (Redis) hands each message's position to
  ``Room.broadcast(message, when, position)``, which gives it to :meth:`History.append`.

The window keeps at most ``maxCount`` messages, none older than ``maxAge`` seconds (dropped at
the next append or read), and at most ``maxBytes`` bytes held for them (payloads plus the
frames cached for replay); the oldest go first. Per room the memory is therefore bounded by
``maxBytes`` plus a fixed overhead per message (a few hundred bytes) times ``maxCount``.

Within one epoch a window holds consecutive positions only: :meth:`History.append` of a
position that does not follow the head (another epoch, or a hole: a message this daemon never
saw) starts the window afresh at that position, since nothing before it can be vouched for.
"""

from __future__ import annotations

import re
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from wschat.wire import Message

if TYPE_CHECKING:
    from autobahn.websocket.protocol import PreparedMessage

#: Defaults of ``--history``, ``--history-ttl`` and ``--history-bytes``.
DEFAULT_COUNT = 1000
DEFAULT_AGE = 300.0
DEFAULT_BYTES = 16 << 20


def newEpoch() -> str:
    """A fresh epoch: 16 random lowercase hex characters."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a message stands in the room's history."""

    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.seq}"


class Entry:
    """
    One message of the window: the message, its position and time, and the frames the room
    built for it (cached so that a replay does not frame it again).
    """

    __slots__ = ("seq", "message", "when", "arrived", "size", "plainFrame", "jsonFrame")

    def __init__(self, seq: int, message: Message, when: float, arrived: float) -> None:
        self.seq = seq
        self.message = message
        #: The time JSON clients see (the sender's daemon's clock).
        self.when = when
        #: When this daemon appended it: what the age bound measures.
        self.arrived = arrived
        self.size = len(message.payload)
        self.plainFrame: PreparedMessage | None = None
        self.jsonFrame: PreparedMessage | None = None


def frameSize(frame: PreparedMessage) -> int:
    """The bytes a cached frame holds (its payload and the framed copy)."""
    # Autobahn keeps the payload too unless told the frame is never compressed.
    return len(getattr(frame, "payload", b"")) + len(frame.payloadHybi)


class History:
    """
    The window of recent messages of one room, and the positions of its messages.

    @param maxCount: at most this many messages (at least 1).
    @param maxAge: none older than this many seconds.
    @param maxBytes: at most this many bytes held for them.
    @param clock: the current time, in seconds (``reactor.seconds``).
    @param epoch: this history's epoch; a new random one unless given.
    """

    def __init__(
        self,
        maxCount: int = DEFAULT_COUNT,
        maxAge: float = DEFAULT_AGE,
        maxBytes: int = DEFAULT_BYTES,
        *,
        clock: Callable[[], float],
        epoch: str | None = None,
    ) -> None:
        if maxCount < 1:
            raise ValueError(f"maxCount must be at least 1, not {maxCount!r}")
        self.maxCount = maxCount
        self.maxAge = maxAge
        self.maxBytes = maxBytes
        self._clock = clock
        self.epoch = epoch if epoch is not None else newEpoch()
        #: The seq of the last message appended (0: none yet in this epoch).
        self.head = 0
        #: Bytes held for the messages of the window.
        self.bytes = 0
        self._entries: deque[Entry] = deque()
        # Client-chosen ids of the window's messages, for exactly-once sending.
        self._ids: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def first(self) -> int:
        """The seq of the oldest message held (``head + 1`` when the window is empty)."""
        entries = self._entries
        return entries[0].seq if entries else self.head + 1

    def nextPosition(self) -> Position:
        """The position the next message gets, for a room that numbers its own messages."""
        return Position(self.epoch, self.head + 1)

    def append(
        self, position: Position, message: Message, when: float, arrived: float | None = None
    ) -> Entry:
        """
        Add ``message``, relayed at ``position`` with time ``when``; drop what falls out.
        ``arrived`` (now, unless given) is what its age counts from: a message read back
        from a shared store is as old as it was there.

        A position that does not follow the head within this epoch restarts the window there.
        """
        if position.epoch != self.epoch or position.seq != self.head + 1:
            self._restart(position.epoch)
            self.head = position.seq - 1
        return self.appendNext(message, when, arrived)

    def appendNext(self, message: Message, when: float, arrived: float | None = None) -> Entry:
        """
        Add ``message`` at :meth:`nextPosition` (what ``append(nextPosition(), ...)`` does,
        for a room that numbers its own messages, without building the position).
        """
        now = self._clock()
        seq = self.head = self.head + 1
        entry = Entry(seq, message, when, now if arrived is None else arrived)
        entries = self._entries
        entries.append(entry)
        self.bytes += entry.size
        if message.id is not None:
            self._ids[message.id] = entry
        if len(entries) > self.maxCount or self.bytes > self.maxBytes:
            self._trim(now)
        elif entries[0].arrived < now - self.maxAge:
            self._trim(now)
        return entry

    def restart(self, epoch: str, head: int = 0) -> None:
        """
        Empty the window and go on from ``head`` of ``epoch`` (the seq of the last message
        relayed in it): a shared store says the room's history is there now.
        """
        self._restart(epoch)
        self.head = head

    def _restart(self, epoch: str) -> None:
        self._entries.clear()
        self._ids.clear()
        self.bytes = 0
        self.epoch = epoch

    def cacheFrame(self, entry: Entry, frame: PreparedMessage, json: bool, evict: bool) -> None:
        """
        Keep ``frame`` (``entry``'s JSON frame if ``json``, else its plain one) for replays,
        if it fits in the byte bound; with ``evict``, older messages make room for it.
        """
        size = frameSize(frame)
        if self.bytes + size > self.maxBytes:
            if not evict or entry.size + size > self.maxBytes:
                return
            self._evictFor(size, entry)
            if self.bytes + size > self.maxBytes:
                return
        if entry.seq < self.first or entry.seq > self.head:
            return  # no longer in the window
        if json:
            entry.jsonFrame = frame
        else:
            entry.plainFrame = frame
        entry.size += size
        self.bytes += size

    def _evictFor(self, size: int, keep: Entry) -> None:
        entries = self._entries
        while entries and entries[0] is not keep and self.bytes + size > self.maxBytes:
            self._dropOldest()

    def _dropOldest(self) -> None:
        entry = self._entries.popleft()
        self.bytes -= entry.size
        mid = entry.message.id
        if mid is not None and self._ids.get(mid) is entry:
            del self._ids[mid]

    def _trim(self, now: float) -> None:
        entries = self._entries
        while len(entries) > self.maxCount:
            self._dropOldest()
        while entries and self.bytes > self.maxBytes:
            self._dropOldest()
        oldest = now - self.maxAge
        while entries and entries[0].arrived < oldest:
            self._dropOldest()

    def expire(self) -> None:
        """Drop the messages older than ``maxAge``."""
        self._trim(self._clock())

    def entry(self, seq: int) -> Entry | None:
        """The message at ``seq`` of this epoch, if the window still holds it."""
        entries = self._entries
        if not entries:
            return None
        index = seq - entries[0].seq
        if 0 <= index < len(entries):
            return entries[index]
        return None

    def byId(self, mid: str) -> Entry | None:
        """The message of the window sent with the client-chosen id ``mid``, if any."""
        self.expire()
        return self._ids.get(mid)

    def start(self, since: Position | None = None, last: int | None = None) -> tuple[int, bool]:
        """
        Where a connecting client's replay starts: the seq of the first message it is sent,
        and whether it recovered everything after ``since``.

        ``since``: recover every message after that position. Recovered when it is of this
        epoch, not past the head, and the window still holds every message after it;
        otherwise the replay is the whole window (and not recovered). ``last``: the last
        ``last`` messages (capped by the window); ``since`` wins. Neither: nothing
        (``head + 1``, "recovered" trivially).
        """
        self.expire()
        first = self.first
        if since is not None:
            if since.epoch == self.epoch and first - 1 <= since.seq <= self.head:
                return since.seq + 1, True
            return first, False
        if last is not None:
            return max(first, self.head + 1 - last), True
        return self.head + 1, True


class BadQuery(ValueError):
    """A malformed ``since`` or ``history`` query parameter; the text says why."""


#: An epoch: 1 to 64 lower-case letters and digits.
EPOCH = re.compile(r"[0-9a-z]{1,64}")
_DIGITS = re.compile(r"[0-9]{1,18}")


def parseQuery(query: str) -> tuple[Position | None, int | None]:
    """
    The ``since=EPOCH:SEQ`` and ``history=N`` parameters of a WebSocket URL's query.

    @raise BadQuery: if either is given twice or is malformed.
    """
    params = parse_qs(query, keep_blank_values=True)
    since = last = None
    sinces = params.get("since", [])
    if len(sinces) > 1:
        raise BadQuery("since given more than once")
    if sinces:
        epoch, colon, seq = sinces[0].partition(":")
        if not (colon and EPOCH.fullmatch(epoch) and _DIGITS.fullmatch(seq)):
            raise BadQuery(
                f"since must be EPOCH:SEQ (as in a message's epoch and seq), not {sinces[0][:40]!r}"
            )
        since = Position(epoch, int(seq))
    lasts = params.get("history", [])
    if len(lasts) > 1:
        raise BadQuery("history given more than once")
    if lasts:
        if not _DIGITS.fullmatch(lasts[0]):
            raise BadQuery(f"history must be a number of messages, not {lasts[0][:40]!r}")
        last = int(lasts[0])
    return since, last
