"""The client's first round trip, started before the heavy imports.

A login spends most of its time loading Twisted and the curve code, and running scrypt. The
two need not wait for each other: the client connects, sends HELLO and, in a thread, reads
PARAMS and runs scrypt while the main thread is still importing; the connected socket is then
handed to Twisted, and the protocol machine continues from "deriving". Light imports only.
"""

import socket
import threading

from . import errors, pbkdf, wire


def hello(username):
    return {"type": "hello", "version": wire.PROTOCOL_VERSION, "user": username}


def parse_params(message):
    """(server name, salt, scrypt cost) from a PARAMS message, refusing unreasonable costs."""
    server_id = wire.text_field(message, "server", wire.MAX_NAME_BYTES)
    salt = wire.hex_field(message, "salt", 8, 64)
    scrypt = message.get("scrypt")
    problem = pbkdf.check_scrypt(scrypt)
    if problem:
        raise errors.ProtocolError(f"the server asked for unreasonable password hashing: {problem}")
    return server_id, salt, {key: scrypt[key] for key in ("n", "r", "p")}


class Prelude:
    """HELLO sent on a fresh connection; PARAMS read and scrypt run in a thread."""

    def __init__(self, host, port, username, password, timeout):
        try:
            self.sock = socket.create_connection((host, port), timeout)
        except OSError as problem:
            raise errors.ConnectionFailed(f"cannot connect to the server: {problem.strerror or problem}") from None
        # Small frames leave at once (see connection.send_small_frames_at_once).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._timeout = timeout
        self._username = username
        self._password = password
        self._outcome = None
        self.sock.sendall(wire.handshake_frame(hello(username)))
        self._thread = threading.Thread(target=self._run, name="eketwist-prelude", daemon=True)
        self._thread.start()

    def _read(self, count):
        data = bytearray()
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise errors.ConnectionFailed("the server closed the connection")
            data += chunk
        return bytes(data)

    def _run(self):
        password, self._password = self._password, None  # this frame's, until scrypt is done
        try:
            length, kind = wire.HEADER.unpack(self._read(wire.HEADER_BYTES))
            if kind != wire.HANDSHAKE or length > wire.MAX_HANDSHAKE_PAYLOAD:
                raise errors.ProtocolError("the server's first answer is not a handshake message")
            message = wire.decode_message(self._read(length))
            if message["type"] == "error":
                raise errors.from_wire(str(message.get("code")), message.get("message"))
            if message["type"] != "params":
                raise errors.ProtocolError(f"unexpected {message['type'][:40]!r} message in state 'params'")
            server_id, salt, scrypt = parse_params(message)
            w0, w1 = pbkdf.register(password.encode("utf-8"), salt, self._username.encode("utf-8"), **scrypt)
            self._outcome = (server_id, w0, w1)
        except errors.EketwistError as error:
            self._outcome = error
        except socket.timeout:
            self._outcome = errors.Timeout(f"the server made no progress for {self._timeout:g} s")
        except OSError as problem:
            self._outcome = errors.ConnectionFailed(f"the connection to the server was lost: {problem.strerror or problem}")
        except (ValueError, MemoryError) as problem:  # scrypt could not run at this cost here
            self._outcome = errors.EketwistError(f"password hashing failed: {problem}")

    def wait(self):
        """(server name, w0, w1); raises the failure as an EketwistError. Blocking."""
        self._thread.join()
        if isinstance(self._outcome, Exception):
            raise self._outcome
        return self._outcome

