"""A real headless Chromium for tests, driven over the Chrome DevTools protocol.

    browser = yield Browser.launch(self)           # self: a trial TestCase; killed at cleanup
    page = yield browser.open("http://127.0.0.1:8080/")
    value = yield page.evaluate("1 + 1")           # awaits promises, returns JSON values
    png = yield page.screenshot()

The DevTools socket is spoken with the ``websockets`` library (on the asyncio reactor's
loop, like tests/peers.py). Chromium is Debian's ``chromium`` (``apt-get install -y
chromium``; ``.ci/run`` installs it). Without it the browser tests are skipped with that
fix, unless ``WSPROVIDER_REQUIRE_BROWSER=1`` (set by ``.ci/run`` once it has installed
one), where a missing browser fails them. The network is closed: Chromium is started
with every background fetch turned off and a fresh profile.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import tempfile

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from .peers import as_deferred

LAUNCH_TIMEOUT = 30.0
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--no-default-browser-check",
    # Tabs in the background must keep their timers and sockets running.
    "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
    "--window-size=1280,900",
)
DEVTOOLS_LINE = re.compile(rb"DevTools listening on (ws://\S+)")

# Waits inside the page: re-check on every DOM change (no timers to be throttled).
PAGE_HELPERS = r"""
window.__waitUntil = (check, timeoutMs, what) => new Promise((resolve, reject) => {
  const done = () => { const v = check(); if (v) { observer.disconnect(); clearTimeout(timer); resolve(v); return true; } return false; };
  const observer = new MutationObserver(done);
  const timer = setTimeout(() => { observer.disconnect(); reject(new Error("timed out waiting for " + what)); }, timeoutMs);
  observer.observe(document, { subtree: true, childList: true, characterData: true, attributes: true });
  done();
});
"""


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium() -> str:
    path = find_chromium()
    if path is None:
        why = ("no Chromium on PATH (looked for " + ", ".join(CANDIDATES) + "); install it with "
               "'apt-get update && apt-get install -y chromium' (.ci/run does this)")
        if os.environ.get("WSPROVIDER_REQUIRE_BROWSER") == "1":
            raise AssertionError(why)
        raise unittest.SkipTest(why)
    return path


class JavaScriptError(Exception):
    """An exception thrown (or a promise rejected) in the page."""


class _ChromiumProcess(protocol.ProcessProtocol):
    def __init__(self):
        self.output = bytearray()
        self.devtools = defer.Deferred()
        self.ended = defer.Deferred()

    def errReceived(self, data):
        self.output += data
        if not self.devtools.called:
            found = DEVTOOLS_LINE.search(self.output)
            if found:
                self.devtools.callback(found.group(1).decode())

    outReceived = errReceived

    def processEnded(self, reason):
        if not self.devtools.called:
            self.devtools.errback(RuntimeError("chromium exited before DevTools listened:\n"
                                               + self.output.decode(errors="replace")[-2000:]))
        self.ended.callback(None)


class Browser:
    def __init__(self, process, transport, connection):
        self._process = process
        self._transport = transport
        self._conn = connection
        self._ids = itertools.count(1)
        self._waiting = {}
        self._event_waiters = []
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    @defer.inlineCallbacks
    def launch(cls, testcase):
        import websockets
        executable = require_chromium()
        # One scratch directory holds the profile and Chromium's TMPDIR: Chromium puts its
        # singleton socket directories (org.chromium.Chromium.*) in TMPDIR and, killed,
        # never removes them, so without this every browser test left one behind in /tmp.
        scratch = tempfile.mkdtemp(prefix="wsprovider-chromium-")
        testcase.addCleanup(shutil.rmtree, scratch, True)
        profile = os.path.join(scratch, "profile")
        chromium_tmp = os.path.join(scratch, "tmp")
        os.mkdir(profile)
        os.mkdir(chromium_tmp)
        process = _ChromiumProcess()
        transport = reactor.spawnProcess(process, executable, [executable, *FLAGS, f"--user-data-dir={profile}",
                                                               "about:blank"],
                                         env=dict(os.environ, TMPDIR=chromium_tmp))

        @defer.inlineCallbacks
        def kill():
            if not process.ended.called:
                try:
                    transport.signalProcess("KILL")
                except Exception:
                    pass
                yield process.ended
        testcase.addCleanup(kill)
        timer = reactor.callLater(LAUNCH_TIMEOUT, lambda: process.devtools.called or process.devtools.errback(
            RuntimeError(f"chromium did not open DevTools within {LAUNCH_TIMEOUT} s")))
        try:
            url = yield process.devtools
        finally:
            if timer.active():
                timer.cancel()
        conn = yield as_deferred(websockets.connect(url, max_size=64 * 1024 * 1024, ping_interval=None))
        browser = cls(process, transport, conn)
        testcase.addCleanup(browser.close)
        return browser

    async def _read(self):
        try:
            async for raw in self._conn:
                message = json.loads(raw)
                if "id" in message:
                    future = self._waiting.pop(message["id"], None)
                    if future is not None and not future.done():
                        if "error" in message:
                            future.set_exception(RuntimeError(f"CDP error: {message['error']}"))
                        else:
                            future.set_result(message.get("result", {}))
                else:
                    for waiter in list(self._event_waiters):
                        method, session, future = waiter
                        if message.get("method") == method and message.get("sessionId") == session and not future.done():
                            self._event_waiters.remove(waiter)
                            future.set_result(message.get("params", {}))
        except Exception:
            pass
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(RuntimeError("the DevTools connection closed"))

    def call(self, method, params=None, session=None) -> defer.Deferred:
        message_id = next(self._ids)
        future = asyncio.get_event_loop().create_future()
        self._waiting[message_id] = future
        message = {"id": message_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session

        async def send():
            await self._conn.send(json.dumps(message))
            return await future
        return as_deferred(send())

    @defer.inlineCallbacks
    def open(self, url):
        """A new tab at ``url``, once loaded, with the wait helpers installed."""
        target = yield self.call("Target.createTarget", {"url": "about:blank"})
        attached = yield self.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, target["targetId"], attached["sessionId"])
        yield page.call("Page.enable")
        yield page.call("Runtime.enable")
        loaded = self.next_event("Page.loadEventFired", page.session)
        yield page.call("Page.navigate", {"url": url})
        yield loaded
        yield page.evaluate(PAGE_HELPERS)
        return page

    def next_event(self, method, session) -> defer.Deferred:
        future = asyncio.get_event_loop().create_future()
        self._event_waiters.append((method, session, future))
        return defer.Deferred.fromFuture(future)

    @defer.inlineCallbacks
    def close(self):
        if not self._process.ended.called:
            try:
                yield self.call("Browser.close")
            except Exception:
                pass
        yield as_deferred(self._conn.close())
        self._reader.cancel()


class Page:
    def __init__(self, browser, target_id, session):
        self.browser = browser
        self.target_id = target_id
        self.session = session

    def call(self, method, params=None):
        return self.browser.call(method, params, self.session)

    @defer.inlineCallbacks
    def evaluate(self, expression):
        """Run ``expression`` (may use ``await`` at top level via an async wrapper) and return its
        JSON value; a thrown error or rejected promise raises ``JavaScriptError``."""
        result = yield self.call("Runtime.evaluate", {
            "expression": expression, "awaitPromise": True, "returnByValue": True, "userGesture": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise JavaScriptError(text)
        return result.get("result", {}).get("value")

    def run(self, body):
        """Evaluate an async function body: ``return await ...`` works."""
        return self.evaluate(f"(async () => {{ {body} }})()")

    @defer.inlineCallbacks
    def screenshot(self) -> bytes:
        import base64
        shot = yield self.call("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(shot["data"])

    @defer.inlineCallbacks
    def reload(self):
        loaded = self.browser.next_event("Page.loadEventFired", self.session)
        yield self.call("Page.reload")
        yield loaded
        yield self.evaluate(PAGE_HELPERS)
