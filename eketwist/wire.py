"""The wire format: one codec for frames and messages (docs/protocol.md is its specification).

A frame is a 5-byte header, length (uint32, big-endian, counting the payload only) and kind
(uint8), followed by the payload. HANDSHAKE payloads are plaintext JSON; CONTROL and DATA
payloads are AES-GCM records whose associated data is the frame header.
"""

import json
import re
import struct
import unicodedata

from .errors import ProtocolError

HEADER = struct.Struct(">IB")
HEADER_BYTES = HEADER.size

HANDSHAKE = 0x00
CONTROL = 0x01
DATA = 0x02
KINDS = (HANDSHAKE, CONTROL, DATA)

# The versions we speak (docs/protocol.md section 3.1): 2 adds pipelined requests (section 7.9).
PROTOCOL_VERSION = 1  # what HELLO's `version` says, so that a version 1 server answers
VERSIONS = (1, 2)
# The SPAKE2+ Context of the transcript (section 4.3): it names the version, so that the
# version PARAMS chose is bound into the keys and cannot be changed on the way.
CONTEXT = b"eketwist/1 SPAKE2+-P256-SHA256-HKDF-SHA256-HMAC-SHA256"


def context(version):
    return CONTEXT.replace(b"eketwist/1", b"eketwist/%d" % version)


# A PUT whose file follows at once (version 2, `inline`) is at most this large: a refused one
# is read and dropped, which must stay cheap; larger files wait for READY (and can resume).
MAX_INLINE_SIZE = 16 * 1024 * 1024
# Ranges of the fields' formats: outside them a message is malformed (a protocol error).
MAX_FILE_SIZE = 2**63 - 1
MTIME_LIMIT = 2**40  # |mtime| < 2^40 seconds: some 34,800 years either side of 1970
MAX_MODE = 0o7777
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
# Only permission bits travel: never setuid, setgid or sticky (section 7).
PERMISSION_BITS = 0o777
MAX_USERNAME_BYTES = 64
# A name is one path segment (most filesystems refuse longer ones: NAME_MAX); a path's limit
# is Linux's PATH_MAX. Longer ones are refused with bad-path, not as malformed messages.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096

# A user's rights (section 7.7): each needed by some requests. The users file may name a set by
# a bundle: "read" is what read-only accounts always had, "read-write" everything.
RIGHTS = ("list", "read", "write", "overwrite", "delete", "rename", "mkdir", "chmod")
RIGHT_BUNDLES = {"read": frozenset({"list", "read"}), "read-write": frozenset(RIGHTS)}


def check_username(name):
    """A problem with a username (section 3.1), or None: 1-64 bytes of UTF-8 with no character
    of Unicode category C (controls, formatting, unassigned) or Z (spaces of every kind)."""
    if not isinstance(name, str) or not name:
        return "a username must not be empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_USERNAME_BYTES:
        return f"a username is at most {MAX_USERNAME_BYTES} bytes"
    if any(ch.isspace() or unicodedata.category(ch)[0] in "CZ" for ch in name):
        return "a username must not contain spaces or control characters"
    return None


def header(kind, payload_length):
    return HEADER.pack(payload_length, kind)


def handshake_frame(message):
    """A whole HANDSHAKE frame carrying `message` in plaintext."""
    payload = encode_message(message)
    return header(HANDSHAKE, len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into frames, copying only the frames cut by a read boundary.

    Whole frames are handed over as views of the received bytes. A frame split across reads is
    gathered in a buffer allocated once at the frame's size when its header is complete (no
    growth, no re-copying), and released when the frame is delivered: an idle connection holds
    nothing. `max_payload` may be changed by the frame callback (when the connection
    authenticates); it is checked as soon as a header is complete, before anything of its
    payload is buffered. The memoryviews passed to the callback are valid only during the call.
    """

    def __init__(self, max_payload):
        self.max_payload = max_payload
        self._split = bytearray()  # the split frame: its header first, then room for the rest
        self._have = 0  # bytes of it received
        # After a frame whose callback returned True ("not now": a pipelined request while the
        # previous one is answered), feeding stops, and what came after it is held: at most
        # one read's worth.
        self.stopped = False
        self.held = b""

    @property
    def buffered(self):
        return self._have

    def wanted(self, whole=HEADER_BYTES + MAX_RECORD_PAYLOAD):
        """How much to read next so that reads end on frame boundaries: the rest of a split
        frame, else one whole frame. Whole frames arriving whole are then never copied."""
        if not self._have:
            return whole
        return len(self._split) - self._have

    def _check(self, length, kind):
        if kind not in KINDS:
            raise ProtocolError(f"unknown frame kind {kind}")
        if length > self.max_payload:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_payload}")

    def feed(self, data, on_frame):
        """Hand every whole frame in `data` to on_frame(kind, header, payload); if it returns
        True, stop after that frame and keep the rest in `held`."""
        if self.stopped:  # more arrived while stopped (a transport's last read): behind the rest
            self.held += bytes(data)
            return
        with memoryview(data) as view:
            start = self._complete_split(view, on_frame) if self._have else 0
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
                    if on_frame(kind, head, payload):
                        self._stop(view[start:])
                        return
            if start < end:
                self._begin_split(view[start:])

    def _begin_split(self, piece):
        """Keep the start of a frame; its header, when complete, has been checked already."""
        if len(piece) < HEADER_BYTES:
            self._split = bytearray(HEADER_BYTES)
        else:
            length, _ = HEADER.unpack_from(piece)
            self._split = bytearray(HEADER_BYTES + length)
        self._split[: len(piece)] = piece
        self._have = len(piece)

    def _complete_split(self, view, on_frame):
        """Add to the split frame what it lacks; deliver it if whole. Returns where the rest
        of `view` starts, or None when all of it went into the split frame."""
        split = self._split
        taken = 0
        if self._have < HEADER_BYTES:
            taken = min(HEADER_BYTES - self._have, len(view))
            split[self._have : self._have + taken] = view[:taken]
            self._have += taken
            if self._have < HEADER_BYTES:
                return None
            length, kind = HEADER.unpack_from(split)
            self._check(length, kind)
            whole_frame = bytearray(HEADER_BYTES + length)  # only the header was kept so far
            whole_frame[:HEADER_BYTES] = split
            self._split = split = whole_frame
        wanted = min(len(split) - self._have, len(view) - taken)
        split[self._have : self._have + wanted] = view[taken : taken + wanted]
        self._have += wanted
        taken += wanted
        if self._have < len(split):
            return None
        kind = split[HEADER_BYTES - 1]
        self._split, self._have = bytearray(), 0
        with memoryview(split) as whole, whole[:HEADER_BYTES] as head, whole[HEADER_BYTES:] as payload:
            if on_frame(kind, head, payload):
                self._stop(view[taken:])
                return None
        return taken

    def _stop(self, rest):
        self.stopped = True
        self.held = bytes(rest)

    def take_held(self):
        """Go on after a stop: the bytes after the frame whose callback asked for it, to feed
        again now."""
        held, self.held, self.stopped = self.held, b"", False
        return held


def encode_message(message):
    """Canonical JSON: keys sorted, no spaces. The bytes then depend on the values only, never
    on how a dictionary was built (a known user's cost and an unknown one's look alike)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode("utf-8")


# Nesting deeper than this is refused: no message of ours goes past 4 levels, and a parser's
# own limit (Python's is near 1,000) should not be what decides.
MAX_NESTING = 32
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


class _Malformed(ValueError):
    pass


def _refuse_constant(name):
    raise _Malformed(f"{name} is not JSON")  # Python's json accepts NaN and Infinity


def _object_without_duplicates(pairs):
    # Parsers differ on which of two equal names wins: a message with both means nothing.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Malformed("a member name appears twice")
    return obj


def _nesting(value):
    depth, level = 0, [value]
    while level:
        depth += 1
        if depth > MAX_NESTING:
            return depth
        level = [
            child for item in level if isinstance(item, (dict, list))
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (dict, list))
        ]
    return depth


def decode_message(payload):
    """A JSON object with a string "type"; unknown fields are ignored by the readers."""
    try:
        message = json.loads(
            bytes(payload).decode("utf-8"),
            parse_constant=_refuse_constant, object_pairs_hook=_object_without_duplicates,
        )
    except _Malformed as problem:
        raise ProtocolError(f"malformed message: {problem}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("malformed message: not UTF-8 JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("malformed message: not an object with a type")
    if _nesting(message) > MAX_NESTING:
        raise ProtocolError(f"malformed message: nested deeper than {MAX_NESTING} levels")
    return message


def _field(message, name, kind):
    value = message.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"{message['type']}: field {name!r} missing or of the wrong type")
    return value


def _utf8(message, name, value):
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can carry lone surrogates, which are not UTF-8
        raise ProtocolError(f"{message['type']}: field {name!r} is not valid UTF-8") from None


def text_field(message, name, max_bytes, *, allow_empty=False):
    value = _field(message, name, str)
    if len(_utf8(message, name, value)) > max_bytes or (not value and not allow_empty):
        raise ProtocolError(f"{message['type']}: field {name!r} is empty or too long")
    return value


def string_field(message, name):
    """A string whose content the caller judges: a path (its length, NUL, "..", a reserved name
    are refused by storage with bad-path, leaving the connection ready) or a username. The
    format asks only for a string of Unicode scalar values; the CONTROL limit bounds it."""
    value = _field(message, name, str)
    _utf8(message, name, value)
    return value


def bool_field(message, name, default=False):
    """An optional boolean: absent is `default`; present, it must be true or false (a client
    that sends "recursive": 1 must not get a silent non-recursive answer)."""
    if name not in message:
        return default
    value = message[name]
    if not isinstance(value, bool):
        raise ProtocolError(f"{message['type']}: field {name!r} must be true or false")
    return value


def int_field(message, name, low, high):
    value = _field(message, name, int)
    if not low <= value <= high:
        raise ProtocolError(f"{message['type']}: field {name!r} out of range")
    return value


def mtime_field(message, name="mtime"):
    value = _field(message, name, (int, float))
    if not abs(value) < MTIME_LIMIT:
        raise ProtocolError(f"{message['type']}: field {name!r} out of range")
    return value


def hex_field(message, name, min_bytes, max_bytes=None):
    value = _field(message, name, str)
    max_bytes = min_bytes if max_bytes is None else max_bytes
    if not 2 * min_bytes <= len(value) <= 2 * max_bytes:
        raise ProtocolError(f"{message['type']}: field {name!r} has the wrong length")
    # Hex digits only: bytes.fromhex would skip spaces, and a shorter value would pass.
    if not _HEX.fullmatch(value):
        raise ProtocolError(f"{message['type']}: field {name!r} is not hex")
    return bytes.fromhex(value)
