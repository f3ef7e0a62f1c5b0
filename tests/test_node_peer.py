"""Server mode against Node's ``ws``, a WebSocket implementation independent of Python.

``tests/node/package.json`` pins ``ws``; the first test run installs it with ``npm ci``
(``node`` and ``npm`` must be on PATH; the test fails, never skips, if they are not).
"""

import base64
import json
import os
import shutil

from twisted.internet import defer, utils
from twisted.trial import unittest

from wsprovider.handlers import echo

from .peers import start_provider, ws_url

NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
_installed = None


@defer.inlineCallbacks
def ensure_ws_installed():
    global _installed
    if _installed or os.path.isdir(os.path.join(NODE_DIR, "node_modules", "ws")):
        _installed = True
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise RuntimeError("node and npm are needed for the Node ws peer tests: apt-get install nodejs npm")
    out, err, code = yield utils.getProcessOutputAndValue(
        npm, ("ci", "--no-audit", "--no-fund"), path=NODE_DIR, env=os.environ)
    if code != 0:
        raise RuntimeError(f"npm ci in {NODE_DIR} failed: {err.decode()[-2000:]}")
    _installed = True


@defer.inlineCallbacks
def run_node_peer(url, steps, subprotocol="wsprovider.v1.json"):
    yield ensure_ws_installed()
    out, err, code = yield utils.getProcessOutputAndValue(
        shutil.which("node"), ("peer.js", url, subprotocol, json.dumps(steps)), path=NODE_DIR, env=os.environ)
    if code != 0:
        raise AssertionError(f"node peer failed ({code}): {err.decode()}")
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


class NodeWsPeerTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.provider = yield start_provider(self, handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])

    @defer.inlineCallbacks
    def test_exchange_with_node_ws(self):
        raw = bytes([0, 255, 128, 10])
        lines = yield run_node_peer(ws_url(self.provider), [
            {"frame": {"subject": "echo.node", "body": "from node"}},
            {"frame": {"subject": "echo.node", "body_base64": base64.b64encode(raw).decode()}},
            {"frame": {"subject": "echo.node", "body": list(b"seed")}},
            {"text": "{broken"},
            {"frame": {"type": "subscribe", "subject": "room.*"}},
            {"frame": {"subject": "room.1", "body": "to myself"}},
        ])
        frames = [json.loads(line["data"]) for line in lines if "data" in line]
        self.assertEqual(lines[0]["protocol"], "wsprovider.v1.json")
        welcome = frames[0]
        self.assertEqual(welcome["type"], "welcome")
        address = welcome["reply_to"]
        self.assertEqual(frames[1], {"type": "message", "subject": address, "body": "from node"})
        self.assertEqual(base64.b64decode(frames[2]["body_base64"]), raw)
        self.assertEqual(frames[3]["body"], "seed")
        self.assertEqual((frames[4]["type"], frames[4]["code"]), ("error", "bad_json"))
        self.assertEqual(frames[5], {"type": "subscribed", "subject": "room.*"})
        self.assertEqual((frames[6]["subject"], frames[6]["body"], frames[6]["reply_to"]),
                         ("room.1", "to myself", address))
        self.assertEqual(lines[-1], {"closed": 1000})
        self.assertTrue(all(not line.get("binary") for line in lines if "data" in line))
