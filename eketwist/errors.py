"""Every failure eketwist reports, in one table: wire code, exit code and user-facing message.

An exception's docstring is its default message. The server sends only `code` and a message it
chose (never a traceback); the client maps the code back to the same class and to an exit code.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_AUTH = 4
EXIT_NOT_FOUND = 5
EXIT_INTEGRITY = 6
EXIT_PROTOCOL = 7
EXIT_LOCAL_IO = 8
EXIT_REFUSED = 9
EXIT_EXISTS = 10
EXIT_NO_SPACE = 11
EXIT_BUSY = 12
EXIT_LOCKED_OUT = 13
# A signal's conventional status (128 + its number): SIGINT 130, SIGTERM 143, SIGPIPE 141.
EXIT_SIGNAL_BASE = 128

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  unexpected failure (a bug, or an internal error on the server)
  2  usage error (bad command line)
  3  connection failed, was lost, or timed out
  4  authentication failed (wrong user or password, or the server could not prove it knows it)
  5  remote file not found, or not a regular file
  6  integrity failure (a record, the size or the SHA-1 did not verify); nothing was written
  7  protocol error (the peer broke the protocol, or asked for something unsupported)
  8  local I/O error (cannot read or write a local file)
  9  refused (permission denied, a read-only account, or a path outside the root)
  10 the destination exists (use --force to replace it)
  11 no space: the receiving disk is full, or the file is over a size limit
  12 busy: another transfer to the same file is in progress, or the server asks to try later
  13 locked out: too many failed logins from this address; the server says for how long
  130, 143  interrupted (SIGINT, e.g. Ctrl-C; SIGTERM): run the same command again to resume
  141 the output was closed (e.g. piped into head): the command stopped quietly
"""


class EketwistError(Exception):
    """Unexpected failure."""

    code = "internal"
    exit_code = EXIT_FAILURE
    # Seconds before trying again is worth it, when the server says (an ERROR's retry_after).
    retry_after = None
    # What a request refused part-way had done already (a recursive REMOVE's storage.Removed).
    freed = None

    def __init__(self, message=None):
        super().__init__(message or self.__doc__.strip())

    @property
    def message(self):
        return self.args[0]


class UsageError(EketwistError):
    """Bad usage."""

    code = "usage"
    exit_code = EXIT_USAGE


class ConnectionFailed(EketwistError):
    """The connection to the server failed or was lost."""

    code = "connection"
    exit_code = EXIT_CONNECTION


class NameMismatch(ConnectionFailed):
    """The server's TLS certificate is not for the host name given."""

    code = "name-mismatch"


class Timeout(ConnectionFailed):
    """The connection timed out."""

    code = "timeout"


class AuthenticationFailed(EketwistError):
    """Authentication failed: wrong username or password."""

    code = "auth-failed"
    exit_code = EXIT_AUTH


class ServerNotAuthenticated(AuthenticationFailed):
    """The server could not prove it knows your password: wrong password, or not the server you think."""

    code = "server-auth-failed"


class NotFound(EketwistError):
    """No such file on the server."""

    code = "not-found"
    exit_code = EXIT_NOT_FOUND


class NotAFile(NotFound):
    """Not a regular file."""

    code = "not-a-file"


class NotADirectory(NotFound):
    """Not a directory."""

    code = "not-a-directory"


class PermissionDenied(EketwistError):
    """Permission denied on the server."""

    code = "permission-denied"
    exit_code = EXIT_REFUSED


class BadPath(PermissionDenied):
    """Path refused: it must be relative and stay inside the server's root."""

    code = "bad-path"


class Exists(EketwistError):
    """The destination already exists (use --force to replace it)."""

    code = "exists"
    exit_code = EXIT_EXISTS


class NotEmpty(Exists):
    """The directory is not empty."""

    code = "not-empty"


class NoSpace(EketwistError):
    """No space left on the receiving disk."""

    code = "no-space"
    exit_code = EXIT_NO_SPACE


class TooLarge(NoSpace):
    """The file is larger than the server accepts."""

    code = "too-large"


class Busy(EketwistError):
    """Another transfer to the same file is in progress; try again later."""

    code = "busy"
    exit_code = EXIT_BUSY


class TryLater(Busy):
    """The server refused the connection for now (too many connections or failed logins)."""

    code = "try-later"


class LockedOut(TryLater):
    """Too many failed logins from your address: locked out for a while."""

    code = "locked-out"  # on the wire: try-later, with this reason
    exit_code = EXIT_LOCKED_OUT


class IntegrityError(EketwistError):
    """Integrity check failed: the data was altered or cut short."""

    code = "integrity"
    exit_code = EXIT_INTEGRITY


class ProtocolError(EketwistError):
    """The peer broke the protocol."""

    code = "protocol"
    exit_code = EXIT_PROTOCOL


class Unsupported(ProtocolError):
    """The peer does not support this request."""

    code = "unsupported"


class LocalIOError(EketwistError):
    """Local I/O error."""

    code = "local-io"
    exit_code = EXIT_LOCAL_IO


class Interrupted(EketwistError):
    """Interrupted: run the same command again to resume."""

    code = "interrupted"

    def __init__(self, signum):
        super().__init__("interrupted: run the same command again to resume")
        self.exit_code = EXIT_SIGNAL_BASE + signum


class OutputClosed(EketwistError):
    """The output was closed."""

    code = "output-closed"
    exit_code = EXIT_SIGNAL_BASE + 13  # SIGPIPE's: what a tool killed by it would exit with


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


BY_CODE = {cls.code: cls for cls in [EketwistError, *_all_subclasses(EketwistError)]}


# What an ERROR may say (docs/protocol.md section 8). A failure of another kind, such as a
# disk's I/O error on the server, is "internal" to the peer.
WIRE_CODES = frozenset({
    "auth-failed", "server-auth-failed", "not-found", "not-a-file", "not-a-directory", "not-empty",
    "permission-denied", "bad-path",
    "exists", "no-space", "too-large", "busy", "try-later", "integrity", "protocol", "unsupported",
    "timeout", "internal",
})
# The codes that may refuse a request and leave the connection ready (section 3.7): these
# answer any request; no-space also MKDIR, PUT and an upload's END; integrity only that END.
# Every other ERROR after authentication is fatal, and so is every ERROR in a data phase.
REFUSAL_CODES = frozenset({
    "not-found", "not-a-file", "permission-denied", "bad-path", "exists", "too-large", "busy",
    "unsupported",
})
# And for the requests that manage files (docs/protocol.md section 7.10).
MANAGE_REFUSAL_CODES = REFUSAL_CODES | {"not-a-directory", "not-empty"}
WRITE_REFUSAL_CODES = REFUSAL_CODES | {"no-space"}
UPLOAD_END_REFUSAL_CODES = WRITE_REFUSAL_CODES | {"integrity"}


def wire_code(error):
    """The code an ERROR gives `error`: its own, or that of the nearest kind it refines (a
    LockedOut travels as try-later, with its own code as the reason); else internal."""
    for cls in type(error).__mro__:
        code = getattr(cls, "code", None)
        if code in WIRE_CODES:
            return code
    return "internal"


def error_message(error):
    """The ERROR message that tells the peer about `error` (docs/protocol.md section 3.7)."""
    code = wire_code(error)
    message = {"type": "error", "code": code, "message": error.message}
    if code != error.code and code != "internal":
        message["reason"] = error.code
    if error.retry_after is not None:
        message["retry_after"] = round(error.retry_after, 3)
    return message


def from_wire(message):
    """The exception a peer's ERROR stands for; a code outside section 8 (our own local ones
    included: a server cannot have a local I/O error of ours) is a generic failure. A
    `reason` that refines the code (locked-out for try-later) gives the finer kind."""
    code = str(message.get("code"))
    cls = BY_CODE.get(code, EketwistError) if code in WIRE_CODES else EketwistError
    finer = BY_CODE.get(str(message.get("reason")))
    if finer is not None and finer is not cls and issubclass(finer, cls):
        cls = finer
    text = message.get("message")
    error = cls(text if isinstance(text, str) and text else None)
    retry_after = message.get("retry_after")
    if isinstance(retry_after, (int, float)) and not isinstance(retry_after, bool) and 0 <= retry_after < 1e9:
        error.retry_after = float(retry_after)
    return error
