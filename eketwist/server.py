"""The server's protocol machine (SPAKE2+ Verifier, then requests) and its factory.

States and the messages each accepts (docs/protocol.md, section 9):
  hello           -> hello          : look the user up (or fake one), send params
  delaying        -> (nothing)      : recent failures for this source or user: wait, then params
  share           -> share          : send our share and confirmV (in one of the address's
                                      guess slots)
  share-waiting   -> (nothing)      : as many guesses from this address in flight as it may
                                      still fail: wait for one to settle
  confirm         -> confirm        : check confirmP; ok (records start) or auth-failed, close
  ready           -> get, list, stat, put, mkdir; other requests get "unsupported"
  working         -> (nothing)      : hashing a prefix or streaming a file to the client
  upload-offered  -> upload         : the client chose where its upload starts
  receiving       -> data, end      : an upload streams into its part file
"""

import gc
import hashlib
import hmac
import os
import socket
import time

from twisted.internet import protocol, threads
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from . import files, guard, spake2plus, storage, tuning, userdb, wire
from .connection import SecureConnection, StopReading, send_file
from .errors import (
    REFUSAL_CODES,
    AuthenticationFailed,
    EketwistError,
    IntegrityError,
    NoSpace,
    PermissionDenied,
    ProtocolError,
    Timeout,
    TooLarge,
    TryLater,
    Unsupported,
    wire_code,
)
from .logs import SafeLogger

DEFAULT_HANDSHAKE_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 600.0
DEFAULT_PARTIAL_MAX_AGE = 7 * 24 * 3600.0
# A listing is sent in CONTROL messages of at most this many bytes of entries.
LISTING_BATCH_BYTES = 48 * 1024


class Upload:
    """One upload in progress."""

    def __init__(self, part, path, size, mtime, mode, force):
        self.part = part
        self.path = path
        self.size = size
        self.mtime = mtime
        self.mode = mode
        self.force = force
        self.offered = 0
        self.prefix_sha1 = None
        self.resumed_from = 0
        self.started = time.monotonic()


@implementer(IPushProducer)
class ServerProtocol(SecureConnection, TimeoutMixin):
    """Also the producer of its own replies: when the client does not read them, the transport
    pauses us and we stop reading its requests, so nothing piles up in memory."""

    log = SafeLogger()
    PEER = "client"
    TRANSITIONS = {
        "hello": {"hello": "on_hello"},
        "delaying": {},
        "share-waiting": {},
        "share": {"share": "on_share"},
        "confirm": {"confirm": "on_confirm"},
        "ready": {"get": "on_get", "list": "on_list", "stat": "on_stat", "put": "on_put", "mkdir": "on_mkdir"},
        "working": {},
        "upload-offered": {"upload": "on_upload"},
        "receiving": {"data": "on_upload_data", "end": "on_upload_end"},
        "storing": {},
    }

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
        self.storage = None
        self.can_write = False
        self._upload = None
        self._early_message = None  # a message that came between END and our answer
        self._delayed = None
        self._guess = False  # our share answered this connection's guess, not yet settled
        self._waiting_share = None  # a share waiting for one of its address's guess slots
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
        self.state = "hello"
        self.transport.registerProducer(self, True)
        # A slow client cannot keep a handshake slot: this deadline is never reset by data.
        self.setTimeout(self.factory.handshake_timeout)

    def _turn_away(self, refusal):
        self.closing = True
        self.state = "closed"
        if self.factory.log_limiter.allow(refusal.log_key):
            self.log.warn("refused a connection from {peer}: {reason}", peer=self.peer, reason=refusal.reason)
        if refusal.quiet:
            self.transport.abortConnection()  # a flood: spend nothing more on it
        else:
            self.send_error(TryLater(refusal.reason))
            self.transport.loseConnection()

    # -- back-pressure on our replies (IPushProducer, registered with our own transport)

    def pauseProducing(self):
        self.hold_reading("replies")

    def resumeProducing(self):
        self.release_reading("replies")

    def stopProducing(self):
        pass

    def _release_transport(self):
        """Make way for a file or listing producer to drive the transport; reading resumes
        meanwhile (anything the client sends now is a protocol error anyway)."""
        self.transport.unregisterProducer()
        self.release_reading("replies")

    def _take_transport_back(self):
        if not self.closing:
            self.stop_sending()
            self.transport.registerProducer(self, True)

    def dataReceived(self, data):
        if self.authenticated and self.state in ("ready", "receiving"):
            self.resetTimeout()
        super().dataReceived(data)

    def timeoutConnection(self):
        phase = "handshake" if not self.authenticated else "idle"
        self.log.info("closing {phase} connection from {peer}: timed out", phase=phase, peer=self.peer)
        self.fail(Timeout(f"{phase} timeout"))

    def connectionLost(self, reason):
        self.setTimeout(None)
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()
        if self._guess:
            # Our share answered a guess that was never confirmed: a failure, however the
            # connection ended.
            self._log_auth_failure()
        if self._waiting_share is not None:
            self._waiting_share = None
            self.factory.guard.stop_waiting(self.source, self._guess_slot_free)
        self._abort_upload(keep_part=True, why="connection lost")
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
        if not self._guess:  # after our share, connectionLost logs the failed authentication
            self.log.info("client {peer} reported an error: {code}", peer=self.peer, code=code)
        self.close()

    def _log_auth_failure(self):
        self._guess = False
        self.log.warn("authentication failed for {user} from {peer}", user=self.username, peer=self.peer)
        guard_ = self.factory.guard
        lockout = guard_.guess_failed(self.source, self.username)
        if lockout:
            self.log.warn(
                "locking out {source} for {seconds:.0f} s after {count} failed logins",
                source=self.source, seconds=lockout, count=guard_.policy.max_source_failures,
            )

    # -- handshake

    def on_hello(self, message):
        version = wire.int_field(message, "version", -(2**63), 2**63)
        if version != wire.PROTOCOL_VERSION:
            raise Unsupported(f"protocol version {version} is not supported (this server speaks {wire.PROTOCOL_VERSION})")
        name = wire.string_field(message, "user")
        problem = userdb.check_username(name)
        if problem:
            # No such name can be registered, so saying so tells nothing about who exists.
            raise AuthenticationFailed(f"not a valid username: {problem}")
        self.username = name
        # This connection keeps the users it looked the name up in (a reload meanwhile must
        # not pair this verifier with another's points).
        self._users = self.factory.users.current()
        self._user, self._user_known = self._users.lookup(name)
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
            self.state = "delaying"
            self._delayed = self.callLater(delay, self._send_params)
        else:
            self._send_params()

    def _send_params(self):
        self._delayed = None
        if self.closing:  # timed out or shut down while it waited: the ERROR was the answer
            return
        self.state = "share"
        self.send_handshake(
            {
                "type": "params",
                "server": self.factory.server_id,
                "salt": self._user.salt.hex(),
                "scrypt": {key: self._user.scrypt[key] for key in ("n", "r", "p")},
            }
        )

    def on_share(self, message):
        self._answer_share(wire.hex_field(message, "share", spake2plus.POINT_BYTES))

    def _answer_share(self, share_p):
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
            self.state = "share-waiting"
            self._waiting_share = share_p
            guard_.wait_for_guess_slot(self.source, self._guess_slot_free)
            return
        try:
            # Every verifier's points were computed when the users file was read, the fake's
            # too: the same work for every name (a cache filled by logins would tell them apart).
            share_v, self._keys = spake2plus.verifier_respond(
                wire.CONTEXT,
                self.username.encode("utf-8"),
                self.factory.server_id.encode("utf-8"),
                self._user.w0,
                self._user.L,
                share_p,
                points=self._users.verifier_points(self._user),
            )
        except spake2plus.InvalidPoint as problem:
            guard_.guess_abandoned(self.source)
            raise ProtocolError(f"invalid share: {problem}") from None
        # From this share on, the client can check its guess: it holds its slot until a valid
        # confirmation frees it; every other ending records a failure.
        self._guess = True
        self.state = "confirm"
        self.send_handshake({"type": "share", "share": share_v.hex(), "confirm": self._keys.confirm_v.hex()})

    def _guess_slot_free(self):
        share_p, self._waiting_share = self._waiting_share, None
        if share_p is not None and not self.closing:
            self._answer_share(share_p)

    def on_confirm(self, message):
        confirm_p = wire.hex_field(message, "confirm", 32)
        keys, self._keys, user = self._keys, None, self._user
        self._user = self._users = None
        # Unknown users fail here, exactly like a wrong password.
        if not (spake2plus.confirmation_matches(keys.confirm_p, confirm_p) and self._user_known):
            self._log_auth_failure()
            self.fail(AuthenticationFailed())
            return
        self._guess = False
        self.send_handshake({"type": "ok"})
        self.start_records(keys.shared, is_client=False)
        self._in_handshake = False
        self.factory.guard.authenticated(self.source)
        self.factory.guard.guess_confirmed(self.source, user.name)
        self.root = user.root or self.factory.root
        self.storage = storage.Root(self.root, protected=self.factory.protected)
        self.can_write = user.rights == userdb.READ_WRITE
        self._ready()
        self.log.info(
            "{user} authenticated from {peer} ({rights}, root {root})",
            user=user.name, peer=self.peer, rights=user.rights, root=self.root,
        )

    # -- requests

    def _ready(self):
        if self.factory.draining:
            self.shut_down()
            return
        self.state = "ready"
        self.setTimeout(self.factory.idle_timeout)

    @property
    def uploading(self):
        """From PUT to STORED, a refusal or the end of the connection."""
        return self._upload is not None or self.state == "storing"

    @property
    def busy(self):
        """In the middle of a transfer or a listing, which a graceful shutdown lets finish."""
        return self.state in ("working", "upload-offered", "receiving", "storing")

    def shut_down(self):
        """Close for a shutdown, telling the client why (it may come back and resume)."""
        if not self.closing:
            self.log.info("closing connection from {peer}: the server is shutting down", peer=self.peer)
            self.send_error(TryLater("the server is shutting down; try again shortly"))
            self.close()

    def _working(self):
        """Sending a file or a listing, or hashing for a resume: the idle timeout runs, and
        each record or batch that leaves resets it. A client that stops reading holds the
        file (or the directory) and a record only until then."""
        self.state = "working"
        self.setTimeout(self.factory.idle_timeout)

    def _refuse(self, what, requested, error):
        """A request failed: a refusal leaves the connection usable; anything else (a disk's
        I/O error is "internal" to the client) ends it, as the protocol says."""
        self.log.info(
            "{user} from {peer}: {what} {path} refused: {error}",
            user=self.username, peer=self.peer, what=what, path=requested, error=error.message,
        )
        if wire_code(error) not in REFUSAL_CODES:
            self.fail(error)
        elif not self.closing:
            self.send_error(error)
            self._ready()

    def unexpected(self, state, message_type, argument):
        if state == "storing" and message_type != "error":
            # Sent before STORED: the answer to the upload still comes first, so that its
            # outcome is never in doubt; the protocol error follows it (see _upload_answered).
            self._early_message = ProtocolError(f"unexpected {message_type[:40]!r} message before the upload's answer")
            self.hold_reading("early message")
            raise StopReading()
        if state == "ready" and message_type not in ("error", "data"):
            # Later versions add requests; an old server answers clearly and carries on.
            self.send_error(Unsupported(f"request {message_type[:40]!r} is not supported by this server"))
            return
        super().unexpected(state, message_type, argument)

    def on_get(self, message):
        requested = wire.string_field(message, "path")
        offset = wire.int_field(message, "offset", 0, wire.MAX_FILE_SIZE) if "offset" in message else 0
        prefix = wire.hex_field(message, "sha1", 20) if offset else None
        try:
            handle, st = self.storage.open_for_sending(requested)
        except EketwistError as error:
            self._refuse("get", requested, error)
            return
        self._working()
        if not offset or offset > st.st_size:
            self._send(handle, st, requested, 0, hashlib.sha1())
            return
        # The client holds `offset` bytes: continue only if ours start with the same bytes.
        hashed = threads.deferToThread(files.hash_prefix, handle, offset)

        def compared(sha1):
            if sha1 is not None and hmac.compare_digest(sha1.digest(), prefix):
                self._send(handle, st, requested, offset, sha1)
            else:
                self._send(handle, st, requested, 0, hashlib.sha1())

        hashed.addCallback(compared).addErrback(self._internal_failure, handle)

    def _send(self, handle, st, requested, offset, sha1):
        if self.closing:
            handle.close()
            return
        self.send_control(
            {
                "type": "file",
                "name": storage.last_name(requested),
                "size": st.st_size,
                "mtime": st.st_mtime,
                "mode": st.st_mode & files.MODE_MASK,
                "digest": "sha1",
                "offset": offset,
            }
        )
        started = time.monotonic()
        cached = self.factory.digests.get(st) if offset == 0 else None

        def finished(sent):
            unchanged = files.DigestCache.key(os.fstat(handle.fileno())) == files.DigestCache.key(st)
            handle.close()
            if cached is not None:
                digest = cached
            else:
                digest = sha1.hexdigest()
                if offset == 0 and sent == st.st_size and unchanged:
                    self.factory.digests.put(st, digest)
            if self.closing:
                return
            self.send_control({"type": "end", "size": offset + sent, "sha1": digest})
            self._ready()
            self.log.info(
                "{user} from {peer}: sent {path} ({nbytes} bytes{resumed}, {seconds:.3f} s, sha1 {sha1})",
                user=self.username, peer=self.peer, path=requested, nbytes=offset + sent,
                resumed=f", resumed at {offset}" if offset else "",
                seconds=time.monotonic() - started, sha1=digest,
            )

        def aborted(failure):
            handle.close()
            self.log.info(
                "{user} from {peer}: get {path} aborted: {why}",
                user=self.username, peer=self.peer, path=requested, why=failure.getErrorMessage(),
            )

        self._release_transport()
        factory = self.factory
        factory.downloads += 1

        def download_over(result):
            factory.downloads -= 1
            factory.transfer_over()
            self._take_transport_back()
            return result

        done = send_file(
            self, handle, offset, None if cached is not None else sha1,
            on_chunk=lambda _: self.resetTimeout(), record_size=factory.record_size,
        )
        done.addBoth(download_over)
        done.addCallbacks(finished, aborted)

    def _internal_failure(self, failure, handle=None):
        if handle is not None:
            handle.close()
        self.log.failure("internal error serving {user}", failure, user=self.username)
        self.fail(EketwistError("internal error"))

    def on_stat(self, message):
        requested = wire.string_field(message, "path")
        try:
            entry = self.storage.stat(requested)
        except EketwistError as error:
            self._refuse("stat", requested, error)
            return
        self.send_control({"type": "entry", "entry": entry})

    def on_list(self, message):
        requested = wire.string_field(message, "path")
        recursive = wire.bool_field(message, "recursive")
        partials = wire.bool_field(message, "all")
        try:
            entries = self.storage.listing(requested, recursive, partials_of=self.username if partials else None)
            first = next(entries, None)  # errors about the path itself come here, before any reply
        except EketwistError as error:
            self._refuse("list", requested, error)
            return
        self._working()
        self._release_transport()
        self.start_sending(ListingProducer(self, requested or ".", first, entries), False)

    def _listing_done(self, requested, count, error=None):
        self._take_transport_back()
        if error is not None:
            self._refuse("list", requested, error)
            return
        self._ready()
        self.log.info(
            "{user} from {peer}: listed {path} ({count} entries)",
            user=self.username, peer=self.peer, path=requested, count=count,
        )

    def _check_writable(self, requested):
        if not self.can_write:
            raise PermissionDenied(f"{requested}: permission denied on the server (read-only account)")

    def on_mkdir(self, message):
        requested = wire.string_field(message, "path")
        mode = wire.int_field(message, "mode", 0, wire.MAX_MODE) if "mode" in message else None
        mtime = wire.mtime_field(message) if "mtime" in message else None
        try:
            self._check_writable(requested)
            self.storage.make_directory(requested, mode, mtime)
        except EketwistError as error:
            self._refuse("mkdir", requested, error)
            return
        self.send_control({"type": "done"})

    def on_put(self, message):
        requested = wire.string_field(message, "path")
        size = wire.int_field(message, "size", 0, wire.MAX_FILE_SIZE)
        mtime = wire.mtime_field(message) if "mtime" in message else None
        mode = wire.int_field(message, "mode", 0, wire.MAX_MODE) if "mode" in message else None
        force = wire.bool_field(message, "force")
        try:
            self._check_writable(requested)
            cap = self.factory.max_upload_size
            if cap is not None and size > cap:
                raise TooLarge(f"{requested}: {size} bytes is over the server's upload limit of {cap} bytes")
            part = self.storage.receive(requested, self.username, force)
        except EketwistError as error:
            self._refuse("put", requested, error)
            return
        self._upload = upload = Upload(part, requested, size, mtime, mode, force)
        if part.size > size:
            part.restart()
        if not part.size:
            self._offer(upload, None)
            return
        self._working()
        hashed = threads.deferToThread(part.prefix_hasher())
        hashed.addCallback(lambda sha1: self._offer(upload, sha1))
        hashed.addErrback(lambda failure: None if upload is not self._upload else self._internal_failure(failure))

    def _offer(self, upload, sha1):
        if self.closing or upload is not self._upload:
            return
        if sha1 is None:
            upload.part.restart()
        upload.offered, upload.prefix_sha1 = upload.part.size, sha1
        offer = {"type": "ready", "offset": upload.offered}
        if upload.offered:
            offer["sha1"] = sha1.hexdigest()
        self.state = "upload-offered"
        self.setTimeout(self.factory.idle_timeout)
        self.send_control(offer)

    def on_upload(self, message):
        upload = self._upload
        offset = wire.int_field(message, "offset", 0, wire.MAX_FILE_SIZE)
        if offset not in (0, upload.offered):
            raise ProtocolError("upload offset must be 0 or the offered offset")
        if offset:
            upload.part.resume(upload.prefix_sha1)
            upload.resumed_from = offset
        else:
            upload.part.restart()
        upload.prefix_sha1 = None
        self.state = "receiving"

    def incoming_file(self):
        return self._upload if self.state == "receiving" else None

    def on_upload_data(self, chunk):
        self.receive_into(self._upload, self._upload.path, chunk)

    def on_upload_end(self, message):
        size = wire.int_field(message, "size", 0, wire.MAX_FILE_SIZE)
        sha1 = wire.hex_field(message, "sha1", 20)
        upload, self._upload = self._upload, None
        if size != upload.size:
            upload.part.abort()
            self.factory.transfer_over()
            self._refuse("put", upload.path, IntegrityError(f"{upload.path}: the file changed size while it was sent"))
            return
        # The last writes, fsync and rename take what the disk needs: seconds for a large file
        # on a slow one. In a thread, so that every other client is served meanwhile.
        self.state = "storing"
        self.setTimeout(None)
        stored = threads.deferToThread(self._store, upload, size, sha1)
        stored.addCallbacks(self._stored, self._not_stored, callbackArgs=(upload, size), errbackArgs=(upload,))

    @staticmethod
    def _store(upload, size, sha1):
        """In a thread: verify, flush and rename the upload into place; (digest, its stat)."""
        digest = upload.part.finish(size, sha1, upload.mtime, upload.mode, replace=upload.force)
        return digest, upload.part.stored

    def _stored(self, stored, upload, size):
        digest, st = stored
        if st is not None:
            self.factory.digests.put(st, digest)
        self.log.info(
            "{user} from {peer}: received {path} ({nbytes} bytes{resumed}, {seconds:.3f} s, sha1 {sha1})",
            user=self.username, peer=self.peer, path=upload.path, nbytes=size,
            resumed=f", resumed at {upload.resumed_from}" if upload.resumed_from else "",
            seconds=time.monotonic() - upload.started, sha1=digest,
        )
        if not self.closing:
            self.send_control({"type": "stored", "size": size, "sha1": digest})
            self._ready()
        self._upload_answered()

    def _not_stored(self, failure, upload):
        if failure.check(EketwistError):
            self._refuse("put", upload.path, failure.value)
        else:
            self._internal_failure(failure)
        self._upload_answered()

    def _upload_answered(self):
        self.factory.transfer_over()  # out of "storing" now: no longer counted as uploading
        early, self._early_message = self._early_message, None
        if early is not None:
            self.fail(early)

    def _abort_upload(self, keep_part, why):
        upload, self._upload = self._upload, None
        if upload is not None:
            upload.part.abort(keep_part=keep_part)
            self.factory.transfer_over()
            self.log.info(
                "{user} from {peer}: put {path} aborted after {nbytes} bytes ({why}); partial {kept}",
                user=self.username, peer=self.peer, path=upload.path, nbytes=upload.part.size,
                why=why, kept="kept for a resume" if keep_part else "removed",
            )


@implementer(IPullProducer)
class ListingProducer:
    """Sends a listing in batches, one each time the transport has room for it."""

    def __init__(self, connection, requested, first, rest):
        self.connection = connection
        self.requested = requested
        self.pending = first
        self.rest = rest
        self.count = 0

    def resumeProducing(self):
        self.connection.resetTimeout()  # the client reads: progress
        batch, size = [], 0
        try:
            while self.pending is not None:
                encoded = len(wire.encode_message(self.pending)) + 1
                if batch and size + encoded > LISTING_BATCH_BYTES:
                    self.connection.send_control({"type": "entries", "entries": batch, "more": True})
                    return
                batch.append(self.pending)
                size += encoded
                self.count += 1
                self.pending = next(self.rest, None)
        except EketwistError as error:
            self.connection._listing_done(self.requested, self.count, error)
            return
        self.connection.send_control({"type": "entries", "entries": batch, "more": False})
        self.connection._listing_done(self.requested, self.count)

    def stopProducing(self):
        self.rest.close()


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
        self.partial_max_age = partial_max_age
        self.clock = clock or reactor
        self.guard = guard.Guard(policy, self.clock)
        self.digests = files.DigestCache()
        self.connections = set()
        self.downloads = 0
        self._trim_call = None
        self.draining = False
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
        `grace` seconds, then cut the rest. Fires when every connection is closed."""
        from twisted.internet import task

        self.draining = True
        for connection in list(self.connections):
            if not connection.busy:
                connection.shut_down()
        busy = len(self.connections)
        if busy:
            self.log.info("waiting up to {grace:g} s for {count} transfers to finish", grace=grace, count=busy)
        deadline = self.clock.seconds() + grace

        def check():
            if not self.connections:
                loop.stop()
            elif self.clock.seconds() >= deadline:
                for connection in list(self.connections):
                    self.log.info("cutting the transfer of {peer}: grace period over", peer=connection.peer)
                    connection.transport.abortConnection()
                if not self.connections:
                    loop.stop()

        loop = task.LoopingCall(check)
        loop.clock = self.clock
        return loop.start(0.05, now=True).addCallback(lambda _: None)

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
            return sum(storage.remove_stale_parts(root, max_age, now) for root in roots)

        def swept(removed):
            if removed:
                self.log.info("removed {count} stale partial uploads", count=removed)
            return removed

        return threads.deferToThread(sweep).addCallback(swept)
