"""The client's protocol machine: SPAKE2+ Prover, then requests, with Deferreds at its edge.

States and the messages each accepts:
  params     -> params     : check the scrypt cost, derive w0 and w1 in a thread
  deriving   -> (nothing)  : scrypt is running
  share      -> share      : check confirmV BEFORE revealing confirmP, then send confirmP
  ok         -> ok         : records start; `authenticated` fires
  ready      -> (nothing)  : waiting for the caller's next request
  header     -> file       : the server accepted a get (or answered an error, which fails only
                             that request)
  receiving  -> data, end  : write to the .part file; `end` verifies and renames
"""

import os

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from . import errors, spake2plus, userdb, wire
from .connection import SecureConnection
from .errors import (
    ConnectionFailed,
    IntegrityError,
    ProtocolError,
    ServerNotAuthenticated,
    Unsupported,
)
from .files import PartFile
from .server import CONTEXT

MAX_FILE_SIZE = 2**63 - 1


class NoProgress:
    def start(self, name, size):
        pass

    def update(self, nbytes):
        pass

    def close(self):
        pass


class _Get:
    """One get request in flight."""

    def __init__(self, remote, local, progress):
        self.remote = remote
        self.local = local
        self.progress = progress or NoProgress()
        self.deferred = Deferred()
        self.part = None
        self.size = None
        self.mtime = None


class ClientProtocol(SecureConnection, TimeoutMixin):
    log = Logger()
    TRANSITIONS = {
        "params": {"params": "on_params"},
        "deriving": {},
        "share": {"share": "on_share"},
        "ok": {"ok": "on_ok"},
        "ready": {},
        "header": {"file": "on_file"},
        "receiving": {"data": "on_data", "end": "on_end"},
    }

    def __init__(self, username, password, timeout=None, clock=None):
        """`timeout`: seconds without a byte from the server, while we wait for one, after
        which the connection is abandoned (None: wait for ever)."""
        from twisted.internet import reactor

        self.timeout = timeout
        self.callLater = (clock or reactor).callLater
        self.username = username
        self._password = password
        self.authenticated_deferred = Deferred()
        self.server_id = None
        self._request = None

    def __repr__(self):
        return f"<ClientProtocol user={self.username!r} state={self.state!r}>"

    def connectionMade(self):
        super().connectionMade()
        self.state = "params"
        self.setTimeout(self.timeout)
        self.send_handshake({"type": "hello", "version": wire.PROTOCOL_VERSION, "user": self.username})

    # -- handshake

    def on_params(self, message):
        self.server_id = wire.text_field(message, "server", wire.MAX_NAME_BYTES)
        salt = wire.hex_field(message, "salt", 8, 64)
        scrypt = message.get("scrypt")
        problem = userdb.check_scrypt(scrypt)
        if problem:
            raise ProtocolError(f"the server asked for unreasonable password hashing: {problem}")
        scrypt = {key: scrypt[key] for key in ("n", "r", "p")}
        self.state = "deriving"
        password, self._password = self._password, None
        derived = deferToThread(
            spake2plus.register, password.encode("utf-8"), salt, self.username.encode("utf-8"), **scrypt
        )
        derived.addCallback(self._derived)
        derived.addErrback(self._internal_failure)

    def _derived(self, w0_w1):
        if self.closing:
            return
        self._w0, self._w1 = w0_w1
        self._x, self._share_p = spake2plus.prover_share(self._w0)
        self.state = "share"
        self.send_handshake({"type": "share", "share": self._share_p.hex()})

    def on_share(self, message):
        share_v = wire.hex_field(message, "share", spake2plus.POINT_BYTES)
        confirm_v = wire.hex_field(message, "confirm", 32)
        try:
            keys = spake2plus.prover_finish(
                CONTEXT,
                self.username.encode("utf-8"),
                self.server_id.encode("utf-8"),
                self._w0,
                self._w1,
                self._x,
                self._share_p,
                share_v,
            )
        except spake2plus.InvalidPoint as problem:
            raise ProtocolError(f"invalid share from the server: {problem}") from None
        finally:
            self._w0 = self._w1 = self._x = None
        # The server proves itself first: we reveal nothing more to one that cannot.
        if not spake2plus.confirmation_matches(keys.confirm_v, confirm_v):
            raise ServerNotAuthenticated()
        self._k_shared = keys.shared
        self.state = "ok"
        self.send_handshake({"type": "confirm", "confirm": keys.confirm_p.hex()})

    def on_ok(self, message):
        self.start_records(self._k_shared, is_client=True)
        self._k_shared = None
        self.state = "ready"
        self.setTimeout(None)  # nothing is expected from the server until the next request
        self.authenticated_deferred.callback(self)

    # -- requests

    def get(self, remote, local, progress=None):
        """Download `remote` to the path `local`; fires with {"size", "sha1", "path"}."""
        if self.state != "ready":
            raise RuntimeError(f"get() while {self.state}")
        self._request = _Get(remote, local, progress)
        self.state = "header"
        self.setTimeout(self.timeout)
        self.send_control({"type": "get", "path": remote})
        return self._request.deferred

    def on_file(self, message):
        request = self._request
        request.size = wire.int_field(message, "size", 0, MAX_FILE_SIZE)
        request.mtime = wire.number_field(message, "mtime", -(2**40), 2**40)
        digest = wire.text_field(message, "digest", 32)
        if digest != "sha1":
            raise Unsupported(f"the server offers digest {digest!r}, which this client does not know")
        request.part = PartFile(request.local)
        request.progress.start(os.path.basename(request.local), request.size)
        self.state = "receiving"

    def on_data(self, chunk):
        request = self._request
        if request.part.size + len(chunk) > request.size:
            raise IntegrityError(f"{request.remote}: the server sent more than the announced size")
        request.part.write(chunk)
        request.progress.update(len(chunk))

    def on_end(self, message):
        request = self._request
        size = wire.int_field(message, "size", 0, MAX_FILE_SIZE)
        sha1 = wire.hex_field(message, "sha1", 20)
        if size != request.size:
            raise IntegrityError(f"{request.remote}: the file changed size on the server while it was sent")
        digest = request.part.finish(request.size, sha1, request.mtime)
        request.progress.close()
        self._request = None
        self.state = "ready"
        self.setTimeout(None)
        request.deferred.callback({"path": request.local, "size": request.size, "sha1": digest})

    def dataReceived(self, data):
        self.resetTimeout()
        super().dataReceived(data)

    def timeoutConnection(self):
        self.fail(errors.Timeout(f"the server sent nothing for {self.timeout:g} s"))

    # -- failures

    def peer_error(self, message):
        error = errors.from_wire(str(message.get("code")), message.get("message"))
        if self.state == "header":
            # The request failed; the connection stays usable for the next one.
            request, self._request = self._request, None
            self.state = "ready"
            self.setTimeout(None)
            request.progress.close()
            request.deferred.errback(error)
            return
        self._fail_pending(error)
        self.close()

    def _internal_failure(self, failure):
        self.fail(errors.EketwistError(f"internal error: {failure.getErrorMessage()}"))

    def fail(self, error):
        if not self.closing:
            self._fail_pending(error)
        super().fail(error)

    def _fail_pending(self, error):
        request, self._request = self._request, None
        if request is not None:
            if request.part is not None:
                # A cut connection keeps the .part for a later resume; bad data does not.
                request.part.abort(keep_part=isinstance(error, ConnectionFailed))
            request.progress.close()
            request.deferred.errback(error)
        if not self.authenticated_deferred.called:
            self.authenticated_deferred.errback(error)

    def connectionLost(self, reason):
        self.setTimeout(None)
        super().connectionLost(reason)
        self._password = None
        self._fail_pending(ConnectionFailed("the connection to the server was lost"))
