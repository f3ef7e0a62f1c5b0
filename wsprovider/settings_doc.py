"""Write the settings reference (docs/settings.rst) from the settings table.

``python -m wsprovider.settings_doc > docs/settings.rst``; a test keeps the file in step
with ``wsprovider.config.SETTINGS``.
"""

from __future__ import annotations

import sys

from .config import GROUPS, SETTINGS


def _default(value) -> str:
    if value is None or value == () or value == "":
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def render() -> str:
    lines = [
        "Settings reference",
        "==================",
        "",
        "Generated from ``wsprovider/config.py`` by ``python -m wsprovider.settings_doc``.",
        "",
        "Every setting is a link-config key and a ``twistd wsprovider`` flag: ``MAX_MESSAGE_SIZE``",
        "is ``--max-message-size``. ``HEADER_<name>`` (client mode: an upgrade-request header) is",
        "also accepted as ``--header Name=value``. An invalid value stops the service with an",
        "error that names the key and the accepted values.",
        "",
    ]
    for group, title in GROUPS.items():
        members = [s for s in SETTINGS if s.group == group]
        if not members:
            continue
        lines += [title, "-" * len(title), ""]
        for s in members:
            lines.append(f"``{s.key}`` (``--{s.flag}``, default ``{_default(s.default)}``)")
            lines.append("    " + " ".join(s.help.split()).replace("*", "\\*"))
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
