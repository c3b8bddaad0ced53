"""
Closing a connection with a protocol-level close code (1001, 1003, 1008, 1009, ...).

Autobahn's public ``sendClose`` lets an application use only 1000 and 3000-4999; the codes a
server owes its peers under RFC 6455 section 7.4.1 go through ``sendCloseFrame``, which Autobahn
calls internal. This module is the one place that relies on it (pinned by tests/test_closing.py);
without it, the close falls back to 1000 with the same reason text.
"""

from __future__ import annotations

from autobahn.websocket.protocol import WebSocketProtocol

GOING_AWAY = WebSocketProtocol.CLOSE_STATUS_CODE_GOING_AWAY  # 1001
UNSUPPORTED_DATA = WebSocketProtocol.CLOSE_STATUS_CODE_UNSUPPORTED_DATA  # 1003
POLICY_VIOLATION = WebSocketProtocol.CLOSE_STATUS_CODE_POLICY_VIOLATION  # 1008
MESSAGE_TOO_BIG = WebSocketProtocol.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG  # 1009
TRY_AGAIN_LATER = 1013


def closeWith(protocol: WebSocketProtocol, code: int, reason: str) -> None:
    """
    Start the closing handshake with ``code`` and ``reason`` (truncated to fit a close frame).

    Does nothing for a connection that is already closing or closed.
    """
    if protocol.state != WebSocketProtocol.STATE_OPEN:
        return
    reasonUtf8 = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    sendCloseFrame = getattr(protocol, "sendCloseFrame", None)
    if sendCloseFrame is None:
        protocol.sendClose(WebSocketProtocol.CLOSE_STATUS_CODE_NORMAL, reasonUtf8.decode())
    else:
        sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=False)
