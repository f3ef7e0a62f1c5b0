"""The full stack under test: ``WebSocketMessagingProvider`` in server mode, as shipped.

Envelope codec, permissions, routing on the lattice, a Python echo component
(``wsprovider.handlers:echo`` linked to ``echo.>``) and a bench-only component on
``bench.broadcast`` that calls ``provider.broadcast_to_clients`` with the body it got,
on subject ``bench.news``. ``MAX_MESSAGE_SIZE`` is 1 MiB (the baselines' limit too).

    python bench/servers/wsprovider_server.py PORT [NATS_URL]   # prints "READY <port>"

With NATS_URL the lattice is the NATS lattice (W5) and the echo component is not
linked here: an echo responder runs elsewhere on the bus.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from twisted.internet import reactor  # noqa: E402  (the default reactor, as twistd uses)
from zope.interface import implementer  # noqa: E402

from wsprovider import BrokerMessage, IMessageHandler, WebSocketMessagingProvider  # noqa: E402
from wsprovider.handlers import echo  # noqa: E402


@implementer(IMessageHandler)
class Broadcaster:
    def __init__(self, provider):
        self.provider = provider

    def handle_message(self, msg):
        self.provider.broadcast_to_clients(BrokerMessage("bench.news", msg.body))


def main(port, nats_url=None):
    # Like twistd: log events are written out (here to stderr, which run.py sends to a
    # file) instead of piling up in the start-up buffer.
    from twisted.logger import globalLogBeginner, textFileLogObserver
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    # MAX_MESSAGE_SIZE 1 MiB (default 64 KiB), as the baselines' limits: a 64 KiB echo's
    # reply envelope is 31 bytes larger than the 64 KiB frame.
    config = {"MODE": "server", "URI": f"tcp:{port}:interface=127.0.0.1:backlog=4096",
              "MAX_MESSAGE_SIZE": str(1 << 20)}
    if nats_url:
        config["NATS_URL"] = nats_url  # W5: the NATS lattice
    provider = WebSocketMessagingProvider.from_config(config, reactor=reactor)
    provider.startService()
    if not nats_url:
        provider.receive_link_config_as_source("echo", {"SUBSCRIPTIONS": "echo.>"}, handler=echo)
    provider.receive_link_config_as_source("broadcaster", {"SUBSCRIPTIONS": "bench.broadcast"},
                                           handler=Broadcaster(provider))

    def ready(p):
        from wsprovider.tuning import tune_gc
        tune_gc()  # as the twistd plugin does (wsprovider.tap.makeService)
        print("READY", p.port, flush=True)

    def failed(f):
        print("FAILED", f.getErrorMessage(), flush=True)
        reactor.stop()

    provider.when_ready().addCallbacks(ready, failed)
    reactor.addSystemEventTrigger("before", "shutdown", provider.stopService)
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
