"""
Closing a WebSocket connection with any RFC 6455 close code, such as 1003, 1008 or 1001.

Autobahn's public ``sendClose`` accepts only 1000 and 3000-4999: codes an application
chooses freely. The codes RFC 6455 defines for a server refusing what a client did (1003
unsupported data, 1008 policy violation, 1001 going away) go through
``sendCloseFrame``, which Autobahn uses for its own 1002, 1007 and 1009 closes. That
method is not part of ``IWebSocketChannel``, so it is confined here, and
``tests/test_closing.py`` pins what it does. Should a later Autobahn drop it, the fallback
keeps the meaning in the private-use range (1008 becomes 4008) through ``sendClose``.
"""

from __future__ import annotations

from autobahn.websocket.protocol import WebSocketProtocol

#: The most UTF-8 bytes a close reason may have (a control frame payload is at most 125
#: bytes, two of them the code).
MAX_REASON_BYTES = 123


def closeWith(protocol: WebSocketProtocol, code: int, reason: str) -> None:
    """
    Start the closing handshake with ``code`` and ``reason``, if the connection is open.

    The peer has Autobahn's close handshake timeout to answer, after which the TCP
    connection is dropped. On a connection that is not open, does nothing.
    """
    if protocol.state != WebSocketProtocol.STATE_OPEN:
        return
    # Cut at a character boundary: a close reason must be valid UTF-8.
    reasonUtf8 = reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode()
    sendCloseFrame = getattr(protocol, "sendCloseFrame", None)
    if sendCloseFrame is None:
        protocol.sendClose(4000 + code % 1000, reasonUtf8.decode("utf-8"))
        return
    sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=False)
