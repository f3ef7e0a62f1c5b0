"""HostData parsing and validation (wsprovider.wasmcloud1.hostdata), without I/O."""

import base64
import json

from twisted.trial import unittest

from tests.wasmcloud1host import consumer_link
from wsprovider.wasmcloud1 import xkeys
from wsprovider.wasmcloud1.hostdata import HostDataError, encode_host_data, read_host_data
from wsprovider.wasmcloud1.links import LinkError


def minimal(**extra):
    obj = {"host_id": "NHOST", "lattice_rpc_prefix": "default", "provider_key": "wsprovider",
           "env_values": {}, "link_definitions": []}
    obj.update(extra)
    return obj


class ReadTests(unittest.TestCase):
    def test_minimal_line_with_defaults(self):
        hd = read_host_data(encode_host_data(minimal()))
        self.assertEqual((hd.lattice_rpc_url, hd.default_rpc_timeout_ms, hd.link_name, hd.log_level),
                         ("nats://127.0.0.1:4222", 2000, "default", None))
        self.assertEqual(hd.link_put_key, "wsprovider")  # a host before 1.1: no xkeys

    def test_full_line(self):
        host, provider = xkeys.new_seed(), xkeys.new_seed()
        hd = read_host_data(encode_host_data(minimal(
            lattice_rpc_url="nats://10.0.0.1:4222", lattice_rpc_user_jwt="eyJ.jwt", lattice_rpc_user_seed="SUSEED",
            link_definitions=[consumer_link("comp-a", "wsprovider")], config={"MODE": "server"},
            secrets={"AUTH_TOKEN": {"kind": "String", "value": "t0ken"}},
            host_xkey_public_key=xkeys.public_from_seed(host), provider_xkey_private_key=provider,
            default_rpc_timeout_ms=500, structured_logging=True, log_level="DEBUG",
            otel_config={"enable_observability": False, "protocol": "Http"})))
        self.assertEqual(hd.link_put_key, xkeys.public_from_seed(provider))
        self.assertEqual(hd.secrets, {"AUTH_TOKEN": "t0ken"})
        self.assertEqual(hd.link_definitions[0].source_id, "comp-a")
        self.assertEqual((hd.log_level, hd.default_rpc_timeout_ms), ("debug", 500))
        shown = repr(hd)
        for secret in ("t0ken", "SUSEED", "eyJ.jwt", provider):
            self.assertNotIn(secret, shown)

    def test_errors_say_what_is_wrong(self):
        cases = [
            (b"", "no HostData line"), (b"!!!", "not base64"),
            (base64.b64encode(b"{nope"), "not JSON"),
            (encode_host_data([1]), "JSON object"),
            (encode_host_data({"lattice_rpc_prefix": "d", "provider_key": "p"}), "'host_id' is missing"),
            (encode_host_data(minimal(provider_key="")), "'provider_key' must not be empty"),
            (encode_host_data(minimal(default_rpc_timeout_ms="2000")), "must be a number"),
            (encode_host_data(minimal(default_rpc_timeout_ms=True)), "must be a number"),
            (encode_host_data(minimal(log_level="loud")), "not one of"),
            (encode_host_data(minimal(config={"MODE": 1})), "value of 'MODE' must be a string"),
            (encode_host_data(minimal(host_xkey_public_key="XNOPE")), "xkeys"),
            (encode_host_data(minimal(link_definitions=[{"source_id": 1}])), "source_id"),
            (encode_host_data(minimal(secrets={"A": "plain"})), "SecretValue"),
        ]
        for line, words in cases:
            error = self.assertRaises(HostDataError, read_host_data, line)
            self.assertIn(words, str(error), line)


class SecretsTests(unittest.TestCase):
    def test_link_secrets_open_with_the_provider_xkey(self):
        host, provider = xkeys.new_seed(), xkeys.new_seed()
        hd = read_host_data(encode_host_data(minimal(host_xkey_public_key=xkeys.public_from_seed(host),
                                                     provider_xkey_private_key=provider)))
        sealed = xkeys.seal(json.dumps({"JWT_SECRET": {"kind": "String", "value": "k"}}).encode(), host,
                            xkeys.public_from_seed(provider))
        self.assertEqual(hd.open_secrets(sealed), {"JWT_SECRET": "k"})
        self.assertEqual(hd.open_secrets(None), {})
        other = xkeys.seal(b"{}", xkeys.new_seed(), xkeys.public_from_seed(provider))
        self.assertRaises(LinkError, hd.open_secrets, other)

    def test_sealed_secrets_without_xkeys(self):
        hd = read_host_data(encode_host_data(minimal()))
        error = self.assertRaises(LinkError, hd.open_secrets, b"xkv1" + b"\0" * 60)
        self.assertIn("no xkeys", str(error))
