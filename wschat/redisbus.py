"""
One room across several daemons, through a Redis pub/sub channel (``--redis``).

:class:`RedisBus` publishes each message of this daemon's clients once, as an envelope
(:mod:`wschat.envelope`), to a channel shared by several daemons, and gives every envelope it
receives on that channel (its own included) to this daemon's room. Every client of every daemon
sees the same messages in the same order: the order in which Redis received them. While the
link to Redis is down a message is not sent: its sender gets a notice through
``origin.refused(reason)`` and :attr:`RedisBus.refused` counts it; the daemon reconnects with
backoff and resumes on its own. Malformed envelopes are logged and skipped.

What waits for Redis is bounded: PUBLISHes not yet answered (the backlog) are limited in
number and bytes, and a Redis that has left one unanswered for :data:`STALL_TIMEOUT` seconds
(stopped, swapping, partitioned away without a reset) is treated as unavailable until it
answers again; either way new messages are refused with a notice instead of piling up in
memory. The link counts as up only once Redis has answered a PING on both connections.

With history on, Redis numbers the messages: one script (:mod:`wschat.redishistory`) checks the
message's id against the window, gives it the room's next position, appends it to the room's
history (a Redis Stream) and publishes it, atomically, so that every daemon relays it at the
same position. Each daemon keeps the recent window in memory as a replica (filled from the
Stream when the link comes up, then from the channel); when the channel skipped messages
(the link was lost) they are read back from the Stream before going on, and a client
recovering further back than the replica reaches is served from the Stream
(:meth:`RedisBus.backfill`).

Presence is room-wide: each daemon reports its connection count and their joins and leaves
(:mod:`wschat.presence`), and shows the other daemons' to its JSON clients.

This module imports the Redis client (txredisapi) and MessagePack: the ``redis`` extra.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import txredisapi
from twisted.application import service
from twisted.internet import defer, endpoints, error, task
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wschat.bus import Origin
from wschat.envelope import (
    Envelope,
    MalformedEnvelope,
    PresenceEnvelope,
    PresenceEvent,
    decodeEnvelope,
    encodeEnvelope,
    encodePresence,
    envelopeHead,
)
from wschat.history import History, Position, newEpoch
from wschat.presence import PresenceView
from wschat.redisaddress import DEFAULT_CHANNEL, RedisAddress
from wschat.redishistory import (
    MalformedReply,
    Stored,
    goodbyeScript,
    readAlive,
    readRelayed,
    readScript,
    readStored,
    relayScript,
    reportScript,
)
from wschat.room import Room
from wschat.wire import Format, Message, plural

#: Seconds Redis may take to answer a command before the connection is dropped.
REPLY_TIMEOUT = 10.0
#: Seconds between PINGs on both connections: a link that died silently (no RST: a network
#: partition, a host gone) is found within HEARTBEAT + REPLY_TIMEOUT, even on a quiet channel.
HEARTBEAT = 5.0

#: Seconds the oldest unanswered command may wait before the link counts as stalled and new
#: messages are refused: longer than any pause of a healthy Redis (a snapshot's fork, a slow
#: command), short enough that a sender waiting for its echo hears why before wondering.
STALL_TIMEOUT = 2.0
#: PUBLISHes sent and not yet answered, at most. A healthy link has few in flight (one round
#: trip's worth: 20 at 20,000 messages/s and 1 ms); this leaves room for 5,000 clients
#: sending in the same instant. Each costs its envelope plus ~4 KiB (the Deferreds, the reply
#: timeout, the transport's buffer): a stall holds at most ~25 MiB of 1 KiB messages.
MAX_BACKLOG = 5_000
#: Envelope bytes sent and not yet answered, at most: 256 messages of the default 64 KiB
#: limit.
MAX_BACKLOG_BYTES = 16 * 1024 * 1024

#: Seconds a daemon's connections count in the room after its last report (each heartbeat
#: renews it): a daemon that dies without saying goodbye drops out within this time.
PRESENCE_TTL = 15.0
#: Joins and leaves waiting to be reported to the other daemons, at most: they go one report
#: at a time, and a Redis that does not answer must not make them pile up. Past it the oldest
#: are not told (the counts stay right).
MAX_PRESENCE_EVENTS = 1_000
#: Messages from the channel held while the history is read back from Redis (one round trip),
#: at most; past it they are relayed at once, and the window starts afresh if there is a gap.
MAX_HELD = 10_000

#: Told to a sender whose message was refused because the link to Redis is down.
REFUSED_DOWN = "message not delivered: the room is unavailable (Redis link down); try again later"
#: Told to a sender whose message Redis took but relayed to no daemon at all.
REFUSED_NO_ROOM = "message not delivered: no daemon is listening on the room's channel"
#: Told to a sender whose message was in flight when the link to Redis broke.
REFUSED_LOST = "message may not have been delivered: the Redis link broke while sending it"
#: Told to a sender whose message was refused because Redis has stopped answering.
REFUSED_STALLED = (
    "message not delivered: the room is unavailable (Redis is not answering); try again later"
)
#: Told to a sender whose message was refused because too much is waiting for Redis already.
REFUSED_BACKLOG = (
    "message not delivered: the room is overloaded (too much waiting for Redis); try again later"
)
#: Told to a sender whose message Redis answered with an error (out of memory, ...).
REFUSED_ERROR = "message not delivered: Redis refused it ({error}); try again later"


@dataclass(eq=False)
class _Fetch:
    """A read of the history in Redis for recovering clients, and who waits for it."""

    epoch: str
    start: int
    waiters: list[defer.Deferred[None]] = field(default_factory=list)

    def done(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.callback(None)


def _fire(waiter: defer.Deferred[None]) -> None:
    if not waiter.called:
        waiter.callback(None)


class _Waiting:
    """One command sent to Redis and not yet answered: when it was sent, and its size."""

    __slots__ = ("sentAt", "size", "answered")

    def __init__(self, sentAt: float, size: int) -> None:
        self.sentAt = sentAt
        self.size = size
        self.answered = False


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """A client endpoint that tells the bus when an attempt to connect fails."""

    def __init__(
        self, endpoint: IStreamClientEndpoint, failed: Callable[[Failure], None], name: str
    ) -> None:
        self._endpoint = endpoint
        self._failed = failed
        self._name = name

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        def failed(reason: Failure) -> Failure:
            self._failed(reason)
            return reason

        return self._endpoint.connect(protocolFactory).addErrback(failed)

    def __repr__(self) -> str:
        # ClientService names the endpoint in its "Scheduling retry" log lines.
        return self._name


class _PublisherProtocol(txredisapi.RedisProtocol):
    factory: _BusFactory

    def connectionMade(self) -> Any:
        # Each PUBLISH goes out at once, as redis-py and hiredis do, not held back by Nagle.
        self.transport.setTcpNoDelay(True)
        # Ready once AUTH and SELECT have been answered, not at connectionMade.
        self.whenConnected().addCallback(self.factory.bus._publisherReady)
        return super().connectionMade()

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.factory.bus._connectionLost(self, why)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    factory: _BusFactory

    def connectionMade(self) -> Any:
        self.whenConnected().addCallback(self.factory.bus._subscriberReady)
        return super().connectionMade()

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.factory.bus._connectionLost(self, why)

    def messageReceived(self, pattern: object, channel: object, message: bytes) -> None:
        self.factory.bus.relayEnvelope(message)


class _BusFactory(txredisapi.RedisFactory):
    """One connection to Redis, kept up by txredisapi (a ClientService) with backoff."""

    # Redis restarts in well under a second: retry soon, then back off (x e) to 10 s.
    initialDelay = 0.1
    maxDelay = 10

    def __init__(self, bus: RedisBus, protocol: type[Any]) -> None:
        address = bus.address
        super().__init__(
            str(address),
            address.db or None,
            1,
            isLazy=True,
            # Bytes in, bytes out: no decoding, and no turning "42" into an int.
            charset=None,
            convertNumbers=False,
            password=address.password,
            username=address.username,
            # A Redis that stops answering is dropped and reconnected to, like a lost one.
            replyTimeout=bus.replyTimeout,
        )
        self.bus = bus
        self.protocol = protocol
        # Only failed AUTH or SELECT errback it; connectionError logs those.
        self.deferred.addErrback(lambda _: None)

    def connectionError(self, why: str) -> None:
        # Called when AUTH or SELECT was refused: txredisapi stops retrying, as it should for
        # a configuration error, and so does the bus.
        super().connectionError(why)
        self.bus._refusedByRedis(why)


class RedisBus(service.Service):
    """
    One room across every daemon that shares a Redis pub/sub channel.

    A service: it connects when started, and keeps reconnecting (with backoff) until stopped.
    Two connections, because a subscribed Redis connection may send nothing but
    (un)subscriptions: one publishes, one subscribes.

    @ivar published: messages from this daemon's clients handed to Redis.
    @ivar refused: messages from this daemon's clients refused with a notice.
    @ivar received: envelopes relayed to this daemon's room (from any daemon).
    @ivar malformed: what came in on the channel and was skipped.
    @ivar backlog: PUBLISHes sent and not yet answered (at most ``maxBacklog``).
    @ivar backlogBytes: their envelopes' bytes (at most ``maxBacklogBytes``).
    """

    _log = Logger()

    def __init__(
        self,
        room: Room,
        address: RedisAddress,
        channel: str = DEFAULT_CHANNEL,
        node: str | None = None,
        reactor: Any = None,
        heartbeat: float = HEARTBEAT,
        replyTimeout: float = REPLY_TIMEOUT,
        stallTimeout: float = STALL_TIMEOUT,
        maxBacklog: int = MAX_BACKLOG,
        maxBacklogBytes: int = MAX_BACKLOG_BYTES,
        presenceTTL: float = PRESENCE_TTL,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.room = room
        self.address = address
        self.channel = channel
        self.node = node or secrets.token_hex(4)
        self.replyTimeout = replyTimeout
        self.stallTimeout = stallTimeout
        self.maxBacklog = maxBacklog
        self.maxBacklogBytes = maxBacklogBytes
        self._heartbeat = task.LoopingCall(self._ping)
        self._heartbeat.clock = reactor
        self._heartbeatInterval = heartbeat
        self.published = 0
        self.refused = 0
        self.received = 0
        self.malformed = 0
        self.backlog = 0
        self.backlogBytes = 0
        # Unanswered PUBLISHes, oldest first (answered ones leave from the left), and PINGs.
        self._inFlight: deque[_Waiting] = deque()
        self._pings: set[_Waiting] = set()
        self._publisher: _PublisherProtocol | None = None
        self._subscriber: _SubscriberProtocol | None = None
        self._confirming: tuple[object, object] | None = None
        self._factories: list[_BusFactory] = []
        self._up = False
        self._everUp = False
        self._downSince: float = reactor.seconds()
        self._refusedBefore = 0
        self._refusalLogged = False
        self._stallLogged = False
        self._backlogFull = False
        self._refusedWhenFull = 0
        self._complained = False
        self._gaveUp = False
        # History (None: off, messages go out with PUBLISH and carry no position).
        self.history: History | None = room.history
        self._positionKey = f"{channel}:position"
        self._historyKey = f"{channel}:history"
        # Messages from the channel held while the history is read back (None: not holding).
        self._held: list[Stored.Entry] | None = None
        self._reading: object | None = None
        self._fetches: list[_Fetch] = []
        # Recovering clients waiting for a read-back to end.
        self._readWaiters: list[defer.Deferred[None]] = []
        # The oldest position of the epoch worth reading back for a recovering client.
        self._floor = Position("", 0)
        #: Messages read back from Redis's history and relayed (ones the channel skipped).
        self.readBack = 0
        # Presence: the other daemons' counts, and this one's joins and leaves to report.
        self.presenceTTL = presenceTTL
        self.presence = PresenceView(self.node, presenceTTL, reactor.seconds)
        self._presenceKey = f"{channel}:presence"
        self._alivePrefix = f"{channel}:alive:"
        self._events: deque[PresenceEvent] = deque(maxlen=MAX_PRESENCE_EVENTS)
        self._reporting = False
        self._version = 0
        room.elsewhere = self.presence.elsewhere
        room.presenceWatcher = self._presenceChanged

    @property
    def available(self) -> bool:
        """
        Whether a message published now reaches the room: both connections are up and Redis
        is answering.
        """
        return self._up and not self._stalled(self._reactor.seconds())

    def _stalled(self, now: float) -> bool:
        """Whether a command has waited for its answer longer than ``stallTimeout``."""
        oldest = now
        if self._inFlight:
            oldest = self._inFlight[0].sentAt
        for ping in self._pings:
            oldest = min(oldest, ping.sentAt)
        return now - oldest > self.stallTimeout

    def publish(self, message: Message, origin: Origin) -> None:
        publisher = self._publisher
        if not self._up or publisher is None:
            self._refuse(origin, REFUSED_DOWN)
            return
        now = self._reactor.seconds()
        if self._stalled(now):
            self._stall(now)
            self._refuse(origin, REFUSED_STALLED)
            return
        history = self.history
        if history is None:
            data = encodeEnvelope(Envelope(message, self.node, now))
            size = len(data)
        else:
            head = envelopeHead(message, self.node, now)
            size = len(head)
        if self.backlog >= self.maxBacklog or self.backlogBytes + size > self.maxBacklogBytes:
            self._backlogIsFull()
            self.refused += 1
            origin.refused(REFUSED_BACKLOG)
            return
        try:
            if history is None:
                sent = publisher.publish(self.channel, data)
            else:
                keys = [self._positionKey, self._historyKey]
                if message.id is not None:
                    keys.append(f"{self.channel}:id:{message.id}")
                sent = relayScript(
                    publisher,
                    keys,
                    [newEpoch(), history.maxCount, self._lifetime(), self.channel, head],
                ).addCallback(self._numbered, message)
        except txredisapi.ConnectionError:
            self._refuse(origin, REFUSED_DOWN)
            return
        self.published += 1
        waiting = _Waiting(now, size)
        self._inFlight.append(waiting)
        self.backlog += 1
        self.backlogBytes += size
        sent.addCallbacks(
            self._delivered,
            self._lost,
            callbackArgs=(origin, waiting),
            errbackArgs=(origin, waiting),
        )

    def _lifetime(self) -> int:
        """Milliseconds the history and message ids live in Redis: the window's age."""
        assert self.history is not None
        return max(1, round(self.history.maxAge * 1000))

    def _numbered(self, reply: object, message: Message) -> object:
        relayed = readRelayed(reply)
        if relayed.duplicate:
            return (message, Position(relayed.epoch, relayed.seq))
        # In the room's history now: a daemon not subscribed at this moment (even this one)
        # reads it back from there when it subscribes again.
        return None

    def _answered(self, waiting: _Waiting) -> None:
        waiting.answered = True
        self.backlog -= 1
        self.backlogBytes -= waiting.size
        inFlight = self._inFlight
        while inFlight and inFlight[0].answered:
            inFlight.popleft()
        if self._stallLogged:
            self._stallEnded()
        if self._backlogFull and self.backlog * 2 <= self.maxBacklog:
            if self.backlogBytes * 2 <= self.maxBacklogBytes:
                self._backlogFull = False
                self._log.info(
                    "The Redis backlog has drained ({count} refused meanwhile)",
                    count=plural(self.refused - self._refusedWhenFull, "message"),
                )

    def _backlogIsFull(self) -> None:
        if self._backlogFull:
            return
        # Logged once until it has drained to half: a flood would flood the log otherwise.
        self._backlogFull = True
        self._refusedWhenFull = self.refused
        self._log.warn(
            "The Redis backlog is full ({count}, {size} bytes waiting for Redis; at most "
            "{maxCount} and {maxSize} bytes); refusing messages with a notice to their sender",
            count=plural(self.backlog, "message"),
            size=self.backlogBytes,
            maxCount=self.maxBacklog,
            maxSize=self.maxBacklogBytes,
        )

    def _delivered(self, receivers: object, origin: Origin, waiting: _Waiting) -> None:
        self._answered(waiting)
        if isinstance(receivers, tuple):
            # Its id was relayed already, at that position: not again.
            message, position = receivers
            origin.duplicate(message.id, position)
        # PUBLISH answers how many subscribers got it; none means not even this daemon.
        elif receivers == 0 and self.history is None:
            self._refuse(origin, REFUSED_NO_ROOM)

    def _lost(self, reason: Failure, origin: Origin, waiting: _Waiting) -> None:
        self._answered(waiting)
        if reason.check(txredisapi.ResponseError, MalformedReply):
            # Redis answered, with an error: it did not relay the message.
            why = reason.getErrorMessage()
            self._log.warn("Redis refused a message: {why}", why=why)
            self._refuse(origin, REFUSED_ERROR.format(error=why[:80]))
            return
        self._refuse(origin, REFUSED_LOST)

    def _stall(self, now: float) -> None:
        if self._stallLogged:
            return
        # Once per stall, counted from here: its end is logged with the refusals meanwhile.
        self._stallLogged = True
        self._refusalLogged = True
        self._refusedBefore = self.refused
        self._downSince = now
        self._log.warn(
            "Redis {redis} has not answered for over {timeout:g} s ({backlog} waiting); "
            "refusing messages with a notice to their sender until it answers",
            redis=self.address,
            timeout=self.stallTimeout,
            backlog=plural(self.backlog, "message"),
        )

    def _stallEnded(self) -> None:
        now = self._reactor.seconds()
        if self._stalled(now):
            return
        self._stallLogged = False
        self._refusalLogged = False
        self._log.info(
            "Redis {redis} answers again (stalled {stalled:.1f} s, {count} refused meanwhile)",
            redis=self.address,
            stalled=now - self._downSince,
            count=plural(self.refused - self._refusedBefore, "message"),
        )

    def _refuse(self, origin: Origin, reason: str) -> None:
        self.refused += 1
        if not self._refusalLogged:
            # Once per outage: a busy room would flood the log otherwise.
            self._refusalLogged = True
            self._log.warn(
                "Refused a message ({reason}); its sender is told. Further refusals are "
                "counted, and logged when the Redis link comes back",
                reason=reason,
            )
        origin.refused(reason)

    def relayEnvelope(self, data: bytes) -> None:
        """
        Relay an envelope that came in on the channel to this daemon's room, or skip it.
        """
        try:
            decoded = decodeEnvelope(data)
        except MalformedEnvelope as e:
            self.malformed += 1
            self._log.warn(
                "Skipped a malformed envelope on channel {channel!r} ({size} bytes): {why}",
                channel=self.channel,
                size=len(data) if isinstance(data, bytes) else -1,
                why=str(e),
            )
            return
        if isinstance(decoded, PresenceEnvelope):
            self._presenceReceived(decoded)
            return
        envelope = decoded
        message = envelope.message
        if message.isBinary and self.room.format is Format.PREFIXED:
            # A daemon in raw format shares the channel: its binary messages have no place in
            # a prefixed room, whose clients expect text.
            self.malformed += 1
            self._log.warn(
                "Skipped a binary message from node {node} on channel {channel!r}: this "
                "daemon relays text only (--format prefixed); give every daemon on a channel "
                "the same --format",
                node=envelope.node,
                channel=self.channel,
            )
            return
        history = self.history
        if history is None:
            self._relay(envelope, None)
            return
        position = envelope.position
        if position is None:
            self.malformed += 1
            self._log.warn(
                "Skipped a message without a position from node {node} on channel "
                "{channel!r}: this daemon keeps history, that one does not; give every "
                "daemon on a channel the same --history (0 or not)",
                node=envelope.node,
                channel=self.channel,
            )
            return
        held = self._held
        if held is not None:
            held.append((position, envelope))
            if len(held) > MAX_HELD:
                self._release()
            return
        self._relay(envelope, position)

    def _relay(
        self, envelope: Envelope, position: Position | None, mayReadBack: bool = True
    ) -> None:
        """
        Relay ``envelope`` to the room at ``position``; skip one already relayed (read back
        from the history first), and read back what the channel skipped before a gap.
        """
        history = self.history
        if history is not None and position is not None and position.epoch == history.epoch:
            if position.seq <= history.head:
                return
            if position.seq > history.head + 1 and mayReadBack:
                if self._readBack((position, envelope)):
                    return
        self.received += 1
        try:
            # JSON clients on every daemon see the time the sender's daemon stamped; with
            # history on, the message takes the position Redis gave it (None: history off).
            self.room.broadcast(envelope.message, envelope.time, position)
        except Exception:
            # Never let a bug here tear down the subscription for everyone.
            self._log.failure("Relaying a message from the channel failed")

    # The history in Redis

    def _read(self, epoch: str, after: int) -> defer.Deferred[Stored]:
        """
        Read the room's history in Redis after ``after`` of ``epoch`` (or, if the room is
        in another epoch now, its last messages).

        @raise txredisapi.ConnectionError: the link is down.
        """
        assert self.history is not None
        if self._publisher is None:
            raise txredisapi.ConnectionError("no link to Redis")
        return readScript(
            self._publisher,
            [self._positionKey, self._historyKey],
            [newEpoch(), epoch, f"{after + 1}-0", self.history.maxCount],
        ).addCallback(readStored)

    def _readBack(self, gap: Stored.Entry | None = None) -> bool:
        """
        Hold what the channel brings while reading back from Redis what this daemon has not
        relayed (the channel skipped it, or the link has just come up), then relay both in
        order. False if no read can start now.
        """
        history = self.history
        if history is None or self._reading is not None or self._publisher is None:
            return False
        held = self._held = [] if self._held is None else self._held
        if gap is not None:
            held.append(gap)
        token = self._reading = object()
        epoch, head = history.epoch, history.head
        timeout = self._reactor.callLater(self.stallTimeout, self._readTimedOut, token)

        def read(stored: Stored) -> None:
            if timeout.active():
                timeout.cancel()
            if self._reading is token:
                self._readDone(stored)

        def failed(reason: Failure) -> None:
            if timeout.active():
                timeout.cancel()
            if self._reading is token:
                self._log.warn(
                    "Reading the room's history back from Redis failed ({why}); going on "
                    "without it",
                    why=reason.getErrorMessage(),
                )
                self._release()

        try:
            self._read(epoch, head).addCallbacks(read, failed)
        except txredisapi.ConnectionError:
            timeout.cancel()
            self._release()
        return True

    def _readTimedOut(self, token: object) -> None:
        if self._reading is token:
            self._log.warn(
                "Redis did not answer a read of the room's history within {timeout:g} s; "
                "going on without it",
                timeout=self.stallTimeout,
            )
            self._release()

    def _readDone(self, stored: Stored) -> None:
        history = self.history
        assert history is not None
        if stored.after and stored.epoch == history.epoch:
            # The same epoch: relay what this daemon missed, as any message.
            for position, envelope in stored.entries:
                if position.seq > history.head:
                    self.readBack += 1
                    self._relay(envelope, position, mayReadBack=False)
            if history.epoch == stored.epoch and history.head < stored.head:
                # Gone from Redis too (older than the window): the window starts afresh.
                history.restart(stored.epoch, stored.head)
        else:
            # Another epoch (this daemon has just started, or Redis lost its data): the
            # last messages of the room's history fill the window without being sent to
            # anyone; what the channel brought meanwhile is relayed after them.
            live = [p.seq for p, _ in self._held or () if p.epoch == stored.epoch]
            until = min(live) - 1 if live else stored.head
            fill = [(p, e) for p, e in stored.entries if p.seq <= until]
            history.restart(stored.epoch, fill[0][0].seq - 1 if fill else until)
            for position, envelope in fill:
                history.append(position, envelope.message, envelope.time, envelope.time)
            if history.epoch == stored.epoch and history.head < until:
                history.restart(stored.epoch, until)
            self._log.info(
                "The room's history in Redis: epoch {epoch}, {count} recent messages up to "
                "seq {head}",
                epoch=stored.epoch,
                count=len(history),
                head=until,
            )
        if stored.malformed:
            self.malformed += stored.malformed
            self._log.warn(
                "Skipped {count} unreadable entries of the room's history in Redis",
                count=stored.malformed,
            )
        self._release()

    def _release(self) -> None:
        """Relay the messages held during a read, and stop holding."""
        held, self._held = self._held, None
        self._reading = None
        for position, envelope in held or ():
            self._relay(envelope, position, mayReadBack=False)
        waiters, self._readWaiters = self._readWaiters, []
        for waiter in waiters:
            _fire(waiter)

    def backfill(self, since: Position) -> defer.Deferred[None] | None:
        """
        Read back from Redis, for a client recovering after ``since``, what the replica
        lacks: messages older than it holds (it started later, or holds fewer bytes) and
        ones the channel has not brought yet (the client saw them through another daemon).
        """
        history = self.history
        if history is None or not self.available:
            return None
        if self._held is not None:
            # The history is being read back (the link has just come up): decide after.
            waiter: defer.Deferred[None] = defer.Deferred()
            self._readWaiters.append(waiter)
            self._reactor.callLater(self.stallTimeout, _fire, waiter)
            return waiter.addCallback(lambda _: self.backfill(since))
        history.expire()
        if since.epoch != history.epoch:
            return None
        if history.first - 1 <= since.seq <= history.head:
            return None
        floor = self._floor
        if since.seq < history.head - history.maxCount or (
            since.epoch == floor.epoch and since.seq < floor.seq
        ):
            # Older than Redis's window, or than this daemon's can hold.
            return None
        start = min(since.seq, history.head) + 1
        waiter = defer.Deferred()
        for fetch in self._fetches:
            if fetch.epoch == since.epoch and fetch.start <= start:
                fetch.waiters.append(waiter)
                return waiter
        fetch = _Fetch(since.epoch, start, [waiter])
        self._fetches.append(fetch)
        timeout = self._reactor.callLater(self.stallTimeout, self._fetchDone, fetch)

        def read(stored: Stored) -> None:
            try:
                self._backfilled(stored, fetch.start)
            finally:
                self._fetchDone(fetch, timeout)

        try:
            self._read(since.epoch, start - 1).addCallbacks(
                read, lambda _: self._fetchDone(fetch, timeout)
            )
        except txredisapi.ConnectionError:
            self._fetchDone(fetch, timeout)
        return waiter

    def _fetchDone(self, fetch: _Fetch, timeout: IDelayedCall | None = None) -> None:
        if timeout is not None and timeout.active():
            timeout.cancel()
        if fetch in self._fetches:
            self._fetches.remove(fetch)
        fetch.done()

    def _backfilled(self, stored: Stored, start: int) -> None:
        history = self.history
        assert history is not None
        if not stored.after or stored.epoch != history.epoch or self._held is not None:
            # Redis is in another epoch, or a read-back is under way: that brings it.
            return
        entries = stored.entries
        if not entries or entries[0][0].seq > start:
            # Gone from Redis: no use reading it again.
            self._floor = Position(stored.epoch, start - 1)
        first = history.first
        older = [(p, e) for p, e in entries if p.seq < first]
        if older and older[-1][0].seq == first - 1:
            # The window goes further back: the older messages, then its own.
            kept = [history.entry(seq) for seq in range(first, history.head + 1)]
            history.restart(stored.epoch, older[0][0].seq - 1)
            for position, envelope in older:
                history.append(position, envelope.message, envelope.time, envelope.time)
            for entry in kept:
                if entry is not None:
                    position = Position(stored.epoch, entry.seq)
                    history.append(position, entry.message, entry.when, entry.arrived)
            if history.first > older[0][0].seq:
                # The window cannot hold that much (its bytes, or their age).
                self._floor = Position(stored.epoch, history.first - 1)
        for position, envelope in entries:
            # Messages the channel has not brought yet: relayed now, skipped when it does.
            if position.seq > history.head:
                self.readBack += 1
                self._relay(envelope, position, mayReadBack=False)

    # Room-wide presence

    def _presenceChanged(self, kind: Literal["join", "leave"], who: str) -> None:
        """One of this daemon's connections joined or left: tell the other daemons."""
        if not self._up:
            return
        self._events.append(PresenceEvent(kind, who, len(self.room)))
        self._report()

    def _nextVersion(self) -> int:
        """
        The version of this daemon's next presence report: above the last one, and above any
        of an earlier run of this node (milliseconds of the clock).
        """
        self._version = max(self._version + 1, int(self._reactor.seconds() * 1000))
        return self._version

    def _report(self) -> None:
        """
        Report this daemon's count (and its joins and leaves since the last report), and
        read back the others': one report at a time.
        """
        publisher = self._publisher
        if self._reporting or publisher is None or not self._up:
            return
        self._reporting = True
        events, count = tuple(self._events), len(self.room)
        self._events.clear()
        version = self._nextVersion()
        data = b""
        if events:
            data = encodePresence(PresenceEnvelope(self.node, version, count, events))
        asked = self._reactor.seconds()

        def answered(reply: object) -> None:
            self._reporting = False
            try:
                self.presence.census(readAlive(reply), asked)
            except MalformedReply as e:
                self._log.warn("Unreadable presence census from Redis: {why}", why=str(e))
            if self._events:
                self._report()

        def failed(reason: Failure) -> None:
            self._reporting = False

        try:
            reportScript(
                publisher,
                [self._presenceKey, self._alivePrefix + self.node],
                [
                    self.node,
                    f"{version} {count}",
                    max(1, round(self.presenceTTL * 1000)),
                    self.channel,
                    data,
                    self._alivePrefix,
                ],
            ).addCallbacks(answered, failed)
        except txredisapi.ConnectionError:
            self._reporting = False

    def _presenceReceived(self, presence: PresenceEnvelope) -> None:
        """Another daemon's report: its count, and its joins and leaves shown here."""
        view = self.presence
        if not view.heard(presence.node, presence.version, presence.count):
            return
        final = presence.count
        try:
            for event in presence.events:
                view.counted(presence.node, event.count)
                self.room.announce(event.kind, event.who, remote=True)
        except Exception:
            self._log.failure("Showing another daemon's presence events failed")
        finally:
            view.counted(presence.node, final)

    def _goodbye(self) -> defer.Deferred[None]:
        """Leave the room's presence: this daemon's count goes, and the others are told."""
        publisher = self._publisher
        done: defer.Deferred[None] = defer.Deferred()
        if publisher is None or not self._up:
            done.callback(None)
            return done
        version = self._nextVersion()
        data = encodePresence(PresenceEnvelope(self.node, version, 0))

        def finished(_: object) -> None:
            if timeout.active():
                timeout.cancel()
            if not done.called:
                done.callback(None)

        timeout = self._reactor.callLater(self.stallTimeout, finished, None)
        try:
            goodbyeScript(
                publisher,
                [self._presenceKey, self._alivePrefix + self.node],
                [self.node, self.channel, data],
            ).addBoth(finished)
        except txredisapi.ConnectionError:
            finished(None)
        return done

    # The links to Redis

    def startService(self) -> None:
        super().startService()
        endpoint = _WatchedEndpoint(
            endpoints.HostnameEndpoint(self._reactor, self.address.host, self.address.port),
            self._connectFailed,
            str(self.address),
        )
        self._log.info(
            "Joining the room on channel {channel!r} of {redis} as node {node}; messages are "
            "refused until connected",
            channel=self.channel,
            redis=self.address,
            node=self.node,
        )
        self._factories = [
            _BusFactory(self, _PublisherProtocol),
            _BusFactory(self, _SubscriberProtocol),
        ]
        for factory in self._factories:
            factory.startConnecting(endpoint)
        self._heartbeat.start(self._heartbeatInterval, now=False)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        # Say goodbye (bounded by stallTimeout), then leave.
        return self._goodbye().addCallback(lambda _: self._disconnect())

    def _publisherReady(self, protocol: _PublisherProtocol) -> None:
        if not self.running:
            return
        self._publisher = protocol
        self._linkChanged()

    def _subscriberReady(self, protocol: _SubscriberProtocol) -> None:
        def subscribed(_: object) -> None:
            if protocol.connected and self.running:
                self._subscriber = protocol
                if self.history is not None and self._held is None:
                    # From here on the channel brings every message; the ones before are
                    # read back from Redis once the link is up, and go first.
                    self._held = []
                self._linkChanged()

        def failed(reason: Failure) -> None:
            if reason.check(txredisapi.ResponseError):
                # Redis answered no (NOAUTH: it wants a password the URL lacks). Retrying
                # would loop on an open connection; like a refused AUTH, this needs an operator.
                protocol.factory.stopTrying()
                protocol.factory.connectionError(f"SUBSCRIBE: {reason.getErrorMessage()}")
                protocol.transport.loseConnection()
            # Otherwise the connection broke before Redis answered; txredisapi reconnects.

        protocol.subscribe(self.channel).addCallbacks(subscribed, failed)

    def _connectionLost(self, protocol: object, why: Failure) -> None:
        if protocol is self._publisher:
            self._publisher = None
        elif protocol is self._subscriber:
            self._subscriber = None
        else:
            return
        if self.running:
            if why.check(error.ConnectionAborted):
                # Only a reply timeout aborts: say so rather than "aborted locally".
                self._linkChanged(f"Redis did not answer within {self.replyTimeout:g} s")
            else:
                self._linkChanged(why.getErrorMessage())

    def _refusedByRedis(self, why: str) -> None:
        if self._gaveUp or not self.running:
            return
        self._gaveUp = True
        self._log.critical(
            "Redis {redis} refused this daemon ({why}); giving up on it: fix --redis and "
            "restart. Messages are refused until then.",
            redis=self.address,
            why=why,
        )
        # Not from within txredisapi's connectionMade, which is where this is called from.
        self._reactor.callLater(0, self._disconnect)

    def _probe(self, protocol: txredisapi.RedisProtocol) -> defer.Deferred[object]:
        """PING on ``protocol``; the PING counts as waiting (for the stall check) until answered."""
        waiting = _Waiting(self._reactor.seconds(), 0)
        self._pings.add(waiting)

        def answered(result: object) -> object:
            self._pings.discard(waiting)
            if self._stallLogged:
                self._stallEnded()
            return result

        return defer.maybeDeferred(protocol.ping).addBoth(answered)

    def _ping(self) -> None:
        # An unanswered PING times out (replyTimeout) and drops the connection; that is all.
        for protocol in (self._publisher, self._subscriber):
            if protocol is not None:
                self._probe(protocol).addErrback(lambda _: None)
        # And this daemon stays counted in the room (its alive key renewed).
        self._report()

    def _disconnect(self) -> defer.Deferred[None]:
        if self._heartbeat.running:
            self._heartbeat.stop()
        self._up = False
        self._publisher = self._subscriber = None
        self._confirming = None
        self._release()
        self._events.clear()
        self.presence.clear()
        factories, self._factories = self._factories, []
        return defer.gatherResults(
            [f.disconnect() for f in factories], consumeErrors=True
        ).addCallback(lambda _: None)

    def _connectFailed(self, reason: Failure) -> None:
        if self.running and not self._up and not self._complained:
            self._complained = True
            self._log.warn(
                "Redis {redis} is unreachable ({why}); retrying with backoff, and refusing "
                "messages meanwhile",
                redis=self.address,
                why=reason.getErrorMessage(),
            )

    def _linkChanged(self, why: str = "") -> None:
        publisher, subscriber = self._publisher, self._subscriber
        if publisher is not None and subscriber is not None:
            if not self._up:
                self._confirm(publisher, subscriber)
        elif self._up:
            self._linkDown(why)

    def _confirm(self, publisher: _PublisherProtocol, subscriber: _SubscriberProtocol) -> None:
        """
        Mark the link up once Redis answers a PING on both connections: a connection the
        kernel accepted for a stopped or hung Redis is not a link.
        """
        pair = (publisher, subscriber)
        if self._confirming == pair:
            return
        self._confirming = pair

        def answered(_: object) -> None:
            if self._confirming == pair:
                self._confirming = None
            if (
                self.running
                and not self._up
                and self._publisher is publisher
                and self._subscriber is subscriber
            ):
                self._linkUp()

        def unanswered(_: Failure) -> None:
            # Timed out (the connection is dropped and reconnected) or lost: a new pair of
            # connections is confirmed anew.
            if self._confirming == pair:
                self._confirming = None

        defer.gatherResults(
            [self._probe(publisher), self._probe(subscriber)], consumeErrors=True
        ).addCallbacks(answered, unanswered)

    def _linkUp(self) -> None:
        self._up = True
        self._complained = False
        self._refusalLogged = False
        if self.history is not None and not self._readBack():
            self._release()
        self._report()
        if not self._everUp:
            self._everUp = True
            self._log.info(
                "Redis link up: {redis}, channel {channel!r}, node {node}",
                redis=self.address,
                channel=self.channel,
                node=self.node,
            )
            return
        self._log.info(
            "Redis link up: {redis}, channel {channel!r}, node {node} (down {down:.1f} s, "
            "{count} refused meanwhile)",
            redis=self.address,
            channel=self.channel,
            node=self.node,
            down=self._reactor.seconds() - self._downSince,
            count=plural(self.refused - self._refusedBefore, "message"),
        )

    def _linkDown(self, why: str) -> None:
        self._up = False
        self._refusalLogged = False
        # What the channel brought is relayed; what it skips is read back at the next link up.
        self._release()
        self._events.clear()
        if self._stallLogged:
            # The stall ends in an outage: counted from the stall's start.
            self._stallLogged = False
        else:
            self._downSince = self._reactor.seconds()
            self._refusedBefore = self.refused
        self._log.warn(
            "Redis link lost ({why}); reconnecting with backoff. Clients stay connected; "
            "messages sent meanwhile are refused with a notice to their sender",
            why=why,
        )
