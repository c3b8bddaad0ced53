"""
Reference: the plain Autobahn|Python broadcast server, as its own example writes it.

    python benchmarks/peers/autobahn_server.py --port 9003 [--prepared]

Without ``--prepared`` every client gets its own ``sendMessage`` (framed once per client);
with it the payload is framed once with ``prepareMessage`` and sent with
``sendPreparedMessage``. Both write through ``transport.write`` as Twisted buffers it.
"""

from __future__ import annotations

import argparse
import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


class Relay(WebSocketServerProtocol):
    factory: RelayFactory

    def onOpen(self) -> None:
        self.factory.clients[self] = None

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.clients.pop(self, None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        clients = tuple(self.factory.clients)
        if self.factory.prepared:
            frame = self.factory.prepareMessage(payload, isBinary)
            for c in clients:
                c.sendPreparedMessage(frame)
        else:
            for c in clients:
                c.sendMessage(payload, isBinary)


class RelayFactory(WebSocketServerFactory):
    protocol = Relay

    def __init__(self, prepared: bool) -> None:
        super().__init__()
        self.prepared = prepared
        self.clients: dict[Relay, None] = {}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prepared", action="store_true")
    args = parser.parse_args()
    if sys.platform == "linux":
        from twisted.internet import epollreactor  # noqa: F401  (the default already)
    reactor.listenTCP(args.port, RelayFactory(args.prepared), interface="127.0.0.1")
    reactor.run()
