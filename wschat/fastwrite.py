"""
A fast path for writing frames: a plain TCP transport with nothing queued hands the bytes to
the kernel at once; only what the kernel refuses waits for the reactor. Under a heavy load
(a connection getting several frames in one reactor turn) the frames of a turn leave together,
one ``send`` per connection at the turn's end (:class:`Turns`).

Twisted's ``transport.write`` always buffers and registers the socket for writing, so every
delivery costs a buffer append, two epoll re-registrations and a ``send`` in a later reactor
turn. When the transport has nothing queued, sending straight away keeps the byte order
(nothing is ahead of us) and saves all of that.

Whether a transport still has bytes queued is not public Twisted API. That knowledge lives here
and only here: :func:`canSendDirectly` reads ``dataBuffer`` and ``_tempDataBuffer`` of
:class:`twisted.internet.tcp.Connection` (pinned by ``tests/test_fastwrite.py``), and answers
"no" whenever anything is unexpected, so the write goes through ``transport.write`` as usual:

- a transport that is not exactly a plain TCP connection (TLS, UNIX sockets, wrappers such as
  ``policies.ProtocolWrapper``, in-memory test transports);
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

from typing import Any, Literal

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorTime

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


def sendOrQueue(send: Any, transport: Any, data: bytes) -> int:
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
        transport.write(data)
        return 0
    if sent < len(data):
        transport.write(data[sent:])
    return sent


def write(transport: Any, data: bytes) -> int:
    """
    Write ``data`` to ``transport``, as much of it as the kernel takes straight away.

    Returns how many bytes went to the kernel directly; the rest (all of it, when the fast
    path does not apply) went through ``transport.write``.
    """
    if not canSendDirectly(transport):
        transport.write(data)
        return 0
    return sendOrQueue(transport.socket.send, transport, data)


class Turns:
    """
    The reactor's turns, as the fast path sees them: quiet or busy.

    In a quiet turn a frame goes to the kernel at once (:meth:`DirectWriter.write`), so the
    first client of a broadcast does not wait for the last. When one connection gets a second
    frame within a turn, that frame and the ones after it are held and leave together at the
    turn's end, one ``send`` per connection; and the next turn is busy, so all its frames are
    held. A turn in which no connection got two frames makes the next one quiet again. Under
    a light load every frame leaves at once; under a heavy one the kernel sees one ``send``
    per connection per turn.

    :meth:`endTurn` runs with ``callLater(0)``: after every event of the current poll and
    before the next poll.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        #: Counts the turns in which anything was sent or held.
        self.turn = 0
        #: Hold every frame in this turn.
        self.busy = False
        #: Some connection got two frames in this turn.
        self.busyNext = False
        self.scheduled = False
        self.held: list[DirectWriter] = []

    def schedule(self) -> None:
        """Make sure this turn ends with :meth:`endTurn`."""
        if not self.scheduled:
            self.scheduled = True
            self._clock.callLater(0, self.endTurn)

    def endTurn(self) -> None:
        """Send everything held, one write per connection, and start the next turn."""
        self.scheduled = False
        self.turn += 1
        self.busy, self.busyNext = self.busyNext, False
        held, self.held = self.held, []
        for writer in held:
            writer.flush()


_turns: Turns | None = None


def turns() -> Turns:
    """The process's turns, on the global reactor."""
    global _turns
    if _turns is None:
        from twisted.internet import reactor

        _turns = Turns(reactor)  # type: ignore[arg-type]
    return _turns


class DirectWriter:
    """
    Frames for one plain TCP connection: to the kernel at once in a quiet turn, held to the
    turn's end in a busy one (see :class:`Turns`), and to ``transport.write`` whenever the
    transport has bytes of its own queued.

    The writer remembers that the transport may have bytes queued (``dirty``) when it handed
    it any itself, and when told so by :meth:`wrote`, which whoever writes to the transport
    by another way must call (after :meth:`flush`, so that held frames go first). Only then
    does it look at the transport's buffers (:func:`canSendDirectly`). Its owner must stop
    using it once the connection is closing.
    """

    __slots__ = ("transport", "turns", "_send", "dirty", "held", "turn")

    def __init__(self, transport: Any, turns: Turns) -> None:
        self.transport = transport
        self.turns = turns
        self._send = transport.socket.send
        self.dirty = True
        self.held: list[bytes] | None = None
        self.turn = -1

    def write(self, data: bytes) -> None:
        """Send ``data`` after everything written before it."""
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

    def flush(self) -> None:
        """Send the frames held, if any, in one write."""
        held = self.held
        if held is None:
            return
        self.held = None
        data = held[0] if len(held) == 1 else b"".join(held)
        if write(self.transport, data) != len(data):
            self.dirty = True

    def wrote(self) -> None:
        """The transport was written to by another way: it may have bytes queued."""
        self.dirty = True


class FastDelivery:
    """
    Mixin for an Autobahn WebSocket protocol: :meth:`sendPreparedFast` sends a prepared frame
    through a :class:`DirectWriter` on a plain TCP connection without per-message
    compression, and every other write (``sendData``, which all of Autobahn's writes go
    through) first flushes the frames held, so frames keep their order.
    """

    transport: Any
    _perMessageCompress: Any
    send_queue: Any
    # None: not decided yet; False: this connection always takes Autobahn's own path.
    _writer: DirectWriter | Literal[False] | None = None

    def sendPreparedFast(self, frame: Any) -> None:
        """
        Send an Autobahn ``PreparedMessage``: its frame bytes as they are through the
        connection's :class:`DirectWriter`; through Autobahn's ``sendPreparedMessage`` when
        per-message compression was negotiated, the transport is not plain TCP, or
        Autobahn has queued sends of its own (chopped or sync sends).
        """
        w = self._writer
        if w:
            w.write(frame.payloadHybi)
        elif w is None:
            self._writer = self._newWriter()
            self.sendPreparedFast(frame)
        else:
            self.sendPreparedMessage(frame)  # type: ignore[attr-defined]

    def _newWriter(self) -> DirectWriter | Literal[False]:
        t = self.transport
        if self._perMessageCompress is None and type(t) in PLAIN_TCP and not self.send_queue:
            return DirectWriter(t, turns())
        return False

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        w = self._writer
        if w:
            w.flush()
            w.wrote()
        if sync or chopsize:
            # Autobahn queues these sends itself; frames must queue behind them from now on,
            # so this connection leaves the fast path for good.
            self._writer = False
        super().sendData(data, sync, chopsize)  # type: ignore[misc]

    def forgetWriter(self) -> None:
        """The connection is gone: let go of its transport."""
        self._writer = False
