"""W5's echo component on the NATS bus: answers every message on ``echo.>`` that has a
reply subject with the same body, using wsprovider's Twisted NATS client. Runs until
stdin closes.

    python bench/servers/nats_echo.py NATS_URL      # prints "READY"
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from twisted.internet import defer, stdio, task  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402


def main(reactor, url):
    from wsprovider.nats import connect

    @defer.inlineCallbacks
    def run():
        client = yield connect(url, reactor=reactor, name="bench-echo")
        publish = client.publish

        def answer(msg):
            if msg.reply:
                publish(msg.reply, msg.data)

        yield client.subscribe("echo.>", answer)
        yield client.flush()
        print("READY", flush=True)
        done = defer.Deferred()

        class UntilEOF(Protocol):
            def connectionLost(self, reason=None):
                done.callback(None)

        stdio.StandardIO(UntilEOF(), reactor=reactor)
        yield done
        yield client.close()

    return run()


if __name__ == "__main__":
    task.react(main, [sys.argv[1]])
