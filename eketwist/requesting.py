"""The client's side of requests (docs/protocol.md section 7) as a state machine without I/O: it
checks each answer from the server against the request it answers and says what happened; the
glue (eketwist.client_protocol) writes files, hashes, streams and fires the caller's Deferreds.

Every request is an Exchange with a state of its own, kept in order in `in_flight`: the server
answers requests in the order they were sent, so messages go to the first one. Version 1 keeps
one request in flight at a time; version 2 (pipelined, docs/protocol.md section 7.9) several.

    stat:  AwaitingEntry   --ENTRY-->    (Answered: the entry)
    mkdir: AwaitingDone    --DONE-->     (Answered: None)
    remove, rmdir, rename, chmod: AwaitingChange --DONE--> (Answered: the names removed)
    hash:  AwaitingDigest  --DIGEST-->   (Answered: {name, size, mtime, sha1})
    space: AwaitingSpace   --SPACE-->    (Answered: {total, free, files_free[, quotas]})
    list:  Listing         --ENTRIES-->  Listing ... --last ENTRIES--> (Answered: sorted entries)
    get:   (the glue hashes our .part's prefix before the GET leaves) AwaitingFile --FILE--> ReceivingFile
           --DATA...--> --END--> (FileEnd: the glue verifies and renames)
    put:   AwaitingReady --READY--> (Offered) --Preparing while it hashes-- --sending()-->
           Sending --sent()--> AwaitingStored --STORED--> (Stored)
    put, inline (version 2): SendingInline (its ERROR may come meanwhile) --sent()-->
           AwaitingStored --STORED--> (Stored)

receive() reports; the exchange stays current until the glue calls finish() (a file is
verified and renamed first, and a failure there fails the request with the connection).
An ERROR with a code that refuses in the state awaiting the answer (REFUSALS) fails that request
(Refused); any other ERROR, and any message a state does not accept, ends the connection.
"""

import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import errors, wire
from .errors import IntegrityError, ProtocolError, Unsupported

# A listing is held in memory: a server cannot make it grow without end. Counted in bytes,
# since names of up to 4 KiB each make the cost per entry vary 20-fold: each entry costs its
# name (sys.getsizeof) plus ENTRY_BYTES, the rest of an Entry as measured
# (bench/listing_memory.py). 256 MiB holds about a million entries with names of 50 bytes.
MAX_LISTING_BYTES = 256 * 1024 * 1024
ENTRY_BYTES = 200


# -- states of one exchange


@dataclass
class AwaitingEntry:
    name = "stat"


@dataclass
class AwaitingDone:
    name = "mkdir"


@dataclass
class AwaitingChange:
    name = "mkdir"  # docs/protocol.md section 9 names it so: the same answer, DONE


@dataclass
class AwaitingDigest:
    name = "hash"


@dataclass
class AwaitingSpace:
    name = "space"


@dataclass
class Listing:
    name = "listing"
    entries: list = field(default_factory=list)
    held: int = 0  # bytes the entries cost us


@dataclass
class Preparing:
    name = "preparing"


@dataclass
class AwaitingFile:
    name = "get-header"
    offset: int  # what we asked to resume from (0: from the start)


@dataclass
class ReceivingFile:
    name = "get-data"
    size: int
    owed: int


@dataclass
class AwaitingReady:
    name = "put-offer"
    size: int


@dataclass
class Sending:
    name = "put-sending"
    size: int


@dataclass
class SendingInline:
    """Version 2: a PUT whose file follows it at once; a refusal may come while it is sent."""

    name = "put-inline"
    size: int


@dataclass
class AwaitingStored:
    name = "put-stored"
    size: int
    sha1: str


# The codes that refuse a request in each state awaiting an answer (docs/protocol.md section
# 3.7); any other ERROR, and any ERROR elsewhere, is fatal.
REFUSALS = {
    AwaitingEntry: errors.REFUSAL_CODES,
    Listing: errors.REFUSAL_CODES,
    AwaitingFile: errors.REFUSAL_CODES,
    AwaitingDone: errors.WRITE_REFUSAL_CODES,
    AwaitingReady: errors.WRITE_REFUSAL_CODES,
    SendingInline: errors.WRITE_REFUSAL_CODES,
    AwaitingStored: errors.UPLOAD_END_REFUSAL_CODES,
    AwaitingChange: errors.MANAGE_REFUSAL_CODES,
    AwaitingDigest: errors.REFUSAL_CODES,
    AwaitingSpace: errors.REFUSAL_CODES,
}


@dataclass
class Exchange:
    """One request: what the glue keeps with it (`request`) and where it stands."""

    request: Any
    state: Any


# -- what receive() reports


@dataclass(frozen=True)
class Answered:
    request: Any
    result: Any


@dataclass(frozen=True)
class FileHeader:
    request: Any
    size: int
    mtime: float
    mode: Optional[int]
    offset: int


@dataclass(frozen=True)
class FileEnd:
    request: Any
    size: int
    sha1: bytes


@dataclass(frozen=True)
class Offered:
    request: Any
    offset: int
    sha1: Optional[bytes]


@dataclass(frozen=True)
class Stored:
    request: Any
    size: int
    sha1: str


@dataclass(frozen=True)
class Refused:
    request: Any
    error: errors.EketwistError


@dataclass(frozen=True)
class Failed:
    """A fatal ERROR from the server: the connection ends."""

    error: errors.EketwistError


class Requesting:
    def __init__(self):
        self.in_flight: "deque[Exchange]" = deque()

    @property
    def name(self):
        return self.in_flight[0].state.name if self.in_flight else "ready"

    @property
    def current(self):
        return self.in_flight[0] if self.in_flight else None

    def begin(self, request, state):
        """A request leaves (or is about to, after Preparing): it awaits its answer in `state`."""
        self.in_flight.append(Exchange(request, state))

    def move(self, request, state):
        """The glue's step for `request` (asked after hashing, sending, sent)."""
        exchange = self.current
        assert exchange is not None and exchange.request is request, (exchange, request)
        exchange.state = state

    def finish(self, request):
        """The glue is done with `request` (answered, refused): the next one is current."""
        exchange = self.in_flight.popleft()
        assert exchange.request is request, (exchange, request)

    def step(self, request, state):
        """`request`, wherever it is in flight, moves to `state` (an inline upload sent while
        earlier requests are answered)."""
        for exchange in reversed(self.in_flight):  # the last sent, most often
            if exchange.request is request:
                exchange.state = state
                return
        raise AssertionError(f"{request!r} is not in flight")

    def abandon(self):
        """Every request in flight, for the glue to fail (the connection is ending)."""
        requests = [exchange.request for exchange in self.in_flight]
        self.in_flight.clear()
        return requests

    def receive(self, message):
        kind = message["type"]
        exchange = self.current
        state = exchange.state if exchange is not None else None
        if kind == "error":
            return self._error(exchange, message)
        if kind == "entry" and isinstance(state, AwaitingEntry):
            return Answered(exchange.request, checked_entry(message.get("entry")))
        if kind == "done" and isinstance(state, AwaitingDone):
            return Answered(exchange.request, None)
        if kind == "done" and isinstance(state, AwaitingChange):
            removed = wire.int_field(message, "removed", 0, wire.MAX_FILE_SIZE) if "removed" in message else 0
            return Answered(exchange.request, removed)
        if kind == "digest" and isinstance(state, AwaitingDigest):
            return Answered(exchange.request, {
                "name": wire.text_field(message, "name", wire.MAX_PATH_BYTES),
                "size": wire.int_field(message, "size", 0, wire.MAX_FILE_SIZE),
                "mtime": wire.mtime_field(message),
                "sha1": wire.hex_field(message, "sha1", 20).hex(),
            })
        if kind == "space" and isinstance(state, AwaitingSpace):
            return Answered(exchange.request, _space(message))
        if kind == "entries" and isinstance(state, Listing):
            return self._entries(exchange, state, message)
        if kind == "file" and isinstance(state, AwaitingFile):
            return self._file(exchange, state, message)
        if kind == "end" and isinstance(state, ReceivingFile):
            size = wire.int_field(message, "size", 0, wire.MAX_FILE_SIZE)
            sha1 = wire.hex_field(message, "sha1", 20)
            if size != state.size:
                raise IntegrityError(f"{exchange.request.remote}: the file changed size on the server while it was sent")
            return FileEnd(exchange.request, size, sha1)
        if kind == "ready" and isinstance(state, AwaitingReady):
            offset = wire.int_field(message, "offset", 0, state.size)
            sha1 = wire.hex_field(message, "sha1", 20) if offset else None
            exchange.state = Preparing()
            return Offered(exchange.request, offset, sha1)
        if kind == "stored" and isinstance(state, AwaitingStored):
            size = wire.int_field(message, "size", 0, wire.MAX_FILE_SIZE)
            sha1 = wire.hex_field(message, "sha1", 20).hex()
            if size != state.size or sha1 != state.sha1:
                raise IntegrityError(f"{exchange.request.remote}: the server stored something else than what was sent")
            return Stored(exchange.request, size, sha1)
        raise ProtocolError(f"unexpected {kind[:40]!r} message in state {self.name!r}")

    def data(self, length):
        """A DATA record of `length` file bytes from the server."""
        exchange = self.current
        state = exchange.state if exchange is not None else None
        if not isinstance(state, ReceivingFile):
            raise ProtocolError(f"unexpected 'data' message in state {self.name!r}")
        if length > state.owed:
            raise IntegrityError(f"{exchange.request.remote}: the server sent more than the announced size")
        state.owed -= length

    def bytes_owed(self):
        state = self.current.state if self.in_flight else None
        return state.owed if isinstance(state, ReceivingFile) else 0

    def _error(self, exchange, message):
        code = str(message.get("code"))
        error = errors.from_wire(message)
        if exchange is not None and code in REFUSALS.get(type(exchange.state), ()):
            return Refused(exchange.request, error)
        return Failed(error)

    def _entries(self, exchange, state, message):
        batch = message.get("entries")
        if not isinstance(batch, list):
            raise ProtocolError("entries: a list is expected")
        for item in batch:
            entry = checked_entry(item)
            state.held += sys.getsizeof(entry.name) + ENTRY_BYTES
            if state.held > MAX_LISTING_BYTES:
                raise ProtocolError(
                    f"the listing of {exchange.request.remote or 'your root'} is larger than this client holds "
                    f"({MAX_LISTING_BYTES >> 20} MiB)"
                )
            state.entries.append(entry)
        if wire.bool_field(message, "more"):
            return None
        # The server streams in its directory order; name order here (it also puts every
        # directory of a tree before its contents).
        state.entries.sort(key=lambda entry: entry["name"])
        return Answered(exchange.request, state.entries)

    def _file(self, exchange, state, message):
        size = wire.int_field(message, "size", 0, wire.MAX_FILE_SIZE)
        mtime = wire.mtime_field(message)
        mode = wire.int_field(message, "mode", 0, wire.MAX_MODE) if "mode" in message else None
        offset = wire.int_field(message, "offset", 0, wire.MAX_FILE_SIZE) if "offset" in message else 0
        digest = wire.text_field(message, "digest", 32)
        if digest != "sha1":
            raise Unsupported(f"the server offers digest {digest!r}, which this client does not know")
        if offset and offset != state.offset:
            raise ProtocolError("the server resumed at an offset we did not ask for")
        if offset > size:
            raise ProtocolError("the server resumed past the end of the file")
        exchange.state = ReceivingFile(size, size - offset)
        return FileHeader(exchange.request, size, mtime, mode, offset)


class Entry:
    """One entry of a listing, read like the server's dict (`entry["name"]`). Slots, not a
    dict, and only the checked values kept: a listing may hold a million of these."""

    __slots__ = ("name", "kind", "size", "mtime", "mode")

    def __init__(self, name, kind, size, mtime, mode):
        self.name, self.kind, self.size, self.mtime, self.mode = name, kind, size, mtime, mode

    def __getitem__(self, field):
        if field not in self.__slots__:
            raise KeyError(field)
        return getattr(self, field)

    def to_json(self):
        return {field: getattr(self, field) for field in self.__slots__}

    def __repr__(self):
        return f"Entry({self.to_json()!r})"


# The kinds as our own strings: the decoded message's copies would cost 53 bytes an entry.
_KINDS = {kind: kind for kind in ("file", "dir", "symlink", "other", "partial")}


def _space(message):
    """SPACE's members, checked; the quotas only when the server gives them."""
    space = {
        "total": wire.int_field(message, "total", 0, wire.MAX_FILE_SIZE),
        "free": wire.int_field(message, "free", 0, wire.MAX_FILE_SIZE),
        "files_free": wire.int_field(message, "files_free", -1, wire.MAX_FILE_SIZE),
    }
    for name in ("quota_bytes", "used_bytes", "quota_files", "used_files"):
        if name in message:
            space[name] = wire.int_field(message, name, 0, wire.MAX_FILE_SIZE)
    return space


def checked_entry(item):
    """A listing entry from the server, with its fields checked."""
    if not isinstance(item, dict):
        raise ProtocolError("entry: an object is expected")
    item = {**item, "type": "entry"}  # for the field checks' messages
    kind = wire.string_field(item, "kind")  # one we do not know is "other" (section 7)
    name = wire.text_field(item, "name", wire.MAX_PATH_BYTES)
    # Names become local paths in a tree download: a server must not steer them elsewhere.
    if name.startswith("/") or any(segment in ("", ".", "..") for segment in name.split("/")):
        raise ProtocolError(f"the server sent an unsafe name in a listing: {name[:80]!r}")
    return Entry(
        name,
        _KINDS.get(kind, "other"),
        wire.int_field(item, "size", 0, wire.MAX_FILE_SIZE),
        wire.mtime_field(item),
        # Permission bits only, as for files: a directory made by `get -r` must not become
        # setgid or sticky (nor anything setuid) because the server said so.
        wire.int_field(item, "mode", 0, wire.MAX_MODE) & wire.PERMISSION_BITS,
    )


@dataclass
class Outgoing:
    """A request not sent yet: the state its answer will be awaited in, its message (None
    while the glue prepares it), and what the glue does once it has gone."""

    request: object
    state: object
    message: Optional[dict]
    then: Optional[Callable[[], None]]


class Outbox:
    """The requests not sent yet, in the order they were made (version 2 sends them without
    waiting for answers; section 7.9). Two things hold the ones behind: a request still being
    prepared (its message None: a resumed GET hashing its part file keeps its place), and an
    upload sending its messages and DATA (hold() until release())."""

    def __init__(self):
        self._queue: "deque[Outgoing]" = deque()
        self._holder = None

    def add(self, request, state, message, then=None):
        self._queue.append(Outgoing(request, state, message, then))

    def prepared(self, request, state, message):
        for outgoing in self._queue:
            if outgoing.request is request:
                outgoing.state, outgoing.message = state, message
                return

    @property
    def preparing(self):
        """The next request to go is still being prepared."""
        return bool(self._queue) and self._queue[0].message is None

    def next(self):
        """The next Outgoing to send now, or None."""
        if self._holder is not None or not self._queue or self._queue[0].message is None:
            return None
        return self._queue.popleft()

    def hold(self, request):
        self._holder = request

    def release(self, request):
        """True when `request` held the sending side (the rest may go now)."""
        if self._holder is not request:
            return False
        self._holder = None
        return True

    def abandon(self):
        """Every request not sent, for the glue to fail (the connection is ending)."""
        requests = [outgoing.request for outgoing in self._queue]
        self._queue.clear()
        return requests
