"""The pieces of the provider's service tree (see ``provider.py``), each a Twisted service.

Every service here that takes time to start has ``when_started()`` (a new Deferred per
caller, from an ``Outcome``) so the provider can say when the whole tree is up, and a
``stopService`` returning a Deferred so that shutdown waits for it.
"""

from __future__ import annotations

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from ._defer import Outcome, mirror
from .interfaces import IStartable


class ReadyService(service.Service):
    """A service whose start may take a while: ``when_started()`` fires when it is done."""

    ready: Outcome | None = None

    def when_started(self) -> defer.Deferred:
        if self.ready is None:
            return defer.fail(RuntimeError(f"service {self.name!r} was not started"))
        return self.ready.observe()

    def _starting(self, d: defer.Deferred) -> None:
        self.ready = Outcome(d)


class SequentialMultiService(service.MultiService):
    """A ``MultiService`` that stops its children one after another, last started first.

    Twisted's ``MultiService`` stops every child at once; a graceful drain needs the
    lattice until the sessions are gone, so here each child's stop waits for the one
    started after it.
    """

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                Logger().failure("stopping {name} failed", name=child.name or repr(child))


class LatticeService(ReadyService):
    """The lattice as a service: started first (``IStartable``), closed last."""

    def __init__(self, lattice):
        self.lattice = lattice
        self.setName("lattice")

    def startService(self):
        service.Service.startService(self)
        if IStartable.providedBy(self.lattice):
            self._starting(defer.maybeDeferred(self.lattice.start))  # NATS: connects in the background, forever
        else:
            self._starting(defer.succeed(self.lattice))

    def stopService(self):
        service.Service.stopService(self)
        return self.lattice.close()


class HandlerLinksService(service.Service):
    """Components linked as handlers (sources): their lattice subscriptions end on stop,
    after the sessions have drained (in-flight requests may still need the handlers)."""

    def __init__(self, handler_links: dict):
        self.handler_links = handler_links
        self.setName("handlers")

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        for links in list(self.handler_links.values()):
            for sub in links:
                yield sub.unsubscribe()
        self.handler_links.clear()


class SessionsService(ReadyService):
    """Server mode's session factory: broadcast subscription on start, graceful drain on stop."""

    def __init__(self, factory, drain_timeout: float):
        self.factory = factory
        self.drain_timeout = drain_timeout
        self.setName("sessions")

    def startService(self):
        service.Service.startService(self)
        self._starting(defer.maybeDeferred(self.factory.start))

    def stopService(self):
        service.Service.stopService(self)
        # Idle sessions are told 1001 at once, those with requests in flight once answered,
        # at most drain_timeout later.
        return self.factory.drain(self.drain_timeout)


@implementer(IStreamServerEndpoint)
class ReportingEndpoint:
    """An endpoint that hands each ``listen`` Deferred to ``on_listen`` as well."""

    def __init__(self, endpoint, on_listen):
        self._endpoint = endpoint
        self._on_listen = on_listen

    def listen(self, factory):
        d = self._endpoint.listen(factory)
        self._on_listen(d)
        return d


class ListeningService(StreamServerEndpointService):
    """``StreamServerEndpointService`` with a ``ready`` Deferred and the port it holds."""

    def __init__(self, endpoint, factory):
        self.port = None
        self.ready = None
        StreamServerEndpointService.__init__(self, ReportingEndpoint(endpoint, self._listening), factory)
        self.setName("listener")

    def _listening(self, d):
        d.addCallback(self._set_port)  # first: whoever waits for ready may ask for the port
        self.ready = Outcome(mirror(d))  # d itself stays the service's (it stops the port)
        # A failure to listen is the provider's to report (when_ready, "could not start"),
        # not an "Unhandled Error" from StreamServerEndpointService: it sees no port.
        d.addErrback(lambda _failure: None)

    def _set_port(self, port):
        self.port = port
        return port

    def when_started(self):
        return self.ready.observe() if self.ready is not None else defer.fail(RuntimeError("not listening"))

    def stopService(self):
        self.port = None
        return StreamServerEndpointService.stopService(self)


class ClientLinksService(ReadyService, service.MultiService):
    """Client mode's links: the provider's own (``URI``) on start, then one child
    ``ComponentLinkService`` per linked component. On stop every link closes with
    "the service is shutting down" before the children let go of theirs."""

    def __init__(self, links):
        service.MultiService.__init__(self)
        self.links = links
        self.setName("links")

    def startService(self):
        self._starting(defer.maybeDeferred(self.links.start))
        service.MultiService.startService(self)

    @defer.inlineCallbacks
    def stopService(self):
        yield self.links.stop()
        yield service.MultiService.stopService(self)


class ComponentLinkService(service.Service):
    """One component's client link (held by owner name, shared when settings are equal)."""

    log = Logger()

    def __init__(self, links, owner: str, config):
        self.links = links
        self.owner = owner
        self.config = config
        self.error = None
        self.setName(owner)

    def startService(self):
        service.Service.startService(self)
        try:
            self.links.attach(self.owner, self.config)
        except Exception as e:  # a bad link config: said by the provider to whoever linked it
            self.error = e
            self.log.error("client link {owner} cannot start: {error}", owner=self.owner, error=e)

    def stopService(self):
        service.Service.stopService(self)
        return self.links.detach(self.owner)
