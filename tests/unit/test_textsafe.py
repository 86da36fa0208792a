"""Text from a peer made safe to show: control and bidirectional characters escaped."""

import json

import pytest


@pytest.mark.parametrize("text, shown", [("a\u202eb", "a\\u202eb"), ("x\u2066y\u2069", "x\\u2066y\\u2069"),
                                         ("\u200fz", "\\u200fz"), ("ok é", "ok é")])
def test_bidirectional_controls_are_shown_escaped(text, shown):
    from eketwist import textsafe

    assert textsafe.escape(text) == shown
    encoded = textsafe.json_text(text)
    assert json.loads(encoded) == text
    assert not any(control in encoded for control in "\u202e\u2066\u2069\u200f")
