"""``wasmcloud:messaging@0.2.0`` in the wRPC value encoding.

::

    record broker-message { subject: string, body: list<u8>, reply-to: option<string> }
    consumer.publish(msg: broker-message) -> result<_, string>
    consumer.request(subject: string, body: list<u8>, timeout-ms: u32) -> result<broker-message, string>
    handler.handle-message(msg: broker-message) -> result<_, string>

Parameters are the tuple of all parameters; a single result is its own 1-tuple, which
encodes the same as the value, so results here are the bare ``result`` type.
"""

from __future__ import annotations

from ..message import BrokerMessage
from .values import Bytes, Option, Record, Result, String, Tuple, U32


def _broker_message(subject, body, reply_to):
    # The WIT record allows an empty subject and an empty reply-to; BrokerMessage does not
    # (an empty reply-to means "none" for every transport we bridge to).
    return BrokerMessage(subject, body, reply_to or None)


def _fields(msg):
    return {"subject": msg.subject, "body": msg.body, "reply_to": msg.reply_to}


BROKER_MESSAGE = Record("broker-message", [("subject", String), ("body", Bytes), ("reply_to", Option(String))],
                        make=_broker_message, fields_of=_fields)

CONSUMER = "wasmcloud:messaging/consumer@0.2.0"
HANDLER = "wasmcloud:messaging/handler@0.2.0"

PUBLISH_PARAMS = Tuple(BROKER_MESSAGE)
PUBLISH_RESULTS = Result(None, String)
REQUEST_PARAMS = Tuple(String, Bytes, U32)
REQUEST_RESULTS = Result(BROKER_MESSAGE, String)
HANDLE_MESSAGE_PARAMS = Tuple(BROKER_MESSAGE)
HANDLE_MESSAGE_RESULTS = Result(None, String)
