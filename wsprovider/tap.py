"""twistd wiring: ``Options`` generated from the settings table, and ``makeService``.

This is the only module that knows about twistd; everything it builds is usable from
plain Python too.
"""

from __future__ import annotations

from twisted.python import usage

from .config import SETTINGS, ConfigError, ProviderConfig
from .provider import WebSocketMessagingProvider, load_handler


def _show(value):
    if isinstance(value, tuple):
        return ",".join(value) or "(none)"
    if value is None:
        return "(none)"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _is_flag(setting) -> bool:
    return setting.default is True or setting.default is False


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("WebSocket transport for wasmcloud:messaging. Server mode accepts WebSocket clients at "
                "/ws; client mode connects out to a WebSocket server. Every option can also be given as "
                "a link-config key (e.g. --max-message-size is MAX_MESSAGE_SIZE).")

    optParameters = [
        [s.flag, None, None, f"{s.help} [default: {_show(s.default)}]"]
        for s in SETTINGS if not _is_flag(s)
    ] + [
        [s.flag, None, None, f"{s.help} (true/false) [default: {_show(s.default)}]"]
        for s in SETTINGS if _is_flag(s)
    ]

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
            raise usage.UsageError(_flagged(str(e))) from None


def _flagged(message: str) -> str:
    """Name the flag beside the key: 'MODE: ...' -> '--mode (MODE): ...'."""
    key, sep, rest = message.partition(": ")
    if sep and key.isupper():
        return f"--{key.lower().replace('_', '-')} ({key}): {rest}"
    return message


def makeService(options) -> WebSocketMessagingProvider:
    config = options["config"]
    if config.mode == "server" and config.workers > 1:
        from .workers import WorkerSupervisor, listen_address
        try:
            listen_address(config.uri)
        except ConfigError as e:
            raise usage.UsageError(_flagged(str(e))) from None
        return WorkerSupervisor(config, options["handlers"])  # the workers run the provider
    from .tuning import tune_gc
    tune_gc()  # this process runs the service: fewer cyclic-GC passes (see wsprovider/tuning.py)
    provider = WebSocketMessagingProvider(config)
    for index, (spec, handler) in enumerate(options["handler_objects"]):
        component_id = f"handler-{index}:{spec}"
        try:
            provider.register_component(component_id, handler)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        provider.receive_link_config_as_source(component_id)
    return provider
