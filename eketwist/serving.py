"""The server's side of requests (docs/protocol.md section 7) as a state machine without I/O:
it takes the client's decoded CONTROL messages (and the sizes of its DATA records), checks them
against the state, and says which request or step came in; the glue (eketwist.server) carries
it out with the storage object and reports back, and the machine gives the answer to send.

Each state is a class carrying its data (an upload lives in the states of an upload only):

    Ready          --receive(GET/LIST)-->   Working          (Get, List)
                   --receive(STAT/MKDIR)--> Ready            (Stat, MakeDir: answered at once)
                   --receive(REMOVE with recursive, HASH)-->
                                            Working          (Remove, Hash: the disk work runs in a thread)
                   --receive(REMOVE, RMDIR, RENAME, CHMOD, SPACE)-->
                                            Ready            (Remove, RemoveDirectory, Rename,
                                                              ChangeMode, Space: answered at once)
                   --receive(PUT)-->        Working          (Put: the glue opens the partial file)
                   --receive(other)-->      Ready            (Unknown: refused with unsupported)
    Working        --offer(upload)-->       UploadOffered    (returns READY)
                   --receive_inline()-->    Receiving        (version 2: an inline PUT's part file is open)
                   --done()-->              Ready            (END sent, listing over, or refused)
                                            Discarding       (an inline PUT refused: its DATA still comes)
    UploadOffered  --receive(UPLOAD)-->     Receiving        (UploadFrom)
    Receiving      --data(n)-->             Receiving        (IntegrityError past the size)
                   --receive(END)-->        Storing          (Finish)
    Discarding     --data(n), END-->        Discarding, Ready (Dropped)
    Storing        --receive(anything)-->   Storing          (Early: answered after STORED)
                   --done()-->              Ready            (returns the early message's error)

Version 2 has no Storing: END leaves the upload to be committed while the next requests are
read (`committing` counts them, committed() when each is answered), and until every one is
answered only inline PUTs start; any other request says Wait.

In version 2 (pipelined requests, docs/protocol.md section 7.9) a message in Working is the
next request: receive() says Wait, and the glue gives it again once this one is answered.
Otherwise, messages a state does not list are protocol errors.
"""

from dataclasses import dataclass
from typing import Optional, Union

from . import wire
from .errors import IntegrityError, ProtocolError, Unsupported


@dataclass
class Upload:
    """One upload in progress, as the PUT announced it (the glue's transfers.Upload holds its
    partial file)."""

    path: str
    size: int
    mtime: Optional[float]
    mode: Optional[int]
    force: bool
    inline: bool = False  # version 2: DATA and END follow the PUT at once, without READY
    offered: int = 0  # the offset READY offered


# -- requests, as receive() reports them


@dataclass(frozen=True)
class Get:
    path: str
    offset: int
    sha1: Optional[bytes]


@dataclass(frozen=True)
class Stat:
    path: str


@dataclass(frozen=True)
class List:
    path: str
    recursive: bool
    partials: bool


@dataclass(frozen=True)
class MakeDir:
    path: str
    mode: Optional[int]
    mtime: Optional[float]


@dataclass(frozen=True)
class Put:
    upload: Upload


# -- managing files (docs/protocol.md section 7.10)


@dataclass(frozen=True)
class Remove:
    path: str
    recursive: bool


@dataclass(frozen=True)
class RemoveDirectory:
    path: str


@dataclass(frozen=True)
class Rename:
    path: str
    to: str
    force: bool


@dataclass(frozen=True)
class ChangeMode:
    path: str
    mode: int


@dataclass(frozen=True)
class Hash:
    path: str


@dataclass(frozen=True)
class Space:
    pass


@dataclass(frozen=True)
class Unknown:
    error: Unsupported


@dataclass(frozen=True)
class UploadFrom:
    upload: Upload
    offset: int


@dataclass(frozen=True)
class Finish:
    upload: Upload
    size: int
    sha1: bytes


@dataclass(frozen=True)
class Early:
    """A message between END and the upload's answer: held until the answer has gone."""


@dataclass(frozen=True)
class Wait:
    """Version 2: a request while the previous one is being answered. The glue keeps it (and
    stops reading) until then, and gives it to receive() again."""


@dataclass(frozen=True)
class Dropped:
    """DATA or END of a refused inline upload: read and dropped (its refusal has gone)."""


# -- states


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class Working:
    what: str  # "get", "list", "remove" (recursive), "hash", or "put" (hashing the partial file's prefix)
    upload: Optional[Upload] = None


@dataclass(frozen=True)
class UploadOffered:
    upload: Upload


@dataclass
class Receiving:
    upload: Upload
    owed: int  # file bytes the client has still to send


@dataclass
class Storing:
    upload: Upload
    early: Optional[ProtocolError] = None


@dataclass
class Discarding:
    """Version 2: an inline upload was refused; its DATA and END still come, and are dropped."""

    upload: Upload
    owed: int


@dataclass(frozen=True)
class Closed:
    pass


State = Union[Ready, Working, UploadOffered, Receiving, Storing, Discarding, Closed]

STATE_NAMES = {
    Ready: "ready", Working: "working", UploadOffered: "upload-offered", Receiving: "receiving",
    Storing: "storing", Discarding: "discarding", Closed: "closed",
}


def _optional(message, name, read, *args):
    return read(message, name, *args) if name in message else None


def _request(message, version):
    """A request message as its request object."""
    kind = message["type"]
    if kind == "get":
        offset = _optional(message, "offset", wire.int_field, 0, wire.MAX_FILE_SIZE) or 0
        sha1 = _optional(message, "sha1", wire.hex_field, 20)  # like every member: typed if present
        if offset and sha1 is None:
            raise ProtocolError("get: an offset needs the sha1 of those bytes")
        return Get(wire.string_field(message, "path"), offset, sha1 if offset else None)
    if kind == "stat":
        return Stat(wire.string_field(message, "path"))
    if kind == "list":
        return List(wire.string_field(message, "path"), wire.bool_field(message, "recursive"), wire.bool_field(message, "all"))
    if kind == "mkdir":
        return MakeDir(
            wire.string_field(message, "path"),
            _optional(message, "mode", wire.int_field, 0, wire.MAX_MODE),
            _optional(message, "mtime", wire.mtime_field),
        )
    if kind == "put":
        upload = Upload(
            path=wire.string_field(message, "path"),
            size=wire.int_field(message, "size", 0, wire.MAX_FILE_SIZE),
            mtime=_optional(message, "mtime", wire.mtime_field),
            mode=_optional(message, "mode", wire.int_field, 0, wire.MAX_MODE),
            force=wire.bool_field(message, "force"),
            inline=version >= 2 and wire.bool_field(message, "inline"),  # unknown to version 1
        )
        if upload.inline and upload.size > wire.MAX_INLINE_SIZE:
            raise ProtocolError(f"put: an inline upload is at most {wire.MAX_INLINE_SIZE} bytes")
        return Put(upload)
    if kind == "remove":
        return Remove(wire.string_field(message, "path"), wire.bool_field(message, "recursive"))
    if kind == "rmdir":
        return RemoveDirectory(wire.string_field(message, "path"))
    if kind == "rename":
        return Rename(wire.string_field(message, "path"), wire.string_field(message, "to"), wire.bool_field(message, "force"))
    if kind == "chmod":
        return ChangeMode(wire.string_field(message, "path"), wire.int_field(message, "mode", 0, wire.MAX_MODE))
    if kind == "hash":
        return Hash(wire.string_field(message, "path"))
    if kind == "space":
        return Space()
    if kind == "error":  # the glue ends the connection on a client's ERROR before this
        raise ProtocolError(f"unexpected {kind!r} message in state 'ready'")
    # Later versions add requests; an old server answers clearly and carries on.
    return Unknown(Unsupported(f"request {kind[:40]!r} is not supported by this server"))


class Serving:
    # Version 2: uploads past their END whose answers have not gone yet (committed side by
    # side, answered in order). Each holds a part file open until then.
    MAX_COMMITTING = 32

    def __init__(self, version=1):
        self.version = version  # as the handshake chose it
        self.state: State = Ready()
        self.committing = 0

    @property
    def name(self):
        return STATE_NAMES[type(self.state)]

    @property
    def upload(self):
        """The upload in progress, from PUT to its answer (or None)."""
        return getattr(self.state, "upload", None)

    def receive(self, message, crowded=False):
        """A CONTROL message from the client: the request or step it is. A client's ERROR is
        left to the glue (it ends the connection). `crowded`: the server as a whole holds as
        many uploads in commit as it allows, so this connection's next waits for its own."""
        state, kind = self.state, message["type"]
        if isinstance(state, Ready):
            request = _request(message, self.version)
            if self.committing and (crowded or not (
                isinstance(request, Put) and request.upload.inline and self.committing < self.MAX_COMMITTING
            )):
                # Uploads are being committed: only inline uploads (whose answers are small
                # and follow theirs in order) start meanwhile; the rest see those files.
                return Wait()
            if isinstance(request, (Get, List, Hash)) or (isinstance(request, Remove) and request.recursive):
                self.state = Working(type(request).__name__.lower())
            elif isinstance(request, Put):
                self.state = Working("put", request.upload)
            return request
        if isinstance(state, UploadOffered) and kind == "upload":
            offset = wire.int_field(message, "offset", 0, wire.MAX_FILE_SIZE)
            upload = state.upload
            if offset not in (0, upload.offered):
                raise ProtocolError("upload offset must be 0 or the offered offset")
            self.state = Receiving(upload, upload.size - offset)
            return UploadFrom(upload, offset)
        if isinstance(state, Receiving) and kind == "end":
            size = wire.int_field(message, "size", 0, wire.MAX_FILE_SIZE)
            sha1 = wire.hex_field(message, "sha1", 20)
            if self.version >= 2:
                # Committed beside the next requests, answered in order (see committed()).
                self.committing += 1
                self.state = Ready()
            else:
                self.state = Storing(state.upload)
            return Finish(state.upload, size, sha1)
        if self.version >= 2 and isinstance(state, Working) and state.upload is None:
            # Pipelined: the next request, carried out once this GET, LIST, recursive REMOVE or
            # HASH is answered. (A PUT
            # hashing its partial file is followed by nothing until READY: section 7.9, rule 2.)
            return Wait()
        if isinstance(state, Discarding) and kind == "end":
            wire.int_field(message, "size", 0, wire.MAX_FILE_SIZE)
            wire.hex_field(message, "sha1", 20)
            self.state = Ready()
            return Dropped()
        if isinstance(state, Storing):
            # The answer to the upload still comes first, so that its outcome is never in
            # doubt; the protocol error follows it (see done()).
            if state.early is None:
                state.early = ProtocolError(f"unexpected {kind[:40]!r} message before the upload's answer")
            return Early()
        raise ProtocolError(f"unexpected {kind[:40]!r} message in state {self.name!r}")

    def data(self, length):
        """A DATA record of `length` file bytes from the client."""
        state = self.state
        if isinstance(state, Storing) and self.version == 1:
            self.receive({"type": "data"})
            return Early()
        if isinstance(state, Discarding):
            if length > state.owed:
                raise ProtocolError(f"{state.upload.path}: the client sent more than the announced size")
            state.owed -= length
            return Dropped()
        if not isinstance(state, Receiving):
            raise ProtocolError(f"unexpected 'data' message in state {self.name!r}")
        if length > state.owed:
            raise IntegrityError(f"{state.upload.path}: the client sent more than the announced size")
        state.owed -= length
        return None

    def bytes_owed(self):
        """File bytes the client announced and has not sent yet (0 outside an upload's DATA)."""
        return self.state.owed if isinstance(self.state, (Receiving, Discarding)) else 0

    def offer(self, offset, sha1_hex):
        """READY for the upload in progress: the partial file holds `offset` bytes."""
        state = self.state
        assert isinstance(state, Working) and state.upload is not None, state
        upload = state.upload
        upload.offered = offset
        self.state = UploadOffered(upload)
        message = {"type": "ready", "offset": offset}
        if offset:
            message["sha1"] = sha1_hex
        return message

    def committed(self):
        """Version 2: an upload past its END has had its answer (STORED or a refusal)."""
        assert self.committing > 0
        self.committing -= 1

    def receive_inline(self):
        """The inline upload's partial file is open: its DATA follows, from offset 0."""
        state = self.state
        assert isinstance(state, Working) and state.upload is not None and state.upload.inline, state
        self.state = Receiving(state.upload, state.upload.size)

    def done(self):
        """The request has been answered (or refused): Ready, or Discarding for an inline
        upload refused before its DATA. Returns the error of a message that came too early,
        which the glue sends after the answer; else None. Closed stays closed (an upload
        stored after its connection ended)."""
        state = self.state
        if isinstance(state, Closed):
            return None
        if isinstance(state, Working) and state.upload is not None and state.upload.inline:
            self.state = Discarding(state.upload, state.upload.size)
            return None
        early = state.early if isinstance(state, Storing) else None
        self.state = Ready()
        return early

    def close(self):
        self.state = Closed()
