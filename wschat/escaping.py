"""
Text from the room made safe to print: one line per message or event, no terminal control
codes. The daemon's log (message bodies, close reasons, header values quoted in a refusal) and
the command-line client's standard output both use :func:`escapeControls`, which escapes,
reversibly:

- a backslash as ``\\\\``;
- newline, carriage return and tab as ``\\n``, ``\\r``, ``\\t``;
- every other C0 control character (U+0000 to U+001F), DEL (U+007F) and every C1 control
  character (U+0080 to U+009F) as ``\\xHH``, two lowercase hex digits (ESC is ``\\x1b``).

Everything else, non-ASCII letters included, is left as it is. :func:`unescapeControls` gives
back the original text.
"""

from __future__ import annotations

import re

_ESCAPES: dict[int, str] = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_ESCAPES.update({ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})

_NAMED = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
_ESCAPED = re.compile(r"\\(?:x([0-9a-f]{2})|(.))", re.DOTALL)


def escapeControls(text: str) -> str:
    """``text`` with control characters and backslashes escaped (see the module docstring)."""
    return text.translate(_ESCAPES)


def unescapeControls(escaped: str) -> str:
    """The text :func:`escapeControls` was given, from what it returned."""

    def one(match: re.Match[str]) -> str:
        hexCode, named = match.groups()
        if hexCode is not None:
            return chr(int(hexCode, 16))
        return _NAMED.get(named, match.group(0))

    return _ESCAPED.sub(one, escaped)
