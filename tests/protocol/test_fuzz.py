"""Property-based fuzzing of the server's protocol machine, in every one of its states, with
generated and mutated frames over an in-memory transport (a Clock for time, the thread pool run
by hand: tests/support/conversation.py).

Invariant: whatever arrives, the server raises nothing, stays in a known state, and either
answers or closes the connection after telling the client why; once its clock and its threads
have run, still nothing raised and no internal error logged. Each state is a test of its own
(FUZZ_EXAMPLES examples each, 30 by default; `make fuzz` runs 2000 each).
"""

import gc
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from tests.support.conversation import HEADER, STATES, STATES_V2, Conversation, threads_by_hand

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))


@pytest.fixture(autouse=True)
def frozen_heap():
    """Every example ends with the server's quiet-time trim, a full gc.collect(): its cost is
    what the process holds, and the tests run before these (hypothesis's data among it) add to
    what was frozen after collection (tests/support/fixtures.py). What lives now, once its
    garbage is collected, is frozen too, so the trim scans only what the examples make."""
    gc.collect()
    gc.freeze()
FIELDS = ["type", "version", "user", "share", "confirm", "path", "offset", "sha1", "size", "mtime",
          "mode", "force", "recursive", "entries", "more", "scrypt", "salt", "server", "code", "message"]
FIELDS += ["versions", "inline", "to", "all"]
TYPES = ["hello", "share", "confirm", "get", "put", "upload", "end", "list", "stat", "mkdir", "error",
         "ok", "params", "file", "entries", "x" * 300, ""]
TYPES += ["remove", "rmdir", "rename", "chmod", "hash", "space"]  # section 7.10

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


@pytest.mark.parametrize("state", STATES + STATES_V2)
def test_server_survives_anything_in_every_state(world, state, capsys):
    stats = {"examples": 0, "inputs": 0, "internal errors": 0, "states seen": set()}

    def count_internal_errors(event):
        if "log_failure" in event:
            stats["internal errors"] += 1

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(sequence=inputs)
    def fuzz(sequence):
        _run(world, state, sequence, stats)
        assert stats["internal errors"] == 0

    globalLogPublisher.addObserver(count_internal_errors)
    try:
        fuzz()
    finally:
        globalLogPublisher.removeObserver(count_internal_errors)
    with capsys.disabled():
        print(
            f"\n[figures] fuzzer from {state!r}: {stats['examples']} examples, {stats['inputs']} malformed or "
            f"unexpected inputs, then in {sorted(stats['states seen'])}; 0 crashes, 0 internal errors"
        )
    assert stats["examples"] == EXAMPLES and stats["inputs"] >= EXAMPLES


# Every state of docs/protocol.md section 9.
KNOWN_STATES = {
    "hello", "delaying", "share", "share-waiting", "confirm", "ready", "working", "upload-offered",
    "receiving", "storing", "closed", "discarding",
}
STATE_NAMES = {"v2-ready": "ready", "v2-working": "working", "v2-inline": "receiving", "v2-committing": "ready",
               "v2-discarding": "discarding"}


def _run(world, state, sequence, stats):
    with threads_by_hand() as threads:
        conv = Conversation(world, version=2 if state in STATES_V2 else 1)
        conv.reach(state)
        assert conv.proto.state == STATE_NAMES.get(state, state)
        conv.frames_out()
        stats["examples"] += 1
        for item in sequence:
            if conv.transport.disconnecting:
                break
            data = encode_input(conv, item)
            stats["inputs"] += 1
            conv.feed(data)  # raises nothing: the invariant under test
            stats["states seen"].add(conv.proto.state)
            assert conv.proto.state in KNOWN_STATES
        out = conv.frames_out()  # every record the server sent decrypts, in order
        # A client's own ERROR closes the connection without an answer (protocol.md 3.7): it
        # knows why. (SPACE, a request needing no member, made that reachable: an answer, then
        # the client's ERROR, then the close.)
        told_by_client = any(item[0] == "message" and item[1].get("type") == "error" for item in sequence)
        if conv.transport.disconnecting and out and not told_by_client:
            kind, plaintext = out[-1]
            assert kind in (0, 1)
            assert json.loads(plaintext)["type"] == "error"  # told why before the close
        # What was waiting (a delayed answer, a slot, a file being stored) now happens.
        threads.run()
        conv.factory.clock.advance(1)
        conv.proto.connectionLost(None)
        threads.run()
        conv.factory.clock.advance(conv.factory.handshake_timeout + 1)
    _restore(world[0])


def _restore(root):
    """Put back what the next examples rely on, should an example have removed, renamed or
    chmod'ed it (REMOVE, RENAME and CHMOD are among the generated requests)."""
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub").chmod(0o755)
    hello = root / "hello.txt"
    if hello.is_symlink() or hello.is_dir():
        import shutil

        shutil.rmtree(hello) if hello.is_dir() and not hello.is_symlink() else hello.unlink()
    hello.write_bytes(b"hello\n")
    hello.chmod(0o644)


def test_a_clients_error_after_an_answer_closes_without_another(world):
    """The case the fuzzer found: SPACE answered, then the client's ERROR: the server closes
    and sends nothing more (protocol.md 3.7: an ERROR from the client is fatal)."""
    with threads_by_hand():
        conv = Conversation(world, version=2)
        conv.reach("ready")
        conv.frames_out()
        conv.feed(conv.message_frame({"type": "space"}) + conv.message_frame({"type": "error", "code": "internal"}))
        out = conv.frames_out()
        assert [json.loads(plaintext)["type"] for _, plaintext in out] == ["space"]
        assert conv.transport.disconnecting
