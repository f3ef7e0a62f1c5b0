"""``wsprovider-wasmcloud``: the executable a wasmCloud 1.x host starts.

The host runs it with no arguments and an environment cleared to ``RUST_LOG`` and
``OTEL_*``, writes one HostData line on stdin and closes it. Logs go to stderr (the host
shows them): plain text, or JSON lines with ``structured_logging``; the level is HostData's
``log_level`` (default info). Exit status: 0 after a shutdown or SIGTERM, 2 for bad
HostData (the message says which field).
"""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, jsonFileLogObserver,
    textFileLogObserver,
)

from .hostdata import HostDataError, read_host_data

LEVELS = {"trace": LogLevel.debug, "debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error, "critical": LogLevel.critical}


def start_logging(host_data, stream=None) -> None:
    stream = stream or sys.stderr
    observer = jsonFileLogObserver(stream) if host_data.structured_logging else textFileLogObserver(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS.get(host_data.log_level or "info", LogLevel.info))
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, [predicate])], redirectStandardIO=False)


def run(host_data, reactor=None) -> int:
    """Run the provider in the reactor until shutdown; return the exit status."""
    if reactor is None:
        from twisted.internet import reactor
    from .service import Wasmcloud1Provider

    provider = Wasmcloud1Provider(host_data, reactor, on_exit=lambda: reactor.callLater(0, _stop, reactor))
    reactor.callWhenRunning(provider.startService)
    # SIGTERM/SIGINT stop the reactor; before it stops, the provider closes its sessions (1001).
    reactor.addSystemEventTrigger("before", "shutdown", provider.stopService)
    reactor.run()
    return 0


def _stop(reactor):
    if reactor.running:
        reactor.stop()


def make_service(source: str, reactor=None):
    """For ``twistd wsprovider --wasmcloud-host-data SOURCE``: the provider service, HostData
    read from ``SOURCE`` (``-`` for stdin, else a file holding the line). twistd's own
    logging applies; a host shutdown stops the reactor."""
    if reactor is None:
        from twisted.internet import reactor
    from .service import Wasmcloud1Provider

    if source == "-":
        line = sys.stdin.buffer.readline()
    else:
        with open(source, "rb") as f:
            line = f.readline()
    host_data = read_host_data(line)
    return Wasmcloud1Provider(host_data, reactor, on_exit=lambda: reactor.callLater(0, _stop, reactor))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nBuild a provider archive of this installation: python -m wsprovider.wasmcloud1.par --help")
        return 0
    line = sys.stdin.buffer.readline()
    try:
        host_data = read_host_data(line)
    except HostDataError as error:
        print(f"wsprovider-wasmcloud: {error}", file=sys.stderr)
        return 2
    start_logging(host_data)
    return run(host_data)


if __name__ == "__main__":
    sys.exit(main())
