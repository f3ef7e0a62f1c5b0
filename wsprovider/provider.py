"""``WebSocketMessagingProvider``: the seed's API, as a Twisted service.

It owns the lattice, the WebSocket side (server factory + site, or client links) and the
link table: components linked as *targets* use the consumer (publish/request), components
linked as *sources* receive messages as handlers. It is a tree of services (see
``WebSocketMessagingProvider``) so it can be embedded in any Twisted application; the
twistd plugin only wires it.
"""

from __future__ import annotations

import importlib
from typing import Mapping

import txaio
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from ._defer import Outcome
from .config import ConfigError, ProviderConfig
from .endpoints import server_endpoint_description
from .interfaces import IClusteredLattice, IMessageHandler, IMessagingConsumer, lattice_connected
from .lattice.local import LocalLattice
from .message import BrokerMessage, MessagingError, NotConnected
from .services import HandlerLinksService, LatticeService, SequentialMultiService

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


class IProviderMode(Interface):
    """What differs between server and client mode, behind one face.

    A mode builds its part of the service tree (after the lattice and the handler links)
    and holds ``ws``, the ``ISessionRegistry`` + ``IMessagingConsumer`` that the
    provider's session API goes through.
    """

    name = Attribute("'server' or 'client'.")
    ws = Attribute("The session registry and consumer: the server factory, or the client links.")

    def build(parent):
        """Add this mode's services to ``parent`` (a ``MultiService``)."""

    def link(role, component_id, config):
        """A component was linked (``role``: 'target' or 'source') with ``config``."""

    def unlink(role, component_id):
        """A component's link was deleted. Deferred."""

    def publish(msg, component_id):
        """Publish for ``component_id`` (None: the provider itself). Deferred."""

    def request(subject, body, timeout_ms, component_id):
        """Request for ``component_id``. Deferred firing with the reply."""

    def started():
        """Deferreds of what must be up before the provider is ready."""

    def started_message():
        """A line for the log once ready."""


@implementer(IProviderMode)
class ServerMode:
    """Server mode: sessions, the cluster directory, the HTTP site and its listening port.

    Tree (started top to bottom, stopped bottom to top): cluster directory (a
    ``TimerService`` for heartbeats), sessions (drained on stop), listening port
    (``StreamServerEndpointService``; closed first on stop).
    """

    name = "server"

    def __init__(self, provider):
        from .lattice.cluster import ClusterDirectory, ClusterDirectoryService
        from .metrics import ProviderMetrics
        from .server import MessagingServerFactory
        from .services import ListeningService, SessionsService
        from .web import make_site
        config, reactor, lattice = provider.config, provider.reactor, provider.lattice
        self.config = config
        self.lattice = lattice
        self.ws = MessagingServerFactory(lattice, config, reactor=reactor)
        self.cluster = ClusterDirectory(self.ws, lattice, config, reactor)
        self.metrics = ProviderMetrics(provider)  # a registry per provider
        self.ws.request_latency = self.metrics.request_latency
        self.site = make_site(self.ws, config.ws_path, provider=provider, metrics=self.metrics)
        endpoint = endpoints.serverFromString(reactor, server_endpoint_description(config.uri))
        self.services = [ClusterDirectoryService(self.cluster),
                         SessionsService(self.ws, config.drain_timeout_sec),
                         ListeningService(endpoint, self.site)]
        self.listener = self.services[-1]

    def build(self, parent):
        for child in self.services:
            child.setServiceParent(parent)

    def link(self, role, component_id, config):
        pass  # components meet sessions on the lattice; nothing per link

    def unlink(self, role, component_id):
        return defer.succeed(False)

    def publish(self, msg, component_id):
        return self.ws.publish(msg)

    def request(self, subject, body, timeout_ms, component_id):
        return self.ws.request(subject, body, timeout_ms)

    def started(self):
        return [child.when_started() for child in self.services]

    def started_message(self):
        address = self.listener.port.getHost()
        # An IAddress: TCP/SSL ones have host and port, a UNIX socket's has neither.
        host, port = getattr(address, "host", address), getattr(address, "port", "")
        return (f"wsprovider listening for WebSocket clients on {host}:{port}/{self.config.ws_path} "
                f"(lattice: {self.lattice.name})")


@implementer(IProviderMode)
class ClientMode:
    """Client mode: the link manager, with one ``ComponentLinkService`` per linked component."""

    name = "client"

    def __init__(self, provider):
        from .client import ClientLinks
        from .services import ClientLinksService
        self.lattice = provider.lattice
        self.ws = ClientLinks(provider.lattice, provider.config, reactor=provider.reactor)
        self.service = ClientLinksService(self.ws)
        self.cluster = self.metrics = self.site = self.listener = None

    def build(self, parent):
        self.service.setServiceParent(parent)

    def link(self, role, component_id, config):
        from .services import ComponentLinkService
        owner = client_owner(role, component_id)
        if owner in self.service.namedServices:
            self.service.removeService(self.service.getServiceNamed(owner))
        child = ComponentLinkService(self.ws, owner, config)
        child.setServiceParent(self.service)  # attaches now if the service runs
        if child.error is not None:
            self.service.removeService(child)
            raise child.error

    def unlink(self, role, component_id):
        owner = client_owner(role, component_id)
        if owner not in self.service.namedServices:
            return defer.succeed(False)
        return defer.maybeDeferred(self.service.removeService, self.service.getServiceNamed(owner))

    def publish(self, msg, component_id):
        return self.ws.publish(msg, component_id)  # through that component's own link

    def request(self, subject, body, timeout_ms, component_id):
        return self.ws.request(subject, body, timeout_ms, component_id)

    def started(self):
        failed = [defer.fail(child.error) for child in self.service if child.error is not None]
        return [self.service.when_started()] + failed

    def started_message(self):
        return f"wsprovider client mode started with {len(self.ws.links)} link(s) (lattice: {self.lattice.name})"


class WebSocketMessagingProvider(SequentialMultiService):
    """WebSocket transport for ``wasmcloud:messaging``.

    :param config: a ``ProviderConfig`` (see ``from_config`` for a plain dict).
    :param lattice: an ``ILattice``; default: NATS when ``NATS_URL`` is set, else a new
        in-process ``LocalLattice``.

    A tree of services, built here the way magic-wormhole's ``makeService`` builds its
    own: the lattice (first to start, last to stop), the handler links, then the mode's
    services (``ServerMode`` or ``ClientMode``). Children stop one after another in
    reverse order, so the port closes first, sessions drain while the lattice and the
    handlers still answer, and the lattice closes last.
    """

    log = Logger()

    def __init__(self, config: ProviderConfig, lattice=None, reactor=None):
        SequentialMultiService.__init__(self)
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        if lattice is None and config.nats_url:
            from .lattice.nats import NatsLattice
            lattice = NatsLattice.from_config(config, reactor, name=f"wsprovider {config.instance_id or ''}".strip())
        self.lattice = lattice if lattice is not None else LocalLattice(reactor)
        self.components: dict[str, object] = {}
        self.consumer_links: dict[str, LinkedConsumer] = {}
        self.handler_links: dict[str, list] = {}
        self._ready = None
        LatticeService(self.lattice).setServiceParent(self)
        HandlerLinksService(self.handler_links).setServiceParent(self)
        self.mode: IProviderMode = (ClientMode if config.mode == "client" else ServerMode)(self)
        self.mode.build(self)

    @classmethod
    def from_config(cls, config: Mapping[str, str] | ProviderConfig | None = None, lattice=None,
                    reactor=None) -> "WebSocketMessagingProvider":
        """Build from a seed-style dict (``{"MODE": "server", "URI": "0.0.0.0:8080"}``).

        Raises ``ConfigError`` naming the bad key and the accepted values.
        """
        if not isinstance(config, ProviderConfig):
            config = ProviderConfig.from_mapping(config or {})
        return cls(config, lattice=lattice, reactor=reactor)

    # -- what the mode holds (kept as attributes: web, metrics, tests and embedders use them)

    @property
    def ws(self):
        """Server factory or client link manager: ``ISessionRegistry`` + ``IMessagingConsumer``."""
        return self.mode.ws

    @property
    def cluster(self):
        """Server mode: the cross-instance session directory (None in client mode)."""
        return self.mode.cluster

    @property
    def metrics(self):
        """Server mode: ``metrics.ProviderMetrics`` (a registry per provider)."""
        return self.mode.metrics

    @property
    def site(self):
        return self.mode.site

    @property
    def listening_port(self):
        """The listening port while server mode listens, else None."""
        listener = self.mode.listener
        return listener.port if listener is not None else None

    # -- lifecycle ----------------------------------------------------------------------

    def startService(self):
        # Autobahn logs every frame at debug level; that costs time on the hot path.
        if txaio.get_global_log_level() in ("debug", "trace"):
            txaio.set_global_log_level("info")
        if not nvx_active():
            self.log.warn("Autobahn's NVX acceleration is not active: text frames will be about 30x slower "
                          "to validate. Install autobahn from a wheel with its CFFI extension, or set "
                          "AUTOBAHN_USE_NVX=1 and make sure cffi is installed.")
        SequentialMultiService.startService(self)
        lattice_started = self.getServiceNamed("lattice").when_started()
        started = defer.gatherResults([lattice_started] + self.mode.started(), consumeErrors=True)
        started.addCallbacks(self._started, self._start_failed)
        self._ready = Outcome(started)

    def _started(self, _):
        self.log.info(self.mode.started_message())
        return self

    def _start_failed(self, failure):
        if failure.check(defer.FirstError):
            failure = failure.value.subFailure
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
        return self._ready.observe()

    def start_server_if_needed(self):
        """Seed name: start the service if it is not running. Deferred firing when ready."""
        if not self.running:
            self.startService()
        return self.when_ready()

    def shutdown(self):
        """Seed name: stop everything. Deferred."""
        return defer.maybeDeferred(self.stopService) if self.running else defer.succeed(None)

    @property
    def port(self) -> int | None:
        """The TCP port the server listens on (useful with port 0)."""
        port = self.listening_port
        return port.getHost().port if port is not None else None

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
        self.mode.link("target", component_id, consumer.config)  # client mode: the link's connection
        self.consumer_links[component_id] = consumer
        return consumer

    def delete_link_as_target(self, component_id: str) -> bool:
        self.mode.unlink("target", component_id)
        return self.consumer_links.pop(component_id, None) is not None

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
        self.mode.link("source", component_id, link_config)
        # On a shared bus (NATS) every instance links the same component: one of them handles each message.
        queue = (f"{self.config.subject_prefix}.handlers.{component_id.replace(' ', '_')}"
                 if IClusteredLattice.providedBy(self.lattice) else None)
        subs = []
        for pattern in link_config.subscriptions:
            sub = yield self.lattice.subscribe(pattern, target.handle_message, queue)
            subs.append(sub)
        self.handler_links[component_id] = subs
        self.log.info("component {id} linked as handler for {patterns}", id=component_id,
                      patterns=", ".join(link_config.subscriptions))
        return subs

    @defer.inlineCallbacks
    def delete_link_as_source(self, component_id: str):
        yield self.mode.unlink("source", component_id)
        subs = self.handler_links.pop(component_id, [])
        for sub in subs:
            yield sub.unsubscribe()
        return bool(subs)

    # -- the consumer side, and the seed's session API ------------------------------------

    # Before startService there is nobody to talk to; during a drain (stopping) there still
    # is: in-flight requests get their replies through here.
    def _not_started(self):
        return defer.fail(NotConnected("the provider is not started"))

    def publish(self, msg: BrokerMessage, component_id: str | None = None):
        if self._ready is None:
            return self._not_started()
        return self.mode.publish(msg, component_id)

    def request(self, subject: str, body: bytes, timeout_ms: int, component_id: str | None = None):
        if self._ready is None:
            return self._not_started()
        return self.mode.request(subject, body, timeout_ms, component_id)

    def send_to_session(self, session_id: str, msg: BrokerMessage):
        if self._ready is None:
            return self._not_started()
        return self.ws.send_to_session(session_id, msg)

    def broadcast_to_clients(self, msg: BrokerMessage):
        """Send ``msg`` to every session. Deferred firing with the count: exact on a lattice
        with ``IExactBroadcastCount``, else the sessions reached on this instance
        (docs/protocol.rst, "Broadcast")."""
        if self._ready is None:
            return self._not_started()
        return self.ws.broadcast(msg)

    def list_sessions(self, cluster: bool = False):
        """This instance's sessions (a list); with ``cluster=True``, a Deferred firing with the
        sessions of every instance on the lattice (each with its ``instance``)."""
        if cluster:
            if self.cluster is None:
                return defer.succeed(self.list_sessions())
            return self.cluster.list_sessions()
        return self.ws.list_sessions() if self._ready is not None else []

    def is_ready(self) -> bool:
        """True when started and the lattice is connected (for a /readyz)."""
        if not self.running or self._ready is None or not self._ready.succeeded:
            return False
        return lattice_connected(self.lattice)

    list_ws_clients = list_sessions

    def disconnect_session(self, session_id: str, code: int = 1000, reason: str = "closed by the service"):
        if self._ready is None:
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
    # Users' handler objects need not declare IMessageHandler: any object with a callable
    # handle_message is accepted (duck typing on what a user hands us, not a lattice probe).
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
            obj = getattr(obj, part)  # resolving the user's dotted name, as import does
    except AttributeError:
        raise ConfigError(f"--handler {spec!r}: module {module_name!r} has no attribute {attr_name!r}") from None
    return obj
