"""Property-based fuzzing of the server's protocol machine, in every state it can be driven to,
with generated and mutated frames over an in-memory transport.

Invariant: whatever arrives, the server raises nothing, stays in a known state, and either
answers or closes the connection after telling the client why. Longer run:
`make fuzz` (FUZZ_EXAMPLES=20000 by default there).
"""

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.conversation import HEADER, Conversation

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
STATES = ["hello", "share", "confirm", "ready", "upload-offered", "receiving"]
FIELDS = ["type", "version", "user", "share", "confirm", "path", "offset", "sha1", "size", "mtime",
          "mode", "force", "recursive", "entries", "more", "scrypt", "salt", "server", "code", "message"]
TYPES = ["hello", "share", "confirm", "get", "put", "upload", "end", "list", "stat", "mkdir", "error",
         "ok", "params", "file", "entries", "x" * 300, ""]
STATS = {"inputs": 0, "crashes": 0, "internal errors": 0}


def _count_internal_errors(event):
    if "log_failure" in event:
        STATS["internal errors"] += 1

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=40)
    | st.sampled_from(["", "..", "/etc/passwd", "a/../../b", "sub", "hello.txt", "00" * 20, "04" + "00" * 64]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
messages = st.fixed_dictionaries({"type": st.sampled_from(TYPES)}).flatmap(
    lambda base: st.dictionaries(st.sampled_from(FIELDS[1:]), json_values, max_size=6).map(lambda d: {**d, **base})
)
inputs = st.lists(
    st.one_of(
        st.tuples(st.just("raw"), st.binary(max_size=300)),
        st.tuples(st.just("frame"), st.integers(0, 8), st.binary(max_size=300)),
        st.tuples(st.just("message"), messages),
        st.tuples(st.just("data"), st.binary(max_size=2000)),
        st.tuples(st.just("flip"), messages, st.integers(0, 10_000)),
        st.tuples(st.just("truncate"), messages, st.integers(0, 100)),
    ),
    min_size=1, max_size=5,
)


def encode_input(conv, item):
    kind = item[0]
    if kind == "raw":
        return item[1]
    if kind == "frame":
        return HEADER.pack(len(item[2]), item[1]) + item[2]
    if kind == "message":
        return conv.message_frame(item[1])
    if kind == "data":
        return conv.record(2, item[1]) if conv.send_cipher else HEADER.pack(len(item[1]), 2) + item[1]
    frame = bytearray(conv.message_frame(item[1]))
    if kind == "flip":
        frame[item[2] % len(frame)] ^= 1 << (item[2] % 8)
        return bytes(frame)
    return bytes(frame[: item[2] % len(frame)])  # truncate


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(state=st.sampled_from(STATES), sequence=inputs)
def test_server_survives_anything_in_every_state(world, state, sequence):
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(_count_internal_errors)
    try:
        _run(world, state, sequence)
    finally:
        globalLogPublisher.removeObserver(_count_internal_errors)
    assert STATS["internal errors"] == 0


def _run(world, state, sequence):
    conv = Conversation(world)
    conv.reach(state)
    conv.frames_out()
    for item in sequence:
        if conv.transport.disconnecting:
            break
        data = encode_input(conv, item)
        STATS["inputs"] += 1
        try:
            conv.feed(data)
        except Exception:  # noqa: BLE001 - the invariant under test
            STATS["crashes"] += 1
            raise
        assert conv.proto.state in conv.proto.TRANSITIONS or conv.proto.state == "closed"
    out = conv.frames_out()  # every record the server sent decrypts, in order
    if conv.transport.disconnecting and out:
        kind, plaintext = out[-1]
        assert kind in (0, 1)
        assert json.loads(plaintext)["type"] == "error"  # told why before the close
    conv.proto.connectionLost(None)


def test_fuzz_figures(capsys):
    with capsys.disabled():
        print(
            f"\n[figures] fuzzer: {STATS['inputs']} malformed or unexpected inputs, "
            f"{STATS['crashes']} crashes, {STATS['internal errors']} internal errors"
        )
    assert STATS["crashes"] == 0 and STATS["internal errors"] == 0
