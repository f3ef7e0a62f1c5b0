"""The frame model of ``wsprovider.envelope`` in both directions, and the raw wire (``wsprovider.raw``).

(The server-facing decoder's seed forms are in test_units.EnvelopeTests.)
"""

import json

from hypothesis import given, strategies as st
from twisted.trial import unittest

from wsprovider import envelope, raw
from wsprovider.envelope import (CODECS, Error, FrameError, IEnvelopeWire, IFrameCodec, Message, Ping, Pong, Reply,
                                 Request, Subscribe, Subscribed, Unsubscribe, Unsubscribed, Welcome)
from wsprovider.message import BrokerMessage

JSON = CODECS[envelope.JSON_PROTOCOL]
MSGPACK = CODECS[envelope.MSGPACK_PROTOCOL]

bodies = st.binary(max_size=200)
subjects = st.from_regex(r"[a-z][a-z0-9]{0,8}(\.[a-z0-9]{1,8}){0,3}", fullmatch=True)


class FrameModelTests(unittest.TestCase):

    def test_codecs_declare_their_capabilities(self):
        for codec in CODECS.values():
            self.assertTrue(IFrameCodec.providedBy(codec))
            self.assertTrue(IEnvelopeWire.providedBy(codec))
        self.assertTrue(IFrameCodec.providedBy(raw.RAW_CODEC))
        self.assertFalse(IEnvelopeWire.providedBy(raw.RAW_CODEC))

    @given(subjects, bodies, st.one_of(st.none(), subjects), st.integers(0, 50))
    def test_server_frames_round_trip(self, subject, body, reply_to, hops):
        msg = BrokerMessage(subject, body, reply_to)
        frames = [Message(msg, None, hops), Reply(msg, "7", hops), Welcome("s1", "srv.s1", envelope.JSON_PROTOCOL),
                  Error("no_responders", "nobody", 3), Subscribed("news.>", "1"), Unsubscribed("news.>"), Pong(4)]
        for codec in CODECS.values():
            for frame in frames:
                payload, is_binary = codec.encode(frame)
                self.assertEqual(is_binary, codec.is_binary)
                self.assertEqual(codec.decode_from_server(payload, is_binary), frame)

    def test_peer_frames_encode_to_what_the_server_decodes(self):
        msg = BrokerMessage("a.b", b"x", "r")
        for codec in CODECS.values():
            self.assertEqual(codec.decode(*codec.encode(Message(msg))).message, msg)
            got = codec.decode(*codec.encode(Request(msg, "9", timeout_ms=50)))
            self.assertEqual((got.kind, got.message, got.frame_id, got.timeout_ms), ("request", msg, "9", 50))
            got = codec.decode(*codec.encode(Subscribe("n.>", "2", queue="q")))
            self.assertEqual((got.kind, got.subject, got.frame_id, got.queue), ("subscribe", "n.>", "2", "q"))
            got = codec.decode(*codec.encode(Unsubscribe("n.>")))
            self.assertEqual((got.kind, got.subject), ("unsubscribe", "n.>"))
            self.assertEqual(codec.decode(*codec.encode(Ping(5))).kind, "ping")

    def test_encode_gives_the_server_shortcuts_bytes(self):
        msg = BrokerMessage("s", b"hi", "r")
        for codec in CODECS.values():
            self.assertEqual(codec.encode(Message(msg))[0], codec.message(msg))
            self.assertEqual(codec.encode(Reply(msg, "3"))[0], codec.message(msg, kind="reply", frame_id="3"))
            self.assertEqual(codec.encode(Error("c", "t", 1))[0], codec.error("c", "t", 1))
            self.assertEqual(codec.encode(Subscribed("a.>", 2))[0], codec.control("subscribed", subject="a.>", id=2))
            self.assertEqual(codec.encode(Pong(2))[0], codec.control("pong", id=2))

    def test_hops_travel_only_when_set(self):
        msg = BrokerMessage("s", b"hi")
        self.assertNotIn(b"hops", JSON.encode(Message(msg))[0])
        self.assertEqual(json.loads(JSON.encode(Message(msg, hops=3))[0])["hops"], 3)
        self.assertEqual(json.loads(JSON.encode(Message(BrokerMessage("s", b"\xff"), hops=3))[0])["hops"], 3)
        with self.assertRaises(FrameError):
            JSON.decode_from_server(b'{"subject":"s","hops":"many"}', False)

    def test_plain_and_odd_server_frames(self):
        self.assertEqual(JSON.decode_from_server(b"plain text", False), Message(BrokerMessage("message", b"plain text")))
        self.assertEqual(JSON.decode_from_server(b"\x01", True), Message(BrokerMessage("binary.message", b"\x01")))
        with self.assertRaises(FrameError) as e:
            JSON.decode_from_server(b'{"type":"bogus"}', False)
        self.assertIn("welcome", str(e.exception))
        self.assertEqual(JSON.decode_from_server(b"[1,2]", False).message.subject, "message")  # seed: plain text
        with self.assertRaises(FrameError):
            JSON.decode_from_server(b'{"subject":"bad subject"}', False)

    def test_every_frame_has_the_same_attribute_names(self):
        """So code that reads a frame (the server's session, a link) needs no per-type probing."""
        welcome = Welcome("s1")
        self.assertEqual((welcome.message, welcome.subject, welcome.frame_id, welcome.timeout_ms, welcome.queue,
                          welcome.hops), (None, None, None, None, None, 0))
        self.assertEqual(Subscribe("a.>").message, None)
        self.assertEqual(Message(BrokerMessage("s")).subject, None)


class RawCodecTests(unittest.TestCase):

    def test_bodies_only(self):
        codec = raw.RAW_CODEC
        self.assertEqual(codec.encode(Message(BrokerMessage("ignored", "é".encode(), "r"), "1", 4)), ("é".encode(), False))
        self.assertEqual(codec.encode(Message(BrokerMessage("s", b"\xff"))), (b"\xff", True))
        self.assertEqual(codec.decode_from_server(b"t", False), Message(BrokerMessage("message", b"t")))
        self.assertEqual(codec.decode_from_server(b"b", True), Message(BrokerMessage("binary.message", b"b")))
        with self.assertRaises(FrameError) as e:
            codec.encode(Subscribe("news.>"))
        self.assertIn("only message bodies", str(e.exception))


_texts = st.text(alphabet=st.sampled_from('ab "\\\x00\x1f\u00e9\u20ac\U0001f600:{},[]body'), max_size=12)
_values = st.recursive(st.none() | st.booleans() | st.integers() | _texts,
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
                       max_leaves=6)


class BodyScanTests(unittest.TestCase):
    """``envelope._loads_around_body`` (the large-frame path) either declines or gives what
    parsing the whole frame gives, the body as its UTF-8 bytes."""

    def check(self, payload: bytes):
        try:
            expected = json.loads(payload)
        except ValueError:
            expected = ValueError
        got = envelope._loads_around_body(payload)
        if got is None:
            return None
        self.assertIsInstance(expected, dict, payload)
        self.assertIsInstance(got["body"], bytes)
        self.assertEqual(got["body"].decode("utf-8"), expected["body"], payload)
        got = dict(got, body=expected["body"])
        self.assertEqual(got, expected, payload)
        return got

    @given(st.dictionaries(_texts, _values, max_size=4), _texts, st.integers(0, 4), st.booleans())
    def test_agrees_with_json(self, obj, body, at, spaced):
        items = list(obj.items())
        items.insert(at % (len(items) + 1), ("body", body))
        sep = (", ", ": ") if spaced else (",", ":")
        payload = ("{" + sep[0].join(json.dumps(k, ensure_ascii=False) + sep[1] + json.dumps(v, ensure_ascii=False)
                                     for k, v in items) + "}").encode("utf-8")
        self.check(payload)

    def test_takes_the_plain_body_of_a_large_frame(self):
        payload = b'{"subject":"echo.x","body":"' + "é".encode() * 300 + b'","reply_to":"r.x"}'
        got = self.check(payload)
        if envelope.ACCELERATED:
            self.assertIsNotNone(got)

    def test_declines_what_it_cannot_prove(self):
        for payload in (
            b'{"subject":"x","body":"a\\"b"}',               # an escape
            b'{"x":{"body":"nested"}}',                       # not the top-level body
            b'{"x":{"body":"nested"},"body":""}',             # the first "body" is nested
            b'{"body":"one","body":"two"}',                   # a duplicate key
            b'{"subject":"body","body":"v"}',                 # "body" elsewhere
            b'{"body":"a\x01b"}',                             # a raw control: invalid JSON
            b'{"body":"\xff"}',                               # not UTF-8
            b'{"body":"x"} trailing',                         # not JSON
            b'{"body":"unterminated',
        ):
            self.assertIsNone(self.check(payload), payload)

    def test_scans_on_after_the_first_non_ascii_character(self):
        # The ASCII pass stops at the first byte >= 0x80; what follows must still be
        # checked for escapes, controls and UTF-8.
        for payload in (b'{"body":"\xc3\xa9\\"x"}', b'{"body":"\xc3\xa9\x01"}', b'{"body":"\xc3\xa9\xff"}'):
            self.assertIsNone(self.check(payload), payload)
        got = self.check(b'{"body":"ab\xc3\xa9cd"}')
        if envelope.ACCELERATED:
            self.assertEqual(got["body"], "ab\u00e9cd")

    @given(st.binary(max_size=40) | _texts.map(lambda t: t.encode("utf-8", "surrogatepass")))
    def test_verbatim_text_means_its_json_literal_is_itself(self, body):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            expected = False
        else:
            expected = json.dumps(text, ensure_ascii=False)[1:-1] == text
        self.assertEqual(envelope._verbatim_text(body), expected, body)

    def test_invalid_frames_keep_their_errors(self):
        codec = CODECS["wsprovider.v1.json"]
        with self.assertRaises(FrameError) as e:
            codec.decode(b'{"subject":"x","body":"' + b"x" * 300 + b'\x01"}', False)
        self.assertEqual(e.exception.code, "bad_json")
        frame = codec.decode(b'{"subject":"x","body":"' + b"y" * 300 + b'"}', False)
        self.assertEqual(frame.message.body, b"y" * 300)
