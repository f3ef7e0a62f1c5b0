"""The HTTP side of server mode: one ``twisted.web`` site, WebSocket at ``/<WS_PATH>``.

Health, metrics and admin resources are children of the same root so that operators
open one port. The browser SDK is served at ``/sdk/wsprovider.js`` (and its types at
``/sdk/wsprovider.d.ts``); the console (``CONSOLE``) at ``/``. No response names a
version: the ``Server`` header is ``SERVER_HEADER``.
"""

from __future__ import annotations

import hmac
import json
import os

from autobahn.twisted.resource import WebSocketResource
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from .interfaces import lattice_connected

_log = Logger(namespace="wsprovider.web")


class MessagingWebSocketResource(WebSocketResource):
    """Autobahn's resource, minus the HTTP channel's idle timeout.

    After the upgrade the channel no longer sees traffic, so its timer (12 h on a default
    ``Site``) would otherwise fire on a busy WebSocket connection.
    """

    def render(self, request):
        upgrade = b",".join(request.requestHeaders.getRawHeaders(b"upgrade", [])).lower()
        if b"websocket" not in upgrade:
            # A plain GET (someone opened the URL in a browser): say what this is, without
            # Autobahn's status page (which names its version).
            request.setResponseCode(426, b"Upgrade Required")
            request.setHeader(b"upgrade", b"websocket")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return (b"This is a WebSocket endpoint (subprotocols wsprovider.v1.json, wsprovider.v1.msgpack); "
                    b"connect with a WebSocket client, e.g. new WebSocket(\"ws://<host>" + request.path +
                    b"\"). The browser SDK is at /sdk/wsprovider.js.\n")
        request.channel.setTimeout(None)
        return WebSocketResource.render(self, request)


STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_TYPES = {".js": b"text/javascript; charset=utf-8", ".ts": b"text/plain; charset=utf-8",
          ".html": b"text/html; charset=utf-8", ".css": b"text/css; charset=utf-8"}
CONSOLE_CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               b"connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class StaticFile(Resource):
    """One file of ``wsprovider/static``, read once; no directory listing, no version."""

    isLeaf = True

    def __init__(self, relative_path: str, csp: bytes | None = None, replace: dict | None = None):
        Resource.__init__(self)
        with open(os.path.join(STATIC_DIR, relative_path), "rb") as f:
            self._body = f.read()
        for placeholder, value in (replace or {}).items():
            self._body = self._body.replace(placeholder.encode(), value.encode())
        self._type = _TYPES.get(os.path.splitext(relative_path)[1], b"application/octet-stream")
        self._csp = csp

    def render_GET(self, request):
        if [p for p in request.postpath if p]:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"no such file\n"
        request.setHeader(b"content-type", self._type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"access-control-allow-origin", b"*")  # the SDK may be imported from any page
        if self._csp:
            request.setHeader(b"content-security-policy", self._csp)
        return self._body


def static_directory(files: dict) -> Resource:
    """A resource whose children are ``{name: StaticFile}``, answering 404 for anything else."""
    directory = Resource()
    for name, child in files.items():
        directory.putChild(name.encode(), child)
    return directory


class Root(Resource):
    """The site's root: the console (``CONSOLE`` on) or a plain-text pointer to the WebSocket path."""

    def __init__(self, ws_path: str, console: bool = False):
        Resource.__init__(self)
        self._ws_path = ws_path
        self._console = (StaticFile("console/index.html", csp=CONSOLE_CSP,
                                    replace={"{{WS_PATH}}": "/" + ws_path.strip("/")}) if console else None)

    def getChild(self, path, request):
        if path == b"":
            return self._console if self._console is not None else self
        return Resource.getChild(self, path, request)

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (f"wsprovider: connect a WebSocket client to /{self._ws_path}; browser SDK: /sdk/wsprovider.js; "
                "console: off (CONSOLE=on to serve it here)\n").encode()


def _json(request, code: int, body) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode() + b"\n"


class Health(Resource):
    """``/healthz``: the process is alive and its reactor turns."""

    isLeaf = True

    def render_GET(self, request):
        return _json(request, 200, {"status": "ok"})


class Ready(Resource):
    """``/readyz``: 200 while listening, not draining, and the lattice (NATS link) is up; else 503."""

    isLeaf = True

    def __init__(self, provider):
        Resource.__init__(self)
        self._provider = provider

    def render_GET(self, request):
        provider = self._provider
        problems = []
        if provider.listening_port is None:
            problems.append("not listening")
        if provider.ws.draining:
            problems.append("draining: the service is shutting down")
        if not lattice_connected(provider.lattice):
            problems.append("the lattice is not connected")
        if problems:
            return _json(request, 503, {"status": "not ready", "problems": problems})
        return _json(request, 200, {"status": "ready"})


class Metrics(Resource):
    """``/metrics``: Prometheus text exposition of the provider's registry."""

    isLeaf = True

    def __init__(self, metrics):
        Resource.__init__(self)
        self._metrics = metrics

    def render_GET(self, request):
        request.setHeader(b"content-type", self._metrics.content_type.encode())
        return self._metrics.render()


class AdminSessions(Resource):
    """``/admin/sessions`` (GET: list) and ``/admin/sessions/<id>`` (GET: one; DELETE: disconnect).

    Requires ``Authorization: Bearer <ADMIN_TOKEN>``; without ``ADMIN_TOKEN`` configured
    every admin request is answered 404 with a message saying how to enable it.
    """

    isLeaf = True

    def __init__(self, provider, admin_token):
        Resource.__init__(self)
        self._provider = provider
        self._token = admin_token.encode("utf-8") if admin_token else None

    def render(self, request):
        if self._token is None:
            return _json(request, 404, {"error": "admin endpoints are disabled; set ADMIN_TOKEN "
                                                 "(--admin-token) to enable them"})
        header = (request.getHeader(b"authorization") or b"").decode("latin-1").strip()
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            request.setHeader(b"www-authenticate", b'Bearer realm="wsprovider-admin"')
            return _json(request, 401, {"error": "admin token required: send 'Authorization: Bearer <ADMIN_TOKEN>'"})
        if not hmac.compare_digest(presented.strip().encode("utf-8", "surrogateescape"), self._token):
            _log.warn("refused an admin request from {peer}: wrong admin token", peer=str(request.getClientAddress()))
            return _json(request, 403, {"error": "wrong admin token"})
        return Resource.render(self, request)

    def _session_id(self, request):
        path = [p for p in request.postpath if p]
        return path[0].decode("utf-8", "replace") if path else None

    def render_GET(self, request):
        sessions = self._provider.list_sessions()
        session_id = self._session_id(request)
        if session_id is None:
            return _json(request, 200, {"sessions": sessions, "count": len(sessions)})
        for s in sessions:
            if s.get("session_id") == session_id:
                return _json(request, 200, s)
        return _json(request, 404, {"error": f"no session {session_id!r} on this instance"})

    def render_DELETE(self, request):
        session_id = self._session_id(request)
        if session_id is None:
            return _json(request, 400, {"error": "DELETE /admin/sessions/<session_id>"})
        d = self._provider.disconnect_session(session_id, 1000, "disconnected by an administrator")

        def done(found):
            if found:
                _log.info("session {id} disconnected by an administrator", id=session_id)
                body = _json(request, 200, {"disconnected": session_id})
            else:
                body = _json(request, 404, {"error": f"no session {session_id!r} on this instance"})
            request.write(body)
            request.finish()

        def failed(failure):
            _log.failure("admin disconnect of {id} failed", failure, id=session_id)
            request.write(_json(request, 500, {"error": "disconnect failed inside the service"}))
            request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET


class Admin(Resource):
    def __init__(self, sessions):
        Resource.__init__(self)
        self.putChild(b"sessions", sessions)
        self._sessions = sessions

    def render(self, request):
        return self._sessions.render(request)


class _Request(Request):
    """Every response's ``Server`` header is the site's ``server_header`` (no version by default)."""

    def setHeader(self, name, value):
        if (name.lower() if isinstance(name, bytes) else name.lower().encode()) == b"server":
            value = self.channel.site.server_header
        Request.setHeader(self, name, value)


class QuietSite(Site):
    """A ``Site`` whose access log never shows query strings (``?token=`` carries credentials)
    and whose ``Server`` header names no version."""

    noisy = False
    requestFactory = _Request
    server_header = b"wsprovider"

    def log(self, request):
        uri = request.uri
        if b"?" in uri:
            request.uri = uri.split(b"?", 1)[0] + b"?..."
            try:
                Site.log(self, request)
            finally:
                request.uri = uri
        else:
            Site.log(self, request)


def console_enabled(config) -> bool:
    """``CONSOLE``: on, off, or auto (on when the listener is loopback-only, as the default URI is)."""
    if config.console != "auto":
        return config.console == "on"
    from .endpoints import is_loopback_only, server_endpoint_description
    return is_loopback_only(server_endpoint_description(config.uri))


def make_site(factory, ws_path: str = "ws", provider=None, metrics=None) -> Site:
    """The server-mode site: WebSocket at ``/<ws_path>``, the SDK at ``/sdk/``; with ``provider``,
    also ``/healthz``, ``/readyz``, ``/admin/sessions`` and (``CONSOLE``) the console at ``/``;
    with ``metrics`` (``ProviderMetrics``), ``/metrics``."""
    config = provider.config if provider is not None else factory.config
    console = provider is not None and console_enabled(config)
    server_header = config.server_header.encode("latin-1", "replace")
    factory.server = server_header.decode("latin-1")  # Autobahn's handshake responses
    root = Root(ws_path, console=console)
    root.putChild(ws_path.strip("/").encode(), MessagingWebSocketResource(factory))
    root.putChild(b"sdk", static_directory({"wsprovider.js": StaticFile("wsprovider.js"),
                                             "wsprovider.d.ts": StaticFile("wsprovider.d.ts")}))
    if console:
        root.putChild(b"console", static_directory({name: StaticFile("console/" + name, csp=CONSOLE_CSP)
                                                    for name in ("console.js", "console.css")}))
    if provider is not None:
        root.putChild(b"healthz", Health())
        root.putChild(b"readyz", Ready(provider))
        root.putChild(b"admin", Admin(AdminSessions(provider, provider.config.admin_token)))
    if metrics is not None:
        root.putChild(b"metrics", Metrics(metrics))
    site = QuietSite(root)
    site.server_header = server_header
    from .handshake import guard_site  # deadline and caps for connections not upgraded yet
    return guard_site(site, factory)
