"""
Peer: a relay-to-all server on Python ``websockets`` using its ``broadcast()``.

    python benchmarks/peers/websockets_server.py --port 9001 [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio

from websockets.asyncio.server import ServerConnection, broadcast, serve

clients: set[ServerConnection] = set()


async def relay(ws: ServerConnection) -> None:
    clients.add(ws)
    try:
        async for message in ws:
            broadcast(clients, message)
    finally:
        clients.discard(ws)


async def main(port: int) -> None:
    # No keepalive pings and no compression: the same work as every other server compared.
    async with serve(
        relay, "127.0.0.1", port, ping_interval=None, compression=None, max_queue=None
    ) as server:
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
