"""The wire format: one codec for frames and messages (docs/protocol.md is its specification).

A frame is a 5-byte header, length (uint32, big-endian, counting the payload only) and kind
(uint8), followed by the payload. HANDSHAKE payloads are plaintext JSON; CONTROL and DATA
payloads are AES-GCM records whose associated data is the frame header.
"""

import json
import struct

from .errors import ProtocolError

HEADER = struct.Struct(">IB")
HEADER_BYTES = HEADER.size

HANDSHAKE = 0x00
CONTROL = 0x01
DATA = 0x02
KINDS = (HANDSHAKE, CONTROL, DATA)

PROTOCOL_VERSION = 1
# Before authentication nothing needs more than a few hundred bytes.
MAX_HANDSHAKE_PAYLOAD = 4096
# Per-record costs (a reactor turn, a read, a wake-up of the writer thread; dear on a VM)
# dominate below about 1 MiB: measured with the bench, 1 GiB get at 256 KiB / 1 MiB / 2 MiB
# records: 846 / 875 / 925 MB/s, client CPU 1.66 / 1.44 / 1.35 s. 2 MiB still fits the CPU's
# L2 cache, so each record is hashed while it is there. The price is memory: a sending
# connection holds about one record, a receiving one at most one split frame.
MAX_RECORD_PLAINTEXT = 2 * 1024 * 1024
DATA_CHUNK = MAX_RECORD_PLAINTEXT
# After authentication: a full record plus its GCM tag.
MAX_RECORD_PAYLOAD = MAX_RECORD_PLAINTEXT + 16
MAX_CONTROL_PLAINTEXT = 64 * 1024
# Bytes handed to one send() call: two records (Twisted's default is 128 KiB).
SEND_SIZE = 2 * DATA_CHUNK
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


def header(kind, payload_length):
    return HEADER.pack(payload_length, kind)


def handshake_frame(message):
    """A whole HANDSHAKE frame carrying `message` in plaintext."""
    payload = encode_message(message)
    return header(HANDSHAKE, len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into frames, copying only the frames cut by a read boundary.

    Whole frames are handed over as views of the received bytes; only the bytes of a frame
    split across reads are gathered in a buffer. `max_payload` may be changed by the frame
    callback (when the connection authenticates); it is checked as soon as a header is
    complete, before its payload is buffered. The memoryviews passed to the callback are valid
    only during the call.
    """

    def __init__(self, max_payload):
        self.max_payload = max_payload
        self._buffer = bytearray()

    @property
    def buffered(self):
        return len(self._buffer)

    def wanted(self, whole=HEADER_BYTES + MAX_RECORD_PAYLOAD):
        """How much to read next so that reads end on frame boundaries: the rest of a split
        frame, else one whole frame. Whole frames arriving whole are then never copied."""
        buffer = self._buffer
        if not buffer:
            return whole
        if len(buffer) < HEADER_BYTES:
            return HEADER_BYTES - len(buffer)
        length, _ = HEADER.unpack_from(buffer)
        return HEADER_BYTES + length - len(buffer)

    def _check(self, length, kind):
        if kind not in KINDS:
            raise ProtocolError(f"unknown frame kind {kind}")
        if length > self.max_payload:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_payload}")

    def feed(self, data, on_frame):
        with memoryview(data) as view:
            start = self._complete_buffered(view, on_frame) if self._buffer else 0
            if start is None:
                return
            end = len(view)
            while end - start >= HEADER_BYTES:
                length, kind = HEADER.unpack_from(view, start)
                self._check(length, kind)
                frame_end = start + HEADER_BYTES + length
                if frame_end > end:
                    break
                with view[start : start + HEADER_BYTES] as head, view[start + HEADER_BYTES : frame_end] as payload:
                    start = frame_end
                    on_frame(kind, head, payload)
            if start < end:
                self._buffer += view[start:]

    def _complete_buffered(self, view, on_frame):
        """Add to the split frame what it lacks; deliver it if whole. Returns where the rest
        of `view` starts, or None when all of it went into the buffer."""
        buffer = self._buffer
        taken = 0
        if len(buffer) < HEADER_BYTES:
            taken = min(HEADER_BYTES - len(buffer), len(view))
            buffer += view[:taken]
            if len(buffer) < HEADER_BYTES:
                return None
        length, kind = HEADER.unpack_from(buffer)
        self._check(length, kind)
        wanted = min(HEADER_BYTES + length - len(buffer), len(view) - taken)
        buffer += view[taken : taken + wanted]
        taken += wanted
        if len(buffer) < HEADER_BYTES + length:
            return None
        try:
            with memoryview(buffer) as whole, whole[:HEADER_BYTES] as head, whole[HEADER_BYTES:] as payload:
                on_frame(kind, head, payload)
        finally:
            del buffer[:]
        return taken


def encode_message(message):
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity


def decode_message(payload):
    """A JSON object with a string "type"; unknown fields are ignored by the readers."""
    try:
        message = json.loads(bytes(payload).decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("malformed message: not UTF-8 JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("malformed message: not an object with a type")
    return message


def _field(message, name, kind):
    value = message.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"{message['type']}: field {name!r} missing or of the wrong type")
    return value


def text_field(message, name, max_bytes, *, allow_empty=False):
    value = _field(message, name, str)
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can carry lone surrogates, which are not UTF-8
        raise ProtocolError(f"{message['type']}: field {name!r} is not valid UTF-8") from None
    if len(encoded) > max_bytes or (not value and not allow_empty):
        raise ProtocolError(f"{message['type']}: field {name!r} is empty or too long")
    if "\x00" in value:
        raise ProtocolError(f"{message['type']}: field {name!r} contains NUL")
    return value


def int_field(message, name, low, high):
    value = _field(message, name, int)
    if not low <= value <= high:
        raise ProtocolError(f"{message['type']}: field {name!r} out of range")
    return value


def number_field(message, name, low, high):
    value = _field(message, name, (int, float))
    if not low <= value <= high:
        raise ProtocolError(f"{message['type']}: field {name!r} out of range")
    return value


def hex_field(message, name, min_bytes, max_bytes=None):
    value = _field(message, name, str)
    max_bytes = min_bytes if max_bytes is None else max_bytes
    if not 2 * min_bytes <= len(value) <= 2 * max_bytes:
        raise ProtocolError(f"{message['type']}: field {name!r} has the wrong length")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ProtocolError(f"{message['type']}: field {name!r} is not hex") from None
