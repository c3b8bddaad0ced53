"""
Peer: a relay-to-all server on picows (Cython WebSocket library on asyncio).

    python benchmarks/peers/picows_server.py --port 9002 [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

clients: set[WSTransport] = set()


class Relay(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        clients.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        clients.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            payload = frame.get_payload_as_bytes()
            for client in tuple(clients):
                client.send(frame.msg_type, payload)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


async def main(port: int) -> None:
    server = await ws_create_server(lambda _: Relay(), "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(main(args.port))
    else:
        asyncio.run(main(args.port))
