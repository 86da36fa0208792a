"""Property-based fuzzing of the server's protocol machine, in every state it can be driven to,
with generated and mutated frames over an in-memory transport.

Invariant: whatever arrives, the server raises nothing, stays in a known state, and either
answers or closes the connection after telling the client why. Longer run:
`make fuzz` (FUZZ_EXAMPLES=20000 by default there).
"""

import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from eketwist import guard, records, spake2plus, userdb
from eketwist.server import CONTEXT, ServerFactory

from .conftest import FAST_SCRYPT

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
HEADER = struct.Struct(">IB")
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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello\n")
    users = userdb.Users.new()
    user = userdb.make_user("fuzzer", "pw", FAST_SCRYPT, rights=userdb.READ_WRITE)
    users.by_name["fuzzer"] = user
    userdb.save(base / "users", users)
    w0, w1 = spake2plus.register(b"pw", user.salt, b"fuzzer", **FAST_SCRYPT)
    return root, base / "users", w0, w1


class Conversation:
    """A well-behaved client, in memory, that brings the server to a state."""

    def __init__(self, world):
        root, users, self.w0, self.w1 = world
        self.factory = ServerFactory(str(root), str(users), "fuzz", policy=guard.Policy(delay_base=0), clock=Clock())
        self.proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.proto.makeConnection(self.transport)
        self.send_cipher = self.receive_cipher = None
        self.last_frame = None

    def frames_out(self):
        data = self.transport.value()
        self.transport.clear()
        frames = []
        while len(data) >= 5:
            length, kind = HEADER.unpack_from(data)
            payload = data[5 : 5 + length]
            if kind != 0 and self.receive_cipher is not None:
                payload = self.receive_cipher.open(data[:5], payload)  # keeps the counter in step
            frames.append((kind, payload))
            data = data[5 + length :]
        return frames

    def feed(self, data):
        self.proto.dataReceived(data)

    def handshake_frame(self, message):
        payload = json.dumps(message).encode()
        return HEADER.pack(len(payload), 0) + payload

    def record(self, kind, plaintext):
        head = HEADER.pack(len(plaintext) + 16, kind)
        return head + self.send_cipher.seal(head, plaintext)

    def message_frame(self, message):
        if self.send_cipher is None:
            return self.handshake_frame(message)
        return self.record(1, json.dumps(message).encode())

    def reach(self, state):
        if state == "hello":
            return
        self.feed(self.handshake_frame({"type": "hello", "version": 1, "user": "fuzzer"}))
        params = json.loads(self.frames_out()[-1][1])
        if state == "share":
            return
        x, share_p = spake2plus.prover_share(self.w0)
        self.feed(self.handshake_frame({"type": "share", "share": share_p.hex()}))
        reply = json.loads(self.frames_out()[-1][1])
        keys = spake2plus.prover_finish(CONTEXT, b"fuzzer", params["server"].encode(), self.w0, self.w1, x,
                                        share_p, bytes.fromhex(reply["share"]))
        if state == "confirm":
            return
        self.feed(self.handshake_frame({"type": "confirm", "confirm": keys.confirm_p.hex()}))
        assert json.loads(self.frames_out()[-1][1]) == {"type": "ok"}
        self.send_cipher, self.receive_cipher = records.traffic_ciphers(keys.shared, is_client=True)
        if state == "ready":
            return
        # A fresh name each time: a partial left by an earlier example would be hashed first.
        name = f"fuzzed-{os.urandom(8).hex()}.bin"
        self.feed(self.message_frame({"type": "put", "path": name, "size": 100, "force": True}))
        self.frames_out()
        if state == "upload-offered":
            return
        self.feed(self.message_frame({"type": "upload", "offset": 0}))
        assert self.proto.state == "receiving"


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
