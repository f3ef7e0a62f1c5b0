"""Baseline: a plain ``websockets`` (asyncio) server, written the way its docs show.

Echoes every message back as is (the same JSON-envelope-sized text the full stack gets);
a message starting with ``{"subject":"bench.broadcast"`` makes it send the news frame
(the trigger's body, see ``bench/servers/news.py``) to every connection with
``websockets.broadcast``.

    python bench/servers/websockets_server.py PORT     # prints "READY <port>"
"""

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from news import TRIGGER_S, news_for  # noqa: E402
from websockets.asyncio.server import broadcast, serve  # noqa: E402


async def main(port):
    connections = set()

    async def handler(ws):
        connections.add(ws)
        try:
            async for message in ws:
                if type(message) is str and message.startswith(TRIGGER_S):
                    broadcast(connections, news_for(message))
                else:
                    await ws.send(message)
        finally:
            connections.discard(ws)

    async with serve(handler, "127.0.0.1", port, compression=None, backlog=4096,
                     max_size=1 << 20) as server:
        print("READY", server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
