"""What the server's and the client's Protocols share: frames in, decoded messages handed to the
subclass (which gives them to its machines), records sealed and opened once the handshake has
keys, back-pressure on the peer, and closing after a fatal ERROR. Anything after the connection
has started closing is dropped.
"""

import socket
import sys

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.protocols.basic import FileSender
from zope.interface import implementer

from . import records, wire
from .errors import ConnectionFailed, EketwistError, IntegrityError, ProtocolError, error_message
from .logs import SafeLogger


@implementer(IConsumer)
class RecordConsumer:
    """Lets FileSender write into the record layer: every chunk becomes one DATA record."""

    def __init__(self, connection):
        self._connection = connection

    def registerProducer(self, producer, streaming):
        self._connection.start_sending(producer, streaming)

    def unregisterProducer(self):
        self._connection.stop_sending()

    def write(self, chunk):
        self._connection.send_data(chunk)


def send_file(connection, handle, offset, sha1, on_chunk=None, record_size=None):
    """Stream `handle` from `offset` as DATA records with FileSender (one record per chunk),
    feeding `sha1` (None: the digest is known already). Each chunk is hashed right after it is
    read, while it is in the CPU cache: measured faster here than hashing in another thread.
    `record_size`, if given, is asked before each read for the size of the next record.
    Fires with the bytes sent, or fails if the connection went away."""
    sent = 0

    def hash_and_count(chunk):
        nonlocal sent
        if sha1 is not None:
            sha1.update(chunk)
        sent += len(chunk)
        if on_chunk is not None:
            on_chunk(len(chunk))
        if record_size is not None:
            sender.CHUNK_SIZE = record_size()
        return chunk

    def translate(failure):
        # FileSender reports a stopped consumer with a bare Exception.
        raise ConnectionFailed(f"the connection was lost after {sent} bytes")

    handle.seek(offset)
    sender = FileSender()
    sender.CHUNK_SIZE = wire.DATA_CHUNK if record_size is None else record_size()
    done = sender.beginFileTransfer(handle, RecordConsumer(connection), hash_and_count)
    return done.addCallbacks(lambda _: sent, translate)


# Linux's TCP honours SO_RCVLOWAT in poll/epoll and caps it at what the socket can buffer;
# elsewhere the semantics vary, and reads simply take what is there.
RECEIVE_LOW_WATER = sys.platform.startswith("linux") and hasattr(socket, "SO_RCVLOWAT")
# Outside data phases, reads and Twisted's pause threshold for our writes: a whole CONTROL frame.
CONTROL_READ_SIZE = wire.HEADER_BYTES + wire.MAX_CONTROL_PLAINTEXT + records.TAG_BYTES
# Seconds a receiver waits for a whole record before taking whatever has arrived. At the
# speeds where whole records help, one arrives every few milliseconds.
WHOLE_RECORD_PATIENCE = 0.2
# Seconds a closing connection waits for the peer to read what is still queued for it (the
# ERROR that says why) before it is cut: a peer that never reads must not keep it.
CLOSE_GRACE = 10.0


def _tcp_socket(transport):
    """The TCP socket under a plain TCP transport; None for TLS, UNIX sockets and the rest
    (with TLS, bytes read are not the bytes we decode)."""
    if not ITCPTransport.providedBy(transport) or ISSLTransport.providedBy(transport):
        return None
    get_handle = getattr(transport, "getHandle", None)  # in-memory transports have none
    handle = get_handle() if get_handle is not None else None
    if isinstance(handle, socket.socket) and handle.family in (socket.AF_INET, socket.AF_INET6):
        return handle
    return None


def send_small_frames_at_once(transport):
    """Turn Nagle's algorithm off: a side that writes two small frames without waiting for an
    answer would otherwise have the second held until the peer's delayed ACK, about 40 ms
    (measured: get -r of 1,000 files of 4 KiB, 51.8 s with it, 1.1 s without). Every frame is
    written whole, so nothing is sent in more packets than it needs. TLS and PROXY wrappers
    pass the call down to the TCP transport; a UNIX socket has no such option."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


class StopReading(Exception):
    """Internal: the connection is closing, drop whatever else is buffered."""


class SecureConnection(Protocol):
    """Subclasses provide handshake_received, control_received and data_received, `callLater`
    (their clock) and TimeoutMixin's `setTimeout`."""

    log = SafeLogger()
    PEER = "peer"  # what messages call the other side

    def connectionMade(self):
        self.decoder = wire.FrameDecoder(wire.MAX_HANDSHAKE_PAYLOAD)
        self._send_cipher = None
        self._receive_cipher = None
        self.closing = False
        self.when_closed = Deferred()
        self._holds = set()  # reasons we are not reading the peer now (see hold_reading)
        self._patience = None  # the timer that stops waiting for whole records
        self._sending = None  # the producer streaming a file or a listing to the peer
        self._cut = None  # the timer that cuts a closing connection whose peer does not read
        send_small_frames_at_once(self.transport)

    def connectionLost(self, reason):
        self.closing = True
        for timer in (self._patience, self._cut):
            if timer is not None and timer.active():
                timer.cancel()
        self.when_closed.callback(None)

    @property
    def authenticated(self):
        return self._send_cipher is not None

    def start_records(self, k_shared, *, is_client):
        self._send_cipher, self._receive_cipher = records.traffic_ciphers(k_shared, is_client=is_client)
        self.decoder.max_payload = wire.MAX_RECORD_PAYLOAD
        # Sends take whole records (Twisted's default is 128 KiB per system call).
        self.transport.SEND_LIMIT = wire.SEND_SIZE
        self._low_water = 1
        self._socket = _tcp_socket(self.transport) if RECEIVE_LOW_WATER else None
        self._set_read_size(0)

    def _set_read_size(self, expected):
        """Reads end on frame boundaries: while a file streams in, a whole record (or the rest
        of one), so that records arriving whole are never copied; otherwise at most a whole
        CONTROL frame. Twisted also takes this size as the most it buffers of what we write
        before it pauses us as a producer: a client that sends requests and never reads the
        answers makes us stop reading it after that much, not after a record's worth."""
        if self.decoder.buffered or expected > 0:
            self.transport.bufferSize = self.decoder.wanted()
        else:
            self.transport.bufferSize = CONTROL_READ_SIZE

    def incoming_file(self):
        """The transfer whose file is streaming in now (it has `size` and `part`), or None."""
        return None

    def file_bytes_expected(self):
        """How many more file bytes the peer announced and has not sent yet (0: none), as the
        subclass's request machine counts them. While more than 0, reads wait for whole
        records (see _wait_for_whole_records)."""
        return 0

    def _wait_for_whole_records(self, expected):
        """While a file streams in, have the kernel wake us only when a whole record (or the
        rest of one) has arrived: one read per record, and no record cut by a read boundary
        and copied together. Never more than the file bytes still announced (a close, as after
        an ERROR in a data phase, wakes us anyway), and never for long: after WHOLE_RECORD_PATIENCE
        without a whole record, any byte wakes us again. A slow link then still shows progress
        (timeouts count reads), and a sender that ends early (a file that shrank while it was
        sent) is heard at once."""
        low_water = min(self.decoder.wanted(), expected) if expected > 0 else 1
        self._set_low_water(low_water)
        patience = self._patience
        if low_water > 1:
            if patience is not None and patience.active():
                patience.reset(WHOLE_RECORD_PATIENCE)
            else:
                self._patience = self.callLater(WHOLE_RECORD_PATIENCE, self._set_low_water, 1)
        elif patience is not None and patience.active():
            patience.cancel()

    def _set_low_water(self, low_water):
        if low_water != self._low_water and self._socket is not None:
            try:
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low_water)
                self._low_water = low_water
            except OSError:
                self._socket = None  # closed, or a socket that refuses it: reads as before

    # -- holding back the peer

    def hold_reading(self, reason):
        """Stop reading the peer (TCP then holds it back) until every reason is released."""
        if not self._holds and not self.closing:
            self.transport.pauseProducing()
        self._holds.add(reason)

    def release_reading(self, reason):
        if reason in self._holds:
            self._holds.discard(reason)
            if not self._holds and not self.closing:
                self.transport.resumeProducing()

    def receive_into(self, part, chunk):
        """Hand a received chunk to the part file it belongs to (the request machine has
        already refused more than was announced). If the disk is behind, stop reading the peer
        until it catches up, rather than block the reactor (and every other connection with
        it). The wait is ours, not the peer's: no timeout runs meanwhile."""
        if part.write(chunk) and "disk" not in self._holds:
            from twisted.internet import reactor

            self.hold_reading("disk")
            timeout = self.setTimeout(None)
            part.when_caught_up(lambda: reactor.callFromThread(self._disk_caught_up, part, timeout))

    def _disk_caught_up(self, part, timeout):
        self.release_reading("disk")
        transfer = self.incoming_file()
        if not self.closing and transfer is not None and transfer.part is part:
            self.setTimeout(timeout)  # still receiving that file: its timeout runs again

    # -- sending

    def start_sending(self, producer, streaming):
        """Let `producer` (a file or a listing) drive the transport until stop_sending."""
        self._sending = producer
        self.transport.registerProducer(producer, streaming)

    def stop_sending(self):
        if self._sending is not None:
            self._sending = None
            self.transport.unregisterProducer()

    def send_handshake(self, message):
        self.transport.write(wire.handshake_frame(message))

    def send_control(self, message):
        self._send_record(wire.CONTROL, wire.encode_message(message))

    def send_data(self, chunk):
        self._send_record(wire.DATA, chunk)

    def _send_record(self, kind, plaintext):
        head = wire.header(kind, len(plaintext) + records.TAG_BYTES)
        self.transport.writeSequence((head, self._send_cipher.seal(head, plaintext)))

    def send_error(self, error):
        message = error_message(error)
        if self.authenticated:
            self.send_control(message)
        else:
            self.send_handshake(message)

    # -- receiving

    def dataReceived(self, data):
        if self.closing:
            return
        self.guarded(self._feed, data)

    def _feed(self, data):
        self.decoder.feed(data, self._frame_received)
        if self.authenticated:
            expected = self.file_bytes_expected()  # file bytes still owed by the peer
            self._set_read_size(expected)
            if self._socket is not None:
                self._wait_for_whole_records(expected)

    def resume_frames(self):
        """Go on with the frames after one whose handler returned True (see _frame_received),
        then read the peer again."""
        self.guarded(self._feed, self.decoder.take_held())
        if not self.decoder.stopped:
            self.release_reading("frames held")

    def guarded(self, work, *args):
        """Run `work` on what the peer sent: an EketwistError ends the connection with its
        ERROR, and a bug of ours with an "internal error" (logged here, never sent)."""
        try:
            work(*args)
        except StopReading:
            pass
        except EketwistError as error:
            self.fail(error)
        except Exception:
            # A bug of ours: log it here, tell the peer only that something failed.
            self.log.failure("internal error while handling a message")
            self.fail(EketwistError("internal error"))

    def _frame_received(self, kind, head, payload):
        if self.closing:
            raise StopReading()
        if kind == wire.HANDSHAKE:
            if self.authenticated:
                raise ProtocolError("plaintext message after the handshake")
            self.handshake_received(wire.decode_message(payload))
            return
        if not self.authenticated:
            raise ProtocolError("record before the handshake completed")
        try:
            plaintext = self._receive_cipher.open(head, payload)
        except records.RecordAuthenticationError:
            raise IntegrityError("a record failed authentication: the connection was tampered with") from None
        if kind == wire.DATA:
            self.data_received(plaintext)
            return False
        if len(plaintext) > wire.MAX_CONTROL_PLAINTEXT:
            raise ProtocolError("control message too large")
        if self.control_received(wire.decode_message(plaintext)):
            # The handler keeps this message for later (a pipelined request): the frames
            # after it wait in the decoder, and the peer waits in TCP, until resume_frames().
            self.hold_reading("frames held")
            return True
        return False

    # What a subclass's machine is given: decoded messages, and file bytes as a view valid only
    # during the call. Raising an EketwistError ends the connection with that ERROR.

    def handshake_received(self, message):
        raise NotImplementedError

    def control_received(self, message):
        raise NotImplementedError

    def data_received(self, chunk):
        raise NotImplementedError

    # -- closing

    def fail(self, error):
        """Tell the peer what went wrong (never a traceback), then close."""
        if self.closing:
            return
        try:
            self.send_error(error)
        except Exception:
            pass  # the error message is a courtesy; the close is what matters
        self.close(error)

    def close(self, reason=None):
        if not self.closing:
            self.closing = True
            # Nothing more after the ERROR: a file or listing being sent stops here (a
            # registered producer would otherwise go on filling the transport, and keep it
            # open as long as the peer reads).
            producer, self._sending = self._sending, None
            self.transport.unregisterProducer()
            if producer is not None:
                producer.stopProducing()
            self.transport.loseConnection()
            self._cut = self.callLater(CLOSE_GRACE, self.transport.abortConnection)
