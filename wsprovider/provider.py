"""``WebSocketMessagingProvider``: the seed's API, as a Twisted service.

It owns the lattice, the WebSocket side (server factory + site, or client links) and the
link table: components linked as *targets* use the consumer (publish/request), components
linked as *sources* receive messages as handlers. It is a ``MultiService`` so it can be
embedded in any Twisted application; the twistd plugin only wires it.
"""

from __future__ import annotations

import importlib
from typing import Mapping

import txaio
from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._defer import mirror
from .config import ConfigError, ProviderConfig
from .endpoints import server_endpoint_description
from .interfaces import IMessageHandler, IMessagingConsumer
from .lattice.local import LocalLattice
from .message import BrokerMessage, MessagingError, NotConnected

txaio.use_twisted()  # Autobahn's logging helpers need a framework before any protocol exists


def nvx_active() -> bool:
    """True if Autobahn's NVX (CFFI-accelerated UTF-8 validation and masking) is in use."""
    try:
        from autobahn.websocket import USES_NVX
    except ImportError:
        return False
    return bool(USES_NVX)


@implementer(IMessagingConsumer)
class LinkedConsumer:
    """The consumer one linked component uses; carries that link's config."""

    def __init__(self, provider, component_id: str, config: ProviderConfig):
        self._provider = provider
        self.component_id = component_id
        self.config = config

    def publish(self, msg):
        return self._provider.publish(msg, self.component_id)

    def request(self, subject, body, timeout_ms):
        return self._provider.request(subject, body, timeout_ms, self.component_id)


class WebSocketMessagingProvider(service.MultiService):
    """WebSocket transport for ``wasmcloud:messaging``.

    :param config: a ``ProviderConfig`` (see ``from_config`` for a plain dict).
    :param lattice: an ``ILattice``; default: a new in-process ``LocalLattice``.
    """

    log = Logger()

    def __init__(self, config: ProviderConfig, lattice=None, reactor=None):
        service.MultiService.__init__(self)
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self._client_mode = config.mode == "client"  # read per published message
        if lattice is None and config.nats_url:
            from .lattice.nats import NatsLattice
            lattice = NatsLattice.from_config(config, reactor, name=f"wsprovider {config.instance_id or ''}".strip())
        self.lattice = lattice if lattice is not None else LocalLattice(reactor)
        self.cluster = None       # server mode: the cross-instance session directory
        self.components: dict[str, object] = {}
        self.consumer_links: dict[str, LinkedConsumer] = {}
        self.handler_links: dict[str, list] = {}
        self._source_configs: dict[str, ProviderConfig] = {}  # client mode: handler links' configs
        self.ws = None            # server factory or client link manager: ISessionRegistry + IMessagingConsumer
        self.listening_port = None
        self.site = None
        self.metrics = None       # server mode: metrics.ProviderMetrics (per-provider registry)
        self._ready = None

    @classmethod
    def from_config(cls, config: Mapping[str, str] | ProviderConfig | None = None, lattice=None,
                    reactor=None) -> "WebSocketMessagingProvider":
        """Build from a seed-style dict (``{"MODE": "server", "URI": "0.0.0.0:8080"}``).

        Raises ``ConfigError`` naming the bad key and the accepted values.
        """
        if not isinstance(config, ProviderConfig):
            config = ProviderConfig.from_mapping(config or {})
        return cls(config, lattice=lattice, reactor=reactor)

    # -- lifecycle ----------------------------------------------------------------------

    def startService(self):
        service.MultiService.startService(self)
        # Autobahn logs every frame at debug level; that costs time on the hot path.
        if txaio.get_global_log_level() in ("debug", "trace"):
            txaio.set_global_log_level("info")
        if not nvx_active():
            self.log.warn("Autobahn's NVX acceleration is not active: text frames will be about 30x slower "
                          "to validate. Install autobahn from a wheel with its CFFI extension, or set "
                          "AUTOBAHN_USE_NVX=1 and make sure cffi is installed.")
        self._ready = self._start()
        self._ready.addErrback(self._start_failed)

    def _start_failed(self, failure):
        from .startup import describe_start_failure
        why = describe_start_failure(failure, self.config)  # one line naming the setting to change
        if why is None:
            self.log.failure("wsprovider could not start", failure)
        else:
            self.log.critical("wsprovider could not start: {why}", why=why)
        return failure

    def when_ready(self):
        """Deferred firing when the service listens (server) or has started its links (client)."""
        if self._ready is None:
            return defer.fail(MessagingError("the provider is not started; call startService() first"))
        return mirror(self._ready)

    def start_server_if_needed(self):
        """Seed name: start the service if it is not running. Deferred firing when ready."""
        if not self.running:
            self.startService()
        return self.when_ready()

    @defer.inlineCallbacks
    def _start(self):
        if not self._client_mode:
            from .server import MessagingServerFactory
            from .web import make_site
            start_lattice = getattr(self.lattice, "start", None)
            if start_lattice is not None:
                yield start_lattice()  # NATS: connects in the background, forever
            self.ws = MessagingServerFactory(self.lattice, self.config, reactor=self.reactor)
            yield self.ws.start()
            from .lattice.cluster import ClusterDirectory
            self.cluster = ClusterDirectory(self.ws, self.lattice, self.config, self.reactor)
            yield self.cluster.start()
            from .metrics import ProviderMetrics
            self.metrics = ProviderMetrics(self)  # a registry per provider
            self.ws.request_latency = self.metrics.request_latency
            self.site = make_site(self.ws, self.config.ws_path, provider=self, metrics=self.metrics)
            endpoint = endpoints.serverFromString(self.reactor, server_endpoint_description(self.config.uri))
            self.listening_port = yield endpoint.listen(self.site)
            address = self.listening_port.getHost()
            self.log.info("wsprovider listening for WebSocket clients on {host}:{port}/{path} (lattice: {lattice})",
                          host=getattr(address, "host", address), port=getattr(address, "port", ""),
                          path=self.config.ws_path, lattice=getattr(self.lattice, "name", "custom"))
        else:
            from .client import ClientLinks
            start_lattice = getattr(self.lattice, "start", None)
            if start_lattice is not None:
                yield start_lattice()
            self.ws = ClientLinks(self.lattice, self.config, reactor=self.reactor)
            yield self.ws.start()
            # Links made before the service started get their connections now.
            for component_id, consumer in self.consumer_links.items():
                self.ws.attach(client_owner("target", component_id), consumer.config)
            for component_id, link_config in self._source_configs.items():
                self.ws.attach(client_owner("source", component_id), link_config)
        return self

    @defer.inlineCallbacks
    def stopService(self):
        # Graceful drain: stop accepting first; then sessions are told 1001 (idle ones at once,
        # those with requests in flight once answered, at most DRAIN_TIMEOUT_SEC later); handler
        # links stay subscribed meanwhile so that the in-flight requests can be answered.
        if self.listening_port is not None:
            port, self.listening_port = self.listening_port, None
            yield port.stopListening()
        if self.ws is not None:
            drain = getattr(self.ws, "drain", None)
            yield drain(self.config.drain_timeout_sec) if drain is not None else self.ws.stop()
        yield defer.maybeDeferred(service.MultiService.stopService, self)
        for links in list(self.handler_links.values()):
            for sub in links:
                yield sub.unsubscribe()
        self.handler_links.clear()
        if self.cluster is not None:
            yield self.cluster.stop()
        yield self.lattice.close()

    def shutdown(self):
        """Seed name: stop everything. Deferred."""
        return defer.maybeDeferred(self.stopService) if self.running else defer.succeed(None)

    @property
    def port(self) -> int | None:
        """The TCP port the server listens on (useful with port 0)."""
        return self.listening_port.getHost().port if self.listening_port is not None else None

    # -- links --------------------------------------------------------------------------

    def register_component(self, component_id: str, handler) -> None:
        """Make a Python object available as component ``component_id`` on the embedded lattice.

        ``handler`` is an ``IMessageHandler`` provider, or a callable taking this provider's
        ``IMessagingConsumer`` and returning one (so the handler can reply).
        """
        self.components[component_id] = resolve_handler(handler, LinkedConsumer(self, component_id, self.config))

    def receive_link_config_as_target(self, component_id: str, config: Mapping | None = None) -> LinkedConsumer:
        """A component will *send* through this provider. Returns its consumer."""
        consumer = LinkedConsumer(self, component_id, self.config.merged(config))
        if self._client_links() is not None:  # client mode: the link's connection (shared when equal)
            self.ws.attach(client_owner("target", component_id), consumer.config)
        self.consumer_links[component_id] = consumer
        return consumer

    def delete_link_as_target(self, component_id: str) -> bool:
        if self._client_links() is not None:
            self.ws.detach(client_owner("target", component_id))
        return self.consumer_links.pop(component_id, None) is not None

    def _client_links(self):
        return self.ws if self._client_mode and self.ws is not None else None

    @defer.inlineCallbacks
    def receive_link_config_as_source(self, component_id: str, config: Mapping | None = None, handler=None):
        """A component will *receive* messages: subscribe it to the link's ``SUBSCRIPTIONS``.

        ``handler`` registers the component at the same time (see ``register_component``).
        Deferred firing with the list of subscriptions.
        """
        link_config = self.config.merged(config)
        if handler is not None:
            self.register_component(component_id, handler)
        target = self.components.get(component_id)
        if target is None:
            raise MessagingError(f"component {component_id!r} is not registered; call register_component() "
                                 "first or pass handler=", code="unknown_component")
        if component_id in self.handler_links:
            yield self.delete_link_as_source(component_id)
        if self._client_mode:
            if self.ws is not None:
                self.ws.attach(client_owner("source", component_id), link_config)
            self._source_configs[component_id] = link_config
        subs = []
        for pattern in link_config.subscriptions:
            # On a shared bus (NATS) every instance links the same component: one of them handles each message.
            queue = (f"{self.config.subject_prefix}.handlers.{component_id.replace(' ', '_')}"
                     if getattr(self.lattice, "clustered", False) else None)
            sub = yield self.lattice.subscribe(pattern, target.handle_message, queue)
            subs.append(sub)
        self.handler_links[component_id] = subs
        self.log.info("component {id} linked as handler for {patterns}", id=component_id,
                      patterns=", ".join(link_config.subscriptions))
        return subs

    @defer.inlineCallbacks
    def delete_link_as_source(self, component_id: str):
        if self._source_configs.pop(component_id, None) is not None and self._client_links() is not None:
            yield self.ws.detach(client_owner("source", component_id))
        subs = self.handler_links.pop(component_id, [])
        for sub in subs:
            yield sub.unsubscribe()
        return bool(subs)

    # -- the consumer side, and the seed's session API ------------------------------------

    def publish(self, msg: BrokerMessage, component_id: str | None = None):
        if self.ws is None:
            return defer.fail(NotConnected("the provider is not started"))
        if component_id is not None and self._client_mode:
            return self.ws.publish(msg, component_id)  # through that component's own link
        return self.ws.publish(msg)

    def request(self, subject: str, body: bytes, timeout_ms: int, component_id: str | None = None):
        if self.ws is None:
            return defer.fail(NotConnected("the provider is not started"))
        if component_id is not None and self._client_mode:
            return self.ws.request(subject, body, timeout_ms, component_id)
        return self.ws.request(subject, body, timeout_ms)

    def send_to_session(self, session_id: str, msg: BrokerMessage):
        if self.ws is None:
            return defer.fail(NotConnected("the provider is not started"))
        return self.ws.send_to_session(session_id, msg)

    def broadcast_to_clients(self, msg: BrokerMessage):
        if self.ws is None:
            return defer.fail(NotConnected("the provider is not started"))
        return self.ws.broadcast(msg)

    def list_sessions(self, cluster: bool = False):
        """This instance's sessions (a list); with ``cluster=True``, a Deferred firing with the
        sessions of every instance on the lattice (each with its ``instance``)."""
        if cluster:
            if self.cluster is None:
                return defer.succeed(self.list_sessions())
            return self.cluster.list_sessions()
        return self.ws.list_sessions() if self.ws is not None else []

    def is_ready(self) -> bool:
        """True when started and the lattice is connected (for a /readyz)."""
        ready = self._ready
        if ready is None or not ready.called or isinstance(ready.result, Failure) or self.ws is None:
            return False
        return bool(getattr(self.lattice, "connected", True))

    list_ws_clients = list_sessions

    def disconnect_session(self, session_id: str, code: int = 1000, reason: str = "closed by the service"):
        if self.ws is None:
            return defer.succeed(False)
        return self.ws.disconnect(session_id, code, reason)

    def session_address(self, session_id: str) -> str:
        """The subject that reaches session ``session_id`` from anywhere on the lattice."""
        return f"{self.config.subject_prefix}.session.{session_id}"


def client_owner(role: str, component_id: str) -> str:
    """Client mode: the name a component link holds its connection by (see client.ClientLinks)."""
    return f"{role}:{component_id}"


def resolve_handler(obj, consumer):
    """An ``IMessageHandler`` provider as is; a callable is called with ``consumer``."""
    if IMessageHandler.providedBy(obj):
        return obj
    if callable(obj):
        made = obj(consumer)
        if IMessageHandler.providedBy(made) or callable(getattr(made, "handle_message", None)):
            return made
        raise ConfigError(f"handler factory {obj!r} returned {made!r}, which has no handle_message()")
    if callable(getattr(obj, "handle_message", None)):
        return obj
    raise ConfigError(f"{obj!r} is neither an IMessageHandler nor a callable returning one")


def load_handler(spec: str):
    """Import ``module:attr``; errors say what to fix."""
    module_name, sep, attr_name = spec.partition(":")
    if not sep or not module_name or not attr_name:
        raise ConfigError(f"--handler {spec!r}: expected module:attribute, e.g. wsprovider.handlers:echo")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--handler {spec!r}: cannot import module {module_name!r}: {e}") from None
    try:
        obj = module
        for part in attr_name.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ConfigError(f"--handler {spec!r}: module {module_name!r} has no attribute {attr_name!r}") from None
    return obj
