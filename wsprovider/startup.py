"""Why the service could not start, said in one line that names the setting to change.

``describe_start_failure(failure, config)`` turns what the start-up raised (a port in use,
a TLS key that does not load, a bad endpoint string, a configuration error) into one
sentence for an operator: what happened, which setting (flag and key) to change, and to
what. It returns None for anything it does not recognise, which is a bug to report with
its traceback. No I/O here; the twistd layer (``wsprovider.tap``) prints the line and
exits.
"""

from __future__ import annotations

import errno

from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure

from .config import ConfigError


def flagged(message: str) -> str:
    """Name the flag beside the key: ``'MODE: ...'`` -> ``'--mode (MODE): ...'``."""
    key, sep, rest = message.partition(": ")
    if sep and key.replace("_", "").isalnum() and key.isupper():
        return f"--{key.lower().replace('_', '-')} ({key}): {rest}"
    return message


def _uri_shown(config) -> str:
    return config.uri or "the default tcp:8080:interface=127.0.0.1"


def _next_port_example(config, port) -> str:
    try:
        return f"--uri 127.0.0.1:{int(port) + 1}"
    except (TypeError, ValueError):
        return "--uri 127.0.0.1:8081"


def describe_listen_failure(error: CannotListenError, config) -> str:
    interface = error.interface or "every interface"
    where = f"port {error.port} on {interface}"
    code = getattr(error.socketError, "errno", None)
    if code == errno.EADDRINUSE:
        return (f"--uri (URI): {where} is already in use (URI is {_uri_shown(config)}); stop the process "
                f"that holds it (another wsprovider?) or choose another port, e.g. {_next_port_example(config, error.port)}")
    if code == errno.EACCES:
        return (f"--uri (URI): not allowed to listen on {where} (ports below 1024 need privileges); "
                f"choose a port above 1023, e.g. --uri 127.0.0.1:8080")
    if code == errno.EADDRNOTAVAIL:
        return (f"--uri (URI): {interface} is not an address of this machine; listen on one of its "
                f"addresses, e.g. --uri 127.0.0.1:{error.port} (or 0.0.0.0:{error.port} for every interface)")
    return f"--uri (URI): cannot listen on {where}: {error.socketError}; change --uri"


def describe_start_failure(failure: Failure, config) -> str | None:
    """One line for the operator, or None when the failure is not one we know (a bug)."""
    error = failure.value
    if isinstance(error, CannotListenError):
        return describe_listen_failure(error, config)
    if isinstance(error, ConfigError):
        return flagged(str(error))
    if _is_tls_error(error):
        return (f"--uri (URI): cannot load the TLS key or certificate of {_uri_shown(config)}: {_short(error)}; "
                "check privateKey= and certKey= (PEM files) in the endpoint string")
    if isinstance(error, (ValueError, TypeError)) and _came_from_endpoint_parsing(failure):
        return (f"--uri (URI): {_uri_shown(config)} is not a usable endpoint: {_short(error)}; accepted values: "
                "host:port, or a Twisted endpoint string such as tcp:8080:interface=127.0.0.1")
    return None


def _is_tls_error(error) -> bool:
    if isinstance(error, OSError) and getattr(error, "filename", None):
        return True
    try:
        from OpenSSL.crypto import Error as CryptoError
        from OpenSSL.SSL import Error as SSLError
    except ImportError:  # pragma: no cover - twisted[tls] brings pyOpenSSL
        return False
    return isinstance(error, (SSLError, CryptoError))


def _came_from_endpoint_parsing(failure: Failure) -> bool:
    return any("endpoints" in (frame[1] or "") for frame in failure.frames)


def _short(error) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def describe_nats_unreachable(config) -> str:
    """NATS required at start (NATS_STARTUP_TIMEOUT_SEC) and not reached in time."""
    return (f"--nats-url (NATS_URL): cannot reach NATS at {config.nats_url} within "
            f"{config.nats_startup_timeout_sec:g} s; start nats-server there or fix --nats-url "
            "(or set --nats-startup-timeout-sec=0 to start anyway and keep connecting in the background)")
