"""Baseline: a plain ``picows`` server (Cython WebSocket for asyncio), written the way its
README shows: the core API, a ``WSListener`` whose ``on_ws_frame`` sends the payload back
as a memoryview, on the default asyncio loop.

Echoes every frame back (the load generator sends whole, unfragmented messages); a text
message starting with ``{"subject":"bench.broadcast"`` makes it send the news frame to
every connection instead (one ``transport.send`` per connection), with the trigger's body
(see ``bench/servers/news.py``).

    python bench/servers/picows_server.py PORT      # prints "READY <port>"
"""

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from news import TRIGGER_B, news_for  # noqa: E402
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server  # noqa: E402

TEXT = WSMsgType.TEXT
CLOSE = WSMsgType.CLOSE


async def main(port):
    transports = set()

    class Echo(WSListener):
        def on_ws_connected(self, transport: WSTransport):
            transports.add(transport)

        def on_ws_disconnected(self, transport: WSTransport):
            transports.discard(transport)

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame):
            kind = frame.msg_type
            if kind == CLOSE:
                transport.send_close(frame.get_close_code(), frame.get_close_message())
                transport.disconnect()
            elif kind == TEXT and frame.get_payload_as_bytes()[:len(TRIGGER_B)] == TRIGGER_B:
                news = news_for(frame.get_payload_as_bytes())
                for t in list(transports):
                    t.send(TEXT, news)
            else:
                transport.send(kind, frame.get_payload_as_memoryview())

    def listener_factory(request: WSUpgradeRequest):
        return Echo()

    server = await ws_create_server(listener_factory, "127.0.0.1", port, backlog=4096)
    print("READY", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
