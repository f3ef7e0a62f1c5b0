"""``Wasmcloud1Provider``: wsprovider as a wasmCloud 1.x capability provider (a Twisted service).

Start-up, as the SDKs do it: connect to the lattice RPC NATS (user JWT + seed if given),
subscribe the control subjects, serve ``wasmcloud:messaging/consumer@0.2.0`` (``publish``,
``request``) on ``{lattice}.{provider id}`` in the queue group of that name, then feed
HostData's ``link_definitions`` through the same handler as live link puts.

Links: the provider's config (HostData ``config``, plus known secrets) is the default; a
consumer link's ``target_config`` (+ secrets) or a handler link's ``source_config``
(+ secrets) is merged over it; ``bridge.WebSocketSide`` turns that into WebSocket servers
and client links. A caller whose ``source-id`` has no consumer link is refused the way the
SDKs refuse it: the invocation traps (the caller sees only the empty results message).
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from ..config import ConfigError, ProviderConfig
from ..message import MessagingError
from ..nats import NatsClient
from . import messaging as m
from .bridge import WebSocketSide
from .lattice import RemoteComponent, Wasmcloud1Lattice
from .links import LinkError, LinkStore
from .control import ControlInterface
from .values import Err, Ok
from .wrpc import Inbox, WrpcClient, WrpcError, WrpcServer

# Secrets whose names are settings become those settings; others are not ours and are ignored.
SECRET_SETTINGS = frozenset({"AUTH_TOKEN", "AUTH_TOKENS", "JWT_SECRET", "ADMIN_TOKEN", "NATS_TOKEN", "NATS_PASSWORD"})
# Share of the host's 300 ms shutdown wait we give the WebSocket side before answering.
SHUTDOWN_ANSWER_BUDGET_SEC = 0.2
SHUTDOWN_TOTAL_BUDGET_SEC = 4.0


def _secret_settings(secrets: dict) -> dict:
    return {name.upper(): value for name, value in secrets.items() if name.upper() in SECRET_SETTINGS}


class Wasmcloud1Provider(service.MultiService):
    log = Logger()

    def __init__(self, host_data, reactor=None, on_exit=None, nats=None):
        service.MultiService.__init__(self)
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.host_data = host_data
        self.on_exit = on_exit
        self.base_config = self._base(host_data.config)
        self.nats = nats or NatsClient(
            host_data.lattice_rpc_url, reactor=reactor, name=f"wsprovider-wasmcloud {host_data.provider_key}",
            user_jwt=host_data.lattice_rpc_user_jwt or None,
            nkey_seed=host_data.lattice_rpc_user_seed or None if host_data.lattice_rpc_user_jwt else None)
        self.inbox = Inbox(self.nats)
        timeout = host_data.default_rpc_timeout_ms / 1000.0
        self.wrpc_server = WrpcServer(self.nats, self.inbox, reactor, params_timeout=max(timeout, 10.0))
        self.wrpc_client = WrpcClient(self.nats, self.inbox, reactor, handshake_timeout=timeout)
        self.links = LinkStore(host_data.provider_key)
        self.side = WebSocketSide(self.make_lattice, reactor)
        self.control = ControlInterface(self.nats, host_data, self)
        self.ready = None
        self.exited = defer.Deferred()
        self.refused_calls = 0
        self._side_stopped = None

    @property
    def prefix(self) -> str:
        return f"{self.host_data.lattice_rpc_prefix}.{self.host_data.provider_key}"

    def make_lattice(self):
        return Wasmcloud1Lattice(self.reactor, self.host_data.lattice_rpc_prefix, self.host_data.provider_key,
                                 self.wrpc_client, self.nats)

    def _base(self, config: dict) -> ProviderConfig:
        raw = dict(config)
        raw.update(_secret_settings(self.host_data.secrets))
        try:
            base = ProviderConfig.from_mapping(raw, strict=False)
        except ConfigError as error:
            self.log.error("the provider config from the host is invalid ({error}); using the defaults. Fix the "
                           "named config attached to the provider.", error=error)
            return ProviderConfig.from_mapping({})
        if base.extra:
            self.log.info("provider config keys not used by wsprovider: {keys}", keys=", ".join(sorted(base.extra)))
        return base

    # -- lifecycle ----------------------------------------------------------------------

    def startService(self):
        service.MultiService.startService(self)
        self.ready = self._start()
        self.ready.addErrback(lambda f: self.log.failure("wsprovider-wasmcloud could not start", f))

    @defer.inlineCallbacks
    def _start(self):
        hd = self.host_data
        self.nats.start().addErrback(lambda f: None)  # reconnects forever; subscriptions are buffered
        yield self.inbox.start()
        yield self.control.start()
        for function, params, results, handler in (
                ("publish", m.PUBLISH_PARAMS, m.PUBLISH_RESULTS, self._serve_publish),
                ("request", m.REQUEST_PARAMS, m.REQUEST_RESULTS, self._serve_request)):
            yield self.wrpc_server.serve(self.prefix, m.CONSUMER, function, params, results, handler,
                                         queue=self.prefix)
        yield self.nats.when_connected()
        yield self.nats.flush()  # the server has every subscription: we are reachable from here on
        self.log.info("wsprovider-wasmcloud {id} serving {iface} on lattice {lattice} (host {host}, instance "
                      "{instance}); link puts on {subject}", id=hd.provider_key, iface=m.CONSUMER,
                      lattice=hd.lattice_rpc_prefix, host=hd.host_id, instance=hd.instance_id,
                      subject=self.control.subjects["link_put"][0])
        for link in hd.link_definitions:
            yield self.link_put(link)
        return self

    # -- control handler ----------------------------------------------------------------

    def link_put(self, link):
        role = self.links.put(link)
        if role is None:
            return defer.succeed(None)  # duplicate or not ours
        component = link.component(self.host_data.provider_key)
        try:
            secrets = _secret_settings(self.host_data.open_secrets(link.sealed_secrets_for(role)))
            raw = dict(link.config_for(role))
            raw.update(secrets)
            config = self.base_config.merged(raw)
        except (ConfigError, LinkError) as error:
            self.links.delete(link)
            self.log.error("link {role} {component} ({ns}:{pkg}/{ifaces}) refused: {error}", role=_role_name(role),
                           component=component, ns=link.wit_namespace, pkg=link.wit_package,
                           ifaces=",".join(link.interfaces), error=error)
            return defer.succeed(None)
        if role == "target":
            d = self.side.link_target(component, config)
        else:
            remote = RemoteComponent(self.wrpc_client, self.host_data.lattice_rpc_prefix,
                                     self.host_data.provider_key, component)
            d = self.side.link_source(component, config, remote)
        d.addErrback(lambda f: self.log.error("link {component} could not be set up: {error}",
                                              component=component, error=f.getErrorMessage()))
        self.log.info("link put: {role} {component} ({ns}:{pkg}/{ifaces}), config keys {keys}",
                      role=_role_name(role), component=component, ns=link.wit_namespace, pkg=link.wit_package,
                      ifaces=",".join(link.interfaces), keys=", ".join(sorted(link.config_for(role))) or "(none)")
        return d

    def link_del(self, link):
        found = self.links.delete(link)
        if found is None:
            self.log.debug("link delete for an unknown link {key}; nothing to do", key=link.key)
            return defer.succeed(None)
        role, stored = found
        component = stored.component(self.host_data.provider_key)
        self.log.info("link deleted: {role} {component}", role=_role_name(role), component=component)
        return self.side.unlink(role, component)

    def health(self) -> dict:
        return {"healthy": True, "message": "healthy"}

    def config_update(self, config: dict):
        self.base_config = self._base(config)
        self.log.info("provider config updated (keys {keys}); applies to links put from now on",
                      keys=", ".join(sorted(config)) or "(none)")

    def shutdown(self):
        """Close the WebSocket side (sessions get 1001) within the answer budget; fires then."""
        d = _settled_copy(self._stop_side())
        return d.addTimeout(SHUTDOWN_ANSWER_BUDGET_SEC, self.reactor).addErrback(lambda _: None)

    def _stop_side(self):
        if self._side_stopped is None:
            self._side_stopped = self.side.stop()
        return self._side_stopped

    def after_shutdown_reply(self):
        self.stop_and_exit()

    @defer.inlineCallbacks
    def stop_and_exit(self):
        try:
            d = defer.gatherResults([_settled_copy(self._stop_side()), self.wrpc_server.stop(), self.control.stop()],
                                    consumeErrors=True)
            yield d.addTimeout(SHUTDOWN_TOTAL_BUDGET_SEC, self.reactor).addErrback(lambda _: None)
            yield self.inbox.stop()
            yield self.nats.drain().addTimeout(0.5, self.reactor).addErrback(lambda _: None)
            yield self.nats.close()
        finally:
            if self.running:
                yield defer.maybeDeferred(service.MultiService.stopService, self)
            if self.on_exit is not None:
                self.on_exit()
            if not self.exited.called:
                self.exited.callback(None)

    def stopService(self):
        if self.exited.called:
            return defer.succeed(None)
        on_exit, self.on_exit = self.on_exit, None
        return self.stop_and_exit().addBoth(lambda _: setattr(self, "on_exit", on_exit))

    # -- the consumer export ------------------------------------------------------------

    def _consumer(self, invocation):
        source = invocation.headers.get("source-id")
        consumer = self.side.consumer_for(source) if source else None
        if consumer is None:
            self.refused_calls += 1
            # As the SDKs do: an unlinked caller fails the invocation (it traps in the component).
            raise WrpcError(f"component {source!r} is not linked to this provider (no consumer link)"
                            if source else "invocation without a source-id header")
        return consumer

    def _serve_publish(self, params, invocation):
        (msg,) = params
        d = defer.maybeDeferred(self._consumer(invocation).publish, msg)
        return d.addCallbacks(lambda _: Ok(), _as_err)

    def _serve_request(self, params, invocation):
        subject, body, timeout_ms = params
        d = defer.maybeDeferred(self._consumer(invocation).request, subject, body, timeout_ms)
        return d.addCallbacks(Ok, _as_err)


def _as_err(failure):
    failure.trap(MessagingError, ValueError, TypeError)
    return Err(failure.getErrorMessage())


def _role_name(role: str) -> str:
    return "consumer (component -> provider) from" if role == "target" else "handler (provider -> component) to"


def _settled_copy(d):
    out = defer.Deferred()
    d.addBoth(lambda result: (out.callback(None), None)[1])
    return out
