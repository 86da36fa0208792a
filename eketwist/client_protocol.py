"""The client's Protocol: glue between the server's frames and two machines without I/O,
prover.Prover (the handshake) and requesting.Requesting (the requests). It does what they
cannot: scrypt and hashing in threads, part files, streaming an upload, timeouts, and the
Deferreds of its API, which fire on a later turn of the reactor, never inside dataReceived.
"""

import hashlib
import hmac
import os
import stat as stat_module
import time

from twisted.internet import threads
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from . import errors, files, pbkdf, prover, requesting, wire
from .connection import SecureConnection, send_file
from .errors import ConnectionFailed, EketwistError, LocalIOError, TryLater
from .prover import Prover


class NoProgress:
    def start(self, name, size, initial=0):
        pass

    def update(self, nbytes):
        pass

    def close(self):
        pass


class _Request:
    """One request in flight: its Deferred and whatever its states need."""

    def __init__(self, remote, progress=None, **details):
        self.remote = remote
        self.progress = progress or NoProgress()
        self.deferred = Deferred()
        self.part = None
        self.handle = None
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


def _has_data(request):
    """A part file worth keeping for a resume: not the empty one of a request not yet answered
    (version 2 opens them as requests are sent, up to a window's worth)."""
    return request.part is not None and request.part.size > 0


# A cut connection (a server shutting down says so, a user's interrupt) keeps a .part for a
# later resume; bad data does not.
_KEEP_PART = (ConnectionFailed, TryLater, errors.Interrupted, errors.OutputClosed)


class ClientProtocol(SecureConnection, TimeoutMixin):
    log = Logger()
    PEER = "server"
    # Version 2: files up to this size go with their PUT, without waiting for READY (a refused
    # one is still sent whole, and the server drops it: cheap at this size). Larger ones wait
    # for READY, which can resume a partial upload.
    INLINE_UPLOAD_MAX = 1024 * 1024
    # A download's first bytes, up to this many, are written by the reactor's thread (see
    # files.PartFile): a client has no other connection that a stalled write would hold up.
    WRITE_IN_PLACE = 256 * 1024

    def __init__(self, username, password, timeout=None, clock=None, derived=None, versions=wire.VERSIONS):
        """`timeout`: seconds without progress (no byte from the server while we wait for
        one, no chunk sent while we upload) after which the connection is abandoned.
        `derived`: a prelude.FirstRound when the fast start already sent HELLO and ran scrypt
        on this connection: its machine and decoder go on here. `versions`: the protocol
        versions HELLO offers."""
        from twisted.internet import reactor

        self.timeout = timeout
        self.clock = clock or reactor
        self.callLater = self.clock.callLater
        self.username = username
        self._password = password
        self.authenticated_deferred = Deferred()
        self._authentication_settled = False
        self.server_id = None
        # What the server said a failed login here would make the next one wait (PARAMS).
        self.retry_delay = derived.retry_delay if derived is not None else 0.0
        self.requesting = None  # the request machine, from authentication on
        self._first_round = derived
        self.prover = derived.prover if derived is not None else Prover(username, versions)
        self.version = None  # the protocol version the handshake chose
        self._end_reason = None
        # Version 2 sends requests without waiting for answers, but an upload's messages and
        # DATA go out together: while one holds the sending side, later requests wait here.
        self.outbox = requesting.Outbox()
        self.committer = files.GroupCommit(lambda *args: threads.deferToThread(*args))

    @property
    def state(self):
        """The state's name, as docs/protocol.md section 9 gives it."""
        if getattr(self, "closing", False):
            return "closed"
        if self.requesting is None:
            return self.prover.name
        if not self.requesting.in_flight and self.outbox.preparing:
            return "preparing"  # hashing our .part's prefix before the GET goes out
        return self.requesting.name

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
        event = self.requesting.receive(message)
        if event is not None:  # None: a listing goes on
            self._ANSWER_HANDLERS[type(event)](self, event)

    def data_received(self, chunk):
        self.requesting.data(len(chunk))
        request = self.requesting.current.request
        self.receive_into(request.part, chunk)
        request.progress.update(len(chunk))

    def file_bytes_expected(self):
        return self.requesting.bytes_owed() if self.requesting is not None else 0

    def incoming_file(self):
        exchange = self.requesting.current if self.requesting is not None else None
        if exchange is None or not isinstance(exchange.state, requesting.ReceivingFile):
            return None
        return exchange.request

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
        self.retry_delay = params.retry_delay
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
        self.requesting = requesting.Requesting()
        self.version = self.prover.version
        self._ready()
        self._settle_authentication(self)

    def _settle_authentication(self, outcome):
        if not self._authentication_settled:
            self._authentication_settled = True
            self._later(self.authenticated_deferred, outcome)

    # -- requests: the public API; each returns a Deferred. Version 1: one request at a time;
    # version 2: as many as the caller likes, answered in order.

    @property
    def pipelined(self):
        return self.version is not None and self.version >= 2

    def _ready(self):
        if not (self.requesting is not None and self.requesting.in_flight):
            self.setTimeout(None)  # nothing is expected from the server until the next request

    def _begin(self, request, state, message, then=None):
        """Send `request`'s `message`, to be answered in `state`, once the requests before it
        have gone (an upload holds the sending side); `then` runs once it has gone.
        `message` None keeps the request's place until _prepared() gives it."""
        if self.closing:
            # Requests after the end (a multi-file command): fail like the connection did.
            request.cleanup(keep_part=_has_data(request))
            self._later(request.deferred, self._end_reason or ConnectionFailed("the connection to the server was lost"))
            return request.deferred
        if not self.pipelined and self.requesting.in_flight:
            raise RuntimeError(f"a request while {self.state}")
        unsendable = _unsendable(message or {"path": request.remote})
        if unsendable is not None:  # failed here: a request sent would have to be answered
            request.cleanup(keep_part=False)
            self._later(request.deferred, unsendable)
            return request.deferred
        self.outbox.add(request, state, message, then)
        self._send_queued()
        return request.deferred

    def _prepared(self, request, state, message):
        """The message of a request _begin() queued without one: it goes in its place."""
        self.outbox.prepared(request, state, message)
        self._send_queued()

    def _send_queued(self):
        while not self.closing and (outgoing := self.outbox.next()) is not None:
            self.requesting.begin(outgoing.request, outgoing.state)
            self.setTimeout(self.timeout)
            self.send_control(outgoing.message)
            if outgoing.then is not None:
                outgoing.then()

    def _hold_sending(self, request):
        """`request`, an upload, sends its messages and DATA before any later request."""
        self.outbox.hold(request)

    def _release_sending(self, request):
        if self.outbox.release(request):
            self._send_queued()

    def _awaiting(self, request, state, message=None):
        """`request` moves to `state`; `message` goes out; the server owes us progress."""
        self.requesting.step(request, state)
        self.setTimeout(self.timeout)
        if message is not None:
            self.send_control(message)

    def _complete(self, request, result):
        self.requesting.finish(request)
        self._ready()
        request.progress.close()
        self._later(request.deferred, result)

    def _answered(self, answer):
        self._complete(answer.request, answer.result)

    def _refused(self, refusal):
        """The request failed; the connection stays usable for the next one."""
        request = refusal.request
        self.requesting.finish(request)
        self._ready()
        if getattr(request, "streaming", False):
            # An inline upload refused while its DATA goes out: the rest still goes (the
            # server drops it), and its file closes when it has been sent.
            request.refused = True
            request.progress.close()
        else:
            request.cleanup(keep_part=_has_data(request))
            self._release_sending(request)
        self._later(request.deferred, refusal.error)

    def _server_failed(self, failed):
        self._fail_pending(failed.error)
        self.close()

    def stat(self, remote):
        """Fires with the entry of `remote` (name, type, size, mtime, mode)."""
        return self._begin(_Request(remote), requesting.AwaitingEntry(), {"type": "stat", "path": remote})

    def list(self, remote, recursive=False, partials=False):
        """Fires with the entries of a directory (or the entry of a file), sorted by name;
        recursive listings name entries by their path relative to `remote`. With `partials`,
        our own partial uploads are listed too (kind "partial")."""
        message = {"type": "list", "path": remote, "recursive": recursive}
        if partials:
            message["all"] = True
        return self._begin(_Request(remote), requesting.Listing(), message)

    def mkdir(self, remote, mode=None, mtime=None):
        """Create a remote directory if missing, then set its mode and mtime when given."""
        message = {"type": "mkdir", "path": remote}
        if mode is not None:
            message["mode"] = mode & files.MODE_MASK
        if mtime is not None:
            message["mtime"] = mtime
        return self._begin(_Request(remote), requesting.AwaitingDone(), message)

    # -- managing files (docs/protocol.md section 7.10): each fires with its answer

    def remove(self, remote, recursive=False):
        """Fires with the number of names removed."""
        return self._change(remote, {"type": "remove", "path": remote, "recursive": recursive})

    def rmdir(self, remote):
        return self._change(remote, {"type": "rmdir", "path": remote})

    def rename(self, remote, to, force=False):
        return self._change(remote, {"type": "rename", "path": remote, "to": to, "force": force})

    def chmod(self, remote, mode):
        return self._change(remote, {"type": "chmod", "path": remote, "mode": mode & files.MODE_MASK})

    def _change(self, remote, message):
        return self._begin(_Request(remote), requesting.AwaitingChange(), message)

    def hash(self, remote):
        """Fires with {"name", "size", "mtime", "sha1"} of the remote file, as the server hashed it."""
        return self._begin(_Request(remote), requesting.AwaitingDigest(), {"type": "hash", "path": remote})

    def space(self):
        """Fires with the space of our root: {"total", "free", "files_free"} and any quotas."""
        return self._begin(_Request(""), requesting.AwaitingSpace(), {"type": "space"})

    def get(self, remote, local, progress=None, resume=True):
        """Download `remote` to the path `local` through `local`.part, resuming from what the
        part file holds when the server's file still starts with it. Fires with
        {"remote", "path", "size", "sha1", "resumed_from", "seconds"} (seconds from its first
        byte: requests sent ahead wait their turn before it)."""
        try:
            part = files.PartFile(
                local, local + files.CLIENT_PART_SUFFIX, local, lock=True, private=True,
                write_in_place=self.WRITE_IN_PLACE, local=True,
            )
        except EketwistError as error:
            return fail(error)
        request = _Request(remote, progress, local=local, prefix_sha1=None)
        request.part = part
        if not (resume and part.size):
            part.restart()
            return self._begin(request, requesting.AwaitingFile(0), {"type": "get", "path": remote})
        # Our .part's prefix is hashed (in a thread: our own disk) before the GET goes out; the
        # GET keeps its place among the requests meanwhile.
        deferred = self._begin(request, None, None)
        hashed = threads.deferToThread(part.prefix_hasher())

        def ask(sha1):
            request.prefix_sha1 = sha1
            message = {"type": "get", "path": remote}
            offset = 0
            if sha1 is not None:
                offset = part.size
                message.update(offset=offset, sha1=sha1.hexdigest())
            self._prepared(request, requesting.AwaitingFile(offset), message)

        hashed.addCallback(ask).addErrback(self._internal_failure)
        return deferred

    def _file_header(self, header):
        request = header.request
        if header.offset:
            request.part.resume(request.prefix_sha1)  # the offset we asked for: checked
        else:
            request.part.restart()  # nothing held, or the file changed on the server: start over
        request.size, request.mtime, request.mode = header.size, header.mtime, header.mode
        request.resumed_from = header.offset
        request.began = time.monotonic()
        request.progress.start(request.remote, request.size, initial=header.offset)

    def _file_end(self, end):
        """The whole file has come: verified here (a mismatch ends the connection), then made
        durable under its name with the other files verified meanwhile, while the next
        answers are read."""
        request = end.request
        part, request.part = request.part, None
        digest = part.verify(request.size, end.sha1)
        self.requesting.finish(request)
        self._ready()
        request.progress.close()
        result = {"remote": request.remote, "path": request.local, "size": request.size, "sha1": digest,
                  "resumed_from": request.resumed_from, "seconds": time.monotonic() - request.began}
        committed = self.committer.commit(part, request.mtime, request.mode)
        committed.addCallbacks(lambda _: request.deferred.callback(result), request.deferred.errback)

    def put(self, local, remote, progress=None, force=False):
        """Upload the file `local` to `remote`, resuming a partial upload the server holds
        for us when it starts with the same bytes as ours. Fires with
        {"remote", "path", "size", "sha1", "resumed_from", "seconds"} (seconds from its first
        byte: requests sent ahead wait their turn before it)."""
        try:
            handle = open(local, "rb", buffering=0)
        except OSError as problem:
            return fail(LocalIOError(f"local {local}: cannot read it: {problem.strerror}"))
        st = os.fstat(handle.fileno())
        if not stat_module.S_ISREG(st.st_mode):
            handle.close()
            return fail(LocalIOError(f"local {local}: not a regular file"))
        request = _Request(remote, progress, local=local, size=st.st_size, resumed_from=0)
        request.handle = handle
        message = {
            "type": "put", "path": remote, "size": st.st_size, "mtime": st.st_mtime,
            "mode": st.st_mode & files.MODE_MASK, "force": force,
        }
        if self.pipelined and st.st_size <= self.INLINE_UPLOAD_MAX:
            message["inline"] = True
            state = requesting.SendingInline(st.st_size)
            return self._begin(request, state, message, then=lambda: self._send_inline(request))
        # READY comes first, then our UPLOAD and DATA: nothing else goes out meanwhile.
        return self._begin(request, requesting.AwaitingReady(st.st_size), message, then=lambda: self._hold_sending(request))

    def _send_inline(self, request):
        """Version 2: the file right behind its PUT, then END; STORED (or a refusal) comes in
        order with the answers to the requests before it."""
        self._hold_sending(request)
        request.streaming, request.refused = True, False
        request.resumed_from = 0
        request.began = time.monotonic()
        request.progress.start(request.remote, request.size)
        sha1 = hashlib.sha1()

        def sent(nbytes):
            request.streaming = False
            if self.closing:
                return
            request.sha1 = sha1.hexdigest()
            self.send_control({"type": "end", "size": nbytes, "sha1": request.sha1})
            if not request.refused:
                self._awaiting(request, requesting.AwaitingStored(request.size, request.sha1))
            else:  # its answer has come
                request.handle.close()
                request.handle = None
            self._release_sending(request)

        send_file(self, request.handle, 0, sha1, self._chunk_sent(request)).addCallbacks(sent, lambda _: None)

    def _chunk_sent(self, request):
        def chunk_sent(nbytes):
            self.resetTimeout()  # progress, although the server says nothing while we send
            request.progress.update(nbytes)

        return chunk_sent

    def _offered(self, offer):
        request, offset = offer.request, offer.offset
        if not offset:
            self._upload_from(request, 0, hashlib.sha1())
            return
        self.setTimeout(None)  # hashing our own file: nothing is owed by the server meanwhile
        hashed = threads.deferToThread(files.hash_file_prefix, request.local, offset)

        def compared(ours):
            if self.closing or self.requesting.current is None or self.requesting.current.request is not request:
                return
            if ours is not None and hmac.compare_digest(ours.digest(), offer.sha1):
                self._upload_from(request, offset, ours)
            else:
                self._upload_from(request, 0, hashlib.sha1())

        hashed.addCallback(compared).addErrback(self._internal_failure)

    def _upload_from(self, request, offset, sha1):
        self._awaiting(request, requesting.Sending(request.size), {"type": "upload", "offset": offset})
        request.resumed_from = offset
        request.began = time.monotonic()
        request.progress.start(request.remote, request.size, initial=offset)

        def sent(nbytes):
            if self.closing or self.requesting.current is None or self.requesting.current.request is not request:
                return
            request.sha1 = sha1.hexdigest()
            end = {"type": "end", "size": offset + nbytes, "sha1": request.sha1}
            self._awaiting(request, requesting.AwaitingStored(request.size, request.sha1), end)
            self._release_sending(request)

        send_file(self, request.handle, offset, sha1, self._chunk_sent(request)).addCallbacks(sent, lambda _: None)

    def _stored(self, stored):
        request = stored.request
        request.handle.close()
        request.handle = None
        self._complete(
            request,
            {"remote": request.remote, "path": request.local, "size": stored.size,
             "sha1": request.sha1, "resumed_from": request.resumed_from,
             "seconds": time.monotonic() - request.began},
        )

    _ANSWER_HANDLERS = {
        requesting.Answered: _answered,
        requesting.Refused: _refused,
        requesting.Failed: _server_failed,
        requesting.FileHeader: _file_header,
        requesting.FileEnd: _file_end,
        requesting.Offered: _offered,
        requesting.Stored: _stored,
    }

    # -- failures

    def peer_error(self, message):
        """An ERROR in the handshake: it ends the connection."""
        self._fail_pending(errors.from_wire(message))
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

    def interrupt(self, error):
        """The user stopped the command (a signal, a closed output): what has come is kept
        for a resume, and the server is told nothing more than a closed connection."""
        if self.closing:
            return
        self._fail_pending(error)
        self.close()

    def _fail_pending(self, error):
        if self._end_reason is None:
            self._end_reason = error
        unsent = self.outbox.abandon()
        for request in [*(self.requesting.abandon() if self.requesting is not None else ()), *unsent]:
            request.cleanup(keep_part=isinstance(error, _KEEP_PART) and _has_data(request))
            self._later(request.deferred, error)
        self._settle_authentication(error)

    def connectionLost(self, reason):
        self.setTimeout(None)
        super().connectionLost(reason)
        self._password = None
        before_answer = self.requesting is None and isinstance(self.prover.state, prover.AwaitingParams)
        self._fail_pending(_lost_because(reason, self.transport, before_answer))


def _unsendable(message):
    """The error of a message that cannot be sent: a name that is not UTF-8 (a local file's
    name, or an argument, in another encoding), which JSON cannot carry; else None."""
    for value in message.values():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                return LocalIOError(f"{shown}: the name is not UTF-8, which the protocol needs")
    return None


def _lost_because(reason, transport, before_answer):
    """The error a lost connection reports: TLS failures say which one it is;
    `before_answer`: the server closed before its first message."""
    kind = getattr(reason, "type", None)
    module = kind.__module__ if kind is not None else ""
    if module.startswith("service_identity"):
        return _name_mismatch(reason.value)
    if module.startswith("OpenSSL"):
        return ConnectionFailed(_tls_failure(reason.value))
    if before_answer and not ISSLTransport.providedBy(transport):
        return ConnectionFailed("the server closed the connection before answering (if that port serves TLS, connect with TLS: --tls)")
    return ConnectionFailed("the connection to the server was lost")


def _tls_failure(error):
    # pyOpenSSL's errors carry OpenSSL's (library, function, reason) triples.
    triples = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = "; ".join(str(triple[-1]) for triple in triples if triple) or str(error)
    if "certificate verify failed" in reasons:
        return (
            "TLS failed: the server's certificate could not be verified: it is not signed by an authority "
            "you trust, or it has expired (a private authority: give its certificate with --ca-file)"
        )
    if any(sign in reasons for sign in ("wrong version number", "packet length too long", "record layer failure",
                                        "unexpected eof", "http request")):
        return "TLS failed: the server does not speak TLS on this port (leave out --tls)"
    return f"TLS failed: {reasons}"


def _name_mismatch(error):
    """The name the certificate failed (the client's edge adds the names it holds)."""
    asked = []
    for mismatch in getattr(error, "errors", ()):
        wanted = getattr(mismatch, "mismatched_id", None)
        name = getattr(wanted, "hostname", None) or getattr(wanted, "ip", None)
        if name is not None:
            asked.append(name.decode("ascii", "replace") if isinstance(name, bytes) else str(name))
    return errors.NameMismatch(f"TLS failed: the server's certificate is not for {' or '.join(asked) or 'this host name'}")
