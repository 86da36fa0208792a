"""The server's side of the handshake (SPAKE2+ Verifier, docs/protocol.md sections 3-4) as a
state machine without I/O: it takes decoded HANDSHAKE messages and returns what to send.

Each state is a class carrying the data that state needs; nothing else is kept. The glue
(eketwist.server) decides *when*: the guard may hold the PARAMS answer back (Delaying) or a
share until one of its address's guess slots is free (ShareWaiting); the machine only knows
that it is waiting, so that a message meanwhile is a protocol error.

    AwaitingHello  --receive(HELLO)-->     Named                (Hello: the name to vet)
    Named          --wait()-->             Delaying
    Named/Delaying --params()-->           AwaitingShare        (returns PARAMS)
    AwaitingShare  --receive(SHARE)-->     ShareReceived        (Share: the point, checked later)
    ShareReceived  --wait()-->             ShareWaiting
    ShareReceived/ShareWaiting --answer()--> AwaitingConfirm    (returns SHARE, confirmV)
    AwaitingConfirm --receive(CONFIRM)-->  Authenticated        (Confirmed: user, keys, OK)
                                       or  Failed               (AuthenticationFailed raised)
"""

from dataclasses import dataclass, field
from typing import Any, Union

from . import spake2plus, wire
from .errors import AuthenticationFailed, ProtocolError, Unsupported


@dataclass(frozen=True)
class AwaitingHello:
    pass


@dataclass(frozen=True)
class Named:
    """HELLO read: the user's verifier (or the fake one) is looked up."""

    name: str
    user: Any  # userdb.User: the verifier (w0, L), salt and cost
    known: bool
    users: Any  # the users snapshot the name was looked up in (a reload must not mix two)


@dataclass(frozen=True)
class Delaying(Named):
    pass


@dataclass(frozen=True)
class AwaitingShare(Named):
    pass


@dataclass(frozen=True)
class ShareReceived(Named):
    share_p: bytes


@dataclass(frozen=True)
class ShareWaiting(ShareReceived):
    pass


@dataclass(frozen=True)
class AwaitingConfirm(Named):
    keys: spake2plus.Keys


@dataclass(frozen=True)
class Authenticated:
    """Keys confirmed; the machine keeps none (the glue took the shared key from Confirmed)."""

    user: Any


@dataclass(frozen=True)
class Failed:
    pass


State = Union[AwaitingHello, Named, ShareReceived, AwaitingConfirm, Authenticated, Failed]


# What receive() reports: what happened, for the glue to act on.
@dataclass(frozen=True)
class Hello:
    name: str


@dataclass(frozen=True)
class Share:
    pass


@dataclass(frozen=True)
class Confirmed:
    user: Any
    shared_key: bytes = field(repr=False)
    reply: dict  # OK


class Verifier:
    def __init__(self, server_id, users, versions=wire.VERSIONS):
        """`users`: a callable giving the current users snapshot (userdb.Users); `versions`:
        the protocol versions we speak."""
        self.server_id = server_id
        self.versions = versions
        self._users = users
        self.state: State = AwaitingHello()
        self.version = None  # chosen at HELLO: the highest the client offered that we speak

    @property
    def guessing(self):
        """True from our SHARE until CONFIRM: the client can check its guess against confirmV."""
        return isinstance(self.state, AwaitingConfirm)

    @property
    def username(self):
        return self.state.name if isinstance(self.state, Named) else None

    def receive(self, message):
        """One HANDSHAKE message from the client: Hello, Share or Confirmed; ProtocolError if
        the state does not accept it."""
        kind, state = message["type"], self.state
        if kind == "hello" and isinstance(state, AwaitingHello):
            return self._hello(message)
        if kind == "share" and type(state) is AwaitingShare:
            share_p = wire.hex_field(message, "share", spake2plus.POINT_BYTES)
            self.state = ShareReceived(state.name, state.user, state.known, state.users, share_p)
            return Share()
        if kind == "confirm" and isinstance(state, AwaitingConfirm):
            return self._confirm(state, wire.hex_field(message, "confirm", 32))
        raise ProtocolError(f"unexpected {kind[:40]!r} message in state {state_name(state)!r}")

    def _hello(self, message):
        version = message.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ProtocolError("hello: field 'version' missing or of the wrong type")
        offered = {version}
        if "versions" in message:
            versions = message["versions"]
            if not isinstance(versions, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in versions):
                raise ProtocolError("hello: field 'versions' must be a list of integers")
            offered.update(versions[:16])
        common = offered.intersection(self.versions)
        if not common:
            spoken = ", ".join(map(str, self.versions))
            raise Unsupported(f"protocol version {version} is not supported (this server speaks {spoken})")
        self.version = max(common)
        name = wire.string_field(message, "user")
        problem = wire.check_username(name)
        if problem:
            # No such name can be registered, so saying so tells nothing about who exists.
            raise AuthenticationFailed(f"not a valid username: {problem}")
        users = self._users()
        user, known = users.lookup(name)
        self.state = Named(name, user, known, users)
        return Hello(name)

    def wait(self):
        """The glue holds the answer back (Named -> Delaying, ShareReceived -> ShareWaiting)."""
        state = self.state
        if type(state) is Named:
            self.state = Delaying(state.name, state.user, state.known, state.users)
        elif type(state) is ShareReceived:
            self.state = ShareWaiting(state.name, state.user, state.known, state.users, state.share_p)
        elif type(state) not in (Delaying, ShareWaiting):  # waiting again is still waiting
            raise AssertionError(f"nothing to wait for in {state_name(state)}")

    def params(self, retry_delay=None):
        """PARAMS for the named user (or the fake); `retry_delay`, version 2: the seconds the
        next login from this address will wait if this one fails."""
        state = self.state
        assert isinstance(state, Named) and type(state) in (Named, Delaying), state_name(state)
        self.state = AwaitingShare(state.name, state.user, state.known, state.users)
        params = {
            "type": "params",
            "server": self.server_id,
            "salt": state.user.salt.hex(),
            "scrypt": {key: state.user.scrypt[key] for key in ("n", "r", "p")},
        }
        if self.version != 1:  # a version 1 client knows no such members
            params["version"] = self.version
            if retry_delay is not None:
                params["retry_delay"] = round(retry_delay, 3)
        return params

    def answer(self):
        """Our SHARE and confirmV for the client's share: from here its guess can be checked.
        ProtocolError for a share that is not a valid point."""
        state = self.state
        assert isinstance(state, ShareReceived), state_name(state)
        try:
            # Every verifier's points were computed when the users file was read, the fake's
            # too: the same work for every name (a cache filled by logins would tell them apart).
            share_v, keys = spake2plus.verifier_respond(
                wire.context(self.version), state.name.encode("utf-8"), self.server_id.encode("utf-8"),
                state.user.w0, state.user.L, state.share_p, points=state.users.verifier_points(state.user),
            )
        except spake2plus.InvalidPoint as problem:
            self.state = Failed()
            raise ProtocolError(f"invalid share: {problem}") from None
        self.state = AwaitingConfirm(state.name, state.user, state.known, state.users, keys)
        return {"type": "share", "share": share_v.hex(), "confirm": keys.confirm_v.hex()}

    def _confirm(self, state, confirm_p):
        # Unknown users fail here, exactly like a wrong password.
        if not (spake2plus.confirmation_matches(state.keys.confirm_p, confirm_p) and state.known):
            self.state = Failed()
            raise AuthenticationFailed()
        self.state = Authenticated(state.user)
        return Confirmed(state.user, state.keys.shared, {"type": "ok"})

    def forget_keys(self):
        """Nothing of the handshake is kept once the glue has the shared key."""
        self.state = Authenticated(None)

    def fail(self):
        self.state = Failed()


def state_name(state):
    """The state's name as docs/protocol.md section 9 gives it."""
    return {
        AwaitingHello: "hello", Named: "hello", Delaying: "delaying", AwaitingShare: "share",
        ShareReceived: "share", ShareWaiting: "share-waiting", AwaitingConfirm: "confirm",
        Authenticated: "ready", Failed: "closed",
    }[type(state)]
