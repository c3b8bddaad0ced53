"""
Closing connections: with any close code RFC 6455 gives an endpoint, and all at once at shutdown.

Autobahn's public ``sendClose`` accepts only 1000 and the application codes 3000-4999, but a
server owes its peers 1001 (going away), 1003, 1008, 1009... :func:`closeWith` is the one place
that reaches past the public API for that, to ``sendCloseFrame``, the method ``sendClose`` itself
ends in; tests/test_closing.py pins that behaviour, and without it the close is still clean, as
a 1000 with the same reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

GOING_AWAY = WebSocketProtocol.CLOSE_STATUS_CODE_GOING_AWAY  # 1001
UNSUPPORTED_DATA = WebSocketProtocol.CLOSE_STATUS_CODE_UNSUPPORTED_DATA  # 1003
POLICY_VIOLATION = WebSocketProtocol.CLOSE_STATUS_CODE_POLICY_VIOLATION  # 1008

#: The longest close reason that fits a control frame (125 bytes less the 2-byte code).
MAX_REASON_BYTES = 123


def _truncate(reason: str) -> bytes:
    return reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


def closeWith(protocol: WebSocketProtocol, code: int, reason: str) -> None:
    """
    Start the closing handshake on an open connection with ``code`` and ``reason`` (cut to
    fit a close frame). Does nothing unless the connection is open.
    """
    if protocol.state != WebSocketProtocol.STATE_OPEN:
        return
    sendCloseFrame: Any = getattr(protocol, "sendCloseFrame", None)
    if sendCloseFrame is None:
        protocol.sendClose(WebSocketProtocol.CLOSE_STATUS_CODE_NORMAL, reason)
        return
    sendCloseFrame(code=code, reasonUtf8=_truncate(reason), isReply=False)


class Leaving(Protocol):
    """What :func:`closeAll` needs of a connection."""

    def goAway(self) -> defer.Deferred[None]:
        """Start closing with 1001; the Deferred fires once the connection is gone."""

    def abort(self) -> None:
        """Drop the connection at the TCP level now."""


def closeAll(
    connections: Iterable[Leaving], timeout: float, clock: IReactorTime
) -> defer.Deferred[None]:
    """
    Tell every connection to go away, and fire once all are gone. Those still there
    ``timeout`` seconds later (a peer that never answers the close) are aborted.
    """
    connections = list(connections)
    gone = [connection.goAway() for connection in connections]
    if not gone:
        return defer.succeed(None)

    def abortTheRest() -> None:
        for connection, went in zip(connections, gone, strict=True):
            if not went.called:
                connection.abort()

    deadline = clock.callLater(timeout, abortTheRest)
    everyone = defer.DeferredList(gone, consumeErrors=True)

    def done(_: object) -> None:
        if deadline.active():
            deadline.cancel()

    return everyone.addCallback(done)
