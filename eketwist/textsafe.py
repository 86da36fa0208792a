"""Text from a peer made safe to show: on a terminal, in a log line, in JSON.

Names, error messages and codes come from the other side of the connection, before or after
authentication. Shown raw, their control characters could clear a screen, set a window title,
forge a prompt or a log line. The one rule, used by the client's output and the daemon's log:
C0 and C1 controls, DEL, the Unicode line and paragraph separators and the bidirectional
controls become visible escapes (`\\x1b`, `\\n`, `\\u2028`); a backslash is doubled, so that
an escaped name cannot be mistaken for a real one that happens to contain the escape.
"""

import json
import re

# Controls a terminal acts on or that forge lines (C0, DEL, C1 with U+009B a CSI, the Unicode
# line separators), and the bidirectional controls, which reorder what is shown around them (a
# name could read as another).
_CONTROLS = "\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\\\\{_CONTROLS}]")
# What json.dumps(ensure_ascii=False) leaves raw of those, and lone surrogates (which an
# output stream could not even encode).
_RAW_IN_JSON = re.compile(f"[{_CONTROLS}\ud800-\udfff]")
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match):
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text):
    """`text` with every control character shown as an escape; other text unchanged."""
    if not isinstance(text, str):
        text = str(text)
    return _UNSAFE.sub(_escape, text)


def json_text(document):
    """`document` as one line of JSON in which every such character is a \\uXXXX escape."""
    return _RAW_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", json.dumps(document, ensure_ascii=False))
