"""
Closing a connection with any close code RFC 6455 gives an endpoint (1003, 1008, 1001...).

Autobahn's public ``sendClose`` accepts only 1000 and the application codes 3000-4999, but a
server refusing what a client did must say 1003 (unsupported data) or 1008 (policy
violation). :func:`sendCloseCode` is the one place that reaches past the public API for
that, to ``sendCloseFrame``, the method ``sendClose`` itself ends in (and Autobahn's own
1002, 1007 and 1009 closes use); ``tests/test_policy_close.py`` pins that behaviour, and
without it the close is still clean, as a 1000 with the reason.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol

#: The longest close reason that fits a control frame (125 bytes less the 2-byte code).
MAX_REASON_BYTES = 123


def _truncate(reason: str) -> bytes:
    # Cut at a character boundary: a close reason must be valid UTF-8.
    return reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


def sendCloseCode(protocol: WebSocketProtocol, code: int, reason: str) -> None:
    """
    Start the closing handshake on an open connection with ``code`` (e.g. 1008 policy
    violation), which Autobahn's ``sendClose`` refuses. Does nothing unless the connection
    is open. The peer has Autobahn's close handshake timeout to answer, after which the TCP
    connection is dropped.
    """
    if protocol.state != WebSocketProtocol.STATE_OPEN:
        return
    sendCloseFrame: Any = getattr(protocol, "sendCloseFrame", None)
    if sendCloseFrame is None:
        protocol.sendClose(WebSocketProtocol.CLOSE_STATUS_CODE_NORMAL, reason)
        return
    sendCloseFrame(code=code, reasonUtf8=_truncate(reason), isReply=False)
