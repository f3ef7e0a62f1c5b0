"""The HTTP side of server mode: one ``twisted.web`` site, WebSocket at ``/<WS_PATH>``.

Health, metrics and admin resources are children of the same root so that operators
open one port.
"""

from __future__ import annotations

import hmac
import json

from autobahn.twisted.resource import WebSocketResource
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

_log = Logger(namespace="wsprovider.web")


class MessagingWebSocketResource(WebSocketResource):
    """Autobahn's resource, minus the HTTP channel's idle timeout.

    After the upgrade the channel no longer sees traffic, so its timer (12 h on a default
    ``Site``) would otherwise fire on a busy WebSocket connection.
    """

    def render(self, request):
        request.channel.setTimeout(None)
        return WebSocketResource.render(self, request)


class Root(Resource):
    """The site's root: a plain-text pointer to the WebSocket path."""

    def __init__(self, ws_path: str):
        Resource.__init__(self)
        self._ws_path = ws_path

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"wsprovider: connect a WebSocket client to /{self._ws_path}\n".encode()


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
        if getattr(provider.ws, "draining", False):
            problems.append("draining: the service is shutting down")
        if not getattr(provider.lattice, "connected", True):
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


class QuietSite(Site):
    """A ``Site`` whose access log never shows query strings (``?token=`` carries credentials)."""

    noisy = False

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


def make_site(factory, ws_path: str = "ws", provider=None, metrics=None) -> Site:
    """The server-mode site: WebSocket at ``/<ws_path>``; with ``provider``, also ``/healthz``,
    ``/readyz``, ``/admin/sessions``; with ``metrics`` (``ProviderMetrics``), ``/metrics``."""
    root = Root(ws_path)
    root.putChild(ws_path.strip("/").encode(), MessagingWebSocketResource(factory))
    if provider is not None:
        root.putChild(b"healthz", Health())
        root.putChild(b"readyz", Ready(provider))
        root.putChild(b"admin", Admin(AdminSessions(provider, provider.config.admin_token)))
    if metrics is not None:
        root.putChild(b"metrics", Metrics(metrics))
    from .handshake import guard_site  # deadline and caps for connections not upgraded yet
    return guard_site(QuietSite(root), factory)
