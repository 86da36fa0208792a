"""The server's Protocol and its factory: Twisted glue around two machines without I/O,
verifier.Verifier (the SPAKE2+ Verifier) and serving.Serving (the requests), and a storage.Root
(the user's view of the disk) handed over at key confirmation.

What the glue adds to the machines, state by state (docs/protocol.md, section 9):
  hello, delaying  the guard decides whether PARAMS waits (recent failures, the handshake budget)
  share, share-waiting   the guard's guess slots: a share waits for one of its address's slots
  confirm          a failed or abandoned guess is counted, however the connection ends
  ready            the idle timeout; refusals leave the connection ready
  working          a FileSender or a listing producer drives the transport; prefix hashing, a
                   recursive removal or a HASH in a thread
  upload-offered, receiving   the part file, write-behind and its back-pressure
  storing          the commit in a thread; a message meanwhile is answered after STORED
  (version 2)      no storing: after END the upload joins files.GroupCommit, its answer owed
                   in order (answer_in_turn, answers_ready) while the next requests are read
"""

import gc
import os
import socket
import time

from twisted.internet import defer, protocol, threads
from twisted.internet.interfaces import IPushProducer
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from . import files, guard, quotas, realm, serving, storage, transfers, tuning, userdb, verifier, wire
from .connection import SecureConnection, StopReading
from .errors import (
    MANAGE_REFUSAL_CODES,
    REFUSAL_CODES,
    WRITE_REFUSAL_CODES,
    AuthenticationFailed,
    EketwistError,
    IntegrityError,
    LockedOut,
    NoSpace,
    ProtocolError,
    Timeout,
    TryLater,
    wire_code,
)
from .logs import SafeLogger
from .storage import IStorage
from .verifier import Verifier

DEFAULT_HANDSHAKE_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 600.0
DEFAULT_PARTIAL_MAX_AGE = 7 * 24 * 3600.0
# Seconds a connection cut at shutdown has to deliver its ERROR before it is aborted.
CUT_DELAY = 1.0


@implementer(IPushProducer)
class ServerProtocol(SecureConnection, TimeoutMixin):
    """The glue between the client's frames and the server's two machines (verifier.Verifier,
    then serving.Serving): it feeds them decoded messages, sends what they return, and does
    what they cannot: the guard's waits, timeouts, the storage object, threads and producers.

    Also the producer of its own replies: when the client does not read them, the transport
    pauses us and we stop reading its requests, so nothing piles up in memory."""

    log = SafeLogger()
    # Version 2: requests served from one read before the rest wait for a later turn of the
    # reactor (fairness between connections; see control_received).
    REQUESTS_PER_TURN = 16
    PEER = "client"

    def connectionMade(self):
        super().connectionMade()
        # The client's real address is known from the start (behind HAProxy, eketwist.proxy
        # connects us only once the PROXY header has given it): every per-address limit
        # applies from accept, silent connections included.
        address = self.transport.getPeer()
        self.peer = _describe_peer(address)
        self.source = None
        self.username = None
        self.root = None
        self.storage = None  # the user's avatar (a storage.Root), from key confirmation on
        self._logout = None
        self.verifier = Verifier(self.factory.server_id, self.factory.users.current, self.factory.versions)
        self.serving = None  # the request machine, from key confirmation on
        self.upload_in_progress = None  # its transfers.Upload, from PUT to the answer
        self._next_request = None  # version 2: a request that waits for the one before
        self._requests_this_turn = 0
        self.owed = transfers.OwedAnswers(self)  # version 2: answers owed while uploads commit
        self.committer = files.GroupCommit(lambda *args: threads.deferToThread(*args))
        self._delayed = None
        self._admitted = False
        self._in_handshake = True
        self.callLater = self.factory.clock.callLater
        source = guard.source_key(getattr(address, "host", None) or str(address))
        try:
            self.factory.guard.admit_connection()
            try:
                self.factory.guard.admit_source(source)
            except guard.Refused:
                self.factory.guard.closed(None, in_handshake=True)
                raise
        except guard.Refused as refusal:
            self._turn_away(refusal)
            return
        self.source = source
        self._admitted = True
        self.factory.connections.add(self)
        self.log.info("connection from {peer}", peer=self.peer)
        self.transport.registerProducer(self, True)
        # A slow client cannot keep a handshake slot: this deadline is never reset by data.
        self.setTimeout(self.factory.handshake_timeout)

    @property
    def state(self):
        """The state's name, as docs/protocol.md section 9 gives it."""
        if self.closing:
            return "closed"
        if self.serving is not None:
            return self.serving.name
        return verifier.state_name(self.verifier.state)

    def _turn_away(self, refusal):
        self.closing = True
        self.verifier.fail()
        if self.factory.log_limiter.allow(refusal.log_key):
            self.log.warn("refused a connection from {peer}: {reason}", peer=self.peer, reason=refusal.reason)
        if refusal.quiet:
            self.transport.abortConnection()  # a flood: spend nothing more on it
        else:
            error = (LockedOut if refusal.locked_out else TryLater)(refusal.reason)
            error.retry_after = refusal.retry_after
            self.send_error(error)
            self.transport.loseConnection()

    # -- back-pressure on our replies (IPushProducer, registered with our own transport)

    def pauseProducing(self):
        self.hold_reading("replies")

    def resumeProducing(self):
        self.release_reading("replies")

    def stopProducing(self):
        pass

    def dataReceived(self, data):
        if self.serving is not None and isinstance(self.serving.state, (serving.Ready, serving.Receiving)):
            self.resetTimeout()
        self._requests_this_turn = 0  # a new turn of the reactor (see control_received)
        super().dataReceived(data)

    def timeoutConnection(self):
        phase = "handshake" if not self.authenticated else "idle"
        self.log.info("closing {phase} connection from {peer}: timed out", phase=phase, peer=self.peer)
        self.fail(Timeout(f"{phase} timeout"))

    def connectionLost(self, reason):
        self.setTimeout(None)
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()
        if self.verifier.guessing:
            # Our share answered a guess that was never confirmed: a failure, however the
            # connection ended.
            self._log_auth_failure()
        if isinstance(self.verifier.state, verifier.ShareWaiting):
            self.factory.guard.stop_waiting(self.source, self._guess_slot_free)
        self.verifier.fail()
        self._abort_upload(keep_part=True, why="connection lost")
        if self._logout is not None:
            self._logout()
        super().connectionLost(reason)
        if self._admitted:
            self.factory.connections.discard(self)
            self.factory.guard.closed(self.source, in_handshake=self._in_handshake)
            if self.source is not None:
                self.log.info("connection from {peer} closed", peer=self.peer)

    def fail(self, error):
        if not self.closing and not isinstance(error, Timeout):
            self.log.info("closing connection from {peer}: {error}", peer=self.peer, error=error.message)
        # Bad data or a full disk: the partial upload is worth nothing, or in the way.
        self._abort_upload(keep_part=not isinstance(error, (IntegrityError, NoSpace)), why=error.message)
        super().fail(error)

    def peer_error(self, message):
        code = str(message.get("code"))[:40]
        if not self.verifier.guessing:  # after our share, connectionLost logs the failure
            self.log.info("client {peer} reported an error: {code}", peer=self.peer, code=code)
        self.close()

    def _log_auth_failure(self):
        self.verifier.fail()
        self.log.warn("authentication failed for {user} from {peer}", user=self.username, peer=self.peer)
        guard_ = self.factory.guard
        lockout = guard_.guess_failed(self.source, self.username)
        if lockout:
            self.log.warn(
                "locking out {source} for {seconds:.0f} s after {count} failed logins",
                source=self.source, seconds=lockout, count=guard_.policy.max_source_failures,
            )


    # -- handshake: the verifier says what to send, the guard says when

    def handshake_received(self, message):
        if message["type"] == "error":
            self.peer_error(message)
            return
        guessing = self.verifier.guessing
        try:
            event = self.verifier.receive(message)
        except AuthenticationFailed:
            if guessing:  # a wrong confirmation (or an unknown name): the guess failed
                self._log_auth_failure()
            raise
        if isinstance(event, verifier.Hello):
            self._hello(event.name)
        elif isinstance(event, verifier.Share):
            self._share()
        else:
            self._confirmed(event)

    def _hello(self, name):
        self.username = name
        # Recent failures from this source or for this name (known or not) slow the answer,
        # and so does a source past its budget of handshakes (the share costs CPU).
        guard_ = self.factory.guard
        try:
            budget = guard_.handshake_delay(self.source)
        except guard.Refused as refusal:
            self._turn_away(refusal)
            return
        delay = max(guard_.delay_before_answer(self.source, name), budget)
        if delay > 0:
            self.verifier.wait()
            self._delayed = self.callLater(delay, self._send_params)
        else:
            self._send_params()

    def _send_params(self):
        self._delayed = None
        if self.closing:  # timed out or shut down while it waited: the ERROR was the answer
            return
        # How long this address's next login would wait if this one fails: a client that asks
        # again for a mistyped password can say so (it would measure it anyway).
        retry_delay = self.factory.guard.delay_after_failure(self.source, self.username)
        self.send_handshake(self.verifier.params(retry_delay))

    def _share(self):
        guard_ = self.factory.guard
        try:
            # Locked out since its HELLO (by its other connections): no answer to this guess.
            guard_.check_source(self.source)
        except guard.Refused as refusal:
            self._turn_away(refusal)
            return
        if not guard_.take_guess_slot(self.source):
            # As many guesses from this address in flight as it may still fail: this one
            # waits for one to settle (the handshake timeout runs meanwhile).
            self.verifier.wait()
            guard_.wait_for_guess_slot(self.source, self._guess_slot_free)
            return
        self._answer_share()

    def _guess_slot_free(self):
        if not self.closing and isinstance(self.verifier.state, verifier.ShareWaiting):
            self._share()  # checked again: the address may have been locked out meanwhile
        else:
            self.factory.guard.wake_next_waiter(self.source)  # closing: the slot is another's

    def _answer_share(self):
        # From our share on, the client can check its guess: it holds its slot until a valid
        # confirmation frees it; every other ending records a failure.
        try:
            reply = self.verifier.answer()
        except ProtocolError as error:
            self.factory.guard.guess_abandoned(self.source)
            self.fail(error)
            return
        self.send_handshake(reply)

    def _confirmed(self, confirmed):
        user = confirmed.user
        self.start_records(confirmed.shared_key, is_client=False)
        self._in_handshake = False
        self.factory.guard.authenticated(self.source)
        self.factory.guard.guess_confirmed(self.source, user.name)
        self.verifier.forget_keys()
        # The user's view of the server, their avatar: their root and their rights, nothing
        # else. OK goes out once it is there (at once with eketwist's realm).
        login = self.factory.portal.login(realm.KeyConfirmed(user), None, IStorage)
        login.addCallback(self._logged_in, user, confirmed.reply).addErrback(self.internal_failure)

    def _logged_in(self, avatar, user, reply):
        _, self.storage, self._logout = avatar
        if self.closing:
            return
        self.root = self.storage.path
        self.serving = serving.Serving(self.verifier.version)
        self.send_handshake(reply)
        self.log.info(
            "{user} authenticated from {peer} ({rights}, root {root})",
            user=user.name, peer=self.peer, rights=user.rights, root=self.root,
        )
        self.answered()

    # -- requests: the serving machine checks them, a transfers object or the storage carries them out

    def control_received(self, message):
        if message["type"] == "error":
            self.peer_error(message)
            return
        if self.serving.version >= 2 and isinstance(self.serving.state, serving.Ready):
            self._requests_this_turn += 1
            if self._requests_this_turn > self.REQUESTS_PER_TURN:
                # Requests answered at once (STAT, MKDIR, refusals) would otherwise all be
                # served from one read: the rest wait for a later turn, as other clients do.
                self._next_request = message
                self.callLater(0, self._take_next_request)
                return True
        event = self.serving.receive(message, crowded=self._crowded())
        if isinstance(event, serving.Wait):
            # Pipelined (version 2): this request waits for the answer to the one before.
            self._next_request = message
            return True  # the frames after it wait too (see SecureConnection.resume_frames)
        # True: the request waits for the count of the user's quota; the frames after it too.
        return bool(self._REQUEST_HANDLERS[type(event)](self, event))

    def data_received(self, chunk):
        event = self.serving.data(len(chunk))
        if isinstance(event, serving.Dropped):
            return
        if event is not None:
            self._hold_early_message()
        self.receive_into(self.upload_in_progress.part, chunk)

    def file_bytes_expected(self):
        return self.serving.bytes_owed() if self.serving is not None else 0

    def incoming_file(self):
        state = self.serving.state if self.serving is not None else None
        return self.upload_in_progress if isinstance(state, serving.Receiving) else None

    def _hold_early_message(self, event=None):
        """Something came before STORED: nothing more is read; the answer, then the error."""
        self.hold_reading("early message")
        raise StopReading()

    def answered(self):
        """The request has its answer: ready for the next one (with the idle timeout), or, for
        a message that came before an upload's answer, the protocol error it earned."""
        self.upload_in_progress = None
        early = self.serving.done()
        if self.closing:
            return
        if early is not None:
            self.fail(early)
        elif self.factory.draining and not self.owed:
            self.shut_down()
        else:
            # While uploads are committed the client waits for us: no idle timeout then.
            self.setTimeout(None if self.owed else self.factory.idle_timeout)
            if self._next_request is not None:
                # On a later turn: a client with many requests queued takes its turn with
                # every other connection, one request at a time.
                self.callLater(0, self._take_next_request)

    def _take_next_request(self):
        self._requests_this_turn = 0
        message, self._next_request = self._next_request, None
        if self.closing or message is None:
            return
        self.guarded(self._next_request_received, message)

    def _next_request_received(self, message):
        if not self.control_received(message):
            self.resume_frames()

    @property
    def uploading(self):
        """From PUT to STORED, a refusal or the end of the connection."""
        return self.serving is not None and (self.serving.upload is not None or self.serving.committing > 0)

    @property
    def storing(self):
        """Committing an upload after its END (in a thread): it ends with STORED or an ERROR."""
        return self.serving is not None and (isinstance(self.serving.state, serving.Storing) or self.serving.committing > 0)

    @property
    def busy(self):
        """In the middle of a transfer or a listing, which a graceful shutdown lets finish."""
        return self.serving is not None and (
            not isinstance(self.serving.state, (serving.Ready, serving.Closed)) or bool(self.owed)
        )

    def shut_down(self):
        """Close for a shutdown, telling the client why (it may come back and resume)."""
        if not self.closing:
            self.log.info("closing connection from {peer}: the server is shutting down", peer=self.peer)
            self.send_error(TryLater("the server is shutting down; try again shortly"))
            self.close()

    def cut(self, error):
        """End the connection now (a shutdown's grace is over): the ERROR says why, and the
        connection is aborted a moment later whether or not the client read it."""
        self.fail(error)
        self.callLater(CUT_DELAY, self.transport.abortConnection)

    # -- what a transfers object asks of the connection

    def working(self):
        """Sending a file or a listing, or hashing for a resume: the idle timeout runs, and
        each record or batch that leaves resets it. A client that stops reading holds the
        file (or the directory) and a record only until then."""
        self.setTimeout(self.factory.idle_timeout)

    def refuse(self, what, requested, error, refusals=REFUSAL_CODES):
        """A request failed: a refusal (one of `refusals`, which depend on the request,
        docs/protocol.md section 3.7) leaves the connection usable; anything else (a disk's
        I/O error is "internal" to the client) ends it."""
        self.log_event("{what} {path} refused: {error}", what=what, path=requested, error=error.message)
        if wire_code(error) not in refusals:
            self.fail(error)
        elif not self.closing:
            if self.owed:  # after the answers still owed for uploads being committed
                self.owed.refusal(error)
            else:
                self.send_error(error)
            self.answered()

    def _crowded(self):
        """Version 2: no further upload starts beside those being committed: answers owed are
        at this connection's bound, the server's are at its own, or the server is draining."""
        return (
            len(self.owed) >= self.serving.MAX_COMMITTING
            or self.factory.committing >= self.factory.COMMITTING_LIMIT
            or self.factory.draining
        )

    def answer_in_turn(self, upload):
        """Version 2: `upload` (a transfers.Upload past its END) is committed while the next
        requests are read; its answer goes out after those owed before it (answers_ready)."""
        self.upload_in_progress = None
        self.owed.upload(upload)
        self.setTimeout(None)  # the client waits for our disk, not the reverse

    def answers_ready(self):
        """An upload's commit is over: the answers now known go out, and the next request
        may come in."""
        self.owed.send_ready()
        if self.closing:
            return
        if not self.owed:
            self.setTimeout(self.factory.idle_timeout)
            if self.factory.draining and not self.busy:
                self.shut_down()
                return
        if self._next_request is not None:
            self.callLater(0, self._take_next_request)

    def internal_failure(self, failure):
        self.log.failure("internal error serving {user}", failure, user=self.username)
        self.fail(EketwistError("internal error"))

    def log_event(self, format, **fields):
        """A line about this user's request: '{user} from {peer}: ' and `format`."""
        self.log.info("{user} from {peer}: " + format, user=self.username, peer=self.peer, **fields)

    def release_transport(self):
        """Make way for a file or listing producer to drive the transport; reading resumes
        meanwhile (anything the client sends now is a protocol error anyway)."""
        self.transport.unregisterProducer()
        self.release_reading("replies")

    def take_transport_back(self):
        if not self.closing:
            self.stop_sending()
            self.transport.registerProducer(self, True)

    def offer(self, offset, sha1_hex):
        """READY for the upload in progress: its partial file holds `offset` bytes."""
        self.setTimeout(self.factory.idle_timeout)
        self.send_control(self.serving.offer(offset, sha1_hex))

    # -- the requests

    def _unknown(self, request):
        self.send_error(request.error)

    def _get(self, request):
        transfers.Download.start(self, request)

    def _list(self, request):
        transfers.Listing.start(self, request)

    def _stat(self, request):
        try:
            entry = self.storage.stat(request.path)
        except EketwistError as error:
            self.refuse("stat", request.path, error)
            return
        self.send_control({"type": "entry", "entry": entry})

    def _make_directory(self, request):
        try:
            created = self.storage.make_directory(request.path, request.mode, request.mtime)
        except EketwistError as error:
            self.refuse("mkdir", request.path, error, WRITE_REFUSAL_CODES)
            return
        self.send_control({"type": "done"})
        if created:  # not again when a tree upload gives it its mode and time
            self.log_event("made the directory {path}", path=request.path)

    def _remove(self, request):
        if request.recursive:
            transfers.Removal.start(self, request)  # a whole tree: in a thread
            return
        try:
            removed = self.storage.remove(request.path, user=self.username)
        except EketwistError as error:
            self.refuse("remove", request.path, error, MANAGE_REFUSAL_CODES)
            return
        self.freed(removed)
        self.send_control({"type": "done", "removed": removed.names})
        self.log_event("removed {path} ({count} name)", path=request.path, count=removed.names)

    def _remove_directory(self, request):
        try:
            removed = self.storage.remove_directory(request.path)
        except EketwistError as error:
            self.refuse("rmdir", request.path, error, MANAGE_REFUSAL_CODES)
            return
        self.send_control({"type": "done", "removed": removed.names})
        self.log_event("removed the directory {path}", path=request.path)

    def _rename(self, request):
        try:
            replaced = self.storage.rename(request.path, request.to, request.force, self.username)
        except EketwistError as error:
            self.refuse("rename", f"{request.path} -> {request.to}", error, MANAGE_REFUSAL_CODES)
            return
        self.freed(replaced)
        self.send_control({"type": "done", "removed": 0})
        self.log_event(
            "renamed {path} to {to}{replacing}", path=request.path, to=request.to,
            replacing=" (force)" if request.force else "",
        )

    def _change_mode(self, request):
        try:
            self.storage.change_mode(request.path, request.mode)
        except EketwistError as error:
            self.refuse("chmod", request.path, error, MANAGE_REFUSAL_CODES)
            return
        self.send_control({"type": "done", "removed": 0})
        self.log_event("changed the mode of {path} to {mode:04o}", path=request.path, mode=request.mode & 0o777)

    def freed(self, removed):
        """A change took `removed` (a storage.Removed) off the disk: the root's usage is less."""
        if self.storage.quota is not None:
            self.storage.quota.freed(removed)

    def _hash(self, request):
        transfers.Hashing.start(self, request)

    def _when_counted(self, handler, request):
        """Run `handler(request)` once the user's usage is counted (their quotas need it): at
        once, or, returning True, later, the client's next messages held meanwhile. Nothing
        else waits: other users, and this user's requests that need no count."""
        quota = self.storage.quota
        if quota is None or quota.counted:
            handler(self, request)
            return False
        self.setTimeout(None)  # the client waits for our disk

        def counted(_):
            if self.closing:
                return
            self.guarded(handler, self, request)
            if not self.closing:
                self.resume_frames()

        quota.when_counted().addCallback(counted).addErrback(self.internal_failure)
        return True

    def _space(self, request):
        return self._when_counted(ServerProtocol._answer_space, request)

    def _answer_space(self, request):
        try:
            space = self.storage.space()
        except EketwistError as error:
            self.refuse("space", ".", error)
            return
        if self.storage.quota is not None:
            space.update(self.storage.quota.space())
        self.send_control({"type": "space", **space})
        if self.serving.version == 1 or not self.owed:
            self.setTimeout(self.factory.idle_timeout)

    def receive_inline(self):
        """An inline upload's partial file is open: its DATA follows the PUT (version 2)."""
        self.serving.receive_inline()
        self.setTimeout(self.factory.idle_timeout)

    def _dropped(self, event):
        pass  # the refused inline upload's END: its refusal was the answer

    def _put(self, request):
        return self._when_counted(ServerProtocol._open_upload, request)

    def _open_upload(self, request):
        self.upload_in_progress = transfers.Upload.open(self, request.upload)
        if self.upload_in_progress is not None:
            self.upload_in_progress.start()

    def _upload_from(self, step):
        self.upload_in_progress.receive_from(step.offset)

    def _finish(self, step):
        self.upload_in_progress.finish(step.size, step.sha1)

    def _abort_upload(self, keep_part, why):
        """The connection ends: an upload before its END keeps its partial file for a resume,
        or loses it (after END the commit in its thread finishes the upload)."""
        if self.serving is None:
            return
        upload = self.upload_in_progress
        finishing = isinstance(self.serving.state, serving.Storing)
        self.serving.close()
        if upload is not None and not finishing:
            upload.abort(keep_part, why)

    _REQUEST_HANDLERS = {
        serving.Get: _get,
        serving.Stat: _stat,
        serving.List: _list,
        serving.MakeDir: _make_directory,
        serving.Put: _put,
        serving.Remove: _remove,
        serving.RemoveDirectory: _remove_directory,
        serving.Rename: _rename,
        serving.ChangeMode: _change_mode,
        serving.Hash: _hash,
        serving.Space: _space,
        serving.Unknown: _unknown,
        serving.UploadFrom: _upload_from,
        serving.Finish: _finish,
        serving.Early: _hold_early_message,
        serving.Dropped: _dropped,
    }


def _describe_peer(address):
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else str(address)


class ServerFactory(protocol.Factory):
    protocol = ServerProtocol
    noisy = False
    # A download holds about one record in memory (more when its reader is slow). Records are
    # 2 MiB while few downloads run (fastest), and shrink as more run, down to 256 KiB: what
    # records in flight hold stays near this budget, however many downloads run at once.
    RECORD_BUDGET = 64 * 1024 * 1024
    MIN_RECORD = 256 * 1024
    QUIET_BEFORE_TRIM = 1.0
    # Version 2: uploads past their END waiting for their commit, in all connections, beyond
    # which a connection takes no further upload until its own are answered (each holds a
    # part file's descriptors; see serving.Serving.MAX_COMMITTING for one connection's share).
    COMMITTING_LIMIT = 256
    # Files read whole for HASH at once, server-wide: each holds a thread of the reactor's pool
    # (10) for as long as its disk takes, and commits need the others.
    HASHING_LIMIT = 2
    # The protocol versions this server speaks (a test makes one that speaks only version 1,
    # as an older eketwist did).
    versions = wire.VERSIONS
    log = SafeLogger()

    def __init__(
        self,
        root,
        users_path,
        server_id=None,
        handshake_timeout=DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout=DEFAULT_IDLE_TIMEOUT,
        max_upload_size=None,
        partial_max_age=DEFAULT_PARTIAL_MAX_AGE,
        policy=None,
        clock=None,
        protected_paths=(),
    ):
        from twisted.internet import reactor

        self.root = os.path.abspath(root)
        self.users = userdb.UsersStore(users_path, ServerProtocol.log)
        # Never served nor replaced through a root, whatever leads to them.
        self.protected_paths = [users_path, *protected_paths]
        self.server_id = server_id or socket.gethostname()
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_upload_size = max_upload_size
        # What the roots of users with quotas hold (docs/protocol.md section 7.7), counted from
        # the disk now and when a reload gives a quota on a root not yet counted.
        self.accounts = quotas.Accounts(threads.deferToThread, self.log)
        self.track_quota_roots(self.users.users)
        self.users.reloaded = self.track_quota_roots
        # Who an authenticated user is on the disk: twisted.cred's realm gives their avatar.
        self.portal = realm.users_portal(self.root, self.protected, max_upload_size, self.accounts)
        self.partial_max_age = partial_max_age
        self.clock = clock or reactor
        self.guard = guard.Guard(policy, self.clock)
        self.digests = files.DigestCache()
        self.connections = set()
        self.downloads = 0
        self._trim_call = None
        self.draining = False
        self.committing = 0  # uploads past END awaiting their commit, in all connections
        self.hashing = defer.DeferredSemaphore(self.HASHING_LIMIT)  # HASH requests reading
        self._hashing_by_user: dict = {}  # one HASH at a time per user (hash_in_turn)
        self.log_limiter = guard.LogLimiter(self.clock)

    def transfer_over(self):
        """Once no transfer has run for QUIET_BEFORE_TRIM seconds, hand the memory their
        records used back to the system (measured with make hostile: after 100 slow readers
        left, the daemon held 189 MiB without this, 55 MiB with it; 51 MiB before)."""
        if self._quiet() and (self._trim_call is None or not self._trim_call.active()):
            self._trim_call = self.clock.callLater(self.QUIET_BEFORE_TRIM, self._trim_when_quiet)

    @property
    def uploads(self):
        """Uploads running now (counted when needed: unlike downloads, no record size
        depends on it)."""
        return sum(1 for connection in self.connections if connection.uploading)

    def _quiet(self):
        return self.downloads == 0 and self.uploads == 0

    def _trim_when_quiet(self):
        if self._quiet():
            # Closed connections can linger in reference cycles (Failures keep frames) with
            # their buffers until the collector's next full pass: run it first.
            gc.collect()
            tuning.release_free_memory()

    def record_size(self):
        """The size of a download's next record: its share of RECORD_BUDGET, within bounds."""
        share = self.RECORD_BUDGET // max(1, self.downloads)
        return max(self.MIN_RECORD, min(wire.DATA_CHUNK, share))

    def drain(self, grace):
        """Stop serving: close idle connections now, let running transfers finish for up to
        `grace` seconds, then cut the rest, telling each client why. Fires when every
        connection is closed."""
        from twisted.internet import defer

        self.draining = True
        for connection in list(self.connections):
            if not connection.busy:
                connection.shut_down()
        if not self.connections:
            return defer.succeed(None)
        self.log.info("waiting up to {grace:g} s for {count} transfers to finish", grace=grace, count=len(self.connections))
        # Observers of each connection's end, leaving its own Deferred's result alone.
        ends = []
        for connection in self.connections:
            end = defer.Deferred()
            connection.when_closed.addBoth(lambda result, end=end: (end.callback(None), result)[1])
            ends.append(end)

        def cut():
            for connection in list(self.connections):
                if connection.storing:
                    continue  # bounded by the disk: its answer, then try-later (section 7.5)
                self.log.info("cutting the transfer of {peer}: grace period over", peer=connection.peer)
                connection.cut(TryLater("the server is shutting down and the transfer was cut; run the same command again to resume"))

        deadline = self.clock.callLater(grace, cut)
        everyone = defer.gatherResults(ends)
        everyone.addCallback(lambda _: deadline.cancel() if deadline.active() else None)
        return everyone

    def hash_in_turn(self, user, function, *args):
        """Run `function(*args)` in a thread for a HASH of `user`'s: one at a time per user, then
        in turn with the other users' (HASHING_LIMIT at once), so that one user cannot hold
        every turn. A user's turn is forgotten once idle (a map of every name would grow)."""
        turn = self._hashing_by_user.setdefault(user, defer.DeferredSemaphore(1))

        def forget_when_idle(result):
            if turn.tokens == turn.limit and not turn.waiting and self._hashing_by_user.get(user) is turn:
                del self._hashing_by_user[user]
            return result

        return turn.run(self.hashing.run, threads.deferToThread, function, *args).addBoth(forget_when_idle)

    def track_quota_roots(self, users):
        for user in users.by_name.values():
            if user.has_quota:
                self.accounts.track(user.root or self.root)

    def roots(self):
        """Every root a user may write to: the server's and the users' own."""
        users = self.users.current()
        return sorted({self.root, *(user.root for user in users.by_name.values() if user.root)})

    def protected(self):
        """(device, inode) of the files no request may reach: the users file and the daemon's
        own files. Looked up at each request, as a rewrite gives the users file a new inode."""
        pairs = set()
        for path in self.protected_paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            pairs.add((st.st_dev, st.st_ino))
        return pairs

    def sweep_partial_uploads(self):
        """Remove partial uploads older than partial_max_age under every root, in a thread (a
        walk over big trees would stall every client). Fires with how many were removed."""
        roots, max_age = self.roots(), self.partial_max_age

        def sweep():
            now = time.time()
            return [(root, storage.remove_stale_parts(root, max_age, now)) for root in roots]

        def swept(removals):
            for root, removed in removals:
                self.accounts.freed(root, removed)
            removed = sum(removed.names for _, removed in removals)
            if removed:
                self.log.info("removed {count} stale partial uploads", count=removed)
            return removed

        return threads.deferToThread(sweep).addCallback(swept)
