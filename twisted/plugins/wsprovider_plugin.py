"""``twistd wsprovider``: the WebSocket transport for wasmcloud:messaging."""

from twisted.application.service import ServiceMaker

wsprovider = ServiceMaker(
    "wsprovider",
    "wsprovider.tap",
    "WebSocket transport for the wasmcloud:messaging contract (server or client mode).",
    "wsprovider",
)
