"""Baseline: a plain Autobahn (Twisted) echo server with default options (NVX when present).

Echoes every message back; a message starting with ``{"subject":"bench.broadcast"``
sends the news frame (the trigger's body, see ``bench/servers/news.py``) to every
connection (one ``sendMessage`` per connection, as the docs show).

    python bench/servers/autobahn_server.py PORT       # prints "READY <port>"
"""

import os
import sys

import txaio

txaio.use_twisted()

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from news import TRIGGER_B, news_for  # noqa: E402


class Echo(WebSocketServerProtocol):
    def onOpen(self):
        self.factory.clients.add(self)

    def onClose(self, wasClean, code, reason):
        self.factory.clients.discard(self)

    def onMessage(self, payload, isBinary):
        if not isBinary and payload.startswith(TRIGGER_B):
            news = news_for(payload)
            for c in list(self.factory.clients):
                c.sendMessage(news, False)
        else:
            self.sendMessage(payload, isBinary)


def main(port):
    factory = WebSocketServerFactory()
    factory.protocol = Echo
    factory.clients = set()
    factory.setProtocolOptions(perMessageCompressionAccept=lambda offers: None)
    listening = reactor.listenTCP(port, factory, backlog=4096, interface="127.0.0.1")
    print("READY", listening.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
