"""How the server carries out the requests that take time: one object per request being served
(a download, a listing, an upload), in the role Conch's file handles play for SFTP. Each holds
what its request needs (the open file, the producer, the part file, the thread's Deferred) and
reports to the connection's glue (eketwist.server) when it is answered or refused; the serving
machine has already checked the messages, and the storage object confines every path.

Quick requests (STAT, MKDIR, and REMOVE, RMDIR, RENAME, CHMOD, SPACE) are answered by the
glue at once and need no object; a recursive REMOVE and a HASH work in a thread (Removal,
Hashing).
"""

import hashlib
import hmac
import os
import time
from collections import deque

from twisted.internet import threads
from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

from . import files, storage, wire
from .connection import send_file
from .errors import (
    MANAGE_REFUSAL_CODES,
    REFUSAL_CODES,
    UPLOAD_END_REFUSAL_CODES,
    WRITE_REFUSAL_CODES,
    EketwistError,
    IntegrityError,
    error_message,
    wire_code,
)

# A listing is sent in CONTROL messages of at most this many bytes of entries.
LISTING_BATCH_BYTES = 48 * 1024


class Download:
    """A GET: FILE, the file's bytes by FileSender (with its incremental SHA-1), END."""

    def __init__(self, connection, request, handle):
        self.connection = connection
        self.request = request
        self.handle = handle  # the file, open from the request on

    @classmethod
    def start(cls, connection, request):
        """Open the file and start answering; or refuse the request."""
        try:
            handle, st = connection.storage.open_for_sending(request.path)
        except EketwistError as error:
            connection.refuse("get", request.path, error)
            return
        cls(connection, request, handle)._begin(st)

    def _begin(self, st):
        connection, request = self.connection, self.request
        connection.working()
        offset = request.offset
        if not offset or offset > st.st_size:
            self._send(st, 0, hashlib.sha1())
            return
        # The client holds `offset` bytes: continue only if ours start with the same bytes.
        hashed = threads.deferToThread(files.hash_prefix, self.handle, offset)

        def compared(sha1):
            if sha1 is not None and hmac.compare_digest(sha1.digest(), request.sha1):
                self._send(st, offset, sha1)
            else:
                self._send(st, 0, hashlib.sha1())

        hashed.addCallback(compared).addErrback(self._failed)

    def _failed(self, failure):
        self.handle.close()
        self.connection.internal_failure(failure)

    def _send(self, st, offset, sha1):
        connection, handle, requested = self.connection, self.handle, self.request.path
        if connection.closing:
            handle.close()
            return
        connection.send_control(
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
        factory = connection.factory
        cached = factory.digests.get(st) if offset == 0 else None

        def finished(sent):
            unchanged = files.DigestCache.key(os.fstat(handle.fileno())) == files.DigestCache.key(st)
            handle.close()
            if cached is not None:
                digest = cached
            else:
                digest = sha1.hexdigest()
                if offset == 0 and sent == st.st_size and unchanged:
                    factory.digests.put(st, digest)
            if connection.closing:
                return
            connection.send_control({"type": "end", "size": offset + sent, "sha1": digest})
            connection.answered()
            connection.log_event(
                "sent {path} ({nbytes} bytes{resumed}, {seconds:.3f} s, sha1 {sha1})",
                path=requested, nbytes=offset + sent, resumed=f", resumed at {offset}" if offset else "",
                seconds=time.monotonic() - started, sha1=digest,
            )

        def aborted(failure):
            handle.close()
            connection.log_event("get {path} aborted: {why}", path=requested, why=failure.getErrorMessage())

        connection.release_transport()
        factory.downloads += 1

        def download_over(result):
            factory.downloads -= 1
            factory.transfer_over()
            connection.take_transport_back()
            return result

        done = send_file(
            connection, handle, offset, None if cached is not None else sha1,
            on_chunk=lambda _: connection.resetTimeout(), record_size=factory.record_size,
        )
        done.addBoth(download_over)
        done.addCallbacks(finished, aborted)


@implementer(IPullProducer)
class Listing:
    """A LIST: ENTRIES messages in batches, one each time the transport has room for it."""

    def __init__(self, connection, requested, first, rest):
        self.connection = connection
        self.requested = requested or "."
        self.pending = first  # the next entry to send, or None at the end
        self.rest = rest  # the storage's generator of the entries after it
        self.count = 0

    @classmethod
    def start(cls, connection, request):
        """Start the listing; or refuse the request."""
        try:
            partials_of = connection.username if request.partials else None
            rest = connection.storage.listing(request.path, request.recursive, partials_of=partials_of)
            # Errors about the path itself come here, before any reply.
            first = next(rest, None)
        except EketwistError as error:
            connection.refuse("list", request.path, error)
            return
        connection.working()
        connection.release_transport()
        connection.start_sending(cls(connection, request.path, first, rest), False)

    def resumeProducing(self):
        connection = self.connection
        connection.resetTimeout()  # the client reads: progress
        batch: list = []
        size = 0
        try:
            while self.pending is not None:
                encoded = len(wire.encode_message(self.pending)) + 1
                if batch and size + encoded > LISTING_BATCH_BYTES:
                    connection.send_control({"type": "entries", "entries": batch, "more": True})
                    return
                batch.append(self.pending)
                size += encoded
                self.count += 1
                self.pending = next(self.rest, None)
        except EketwistError as error:
            connection.take_transport_back()
            connection.refuse("list", self.requested, error)
            return
        connection.send_control({"type": "entries", "entries": batch, "more": False})
        connection.take_transport_back()
        connection.answered()
        connection.log_event("listed {path} ({count} entries)", path=self.requested, count=self.count)

    def stopProducing(self):
        self.rest.close()


class _InThread:
    """A request whose disk work runs in a thread (the reactor never waits on a big tree or a
    big file): the connection stays in state working, without an idle timeout (the client
    waits for our disk), until the answer or the refusal."""

    what: str = ""  # the request, as refusals are logged
    refusals = REFUSAL_CODES

    def __init__(self, connection, request):
        self.connection = connection
        self.request = request
        self.started = time.monotonic()

    def answer(self, result):
        """The message answering the request, from what the thread returned."""
        raise NotImplementedError

    def log(self, result):
        """Log what was done."""

    def _run(self, function, *args):
        self.connection.setTimeout(None)
        done = threads.deferToThread(function, *args)
        done.addCallbacks(self._done, self._failed)

    def _done(self, result):
        connection = self.connection
        if connection.closing:
            return
        connection.send_control(self.answer(result))
        connection.answered()
        self.log(result)

    def _failed(self, failure):
        connection = self.connection
        if connection.closing:
            return
        if failure.check(EketwistError):
            connection.refuse(self.what, self.request.path, failure.value, self.refusals)
        else:
            connection.internal_failure(failure)


class Removal(_InThread):
    """A recursive REMOVE: the tree removed depth first in a thread (storage._TreeRemoval),
    then DONE with the number of names removed."""

    what = "remove"
    refusals = MANAGE_REFUSAL_CODES

    @classmethod
    def start(cls, connection, request):
        cls(connection, request)._run(connection.storage.remove, request.path, True, connection.username)

    def _done(self, removed):
        self.connection.freed(removed)  # also when the connection is gone: the files are
        super()._done(removed)

    def answer(self, removed):
        return {"type": "done", "removed": removed.names}

    def log(self, removed):
        self.connection.log_event(
            "removed {path} ({count} names, {seconds:.3f} s)",
            path=self.request.path, count=removed.names, seconds=time.monotonic() - self.started,
        )

    def _failed(self, failure):
        freed = getattr(failure.value, "freed", None)
        if freed is not None:
            self.connection.freed(freed)
        removed = freed.names if freed is not None else 0
        if removed and not self.connection.closing:
            # Refused part-way (an upload running inside, the filesystem said no): what went
            # before is gone for good, and the log says how much.
            self.connection.log_event(
                "removed {count} names under {path} before the refusal", path=self.request.path, count=removed,
            )
        super()._failed(failure)


class Hashing(_InThread):
    """A HASH: the file's SHA-1 (from the digest cache GET fills, or read whole in a
    thread), with the size and mtime it had."""

    what = "hash"

    @classmethod
    def start(cls, connection, request):
        try:
            handle, st = connection.storage.open_for_hashing(request.path)
        except EketwistError as error:
            connection.refuse("hash", request.path, error)
            return
        cached = connection.factory.digests.get(st)
        hashing = cls(connection, request)
        if cached is not None:
            handle.close()
            hashing._done((st, cached))
            return
        connection.setTimeout(None)
        # In turn (ServerFactory.hash_in_turn); one whose client has gone stops at its next
        # block, or before it starts.
        done = connection.factory.hash_in_turn(connection.username, hashing._hash, handle, request.path, connection)
        done.addCallbacks(hashing._done, hashing._failed)

    @staticmethod
    def _hash(handle, shown_name, connection):
        with handle:
            return files.hash_whole(handle, shown_name, cancelled=lambda: connection.closing)

    def _done(self, result):
        st, digest = result
        self.connection.factory.digests.put(st, digest)
        super()._done(result)

    def answer(self, result):
        st, digest = result
        name = storage.last_name(self.request.path)
        return {"type": "digest", "name": name, "size": st.st_size, "mtime": st.st_mtime, "sha1": digest}

    def log(self, result):
        st, digest = result
        self.connection.log_event(
            "hashed {path} ({nbytes} bytes, {seconds:.3f} s, sha1 {sha1})",
            path=self.request.path, nbytes=st.st_size, seconds=time.monotonic() - self.started, sha1=digest,
        )


class OwedAnswers:
    """Version 2: the answers a connection owes, in order, while uploads are committed beside
    the next requests (docs/protocol.md section 7.9): Uploads past their END (each `answer`
    None until its commit is over) and the refusals queued behind them. An upload counts in
    the server's uploads in commit from here until its answer leaves; every upload gets one,
    as its commit's Deferred always fires."""

    def __init__(self, connection):
        self.connection = connection
        self._owed: deque = deque()

    def __len__(self):
        return len(self._owed)

    def upload(self, upload):
        self._owed.append(upload)
        self.connection.factory.committing += 1

    def refusal(self, error):
        self._owed.append(_Refusal(error_message(error)))

    def send_ready(self):
        """Send, in order, every answer now known (none once the connection is closing, but
        each upload is still counted out)."""
        connection, owed = self.connection, self._owed
        while owed and owed[0].answer is not None:
            answered = owed.popleft()
            if not connection.closing:
                connection.send_control(answered.answer)
            if not isinstance(answered, _Refusal):  # an upload: it no longer waits for its answer
                connection.serving.committed()
                connection.factory.committing -= 1
                connection.factory.transfer_over()


class _Refusal:
    """A refusal owed behind uploads being committed: its ERROR message only (an exception
    would keep its traceback)."""

    def __init__(self, message):
        self.answer = message


class Upload:
    """A PUT: the partial file (resumed when its prefix matches), READY, the DATA written behind,
    then, after END, the commit in a thread (verify, flush, rename) and STORED."""

    def __init__(self, connection, upload, part):
        self.connection = connection
        self.upload = upload  # the serving machine's record of the PUT
        self.part = part  # files.PartFile, open from the PUT on
        # The room held in the user's quota (quotas.Reservation) until settle(), or None.
        self.reservation = getattr(part, "reservation", None)
        self.prefix_sha1 = None
        self.resumed_from = 0
        self.started = time.monotonic()

    @property
    def size(self):
        return self.upload.size

    @classmethod
    def open(cls, connection, upload):
        """The upload with its partial file open; or None, the request refused."""
        try:
            part = connection.storage.receive(upload.path, connection.username, upload.force, upload.size)
        except EketwistError as error:
            connection.refuse("put", upload.path, error, WRITE_REFUSAL_CODES)
            return None
        return cls(connection, upload, part)

    def start(self):
        """READY at once, or once the partial file's prefix is hashed for a resume."""
        connection, upload, part = self.connection, self.upload, self.part
        if upload.inline:  # version 2: the file follows the PUT, from its first byte
            part.restart()
            connection.receive_inline()
            return
        if part.size > upload.size:
            part.restart()
        if not part.size:
            self._offer(None)
            return
        connection.working()
        hashed = threads.deferToThread(part.prefix_hasher())
        hashed.addCallback(self._offer)
        hashed.addErrback(lambda failure: None if not self._current() else connection.internal_failure(failure))

    def _current(self):
        return not self.connection.closing and self.connection.upload_in_progress is self

    def _offer(self, sha1):
        if not self._current():
            return
        if sha1 is None:
            self.part.restart()
        self.prefix_sha1 = sha1
        self.connection.offer(self.part.size, sha1.hexdigest() if sha1 is not None else None)

    def receive_from(self, offset):
        """UPLOAD: the client sends from `offset` (0, or the offered offset)."""
        if offset:
            self.part.resume(self.prefix_sha1)
            self.resumed_from = offset
        else:
            self.part.restart()
        self.prefix_sha1 = None

    def finish(self, size, sha1):
        """END: commit the file if it is whole and its digest matches."""
        connection, path = self.connection, self.upload.path
        pipelined = connection.serving.version >= 2
        if pipelined:
            # Answered in its turn (ServerProtocol.answer_in_turn), STORED or a refusal, while
            # the next requests are read.
            self.answer = None
            connection.answer_in_turn(self)
        self.part.written()
        if size != self.upload.size:
            self.part.abort()
            self.settle()
            self._refused(IntegrityError(f"{path}: the file changed size while it was sent"))
            return
        # Verified, flushed and renamed in a thread (files.GroupCommit, with the uploads that
        # end meanwhile on this connection): seconds for a large file on a slow disk, while
        # every other client is served.
        if not pipelined:
            connection.setTimeout(None)
        upload = self.upload
        committed = connection.committer.commit(self.part, upload.mtime, upload.mode, self.part.may_replace, (size, sha1))
        committed.addCallbacks(self._stored, self._not_stored, callbackArgs=(size,))

    def _refused(self, error):
        """The upload fails after END with a refusal (section 7.5): in its turn on version 2."""
        connection = self.connection
        if connection.serving.version >= 2:
            connection.log_event("put {path} refused: {error}", path=self.upload.path, error=error.message)
            self.answer = error_message(error)
            connection.answers_ready()
        else:
            connection.refuse("put", self.upload.path, error, UPLOAD_END_REFUSAL_CODES)
            connection.factory.transfer_over()

    def settle(self):
        """The upload is over: what it left on the disk counts in the quota's usage, and the
        room it held is given back."""
        if self.reservation is not None:
            self.reservation.settle(self.part)

    def _stored(self, digest, size):
        connection = self.connection
        self.settle()
        self._log_stored(digest, size)
        stored = {"type": "stored", "size": size, "sha1": digest}
        if connection.serving.version >= 2:
            self.answer = stored
            connection.answers_ready()
            return
        if not connection.closing:
            connection.send_control(stored)
        connection.answered()
        connection.factory.transfer_over()  # out of "storing" now: no longer counted as uploading

    def _log_stored(self, digest, size):
        connection = self.connection
        if self.part.stored is not None:
            connection.factory.digests.put(self.part.stored, digest)
        connection.log_event(
            "received {path} ({nbytes} bytes{resumed}, {seconds:.3f} s, sha1 {sha1})",
            path=self.upload.path, nbytes=size,
            resumed=f", resumed at {self.resumed_from}" if self.resumed_from else "",
            seconds=time.monotonic() - self.started, sha1=digest,
        )

    def _not_stored(self, failure):
        connection = self.connection
        self.settle()
        if failure.check(EketwistError) and wire_code(failure.value) in UPLOAD_END_REFUSAL_CODES:
            self._refused(failure.value)
            return
        if failure.check(EketwistError):  # the connection ends: the answers owed are moot
            connection.log_event("put {path} failed: {error}", path=self.upload.path, error=failure.value.message)
            connection.fail(failure.value)
        else:
            connection.internal_failure(failure)
        if connection.serving.version >= 2:
            # Not sent (the connection is closing), but given, so that this upload and those
            # after it are counted out as their commits end.
            self.answer = error_message(EketwistError("internal error"))
            connection.answers_ready()
        else:
            connection.factory.transfer_over()

    def abort(self, keep_part, why):
        """The connection ends before END: keep the partial file for a resume, or remove it.
        (After END the commit in its thread finishes the upload.)"""
        self.part.abort(keep_part=keep_part)
        self.settle()
        self.connection.factory.transfer_over()
        self.connection.log_event(
            "put {path} aborted after {nbytes} bytes ({why}); partial {kept}",
            path=self.upload.path, nbytes=self.part.size, why=why,
            kept="kept for a resume" if keep_part else "removed",
        )
