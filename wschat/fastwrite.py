"""
The one writer of a plain TCP connection: :class:`FastTransport` stands between the WebSocket
protocol and its TCP transport, and every byte the protocol writes (the handshake response,
the room's frames, pings, pongs, close frames) goes through it, in order.

With nothing queued it hands the bytes to the kernel at once; only what the kernel refuses
waits for the reactor. Under a heavy load (a connection getting several frames in one reactor
turn) the frames of a turn leave together, one ``send`` per connection at the turn's end
(:class:`Turns`).

Twisted's ``transport.write`` always buffers and registers the socket for writing, so every
write costs a buffer append, two epoll re-registrations and a ``send`` in a later reactor
turn. When the transport has nothing queued, sending straight away keeps the byte order
(nothing is ahead of us) and saves all of that.

Whether a transport still has bytes queued is not public Twisted API. That knowledge lives here
and only here: :func:`canSendDirectly` reads ``dataBuffer``, ``_tempDataBuffer``, ``TLS`` and
``_writeDisconnected`` of :class:`twisted.internet.tcp.Connection` (pinned by
``tests/test_fastwrite.py``), and answers "no" whenever anything is unexpected, so the write
goes through ``transport.write`` as usual:

- a transport that is not exactly a plain TCP connection (TLS, UNIX sockets, wrappers such as
  ``policies.ProtocolWrapper``, in-memory test transports): :func:`wrap` leaves it as it is;
- a connection with TLS started on it, one that is disconnecting, or one with bytes queued
  (which is also the case whenever its producer is paused: Twisted pauses a producer only
  when its buffer is over the limit, so backlog accounting by the transport's pause and
  resume signals sees every byte it would have seen);
- an attribute missing (another Twisted version).

Bytes the kernel accepted are not backlog: they left the process. A partial send hands the
remainder to ``transport.write``; EAGAIN hands it all; any other socket error hands it all too,
so Twisted meets the error in its own ``doWrite`` and closes the connection its usual way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IConsumer,
    IProducer,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ISystemHandle,
    ITCPTransport,
    ITLSTransport,
)
from zope.interface import implementedBy, implementer
from zope.interface.declarations import Provides
from zope.interface.interface import Specification

#: Exactly these classes; subclasses (``unix.Server``, ``unix.Client``) are excluded on purpose.
PLAIN_TCP: frozenset[type] = frozenset({tcp.Server, tcp.Client})


def canSendDirectly(transport: Any) -> bool:
    """
    True if ``transport`` is a plain TCP connection, open for writing, with nothing queued.
    """
    if type(transport) not in PLAIN_TCP:
        return False
    try:
        return not (
            transport.dataBuffer
            or transport._tempDataBuffer
            or transport.TLS
            or transport.disconnecting
            or transport._writeDisconnected
            or not transport.connected
        )
    except AttributeError:
        return False


def sendOrQueue(send: Any, transport: Any, data: bytes | memoryview) -> int:
    """
    Hand ``data`` to the kernel with ``send`` (the transport's ``socket.send``); what the
    kernel does not take goes to ``transport.write``, behind it.

    Returns how many bytes the kernel took. A partial send queues the remainder, EAGAIN all
    of it; any other socket error (a reset, a broken pipe) queues it all too, so that Twisted
    meets the error in its own ``doWrite`` and closes the connection its usual way.
    """
    try:
        sent: int = send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        transport.write(bytes(data))
        return 0
    if sent < len(data):
        # bytes() of a bytes slice is that slice; of a memoryview slice, a copy.
        transport.write(bytes(data[sent:]))
    return sent


def writeNow(transport: Any, data: bytes | memoryview) -> int:
    """
    Write ``data`` to ``transport``, as much of it as the kernel takes straight away.

    Returns how many bytes went to the kernel directly; the rest (all of it, when the
    transport cannot be bypassed) went through ``transport.write``.
    """
    if not canSendDirectly(transport):
        transport.write(bytes(data))
        return 0
    return sendOrQueue(transport.socket.send, transport, data)


class Turns:
    """
    A reactor's turns, as the writers see them: quiet or busy.

    In a quiet turn a write goes to the kernel at once (:meth:`FastTransport.write`), so the
    first client of a broadcast does not wait for the last. When one connection gets a second
    write within a turn, that write and the ones after it are held and leave together at the
    turn's end, one ``send`` per connection; and the next turn is busy, so all its writes are
    held. A turn in which no connection got two writes makes the next one quiet again. Under
    a light load every frame leaves at once; under a heavy one the kernel sees one ``send``
    per connection per turn.

    :meth:`endTurn` runs with ``callLater(0)`` on the given clock (the reactor): after every
    event of the current poll and before the next poll.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        #: Counts the turns in which anything was sent or held.
        self.turn = 0
        #: Hold every write in this turn.
        self.busy = False
        #: Some connection got two writes in this turn.
        self.busyNext = False
        self.scheduled = False
        self.held: list[FastTransport] = []
        #: The shared frames kept in this turn, sent at its end.
        self.shared: list[SharedFrames] = []

    def schedule(self) -> None:
        """Make sure this turn ends with :meth:`endTurn`."""
        if not self.scheduled:
            self.scheduled = True
            self.clock.callLater(0, self.endTurn)

    def endTurn(self) -> None:
        """Send everything held, one write per connection, and start the next turn."""
        self.scheduled = False
        self.turn += 1
        self.busy, self.busyNext = self.busyNext, False
        held, self.held = self.held, []
        for writer in held:
            writer.flush()
        # After each connection's own held writes: what a connection wrote after some of
        # the shared frames went into its held writes behind them (FastTransport.catchUp).
        shared, self.shared = self.shared, []
        for frames in shared:
            frames.flush()


class SharedMember(Protocol):
    """What :class:`SharedFrames` needs of a connection."""

    def deliver(self, frame: Any) -> None:
        """Send one frame the connection's usual way (the path off the shared buffer)."""

    def takesShared(self) -> bool:
        """
        Whether the turn's frames may go out as one shared buffer now: the connection is
        open and keeping up (its transport has not paused it).

        :class:`SharedFrames` asks only when something may have changed the answer since it
        was last yes: anything done through the member's writer (a write, such as a close
        frame; a close, an abort, TLS), bytes queued in its transport, or the member's own
        word (:meth:`FastTransport.memberChanged`). Its answer must not turn to no otherwise.
        """


class SharedFrames:
    """
    The frames every member of a group (the room's members of one format, on plain TCP,
    without compression) receives in a busy turn, kept once for all of them.

    In a busy turn (see :class:`Turns`) the room hands each frame to :meth:`add` once,
    instead of to every member. At the turn's end :meth:`flush` joins the turn's frames once
    and hands the same bytes to each member's writer: one ``send`` per member per turn, and
    no Python per member per frame. A member that joined during the turn gets a slice (a
    ``memoryview``) from the first frame after it joined. A member that is not keeping up
    (:meth:`SharedMember.takesShared`), gets the frames one by one through its own
    ``deliver``, as outside a busy turn, with the same flow control and accounting.

    A member's writer keeps where the member is in the turn's frames. When anything else is
    written to it during the turn (a pong, a notice, a close frame), it first takes the
    frames it had not had yet, one by one (:meth:`FastTransport.catchUp`), so each member's
    bytes keep the order in which they were written.
    """

    __slots__ = ("turns", "members", "writers", "frames", "parts", "ends", "size", "turn")

    def __init__(self, turns: Turns) -> None:
        self.turns = turns
        #: Each member and its writer, in join order.
        self.members: dict[SharedMember, FastTransport] = {}
        #: Their writers, in the same order (None: to be made again after a join or leave).
        self.writers: tuple[FastTransport, ...] | None = ()
        #: The frames kept in this turn (as the members' ``deliver`` takes them).
        self.frames: list[Any] = []
        #: Their bytes on the wire.
        self.parts: list[bytes] = []
        #: Where each frame ends in the joined bytes.
        self.ends: list[int] = []
        self.size = 0
        #: The turn the frames kept were kept in.
        self.turn = -1

    def join(self, member: SharedMember, writer: FastTransport) -> None:
        """Add ``member``, written through ``writer``; it gets the frames from now on."""
        writer.shared = self
        writer.member = member
        writer.sharedTurn = self.turns.turn
        writer.sharedStart = len(self.frames)
        writer.askMember = True
        self.members[member] = writer
        self.writers = None

    def leave(self, member: SharedMember) -> bool:
        """Remove ``member``, after handing it what it had not had of this turn's frames."""
        writer = self.members.pop(member, None)
        if writer is None:
            return False
        self.writers = None
        writer.askMember = True
        writer.catchUp()
        writer.shared = None
        writer.member = None
        return True

    def add(self, frame: Any, data: bytes) -> None:
        """Keep ``frame`` (``data`` on the wire) for every member, to the turn's end."""
        t = self.turns
        if not self.frames:
            self.turn = t.turn
            t.shared.append(self)
            t.schedule()
        else:
            # As a connection getting a second write in a turn: the next turn is busy too.
            t.busyNext = True
        self.frames.append(frame)
        self.parts.append(data)
        self.size += len(data)
        self.ends.append(self.size)

    def behind(self, writer: FastTransport) -> int:
        """Where ``writer``'s member is in the frames kept: the index of its next frame."""
        return writer.sharedStart if writer.sharedTurn == self.turn else 0

    def flush(self) -> None:
        """Hand the turn's frames to every member: one write each, or one by one."""
        frames, ends = self.frames, self.ends
        count = len(frames)
        if not count:
            return
        parts = self.parts
        data = parts[0] if count == 1 else b"".join(parts)
        self.frames, self.parts, self.ends, self.size = [], [], [], 0
        size = len(data)
        turn = self.turn
        view = memoryview(data)
        writers = self.writers
        if writers is None:
            # A snapshot: a member may leave during the loop (a slow reader dropped).
            writers = self.writers = tuple(self.members.values())
        for writer in writers:
            start = writer.sharedStart if writer.sharedTurn == turn else 0
            if start >= count:
                continue
            writer.sharedTurn = turn
            writer.sharedStart = count
            if start or writer.dirty or writer.askMember:
                # Not the common case: ask the member (see SharedMember.takesShared).
                member = writer.member
                if member is None:
                    # It left during this loop: nothing more is sent to it.
                    continue
                if not member.takesShared():
                    for frame in frames[start:]:
                        member.deliver(frame)
                    continue
                writer.askMember = False
                writer.sendShared(data if start == 0 else view[ends[start - 1] :])
            else:
                # The common case, :meth:`FastTransport.sendShared` and :func:`sendOrQueue`
                # written out: this loop runs once per member per busy turn.
                try:
                    sent = writer._send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    sent = -1
                if sent != size:
                    # What the kernel did not take (all of it after a socket error, which
                    # Twisted then meets in its own doWrite) goes behind, as sendOrQueue does.
                    writer.transport.write(data[max(sent, 0) :])
                    writer.dirty = True


def wrap(transport: Any, turns: Turns) -> Any:
    """
    ``transport`` behind a :class:`FastTransport` when it is a plain TCP connection;
    any other transport (TLS, UNIX, in memory, another Twisted's) as it is.
    """
    if type(transport) not in PLAIN_TCP:
        return transport
    try:
        send = transport.socket.send
    except AttributeError:
        return transport
    return FastTransport(transport, turns, send)


@implementer(ITCPTransport, ITLSTransport, ISystemHandle, IConsumer, IPushProducer)
class FastTransport:
    """
    A plain TCP transport whose writes go to the kernel at once in a quiet turn, are held to
    the turn's end in a busy one (see :class:`Turns`), and go to the transport's own
    ``write`` whenever it has bytes of its own queued (or is closing, or has started TLS).

    It is the connection's only writer: bytes reach the transport's buffer only through it
    (when the kernel refuses some), so it looks at the buffer (:func:`canSendDirectly`) only
    after it put bytes there (``dirty``). Closing, aborting, stopping and starting TLS go
    through it too: held writes leave first, and from then on every write is checked.
    Everything else a TCP transport offers to its protocol (addresses, producers, socket
    options) is passed to the transport as it is; it is an ISSLTransport when the transport
    is (once TLS has started on it).

    Each of those is spelled out rather than forwarded by ``__getattr__``: a class with
    ``__getattr__`` makes every attribute lookup on it slower, and :meth:`write` runs for
    every client on every message.
    """

    __slots__ = (
        "transport",
        "turns",
        "_send",
        "dirty",
        "held",
        "turn",
        "shared",
        "member",
        "sharedTurn",
        "sharedStart",
        "askMember",
        "__providedBy__",
        "_peer",
        "__weakref__",
    )

    def __init__(self, transport: Any, turns: Turns, send: Any) -> None:
        #: The TCP transport written to.
        self.transport = transport
        self.turns = turns
        self._send = send
        #: The transport may have bytes queued: look before sending directly.
        self.dirty = True
        #: Writes held to the turn's end, if any.
        self.held: list[bytes] | None = None
        #: The last turn in which this connection sent directly.
        self.turn = -1
        #: The shared frames of the connection's group, if it is in one, and its member.
        self.shared: SharedFrames | None = None
        self.member: SharedMember | None = None
        #: The turn and index from which the member still needs the shared frames.
        self.sharedTurn = -1
        self.sharedStart = 0
        #: Something was written or done through this writer since its member last said it
        #: takes the shared buffer: ask again before the next one (SharedMember.takesShared).
        self.askMember = True
        #: What this writer provides (zope.interface reads it on every ``providedBy``): an
        #: ISSLTransport once TLS has started, which it does only through :meth:`startTLS`.
        #: Kept, not worked out on each question: Autobahn asks several per connection.
        self.__providedBy__ = _providedFor(transport)
        #: The peer's address, once asked for (a TCP connection's peer never changes).
        self._peer: IPv4Address | IPv6Address | None = None

    def __repr__(self) -> str:
        return f"<FastTransport of {self.transport!r}>"

    def write(self, data: bytes) -> None:
        """Send ``data`` after everything written before it."""
        self.askMember = True
        shared = self.shared
        if shared is not None and shared.frames and shared.behind(self) < len(shared.frames):
            self.catchUp()
        held = self.held
        if held is not None:
            held.append(data)
            self.turns.busyNext = True
            return
        if self.dirty:
            if not canSendDirectly(self.transport):
                self.transport.write(data)
                return
            self.dirty = False
        t = self.turns
        if t.busy or self.turn == t.turn:
            if self.turn == t.turn:
                t.busyNext = True
            self.held = [data]
            t.held.append(self)
            t.schedule()
            return
        self.turn = t.turn
        if not t.scheduled:
            t.schedule()
        if sendOrQueue(self._send, self.transport, data) != len(data):
            self.dirty = True

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Send every piece of ``data``, in one write."""
        self.write(b"".join(data))

    def memberChanged(self) -> None:
        """
        The member's answer to :meth:`SharedMember.takesShared` may have changed: ask it
        again before handing it the next shared buffer.
        """
        self.askMember = True

    def catchUp(self) -> None:
        """
        Write the shared frames of this turn that the member has not had yet, one by one
        through its ``deliver``: something else is about to be written behind them.
        """
        shared = self.shared
        if shared is None or self.member is None:
            return
        start = shared.behind(self)
        frames = shared.frames
        self.sharedTurn = shared.turn
        self.sharedStart = len(frames)
        for frame in frames[start:]:
            self.member.deliver(frame)

    def sendShared(self, data: bytes | memoryview) -> None:
        """Send the turn's shared frames (or the member's slice of them) in one write."""
        if self.dirty:
            if not canSendDirectly(self.transport):
                self.transport.write(bytes(data))
                return
            self.dirty = False
        if sendOrQueue(self._send, self.transport, data) != len(data):
            self.dirty = True

    def flush(self) -> None:
        """Send the writes held, if any, in one write."""
        held = self.held
        if held is None:
            return
        self.held = None
        data = held[0] if len(held) == 1 else b"".join(held)
        if writeNow(self.transport, data) != len(data):
            self.dirty = True

    def _leaving(self) -> None:
        # Whatever the transport does next (close, half-close, TLS), the writes held go
        # before it, and every later write asks the transport whether it may be bypassed.
        self.askMember = True
        self.catchUp()
        self.flush()
        self.dirty = True

    def loseConnection(self) -> None:
        """Close once everything written, held writes included, has been sent."""
        self._leaving()
        self.transport.loseConnection()

    def loseWriteConnection(self) -> None:
        """Half-close once everything written, held writes included, has been sent."""
        self._leaving()
        self.transport.loseWriteConnection()

    def stopProducing(self) -> None:
        """Stop the transport (it closes), after the held writes."""
        self._leaving()
        self.transport.stopProducing()

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        """Start TLS on the transport once the held writes have gone out in the clear."""
        self._leaving()
        self.transport.startTLS(contextFactory, normal)
        self.__providedBy__ = _providedFor(self.transport)

    def abortConnection(self) -> None:
        """Drop the connection now; the held writes are dropped with the transport's queue."""
        self.held = None
        self.dirty = True
        self.askMember = True
        self.transport.abortConnection()

    # -- the rest of the transport, as it is

    def getPeer(self) -> IPv4Address | IPv6Address:
        # Asked several times while a connection opens: made once.
        peer = self._peer
        if peer is None:
            peer = self._peer = self.transport.getPeer()
        return peer

    def getHost(self) -> IPv4Address | IPv6Address:
        return self.transport.getHost()  # type: ignore[no-any-return]

    def getHandle(self) -> Any:
        return self.transport.getHandle()

    def getTcpNoDelay(self) -> bool:
        return bool(self.transport.getTcpNoDelay())

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def getTcpKeepAlive(self) -> bool:
        return bool(self.transport.getTcpKeepAlive())

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.transport.setTcpKeepAlive(enabled)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    @property
    def producer(self) -> IProducer | None:
        """The producer registered with the transport, if any."""
        return self.transport.producer  # type: ignore[no-any-return]

    @property
    def streamingProducer(self) -> bool:
        return bool(self.transport.streamingProducer)

    @property
    def connected(self) -> bool:
        return bool(self.transport.connected)

    @property
    def disconnecting(self) -> bool:
        return bool(self.transport.disconnecting)

    @property
    def disconnected(self) -> bool:
        return bool(self.transport.disconnected)


_PROVIDED: Specification = implementedBy(FastTransport)
_PROVIDED_WITH_TLS: Specification = Provides(FastTransport, ISSLTransport)


def _providedFor(transport: Any) -> Specification:
    """What a writer of ``transport`` provides: its own interfaces, and ISSLTransport if
    the transport is one (TLS has started on it)."""
    return _PROVIDED_WITH_TLS if ISSLTransport.providedBy(transport) else _PROVIDED
