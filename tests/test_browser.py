"""The browser SDK and the console in a real headless Chromium against a real provider.

Each test launches Chromium (tests/browser.py), opens pages served by the provider, and
drives wsprovider.js in them: welcome, publish/subscribe between two pages, request/reply
against a Python handler and against another page, binary bodies (JSON and msgpack
subprotocols), reconnect and resubscribe after the service restarts, a refused origin;
and the console at / exchanging messages with a second tab (with a screenshot).
"""

import os
import sys

from twisted.internet import defer, protocol
from twisted.trial import unittest
from zope.interface import implementer

from wsprovider import BrokerMessage, IMessageHandler
from wsprovider.handlers import echo

from .browser import Browser, JavaScriptError
from .natsserver import free_port
from .peers import start_provider

WAIT_MS = 20000  # bound of every wait inside a page

# Installed in each SDK page: a client, and what it received, with waits.
CONNECT = """
  const wsp = await import('/sdk/wsprovider.js');
  window.wsp = wsp;
  window.got = [];
  window.welcomes = 0;
  window.subscribedCount = 0;
  window.client = wsp.connect(undefined, %s);
  client.on('welcome', () => { welcomes += 1; document.title = 'welcome ' + welcomes; });
  client.on('subscribed', () => { subscribedCount += 1; document.title = 'subscribed ' + subscribedCount; });
  window.collect = (m) => { got.push({subject: m.subject, text: m.text, bytes: [...m.body], replyTo: m.replyTo});
                            document.title = 'got ' + got.length; };
  window.gotN = (n) => __waitUntil(() => got.length >= n && got, %d, n + ' messages');
  const session = await client.ready();
  return session;
"""


def connect_js(options="{}"):
    return CONNECT % (options, WAIT_MS)


@implementer(IMessageHandler)
class Upper:
    """A Python component answering requests with the body in upper case."""

    def __init__(self, consumer):
        self.consumer = consumer

    def handle_message(self, msg):
        if msg.reply_to:
            return self.consumer.publish(BrokerMessage(msg.reply_to, msg.body.upper()))


class SdkInBrowserTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.browser = yield Browser.launch(self)

    @defer.inlineCallbacks
    def start(self, config=None, port=0):
        values = {"CONSOLE": "off", "URI": f"tcp:{port}:interface=127.0.0.1"}
        values.update(config or {})
        provider = yield start_provider(self, values, handlers=[
            ("upper", Upper, {"SUBSCRIPTIONS": "upper.>"}), ("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])
        return provider

    @defer.inlineCallbacks
    def page(self, provider, options="{}"):
        page = yield self.browser.open(f"http://127.0.0.1:{provider.port}/")
        session = yield page.run(connect_js(options))
        return page, session

    @defer.inlineCallbacks
    def test_welcome_gives_the_session(self):
        provider = yield self.start()
        _, session = yield self.page(provider)
        self.assertEqual(session["replyTo"], f"_ws.session.{session['id']}")
        self.assertEqual(session["protocol"], "wsprovider.v1.json")
        self.assertEqual([s["session_id"] for s in provider.list_sessions()], [session["id"]])

    @defer.inlineCallbacks
    def test_publish_subscribe_between_two_pages(self):
        provider = yield self.start()
        a, _ = yield self.page(provider)
        b, session_b = yield self.page(provider)
        yield a.run("await client.subscribe('chat.*', collect).ready;")
        yield b.run("client.publish('chat.room1', 'hello from b'); client.publish('chat.room1.deep', 'not for *');"
                    "client.publish('chat.room2', 'second');")
        got = yield a.run("return await gotN(2);")
        self.assertEqual([(m["subject"], m["text"]) for m in got], [("chat.room1", "hello from b"), ("chat.room2", "second")])
        self.assertEqual(got[0]["replyTo"], session_b["replyTo"])

    @defer.inlineCallbacks
    def test_request_reply_against_a_python_handler(self):
        provider = yield self.start()
        page, _ = yield self.page(provider)
        text = yield page.run("return (await client.request('upper.q', 'ping', {timeout: 5000})).text;")
        self.assertEqual(text, "PING")
        code = yield page.run("try { await client.request('nobody.home', 'x', {timeout: 3000}); return 'answered'; }"
                              " catch (e) { return e.code; }")
        self.assertEqual(code, "no_responders")

    @defer.inlineCallbacks
    def test_request_reply_against_another_page(self):
        provider = yield self.start()
        server, _ = yield self.page(provider)
        asker, _ = yield self.page(provider)
        yield server.run("await client.subscribe('svc.add', (m) => { const [x, y] = m.json(); m.respond(String(x + y)); }).ready;")
        answer = yield asker.run("return (await client.request('svc.add', [2, 3], {timeout: 5000})).text;")
        self.assertEqual(answer, "5")

    @defer.inlineCallbacks
    def test_binary_bodies_json_and_msgpack(self):
        provider = yield self.start()
        receiver, _ = yield self.page(provider)
        sender, session = yield self.page(provider, "{protocol: 'msgpack'}")
        self.assertEqual(session["protocol"], "wsprovider.v1.msgpack")
        yield receiver.run("await client.subscribe('bin.>', collect).ready;")
        yield sender.run("client.publish('bin.raw', new Uint8Array([0, 255, 1, 128, 192]));")
        got = yield receiver.run("return await gotN(1);")
        self.assertEqual(got[0]["bytes"], [0, 255, 1, 128, 192])
        # Through a Python component and back, both protocols.
        for page in (receiver, sender):
            echoed = yield page.run("return [...(await client.request('echo.bin', new Uint8Array([7, 0, 250]))).body];")
            self.assertEqual(echoed, [7, 0, 250])

    @defer.inlineCallbacks
    def test_reconnects_and_resubscribes_after_the_service_restarts(self):
        port = free_port()
        provider = yield self.start(port=port)
        page, first = yield self.page(provider, "{minDelay: 100, maxDelay: 1000}")
        yield page.run("await client.subscribe('news.>', collect).ready;")
        yield provider.shutdown()
        restarted = yield self.start(port=port)
        yield page.run(f"await __waitUntil(() => welcomes >= 2 && subscribedCount >= 2, {WAIT_MS}, 'welcome and resubscribe');")
        second = yield page.evaluate("client.session")
        self.assertNotEqual(second["id"], first["id"])
        yield restarted.publish(BrokerMessage("news.today", b"after the restart"))
        got = yield page.run("return await gotN(1);")
        self.assertEqual(got[0]["text"], "after the restart")
        state = yield page.evaluate("client.state")
        self.assertEqual(state, "open")

    @defer.inlineCallbacks
    def test_token_from_the_options(self):
        provider = yield self.start({"AUTH_TOKEN": "browser-token"})
        _, session = yield self.page(provider, "{token: 'browser-token'}")
        self.assertEqual([s["session_id"] for s in provider.list_sessions()], [session["id"]])
        page = yield self.browser.open(f"http://127.0.0.1:{provider.port}/")
        with self.assertRaises(JavaScriptError):
            yield page.run(connect_js("{token: 'wrong', maxAttempts: 0}"))
        self.assertEqual(len(provider.list_sessions()), 1)

    @defer.inlineCallbacks
    def test_refused_origin(self):
        provider = yield self.start({"ALLOWED_ORIGINS": "https://app.example.com"})
        page = yield self.browser.open(f"http://127.0.0.1:{provider.port}/")
        with self.assertRaises(JavaScriptError) as caught:
            yield page.run(connect_js("{maxAttempts: 0}"))
        self.assertIn("gave up connecting", str(caught.exception))
        self.assertEqual(provider.ws.stats.refusals["origin"], 1)
        self.assertEqual(provider.list_sessions(), [])
        closes = yield page.evaluate("client.state")
        self.assertEqual(closes, "closed")


class ConsoleInBrowserTests(unittest.TestCase):
    """The console at / with no flags (CONSOLE=auto on loopback), two tabs, a screenshot."""

    timeout = 120

    @defer.inlineCallbacks
    def test_console_exchanges_messages_with_a_second_tab(self):
        browser = yield Browser.launch(self)
        provider = yield start_provider(self, {"ADMIN_TOKEN": "admin-secret"},
                                        handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])
        url = f"http://127.0.0.1:{provider.port}/"
        first = yield browser.open(url)
        second = yield browser.open(url)
        for tab in (first, second):
            yield tab.run(f"await __waitUntil(() => document.getElementById('state').textContent === 'open', {WAIT_MS}, 'open');")
        session_first = yield first.evaluate("document.getElementById('session-id').textContent")
        self.assertEqual(sorted(s["session_id"] for s in provider.list_sessions()),
                         sorted([session_first, (yield second.evaluate("document.body.dataset.session"))]))

        log_has = "await __waitUntil(() => document.getElementById('log').textContent.includes(%r), %d, %r);"
        # The first tab subscribes (the form's default pattern, chat.>); the second publishes.
        yield first.run("document.getElementById('subscribe').click();" + log_has % ("subscribed chat.>", WAIT_MS, "subscribed"))
        yield second.run("document.getElementById('pub-body').value = 'hello from the second tab';"
                         "document.getElementById('publish').click();")
        yield first.run(log_has % ('"hello from the second tab"', WAIT_MS, "message"))
        # A request to the echo component, from the console's request form.
        yield first.run("document.getElementById('request').click();" + log_has % ('reply from echo.q: "ping"', WAIT_MS, "reply"))

        # Sessions through the admin API: both listed; disconnect the second tab's session.
        yield first.run("document.getElementById('admin-token').value = 'admin-secret';"
                        "document.getElementById('admin-load').click();"
                        f"await __waitUntil(() => document.querySelectorAll('#sessions tbody tr').length === 2, {WAIT_MS}, 'sessions');")
        session_second = yield second.evaluate("document.body.dataset.session")
        yield first.run(f"""[...document.querySelectorAll('#sessions tbody tr')]
                            .find((row) => row.cells[0].textContent === {session_second!r}).querySelector('button').click();""")
        yield second.run(f"await __waitUntil(() => document.body.dataset.session !== {session_second!r}, {WAIT_MS}, 'a new session');")

        png = yield first.screenshot()
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        self.assertGreater(len(png), 20000)  # a rendered page, not a blank one
        out = os.environ.get("WSPROVIDER_SCREENSHOT_DIR") or self.mktemp()
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "console.png"), "wb") as f:
            f.write(png)


def _read(*parts):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, *parts), encoding="utf-8") as f:
        return f.read()


class _Twistd(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.listening = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data
        if not self.listening.called and b"wsprovider listening" in self.output:
            self.listening.callback(None)

    errReceived = outReceived

    def processEnded(self, reason):
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(None)


class ReadmeFirstCommandInBrowserTests(unittest.TestCase):
    """The README's first command (its twistd part, as written, plus only a free port instead
    of 8080), then the console in two tabs: they exchange messages; a screenshot is kept."""

    timeout = 120

    @defer.inlineCallbacks
    def test_console_of_the_readme_service_chats_between_two_tabs(self):
        import shlex
        from twisted.internet import reactor
        first_line = next(line for line in _read("README.rst").splitlines() if "twistd -n wsprovider" in line)
        args = shlex.split(first_line.split("&&", 1)[1])
        self.assertEqual(args[:3], ["twistd", "-n", "wsprovider"])
        port = free_port()
        process = _Twistd()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        argv = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
                "-n", "--pidfile=", *args[2:], f"--uri=127.0.0.1:{port}"]
        transport = reactor.spawnProcess(process, sys.executable, argv, env=dict(os.environ, PYTHONPATH=root), path=root)

        def stop():
            if not process.ended.called:
                transport.signalProcess("TERM")
            return process.ended
        self.addCleanup(stop)
        yield process.listening
        browser = yield Browser.launch(self)
        url = f"http://127.0.0.1:{port}/"
        tabs = [(yield browser.open(url)), (yield browser.open(url))]
        for tab in tabs:
            yield tab.run(f"await __waitUntil(() => document.getElementById('state').textContent === 'open', {WAIT_MS}, 'open');")
        first, second = tabs
        log_has = "await __waitUntil(() => document.getElementById('log').textContent.includes(%r), %d, %r);"
        yield first.run("document.getElementById('subscribe').click();" + log_has % ("subscribed chat.>", WAIT_MS, "subscribed"))
        yield second.run("document.getElementById('subscribe').click();" + log_has % ("subscribed chat.>", WAIT_MS, "subscribed"))
        yield second.run("document.getElementById('pub-body').value = 'hello from tab 2'; document.getElementById('publish').click();")
        yield first.run(log_has % ('"hello from tab 2"', WAIT_MS, "tab 2's message"))
        yield first.run("document.getElementById('pub-body').value = 'hi back from tab 1'; document.getElementById('publish').click();")
        yield second.run(log_has % ('"hi back from tab 1"', WAIT_MS, "tab 1's message"))
        yield first.run("document.getElementById('request').click();" + log_has % ('reply from echo.q: "ping"', WAIT_MS, "echo"))
        png = yield first.screenshot()
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        self.assertGreater(len(png), 20000)
        out = os.environ.get("WSPROVIDER_SCREENSHOT_DIR") or os.path.abspath(self.mktemp())
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "console-readme.png"), "wb") as f:
            f.write(png)


class DocumentedExamplesInBrowserTests(unittest.TestCase):
    """The README's plain-WebSocket snippet and docs/browser.rst's SDK example, as written,
    in a page of a service started like the README's first command (echo on echo.>)."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.browser = yield Browser.launch(self)
        self.provider = yield start_provider(self, handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])
        self.page = yield self.browser.open(f"http://127.0.0.1:{self.provider.port}/")
        yield self.page.evaluate("window.logged = []; console.log = (...args) => { logged.push(args);"
                                 " document.title = 'logged ' + logged.length; };")

    def _here(self, code):
        return code.replace("127.0.0.1:8080", f"127.0.0.1:{self.provider.port}")

    @defer.inlineCallbacks
    def test_readme_new_websocket_snippet(self):
        text = _read("README.rst")
        block = text[text.index("With no SDK at all"):].split("::\n\n", 1)[1]
        lines = [line[4:] for line in block.splitlines()[:5]]
        self.assertIn("new WebSocket", lines[0])
        code, later = lines[:3], [line.split(":", 1)[1] for line in lines[3:]]
        yield self.page.evaluate(self._here("\n".join(code)))
        seen = "(type) => logged.some(([f]) => f && f.type === type)"
        yield self.page.run(f"const seen = {seen}; await __waitUntil(() => seen('welcome') && seen('subscribed'), {WAIT_MS}, 'welcome');")
        yield self.page.evaluate("\n".join(later))
        got = yield self.page.run(f"const seen = {seen}; await __waitUntil(() => seen('message') && seen('reply'), {WAIT_MS}, 'message and reply');"
                                  "return logged.map(([f]) => f);")
        self.assertIn({"type": "message", "subject": "chat.room1", "body": "hi all",
                       "reply_to": next(f["reply_to"] for f in got if f["type"] == "welcome")}, got)
        self.assertEqual(next(f for f in got if f["type"] == "reply")["body"], "ping")

    @defer.inlineCallbacks
    def test_docs_browser_sdk_example(self):
        text = _read("docs", "browser.rst")
        block = text.split('<script type="module">\n', 1)[1].split("</script>", 1)[0]
        code = "\n".join(line.strip() for line in block.splitlines())
        self.assertEqual(len(code.strip().splitlines()), 10)
        code = code.replace('import { connect } from "/sdk/wsprovider.js";',
                            'const { connect } = await import("/sdk/wsprovider.js");')
        yield self.page.run(code)
        logged = yield self.page.run(f"await __waitUntil(() => logged.some(([a]) => a === 'chat.room1'), {WAIT_MS}, 'chat');"
                                     "return logged;")
        self.assertIn(["echo said", "ping"], logged)
        self.assertTrue(any(entry[0] == "chat.room1" and entry[1].startswith("hi from ") for entry in logged), logged)
