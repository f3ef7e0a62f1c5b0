"""The broadcast frame every baseline sends for a trigger: the trigger's body re-wrapped
the way wsprovider's bench broadcaster does it, so that every server sends frames of the
same size (100 bytes for the 49-byte body, 16 KiB for the big one).

Trigger: ``{"subject":"bench.broadcast","body":"<body>"}``
News:    ``{"type":"message","subject":"bench.news","body":"<body>"}``

Built once per broadcast (not per delivery), by slicing: no JSON parsing.
"""

TRIGGER = '{"subject":"bench.broadcast","body":"'
NEWS = '{"type":"message","subject":"bench.news","body":"'
TRIGGER_B = TRIGGER[:28].encode()  # '{"subject":"bench.broadcast"'
TRIGGER_S = TRIGGER[:28]
_AT = len(TRIGGER)
_NEWS_B = NEWS.encode()


def news_for(trigger):
    """The news frame for a trigger: ``str`` for a ``str`` trigger, ``bytes`` otherwise."""
    if isinstance(trigger, str):
        return NEWS + trigger[_AT:]
    return _NEWS_B + bytes(trigger[_AT:])
