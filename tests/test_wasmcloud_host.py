"""A real wasmCloud 2.x host (``wash dev``) with the tiny echo component, on a real NATS.

nats-py is the independent NATS peer. Its calls run in a reactor thread, each with its own
asyncio loop (``asyncio.run``), so trial's reactor is never blocked.

Each test gets its own nats-server and host: starting both takes about 0.3-0.5 s, and trial's
janitor kills processes that outlive a TestCase class anyway.
"""

import asyncio
import statistics
import time

import nats
from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks
from twisted.python import log
from twisted.trial import unittest

from tests.natsserver import NatsServer
from tests import wasmhost
from tests.wasmhost import (
    ECHO_PREFIX, WasmCloudDevHost, WasmHostError, WasmToolMissing, find_tool)

SUBJECT = "wc.echo"


def in_asyncio(coro_fn, *args):
    """Run ``coro_fn(*args)`` on a fresh asyncio loop in a reactor thread; a Deferred."""
    return threads.deferToThread(lambda: asyncio.run(coro_fn(*args)))


async def request(url, subject, body, timeout=10):
    nc = await nats.connect(url)
    try:
        return (await nc.request(subject, body, timeout=timeout)).data
    finally:
        await nc.close()


def pattern(n):
    """n bytes covering every byte value, not starting with b"to:"."""
    return bytes((i * 7 + 3) % 256 for i in range(n))


class WasmCloudHostTests(unittest.TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self):
        self.nats = NatsServer(self)
        yield self.nats.start()
        self.host = WasmCloudDevHost(self.nats.url, [SUBJECT], workdir=self.mktemp())
        yield self.host.start()
        self.addCleanup(self.host.stop)
        log.msg(f"wash dev ready in {self.host.start_seconds:.3f}s "
                f"(component build {self.host.build_seconds:.3f}s)")

    @inlineCallbacks
    def test_request_echo(self):
        """A core-NATS request to the component's subject is answered with "echo: <body>"."""
        reply = yield in_asyncio(request, self.nats.url, SUBJECT, b"hello")
        self.assertEqual(reply, b"echo: hello")

    @inlineCallbacks
    def test_binary_bodies_byte_exact(self):
        """Bodies of 0, 1, 1000 and 100000 arbitrary bytes come back byte-exact."""
        async def run(url):
            nc = await nats.connect(url)
            try:
                return [(await nc.request(SUBJECT, pattern(n), timeout=10)).data
                        for n in (0, 1, 1000, 100000)]
            finally:
                await nc.close()

        replies = yield in_asyncio(run, self.nats.url)
        for n, reply in zip((0, 1, 1000, 100000), replies):
            self.assertEqual(len(reply), len(ECHO_PREFIX) + n)
            self.assertEqual(reply, ECHO_PREFIX + pattern(n), f"body of {n} bytes")

    @inlineCallbacks
    def test_component_publishes_to_subject(self):
        """``to:<subject>:<text>`` makes the component publish <text> to <subject>: with a
        reply-to (the echo follows the forward) and as a plain publish with no reply-to."""
        async def run(url):
            nc = await nats.connect(url)
            try:
                sub = await nc.subscribe("ws.session.a1b2")
                await nc.flush()
                echo = await nc.request(SUBJECT, b"to:ws.session.a1b2:hello \x00\xffsession",
                                        timeout=10)
                first = await sub.next_msg(timeout=10)
                await nc.publish(SUBJECT, b"to:ws.session.a1b2:no reply-to")
                second = await sub.next_msg(timeout=10)
                await sub.unsubscribe()
                return echo.data, [(m.subject, m.data, m.reply, m.headers)
                                   for m in (first, second)]
            finally:
                await nc.close()

        echo, forwarded = yield in_asyncio(run, self.nats.url)
        self.assertEqual(echo, b"echo: to:ws.session.a1b2:hello \x00\xffsession")
        self.assertEqual(forwarded, [
            ("ws.session.a1b2", b"hello \x00\xffsession", "", None),
            ("ws.session.a1b2", b"no reply-to", "", None),
        ])

    @inlineCallbacks
    def test_sequential_round_trips(self):
        """50 sequential request/reply round trips through the host all come back right.

        Their timing is logged for the curious; speed is measured in bench/, not asserted here.
        """
        async def run(url):
            nc = await nats.connect(url)
            try:
                times = []
                for i in range(50):
                    began = time.perf_counter()
                    reply = await nc.request(SUBJECT, b"rtt %d" % i, timeout=10)
                    times.append(time.perf_counter() - began)
                    assert reply.data == b"echo: rtt %d" % i, reply.data
                return times
            finally:
                await nc.close()

        times = yield in_asyncio(run, self.nats.url)
        median = statistics.median(times)
        log.msg(f"round trip over 50 requests: median {median * 1000:.1f} ms, "
                f"max {max(times) * 1000:.1f} ms")
        self.assertEqual(len(times), 50)

    @inlineCallbacks
    def test_stop(self):
        """stop() ends the process; its subscription is gone afterwards (no responders)."""
        yield self.host.stop()
        self.assertFalse(self.host.running)
        with self.assertRaises(nats.errors.NoRespondersError):
            yield in_asyncio(request, self.nats.url, SUBJECT, b"anyone?", 2)
        yield self.host.stop()  # idempotent


class StartFailureTests(unittest.TestCase):
    timeout = 60

    @inlineCallbacks
    def test_exit_before_ready(self):
        """wash dev exiting early (here: NATS refuses the connection) fails start() with
        wash's own explanation, and leaves no process behind."""
        nats_server = NatsServer(self)  # only for a port nobody listens on
        host = WasmCloudDevHost(nats_server.url, [SUBJECT], workdir=self.mktemp())
        error = yield self.assertFailure(host.start(), WasmHostError)
        self.assertIn("exited before it was ready", str(error))
        self.assertIn("failed to connect to NATS", str(error))
        self.assertFalse(host.running)

    @inlineCallbacks
    def test_missing_tool_fails_start(self):
        """start() fails (no skip) with the install hint when a tool is missing."""
        def missing(name):
            raise WasmToolMissing(f"`{name}` was not found: pip install '.[test]'")
        self.patch(wasmhost, "find_tool", missing)
        host = WasmCloudDevHost("nats://127.0.0.1:1", [SUBJECT], workdir=self.mktemp())
        error = yield self.assertFailure(host.start(), WasmToolMissing)
        self.assertIn("pip install '.[test]'", str(error))
        self.assertIsNone(host.pid)


class ToolLookupTests(unittest.TestCase):
    def test_found(self):
        """The tools the fixture needs resolve to files."""
        self.assertTrue(find_tool("wash"))
        self.assertTrue(find_tool("wasm-tools"))

    def test_missing_tool_message(self):
        """A missing tool is an error that says how to install it (never a skip)."""
        error = self.assertRaises(WasmToolMissing, find_tool, "wash-no-such-tool")
        self.assertIn("pip install '.[test]'", str(error))
