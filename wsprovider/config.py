"""Link and service configuration: the seed's keys, ours, validation, and merging.

Every setting is one row of ``SETTINGS``: its key (the seed's upper-case link-config
spelling), default, parser and help. The twistd options are generated from the same
table, so ``twistd wsprovider --help`` lists every key, and a bad value fails the same
way from a flag, a link config or the Python API: with ``ConfigError`` naming the key
and the accepted values. Nothing falls back to a default silently.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import attr

from .subjects import SubjectError, check_pattern, check_subject


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and what is accepted."""


@attr.s(frozen=True, slots=True)
class Setting:
    key: str = attr.ib()
    default: Any = attr.ib()
    parse: Callable[[str, Any], Any] = attr.ib()
    help: str = attr.ib()
    accepted: str = attr.ib(default="")
    group: str = attr.ib(default="other")   # a key of GROUPS: where --help and docs/settings.rst list it

    @property
    def attr_name(self) -> str:
        return self.key.lower()

    @property
    def flag(self) -> str:
        return self.key.lower().replace("_", "-")


# -- parsers: each takes (key, raw) and returns the value or raises ConfigError ----------

def parse_bool(key, raw):
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{key}: {raw!r} is not a boolean; accepted values: true, false (also 1/0, yes/no, on/off)")


def choice(*values):
    def parse(key, raw):
        text = str(raw).strip().lower()
        if text in values:
            return text
        raise ConfigError(f"{key}: {raw!r} is not valid; accepted values: {', '.join(values)}")
    parse.accepted = ", ".join(values)
    return parse


def integer(minimum=None, maximum=None):
    def parse(key, raw):
        try:
            value = int(str(raw).strip()) if not isinstance(raw, int) or isinstance(raw, bool) else raw
        except ValueError:
            raise ConfigError(f"{key}: {raw!r} is not an integer; {_range(minimum, maximum)}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ConfigError(f"{key}: {value} is out of range; {_range(minimum, maximum)}")
        return value
    return parse


def number(minimum=None, maximum=None):
    def parse(key, raw):
        try:
            value = float(str(raw).strip()) if not isinstance(raw, (int, float)) or isinstance(raw, bool) else float(raw)
        except ValueError:
            raise ConfigError(f"{key}: {raw!r} is not a number; {_range(minimum, maximum)}") from None
        if value != value or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ConfigError(f"{key}: {value} is out of range; {_range(minimum, maximum)}")
        return value
    return parse


def _range(minimum, maximum):
    if minimum is not None and maximum is not None:
        return f"accepted values: {minimum} to {maximum}"
    if minimum is not None:
        return f"accepted values: {minimum} or more"
    if maximum is not None:
        return f"accepted values: up to {maximum}"
    return "accepted values: any number"


def text(key, raw):
    return None if raw is None else str(raw)


def nonempty_text(key, raw):
    value = str(raw).strip()
    if not value:
        raise ConfigError(f"{key}: must not be empty")
    return value


def pattern_list(key, raw):
    """Comma-separated NATS subject patterns (also accepts a list)."""
    items = _split(raw)
    for item in items:
        try:
            check_pattern(item)
        except SubjectError as e:
            raise ConfigError(f"{key}: {e}; accepted values: comma-separated subject patterns like 'chat.>,news.*'") from None
    return tuple(items)


def subject_token(key, raw):
    value = str(raw).strip()
    try:
        check_subject(value)
    except SubjectError as e:
        raise ConfigError(f"{key}: {e}; accepted values: a subject like '_ws' or 'app.ws'") from None
    return value


def optional_subject(key, raw):
    """A literal subject, or None for empty."""
    if raw is None or not str(raw).strip():
        return None if raw is None else ""
    return subject_token(key, raw)


def string_list(key, raw):
    return tuple(_split(raw))


def choice_list(*values):
    """Comma-separated subset of ``values`` (exact spelling, as JWT algorithm names are)."""
    def parse(key, raw):
        items = _split(raw)
        for item in items:
            if item not in values:
                raise ConfigError(f"{key}: {item!r} is not valid; accepted values: comma-separated from "
                                  f"{', '.join(values)}")
        return tuple(items)
    parse.accepted = ", ".join(values)
    return parse


def _split(raw) -> list:
    if raw is None:
        return []
    if isinstance(raw, (list, tuple)):
        return [str(x).strip() for x in raw if str(x).strip()]
    return [part.strip() for part in str(raw).split(",") if part.strip()]


# -- the table ------------------------------------------------------------------------

# Concerns the settings are grouped by in ``--help`` and docs/settings.rst, essentials first.
ESSENTIALS, SERVER, CLIENT, NATS, SECURITY, SUBJECTS, LIMITS, OTHER = (
    "essentials", "server", "client", "nats", "security", "subjects", "limits", "other")
GROUPS = {
    ESSENTIALS: "Essentials",
    SERVER: "Server mode",
    CLIENT: "Client mode",
    NATS: "NATS lattice and clusters",
    SECURITY: "Authentication and origins",
    SUBJECTS: "Subjects and permissions",
    LIMITS: "Limits and timing",
    OTHER: "Other settings",
}

# Subjects no WebSocket peer can reach unless the operator says otherwise.
SYSTEM_SUBJECTS = ("$SYS.>", "_INBOX.>", "$JS.>", "$KV.>", "$O.>", "runtime.>", "wasmbus.>")

SETTINGS: tuple[Setting, ...] = (
    # The seed's keys.
    Setting("MODE", "server", choice("server", "client"),
            "server: accept WebSocket clients; client: connect out to a WebSocket server.", group=ESSENTIALS),
    Setting("URI", None, text,
            "Server mode: where to listen, as host:port (0.0.0.0:8080 for every interface; a bare port "
            "listens on loopback, as the default does) or a Twisted endpoint "
            "(tcp:8080:interface=127.0.0.1, ssl:8443:privateKey=key.pem:certKey=cert.pem); "
            "default tcp:8080:interface=127.0.0.1. A ws:// URL may name no path but WS_PATH. "
            "Client mode: the ws:// or wss:// URL to connect to.", group=ESSENTIALS),
    Setting("AUTH_TOKEN", None, text,
            "Client mode: sent as 'Authorization: Bearer <token>'. Server mode: required from peers.", group=ESSENTIALS),
    Setting("CONNECT_TIMEOUT_SEC", 30.0, number(0.1, 3600),
            "Client mode: bound on each connection attempt, opening handshake included.", group=CLIENT),
    Setting("ENABLE_SESSION_TRACKING", True, parse_bool,
            "Keep a registry of sessions for targeted sends, listing and request/reply.", group=SERVER),
    # Ours: limits and timing.
    Setting("MAX_MESSAGE_SIZE", 65536, integer(64, 64 * 1024 * 1024),
            "Largest inbound WebSocket message in bytes; a larger one closes the session with 1009.", group=LIMITS),
    Setting("OUTBOUND_BUFFER_BYTES", 1024 * 1024, integer(1024, 1024 * 1024 * 1024),
            "Per-session bound on bytes waiting to be written; over it the session is closed "
            "with 4008 (slow consumer).", group=LIMITS),
    Setting("PING_INTERVAL_SEC", 25.0, number(0, 3600),
            "Server pings each idle session this often (0: off; otherwise at least 1: Autobahn's "
            "timers have one-second granularity).", group=LIMITS),
    Setting("PING_TIMEOUT_SEC", 20.0, number(2, 3600),
            "A session that does not answer a ping within this time is dropped (at least 2: Autobahn "
            "rounds its timers down to whole seconds, so the wait is between this minus 1 and this).", group=LIMITS),
    Setting("REQUEST_TIMEOUT_MS", 5000, integer(1, 3_600_000),
            "Timeout of a peer's request frame that does not set timeout_ms.", group=LIMITS),
    Setting("MAX_REQUEST_TIMEOUT_MS", 60000, integer(1, 3_600_000),
            "Upper bound on any peer-requested timeout_ms.", group=LIMITS),
    Setting("MAX_SUBSCRIPTIONS", 100, integer(0, 100000),
            "Subscriptions one session may hold.", group=LIMITS),
    # Ours: subjects and permissions.
    Setting("SUBJECT_PREFIX", "_ws", subject_token,
            "Prefix of the service's own subjects: sessions at <prefix>.session.<id>, "
            "broadcast at <prefix>.broadcast.<subject>.", group=SUBJECTS),
    Setting("PUBLISH_ALLOW", (">",), pattern_list,
            "Subject patterns WebSocket peers may publish to (comma-separated).", group=SUBJECTS),
    Setting("PUBLISH_DENY", (), pattern_list,
            "Extra subject patterns peers may not publish to (system subjects are always denied "
            "unless ALLOW_SYSTEM_SUBJECTS is true).", group=SUBJECTS),
    Setting("SUBSCRIBE_ALLOW", (">",), pattern_list,
            "Subject patterns WebSocket peers may subscribe to.", group=SUBJECTS),
    Setting("SUBSCRIBE_DENY", (), pattern_list,
            "Extra subject patterns peers may not subscribe to.", group=SUBJECTS),
    Setting("ALLOW_SYSTEM_SUBJECTS", False, parse_bool,
            "Let peers reach system subjects ($SYS.>, _INBOX.>, $JS.>, $KV.>, runtime.>, wasmbus.>).", group=SUBJECTS),
    Setting("SUBSCRIPTIONS", (">",), pattern_list,
            "Handler links: the subjects a linked handler receives (default: everything peers send).", group=ESSENTIALS),
    Setting("CONSOLE", "auto", choice("auto", "on", "off"),
            "Server mode: the browser console at / (publish, subscribe, requests; sessions with ADMIN_TOKEN). "
            "auto: on when listening on loopback only (the default URI), off otherwise; on; off.", group=ESSENTIALS),
    Setting("SERVER_HEADER", "wsprovider", nonempty_text,
            "Server mode: the HTTP Server header (and WebSocket handshake Server header); no version is "
            "disclosed unless you put one here.", group=SERVER),
    Setting("WS_PATH", "ws", nonempty_text,
            "Server mode: the URL path of the WebSocket endpoint (without slashes).", group=SERVER),
    # Client mode.
    Setting("WIRE_MODE", "auto", choice("auto", "envelope", "raw"),
            "Client mode: auto offers the wsprovider.v1.json subprotocol and speaks the envelope if the "
            "server accepts it, plain frames otherwise; envelope insists on it; raw offers none "
            "(text frames are subject 'message', binary frames 'binary.message').", group=CLIENT),
    Setting("RECONNECT_MIN_SEC", 0.5, number(0.001, 3600),
            "Client mode: base of the reconnect backoff; attempt n waits a random time in "
            "0..min(RECONNECT_MAX_SEC, RECONNECT_MIN_SEC * 2^n) (full jitter).", group=CLIENT),
    Setting("RECONNECT_MAX_SEC", 30.0, number(0.001, 86400),
            "Client mode: cap on one reconnect delay.", group=CLIENT),
    Setting("RECONNECT_MAX_ATTEMPTS", 0, integer(0, 1_000_000_000),
            "Client mode: consecutive failed attempts after which a link gives up (state 'failed'); "
            "0: never give up.", group=CLIENT),
    Setting("CA_BUNDLE", None, text,
            "Client mode, wss://: PEM file of the CA certificates to trust instead of the system's. "
            "Server certificates are always verified.", group=CLIENT),
    Setting("OFFLINE_BUFFER_BYTES", 1024 * 1024, integer(0, 1024 * 1024 * 1024),
            "Client mode: bytes of messages held while a link is down and sent in order when it is back; "
            "when full, publish fails with buffer_full (0: no buffering).", group=CLIENT),
    Setting("OUTBOUND_SUBJECTS", (), pattern_list,
            "Client mode: lattice subject patterns forwarded to the remote server over the link "
            "(e.g. 'out.>'); empty: only what components publish through the provider or to the link's address.", group=CLIENT),
    Setting("REMOTE_SUBSCRIPTIONS", (), pattern_list,
            "Client mode, envelope wire: subject patterns the link subscribes to at the remote wsprovider "
            "server on every (re)connect.", group=CLIENT),
    Setting("MAX_REPLY_HOPS", 8, integer(0, 1000),
            "Client mode: longest chain of answers between a link's handlers and the remote server (the "
            "envelope's 'hops'); an answer past it is not sent (error loop_detected, warning logged), which "
            "cuts e.g. an echo handler against an echo server; 0: no limit.", group=CLIENT),
    Setting("MAX_ANSWERS_PER_SEC", 200.0, number(0, 1_000_000),
            "Client mode: answers per second a link's handlers may send back to the remote server (one second "
            "of burst); past it answers fail with loop_detected and a warning: the loop guard for wires "
            "without 'hops' (raw); 0: no limit.", group=CLIENT),
    # NATS lattice.
    Setting("NATS_URL", None, text,
            "NATS server URL(s), comma-separated (nats://, tls://); set: components and other instances "
            "live on this NATS bus (wasmCloud 2.x messaging); empty: the embedded lattice. Also --nats.", group=ESSENTIALS),
    Setting("NATS_SUBJECT_PREFIX", "", optional_subject,
            "Prefix applied on NATS to the subjects peers and handlers use (chat.x is <prefix>.chat.x on "
            "NATS); never to subjects whose first token starts with _ or $ (session addresses, inboxes).", group=NATS),
    Setting("NATS_CREDS", None, text, "NATS: path of a .creds file (JWT + nkey seed).", group=NATS),
    Setting("NATS_TOKEN", None, text, "NATS: authentication token.", group=NATS),
    Setting("NATS_USER", None, text, "NATS: user name (with NATS_PASSWORD).", group=NATS),
    Setting("NATS_PASSWORD", None, text, "NATS: password.", group=NATS),
    Setting("NATS_TLS_CA", None, text, "NATS, tls://: PEM file of the CA certificates to trust.", group=NATS),
    Setting("NATS_TLS_CERT", None, text, "NATS: client certificate (PEM) for mutual TLS.", group=NATS),
    Setting("NATS_TLS_KEY", None, text, "NATS: key of NATS_TLS_CERT (PEM).", group=NATS),
    Setting("NATS_BUFFER_BYTES", 1024 * 1024, integer(0, 1024 * 1024 * 1024),
            "NATS: bytes of publishes held while NATS is unreachable and sent when it is back; when full, "
            "publishes fail with buffer_full (0: no buffering, they fail with not_connected).", group=NATS),
    Setting("NATS_STARTUP_TIMEOUT_SEC", 0.0, number(0, 3600),
            "twistd: how long to wait at start for the first NATS connection before exiting with an error "
            "naming NATS_URL (0: do not wait; start at once and keep connecting in the background, "
            "/readyz says 503 meanwhile).", group=NATS),
    Setting("INSTANCE_ID", None, text,
            "Name of this instance in a cluster (list_sessions, events); default: a random id.", group=NATS),
    Setting("SESSION_EVENTS", False, parse_bool,
            "Publish a JSON event when a session joins or leaves (SESSION_JOINED_SUBJECT, SESSION_LEFT_SUBJECT).", group=NATS),
    Setting("SESSION_JOINED_SUBJECT", None, optional_subject,
            "Subject of session-joined events; default <SUBJECT_PREFIX>.events.session.joined.", group=NATS),
    Setting("SESSION_LEFT_SUBJECT", None, optional_subject,
            "Subject of session-left events; default <SUBJECT_PREFIX>.events.session.left.", group=NATS),
    Setting("CLUSTER_HEARTBEAT_SEC", 2.0, number(0.05, 3600),
            "NATS: how often each instance announces itself on <SUBJECT_PREFIX>.ctl.heartbeat; an instance "
            "silent for 3 intervals is considered gone.", group=NATS),
    Setting("CLUSTER_LIST_TIMEOUT_MS", 1000, integer(1, 60000),
            "Bound on a cluster-wide list_sessions: how long to wait for instances to answer.", group=NATS),
    # Hardening (server mode; see docs/operations.rst).
    Setting("AUTH_TOKENS", (), string_list,
            "Server mode: comma-separated tokens, any of which a peer may present (as may AUTH_TOKEN) as "
            "'Authorization: Bearer <token>' or ?token=<token>; otherwise the upgrade is refused with 401.", group=SECURITY),
    Setting("JWT_SECRET", None, text,
            "Server mode: HMAC secret; peers may present a JWT signed with it (HS256, HS384, HS512).", group=SECURITY),
    Setting("JWT_PUBLIC_KEY", None, text,
            "Server mode: path of a PEM public key; peers may present a JWT signed with its private key "
            "(RS256, ES256, ...).", group=SECURITY),
    Setting("JWT_ALGORITHMS", (), choice_list("HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
                                              "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"),
            "Server mode: accepted JWT algorithms (default: HS256 with JWT_SECRET; RS256, ES256 with "
            "JWT_PUBLIC_KEY).", group=SECURITY),
    Setting("JWT_AUDIENCE", (), string_list,
            "Server mode: a JWT's 'aud' must name one of these (comma-separated); empty: 'aud' not required.", group=SECURITY),
    Setting("JWT_ISSUER", None, text,
            "Server mode: required 'iss' claim of a JWT.", group=SECURITY),
    Setting("JWT_LEEWAY_SEC", 30.0, number(0, 3600),
            "Server mode: clock skew tolerated when checking a JWT's exp and nbf.", group=SECURITY),
    Setting("JWT_PUBLISH_CLAIM", "ws_pub", nonempty_text,
            "Server mode: JWT claim that narrows where the session may publish: a list of subject patterns, "
            "or an object {allow: [...], deny: [...]}.", group=SECURITY),
    Setting("JWT_SUBSCRIBE_CLAIM", "ws_sub", nonempty_text,
            "Server mode: JWT claim that narrows what the session may subscribe to (same shape).", group=SECURITY),
    Setting("ALLOWED_ORIGINS", (), string_list,
            "Server mode: browser origins allowed to connect, comma-separated, '*' as wildcard "
            "(https://app.example.com,https://*.example.com); empty: any origin. Others get 403.", group=SECURITY),
    Setting("ALLOW_NULL_ORIGIN", False, parse_bool,
            "Server mode: accept the 'null' origin (file:// pages, sandboxed iframes).", group=SECURITY),
    Setting("COMPRESSION", False, parse_bool,
            "Server mode: accept permessage-deflate, always with no context takeover and a bounded window.", group=SERVER),
    Setting("COMPRESSION_WINDOW_BITS", 11, integer(9, 15),
            "Server mode: deflate window (2^bits bytes) in both directions when COMPRESSION is on.", group=SERVER),
    Setting("RATE_LIMIT_MSGS_PER_SEC", 0.0, number(0, 1e9),
            "Server mode: messages per second one session may send (token bucket; 0: off); excess "
            "messages are dropped with a rate_limited error frame.", group=LIMITS),
    Setting("RATE_LIMIT_BYTES_PER_SEC", 0.0, number(0, 1e12),
            "Server mode: inbound bytes per second one session may send (0: off).", group=LIMITS),
    Setting("RATE_LIMIT_BURST_SEC", 1.0, number(0.001, 3600),
            "Server mode: bucket size, in seconds of the rate: the burst a session may send at once.", group=LIMITS),
    Setting("RATE_LIMIT_MAX_VIOLATIONS", 10, integer(0, 1_000_000),
            "Server mode: rate-limited messages within RATE_LIMIT_WINDOW_SEC after which the session is "
            "closed with 1008 (0: never close).", group=LIMITS),
    Setting("RATE_LIMIT_WINDOW_SEC", 10.0, number(0.001, 86400),
            "Server mode: window of RATE_LIMIT_MAX_VIOLATIONS.", group=LIMITS),
    Setting("MAX_CONNECTIONS", 0, integer(0, 10_000_000),
            "Server mode: concurrent WebSocket sessions; more are refused with HTTP 503 (0: no limit).", group=LIMITS),
    Setting("WORKERS", 1, integer(1, 256),
            "Server mode: processes sharing the listening socket (tcp: URIs), so sessions spread over the "
            "cores; they meet on NATS_URL, or on a nats-server the service starts on a private loopback port. "
            "Handlers run in every worker. On that private nats-server the workers deliver local-first: a "
            "message goes on NATS only when another worker needs it (docs/operations.rst, Workers). "
            "1: a single process, embedded lattice as usual.", group=SERVER),
    Setting("HANDSHAKE_TIMEOUT_SEC", 10.0, number(1, 3600),
            "Server mode: deadline for a new connection's whole HTTP request and WebSocket upgrade "
            "(also for each further request on a kept-alive HTTP connection); past it the connection "
            "is closed (408 if nothing was answered yet).", group=LIMITS),
    Setting("MAX_PENDING_HANDSHAKES", 512, integer(1, 1_000_000),
            "Server mode: connections accepted but not upgraded to WebSocket yet (they also count "
            "toward MAX_CONNECTIONS); more are answered 503 and closed at once.", group=LIMITS),
    Setting("MAX_HANDSHAKES_PER_ADDRESS", 32, integer(1, 1_000_000),
            "Server mode: not-yet-upgraded connections from one source IP address once half of "
            "MAX_PENDING_HANDSHAKES are in use; more from that address are answered 503 and closed at "
            "once, so one address cannot starve the others.", group=LIMITS),
    Setting("MAX_INFLIGHT_REQUESTS", 128, integer(0, 1_000_000),
            "Server mode: a session's request frames waiting for a reply; more are answered with a "
            "too_many_requests error frame (0: no limit).", group=LIMITS),
    Setting("MAX_TOTAL_SUBSCRIPTIONS", 100_000, integer(0, 100_000_000),
            "Server mode: subscriptions held by all sessions together; more are answered with a "
            "too_many_subscriptions error frame (0: no limit).", group=LIMITS),
    Setting("MAX_FRAGMENTS_PER_MESSAGE", 128, integer(0, 1_000_000),
            "Server mode: WebSocket frames (fragments) one inbound message may span; more close the "
            "session with 1008 (0: no limit; MAX_MESSAGE_SIZE still bounds the bytes).", group=LIMITS),
    Setting("SLOW_CONSUMER_GRACE_SEC", 5.0, number(0.1, 3600),
            "Server mode: after a slow consumer's 4008 close frame is queued behind what the socket "
            "holds, how long the peer has to read up to it before the connection is aborted.", group=LIMITS),
    Setting("DRAIN_TIMEOUT_SEC", 10.0, number(0, 3600),
            "On shutdown: how long in-flight peer requests may take to finish before the remaining "
            "sessions are closed with 1001.", group=LIMITS),
    Setting("ADMIN_TOKEN", None, text,
            "Server mode: bearer token for /admin/sessions (GET: list, DELETE /admin/sessions/<id>: "
            "disconnect); unset: admin endpoints are disabled.", group=ESSENTIALS),
)

SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}
_SECRET_KEYS = frozenset({"AUTH_TOKEN", "NATS_TOKEN", "NATS_PASSWORD",
                          "AUTH_TOKENS", "JWT_SECRET", "ADMIN_TOKEN"})
HEADER_PREFIX = "HEADER_"


class ProviderConfig:
    """Validated settings. Read as attributes (``cfg.max_message_size``) or keys (``cfg['MODE']``).

    ``headers`` holds the ``HEADER_<name>`` entries as ``{name: value}``.
    """

    __slots__ = ("_values", "headers", "extra")

    def __init__(self, values: Mapping[str, Any], headers: Mapping[str, str], extra: Mapping[str, str]):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "headers", dict(headers))
        object.__setattr__(self, "extra", dict(extra))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None = None, *, base: "ProviderConfig | None" = None,
                     strict: bool = True) -> "ProviderConfig":
        """Parse ``raw`` (string values as in a wasmCloud link config) over ``base`` or the defaults.

        Keys are case-insensitive. With ``strict``, an unknown key is an error (a typo
        should not be ignored); without, unknown keys are kept in ``extra``.
        """
        values = dict(base._values) if base else {s.key: s.default for s in SETTINGS}
        headers = dict(base.headers) if base else {}
        extra = dict(base.extra) if base else {}
        for key, value in (raw or {}).items():
            ukey = str(key).upper()
            if ukey.startswith(HEADER_PREFIX) and len(key) > len(HEADER_PREFIX):
                headers[str(key)[len(HEADER_PREFIX):]] = str(value)
                continue
            setting = SETTINGS_BY_KEY.get(ukey)
            if setting is None:
                if strict:
                    raise ConfigError(f"{key}: unknown setting; known settings: {', '.join(SETTINGS_BY_KEY)}, "
                                      f"and {HEADER_PREFIX}<name>")
                extra[ukey] = value
                continue
            values[ukey] = None if value is None and setting.default is None else setting.parse(ukey, value)
        cfg = cls(values, headers, extra)
        cfg._check_consistency()
        return cfg

    def merged(self, link_config: Mapping[str, Any] | None) -> "ProviderConfig":
        """Per-link config over these provider defaults."""
        return ProviderConfig.from_mapping(link_config, base=self, strict=False)

    def _check_consistency(self):
        if self.mode == "client":
            uri = self.uri
            if uri and not (uri.startswith("ws://") or uri.startswith("wss://")):
                raise ConfigError(f"URI: {uri!r} is not a WebSocket URL; in client mode accepted values: ws://host:port/path or wss://...")
        if self.mode == "server":
            from .endpoints import check_server_uri_path
            check_server_uri_path(self.uri, self.ws_path)
        if 0 < self.ping_interval_sec < 1:
            raise ConfigError(f"PING_INTERVAL_SEC: {self.ping_interval_sec:g} is out of range; accepted values: 0 (off) "
                              "or 1 to 3600 (Autobahn's timers have one-second granularity)")
        if self.ping_interval_sec and self.ping_timeout_sec > self.ping_interval_sec * 10:
            raise ConfigError("PING_TIMEOUT_SEC: must not exceed 10 x PING_INTERVAL_SEC")

    def __getattr__(self, name):
        try:
            return self._values[name.upper()]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key):
        return self._values[key.upper()]

    def __setattr__(self, name, value):
        raise AttributeError("ProviderConfig is immutable; use merged() or from_mapping()")

    def as_dict(self) -> dict:
        d = dict(self._values)
        d.update((HEADER_PREFIX + k, v) for k, v in self.headers.items())
        return d

    def __repr__(self):
        shown = {k: ("***" if k in _SECRET_KEYS and v else v) for k, v in self._values.items()}
        return f"ProviderConfig({shown!r}, headers={sorted(self.headers)})"

    # -- derived ----------------------------------------------------------------------

    def publish_permissions(self):
        from .subjects import Permissions
        return Permissions(self.publish_allow, self._system_deny() + (
            f"{self.subject_prefix}.broadcast.>", f"{self.subject_prefix}.ctl.>",
            f"{self.subject_prefix}.events.>") + tuple(self.publish_deny))

    def subscribe_permissions(self):
        from .subjects import Permissions
        return Permissions(self.subscribe_allow, self._system_deny() + (
            f"{self.subject_prefix}.>",) + tuple(self.subscribe_deny))

    def _system_deny(self) -> tuple:
        return () if self.allow_system_subjects else SYSTEM_SUBJECTS


def defaults() -> ProviderConfig:
    return ProviderConfig.from_mapping({})
