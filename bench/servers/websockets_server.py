"""Baseline: a plain ``websockets`` (asyncio) server, written the way its docs show.

Echoes every message back as is (the same JSON-envelope-sized text the full stack gets);
a message starting with ``{"subject":"bench.broadcast"`` makes it send NEWS to every
connection with ``websockets.broadcast``.

    python bench/servers/websockets_server.py PORT NEWS     # prints "READY <port>"
"""

import asyncio
import sys

from websockets.asyncio.server import broadcast, serve

TRIGGER = '{"subject":"bench.broadcast"'


async def main(port, news):
    connections = set()

    async def handler(ws):
        connections.add(ws)
        try:
            async for message in ws:
                if type(message) is str and message.startswith(TRIGGER):
                    broadcast(connections, news)
                else:
                    await ws.send(message)
        finally:
            connections.discard(ws)

    async with serve(handler, "127.0.0.1", port, compression=None, backlog=4096,
                     max_size=65536) as server:
        print("READY", server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
