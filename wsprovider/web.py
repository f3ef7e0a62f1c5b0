"""The HTTP side of server mode: one ``twisted.web`` site, WebSocket at ``/<WS_PATH>``.

Health, metrics and admin resources are children of the same root so that operators
open one port.
"""

from __future__ import annotations

from autobahn.twisted.resource import WebSocketResource
from twisted.web.resource import Resource
from twisted.web.server import Site


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


def make_site(factory, ws_path: str = "ws") -> Site:
    root = Root(ws_path)
    root.putChild(ws_path.strip("/").encode(), MessagingWebSocketResource(factory))
    site = Site(root)
    site.noisy = False
    return site
