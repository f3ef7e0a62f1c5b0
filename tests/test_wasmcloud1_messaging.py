"""wasmcloud:messaging@0.2.0 values against the wire captures, byte for byte.

The captures (tests/wasmcloud1_captures/) are NATS traffic recorded from real wRPC
implementations (the wrpc Go library; a provider on wasmCloud's Go provider SDK). Every
wRPC payload in them that our side sends or receives is decoded here, and re-encoded from
the decoded value to the same bytes (for payloads shown truncated: to the shown prefix and
the recorded length).
"""

from twisted.trial import unittest

from wsprovider.message import BrokerMessage
from wsprovider.wasmcloud1 import messaging as m
from wsprovider.wasmcloud1 import values as v

from . import wasmcloud1_capture as capture

WIRE = "consumer-handler-wire.txt"
LIFECYCLE = "provider-lifecycle-wire.txt"


def pattern_body(n):
    return bytes(i % 251 for i in range(n))  # the capture's body: 0..250 repeated


class SpecExampleTests(unittest.TestCase):
    def test_examples_from_the_spec(self):
        msg = BrokerMessage("a.b", b"hi")
        self.assertEqual(m.PUBLISH_PARAMS.encode((msg,)).hex(), "03612e620268690" + "0")
        self.assertEqual(m.PUBLISH_PARAMS.encode((msg.replace(reply_to="r.1"),)).hex(),
                         "03612e6202686901" + "03722e31")
        self.assertEqual(m.REQUEST_PARAMS.encode(("a.b", b"hi", 1000)).hex(), "03612e62026869e807")
        self.assertEqual(m.REQUEST_RESULTS.encode(v.Ok(BrokerMessage("_INBOX.x", b"pong"))).hex(),
                         "00085f494e424f582e7804706f6e6700")
        self.assertEqual(m.REQUEST_RESULTS.encode(v.Err("timeout")).hex(), "010774696d656f7574")

    def test_empty_reply_to_on_the_wire_is_none(self):
        (msg,) = v.decode(m.HANDLE_MESSAGE_PARAMS, bytes.fromhex("01780001" + "00"))
        self.assertIsNone(msg.reply_to)


class CaptureTests(unittest.TestCase):
    """One test per capture section; each names the messages by their recorded time."""

    def check(self, wit_type, wire, value):
        """``wire`` decodes to ``value`` and ``value`` encodes to ``wire``."""
        encoded = wit_type.encode(value)
        self.assertEqual(len(encoded), wire.length)
        self.assertEqual(encoded[:len(wire.shown)], wire.shown)
        if wire.complete:
            self.assertEqual(v.decode(wit_type, wire.shown), value)
        else:
            self.assertRaises(v.Incomplete, v.decode, wit_type, wire.shown)
            self.assertEqual(v.decode(wit_type, wire.shown + encoded[len(wire.shown):]), value)

    def test_1_publish(self):
        wire = capture.at(WIRE, "1.260")
        self.assertEqual(wire.subject, "default.peer-provider.wrpc.0.0.1.wasmcloud:messaging/consumer@0.2.0.publish")
        self.assertEqual(wire.headers, {"link-name": "default", "source-id": "comp-ok"})
        self.check(m.PUBLISH_PARAMS, wire, (BrokerMessage("a.b", b"hi"),))
        self.check(m.PUBLISH_RESULTS, capture.at(WIRE, "1.670"), v.Ok())
        self.assertEqual(capture.at(WIRE, "1.421").length, 0)  # handshake
        self.assertEqual(capture.at(WIRE, "1.421").reply + ".params", capture.at(WIRE, "1.544").subject)

    def test_3_request(self):
        self.check(m.REQUEST_PARAMS, capture.at(WIRE, "307.593"), ("svc.echo", b"ping", 1000))
        reply_subject = capture.at(WIRE, "308.787").reply
        self.check(m.REQUEST_RESULTS, capture.at(WIRE, "309.068"),
                   v.Ok(BrokerMessage(reply_subject, b"pong:ping")))

    def test_5_handle_message(self):
        wire = capture.at(WIRE, "776.424")
        self.assertEqual(wire.headers, {"source-id": "peer-provider", "target-id": "comp-ok"})
        self.check(m.HANDLE_MESSAGE_PARAMS, wire, (BrokerMessage("a.b", b"hi"),))
        self.check(m.HANDLE_MESSAGE_RESULTS, capture.at(WIRE, "776.962"), v.Ok())

    def test_6_err_value(self):
        self.assertEqual(m.HANDLE_MESSAGE_RESULTS.encode(v.Err("boom")).hex(), "0104626f6f6d")
        self.assertEqual(m.HANDLE_MESSAGE_PARAMS.encode((BrokerMessage("x", b""),)).hex(), "01780000")

    def test_7_trap_params(self):
        self.check(m.HANDLE_MESSAGE_PARAMS, capture.at(WIRE, "1082.925"), (BrokerMessage("x", b"y"),))
        self.assertEqual(capture.at(WIRE, "1083.783").length, 0)

    def test_9a_params_split_over_two_messages(self):
        first, chunk = capture.at(WIRE, "1251.149"), capture.at(WIRE, "1254.134")
        value = (BrokerMessage("big.subject", pattern_body(1048516)),)
        encoded = m.PUBLISH_PARAMS.encode(value)
        self.assertEqual(len(encoded), first.length + chunk.length)
        self.assertEqual(encoded[:len(first.shown)], first.shown)
        tail = encoded[first.length:]
        self.assertEqual(tail[:len(chunk.shown)], chunk.shown)
        decoder = v.IncrementalDecoder(m.PUBLISH_PARAMS)
        self.assertFalse(decoder.feed(encoded[:first.length]))
        self.assertTrue(decoder.feed(tail))
        self.assertEqual(decoder.value, value)

    def test_9c_results_split_over_two_messages(self):
        self.check(m.REQUEST_PARAMS, capture.at(WIRE, "1593.806"), ("svc.bigecho", b"", 2000))
        reply_subject = capture.at(WIRE, "1597.720", index=1).reply
        value = v.Ok(BrokerMessage(reply_subject, pattern_body(1048566)))
        encoded = m.REQUEST_RESULTS.encode(value)
        chunks = [w for w in capture.load(WIRE) if w.subject == "_INBOX.xWR9OZIaush3LsjiB3bCRB.results"]
        self.assertEqual([c.length for c in chunks], [1048576, 34, 0])
        self.assertEqual(len(encoded), 1048576 + 34)
        self.assertEqual(encoded[:len(chunks[0].shown)], chunks[0].shown)
        self.assertEqual(encoded[1048576:], chunks[1].shown)

    def test_lifecycle_calls(self):
        self.check(m.PUBLISH_PARAMS, capture.at(LIFECYCLE, "1517.854"),
                   (BrokerMessage("events.one", b"hello", "r.1"),))
        self.check(m.HANDLE_MESSAGE_PARAMS, capture.at(LIFECYCLE, "1518.586"),
                   (BrokerMessage("events.one", b"hello", "r.1"),))
        self.check(m.REQUEST_PARAMS, capture.at(LIFECYCLE, "1528.105"), ("svc.echo", b"ping", 500))
        self.check(m.REQUEST_RESULTS, capture.at(LIFECYCLE, "1530.077"),
                   v.Ok(BrokerMessage("_INBOX.oYf8d4e8jnPTH7HzOovfO8.7FQL8WvP", b"pong:ping")))
        self.check(m.PUBLISH_PARAMS, capture.at(LIFECYCLE, "1538.826"), (BrokerMessage("events.two", b"hi"),))
        self.check(m.PUBLISH_PARAMS, capture.at(LIFECYCLE, "1875.298"), (BrokerMessage("bee.one", b"buzz"),))
        self.check(m.HANDLE_MESSAGE_PARAMS, capture.at(LIFECYCLE, "1878.445"), (BrokerMessage("bee.one", b"buzz"),))
        # the unlinked caller: the provider answered only the empty results message (a trap)
        self.assertEqual(capture.at(LIFECYCLE, "1540.562").length, 0)

    def test_every_wrpc_payload_decodes(self):
        """Nothing in the captures is left out: every invocation and results payload
        decodes as its function's type (a truncated one as an incomplete value)."""
        types = {".publish": (m.PUBLISH_PARAMS, m.PUBLISH_RESULTS),
                 ".request": (m.REQUEST_PARAMS, m.REQUEST_RESULTS),
                 ".handle-message": (m.HANDLE_MESSAGE_PARAMS, m.HANDLE_MESSAGE_RESULTS)}
        seen = 0
        for name in (WIRE, LIFECYCLE):
            results_type = {}
            for wire in capture.load(name):
                for suffix, (params, results) in types.items():
                    if ".wrpc.0.0.1." in wire.subject and wire.subject.endswith(suffix):
                        results_type[wire.reply + ".results"] = results
                        self.decodes(params, wire)
                        seen += 1
                if wire.subject in results_type and wire.length:
                    # the first results message starts the value; later ones continue it
                    self.decodes(results_type.pop(wire.subject), wire)
                    seen += 1
        self.assertEqual(seen, 22)  # 11 invocations, 11 results values

    def decodes(self, wit_type, wire):
        if wire.complete:
            v.decode(wit_type, wire.shown)
        else:
            self.assertRaises(v.Incomplete, v.decode, wit_type, wire.shown)
