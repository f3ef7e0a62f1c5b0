"""A fake wasmCloud 1.x host, for tests: it starts ``wsprovider-wasmcloud`` as the real host does.

No wasmCloud 1.x host can be installed here (the last release is 1.9.2; the 2.x ``wash``
on PyPI no longer runs providers), so this follows the public host source at tag v1.9.2
(crates/host/src/wasmbus/providers/mod.rs and mod.rs, as summarised in the project's
protocol notes) and the wire captures in tests/wasmcloud1_captures/:

* the provider executable is the launcher a PAR carries (``par.write_launcher``), run with
  no arguments and an environment cleared to ``RUST_LOG`` (no PATH, no HOME);
* HostData is ``base64(JSON)`` + ``\\r\\n`` on stdin, then stdin is closed;
* links go to ``wasmbus.rpc.{L}.{provider xkey}.linkdefs.put`` (and the legacy copy on the
  provider id subject), deletes to both ends' ``.linkdefs.del``; health is a request on
  ``.health``; shutdown a request on ``.default.shutdown`` with ``{"host_id"}`` and the
  host's 300 ms timeout, after which the real host kills the process;
* components are played by wRPC peers on the lattice: ``call_consumer`` invokes the
  provider's consumer export with ``source-id`` / ``link-name`` headers as the host does
  for a component, ``serve_handler`` serves a component's handle-message.

``make_wasmcloud1_lattice(testcase)`` builds the provider's lattice in-process, for the
lattice conformance suite.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import defer, protocol, reactor

from tests.natsserver import NatsServer
from wsprovider.message import BrokerMessage
from wsprovider.nats import connect
from wsprovider.wasmcloud1 import messaging as m
from wsprovider.wasmcloud1 import xkeys
from wsprovider.wasmcloud1.hostdata import encode_host_data
from wsprovider.wasmcloud1.lattice import Wasmcloud1Lattice
from wsprovider.wasmcloud1.par import write_launcher
from wsprovider.wasmcloud1.values import Ok
from wsprovider.wasmcloud1.wrpc import Inbox, WrpcClient, WrpcServer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_ID = "NHOSTPEERTESTFAKEHOSTID000000000000000000000000000000000"
SHUTDOWN_TIMEOUT_SEC = 0.3   # the host's --provider-shutdown-delay-ms default
HEALTH_TIMEOUT_SEC = 2.0


def consumer_link(component, provider_id, config=None, secrets=None):
    return {"source_id": component, "target": provider_id, "name": "default", "wit_namespace": "wasmcloud",
            "wit_package": "messaging", "interfaces": ["consumer"], "source_config": {},
            "target_config": dict(config or {}), "source_secrets": None, "target_secrets": secrets}


def handler_link(component, provider_id, config=None, secrets=None):
    return {"source_id": provider_id, "target": component, "name": "default", "wit_namespace": "wasmcloud",
            "wit_package": "messaging", "interfaces": ["handler"], "source_config": dict(config or {}),
            "target_config": {}, "source_secrets": secrets, "target_secrets": None}


class _ProviderProcess(protocol.ProcessProtocol):
    def __init__(self, line: bytes):
        self.line = line
        self.output = bytearray()
        self.ended = defer.Deferred()
        self.status = None
        self._watchers = []

    def wait_for(self, text: bytes):
        """Fires once the provider's output contains ``text`` (its log goes to stderr)."""
        if text in self.output:
            return defer.succeed(None)
        d = defer.Deferred()
        self._watchers.append((text, d))
        return d

    def connectionMade(self):
        self.transport.write(self.line)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.output += data
        for text, d in list(self._watchers):
            if text in self.output:
                self._watchers.remove((text, d))
                d.callback(None)

    errReceived = outReceived

    def processEnded(self, reason):
        self.status = reason.value.exitCode
        watchers, self._watchers = self._watchers, []
        for text, d in watchers:
            d.errback(AssertionError(f"the provider exited ({self.status}) before logging {text!r}:\n"
                                     + self.output.decode(errors="replace")))
        self.ended.callback(self.status)


class Component:
    """A component played over wRPC: records handle-message calls and answers them."""

    def __init__(self, component_id):
        self.component_id = component_id
        self.messages = defer.DeferredQueue()
        self.received = []
        self.answer = Ok()

    def __call__(self, params, invocation):
        (msg,) = params
        self.received.append((msg, invocation.headers))
        self.messages.put(msg)
        return self.answer


class FakeHost:
    def __init__(self, testcase, nats_url, provider_id="wsprovider-test", lattice="default", config=None,
                 links=(), secrets=None, xkeys_enabled=True):
        self.testcase = testcase
        self.nats_url = nats_url
        self.provider_id = provider_id
        self.lattice = lattice
        self.host_xkey_seed = xkeys.new_seed()
        self.provider_xkey_seed = xkeys.new_seed() if xkeys_enabled else ""
        self.host_data = {
            "host_id": HOST_ID, "lattice_rpc_prefix": lattice, "link_name": "default",
            "lattice_rpc_user_jwt": "", "lattice_rpc_user_seed": "", "lattice_rpc_url": nats_url,
            "provider_key": provider_id, "env_values": {}, "instance_id": "0a3c2d9e-0000-4000-8000-000000000001",
            "link_definitions": list(links), "cluster_issuers": [], "config": dict(config or {}),
            "secrets": dict(secrets or {}),
            "host_xkey_public_key": xkeys.public_from_seed(self.host_xkey_seed) if xkeys_enabled else "",
            "provider_xkey_private_key": self.provider_xkey_seed, "default_rpc_timeout_ms": 2000,
            "structured_logging": False, "log_level": "debug",
            "otel_config": {"enable_observability": False, "protocol": "Http", "additional_ca_paths": []},
        }
        self.process = None
        self.nats = None
        self.components = {}

    @property
    def link_put_key(self):
        return xkeys.public_from_seed(self.provider_xkey_seed) if self.provider_xkey_seed else self.provider_id

    def seal_for_provider(self, secrets: dict) -> list:
        """Link secrets as the host seals them: xkv1 JSON of {name: SecretValue}, as a byte array."""
        plain = json.dumps({k: {"kind": "String", "value": v} for k, v in secrets.items()}).encode()
        return list(xkeys.seal(plain, self.host_xkey_seed, xkeys.public_from_seed(self.provider_xkey_seed)))

    @defer.inlineCallbacks
    def connect(self):
        self.nats = yield connect(self.nats_url, name="fake-wasmcloud-host")
        self.testcase.addCleanup(self.nats.close)
        self.inbox = yield Inbox(self.nats).start()
        self.wrpc = WrpcClient(self.nats, self.inbox, reactor, handshake_timeout=5, results_timeout=10)
        self.wrpc_server = WrpcServer(self.nats, self.inbox, reactor)
        self.testcase.addCleanup(self.wrpc_server.stop)
        return self

    def start_provider(self, env=None, argv=None):
        """Spawn the provider as the host does; returns its process protocol.

        ``argv``: run this command instead of the PAR launcher (e.g. twistd), same stdin and env."""
        if argv is None:
            launcher = write_launcher(os.path.join(os.path.abspath(self.testcase.mktemp()) + ".bin"),
                                      sys.executable, extra_path=REPO_ROOT)
            argv = [launcher]
        proc = _ProviderProcess(encode_host_data(self.host_data))
        clean_env = {"RUST_LOG": "info"} if env is None else env
        self.process = reactor.spawnProcess(proc, argv[0], argv, env=clean_env, path=REPO_ROOT)
        self.proc = proc
        self.testcase.addCleanup(self._kill)
        return proc

    def _kill(self):
        if self.proc.status is None:
            try:
                self.process.signalProcess("KILL")
            except Exception:
                pass
            return self.proc.ended
        return None

    def output(self) -> str:
        return self.proc.output.decode(errors="replace")

    # -- control interface ----------------------------------------------------------

    def rpc(self, suffix, key=None):
        return f"wasmbus.rpc.{self.lattice}.{key or self.provider_id}.{suffix}"

    @defer.inlineCallbacks
    def wait_healthy(self):
        """Once the provider says it serves (its log line), health-check it as the host does
        (the host's first check comes 5 s after start, with a 2 s wait)."""
        if self.process is not None:
            yield self.proc.wait_for(b"serving wasmcloud:messaging/consumer@0.2.0").addTimeout(30, reactor)
        reply = yield self.nats.request(self.rpc("health"), b"", timeout=HEALTH_TIMEOUT_SEC)
        return json.loads(reply.data)

    @defer.inlineCallbacks
    def put_link(self, link, legacy_copy=True):
        data = json.dumps(link).encode()
        yield self.nats.publish(self.rpc("linkdefs.put", self.link_put_key), data)
        if legacy_copy and self.link_put_key != self.provider_id:
            yield self.nats.publish(self.rpc("linkdefs.put"), data)
        yield self.nats.flush()

    @defer.inlineCallbacks
    def delete_link(self, link):
        gone = dict(link, source_config={}, target_config={}, source_secrets=None, target_secrets=None)
        data = json.dumps(gone).encode()
        for end in (link["source_id"], link["target"]):
            yield self.nats.publish(self.rpc("linkdefs.del", end), data)
        yield self.nats.flush()

    @defer.inlineCallbacks
    def shutdown(self, timeout=SHUTDOWN_TIMEOUT_SEC, host_id=HOST_ID):
        started = reactor.seconds()
        reply = yield self.nats.request(self.rpc("default.shutdown"), json.dumps({"host_id": host_id}).encode(),
                                        timeout=timeout)
        return reply.data, reactor.seconds() - started

    # -- components -------------------------------------------------------------------

    @defer.inlineCallbacks
    def serve_component(self, component_id):
        component = Component(component_id)
        prefix = f"{self.lattice}.{component_id}"
        yield self.wrpc_server.serve(prefix, m.HANDLER, "handle-message", m.HANDLE_MESSAGE_PARAMS,
                                     m.HANDLE_MESSAGE_RESULTS, component, queue=prefix)
        self.components[component_id] = component
        return component

    def call_consumer(self, source_id, function, params, link_name="default"):
        params_type, results_type = {"publish": (m.PUBLISH_PARAMS, m.PUBLISH_RESULTS),
                                     "request": (m.REQUEST_PARAMS, m.REQUEST_RESULTS)}[function]
        return self.wrpc.invoke(f"{self.lattice}.{self.provider_id}", m.CONSUMER, function,
                                params_type.encode(params), results_type,
                                headers={"source-id": source_id, "link-name": link_name})

    def publish_as(self, source_id, msg: BrokerMessage):
        return self.call_consumer(source_id, "publish", (msg,))

    def request_as(self, source_id, subject, body, timeout_ms):
        return self.call_consumer(source_id, "request", (subject, body, timeout_ms))


@defer.inlineCallbacks
def start_nats(testcase):
    server = NatsServer(testcase)
    yield server.start()
    return server


def make_wasmcloud1_lattice(testcase):
    """A ``Wasmcloud1Lattice`` as the provider builds it for one link group, without NATS: the
    conformance suite exercises its bus (sessions, requests, statuses); reaching components
    over wRPC is covered by tests/test_wasmcloud1_host.py."""
    lattice = Wasmcloud1Lattice(reactor, "default", "wsprovider-test")
    testcase.addCleanup(lattice.close)
    return lattice
