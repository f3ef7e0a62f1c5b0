"""The provider's service tree (wsprovider.services, provider.ServerMode / ClientMode)."""

from twisted.application import service
from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from wsprovider.config import ProviderConfig
from wsprovider.interfaces import IStartable
from wsprovider.lattice.local import LocalLattice
from wsprovider.provider import IProviderMode, WebSocketMessagingProvider
from wsprovider.services import LatticeService, SequentialMultiService


class Step(service.Service):
    """A child that records its start and stop, and stops when told to."""

    def __init__(self, name, journal):
        self.setName(name)
        self.journal = journal
        self.stopping = None

    def startService(self):
        service.Service.startService(self)
        self.journal.append(("start", self.name))

    def stopService(self):
        service.Service.stopService(self)
        self.journal.append(("stop", self.name))
        self.stopping = defer.Deferred()
        return self.stopping


class SequentialMultiServiceTests(unittest.TestCase):
    def test_children_stop_one_after_another_last_first(self):
        journal = []
        parent = SequentialMultiService()
        steps = [Step(name, journal) for name in ("lattice", "sessions", "listener")]
        for step in steps:
            step.setServiceParent(parent)
        parent.startService()
        stopped = parent.stopService()
        self.assertEqual(journal[-1], ("stop", "listener"))  # the others wait for it
        steps[2].stopping.callback(None)
        self.assertEqual(journal[-1], ("stop", "sessions"))
        steps[1].stopping.callback(None)
        self.assertNoResult(stopped)
        steps[0].stopping.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(journal, [("start", "lattice"), ("start", "sessions"), ("start", "listener"),
                                   ("stop", "listener"), ("stop", "sessions"), ("stop", "lattice")])

    def test_a_failing_child_does_not_stop_the_others_from_stopping(self):
        journal = []
        parent = SequentialMultiService()
        first, second = Step("first", journal), Step("second", journal)
        first.setServiceParent(parent)
        second.setServiceParent(parent)
        parent.startService()
        stopped = parent.stopService()
        second.stopping.errback(RuntimeError("boom"))
        first.stopping.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


@implementer(IStartable)
class StartableLattice(LocalLattice):
    started = 0

    def start(self):
        self.started += 1
        return defer.succeed(self)


class LatticeServiceTests(unittest.TestCase):
    def test_starts_a_startable_lattice_and_closes_it(self):
        lattice = StartableLattice(task.Clock())
        lattice_service = LatticeService(lattice)
        lattice_service.startService()
        self.assertEqual(lattice.started, 1)
        self.assertIs(self.successResultOf(lattice_service.when_started()), lattice)
        self.successResultOf(lattice_service.stopService())
        self.assertFalse(lattice.connected)

    def test_a_plain_lattice_is_ready_at_once(self):
        lattice_service = LatticeService(LocalLattice(task.Clock()))
        lattice_service.startService()
        self.successResultOf(lattice_service.when_started())


class ProviderTreeTests(unittest.TestCase):
    def tree(self, mode, **extra):
        values = {"MODE": mode, "URI": "tcp:0:interface=127.0.0.1" if mode == "server" else "ws://127.0.0.1:1/ws"}
        values.update(extra)
        provider = WebSocketMessagingProvider(ProviderConfig.from_mapping(values), reactor=task.Clock())
        return provider, [child.name for child in provider]

    def test_server_mode_tree(self):
        provider, names = self.tree("server")
        self.assertEqual(names, ["lattice", "handlers", "cluster", "sessions", "listener"])
        verifyObject(IProviderMode, provider.mode)
        self.assertEqual(provider.mode.name, "server")
        self.assertIsNone(provider.listening_port)

    def test_client_mode_tree_has_a_service_per_link(self):
        provider, names = self.tree("client")
        self.assertEqual(names, ["lattice", "handlers", "links"])
        verifyObject(IProviderMode, provider.mode)
        provider.receive_link_config_as_target("c1", {"URI": "ws://127.0.0.1:2/ws"})
        links = provider.getServiceNamed("links")
        self.assertEqual([child.name for child in links], ["target:c1"])
        provider.delete_link_as_target("c1")
        self.assertEqual(list(links), [])

    def test_not_started_provider_refuses_politely(self):
        provider, _ = self.tree("server")
        self.failureResultOf(provider.publish(None), Exception)
        self.assertEqual(provider.list_sessions(), [])
        self.assertFalse(provider.is_ready())
        self.failureResultOf(provider.when_ready())


class ListeningFailureTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_port_in_use_fails_when_ready_and_is_logged_once(self):
        import socket
        from twisted.internet.error import CannotListenError
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        provider = WebSocketMessagingProvider(ProviderConfig.from_mapping(
            {"MODE": "server", "URI": f"tcp:{port}:interface=127.0.0.1"}))
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        provider.startService()
        self.addCleanup(provider.shutdown)
        error = yield self.assertFailure(provider.when_ready(), CannotListenError)
        self.assertIn(str(port), str(error))
        self.assertFalse(provider.is_ready())
        # One "wsprovider could not start" line naming the setting, no traceback, and no
        # "Unhandled Error" beside it.
        said = [e for e in events if "could not start" in e.get("log_format", "")]
        self.assertEqual(len(said), 1)
        self.assertIn("--uri", said[0]["why"])
        self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 0)
