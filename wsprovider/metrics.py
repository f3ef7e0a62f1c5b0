"""Prometheus metrics for one provider, in its own ``CollectorRegistry``.

The per-message counters already live in ``server.SessionStats`` (plain integer
increments on the hot path); a custom collector turns them into metric families when
``/metrics`` is scraped, so serving traffic costs nothing extra. Only the request-latency
histogram is observed as it happens, once per peer request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ._version import __version__
from .interfaces import lattice_connected

PREFIX = "wsprovider"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)


def _counter(name, doc, value, labels=None, label_name=None):
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[label_name] if label_name else None)
    if label_name:
        for label, v in sorted(value.items()):
            family.add_metric([str(label)], v)
    else:
        family.add_metric([], value)
    return family


def _gauge(name, doc, value):
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc)
    family.add_metric([], value)
    return family


class ProviderCollector:
    """Reads the provider's counters at scrape time."""

    def __init__(self, provider):
        self._provider = provider

    def describe(self):
        return []  # families vary with the labels seen; let the registry call collect()

    def collect(self):
        provider = self._provider
        info = GaugeMetricFamily(f"{PREFIX}_info", "wsprovider version and lattice",
                                 labels=["version", "mode", "lattice"])
        info.add_metric([__version__, provider.config.mode, str(provider.lattice.name)], 1)
        yield info
        connected = lattice_connected(provider.lattice)
        yield _gauge("lattice_connected", "1 when the lattice (e.g. the NATS link) is connected", 1 if connected else 0)
        yield _gauge("listening", "1 while the server port is open", 1 if provider.listening_port is not None else 0)
        ws = provider.ws  # server mode only (metrics are served by server mode's site): the factory
        stats = ws.stats
        yield _gauge("draining", "1 while the service drains on shutdown", 1 if ws.draining else 0)
        yield _gauge("sessions", "WebSocket sessions open now", stats.sessions_opened - stats.sessions_closed)
        yield _gauge("inflight_requests", "peers' requests waiting for a reply", ws.inflight)
        yield _counter("sessions_opened", "WebSocket sessions opened", stats.sessions_opened)
        yield _counter("sessions_closed", "WebSocket sessions closed", stats.sessions_closed)
        yield _counter("messages_in", "WebSocket messages received from peers", stats.messages_in)
        yield _counter("messages_out", "WebSocket messages sent to peers (frames of every type)", stats.messages_out)
        yield _counter("bytes_in", "payload bytes received from peers", stats.bytes_in)
        yield _counter("bytes_out", "payload bytes sent to peers (before compression)", stats.bytes_out)
        yield _counter("errors", "error frames sent to peers, by code", stats.errors, label_name="code")
        yield _counter("slow_consumer_closes", "sessions closed as slow consumers (4008)", stats.slow_consumer_closes)
        yield _counter("rate_limited", "messages dropped by the per-session rate limit", stats.rate_limited)
        yield _counter("rate_limit_closes", "sessions closed (1008) for exceeding the rate limit repeatedly",
                       stats.rate_limit_closes)
        yield _counter("handshakes_refused", "WebSocket upgrades refused, by kind "
                       "(auth, origin, max_connections, draining, subprotocol, bad_request, pending_handshakes, "
                       "address_handshakes)",
                       stats.refusals, label_name="kind")
        yield _gauge("handshakes_pending", "connections not upgraded to WebSocket yet",
                     stats.handshakes_pending)
        yield _counter("handshake_timeouts", "connections closed for not upgrading within HANDSHAKE_TIMEOUT_SEC",
                       stats.handshake_timeouts)
        yield _counter("requests_cancelled", "peers' requests cancelled because their session ended",
                       stats.requests_cancelled)
        yield _counter("fragment_closes", "sessions closed (1008) for more than MAX_FRAGMENTS_PER_MESSAGE",
                       stats.fragment_closes)
        yield _counter("auth_refusals", "credentials refused, by reason (missing, invalid, expired, audience, "
                       "issuer, signature, ...)", stats.auth_refusals, label_name="reason")


class ProviderMetrics:
    """The registry of one provider and the one metric observed live (request latency)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, provider):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProviderCollector(provider))
        self.request_latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "time from a peer's request frame to its reply or error", registry=self.registry,
            buckets=LATENCY_BUCKETS)

    def render(self) -> bytes:
        return generate_latest(self.registry)
