"""The WebSocket side of the 1.x provider: links -> WebSocket servers and client links.

This is the ONE module that knows the rest of wsprovider's WebSocket machinery. It uses
only these public APIs (as on main when it was written):

* ``wsprovider.provider.WebSocketMessagingProvider(config, lattice=, reactor=)`` with
  ``startService()``, ``when_ready()``, ``stopService()``, ``port``,
  ``receive_link_config_as_target(component_id, config)`` (returns an
  ``IMessagingConsumer``), ``delete_link_as_target(component_id)``,
  ``receive_link_config_as_source(component_id, config, handler=)`` and
  ``delete_link_as_source(component_id)``, ``list_sessions()``;
* through it, ``wsprovider.server.MessagingServerFactory`` (server mode) and
  ``wsprovider.client.ClientLinks`` (client mode), untouched;
* ``wsprovider.config.ProviderConfig``.

Each distinct effective link configuration is a *group*: one ``WebSocketMessagingProvider``
on its own ``Wasmcloud1Lattice``. Server mode: links with identical settings (every key but
``SUBSCRIPTIONS``) share one listener, so the same ``URI`` on a component's consumer and
handler links is one server. Client mode: each component gets its connection (as in the
seed), shared by its two links when their settings are identical. A group stops (its port
closes, its sessions get 1001) when its last link is deleted.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from ..config import ProviderConfig
from ..provider import WebSocketMessagingProvider


def settings_key(config: ProviderConfig) -> tuple:
    items = config.as_dict()
    items.pop("SUBSCRIPTIONS", None)
    return tuple(sorted((key, repr(value)) for key, value in items.items()))


class Group:
    def __init__(self, key, config, provider):
        self.key = key
        self.config = config
        self.provider = provider
        self.owners: set[tuple[str, str]] = set()
        self.ready = None


class WebSocketSide:
    """Links by component, groups by settings.

    :param make_lattice: ``() -> ILattice`` with ``component(id)`` (a ``Wasmcloud1Lattice``).
    """

    log = Logger()

    def __init__(self, make_lattice, reactor):
        self.make_lattice = make_lattice
        self.reactor = reactor
        self.groups: dict[tuple, Group] = {}
        self._consumers: dict[str, object] = {}
        self._of: dict[tuple[str, str], Group] = {}

    def _group_for(self, role, component_id, config) -> Group:
        key = settings_key(config)
        if config.mode == "client":
            key = (("component", component_id),) + key
        group = self.groups.get(key)
        if group is None:
            provider = WebSocketMessagingProvider(config, lattice=self.make_lattice(), reactor=self.reactor)
            group = Group(key, config, provider)
            self.groups[key] = group
            provider.startService()
            group.ready = provider.when_ready()
            group.ready.addCallbacks(lambda _: self._started(group), lambda f: self._start_failed(f, group))
        group.owners.add((role, component_id))
        self._of[(role, component_id)] = group
        return group

    def _started(self, group):
        where = f"port {group.provider.port}" if group.config.mode == "server" else group.config.uri
        self.log.info("WebSocket {mode} for {owners} ready ({where})", mode=group.config.mode,
                      owners=", ".join(f"{r}:{c}" for r, c in sorted(group.owners)), where=where)
        return group

    def _start_failed(self, failure, group):
        self.log.error("the WebSocket {mode} for {owners} could not start: {error}. Fix the link's URI "
                       "(or the provider config) and put the link again.", mode=group.config.mode,
                       owners=", ".join(f"{r}:{c}" for r, c in sorted(group.owners)),
                       error=failure.getErrorMessage())
        return None

    def link_target(self, component_id: str, config: ProviderConfig):
        """``component_id`` calls our consumer. Deferred firing when its side is ready."""
        group = self._group_for("target", component_id, config)
        self._consumers[component_id] = group.provider.receive_link_config_as_target(component_id, None)
        return defer.succeed(None) if group.ready is None else _settled(group.ready)

    def consumer_for(self, component_id: str):
        """The ``IMessagingConsumer`` of a linked component, or None."""
        return self._consumers.get(component_id)

    def link_source(self, component_id: str, config: ProviderConfig, handler):
        """We deliver to ``handler`` (the component) what matches its ``SUBSCRIPTIONS``."""
        group = self._group_for("source", component_id, config)
        subscribed = group.provider.receive_link_config_as_source(
            component_id, {"SUBSCRIPTIONS": ",".join(config.subscriptions)}, handler=handler)
        return defer.gatherResults([subscribed, _settled(group.ready)], consumeErrors=True).addCallback(
            lambda _: None)

    @defer.inlineCallbacks
    def unlink(self, role: str, component_id: str):
        group = self._of.pop((role, component_id), None)
        if group is None:
            return False
        if role == "target":
            self._consumers.pop(component_id, None)
            group.provider.delete_link_as_target(component_id)
        else:
            yield group.provider.delete_link_as_source(component_id)
        group.owners.discard((role, component_id))
        if not group.owners:
            self.groups.pop(group.key, None)
            yield self._stop_group(group)
        return True

    def sessions(self) -> int:
        return sum(len(group.provider.list_sessions()) for group in self.groups.values())

    def stop(self):
        """Stop every group (listeners close, sessions get 1001). Deferred."""
        groups, self.groups = list(self.groups.values()), {}
        self._consumers.clear()
        self._of.clear()
        return defer.DeferredList([self._stop_group(g) for g in groups], consumeErrors=True)

    @staticmethod
    def _stop_group(group):
        # A provider still starting has no listening port to close yet: let it finish first.
        d = _settled(group.ready) if group.ready is not None else defer.succeed(None)
        return d.addCallback(lambda _: group.provider.stopService() if group.provider.running else None)

    def describe(self) -> list:
        return [{"mode": g.config.mode, "uri": g.config.uri, "port": g.provider.port,
                 "links": sorted(f"{r}:{c}" for r, c in g.owners)} for g in self.groups.values()]


def _settled(d):
    """A copy of ``d`` that fires with None either way (the failure is logged by the group)."""
    out = defer.Deferred()
    d.addBoth(lambda result: (out.callback(None), result)[1])
    return out
