"""Text from a peer made safe to show: on a terminal, in a log line, in JSON.

Names, error messages and codes come from the other side of the connection, before or after
authentication. Shown raw, their control characters could clear a screen, set a window title,
forge a prompt or a log line. The one rule, used by the client's output and the daemon's log:
C0 and C1 controls, DEL, and the Unicode line and paragraph separators become visible escapes
(`\\x1b`, `\\n`, `\\u2028`); a backslash is doubled, so that an escaped name cannot be mistaken
for a real one that happens to contain the escape.
"""

import re

_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029]")
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
