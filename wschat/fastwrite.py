"""
A fast path for writing a frame: a plain TCP transport with nothing queued hands the bytes to
the kernel at once; only what the kernel refuses waits for the reactor.

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


def sendPrepared(protocol: Any, frame: Any) -> None:
    """
    Send an Autobahn ``PreparedMessage`` on ``protocol`` through :func:`write`.

    The frame bytes are only usable as they are when no per-message compression was
    negotiated and Autobahn has nothing queued of its own (its chopped/sync sends); otherwise
    ``sendPreparedMessage`` does the work.
    """
    if protocol._perMessageCompress is None and not protocol.send_queue:
        write(protocol.transport, frame.payloadHybi)
    else:
        protocol.sendPreparedMessage(frame)
