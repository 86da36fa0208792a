"""A blocking client written from docs/protocol.md alone (sockets, JSON, our crypto core), used
to drive the server where the real client would refuse to misbehave. Run it in a thread."""

import functools
import json
import socket
import struct

from eketwist import records, spake2plus

HEADER = struct.Struct(">IB")
HANDSHAKE, CONTROL, DATA = 0, 1, 2
CONTEXT = b"eketwist/1 SPAKE2+-P256-SHA256-HKDF-SHA256-HMAC-SHA256"


class Closed(Exception):
    pass


class RawClient:
    def __init__(self, port, timeout=10, source="127.0.0.1", receive_buffer=None):
        """`receive_buffer`: a small one makes a reader that stalls stall at once (set before
        connecting, it is the window the server sees; after, the kernel has grown it)."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(timeout)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.send_cipher = self.receive_cipher = None
        self.sizes = []  # payload sizes of every frame received

    def close(self):
        self.sock.close()

    def send_frame(self, kind, payload):
        self.sock.sendall(HEADER.pack(len(payload), kind) + payload)

    def _read(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise Closed(data)
            data += chunk
        return data

    def recv_frame(self):
        head = self._read(HEADER.size)
        length, kind = HEADER.unpack(head)
        payload = self._read(length)
        self.sizes.append(length)
        return kind, head, payload

    def send(self, message):
        self.send_frame(HANDSHAKE, json.dumps(message).encode())

    def recv(self):
        kind, head, payload = self.recv_frame()
        assert kind == HANDSHAKE, kind
        return json.loads(payload)

    def handshake(self, user, password, *, check_confirm=True):
        """Run the handshake; return the server's final handshake message (ok or error)."""
        self.send({"type": "hello", "version": 1, "user": user})
        params = self.recv()
        assert params["type"] == "params", params
        scrypt = params["scrypt"]
        w0, w1 = _register(password.encode(), bytes.fromhex(params["salt"]), user.encode(),
                           scrypt["n"], scrypt["r"], scrypt["p"])
        x, share_p = spake2plus.prover_share(w0)
        self.send({"type": "share", "share": share_p.hex()})
        reply = self.recv()
        keys = spake2plus.prover_finish(
            CONTEXT, user.encode(), params["server"].encode(), w0, w1, x, share_p, bytes.fromhex(reply["share"])
        )
        if check_confirm:
            assert keys.confirm_v == bytes.fromhex(reply["confirm"])
        self.send({"type": "confirm", "confirm": keys.confirm_p.hex()})
        final = self.recv()
        if final["type"] == "ok":
            self.send_cipher, self.receive_cipher = records.traffic_ciphers(keys.shared, is_client=True)
        return final

    def send_record(self, kind, plaintext):
        head = HEADER.pack(len(plaintext) + 16, kind)
        self.sock.sendall(head + self.send_cipher.seal(head, plaintext))

    def send_control(self, message):
        self.send_record(CONTROL, json.dumps(message).encode())

    def recv_record(self):
        kind, head, payload = self.recv_frame()
        plaintext = self.receive_cipher.open(head, payload)
        return kind, (json.loads(plaintext) if kind == CONTROL else plaintext)

    def get(self, path):
        """(header, data, end) for a successful get, or (error, None, None)."""
        self.send_control({"type": "get", "path": path})
        kind, header = self.recv_record()
        if header["type"] != "file":
            return header, None, None
        chunks = []
        while True:
            kind, body = self.recv_record()
            if kind == CONTROL:
                return header, b"".join(chunks), body
            chunks.append(body)

    def closed_by_peer(self):
        """True when the server has closed the connection (after anything still buffered)."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True


@functools.lru_cache(maxsize=256)
def _register(password, salt, user, n, r, p):
    """w0 and w1, computed once per password, salt and cost: a client may keep them, and the
    leak test's 2,500 handshakes would otherwise spend 8 s of the suite in the client's scrypt."""
    return spake2plus.register(password, salt, user, n=n, r=r, p=p)

