"""Authentication (token, user/password, nkey, JWT creds) and TLS against real servers."""

import base64
import datetime
import hashlib
import json
import os
import time

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.natsserver import NatsServer
from tests.test_nats_client import Collector
from tests.test_nats_reconnect import wait_for_servers
from wsprovider.nats import (
    AuthorizationError, ConnectionClosedError, NatsClient, State, connect,
)

NO_RETRY = dict(max_reconnect_attempts=0, connect_timeout=3)


def new_nkey(prefix):
    """(seed bytes, public key text) of a fresh nkey of the given role."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    keypair = nkeys.from_seed(bytearray(seed))
    return bytes(seed), keypair.public_key.decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(signer_seed: bytes, issuer: str, subject: str, name: str, nats: dict) -> str:
    """A NATS (ed25519-nkey) JWT, as the nsc tool would produce it."""
    header = b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {"jti": "", "iat": int(time.time()), "iss": issuer, "name": name,
              "sub": subject, "nats": nats}
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    body = b64url(json.dumps(claims).encode())
    signature = nkeys.from_seed(bytearray(signer_seed)).sign(f"{header}.{body}".encode())
    return f"{header}.{body}.{b64url(signature)}"


UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


class AuthTestCase(unittest.TestCase):
    timeout = 30
    server_config = ""

    @defer.inlineCallbacks
    def setUp(self):
        self.server = NatsServer(self, config=self.server_config)
        yield self.server.start()

    @defer.inlineCallbacks
    def assert_works(self, url=None, **options):
        client = yield connect(url or self.server.url, **NO_RETRY, **options)
        self.addCleanup(client.close)
        collector = Collector()
        yield client.subscribe("auth.check", collector)
        client.publish("auth.check", b"in")
        [msg] = yield collector.wait()
        self.assertEqual(msg.data, b"in")

    @defer.inlineCallbacks
    def assert_rejected(self, url=None, **options):
        client = NatsClient(url or self.server.url, **NO_RETRY, **options)
        errors = []
        client.on_error(errors.append)
        failure = yield self.assertFailure(client.start(), AuthorizationError)
        self.assertIn("Authorization Violation", str(failure))
        self.assertEqual(client.state, State.CLOSED)
        self.assertTrue(errors)


class TokenAuthTests(AuthTestCase):
    server_config = 'authorization { token: "s3cret-token" }'

    def test_token_option(self):
        return self.assert_works(token="s3cret-token")

    def test_token_in_url(self):
        return self.assert_works(f"nats://s3cret-token@127.0.0.1:{self.server.port}")

    def test_wrong_token(self):
        return self.assert_rejected(token="guess")


class UserPasswordAuthTests(AuthTestCase):
    server_config = 'authorization { users = [ {user: alice, password: "pa ss"} ] }'

    def test_user_password_options(self):
        return self.assert_works(user="alice", password="pa ss")

    def test_user_password_in_url(self):
        return self.assert_works(f"nats://alice:pa%20ss@127.0.0.1:{self.server.port}")

    def test_wrong_password(self):
        return self.assert_rejected(user="alice", password="nope")


USER_SEED, USER_PUBLIC = new_nkey(nkeys.PREFIX_BYTE_USER)


class NkeyAuthTests(AuthTestCase):
    server_config = f"authorization {{ users = [ {{nkey: {USER_PUBLIC}}} ] }}"

    def test_nkey_seed(self):
        return self.assert_works(nkey_seed=USER_SEED)

    def test_unknown_nkey(self):
        other_seed, _ = new_nkey(nkeys.PREFIX_BYTE_USER)
        return self.assert_rejected(nkey_seed=other_seed)


OPERATOR_SEED, OPERATOR_PUBLIC = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
ACCOUNT_SEED, ACCOUNT_PUBLIC = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
OPERATOR_JWT = encode_jwt(OPERATOR_SEED, OPERATOR_PUBLIC, OPERATOR_PUBLIC, "wsp-operator",
                          {"type": "operator", "version": 2})
ACCOUNT_JWT = encode_jwt(OPERATOR_SEED, OPERATOR_PUBLIC, ACCOUNT_PUBLIC, "wsp-account",
                         {"type": "account", "version": 2,
                          "limits": dict(UNLIMITED, imports=-1, exports=-1, wildcards=True,
                                         conn=-1, leaf=-1)})


def user_creds(account_seed=ACCOUNT_SEED, account_public=ACCOUNT_PUBLIC):
    seed, public = new_nkey(nkeys.PREFIX_BYTE_USER)
    user_jwt = encode_jwt(account_seed, account_public, public, "wsp-user",
                          dict(UNLIMITED, type="user", version=2))
    return (f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n")


class JwtAuthTests(AuthTestCase):
    server_config = (f"operator: {OPERATOR_JWT}\nresolver: MEMORY\n"
                     f"resolver_preload: {{ {ACCOUNT_PUBLIC}: {ACCOUNT_JWT} }}\n")

    def write_creds(self, text):
        path = self.mktemp() + ".creds"
        with open(path, "w") as creds:
            creds.write(text)
        return path

    def test_creds_file(self):
        return self.assert_works(creds_file=self.write_creds(user_creds()))

    def test_user_signed_by_unknown_account(self):
        stranger_seed, stranger_public = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
        return self.assert_rejected(
            creds_file=self.write_creds(user_creds(stranger_seed, stranger_public)))


# -- TLS ------------------------------------------------------------------------------

def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject, issuer_name, issuer_key, public_key, *, ca=False, sans=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pem(directory, name, certificate, key):
    cert_path = os.path.join(directory, f"{name}.pem")
    key_path = os.path.join(directory, f"{name}-key.pem")
    with open(cert_path, "wb") as cert_file:
        cert_file.write(certificate.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        with open(key_path, "wb") as key_file:
            key_file.write(key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return cert_path, key_path


def make_pki(directory):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    import ipaddress
    os.makedirs(directory, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("wsp test CA", _name("wsp test CA"), ca_key, ca_key.public_key(),
                           ca=True)
    paths = {"ca": _write_pem(directory, "ca", ca_cert, None)[0]}
    for role, sans in (("server", [x509.DNSName("localhost"),
                                   x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       ("client", [x509.DNSName("wsp-client")])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"wsp {role}", ca_cert.subject, ca_key, key.public_key(), sans=sans)
        paths[role], paths[f"{role}_key"] = _write_pem(directory, role, cert, key)
    other_ca_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _certificate("other CA", _name("other CA"), other_ca_key,
                            other_ca_key.public_key(), ca=True)
    paths["other_ca"] = _write_pem(directory, "other-ca", other_ca, None)[0]
    return paths


class TlsTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.pki = make_pki(os.path.abspath(self.mktemp()))
        config = (f'tls {{ cert_file: "{self.pki["server"]}", key_file: "{self.pki["server_key"]}", '
                  f'ca_file: "{self.pki["ca"]}", verify: true, timeout: 2 }}')
        self.server = NatsServer(self, config=config)
        yield self.server.start()

    def client_tls(self, **overrides):
        options = dict(tls_ca_file=self.pki["ca"], tls_cert_file=self.pki["client"],
                       tls_key_file=self.pki["client_key"], **NO_RETRY)
        options.update(overrides)
        return options

    @defer.inlineCallbacks
    def check_round_trip(self, client):
        self.addCleanup(client.close)
        collector = Collector()
        yield client.subscribe("secure", collector)
        client.publish("secure", b"over tls", headers={"Enc": "yes"})
        [msg] = yield collector.wait()
        self.assertEqual((msg.data, msg.headers), (b"over tls", {"Enc": "yes"}))
        self.assertTrue(client._protocol.transport.TLS)

    @defer.inlineCallbacks
    def test_tls_required_by_server_info(self):
        client = yield connect(self.server.url, **self.client_tls())
        yield self.check_round_trip(client)

    @defer.inlineCallbacks
    def test_tls_url_with_hostname(self):
        client = yield connect(f"tls://localhost:{self.server.port}", **self.client_tls())
        yield self.check_round_trip(client)

    @defer.inlineCallbacks
    def assert_refused(self, reason, **overrides):
        client = NatsClient(self.server.url, **self.client_tls(**overrides))
        error = yield self.assertFailure(client.start(), ConnectionClosedError)
        self.assertIn(reason, str(error))
        self.assertEqual(client.state, State.CLOSED)

    def test_untrusted_server_certificate_is_refused(self):
        return self.assert_refused("certificate verify failed", tls_ca_file=self.pki["other_ca"])

    def test_platform_trust_does_not_accept_a_private_ca(self):
        return self.assert_refused("certificate verify failed", tls_ca_file=None)

    def test_hostname_mismatch_is_refused(self):
        return self.assert_refused("DNSMismatch", tls_hostname="example.org")

    def test_server_requires_a_client_certificate(self):
        return self.assert_refused("certificate required", tls_cert_file=None)


class TlsClusterFailoverTests(unittest.TestCase):
    """Servers learned from INFO ``connect_urls`` are advertised by IP; the certificate is
    still verified against the hostname the user configured (as nats-py and nats.go do)."""

    timeout = 30

    @defer.inlineCallbacks
    def test_fails_over_to_learned_server_verified_by_configured_hostname(self):
        from tests.natsserver import start_cluster
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _certificate("wsp test CA", _name("wsp test CA"), ca_key,
                               ca_key.public_key(), ca=True)
        ca_path = _write_pem(directory, "ca", ca_cert, None)[0]
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate("wsp server", ca_cert.subject, ca_key, key.public_key(),
                            sans=[x509.DNSName("localhost")])  # not 127.0.0.1
        cert_path, key_path = _write_pem(directory, "server", cert, key)
        config = f'tls {{ cert_file: "{cert_path}", key_file: "{key_path}", timeout: 2 }}'
        servers = yield start_cluster(self, size=2, config=config)
        client = NatsClient(f"tls://localhost:{servers[0].port}", tls_ca_file=ca_path,
                            randomize_servers=False, connect_timeout=2,
                            reconnect_max_delay=0.2)
        self.addCleanup(client.close)
        yield client.start()
        self.assertEqual(client.connected_server.port, servers[0].port)
        yield wait_for_servers(client, [servers[1].port])  # may come in a later INFO
        [learned] = [s for s in client.pool.servers if s.port == servers[1].port]
        self.assertEqual(learned.host, "127.0.0.1")
        yield servers[0].kill()
        yield client.when_connected().addTimeout(10, reactor)
        self.assertEqual(client.connected_server.port, servers[1].port)
        collector = Collector()
        yield client.subscribe("after.failover", collector)
        client.publish("after.failover", b"still tls")
        [msg] = yield collector.wait()
        self.assertEqual(msg.data, b"still tls")
        self.assertTrue(client._protocol.transport.TLS)
