"""The NATS parser and codecs, without a server: chunking, headers, URLs, creds."""

import json

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from wsprovider.nats.auth import Credentials, load_creds
from wsprovider.nats.errors import ProtocolError
from wsprovider.nats.message import decode_headers, encode_headers
from wsprovider.nats.protocol import MAX_CONTROL_LINE, NatsParser
from wsprovider.nats.servers import ServerAddress, ServerPool


class Recorder:
    """A parser receiver that records every event as a tuple."""

    def __init__(self):
        self.events = []

    def nats_msg(self, subject, sid, reply, payload, header_block):
        self.events.append(("msg", subject, sid, reply, payload, header_block))

    def nats_info(self, info):
        self.events.append(("info", info))

    def nats_ping(self):
        self.events.append(("ping",))

    def nats_pong(self):
        self.events.append(("pong",))

    def nats_ok(self):
        self.events.append(("ok",))

    def nats_err(self, text):
        self.events.append(("err", text))


tokens = st.from_regex(r"[A-Za-z0-9_\-]{1,8}", fullmatch=True)
subjects = st.lists(tokens, min_size=1, max_size=4).map(".".join)
header_values = st.from_regex(r"[ -~]{0,20}", fullmatch=True).map(str.strip)
headers = st.dictionaries(tokens, header_values, min_size=1, max_size=4)


@st.composite
def server_messages(draw):
    """One server protocol message: (wire bytes, expected parser event)."""
    kind = draw(st.sampled_from(["msg", "hmsg", "ping", "pong", "ok", "err", "info"]))
    if kind in ("msg", "hmsg"):
        subject, sid = draw(subjects), draw(st.integers(1, 10**6))
        reply = draw(st.none() | subjects)
        payload = draw(st.binary(max_size=300))
        reply_part = f" {reply}" if reply else ""
        if kind == "msg":
            line = f"MSG {subject} {sid}{reply_part} {len(payload)}\r\n".encode()
            return line + payload + b"\r\n", ("msg", subject, sid, reply, payload, None)
        block = encode_headers(draw(headers))
        line = f"HMSG {subject} {sid}{reply_part} {len(block)} {len(block) + len(payload)}\r\n"
        return (line.encode() + block + payload + b"\r\n",
                ("msg", subject, sid, reply, payload, block))
    if kind == "ping":
        return b"PING\r\n", ("ping",)
    if kind == "pong":
        return b"PONG\r\n", ("pong",)
    if kind == "ok":
        return b"+OK\r\n", ("ok",)
    if kind == "err":
        text = draw(st.from_regex(r"[A-Za-z][A-Za-z ]{0,30}[a-z]", fullmatch=True))
        return f"-ERR '{text}'\r\n".encode(), ("err", text)
    info = {"server_id": draw(tokens), "max_payload": draw(st.integers(1, 2**20)),
            "connect_urls": draw(st.lists(tokens, max_size=3))}
    return b"INFO " + json.dumps(info).encode() + b"\r\n", ("info", info)


class ParserChunkingTests(unittest.TestCase):
    timeout = 120

    @settings(max_examples=300, deadline=None)
    @given(st.lists(server_messages(), min_size=1, max_size=20), st.data())
    def test_any_split_parses_to_the_same_messages(self, messages, data):
        stream = b"".join(wire for wire, _ in messages)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=40)))
        recorder = Recorder()
        parser = NatsParser(recorder)
        previous = 0
        for cut in cuts + [len(stream)]:
            parser.feed(stream[previous:cut])
            previous = cut
        self.assertEqual(recorder.events, [event for _, event in messages])
        self.assertEqual(len(parser._buffer), 0)

    def test_byte_by_byte(self):
        stream = b"MSG a.b 1 r 3\r\nabc\r\nHMSG x 2 18 20\r\nNATS/1.0\r\nK: v\r\n\r\nhi\r\nPING\r\n"
        recorder = Recorder()
        parser = NatsParser(recorder)
        for index in range(len(stream)):
            parser.feed(stream[index:index + 1])
        self.assertEqual(recorder.events, [
            ("msg", "a.b", 1, "r", b"abc", None),
            ("msg", "x", 2, None, b"hi", b"NATS/1.0\r\nK: v\r\n\r\n"),
            ("ping",)])

    def test_garbage_is_a_protocol_error(self):
        for garbage in (b"HELLO\r\n", b"MSG a 1 notanumber\r\n", b"MSG a 1 2\r\nabcd\r\n"):
            with self.assertRaises(ProtocolError):
                NatsParser(Recorder()).feed(garbage)

    def test_endless_control_line_is_a_protocol_error(self):
        with self.assertRaises(ProtocolError):
            NatsParser(Recorder()).feed(b"I" * (MAX_CONTROL_LINE + 1))


class HeaderCodecTests(unittest.TestCase):
    timeout = 10

    def test_round_trip_with_repeated_values(self):
        block = encode_headers({"A": "1", "Multi": ["x", "y"]})
        self.assertEqual(block, b"NATS/1.0\r\nA: 1\r\nMulti: x\r\nMulti: y\r\n\r\n")
        headers, items, status, description = decode_headers(block)
        self.assertEqual(headers, {"A": "1", "Multi": "x, y"})
        self.assertEqual(items, [("A", "1"), ("Multi", "x"), ("Multi", "y")])
        self.assertIsNone(status)

    def test_status_line(self):
        headers, _, status, description = decode_headers(b"NATS/1.0 503\r\n\r\n")
        self.assertEqual((headers, status, description), ({}, 503, None))
        _, _, status, description = decode_headers(b"NATS/1.0 408 Request Timeout\r\n\r\n")
        self.assertEqual((status, description), (408, "Request Timeout"))

    def test_injection_is_refused(self):
        with self.assertRaises(ValueError):
            encode_headers({"A": "1\r\nEvil: yes"})
        with self.assertRaises(ValueError):
            encode_headers({"A: B": "1"})


class ServerAddressTests(unittest.TestCase):
    timeout = 10

    def test_parse(self):
        self.assertEqual(ServerAddress.parse("nats://u:p%40ss@host:1234"),
                         ServerAddress("host", 1234, user="u", password="p@ss"))
        self.assertEqual(ServerAddress.parse("tls://tok@h"), ServerAddress("h", 4222, True, token="tok"))
        self.assertEqual(ServerAddress.parse("127.0.0.1:5").netloc, "127.0.0.1:5")
        with self.assertRaises(ValueError):
            ServerAddress.parse("http://x")

    def test_pool_rotates_and_learns_without_duplicates(self):
        pool = ServerPool(["nats://a:1", "nats://b:2"], randomize=False)
        self.assertEqual([pool.next_server().host for _ in range(3)], ["a", "b", "a"])
        added = pool.learn(["a:1", "c:3", "c:3"], tls=False)
        self.assertEqual([server.netloc for server in added], ["c:3"])
        self.assertEqual(len(pool.servers), 3)


class CredentialsTests(unittest.TestCase):
    timeout = 10

    def test_load_creds(self):
        text = ("-----BEGIN NATS USER JWT-----\neyJ.a.b\n------END NATS USER JWT------\n\n"
                "*** IMPORTANT ***\n\n-----BEGIN USER NKEY SEED-----\nSUAXYZ\n"
                "------END USER NKEY SEED------\n")
        self.assertEqual(load_creds(text), ("eyJ.a.b", b"SUAXYZ"))

    def test_secrets_stay_out_of_repr(self):
        credentials = Credentials(token="t0ps3cret", user="u", password="hunter2")
        self.assertNotIn("t0ps3cret", repr(credentials))
        self.assertNotIn("hunter2", repr(credentials))
