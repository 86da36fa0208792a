"""A well-behaved client in memory (StringTransport, a Clock), written from docs/protocol.md,
that brings a real ServerProtocol to any state; tests then misbehave from there."""

import json
import os
import struct

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from eketwist import guard, records, spake2plus, userdb
from eketwist.server import ServerFactory
from eketwist.wire import CONTEXT

HEADER = struct.Struct(">IB")


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

    def __init__(self, world, factory=None):
        """A new connection: to `factory` (another connection's, for several at once from one
        address), or to a server of its own."""
        root, users, self.w0, self.w1 = world
        self.factory = factory or ServerFactory(
            str(root), str(users), "fuzz", policy=guard.Policy(delay_base=0), clock=Clock()
        )
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
