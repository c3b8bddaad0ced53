"""
A fast path for writing frames: a plain TCP transport with nothing queued hands the bytes to
the kernel in the same reactor turn, all the frames of that turn for one connection in one
``send``; only what the kernel refuses waits for the reactor.

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

from typing import Any

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


def write(transport: Any, data: bytes) -> int:
    """
    Write ``data`` to ``transport``, as much of it as the kernel takes straight away.

    Returns how many bytes went to the kernel directly; the rest (all of it, when the fast
    path does not apply) went through ``transport.write``.
    """
    if not canSendDirectly(transport):
        transport.write(data)
        return 0
    try:
        sent: int = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # A reset or broken pipe: Twisted's own write path notices it and closes the
        # connection as it always does.
        transport.write(data)
        return 0
    if sent < len(data):
        transport.write(data[sent:])
    return sent


class Coalescer:
    """
    Frames for one connection within one reactor turn leave in one ``send``.

    :meth:`add` keeps a frame for a transport that could take it directly; the first one in
    a turn schedules :meth:`flush` with ``callLater(0)``, which runs after every event of the
    current poll and before the next, so a frame waits for nothing but the rest of this turn.
    A transport with bytes queued (a slow reader, a paused producer) is not coalesced: its
    frames go to ``transport.write`` at once, where Twisted buffers and accounts for them.

    Whoever writes to a transport by another way must call :meth:`flushOne` first, or a
    later write would overtake the frames held here.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.pending: dict[Any, list[bytes]] = {}
        self._scheduled = False

    def add(self, transport: Any, data: bytes) -> None:
        parts = self.pending.get(transport)
        if parts is not None:
            parts.append(data)
        elif canSendDirectly(transport):
            self.pending[transport] = [data]
            if not self._scheduled:
                self._scheduled = True
                self._clock.callLater(0, self.flush)
        else:
            transport.write(data)

    def flushOne(self, transport: Any) -> None:
        """Send what is held for ``transport`` now."""
        parts = self.pending.pop(transport, None)
        if parts:
            write(transport, parts[0] if len(parts) == 1 else b"".join(parts))

    def flush(self) -> None:
        """Send everything held, one write per transport."""
        self._scheduled = False
        pending, self.pending = self.pending, {}
        for transport, parts in pending.items():
            write(transport, parts[0] if len(parts) == 1 else b"".join(parts))


_coalescer: Coalescer | None = None


def coalescer() -> Coalescer:
    """The process's coalescer, on the global reactor."""
    global _coalescer
    if _coalescer is None:
        from twisted.internet import reactor

        _coalescer = Coalescer(reactor)  # type: ignore[arg-type]
    return _coalescer


class FastDelivery:
    """
    Mixin for an Autobahn WebSocket protocol: :meth:`sendPreparedFast` sends a prepared frame
    through the coalescer and the direct path, and every other write (``sendData``, which all
    of Autobahn's writes go through) first flushes what the coalescer holds, so frames keep
    their order.
    """

    transport: Any
    _perMessageCompress: Any
    send_queue: Any
    coalescer: Coalescer | None = None

    def sendPreparedFast(self, frame: Any) -> None:
        """
        Send an Autobahn ``PreparedMessage``: its frame bytes as they are when no per-message
        compression was negotiated and Autobahn queues nothing of its own (chopped or sync
        sends); through ``sendPreparedMessage`` otherwise.
        """
        if self._perMessageCompress is None and not self.send_queue:
            c = self.coalescer
            if c is None:
                c = self.coalescer = coalescer()
            # Inlined Coalescer.add for the common case: this turn already holds frames.
            parts = c.pending.get(self.transport)
            if parts is not None:
                parts.append(frame.payloadHybi)
            else:
                c.add(self.transport, frame.payloadHybi)
        else:
            self.sendPreparedMessage(frame)  # type: ignore[attr-defined]

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        c = self.coalescer
        if c is not None and c.pending:
            c.flushOne(self.transport)
        super().sendData(data, sync, chopsize)  # type: ignore[misc]
