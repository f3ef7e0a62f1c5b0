"""Unit tests of the pure modules: message, subjects, envelope, config, endpoints, local lattice."""

import base64
import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.trial import unittest

from wsprovider import BrokerMessage, ConfigError, NoResponders, ProviderConfig, RequestTimeout
from wsprovider.endpoints import server_endpoint_description
from wsprovider.envelope import CODECS, DEFAULT_CODEC, FrameError
from wsprovider.lattice.local import LocalLattice
from wsprovider.subjects import (Permissions, SubjectError, SubjectTrie, check_pattern, check_subject, matches,
                                 pattern_covers, patterns_overlap)

tokens = st.sampled_from(["a", "b", "c", "orders", "x1"])
subjects = st.lists(tokens, min_size=1, max_size=5).map(".".join)
patterns = st.lists(st.sampled_from(["a", "b", "c", "*"]), min_size=1, max_size=4).flatmap(
    lambda toks: st.sampled_from([".".join(toks), ".".join(toks + [">"])]))


class MessageTests(unittest.TestCase):
    def test_validation(self):
        self.assertEqual(BrokerMessage("a", bytearray(b"x")).body, b"x")
        for bad in [dict(subject=""), dict(subject=5), dict(subject="a", body="text"),
                    dict(subject="a", reply_to="")]:
            self.assertRaises(TypeError, BrokerMessage, **bad)
        with self.assertRaises(TypeError) as cm:
            BrokerMessage("a", "text")
        self.assertIn("encode", str(cm.exception))


class SubjectTests(unittest.TestCase):
    def test_literal_and_pattern_checks(self):
        check_subject("a.b.c")
        check_pattern("a.*.>")
        for bad in ["", "a..b", ".a", "a.", "a b", "a\tb"]:
            self.assertRaises(SubjectError, check_subject, bad)
        self.assertRaises(SubjectError, check_subject, "a.*")
        self.assertRaises(SubjectError, check_pattern, "a.>.b")
        self.assertRaises(SubjectError, check_pattern, "a.b*")

    def test_matches(self):
        self.assertTrue(matches("a.*", "a.b"))
        self.assertFalse(matches("a.*", "a.b.c"))
        self.assertTrue(matches("a.>", "a.b.c"))
        self.assertFalse(matches("a.>", "a"))
        self.assertTrue(matches(">", "x"))
        self.assertFalse(matches("a.b", "a.c"))

    @given(patterns, patterns, subjects)
    def test_cover_and_overlap_agree_with_matches(self, outer, inner, subject):
        if pattern_covers(outer, inner) and matches(inner, subject):
            self.assertTrue(matches(outer, subject))
        if matches(outer, subject) and matches(inner, subject):
            self.assertTrue(patterns_overlap(outer, inner))

    def test_permissions(self):
        p = Permissions(allow=["chat.>", "svc.*"], deny=["chat.admin.>"])
        self.assertIsNone(p.check_publish("chat.room"))
        self.assertIn("deny chat.admin.>", p.check_publish("chat.admin.x"))
        self.assertIn("not in allow list", p.check_publish("other"))
        self.assertIsNone(p.check_subscribe("chat.room.*"))
        self.assertIsNotNone(p.check_subscribe("chat.>"))  # overlaps the deny
        self.assertIsNotNone(p.check_subscribe(">"))
        narrowed = p.narrowed(allow=["chat.room.>", "elsewhere.>"])
        self.assertEqual(narrowed.allow, ("chat.room.>",))


class EnvelopeTests(unittest.TestCase):
    def test_text_and_binary_bodies(self):
        out = json.loads(DEFAULT_CODEC.message(BrokerMessage("s", "héllo".encode())))
        self.assertEqual(out, {"type": "message", "subject": "s", "body": "héllo"})
        out = json.loads(DEFAULT_CODEC.message(BrokerMessage("s", b"\xff\xfe", "r")))
        self.assertEqual(out, {"type": "message", "subject": "s", "body_base64": "//4=", "reply_to": "r"})

    @given(st.binary(max_size=300), subjects)
    def test_round_trip_any_bytes(self, body, subject):
        for codec in CODECS.values():
            frame = codec.message(BrokerMessage(subject, body))
            decoded = codec.decode(frame, codec.is_binary)
            self.assertEqual(decoded.message, BrokerMessage(subject, body))

    @given(st.lists(st.sampled_from(["x", "é", '"', "\\", "\n", "\x00", "\x1f", "\x7f", "\u2028", "😀", "/"]),
                    min_size=400, max_size=700), st.booleans(), st.sampled_from([None, "id-1", 7]))
    def test_json_body_copied_verbatim_only_when_identical(self, chars, broken, frame_id):
        """Bodies of 512 bytes or more that need no escaping are copied as they are; the
        frame must be byte-identical to the generic encoder's either way."""
        from wsprovider.envelope import JsonCodec, _Codec
        text = "".join(chars)
        clean = "".join(c for c in text if c not in '"\\\n\x00\x1f').ljust(512, "x")  # the verbatim path
        extra = b"\xff" if broken else b""
        codec = JsonCodec()
        for body in (text.encode() + extra, clean.encode() + extra):
            for msg in (BrokerMessage("a.b", body), BrokerMessage("a.b", body, "r.x")):
                self.assertEqual(codec.message(msg, frame_id=frame_id),
                                 _Codec.message(codec, msg, "message", frame_id))

    def test_seed_forms(self):
        self.assertEqual(DEFAULT_CODEC.decode(b"plain", False).message, BrokerMessage("message", b"plain"))
        self.assertEqual(DEFAULT_CODEC.decode(b"\x00\x01", True).message, BrokerMessage("binary.message", b"\x00\x01"))
        frame = DEFAULT_CODEC.decode(b'{"subject":"a","body":[1,2],"reply_to":"r"}', False)
        self.assertEqual(frame.message, BrokerMessage("a", b"\x01\x02", "r"))

    def test_errors_carry_id(self):
        with self.assertRaises(FrameError) as cm:
            DEFAULT_CODEC.decode(b'{"id":"x","subject":"a","body":{}}', False)
        self.assertEqual((cm.exception.code, cm.exception.frame_id), ("bad_frame", "x"))
        with self.assertRaises(FrameError) as cm:
            DEFAULT_CODEC.decode(b'{"subject":"a","body":"\\ud800"}', False)
        self.assertIn("body_base64", str(cm.exception))

    def test_base64_is_strict(self):
        raw = bytes(range(10))
        frame = DEFAULT_CODEC.decode(json.dumps({"subject": "a", "body_base64": base64.b64encode(raw).decode()}).encode(), False)
        self.assertEqual(frame.message.body, raw)
        self.assertRaises(FrameError, DEFAULT_CODEC.decode, b'{"subject":"a","body_base64":"abc"}', False)


class ConfigTests(unittest.TestCase):
    def test_defaults_and_seed_keys(self):
        cfg = ProviderConfig.from_mapping({"mode": "client", "URI": "ws://x:1/ws", "AUTH_TOKEN": "t",
                                           "CONNECT_TIMEOUT_SEC": "5", "ENABLE_SESSION_TRACKING": "false",
                                           "HEADER_X-Api-Key": "k"})
        self.assertEqual((cfg.mode, cfg.uri, cfg.auth_token, cfg.connect_timeout_sec), ("client", "ws://x:1/ws", "t", 5.0))
        self.assertFalse(cfg.enable_session_tracking)
        self.assertEqual(cfg.headers, {"X-Api-Key": "k"})
        secret = ProviderConfig.from_mapping({"AUTH_TOKEN": "s3cret-value"})
        self.assertNotIn("s3cret-value", repr(secret))

    def test_errors_name_key_and_accepted_values(self):
        cases = {
            "MODE": ("clinet", "accepted values: server, client"),
            "CONNECT_TIMEOUT_SEC": ("soon", "accepted values: 0.1 to 3600"),
            "ENABLE_SESSION_TRACKING": ("maybe", "accepted values: true, false"),
            "MAX_MESSAGE_SIZE": ("1", "out of range"),
            "PUBLISH_ALLOW": ("a..b", "empty token"),
            "PING_INTERVAL_SEC": ("0.5", "accepted values: 0 (off) or 1 to 3600"),
            "PING_TIMEOUT_SEC": ("0.5", "out of range"),
        }
        for key, (value, expected) in cases.items():
            with self.assertRaises(ConfigError) as cm:
                ProviderConfig.from_mapping({key: value})
            self.assertTrue(str(cm.exception).startswith(key + ":"), str(cm.exception))
            self.assertIn(expected, str(cm.exception))
        with self.assertRaises(ConfigError) as cm:
            ProviderConfig.from_mapping({"MAX_MESAGE_SIZE": "1"})
        self.assertIn("unknown setting", str(cm.exception))
        with self.assertRaises(ConfigError):
            ProviderConfig.from_mapping({"MODE": "client", "URI": "http://x"})

    def test_link_config_merges_over_provider_defaults(self):
        base = ProviderConfig.from_mapping({"MAX_MESSAGE_SIZE": "1000", "HEADER_A": "1"})
        link = base.merged({"SUBSCRIPTIONS": "a.>,b", "HEADER_B": "2", "CUSTOM": "x"})
        self.assertEqual((link.max_message_size, link.subscriptions), (1000, ("a.>", "b")))
        self.assertEqual(link.headers, {"A": "1", "B": "2"})
        self.assertEqual(link.extra, {"CUSTOM": "x"})
        self.assertEqual(base.subscriptions, (">",))

    def test_endpoints(self):
        self.assertEqual(server_endpoint_description("0.0.0.0:8080"), "tcp:8080:interface=0.0.0.0")
        self.assertEqual(server_endpoint_description("[::1]:9"), "tcp6:9:interface=\\:\\:1")
        self.assertEqual(server_endpoint_description("ws://127.0.0.1:8080"), "tcp:8080:interface=127.0.0.1")
        self.assertEqual(server_endpoint_description("ssl:8443:privateKey=k"), "ssl:8443:privateKey=k")
        self.assertEqual(server_endpoint_description(None), "tcp:8080:interface=127.0.0.1")
        for bad in ("host:port", "wss://x", "nonsense"):
            self.assertRaises(ConfigError, server_endpoint_description, bad)

    def test_a_bare_port_binds_loopback_like_the_default(self):
        self.assertEqual(server_endpoint_description("8081"), "tcp:8081:interface=127.0.0.1")
        self.assertEqual(server_endpoint_description("ws://:8081"), "tcp:8081:interface=127.0.0.1")

    def test_a_server_uri_path_must_be_the_ws_path(self):
        with self.assertRaises(ConfigError) as caught:
            ProviderConfig.from_mapping({"URI": "ws://127.0.0.1:8081/chat"})
        self.assertIn("set WS_PATH=chat (--ws-path chat)", str(caught.exception))
        for fine in ({"URI": "ws://127.0.0.1:8081/ws"}, {"URI": "ws://127.0.0.1:8081/"},
                     {"URI": "ws://127.0.0.1:8081/chat", "WS_PATH": "chat"},
                     {"MODE": "client", "URI": "ws://127.0.0.1:8081/chat"}):
            ProviderConfig.from_mapping(fine)


class SubjectTrieTests(unittest.TestCase):
    @given(st.lists(st.tuples(st.sampled_from(["add", "remove", "match"]), patterns, subjects), max_size=40))
    def test_agrees_with_matches_through_changes(self, steps):
        """Whatever the order of inserts, removals and (cached) matches, a match finds exactly
        the live entries whose pattern matches, in insertion order."""
        trie = SubjectTrie(cache_size=8)
        live = []  # (pattern, entry) in insertion order
        for op, pattern, subject in steps:
            if op == "add":
                entry = object()
                trie.insert(pattern, entry)
                live.append((pattern, entry))
            elif op == "remove" and live:
                pattern, entry = live.pop(len(live) // 2)
                self.assertTrue(trie.remove(pattern, entry))
            expected = tuple(e for p, e in live if matches(p, subject))
            self.assertEqual(trie.match(subject), expected)
        self.assertEqual(len(trie), len(live))

    def test_private_first_token(self):
        trie = SubjectTrie(private_first="_$")
        trie.insert(">", "all")
        trie.insert("*.x", "star")
        trie.insert("_ws.>", "ws")
        self.assertEqual(trie.match("_ws.x"), ("ws",))
        self.assertEqual(trie.match("a.x"), ("all", "star"))

    def test_a_change_keeps_unrelated_cached_subjects(self):
        trie = SubjectTrie(cache_size=4)
        trie.insert("a.*", 1)
        for subject in ("a.b", "c.d"):
            trie.match(subject)
        trie.insert("c.*.e", 2)       # cannot concern a.b
        self.assertTrue(trie.cached("a.b"))
        self.assertFalse(trie.cached("c.d"))  # its path changed: recomputed on the next match
        self.assertEqual(trie.match("c.d"), ())
        for i in range(10):
            trie.match(f"z.{i}")
        self.assertEqual(len(trie._cache), 4)  # bounded; the oldest go first
        self.assertFalse(trie.remove("nope.*", 3))


class LocalLatticeTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.lattice = LocalLattice(self.clock)

    def test_wildcards_and_private_subjects(self):
        got = []
        self.lattice.subscribe(">", lambda m: got.append(("all", m.subject)))
        self.lattice.subscribe("_ws.>", lambda m: got.append(("ws", m.subject)))
        self.lattice.subscribe("a.*", lambda m: got.append(("a", m.subject)))
        self.lattice.publish(BrokerMessage("a.b", b""))
        self.lattice.publish(BrokerMessage("_ws.session.x", b""))
        self.lattice.publish(BrokerMessage("$SYS.x", b"")).addErrback(lambda f: got.append(("err", f.value.code)))
        self.assertEqual(got, [("all", "a.b"), ("a", "a.b"), ("ws", "_ws.session.x"), ("err", "no_responders")])

    def test_queue_groups_share(self):
        got = []
        for name in "xyz":
            self.lattice.subscribe("jobs", lambda m, n=name: got.append(n), queue="workers")
        for _ in range(6):
            self.lattice.publish(BrokerMessage("jobs", b""))
        self.assertEqual(sorted(got), sorted("xyzxyz"))

    def test_unsubscribe(self):
        got = []
        d = self.lattice.subscribe("a", got.append)
        sub = self.successResultOf(d)
        self.lattice.publish(BrokerMessage("a", b"1"))
        sub.unsubscribe()
        self.failureResultOf(self.lattice.publish(BrokerMessage("a", b"2")), NoResponders)
        self.assertEqual([m.body for m in got], [b"1"])

    def test_request_reply_and_timeout(self):
        self.lattice.subscribe("svc", lambda m: self.lattice.publish(BrokerMessage(m.reply_to, m.body + b"!")))
        reply = self.successResultOf(self.lattice.request("svc", b"hi", 100))
        self.assertEqual(reply.body, b"hi!")
        self.lattice.subscribe("silent", lambda m: None)
        d = self.lattice.request("silent", b"", 100)
        self.clock.advance(0.1)
        self.assertIn("100ms", str(self.failureResultOf(d, RequestTimeout).value))
        self.failureResultOf(self.lattice.request("nobody", b"", 100), NoResponders)
        self.assertEqual(len(self.lattice._pending), 0)

    def test_handlers_chatting_do_not_overflow_the_stack(self):
        count = [0]

        def bounce(msg):
            count[0] += 1
            if count[0] < 2000:
                self.lattice.publish(BrokerMessage("ping", b""))

        self.lattice.subscribe("ping", bounce)
        self.lattice.publish(BrokerMessage("ping", b""))
        while self.clock.getDelayedCalls():
            self.clock.advance(0)
        self.assertEqual(count[0], 2000)

    @defer.inlineCallbacks
    def test_close_fails_pending(self):
        self.lattice.subscribe("silent", lambda m: None)
        d = self.lattice.request("silent", b"", 1000)
        yield self.lattice.close()
        f = self.failureResultOf(d)
        self.assertEqual(f.value.code, "not_connected")


class SettingsReferenceTests(unittest.TestCase):
    def test_docs_settings_is_current(self):
        import os
        from wsprovider.settings_doc import render
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "settings.rst")
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read(), render(), "regenerate: python -m wsprovider.settings_doc > docs/settings.rst")
