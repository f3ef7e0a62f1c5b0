"""The HTTP side (wsprovider.web), against a real provider and twisted.web's Agent / websockets:
what a browser finds at /, /ws, /sdk/, which Server header it sees, and why an origin is refused."""

from twisted.internet import defer
from twisted.trial import unittest

from wsprovider.config import ProviderConfig
from wsprovider.web import console_enabled

from .peers import WebsocketsPeer, start_provider, ws_url
from .test_hardening import base_url, http, refused


class ConsoleSettingTests(unittest.TestCase):
    def test_auto_is_on_for_loopback_listeners_only(self):
        def enabled(**values):
            return console_enabled(ProviderConfig.from_mapping(values))
        self.assertTrue(enabled())                                   # the default URI: loopback
        self.assertTrue(enabled(URI="8081"))                         # a bare port binds loopback too
        self.assertTrue(enabled(URI="[::1]:8081"))
        self.assertFalse(enabled(URI="0.0.0.0:8080"))
        self.assertFalse(enabled(URI="tcp:8080"))
        self.assertTrue(enabled(URI="0.0.0.0:8080", CONSOLE="on"))
        self.assertFalse(enabled(CONSOLE="off"))


class SiteTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_root_is_the_console_on_loopback(self):
        provider = yield start_provider(self)
        code, headers, body = yield http(b"GET", base_url(provider) + "/")
        self.assertEqual(code, 200)
        self.assertIn(b"wsprovider console", body)
        self.assertIn(b'data-ws-path="/ws"', body)
        self.assertIn(b"script-src 'self'", headers.getRawHeaders(b"content-security-policy")[0])
        for asset in ("/console/console.js", "/console/console.css", "/sdk/wsprovider.js", "/sdk/wsprovider.d.ts"):
            code, headers, body = yield http(b"GET", base_url(provider) + asset)
            self.assertEqual(code, 200, asset)
            self.assertTrue(body, asset)
        code, _, _ = yield http(b"GET", base_url(provider) + "/console/nothing.js")
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_console_off_still_answers_root_and_serves_the_sdk(self):
        provider = yield start_provider(self, {"CONSOLE": "off"})
        code, headers, body = yield http(b"GET", base_url(provider) + "/")
        self.assertEqual(code, 200)
        self.assertIn(b"connect a WebSocket client to /ws", body)
        self.assertIn(b"CONSOLE=on", body)
        code, _, _ = yield http(b"GET", base_url(provider) + "/console/console.js")
        self.assertEqual(code, 404)
        code, headers, _ = yield http(b"GET", base_url(provider) + "/sdk/wsprovider.js")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/javascript; charset=utf-8"])

    @defer.inlineCallbacks
    def test_no_version_disclosed(self):
        provider = yield start_provider(self)
        for path in ("/", "/ws", "/healthz", "/nothing"):
            code, headers, body = yield http(b"GET", base_url(provider) + path)
            self.assertEqual(headers.getRawHeaders(b"server"), [b"wsprovider"], path)
            self.assertNotIn(b"Autobahn", body, path)
            self.assertNotIn(b"Twisted", body, path)
        peer = yield WebsocketsPeer.connect(ws_url(provider))
        self.assertEqual(peer.conn.response.headers["Server"], "wsprovider")
        yield peer.close()
        response = yield refused(ws_url(provider), subprotocols=["nothing.we.speak"])
        self.assertNotIn("autobahn", str(list(response.headers.raw_items())).lower())

    @defer.inlineCallbacks
    def test_server_header_is_a_setting(self):
        provider = yield start_provider(self, {"SERVER_HEADER": "acme-gateway/2"})
        _, headers, _ = yield http(b"GET", base_url(provider) + "/healthz")
        self.assertEqual(headers.getRawHeaders(b"server"), [b"acme-gateway/2"])

    @defer.inlineCallbacks
    def test_plain_get_on_the_websocket_path_says_what_it_is(self):
        provider = yield start_provider(self)
        code, headers, body = yield http(b"GET", base_url(provider) + "/ws")
        self.assertEqual(code, 426)
        self.assertIn(b"This is a WebSocket endpoint", body)

    @defer.inlineCallbacks
    def test_refused_origin_names_the_setting(self):
        provider = yield start_provider(self, {"ALLOWED_ORIGINS": "https://app.example.com"})
        response = yield refused(ws_url(provider), additional_headers={"Origin": "https://evil.example.com"})
        self.assertEqual(response.status_code, 403)
        self.assertIn("ALLOWED_ORIGINS", response.reason_phrase)
        response = yield refused(ws_url(provider), additional_headers={"Origin": "null"})
        self.assertEqual(response.status_code, 403)
        self.assertIn("ALLOW_NULL_ORIGIN", response.reason_phrase)
