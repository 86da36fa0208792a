"""The client's side of the handshake (SPAKE2+ Prover, docs/protocol.md sections 3-4) as a state
machine without I/O: it takes decoded HANDSHAKE messages and returns what to send.

    Start           --hello()-->          AwaitingParams    (returns HELLO)
    AwaitingParams  --receive(PARAMS)-->  Deriving          (Params: the glue runs scrypt)
    Deriving        --derived(w0, w1)-->  AwaitingShare     (returns SHARE)
    AwaitingShare   --receive(SHARE)-->   AwaitingOk        (Confirm: CONFIRM, sent only once
                                                              the server proved itself)
    AwaitingOk      --receive(OK)-->      Authenticated     (Authenticated: the shared key)

The same machine serves both ways a client starts: the fast start (eketwist.prelude) runs the
first round on a plain socket in a thread while the main thread imports, then the Protocol
takes the machine over. So that thread stays light, the curve code (eketwist.spake2plus, which
loads pycryptodome's ECC) is imported only by the steps that need it, in the main thread.
"""

from . import pbkdf, wire
from .errors import ProtocolError, ServerNotAuthenticated


# Plain classes, not dataclasses: this module loads in the fast start, before anything else, and
# dataclasses (with inspect and typing) would cost every command about 30 ms of start-up.
class _Record:
    __slots__: tuple = ()

    def __init__(self, *values):
        for name, value in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    def __eq__(self, other):
        return type(other) is type(self) and all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # compared by value: not a dict key

    def __repr__(self):
        # Names only: the values include w0, w1, x and keys.
        return f"<{type(self).__name__}>"


class Start(_Record):
    __slots__ = ()


class AwaitingParams(_Record):
    __slots__ = ()


class Deriving(_Record):
    __slots__ = ("server_id",)
    server_id: str


class AwaitingShare(_Record):
    __slots__ = ("server_id", "w0", "w1", "x", "share_p")
    server_id: str
    w0: int
    w1: int
    x: int
    share_p: bytes


class AwaitingOk(_Record):
    __slots__ = ("server_id", "shared_key")
    server_id: str
    shared_key: bytes


class Authenticated(_Record):
    __slots__ = ("server_id", "shared_key")
    server_id: str
    shared_key: bytes


class Failed(_Record):
    __slots__ = ()


STATE_NAMES = {
    Start: "start", AwaitingParams: "params", Deriving: "deriving", AwaitingShare: "share",
    AwaitingOk: "ok", Authenticated: "ready", Failed: "closed",
}


# What receive() reports.
class Params(_Record):
    """PARAMS checked: run scrypt over the password with these, then call derived()."""

    __slots__ = ("server_id", "salt", "scrypt", "retry_delay")
    server_id: str
    salt: bytes
    scrypt: dict
    retry_delay: float  # seconds the server will make a next login wait if this one fails


class Confirm(_Record):
    __slots__ = ("reply",)
    reply: dict  # CONFIRM


class Done(_Record):
    __slots__ = ("server_id", "shared_key")
    server_id: str
    shared_key: bytes


def parse_params(message):
    """(server name, salt, scrypt cost) from PARAMS, refusing costs a fake server could use to
    make us spend minutes or gigabytes (docs/protocol.md section 3.2)."""
    server_id = wire.text_field(message, "server", wire.MAX_NAME_BYTES)
    salt = wire.hex_field(message, "salt", 8, 64)
    scrypt = message.get("scrypt")
    problem = pbkdf.check_scrypt(scrypt)
    if problem:
        raise ProtocolError(f"the server asked for unreasonable password hashing: {problem}")
    return server_id, salt, {key: scrypt[key] for key in ("n", "r", "p")}


def _retry_delay(message):
    """PARAMS' optional retry_delay: only ever shown to the user, so a nonsensical one is
    taken as absent rather than failing the login."""
    delay = message.get("retry_delay")
    if isinstance(delay, (int, float)) and not isinstance(delay, bool) and 0 <= delay < 1e7:
        return float(delay)
    return 0.0


class Prover:
    def __init__(self, username, versions=wire.VERSIONS):
        self.username = username
        self.versions = tuple(versions)  # what HELLO offers
        self.version = 1  # what PARAMS chose (1 when it says nothing)
        self.state: _Record = Start()

    @property
    def name(self):
        return STATE_NAMES[type(self.state)]

    def hello(self):
        assert isinstance(self.state, Start), self.state
        self.state = AwaitingParams()
        hello = {"type": "hello", "version": wire.PROTOCOL_VERSION, "user": self.username}
        if self.versions != (1,):
            hello["versions"] = list(self.versions)
        return hello

    def receive(self, message):
        """One HANDSHAKE message from the server (not an ERROR: the glue reports those):
        Params, Confirm or Done; ProtocolError if the state does not accept it."""
        kind, state = message["type"], self.state
        if kind == "params" and isinstance(state, AwaitingParams):
            server_id, salt, scrypt = parse_params(message)
            version = wire.int_field(message, "version", 1, 2**31) if "version" in message else 1
            if version not in self.versions:
                raise ProtocolError(f"the server chose protocol version {version}, which was not offered")
            self.version = version
            self.state = Deriving(server_id)
            return Params(server_id, salt, scrypt, _retry_delay(message))
        if kind == "share" and isinstance(state, AwaitingShare):
            return self._share(state, message)
        if kind == "ok" and isinstance(state, AwaitingOk):
            self.state = Authenticated(state.server_id, state.shared_key)
            return Done(state.server_id, state.shared_key)
        raise ProtocolError(f"unexpected {kind[:40]!r} message in state {self.name!r}")

    def derived(self, w0, w1):
        """scrypt is done: our SHARE."""
        from . import spake2plus

        state = self.state
        assert isinstance(state, Deriving), state
        x, share_p = spake2plus.prover_share(w0)
        self.state = AwaitingShare(state.server_id, w0, w1, x, share_p)
        return {"type": "share", "share": share_p.hex()}

    def _share(self, state, message):
        from . import spake2plus

        share_v = wire.hex_field(message, "share", spake2plus.POINT_BYTES)
        confirm_v = wire.hex_field(message, "confirm", 32)
        self.state = Failed()  # until the server has proved itself; w0, w1 and x are dropped
        try:
            keys = spake2plus.prover_finish(
                wire.context(self.version), self.username.encode("utf-8"), state.server_id.encode("utf-8"),
                state.w0, state.w1, state.x, state.share_p, share_v,
            )
        except spake2plus.InvalidPoint as problem:
            raise ProtocolError(f"invalid share from the server: {problem}") from None
        # The server proves itself first: we reveal nothing more to one that cannot.
        if not spake2plus.confirmation_matches(keys.confirm_v, confirm_v):
            raise ServerNotAuthenticated()
        self.state = AwaitingOk(state.server_id, keys.shared)
        return Confirm({"type": "confirm", "confirm": keys.confirm_p.hex()})

    def fail(self):
        self.state = Failed()
