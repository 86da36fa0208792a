"""The client's first round trip, started before the heavy imports.

A login spends most of its time loading Twisted and the curve code, and running scrypt. The
two need not wait for each other: the client connects, sends HELLO and, in a thread, reads
PARAMS and runs scrypt while the main thread is still importing. It is the same prover machine
and the same frame decoder as every connection's: the connected socket, the machine (waiting
for scrypt's result) and the decoder are then handed to the Protocol, which goes on from there.
Light imports only.
"""

import socket
import threading

from . import errors, pbkdf, wire
from .prover import Prover


class FirstRound:
    """What the Protocol takes over: the machine in Deriving, scrypt's result, the decoder."""

    __slots__ = ("prover", "decoder", "w0", "w1", "retry_delay")

    def __init__(self, prover, decoder, w0, w1, retry_delay):
        self.prover, self.decoder, self.w0, self.w1 = prover, decoder, w0, w1
        self.retry_delay = retry_delay

    def __repr__(self):
        return "<FirstRound>"  # not w0 or w1


def host_port(host, port):
    """host:port as messages show it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Prelude:
    """HELLO sent on a fresh connection; PARAMS read and scrypt run in a thread."""

    def __init__(self, host, port, username, password, timeout):
        try:
            self.sock = socket.create_connection((host, port), timeout)
        except OSError as problem:
            raise errors.ConnectionFailed(f"cannot connect to {host_port(host, port)}: {problem.strerror or problem}") from None
        # Small frames leave at once (see connection.send_small_frames_at_once).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._timeout = timeout
        self._password = password
        self._outcome = None
        self._answered = threading.Event()  # PARAMS, an ERROR or a failure: not waiting
        self.prover = Prover(username)
        self.decoder = wire.FrameDecoder(wire.MAX_HANDSHAKE_PAYLOAD)
        self.sock.sendall(wire.handshake_frame(self.prover.hello()))
        self._thread = threading.Thread(target=self._run, name="eketwist-prelude", daemon=True)
        self._thread.start()

    def _next_message(self):
        """The server's first message, through the decoder the Protocol will keep using."""
        frames: list = []
        while not frames:
            chunk = self.sock.recv(wire.MAX_HANDSHAKE_PAYLOAD)
            if not chunk:
                raise errors.ConnectionFailed("the server closed the connection before answering (if that port serves TLS, add --tls)")
            self.decoder.feed(chunk, lambda kind, head, payload: frames.append((kind, bytes(payload))))
        if len(frames) > 1:
            raise errors.ProtocolError("the server sent more than one message before our share")
        kind, payload = frames[0]
        if kind != wire.HANDSHAKE:
            raise errors.ProtocolError("record before the handshake completed")
        return wire.decode_message(payload)

    def _run(self):
        password, self._password = self._password, None  # this frame's, until scrypt is done
        try:
            try:
                message = self._next_message()
            finally:
                self._answered.set()
            if message["type"] == "error":
                raise errors.from_wire(message)
            params = self.prover.receive(message)
            w0, w1 = pbkdf.register(
                password.encode("utf-8"), params.salt, self.prover.username.encode("utf-8"), **params.scrypt
            )
            self._outcome = FirstRound(self.prover, self.decoder, w0, w1, params.retry_delay)
        except errors.EketwistError as error:
            self._outcome = error
        except socket.timeout:
            self._outcome = errors.Timeout(f"the server made no progress for {self._timeout:g} s")
        except OSError as problem:
            self._outcome = errors.ConnectionFailed(f"the connection to the server was lost: {problem.strerror or problem}")
        except (ValueError, MemoryError) as problem:  # scrypt could not run at this cost here
            self._outcome = errors.EketwistError(f"password hashing failed: {problem}")

    # Past this, an answer is late enough to say why it may be (see wait).
    SLOW_ANSWER = 2.0

    def wait(self, slow=None):
        """The FirstRound; raises the failure as an EketwistError. Blocking; calls `slow()`
        if that takes longer than SLOW_ANSWER seconds."""
        if slow is not None and not self._answered.wait(self.SLOW_ANSWER):
            slow()
        self._thread.join()
        if isinstance(self._outcome, Exception):
            raise self._outcome
        return self._outcome
