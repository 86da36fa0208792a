"""The client's Protocol: the handshake through prover.Prover, then requests, with Deferreds
at its edge that fire on a later turn of the reactor.

Request states and the messages each accepts (docs/protocol.md, section 9):
  ready       -> (nothing)    : waiting for the caller's next request
  preparing   -> (nothing)    : hashing the part of a file we already have, to resume
  get-header  -> file         : the server accepted a get
  get-data    -> data, end    : write to the .part file; `end` verifies and renames
  listing     -> entries      : one or more batches of a listing
  stat        -> entry
  mkdir       -> done
  put-offer   -> ready        : the server says where the upload may resume
  put-sending -> (nothing)    : our file is streaming to the server
  put-stored  -> stored       : the server verified and stored it
In the request states marked by REQUEST_STATES an ERROR with a refusal code fails only that
request; any other ERROR ends the connection (docs/protocol.md section 3.7).
"""

import hashlib
import hmac
import os
import stat as stat_module
import sys

from twisted.internet import threads
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from . import errors, files, pbkdf, prover, wire
from .connection import SecureConnection, send_file
from .prover import Prover
from .errors import (
    ConnectionFailed,
    EketwistError,
    IntegrityError,
    LocalIOError,
    NotAFile,
    ProtocolError,
    Unsupported,
)

# A listing is held in memory: a server cannot make it grow without end. Counted in bytes,
# since names of up to 4 KiB each make the cost per entry vary 20-fold: each entry costs its
# name (sys.getsizeof) plus ENTRY_BYTES, the rest of an Entry as measured
# (bench/listing_memory.py). 256 MiB holds about a million entries with names of 50 bytes.
MAX_LISTING_BYTES = 256 * 1024 * 1024
ENTRY_BYTES = 200
REQUEST_STATES = ("get-header", "listing", "stat", "mkdir", "put-offer", "put-stored")


class NoProgress:
    def start(self, name, size, initial=0):
        pass

    def update(self, nbytes):
        pass

    def close(self):
        pass


class _Request:
    """One request in flight: its Deferred and whatever its states need."""

    def __init__(self, kind, remote, progress=None, **details):
        self.kind = kind
        self.remote = remote
        self.progress = progress or NoProgress()
        self.deferred = Deferred()
        self.part = None
        self.handle = None
        self.entries = []
        self.entries_bytes = 0
        self.__dict__.update(details)

    def cleanup(self, keep_part):
        if self.part is not None:
            self.part.abort(keep_part=keep_part)
            # A client serves no one else: wait for what was received to be on disk (the
            # process may exit next), so that a resume finds all of it.
            self.part.wait_until_closed()
        if self.handle is not None:
            self.handle.close()
        self.progress.close()


class ClientProtocol(SecureConnection, TimeoutMixin):
    log = Logger()
    PEER = "server"
    # The request states and the messages each accepts (the handshake is prover.Prover's).
    TRANSITIONS = {
        "ready": {},
        "preparing": {},
        "get-header": {"file": "on_file"},
        "get-data": {"data": "on_get_data", "end": "on_get_end"},
        "listing": {"entries": "on_entries"},
        "stat": {"entry": "on_entry"},
        "mkdir": {"done": "on_done"},
        "put-offer": {"ready": "on_put_ready"},
        "put-sending": {},
        "put-stored": {"stored": "on_stored"},
    }

    def __init__(self, username, password, timeout=None, clock=None, derived=None):
        """`timeout`: seconds without progress (no byte from the server while we wait for
        one, no chunk sent while we upload) after which the connection is abandoned.
        `derived`: a prelude.FirstRound when the fast start already sent HELLO and ran scrypt
        on this connection: its machine and decoder go on here."""
        from twisted.internet import reactor

        self.timeout = timeout
        self.clock = clock or reactor
        self.callLater = self.clock.callLater
        self.username = username
        self._password = password
        self.authenticated_deferred = Deferred()
        self._authentication_settled = False
        self.server_id = None
        self._request = None
        self._first_round = derived
        self.prover = derived.prover if derived is not None else Prover(username)
        self._end_reason = None

    state = "handshake"  # then the request states of TRANSITIONS, and "closed"

    def __repr__(self):
        return f"<ClientProtocol user={self.username!r} state={self.state!r}>"

    def _later(self, deferred, outcome):
        """Fire a caller's Deferred on a later turn of the reactor, never inside
        dataReceived: whatever the caller does next (its next request, a close) then runs
        with our state settled and no view of the read buffer open."""
        if isinstance(outcome, Exception):
            self.callLater(0, deferred.errback, outcome)
        else:
            self.callLater(0, deferred.callback, outcome)

    # -- messages in

    def handshake_received(self, message):
        if message["type"] == "error":
            self.peer_error(message)
            return
        event = self.prover.receive(message)
        if isinstance(event, prover.Params):
            self._derive(event)
        elif isinstance(event, prover.Confirm):
            self.send_handshake(event.reply)
        else:
            self._authenticated(event)

    def control_received(self, message):
        self._dispatch_to(self.state, message["type"], message)

    def data_received(self, chunk):
        self._dispatch_to(self.state, "data", chunk)

    def _dispatch_to(self, state, message_type, argument):
        handler = self.TRANSITIONS.get(state, {}).get(message_type)
        if handler is not None:
            getattr(self, handler)(argument)
        elif message_type == "error":
            self.peer_error(argument)
        else:
            raise ProtocolError(f"unexpected {message_type!r} message in state {state!r}")

    def connectionMade(self):
        super().connectionMade()
        self.setTimeout(self.timeout)
        first_round, self._first_round = self._first_round, None
        if first_round is not None:
            self.decoder = first_round.decoder  # whatever it holds is the server's
            self._derived((first_round.w0, first_round.w1))
            return
        self.send_handshake(self.prover.hello())

    def dataReceived(self, data):
        self.resetTimeout()
        super().dataReceived(data)

    def timeoutConnection(self):
        self.fail(errors.Timeout(f"the server made no progress for {self.timeout:g} s"))

    # -- handshake: the prover says what to send; scrypt runs in a thread

    def _derive(self, params):
        self.server_id = params.server_id
        password, self._password = self._password, None
        derived = threads.deferToThread(
            pbkdf.register, password.encode("utf-8"), params.salt, self.username.encode("utf-8"), **params.scrypt
        )
        derived.addCallback(self._derived)
        derived.addErrback(self._internal_failure)

    def _derived(self, w0_w1):
        if self.closing:
            return
        self.send_handshake(self.prover.derived(*w0_w1))

    def _authenticated(self, done):
        self.server_id = done.server_id
        self.start_records(done.shared_key, is_client=True)
        self._ready()
        self._settle_authentication(self)

    def _settle_authentication(self, outcome):
        if not self._authentication_settled:
            self._authentication_settled = True
            self._later(self.authenticated_deferred, outcome)

    # -- requests: the public API; each returns a Deferred, one request at a time

    def _ready(self):
        self.state = "ready"
        self.setTimeout(None)  # nothing is expected from the server until the next request

    def _begin(self, request, state, message):
        if self.closing:
            # Requests after the end (a multi-file command): fail like the connection did.
            request.cleanup(keep_part=request.part is not None and request.part.size > 0)
            request.deferred.errback(self._end_reason or ConnectionFailed("the connection to the server was lost"))
            return request.deferred
        if self.state != "ready":
            raise RuntimeError(f"a request while {self.state}")
        self._request = request
        self._await(state)
        if message is not None:
            self.send_control(message)
        return request.deferred

    def _await(self, state):
        self.state = state
        self.setTimeout(self.timeout)

    def _complete(self, result):
        request, self._request = self._request, None
        self._ready()
        request.progress.close()
        self._later(request.deferred, result)

    def stat(self, remote):
        """Fires with the entry of `remote` (name, type, size, mtime, mode)."""
        return self._begin(_Request("stat", remote), "stat", {"type": "stat", "path": remote})

    def on_entry(self, message):
        self._complete(_checked_entry(message.get("entry")))

    def list(self, remote, recursive=False, partials=False):
        """Fires with the entries of a directory (or the entry of a file), sorted by name;
        recursive listings name entries by their path relative to `remote`. With `partials`,
        our own partial uploads are listed too (kind "partial")."""
        request = _Request("list", remote)
        message = {"type": "list", "path": remote, "recursive": recursive}
        if partials:
            message["all"] = True
        return self._begin(request, "listing", message)

    def on_entries(self, message):
        batch = message.get("entries")
        if not isinstance(batch, list):
            raise ProtocolError("entries: a list is expected")
        request = self._request
        for item in batch:
            entry = _checked_entry(item)
            request.entries_bytes += sys.getsizeof(entry.name) + ENTRY_BYTES
            if request.entries_bytes > MAX_LISTING_BYTES:
                raise ProtocolError(
                    f"the listing of {request.remote or 'your root'} is larger than this client holds ({MAX_LISTING_BYTES >> 20} MiB)"
                )
            request.entries.append(entry)
        if message.get("more") is not True:
            # The server streams in its directory order; name order here (it also puts every
            # directory of a tree before its contents).
            request.entries.sort(key=lambda entry: entry["name"])
            self._complete(request.entries)

    def mkdir(self, remote, mode=None, mtime=None):
        """Create a remote directory if missing, then set its mode and mtime when given."""
        message = {"type": "mkdir", "path": remote}
        if mode is not None:
            message["mode"] = mode & files.MODE_MASK
        if mtime is not None:
            message["mtime"] = mtime
        return self._begin(_Request("mkdir", remote), "mkdir", message)

    def on_done(self, message):
        self._complete(None)

    def get(self, remote, local, progress=None, resume=True):
        """Download `remote` to the path `local` through `local`.part, resuming from what the
        part file holds when the server's file still starts with it. Fires with
        {"remote", "path", "size", "sha1", "resumed_from"}."""
        try:
            part = files.PartFile(
                local, local + files.CLIENT_PART_SUFFIX, os.path.basename(local), lock=True, private=True
            )
        except EketwistError as error:
            return fail(error)
        request = _Request("get", remote, progress, local=local, prefix_sha1=None)
        request.part = part
        if not (resume and part.size):
            part.restart()
            return self._begin(request, "get-header", {"type": "get", "path": remote})
        self._begin(request, "preparing", None)
        self.setTimeout(None)
        hashed = threads.deferToThread(part.prefix_hasher())

        def ask(sha1):
            if self._request is not request or self.closing:
                return
            request.prefix_sha1 = sha1
            message = {"type": "get", "path": remote}
            if sha1 is not None:
                message.update(offset=part.size, sha1=sha1.hexdigest())
            self._await("get-header")
            self.send_control(message)

        hashed.addCallback(ask).addErrback(self._internal_failure)
        return request.deferred

    def on_file(self, message):
        request = self._request
        request.size = wire.int_field(message, "size", 0, wire.MAX_FILE_SIZE)
        request.mtime = wire.mtime_field(message)
        request.mode = wire.int_field(message, "mode", 0, wire.MAX_MODE) if "mode" in message else None
        offset = wire.int_field(message, "offset", 0, wire.MAX_FILE_SIZE) if "offset" in message else 0
        digest = wire.text_field(message, "digest", 32)
        if digest != "sha1":
            raise Unsupported(f"the server offers digest {digest!r}, which this client does not know")
        part = request.part
        if offset and offset == part.size and request.prefix_sha1 is not None:
            part.resume(request.prefix_sha1)
        elif offset:
            raise ProtocolError("the server resumed at an offset we did not ask for")
        else:
            part.restart()  # nothing held, or the file changed on the server: start over
        request.resumed_from = offset
        request.progress.start(request.remote, request.size, initial=offset)
        self._await("get-data")

    def incoming_file(self):
        return self._request if self.state == "get-data" else None

    def on_get_data(self, chunk):
        request = self._request
        self.receive_into(request, request.remote, chunk)
        request.progress.update(len(chunk))

    def on_get_end(self, message):
        request = self._request
        size = wire.int_field(message, "size", 0, wire.MAX_FILE_SIZE)
        sha1 = wire.hex_field(message, "sha1", 20)
        if size != request.size:
            request.part.abort()
            request.part = None
            raise IntegrityError(f"{request.remote}: the file changed size on the server while it was sent")
        digest = request.part.finish(request.size, sha1, request.mtime, request.mode)
        request.part = None
        self._complete(
            {"remote": request.remote, "path": request.local, "size": request.size,
             "sha1": digest, "resumed_from": request.resumed_from}
        )

    def put(self, local, remote, progress=None, force=False):
        """Upload the file `local` to `remote`, resuming a partial upload the server holds
        for us when it starts with the same bytes as ours. Fires with
        {"remote", "path", "size", "sha1", "resumed_from"}."""
        try:
            handle = open(local, "rb", buffering=0)
        except FileNotFoundError:
            return fail(LocalIOError(f"{local}: no such file"))
        except IsADirectoryError:
            return fail(NotAFile(f"{local}: is a directory (use -r)"))
        except OSError as problem:
            return fail(LocalIOError(f"{local}: cannot read: {problem.strerror}"))
        st = os.fstat(handle.fileno())
        if not stat_module.S_ISREG(st.st_mode):
            handle.close()
            return fail(NotAFile(f"{local}: not a regular file"))
        request = _Request("put", remote, progress, local=local, size=st.st_size, resumed_from=0)
        request.handle = handle
        message = {
            "type": "put", "path": remote, "size": st.st_size, "mtime": st.st_mtime,
            "mode": st.st_mode & files.MODE_MASK, "force": force,
        }
        return self._begin(request, "put-offer", message)

    def on_put_ready(self, message):
        request = self._request
        offset = wire.int_field(message, "offset", 0, request.size)
        if not offset:
            self._upload_from(request, 0, hashlib.sha1())
            return
        theirs = wire.hex_field(message, "sha1", 20)
        self.state = "preparing"
        self.setTimeout(None)
        hashed = threads.deferToThread(files.hash_file_prefix, request.local, offset)

        def compared(ours):
            if self._request is not request or self.closing:
                return
            if ours is not None and hmac.compare_digest(ours.digest(), theirs):
                self._upload_from(request, offset, ours)
            else:
                self._upload_from(request, 0, hashlib.sha1())

        hashed.addCallback(compared).addErrback(self._internal_failure)

    def _upload_from(self, request, offset, sha1):
        self.send_control({"type": "upload", "offset": offset})
        self._await("put-sending")
        request.resumed_from = offset
        request.progress.start(request.remote, request.size, initial=offset)

        def chunk_sent(nbytes):
            self.resetTimeout()  # progress, although the server says nothing while we send
            request.progress.update(nbytes)

        def sent(nbytes):
            if self._request is not request or self.closing:
                return
            request.sha1 = sha1.hexdigest()
            self.send_control({"type": "end", "size": offset + nbytes, "sha1": request.sha1})
            self._await("put-stored")

        send_file(self, request.handle, offset, sha1, chunk_sent).addCallbacks(sent, lambda _: None)

    def on_stored(self, message):
        request = self._request
        size = wire.int_field(message, "size", 0, wire.MAX_FILE_SIZE)
        sha1 = wire.hex_field(message, "sha1", 20)
        if size != request.size or not hmac.compare_digest(sha1.hex(), request.sha1):
            raise IntegrityError(f"{request.remote}: the server stored something else than what was sent")
        request.handle.close()
        request.handle = None
        self._complete(
            {"remote": request.remote, "path": request.local, "size": size,
             "sha1": request.sha1, "resumed_from": request.resumed_from}
        )

    # -- failures

    def peer_error(self, message):
        code = str(message.get("code"))
        error = errors.from_wire(code, message.get("message"))
        if self.state in REQUEST_STATES and code in errors.REFUSAL_CODES:
            # The request failed; the connection stays usable for the next one.
            request, self._request = self._request, None
            self._ready()
            request.cleanup(keep_part=request.part is not None and request.part.size > 0)
            self._later(request.deferred, error)
            return
        self._fail_pending(error)
        self.close()

    def _internal_failure(self, failure):
        self.fail(errors.EketwistError(f"internal error: {failure.getErrorMessage()}"))

    def fail(self, error):
        if self.closing:
            return
        # The ERROR goes out and any upload stops first: whoever waits on the request may
        # close the connection as soon as it hears, and nothing may follow the ERROR.
        super().fail(error)
        self._fail_pending(error)

    def _fail_pending(self, error):
        if self._end_reason is None:
            self._end_reason = error
        request, self._request = self._request, None
        if request is not None:
            # A cut connection keeps the .part for a later resume; bad data does not.
            request.cleanup(keep_part=isinstance(error, ConnectionFailed))
            self._later(request.deferred, error)
        self._settle_authentication(error)

    def close(self, reason=None):
        self.state = "closed"
        super().close(reason)

    def connectionLost(self, reason):
        self.setTimeout(None)
        self.state = "closed"
        super().connectionLost(reason)
        self._password = None
        self._fail_pending(ConnectionFailed(_lost_because(reason)))


def _lost_because(reason):
    """What to tell the user about a lost connection; TLS failures say so."""
    kind = getattr(reason, "type", None)
    if kind is not None and kind.__module__.split(".")[0] in ("OpenSSL", "service_identity"):
        what = "is not valid for this host name" if kind.__module__.startswith("service_identity") else "could not be verified"
        return f"TLS failed: the server's certificate {what} ({kind.__name__})"
    return "the connection to the server was lost"


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


def _checked_entry(item):
    """A listing entry from the server, with its fields checked."""
    if not isinstance(item, dict):
        raise ProtocolError("entry: an object is expected")
    item = {**item, "type": "entry"}  # for the field checks' messages
    kind = item.get("kind")
    name = wire.text_field(item, "name", wire.MAX_PATH_BYTES)
    # Names become local paths in a tree download: a server must not steer them elsewhere.
    if name.startswith("/") or any(segment in ("", ".", "..") for segment in name.split("/")):
        raise ProtocolError(f"the server sent an unsafe name in a listing: {name[:80]!r}")
    return Entry(
        name,
        _KINDS.get(kind, "other") if isinstance(kind, str) else "other",
        wire.int_field(item, "size", 0, wire.MAX_FILE_SIZE),
        wire.mtime_field(item),
        # Permission bits only, as for files: a directory made by `get -r` must not become
        # setgid or sticky (nor anything setuid) because the server said so.
        wire.int_field(item, "mode", 0, wire.MAX_MODE) & files.MODE_MASK,
    )
