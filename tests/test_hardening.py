"""Production hardening, end to end with real peers: auth (tokens, JWT), origins, TLS,
compression, rate limits, max connections, drain, health/readiness, metrics, admin."""

import datetime
import ipaddress
import json
import os
import ssl
import time

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer

from wsprovider import BrokerMessage, IMessageHandler
from wsprovider.config import ProviderConfig
from wsprovider.handlers import echo
from wsprovider.interfaces import IConnectionState
from wsprovider.lattice.local import LocalLattice
from wsprovider.ratelimit import SessionRateLimiter, TokenBucket

from .peers import WebsocketsPeer, as_deferred, start_provider, ws_url
from .test_server import Recorder

SECRET = "a-test-hmac-secret-of-at-least-32-bytes!"


@defer.inlineCallbacks
def http(method, url, headers=None):
    """(status, headers, body) of one HTTP request, with twisted.web's Agent."""
    agent = Agent(reactor)
    h = Headers({k: [v] for k, v in (headers or {}).items()})
    response = yield agent.request(method, url.encode(), h, None)
    body = yield readBody(response)
    return response.code, response.headers, body


def base_url(provider, scheme="http"):
    return f"{scheme}://127.0.0.1:{provider.port}"


@defer.inlineCallbacks
def refused(url, **kwargs):
    """Connect, expecting the upgrade to be refused; return the HTTP response."""
    import websockets
    try:
        kwargs.setdefault("subprotocols", ["wsprovider.v1.json"])
        conn = yield as_deferred(websockets.connect(url, **kwargs))
    except websockets.exceptions.InvalidStatus as e:
        return e.response
    yield as_deferred(conn.close())
    raise AssertionError(f"{url}: the upgrade was accepted")


def make_jwt(claims=None, key=SECRET, algorithm="HS256", **overrides):
    now = int(time.time())
    payload = {"sub": "alice", "aud": "wsprovider", "iss": "https://issuer.test", "iat": now, "exp": now + 300}
    payload.update(claims or {})
    payload.update(overrides)
    return jwt.encode(payload, key, algorithm=algorithm)


@defer.inlineCallbacks
def drain_frames(peer):
    """Every frame until the server closes; returns (frames, close code)."""
    import websockets
    frames = []
    while True:
        try:
            frames.append(json.loads((yield peer.recv())))
        except websockets.exceptions.ConnectionClosed:
            break
    code, _ = yield peer.wait_closed()
    return frames, code


class SessionWatcher:
    """A factory observer: Deferreds for the next session closing."""

    def __init__(self):
        self._closed = []

    def session_opened(self, session):
        pass

    def session_closed(self, session, code, reason):
        waiting, self._closed = self._closed, []
        for d in waiting:
            d.callback((session, code))

    def next_close(self):
        d = defer.Deferred()
        self._closed.append(d)
        return d


# -- authentication ------------------------------------------------------------------------

class TokenAuthTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.provider = yield start_provider(self, {"AUTH_TOKEN": "s3cret-one", "AUTH_TOKENS": "s3cret-two,s3cret-3"},
                                             handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])
        self.url = ws_url(self.provider)

    @defer.inlineCallbacks
    def test_missing_token_is_401(self):
        response = yield refused(self.url)
        self.assertEqual(response.status_code, 401)
        self.assertEqual(response.headers.get("WWW-Authenticate"), 'Bearer realm="wsprovider"')
        self.assertIn("authentication required", response.reason_phrase)
        self.assertEqual(self.provider.ws.stats.auth_refusals["missing"], 1)
        self.assertEqual(self.provider.ws.stats.refusals["auth"], 1)
        self.assertEqual(self.provider.list_sessions(), [])

    @defer.inlineCallbacks
    def test_wrong_token_in_header_is_401_and_not_echoed(self):
        response = yield refused(self.url, additional_headers={"Authorization": "Bearer s3cret-wrong"})
        self.assertEqual(response.status_code, 401)
        self.assertNotIn("s3cret", response.reason_phrase + repr(response.body))
        self.assertEqual(self.provider.ws.stats.auth_refusals["invalid"], 1)

    @defer.inlineCallbacks
    def test_wrong_token_in_query_is_401(self):
        response = yield refused(self.url + "?token=nope")
        self.assertEqual(response.status_code, 401)

    @defer.inlineCallbacks
    def test_valid_token_in_header(self):
        for token in ("s3cret-one", "s3cret-two", "s3cret-3"):
            peer = yield WebsocketsPeer.connect(self.url, additional_headers={"Authorization": f"Bearer {token}"})
            yield peer.send_json({"subject": "echo.x", "body": "hi"})
            self.assertEqual((yield peer.recv_json())["body"], "hi")
            yield peer.close()

    @defer.inlineCallbacks
    def test_valid_token_in_query_parameter(self):
        peer = yield WebsocketsPeer.connect(self.url + "?token=s3cret-two")
        self.assertEqual(self.provider.list_sessions()[0]["principal"], "token")
        yield peer.close()

    def test_secrets_are_not_in_the_config_repr(self):
        text = repr(self.provider.config)
        self.assertNotIn("s3cret", text)


class JwtAuthTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.recorder = Recorder()
        self.provider = yield start_provider(self, {
            "JWT_SECRET": SECRET, "JWT_AUDIENCE": "wsprovider", "JWT_ISSUER": "https://issuer.test",
            "JWT_LEEWAY_SEC": "0"}, handlers=[("recorder", self.recorder, {"SUBSCRIPTIONS": "chat.>,app.>"})])
        self.url = ws_url(self.provider)

    @defer.inlineCallbacks
    def test_wrong_audience_is_refused(self):
        response = yield refused(self.url + "?token=" + make_jwt(aud="someone-else"))
        self.assertEqual(response.status_code, 401)
        self.assertIn("audience", response.reason_phrase)
        self.assertEqual(self.provider.ws.stats.auth_refusals["audience"], 1)

    @defer.inlineCallbacks
    def test_wrong_issuer_is_refused(self):
        response = yield refused(self.url, additional_headers={
            "Authorization": "Bearer " + make_jwt(iss="https://evil.test")})
        self.assertEqual(response.status_code, 401)
        self.assertEqual(self.provider.ws.stats.auth_refusals["issuer"], 1)

    @defer.inlineCallbacks
    def test_expired_is_refused(self):
        token = make_jwt(exp=int(time.time()) - 60)
        response = yield refused(self.url, additional_headers={"Authorization": "Bearer " + token})
        self.assertEqual(response.status_code, 401)
        self.assertIn("expired", response.reason_phrase)
        self.assertEqual(self.provider.ws.stats.auth_refusals["expired"], 1)

    @defer.inlineCallbacks
    def test_not_yet_valid_and_bad_signature_are_refused(self):
        response = yield refused(self.url + "?token=" + make_jwt(nbf=int(time.time()) + 600))
        self.assertEqual(response.status_code, 401)
        response = yield refused(self.url + "?token=" + make_jwt(key=SECRET + "x"))
        self.assertEqual(response.status_code, 401)
        self.assertEqual(self.provider.ws.stats.auth_refusals["signature"], 1)

    @defer.inlineCallbacks
    def test_valid_jwt_narrows_permissions(self):
        token = make_jwt({"ws_pub": ["chat.>"], "ws_sub": {"allow": ["chat.>"], "deny": ["chat.secret"]}})
        peer = yield WebsocketsPeer.connect(self.url, additional_headers={"Authorization": "Bearer " + token})
        self.assertEqual(self.provider.list_sessions()[0]["principal"], "alice")
        # Allowed by the token.
        got = self.recorder.next()
        yield peer.send_json({"subject": "chat.room1", "body": "hi"})
        self.assertEqual((yield got).subject, "chat.room1")
        # The service allows app.> but the token does not.
        yield peer.send_json({"subject": "app.orders", "body": "no", "id": 1})
        error = yield peer.recv_json()
        self.assertEqual((error["type"], error["code"], error["id"]), ("error", "permission_denied", 1))
        yield peer.send_json({"type": "subscribe", "subject": "news.>", "id": 2})
        error = yield peer.recv_json()
        self.assertEqual(error["code"], "permission_denied")
        yield peer.send_json({"type": "subscribe", "subject": "chat.secret", "id": 3})
        self.assertEqual((yield peer.recv_json())["code"], "permission_denied")
        yield peer.subscribe("chat.room1")
        self.assertEqual([m.subject for m in self.recorder.received], ["chat.room1"])
        yield peer.close()

    @defer.inlineCallbacks
    def test_jwt_without_claims_keeps_service_permissions(self):
        peer = yield WebsocketsPeer.connect(self.url + "?token=" + make_jwt())
        got = self.recorder.next()
        yield peer.send_json({"subject": "app.orders", "body": "yes"})
        self.assertEqual((yield got).subject, "app.orders")
        yield peer.close()

    @defer.inlineCallbacks
    def test_session_closes_when_the_jwt_expires(self):
        peer = yield WebsocketsPeer.connect(self.url + "?token=" + make_jwt(exp=int(time.time()) + 1))
        code, reason = yield peer.wait_closed()
        self.assertEqual(code, 1008)
        self.assertIn("expired", reason)


class PublicKeyJwtTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
        self.pem_path = path
        self.provider = yield start_provider(self, {"JWT_PUBLIC_KEY": path, "JWT_AUDIENCE": "wsprovider"})

    @defer.inlineCallbacks
    def test_es256(self):
        token = make_jwt(key=self.key, algorithm="ES256")
        peer = yield WebsocketsPeer.connect(ws_url(self.provider) + "?token=" + token)
        yield peer.close()

    @defer.inlineCallbacks
    def test_hmac_with_the_public_key_is_refused(self):
        """Algorithm confusion: HS256 signed with the public PEM as secret must not pass."""
        import hmac as _hmac, hashlib, base64

        def b64(data):
            return base64.urlsafe_b64encode(data).rstrip(b"=")
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = b64(json.dumps({"aud": "wsprovider", "exp": int(time.time()) + 60}).encode())
        with open(self.pem_path, "rb") as f:
            pem = f.read()
        sig = b64(_hmac.new(pem, header + b"." + body, hashlib.sha256).digest())
        token = (header + b"." + body + b"." + sig).decode()
        response = yield refused(ws_url(self.provider) + "?token=" + token)
        self.assertEqual(response.status_code, 401)
        self.assertIn("not accepted", response.reason_phrase)

    @defer.inlineCallbacks
    def test_algorithm_the_key_cannot_check_is_a_counted_401(self):
        """An RS256 header while JWT_PUBLIC_KEY is an EC key, and garbage that merely has two
        dots: 401 each, counted as invalid, never a 500."""
        import base64

        def b64(data):
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        body = b64(json.dumps({"aud": "wsprovider", "exp": int(time.time()) + 60}).encode())
        tokens = [b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode()) + "." + body + "." + b64(b"x" * 256),
                  b64(json.dumps({"alg": ["ES256"]}).encode()) + "." + body + ".sig",
                  b64(b"\xff\xfe not json") + "." + body + ".sig"]
        for token in tokens:
            response = yield refused(ws_url(self.provider) + "?token=" + token)
            self.assertEqual(response.status_code, 401)
        self.assertEqual(self.provider.ws.stats.auth_refusals["invalid"], len(tokens))
        self.assertEqual(self.provider.ws.stats.refusals["auth"], len(tokens))
        self.assertEqual(self.flushLoggedErrors(), [])


# -- origins, TLS, compression -------------------------------------------------------------

class OriginTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_allowlist(self):
        provider = yield start_provider(self, {"ALLOWED_ORIGINS": "https://app.example.com,https://*.corp.test"})
        url = ws_url(provider)
        for origin in ("https://app.example.com", "https://x.corp.test"):
            peer = yield WebsocketsPeer.connect(url, origin=origin)
            yield peer.close()
        for origin in ("https://evil.example.com", "http://app.example.com", "https://app.example.com:8443", "null"):
            response = yield refused(url, additional_headers={"Origin": origin})
            self.assertEqual(response.status_code, 403, origin)
        self.assertEqual(provider.ws.stats.refusals["origin"], 4)
        # Non-browser clients send no Origin and are not affected.
        peer = yield WebsocketsPeer.connect(url)
        yield peer.close()

    @defer.inlineCallbacks
    def test_null_origin_switch(self):
        provider = yield start_provider(self, {"ALLOW_NULL_ORIGIN": "true", "ALLOWED_ORIGINS": "https://app.example.com"})
        peer = yield WebsocketsPeer.connect(ws_url(provider), additional_headers={"Origin": "null"})
        yield peer.close()


def make_ca_and_server_cert(directory):
    """A CA and a server certificate for 127.0.0.1/localhost; returns (ca.pem, key.pem, cert.pem) paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wsprovider test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    os.makedirs(directory, exist_ok=True)
    paths = tuple(os.path.join(directory, n) for n in ("ca.pem", "key.pem", "cert.pem"))
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(paths[2], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return paths


class TlsTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.ca, key, cert = make_ca_and_server_cert(self.mktemp())
        self.provider = yield start_provider(
            self, {"URI": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"},
            handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])
        self.url = f"wss://127.0.0.1:{self.provider.port}/ws"

    @defer.inlineCallbacks
    def test_wss_verified_against_the_test_ca(self):
        context = ssl.create_default_context(cafile=self.ca)
        peer = yield WebsocketsPeer.connect(self.url, ssl=context)
        yield peer.send_json({"subject": "echo.tls", "body": "over tls"})
        self.assertEqual((yield peer.recv_json())["body"], "over tls")
        yield peer.close()

    @defer.inlineCallbacks
    def test_untrusted_certificate_is_rejected_by_the_client(self):
        context = ssl.create_default_context()  # system CAs only
        with self.assertRaises(ssl.SSLCertVerificationError):
            yield WebsocketsPeer.connect(self.url, ssl=context)


class CompressionTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_off_by_default(self):
        provider = yield start_provider(self, handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])
        peer = yield WebsocketsPeer.connect(ws_url(provider))  # websockets offers permessage-deflate
        self.assertIsNone(peer.conn.response.headers.get("Sec-WebSocket-Extensions"))
        self.assertEqual(peer.conn.protocol.extensions, [])
        yield peer.close()

    @defer.inlineCallbacks
    def test_negotiated_when_enabled_without_context_takeover(self):
        provider = yield start_provider(self, {"COMPRESSION": "true", "COMPRESSION_WINDOW_BITS": "10"},
                                        handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])
        peer = yield WebsocketsPeer.connect(ws_url(provider))
        header = peer.conn.response.headers.get("Sec-WebSocket-Extensions")
        self.assertIn("permessage-deflate", header)
        self.assertIn("server_no_context_takeover", header)
        self.assertIn("server_max_window_bits=10", header)
        self.assertIn("client_max_window_bits=10", header)
        (extension,) = peer.conn.protocol.extensions
        self.assertTrue(extension.remote_no_context_takeover)
        self.assertEqual(extension.remote_max_window_bits, 10)
        body = "compressible " * 2000
        for _ in range(3):
            yield peer.send_json({"subject": "echo.big", "body": body})
            self.assertEqual((yield peer.recv_json())["body"], body)
        yield peer.close()


# -- limits ----------------------------------------------------------------------------------

class RateLimiterUnitTests(unittest.TestCase):
    def test_bucket_refills_and_allows_debt(self):
        bucket = TokenBucket(10, 10, now=0.0)
        self.assertTrue(all(bucket.take(1, 0.0) for _ in range(10)))
        self.assertFalse(bucket.take(1, 0.0))
        self.assertTrue(bucket.take(1, 0.1))     # 1 token back after 100 ms
        self.assertFalse(bucket.take(1, 0.1))
        big = TokenBucket(100, 100, now=0.0)
        self.assertTrue(big.take(250, 0.0))      # larger than the bucket: passes, leaves debt
        self.assertFalse(big.take(1, 1.0))       # -150 + 100
        self.assertTrue(big.take(1, 2.0))

    def test_violations_within_the_window(self):
        clock = [0.0]
        limiter = SessionRateLimiter(msgs_per_sec=1, burst_sec=1, max_violations=3, window_sec=10,
                                     clock=lambda: clock[0])
        self.assertTrue(limiter.allow(10))
        self.assertFalse(limiter.allow(10))
        self.assertFalse(limiter.violation())
        self.assertFalse(limiter.violation())
        clock[0] = 20.0  # the first two have left the window
        self.assertFalse(limiter.violation())
        self.assertFalse(limiter.violation())
        self.assertTrue(limiter.violation())

    def test_off_when_no_rate(self):
        self.assertIsNone(SessionRateLimiter.from_config(ProviderConfig.from_mapping({})))


class RateLimitTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_rate_limited_then_closed_1008(self):
        provider = yield start_provider(self, {
            "RATE_LIMIT_MSGS_PER_SEC": "5", "RATE_LIMIT_BURST_SEC": "1", "RATE_LIMIT_MAX_VIOLATIONS": "3"},
            handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])
        peer = yield WebsocketsPeer.connect(ws_url(provider))
        for i in range(40):
            peer.conn.protocol.send_text(json.dumps({"subject": "echo.x", "body": str(i)}).encode())
        peer.conn.send_data()  # flush what the sans-I/O protocol queued, in one go
        frames, code = yield drain_frames(peer)
        self.assertEqual(code, 1008)
        replies = [f for f in frames if f["type"] == "message"]
        errors = [f for f in frames if f["type"] == "error"]
        self.assertGreaterEqual(len(replies), 5)
        self.assertEqual([r["body"] for r in replies], [str(i) for i in range(len(replies))])
        self.assertEqual({e["code"] for e in errors}, {"rate_limited"})
        self.assertEqual(len(errors), 2)  # the third violation closes instead
        stats = provider.ws.stats
        self.assertEqual(stats.rate_limit_closes, 1)
        self.assertEqual(stats.rate_limited, 3)

    @defer.inlineCallbacks
    def test_byte_rate_without_closing(self):
        provider = yield start_provider(self, {
            "RATE_LIMIT_BYTES_PER_SEC": "1000", "RATE_LIMIT_MAX_VIOLATIONS": "0"},
            handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])
        peer = yield WebsocketsPeer.connect(ws_url(provider))
        body = "x" * 600
        for _ in range(4):
            yield peer.send_json({"subject": "echo.x", "body": body})
        kinds = []
        while len(kinds) < 4:
            frame = yield peer.recv_json()
            kinds.append(frame.get("code") or frame["type"])
        self.assertEqual(kinds[:2], ["message", "message"])  # 1000 -> 400 -> -200 (debt)
        self.assertIn("rate_limited", kinds[2:])
        yield peer.send_json({"type": "ping", "id": 1})  # still open (it may be limited too, but answers)
        frame = yield peer.recv_json()
        self.assertIn(frame["type"], ("pong", "error"))
        yield peer.close()


class MaxConnectionsTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_refused_with_503_then_admitted_again(self):
        provider = yield start_provider(self, {"MAX_CONNECTIONS": "2"})
        watcher = SessionWatcher()
        provider.ws.add_observer(watcher)
        url = ws_url(provider)
        a = yield WebsocketsPeer.connect(url)
        b = yield WebsocketsPeer.connect(url)
        response = yield refused(url)
        self.assertEqual(response.status_code, 503)
        self.assertIn("MAX_CONNECTIONS", response.reason_phrase)
        self.assertEqual(response.headers.get("Retry-After"), "5")
        self.assertEqual(provider.ws.stats.refusals["max_connections"], 1)
        gone = watcher.next_close()
        yield a.close()
        yield gone
        c = yield WebsocketsPeer.connect(url)
        yield b.close()
        yield c.close()


# -- drain -------------------------------------------------------------------------------------

class Held:
    """Holds requests until the test answers them."""

    def __init__(self):
        self.consumer = None
        self.held = []
        self._waiting = []

    def __call__(self, consumer):
        self.consumer = consumer
        return self

    def handle_message(self, msg):
        self.held.append(msg)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(msg)

    def next(self):
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def answer(self, msg, body):
        return self.consumer.publish(BrokerMessage(msg.reply_to, body))


class DrainTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_in_flight_request_finishes_before_1001(self):
        held = Held()
        provider = yield start_provider(self, {"DRAIN_TIMEOUT_SEC": "10"},
                                        handlers=[("held", held, {"SUBSCRIPTIONS": "held.>"})])
        port = provider.port
        idle = yield WebsocketsPeer.connect(ws_url(provider))
        busy = yield WebsocketsPeer.connect(ws_url(provider))
        got = held.next()
        yield busy.send_json({"type": "request", "id": 7, "subject": "held.q", "body": "?", "timeout_ms": 10000})
        request = yield got
        stopped = provider.stopService()
        # The idle session is told at once; the busy one stays open for its reply.
        code, _ = yield idle.wait_closed()
        self.assertEqual(code, 1001)
        self.assertFalse(stopped.called)
        self.assertEqual(len(provider.list_sessions()), 1)
        # No longer listening: new peers cannot connect.
        from twisted.internet.error import ConnectionRefusedError
        yield self.assertFailure(http(b"GET", f"http://127.0.0.1:{port}/healthz"), ConnectionRefusedError)
        yield held.answer(request, b"answered during drain")
        reply = yield busy.recv_json()
        self.assertEqual((reply["type"], reply["id"], reply["body"]), ("reply", 7, "answered during drain"))
        code, _ = yield busy.wait_closed()
        self.assertEqual(code, 1001)
        yield stopped

    @defer.inlineCallbacks
    def test_drain_is_bounded(self):
        held = Held()
        provider = yield start_provider(self, {"DRAIN_TIMEOUT_SEC": "0.3"},
                                        handlers=[("held", held, {"SUBSCRIPTIONS": "held.>"})])
        busy = yield WebsocketsPeer.connect(ws_url(provider))
        got = held.next()
        yield busy.send_json({"type": "request", "id": 1, "subject": "held.q", "body": "?", "timeout_ms": 60000})
        yield got
        started = time.monotonic()
        yield provider.stopService()
        self.assertLess(time.monotonic() - started, 5)
        code, _ = yield busy.wait_closed()
        self.assertEqual(code, 1001)


# -- HTTP endpoints -------------------------------------------------------------------------

@implementer(IConnectionState)
class _LatticeWithALink(LocalLattice):
    """The embedded lattice declaring ``IConnectionState``, so a test can take its "link"
    down (a fake: a real outage is in test_nats_lattice_ops)."""

    def add_state_listener(self, listener):
        pass

    def remove_state_listener(self, listener):
        pass


class EndpointTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_healthz_and_readyz(self):
        provider = yield start_provider(self, lattice=_LatticeWithALink())
        code, _, body = yield http(b"GET", base_url(provider) + "/healthz")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ok"}))
        code, _, body = yield http(b"GET", base_url(provider) + "/readyz")
        self.assertEqual((code, json.loads(body)["status"]), (200, "ready"))
        provider.lattice.connected = False  # what a NATS lattice reports while its link is down
        try:
            code, _, body = yield http(b"GET", base_url(provider) + "/readyz")
        finally:
            provider.lattice.connected = True
        self.assertEqual(code, 503)
        self.assertIn("the lattice is not connected", json.loads(body)["problems"])

    @defer.inlineCallbacks
    def test_metrics_match_the_traffic(self):
        provider = yield start_provider(self, handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])
        peer = yield WebsocketsPeer.connect(ws_url(provider))
        sent = [json.dumps({"subject": "echo.m", "body": "x" * n}) for n in (1, 10, 100)]
        for text in sent:
            yield peer.send(text)
            yield peer.recv_json()
        request = json.dumps({"type": "request", "id": 1, "subject": "echo.r", "body": "q"})
        sent.append(request)
        yield peer.send(request)
        yield peer.recv_json()
        denied = json.dumps({"subject": "$SYS.x", "body": ""})
        sent.append(denied)
        yield peer.send(denied)
        yield peer.recv_json()
        yield refused(ws_url(provider), subprotocols=None, additional_headers={"Origin": "null"})

        code, headers, body = yield http(b"GET", base_url(provider) + "/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

        def value(name, **labels):
            return samples[(name, tuple(sorted(labels.items())))]

        self.assertEqual(value("wsprovider_messages_in_total"), len(sent))
        self.assertEqual(value("wsprovider_bytes_in_total"), sum(len(t.encode()) for t in sent))
        self.assertEqual(value("wsprovider_messages_out_total"), 1 + len(sent))  # welcome + one answer each
        self.assertEqual(value("wsprovider_sessions"), 1)
        self.assertEqual(value("wsprovider_sessions_opened_total"), 1)
        self.assertEqual(value("wsprovider_errors_total", code="permission_denied"), 1)
        self.assertEqual(value("wsprovider_handshakes_refused_total", kind="origin"), 1)
        self.assertEqual(value("wsprovider_request_duration_seconds_count"), 1)
        self.assertEqual(value("wsprovider_lattice_connected"), 1)
        self.assertEqual(value("wsprovider_slow_consumer_closes_total"), 0)
        self.assertEqual(value("wsprovider_rate_limited_total"), 0)
        stats = provider.ws.stats
        self.assertEqual(value("wsprovider_bytes_out_total"), stats.bytes_out)
        yield peer.close()

    @defer.inlineCallbacks
    def test_registries_are_per_provider(self):
        one = yield start_provider(self)
        two = yield start_provider(self)
        self.assertIsNot(one.metrics.registry, two.metrics.registry)
        peer = yield WebsocketsPeer.connect(ws_url(one))
        _, _, body = yield http(b"GET", base_url(two) + "/metrics")
        self.assertIn(b"wsprovider_sessions 0.0", body)
        yield peer.close()

    @defer.inlineCallbacks
    def test_admin_disabled_without_token(self):
        provider = yield start_provider(self)
        code, _, body = yield http(b"GET", base_url(provider) + "/admin/sessions")
        self.assertEqual(code, 404)
        self.assertIn("ADMIN_TOKEN", json.loads(body)["error"])

    @defer.inlineCallbacks
    def test_admin_sessions(self):
        provider = yield start_provider(self, {"ADMIN_TOKEN": "admin-s3cret"})
        peer = yield WebsocketsPeer.connect(ws_url(provider))
        url = base_url(provider) + "/admin/sessions"
        code, headers, _ = yield http(b"GET", url)
        self.assertEqual(code, 401)
        self.assertTrue(headers.getRawHeaders(b"www-authenticate"))
        code, _, _ = yield http(b"GET", url, {"Authorization": "Bearer wrong"})
        self.assertEqual(code, 403)
        code, _, _ = yield http(b"DELETE", f"{url}/{peer.session_id}", {"Authorization": "Bearer wrong"})
        self.assertEqual(code, 403)
        auth = {"Authorization": "Bearer admin-s3cret"}
        code, _, body = yield http(b"GET", url, auth)
        self.assertEqual(code, 200)
        listing = json.loads(body)
        self.assertEqual([s["session_id"] for s in listing["sessions"]], [peer.session_id])
        code, _, body = yield http(b"GET", f"{url}/{peer.session_id}", auth)
        self.assertEqual((code, json.loads(body)["address"]), (200, peer.address))
        code, _, _ = yield http(b"DELETE", f"{url}/no-such-session", auth)
        self.assertEqual(code, 404)
        code, _, body = yield http(b"DELETE", f"{url}/{peer.session_id}", auth)
        self.assertEqual((code, json.loads(body)), (200, {"disconnected": peer.session_id}))
        code, reason = yield peer.wait_closed()
        self.assertEqual(code, 1000)
        self.assertIn("administrator", reason)
