"""A well-behaved client in memory (StringTransport, a Clock, a thread pool run by hand),
written from docs/protocol.md, that brings a real ServerProtocol to any of its states; tests
then misbehave from there."""

import contextlib
import hashlib
import json
import os
import struct

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from eketwist import client_protocol, guard, records, server, spake2plus, transfers, userdb
from eketwist.server import ServerFactory
from eketwist.wire import context

HEADER = struct.Struct(">IB")
# Every state of the server (docs/protocol.md section 9), in the order a conversation meets
# them; Conversation.reach brings a new connection to any of them.
STATES = ["hello", "delaying", "share", "share-waiting", "confirm", "ready", "working",
          "upload-offered", "receiving", "storing"]
# On a version 2 connection (pipelined, docs/protocol.md section 7.9): "v2-working" with the
# next request waiting its turn, "v2-inline" receiving an inline upload's DATA,
# "v2-committing" ready with an upload's commit (in threads_by_hand's pool) still owed its
# answer, "v2-discarding" dropping a refused inline upload's DATA.
STATES_V2 = ["v2-ready", "v2-working", "v2-inline", "v2-committing", "v2-discarding"]


class ThreadsByHand:
    """Twisted's thread pool, run by hand the way a Clock runs time: work the server hands to
    a thread (hashing a part file's prefix, storing an upload) waits here until `run()`, so
    that a test sees the states in between and nothing finishes behind its back."""

    def __init__(self):
        self.pending = []

    def deferToThread(self, function, *args, **kwargs):
        done = defer.Deferred()
        self.pending.append((done, function, args, kwargs))
        return done

    def run(self):
        while self.pending:
            done, function, args, kwargs = self.pending.pop(0)
            defer.maybeDeferred(function, *args, **kwargs).chainDeferred(done)


@contextlib.contextmanager
def threads_by_hand():
    """The server's and the client's work for threads goes to a ThreadsByHand meanwhile."""
    pool = ThreadsByHand()
    real = server.threads
    server.threads = transfers.threads = client_protocol.threads = pool
    try:
        yield pool
    finally:
        server.threads = transfers.threads = client_protocol.threads = real


def make_world(base, fast_scrypt):
    """(root, users file, w0, w1) for the user "fuzzer" (password "pw", read-write)."""
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello\n")
    users = userdb.Users.new()
    user = userdb.make_user("fuzzer", "pw", fast_scrypt, rights=userdb.READ_WRITE)
    users.by_name["fuzzer"] = user
    userdb.save(base / "users", users)
    w0, w1 = spake2plus.register(b"pw", user.salt, b"fuzzer", **fast_scrypt)
    return root, base / "users", w0, w1


class Conversation:
    """A well-behaved client, in memory, that brings the server to a state."""

    def __init__(self, world, factory=None, host="127.0.0.1", version=1, user="fuzzer"):
        """A new connection from `host`: to `factory` (another connection's, for several at once
        from one address), or to a server of its own; speaking protocol `version`."""
        self.world = world
        self.version = version
        self.user = user
        root, users, self.w0, self.w1 = world  # w0, w1: `user`'s
        self.factory = factory or ServerFactory(
            str(root), str(users), "fuzz", policy=guard.Policy(delay_base=0), clock=Clock()
        )
        self.proto = self.factory.buildProtocol(IPv4Address("TCP", host, 40000))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
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

    def hello(self):
        hello = {"type": "hello", "version": 1, "user": self.user}
        if self.version != 1:
            hello["versions"] = [1, self.version]
        self.feed(self.handshake_frame(hello))

    def wait_for_answer(self):
        """Run the clock, one scheduled call at a time, until the server has said something."""
        clock = self.factory.clock
        while not self.transport.value():
            clock.advance(min(call.getTime() for call in clock.getDelayedCalls()) - clock.seconds())

    def reach(self, state):
        """Bring the server to `state` (one of STATES). "delaying" records a failure for this
        address first; "share-waiting" opens a second connection from the same address that
        holds its only guess slot; "working" leaves a download's first record unsent;
        "storing" needs threads_by_hand() (the upload waits in its pool)."""
        if state in STATES_V2:
            return self._reach_v2(state)
        assert state in STATES, state
        policy = self.factory.guard.policy
        if state == "hello":
            return
        if state == "delaying":
            policy.delay_base = 0.5
            self.factory.guard.failed("127.0.0.1", "someone")
            self.hello()
            assert self.proto.state == "delaying"
            return
        if state == "share-waiting":
            policy.max_source_failures = 1
            self.holder = Conversation(self.world, self.factory)
            self.holder.reach("confirm")
        self.hello()
        self.wait_for_answer()  # past the delay that recent failures impose, if any
        params = json.loads(self.frames_out()[-1][1])
        if state == "share":
            return
        x, share_p = spake2plus.prover_share(self.w0)
        self.feed(self.handshake_frame({"type": "share", "share": share_p.hex()}))
        if state == "share-waiting":
            assert self.proto.state == "share-waiting" and not self.frames_out()
            return
        reply = json.loads(self.frames_out()[-1][1])
        keys = spake2plus.prover_finish(context(self.version), self.user.encode(), params["server"].encode(), self.w0, self.w1, x,
                                        share_p, bytes.fromhex(reply["share"]))
        if state == "confirm":
            return
        self.feed(self.handshake_frame({"type": "confirm", "confirm": keys.confirm_p.hex()}))
        assert json.loads(self.frames_out()[-1][1]) == {"type": "ok"}
        self.send_cipher, self.receive_cipher = records.traffic_ciphers(keys.shared, is_client=True)
        if state == "ready":
            return
        if state == "working":
            # FILE goes out; the records wait for the transport to pull them (nobody does).
            self.feed(self.message_frame({"type": "get", "path": "hello.txt"}))
            assert self.proto.state == "working"
            return
        # A fresh name each time: a partial left by an earlier example would be hashed first.
        name = f"fuzzed-{os.urandom(8).hex()}.bin"
        content = os.urandom(100)
        self.feed(self.message_frame({"type": "put", "path": name, "size": len(content), "force": True}))
        self.frames_out()
        if state == "upload-offered":
            return
        self.feed(self.message_frame({"type": "upload", "offset": 0}))
        assert self.proto.state == "receiving"
        if state == "receiving":
            return
        self.feed(self.record(2, content))
        self.feed(self.message_frame({"type": "end", "size": len(content), "sha1": hashlib.sha1(content).hexdigest()}))
        assert self.proto.state == "storing", "storing needs threads_by_hand()"

    def _reach_v2(self, state):
        assert self.version == 2, "a version 2 state needs Conversation(version=2)"
        self.reach("ready")
        if state == "v2-ready":
            return
        if state == "v2-working":
            self.feed(self.message_frame({"type": "get", "path": "hello.txt"})
                      + self.message_frame({"type": "stat", "path": "hello.txt"}))
            assert self.proto.state == "working" and self.proto._next_request is not None
            return
        name = f"fuzzed-{os.urandom(8).hex()}.bin"
        content = os.urandom(100)
        put = {"type": "put", "path": name, "size": len(content), "force": True, "inline": True}
        if state == "v2-discarding":
            put.update(path="hello.txt", force=False)  # exists: refused, its DATA still comes
            self.feed(self.message_frame(put))
            assert self.proto.state == "discarding"
            return
        self.feed(self.message_frame(put))
        assert self.proto.state == "receiving"
        if state == "v2-inline":
            return
        self.feed(self.record(2, content))
        self.feed(self.message_frame({"type": "end", "size": len(content), "sha1": hashlib.sha1(content).hexdigest()}))
        assert self.proto.state == "ready" and self.proto.storing, "v2-committing needs threads_by_hand()"
