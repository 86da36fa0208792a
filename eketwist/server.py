"""The server's protocol machine (SPAKE2+ Verifier, then requests) and its factory.

States and the messages each accepts:
  hello    -> hello           : look the user up (or fake one), send params
  share    -> share           : send our share and confirmV
  confirm  -> confirm         : check confirmP; ok (records start) or auth-failed and close
  ready    -> get             : send one file; unknown requests get "unsupported"
  sending  -> (nothing)       : a file is streaming; the client waits for its end
"""

import hashlib
import os
import socket
import time

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer
from twisted.internet.interfaces import IConsumer

from . import files, spake2plus, userdb, wire
from .connection import SecureConnection
from .errors import AuthenticationFailed, EketwistError, ProtocolError, Timeout, Unsupported

CONTEXT = b"eketwist/1 SPAKE2+-P256-SHA256-HKDF-SHA256-HMAC-SHA256"
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 600.0


@implementer(IConsumer)
class RecordConsumer:
    """Lets FileSender write into the record layer: every chunk becomes one DATA record."""

    def __init__(self, connection):
        self._connection = connection

    def registerProducer(self, producer, streaming):
        self._connection.transport.registerProducer(producer, streaming)

    def unregisterProducer(self):
        self._connection.transport.unregisterProducer()

    def write(self, chunk):
        self._connection.send_data(chunk)


class ServerProtocol(SecureConnection, TimeoutMixin):
    log = Logger()
    TRANSITIONS = {
        "hello": {"hello": "on_hello"},
        "share": {"share": "on_share"},
        "confirm": {"confirm": "on_confirm"},
        "ready": {"get": "on_get"},
        "sending": {},
    }

    def connectionMade(self):
        super().connectionMade()
        self.state = "hello"
        self.peer = _describe_peer(self.transport.getPeer())
        self.username = None
        self.callLater = self.factory.clock.callLater
        # A slow client cannot keep a handshake slot: this deadline is never reset by data.
        self.setTimeout(self.factory.handshake_timeout)
        self.log.info("connection from {peer}", peer=self.peer)

    def dataReceived(self, data):
        if self.authenticated and self.state == "ready":
            self.resetTimeout()
        super().dataReceived(data)

    def timeoutConnection(self):
        phase = "handshake" if not self.authenticated else "idle"
        self.log.info("closing {phase} connection from {peer}: timed out", phase=phase, peer=self.peer)
        self.fail(Timeout(f"{phase} timeout"))

    def connectionLost(self, reason):
        self.setTimeout(None)
        if self.state == "confirm":
            # The client saw our confirmation and hung up: its password did not match.
            self._log_auth_failure()
        super().connectionLost(reason)
        self.log.info("connection from {peer} closed", peer=self.peer)

    def fail(self, error):
        if not self.closing and not isinstance(error, Timeout):
            self.log.info(
                "closing connection from {peer}: {error}", peer=self.peer, error=error.message
            )
        super().fail(error)

    def peer_error(self, message):
        code = str(message.get("code"))[:40]
        if self.state != "confirm":  # in "confirm", connectionLost logs the failed authentication
            self.log.info("client {peer} reported an error: {code}", peer=self.peer, code=code)
        self.close()

    def _log_auth_failure(self):
        self.log.warn("authentication failed for {user} from {peer}", user=self.username, peer=self.peer)

    # -- handshake

    def on_hello(self, message):
        version = wire.int_field(message, "version", 0, 2**31)
        if version != wire.PROTOCOL_VERSION:
            raise Unsupported(f"protocol version {version} is not supported (this server speaks {wire.PROTOCOL_VERSION})")
        name = wire.text_field(message, "user", userdb.MAX_USERNAME_BYTES)
        problem = userdb.check_username(name)
        if problem:
            raise ProtocolError(problem)
        self.username = name
        self._user, self._user_known = self.factory.users.current().lookup(name)
        self.state = "share"
        self.send_handshake(
            {
                "type": "params",
                "server": self.factory.server_id,
                "salt": self._user.salt.hex(),
                "scrypt": dict(self._user.scrypt),
            }
        )

    def on_share(self, message):
        share_p = wire.hex_field(message, "share", spake2plus.POINT_BYTES)
        try:
            share_v, self._keys = spake2plus.verifier_respond(
                CONTEXT,
                self.username.encode("utf-8"),
                self.factory.server_id.encode("utf-8"),
                self._user.w0,
                self._user.L,
                share_p,
            )
        except spake2plus.InvalidPoint as problem:
            raise ProtocolError(f"invalid share: {problem}") from None
        self.state = "confirm"
        self.send_handshake({"type": "share", "share": share_v.hex(), "confirm": self._keys.confirm_v.hex()})

    def on_confirm(self, message):
        confirm_p = wire.hex_field(message, "confirm", 32)
        keys, self._keys, user = self._keys, None, self._user
        self._user = None
        # Unknown users fail here, exactly like a wrong password.
        if not (spake2plus.confirmation_matches(keys.confirm_p, confirm_p) and self._user_known):
            self._log_auth_failure()
            self.fail(AuthenticationFailed())
            return
        self.send_handshake({"type": "ok"})
        self.start_records(keys.shared, is_client=False)
        self.state = "ready"
        self.setTimeout(self.factory.idle_timeout)
        self.log.info("{user} authenticated from {peer}", user=user.name, peer=self.peer)

    # -- requests

    def unexpected(self, state, message_type, argument):
        if state == "ready" and message_type not in ("error", "data"):
            # Later versions add requests; an old server answers clearly and carries on.
            self.send_error(Unsupported(f"request {message_type[:40]!r} is not supported by this server"))
            return
        super().unexpected(state, message_type, argument)

    def on_get(self, message):
        requested = wire.text_field(message, "path", wire.MAX_PATH_BYTES)
        try:
            path = files.resolve(self.factory.root, requested)
            handle, st = files.open_for_sending(path, requested)
        except EketwistError as error:
            self.log.info(
                "{user} from {peer}: get {path} refused: {error}",
                user=self.username, peer=self.peer, path=requested, error=error.message,
            )
            self.send_error(error)
            return
        self.send_control(
            {
                "type": "file",
                "name": path.basename(),
                "size": st.st_size,
                "mtime": st.st_mtime,
                "digest": "sha1",
            }
        )
        self.state = "sending"
        self.setTimeout(None)  # a slow reader is governed by back-pressure, not the idle timer
        self._send_file(handle, requested)

    def _send_file(self, handle, requested):
        sha1 = hashlib.sha1()
        sent = 0
        started = time.monotonic()

        def hash_and_count(chunk):
            nonlocal sent
            sha1.update(chunk)
            sent += len(chunk)
            return chunk

        def finished(_):
            handle.close()
            if self.closing:
                return
            digest = sha1.hexdigest()
            self.send_control({"type": "end", "size": sent, "sha1": digest})
            self.state = "ready"
            self.setTimeout(self.factory.idle_timeout)
            self.log.info(
                "{user} from {peer}: sent {path} ({nbytes} bytes, {seconds:.3f} s, sha1 {sha1})",
                user=self.username, peer=self.peer, path=requested, nbytes=sent,
                seconds=time.monotonic() - started, sha1=digest,
            )

        def aborted(_):
            # FileSender reports a stopped consumer with a bare Exception: the peer went away.
            handle.close()
            self.log.info(
                "{user} from {peer}: get {path} aborted after {nbytes} bytes: connection lost",
                user=self.username, peer=self.peer, path=requested, nbytes=sent,
            )

        sender = FileSender()
        sender.CHUNK_SIZE = wire.DATA_CHUNK
        sender.beginFileTransfer(handle, RecordConsumer(self), hash_and_count).addCallbacks(
            finished, aborted
        )


def _describe_peer(address):
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else str(address)


class ServerFactory(protocol.Factory):
    protocol = ServerProtocol
    noisy = False

    def __init__(
        self,
        root,
        users_path,
        server_id=None,
        handshake_timeout=DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout=DEFAULT_IDLE_TIMEOUT,
        clock=None,
    ):
        from twisted.internet import reactor

        self.root = os.path.abspath(root)
        self.users = userdb.UsersStore(users_path, ServerProtocol.log)
        self.server_id = server_id or socket.gethostname()
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.clock = clock or reactor
