"""A server that turns hostile, written from docs/protocol.md (sockets, JSON, our crypto core):
it runs the handshake honestly as the Verifier (what a thief of the users file can do), then
answers the real client however a test likes. Blocking, one connection, in a thread."""

import hashlib
import json
import socket
import threading

from eketwist import records, spake2plus, userdb

from .rawclient import CONTEXT, CONTROL, DATA, HANDSHAKE, HEADER, Closed

FAST_SCRYPT = {"n": 1024, "r": 8, "p": 1}


class Connection:
    """The server's end of one connection: handshake frames, then records."""

    def __init__(self, sock):
        self.sock = sock
        self.send_cipher = self.receive_cipher = None

    def _read(self, n):
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise Closed(bytes(data))
            data += chunk
        return bytes(data)

    def _frame(self):
        head = self._read(HEADER.size)
        length, kind = HEADER.unpack(head)
        return kind, head, self._read(length)

    def send_handshake(self, message):
        payload = json.dumps(message, ensure_ascii=False).encode()
        self.sock.sendall(HEADER.pack(len(payload), HANDSHAKE) + payload)

    def recv_handshake(self):
        kind, _, payload = self._frame()
        assert kind == HANDSHAKE, kind
        return json.loads(payload)

    def _send_record(self, kind, plaintext):
        head = HEADER.pack(len(plaintext) + 16, kind)
        self.sock.sendall(head + self.send_cipher.seal(head, plaintext))

    def send(self, message):
        self._send_record(CONTROL, json.dumps(message, ensure_ascii=False).encode())

    def send_data(self, data):
        self._send_record(DATA, data)

    def recv(self):
        """The client's next CONTROL message (a dict) or DATA record (bytes); None when it
        has closed the connection."""
        try:
            kind, head, payload = self._frame()
        except (Closed, ConnectionResetError):
            return None
        plaintext = self.receive_cipher.open(head, payload)
        return json.loads(plaintext) if kind == CONTROL else plaintext

    def messages(self):
        while (message := self.recv()) is not None:
            yield message


class HostileServer:
    """Listens on 127.0.0.1 for one connection. `preauth_error`: answer HELLO with this ERROR
    instead of PARAMS. Otherwise the handshake runs with alice's verifier, and then
    `serve(connection)` answers the client's requests."""

    def __init__(self, user, serve=None, preauth_error=None, server_id="hostile"):
        self.user = user
        self.serve = serve
        self.preauth_error = preauth_error
        self.server_id = server_id
        self.failure = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            sock, _ = self.listener.accept()
            sock.settimeout(60)
            with sock:
                self._conversation(Connection(sock))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up on us: what a client should do to a hostile server
        except Exception as problem:  # reported by stop()
            self.failure = problem

    def _conversation(self, conn):
        hello = conn.recv_handshake()
        if self.preauth_error is not None:
            conn.send_handshake({"type": "error", **self.preauth_error})
            return
        user = self.user
        conn.send_handshake({"type": "params", "server": self.server_id, "salt": user.salt.hex(), "scrypt": user.scrypt})
        share_p = bytes.fromhex(conn.recv_handshake()["share"])
        share_v, keys = spake2plus.verifier_respond(
            CONTEXT, hello["user"].encode(), self.server_id.encode(), user.w0, user.L, share_p
        )
        conn.send_handshake({"type": "share", "share": share_v.hex(), "confirm": keys.confirm_v.hex()})
        confirm = bytes.fromhex(conn.recv_handshake()["confirm"])
        assert spake2plus.confirmation_matches(keys.confirm_p, confirm)
        conn.send_handshake({"type": "ok"})
        conn.send_cipher, conn.receive_cipher = records.traffic_ciphers(keys.shared, is_client=False)
        if self.serve is not None:
            self.serve(conn)
        for _ in conn.messages():  # until the client closes
            pass

    def stop(self):
        self.listener.close()
        self._thread.join(30)
        if self.failure is not None:
            raise self.failure


def make_alice(password):
    return userdb.make_user("alice", password, FAST_SCRYPT)


def entry(name, kind="file", size=0, mtime=1_700_000_000.0, mode=0o644):
    return {"name": name, "kind": kind, "size": size, "mtime": mtime, "mode": mode}


class Tree:
    """A `serve` that answers list, stat, get, mkdir and put from a fixed listing. Files have
    the contents in `contents` (empty by default); every request is kept in `requests`."""

    def __init__(self, listing=(), contents=None):
        self.listing = listing
        self.contents = contents or {}
        self.requests = []

    def __call__(self, conn):
        for message in conn.messages():
            self.requests.append(message)
            getattr(self, "on_" + message["type"])(conn, message)

    def on_list(self, conn, message):
        # Batches under the CONTROL limit (64 KiB); `listing` may be a generator.
        batch, size = [], 0
        for item in self.listing:
            item_size = len(json.dumps(item).encode()) + 1
            if batch and size + item_size > 60_000:
                conn.send({"type": "entries", "entries": batch, "more": True})
                batch, size = [], 0
            batch.append(item)
            size += item_size
        conn.send({"type": "entries", "entries": batch, "more": False})

    def on_stat(self, conn, message):
        conn.send({"type": "error", "code": "not-found", "message": f"{message['path']}: no such file"})

    def on_get(self, conn, message):
        data = self.contents.get(message["path"], b"")
        conn.send({"type": "file", "name": "x", "size": len(data), "mtime": 1_700_000_000.0, "mode": 0o644, "digest": "sha1", "offset": 0})
        if data:
            conn.send_data(data)
        conn.send({"type": "end", "size": len(data), "sha1": hashlib.sha1(data).hexdigest()})

    def on_mkdir(self, conn, message):
        conn.send({"type": "done"})

    def on_put(self, conn, message):
        conn.send({"type": "ready", "offset": 0})
        assert conn.recv()["type"] == "upload"
        data = bytearray()
        while isinstance(part := conn.recv(), bytes):
            data += part
        conn.send({"type": "stored", "size": len(data), "sha1": hashlib.sha1(data).hexdigest()})
