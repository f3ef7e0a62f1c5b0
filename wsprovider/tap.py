"""twistd wiring: ``Options`` generated from the settings table, and ``makeService``.

This is the only module that knows about twistd; everything it builds is usable from
plain Python too.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python import usage

from .config import CLIENT, ESSENTIALS, GROUPS, SETTINGS, ConfigError, ProviderConfig
from .provider import WebSocketMessagingProvider, load_handler
from .startup import flagged


def _show(value):
    if isinstance(value, tuple):
        return ",".join(value) or "(none)"
    if value is None:
        return "(none)"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _is_flag(setting) -> bool:
    return setting.default is True or setting.default is False


SYNOPSIS = """\
WebSocket transport for wasmcloud:messaging. Server mode (the default) accepts WebSocket
clients and browsers; client mode connects out to a WebSocket server. Every option is
also a link-config key: --max-message-size is MAX_MESSAGE_SIZE (docs/settings.rst).

Examples:
  server, embedded lattice, echo component (open http://127.0.0.1:8080/ for the console):
    twistd -n wsprovider --handler wsprovider.handlers:echo --subscriptions 'echo.>'
  server on another port, every interface, with a token:
    twistd -n wsprovider --uri 0.0.0.0:9000 --auth-token "$TOKEN"
  client mode: connect out, deliver what the server sends to a handler:
    twistd -n wsprovider --mode=client --uri ws://example.com:8080/feed --handler wsprovider.handlers:echo
  on a NATS bus (wasmCloud 2.x components reach sessions at _ws.session.<id>):
    twistd -n wsprovider --nats nats://127.0.0.1:4222
  wasmCloud 2.x: `wash dev` on the same NATS runs your component; it reaches a browser by
  publishing to the session's address (docs/nats.rst walks through it, with an echo component):
    HOME=/tmp/echo/home wash -C /tmp/echo/proj --non-interactive dev
"""

# Options that are not rows of the settings table, and the group they are listed in.
_EXTRA_GROUPS = {"handler": ESSENTIALS, "nats": ESSENTIALS, "header": CLIENT}
HELP_HINT = "see `twistd wsprovider --help`"
_log = Logger(namespace="wsprovider")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = SYNOPSIS

    optParameters = [
        [s.flag, None, None, f"{s.help} [default: {_show(s.default)}]"]
        for s in SETTINGS if not _is_flag(s)
    ] + [
        [s.flag, None, None, f"{s.help} (true/false) [default: {_show(s.default)}]"]
        for s in SETTINGS if _is_flag(s)
    ]

    _usage_failed = False

    def parseOptions(self, options=None):
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            # twistd prints str(options) before the error: make that short, and point at --help.
            self._usage_failed = True
            raise usage.UsageError(f"{e}\n{HELP_HINT}") from None

    def getUsage(self, width=None):
        if self._usage_failed:
            return ""
        return grouped_help(width or 100)

    def __init__(self):
        usage.Options.__init__(self)
        self["handlers"] = []
        self["headers"] = {}

    def opt_handler(self, spec):
        """module:attr of a Python handler (an IMessageHandler, or a callable taking the
        service's IMessagingConsumer and returning one). Repeatable. Example:
        wsprovider.handlers:echo"""
        self["handlers"].append(spec)

    def opt_nats(self, url):
        """NATS server URL(s), comma-separated: use the NATS lattice (same as --nats-url,
        NATS_URL). Example: nats://127.0.0.1:4222"""
        self["nats-url"] = url

    def opt_wasmcloud_host_data(self, source):
        """Run as a wasmCloud 1.x capability provider: read the HostData line from SOURCE
        ('-' for stdin, as the host writes it; or a file). Other options are ignored: the
        config comes from HostData and link definitions (see docs/wasmcloud1.rst)."""
        self["wasmcloud-host-data"] = source

    def opt_header(self, spec):
        """Client mode: an HTTP header for the upgrade request, as Name=value. Repeatable
        (same as the HEADER_<name> key)."""
        name, sep, value = spec.partition("=")
        if not sep or not name.strip():
            raise usage.UsageError(f"--header {spec!r}: expected Name=value")
        self["headers"][name.strip()] = value

    def postOptions(self):
        raw = {s.key: self[s.flag] for s in SETTINGS if self[s.flag] is not None}
        for name, value in self["headers"].items():
            raw["HEADER_" + name] = value
        try:
            self["config"] = ProviderConfig.from_mapping(raw)
            from .endpoints import server_endpoint_description
            if self["config"].mode == "server":
                server_endpoint_description(self["config"].uri)
                from .auth import Authenticator
                Authenticator.from_config(self["config"])  # key files and algorithms, checked now
            elif not self["config"].uri:
                raise ConfigError("URI: client mode needs the WebSocket URL to connect to, e.g. --uri ws://127.0.0.1:8080/ws")
            self["handler_objects"] = [(spec, load_handler(spec)) for spec in self["handlers"]]
        except ConfigError as e:
            raise usage.UsageError(flagged(str(e))) from None


def grouped_help(width: int = 100) -> str:
    """The synopsis and examples, then the options grouped by concern, essentials first."""
    import textwrap
    docs = {name: " ".join((getattr(Options, "opt_" + name).__doc__ or "").split()) for name in _EXTRA_GROUPS}
    rows = {group: [] for group in GROUPS}
    for name, group in _EXTRA_GROUPS.items():
        rows[group].append((f"--{name}=", docs[name]))
    for s in SETTINGS:
        kind = " (true/false)" if _is_flag(s) else ""
        rows[s.group].append((f"--{s.flag}=", f"{' '.join(s.help.split())}{kind} [default: {_show(s.default)}]"))
    out = [SYNOPSIS]
    indent = " " * 6
    for group, title in GROUPS.items():
        if not rows[group]:
            continue
        out.append(f"{title}:")
        for flag, text in rows[group]:
            out.append(f"  {flag}")
            out.extend(textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent))
        out.append("")
    out.append("  --help                show this help;  --version  show the version")
    return "\n".join(out) + "\n"


def makeService(options) -> WebSocketMessagingProvider:
    if options.get("wasmcloud-host-data"):
        from .wasmcloud1.hostdata import HostDataError
        from .wasmcloud1.main import make_service
        try:
            return make_service(options["wasmcloud-host-data"])
        except (HostDataError, OSError) as e:
            raise usage.UsageError(f"--wasmcloud-host-data: {e}") from None
    config = options["config"]
    if config.mode == "server" and config.workers > 1:
        from .workers import WorkerSupervisor, listen_address
        try:
            listen_address(config.uri)
        except ConfigError as e:
            raise usage.UsageError(flagged(str(e))) from None
        return WorkerSupervisor(config, options["handlers"])  # the workers run the provider
    from .tuning import tune_gc
    tune_gc()  # this process runs the service: fewer cyclic-GC passes (see wsprovider/tuning.py)
    try:
        provider = WebSocketMessagingProvider(config)
    except ConfigError as e:
        _exit_now(flagged(str(e)))
    except Exception:
        # The service tree parses the listening endpoint (TLS files included) as it is built.
        from twisted.python.failure import Failure
        from .startup import describe_start_failure
        why = describe_start_failure(Failure(), config)
        if why is None:
            raise
        _exit_now(why)
    for index, (spec, handler) in enumerate(options["handler_objects"]):
        component_id = f"handler-{index}:{spec}"
        try:
            provider.register_component(component_id, handler)
        except Exception as e:  # a handler factory that fails is a bad --handler, not a crash
            _exit_now(f"--handler {spec!r}: could not create the handler: {e}; fix the handler or remove "
                      f"this --handler")
        provider.receive_link_config_as_source(component_id)
    from twisted.internet import reactor
    reactor.callWhenRunning(_exit_if_start_fails, reactor, provider)
    return provider


def _exit_now(line: str):
    """Before the reactor runs: one line on stderr and exit status 1 (no traceback, no help)."""
    import sys
    print(f"wsprovider could not start: {line}", file=sys.stderr)
    raise SystemExit(1)


def _exit_if_start_fails(reactor, provider):
    """Once the reactor runs: if the service cannot start (port in use, bad TLS key, ...) the
    provider logs one line naming the setting (wsprovider.startup); stop the reactor and make
    the process exit with status 1 instead of running on without a listener."""
    def failed(failure):
        _exit_status_at_end(1)
        reactor.stop()
    ready = provider.when_ready()
    ready.addCallback(lambda _: _wait_for_nats(reactor, provider))
    ready.addErrback(failed)


def _wait_for_nats(reactor, provider):
    """NATS_STARTUP_TIMEOUT_SEC > 0: the first NATS connection must come within that time, or
    the process exits naming NATS_URL (instead of running on, disconnected)."""
    from twisted.internet import defer

    from .interfaces import IConnectionState
    from .startup import describe_nats_unreachable
    config = provider.config
    timeout = config.nats_startup_timeout_sec
    if not timeout or not IConnectionState.providedBy(provider.lattice) or provider.lattice.connected:
        return None
    waiting = provider.lattice.when_connected()
    waiting.addErrback(lambda _: None)  # stopped meanwhile: the timeout below decides
    outcome = defer.Deferred()

    def connected(_):
        if not outcome.called:
            timer.cancel()
            outcome.callback(None)

    def too_late():
        if not outcome.called:
            _log.critical("wsprovider could not start: {why}", why=describe_nats_unreachable(config))
            outcome.errback(RuntimeError("NATS not reached in time"))
    timer = reactor.callLater(timeout, too_late)
    waiting.addCallback(connected)
    return outcome


def _exit_status_at_end(status: int):
    """twistd has no exit status of its own: set ours once twistd has finished (pidfile removed,
    logs flushed) from an atexit hook, the last thing the interpreter runs."""
    import atexit
    import os
    import sys

    def leave():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)
    atexit.register(leave)
