"""Turn the ``URI`` setting of server mode into a Twisted server endpoint description."""

from __future__ import annotations

from urllib.parse import urlsplit

from .config import ConfigError

DEFAULT_SERVER_ENDPOINT = "tcp:8080:interface=127.0.0.1"
LOOPBACK = "127.0.0.1"

_ENDPOINT_PREFIXES = ("tcp:", "tcp6:", "ssl:", "unix:", "systemd:", "le:", "lets:", "txtorcon:", "onion:")


def server_endpoint_description(uri: str | None) -> str:
    """Accept the seed's ``host:port``, a ``ws://host:port`` URL, or a Twisted endpoint string."""
    if not uri:
        return DEFAULT_SERVER_ENDPOINT
    uri = uri.strip()
    if uri.startswith(_ENDPOINT_PREFIXES):
        return uri
    if uri.startswith(("ws://", "http://")):
        parts = urlsplit(uri)
        return _tcp(parts.hostname or LOOPBACK, parts.port or 80, uri)
    if uri.startswith(("wss://", "https://")):
        raise ConfigError(f"URI: {uri!r}: for TLS in server mode use an endpoint string like "
                          "'ssl:8443:privateKey=key.pem:certKey=cert.pem'")
    if uri.startswith("["):  # [::1]:8080
        host, sep, port = uri[1:].partition("]:")
        if not sep:
            raise ConfigError(f"URI: {uri!r} is not valid; accepted values: host:port, [ipv6]:port, "
                              "or a Twisted endpoint string such as tcp:8080:interface=127.0.0.1")
        return _tcp(host, port, uri)
    host, sep, port = uri.rpartition(":")
    if not sep or not host:
        if uri.isdigit():  # a bare port listens where the default does: loopback only
            return _tcp(LOOPBACK, uri, uri)
        raise ConfigError(f"URI: {uri!r} is not valid; accepted values: host:port (0.0.0.0:8080), "
                          "[ipv6]:port, or a Twisted endpoint string such as tcp:8080:interface=127.0.0.1")
    return _tcp(host, port, uri)


def _tcp(host: str, port, original: str) -> str:
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ConfigError(f"URI: {original!r}: port {port!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"URI: {original!r}: port {port} is out of range 0..65535")
    if ":" in host:
        return f"tcp6:{port}:interface=" + host.replace(":", "\\:")
    return f"tcp:{port}:interface={host}"


def check_server_uri_path(uri: str | None, ws_path: str) -> None:
    """A server-mode ``ws://host:port/path`` must not name a path other than ``WS_PATH``:
    the path is where sessions are served, and ignoring it would leave clients knocking at
    the wrong door. Raises ``ConfigError`` saying which setting to use instead."""
    if not uri or not uri.strip().startswith(("ws://", "http://")):
        return
    path = urlsplit(uri.strip()).path.strip("/")
    if path and path != ws_path.strip("/"):
        raise ConfigError(f"URI: {uri!r} names the path /{path}, but sessions are served at /{ws_path} "
                          f"(WS_PATH); to serve them at /{path} set WS_PATH={path} (--ws-path {path}) and give URI "
                          "without a path")


def is_loopback_only(description: str) -> bool:
    """True when the endpoint description listens on a loopback interface only (CONSOLE=auto)."""
    kind, _, rest = description.partition(":")
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    interface = ""
    for part in rest.replace("\\:", "\x00").split(":")[1:]:
        key, sep, value = part.partition("=")
        if sep and key == "interface":
            interface = value.replace("\x00", ":")
    return interface.startswith("127.") or interface in ("::1", "localhost")
