"""The users file: verifiers only (salt, scrypt cost, w0, L), never passwords.

Format (docs/protocol.md, "Users file"): UTF-8 text, one JSON object per line; blank lines and
lines starting with '#' are ignored. The first object is the header
  {"eketwist-users": 1, "secret": "<64 hex>"}
whose secret makes the answers for unknown usernames stable; every other line is a user
  {"user": "alice", "scrypt": {"n": 32768, "r": 8, "p": 1}, "salt": "<hex>", "w0": "<hex>", "L": "<hex>"}
Unknown fields are kept as they are, so later versions can add per-user settings.
"""

import contextlib
import fcntl
import grp
import hashlib
import hmac
import json
import os
import pwd
import secrets
import stat
import tempfile
from dataclasses import dataclass, field

from . import spake2plus
from .pbkdf import check_scrypt  # noqa: F401 - part of this module's interface
from .wire import RIGHT_BUNDLES, check_username
from .wire import RIGHTS as RIGHT_NAMES

FORMAT_VERSION = 1
SALT_BYTES = 16
DEFAULT_SCRYPT = {"n": 2**15, "r": 8, "p": 1}
READ = "read"
READ_WRITE = "read-write"
BUNDLES = (READ, READ_WRITE)
QUOTAS = ("quota_bytes", "quota_files")
# A quota is a JSON integer; 2^63 - 1 bytes is more than any filesystem holds.
MAX_QUOTA = 2**63 - 1


class Rights(frozenset):
    """A user's rights (docs/protocol.md section 7.7): a set of RIGHT_NAMES. Shown, and
    written to the users file, as its bundle's name when it is one ("read", "read-write"),
    else as the names in their canonical order."""

    def __str__(self):
        for name, bundle in RIGHT_BUNDLES.items():
            if self == bundle:
                return name
        return ",".join(right for right in RIGHT_NAMES if right in self) or "none"

    def __repr__(self):
        return f"Rights({str(self)!r})"

    def to_json(self):
        label = str(self)
        return label if label in RIGHT_BUNDLES else [right for right in RIGHT_NAMES if right in self]


def parse_rights(value, comma_separated=False):
    """Rights from a bundle's name or a list of right names (the users file), or, with
    `comma_separated` (eke-users), a string of names separated by commas; ValueError naming
    what is not a right."""
    if isinstance(value, Rights):
        return value
    if isinstance(value, str):
        if value in RIGHT_BUNDLES:
            return Rights(RIGHT_BUNDLES[value])
        if comma_separated:
            value = value.split(",")
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(f"rights must be {' or '.join(BUNDLES)}, or a list of rights")
    for right in value:
        if right not in RIGHT_NAMES:
            shown = right if isinstance(right, str) else json.dumps(right)
            raise ValueError(
                f"unknown right {shown!r}: rights are {', '.join(RIGHT_NAMES)} (or the bundles {' and '.join(BUNDLES)})"
            )
    return Rights(value)


class UsersFileError(Exception):
    """The users file cannot be used; the message names the file and line."""


class UsersFileIOError(UsersFileError):
    """The users file, its directory or its lock cannot be read or written (an OSError): a
    problem of the file system, not of the file's contents. The message names the path."""


@dataclass(frozen=True)
class User:
    """A user's verifier. repr() shows the name only."""

    name: str
    scrypt: dict = field(repr=False)
    salt: bytes = field(repr=False)
    w0: int = field(repr=False)
    L: bytes = field(repr=False)
    root: str = None  # None: the server's --root
    rights: Rights = Rights(RIGHT_BUNDLES[READ])  # a bundle's name or a list of names is taken too
    extra: dict = field(default_factory=dict, repr=False)
    # docs/protocol.md section 7.7: at most this many bytes in regular files (and partial
    # uploads) under the root, and this many of them; None: no such limit.
    quota_bytes: int = field(default=None, repr=False)
    quota_files: int = field(default=None, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "rights", parse_rights(self.rights))

    def to_json(self):
        obj = {
            **self.extra,
            "user": self.name,
            "scrypt": dict(self.scrypt),
            "salt": self.salt.hex(),
            "w0": self.w0.to_bytes(spake2plus.SCALAR_BYTES, "big").hex(),
            "L": self.L.hex(),
            "rights": self.rights.to_json(),
        }
        if self.root is not None:
            obj["root"] = self.root
        for name in QUOTAS:
            if getattr(self, name) is not None:
                obj[name] = getattr(self, name)
        return obj

    @property
    def has_quota(self):
        return self.quota_bytes is not None or self.quota_files is not None


def make_user(name, password, scrypt=None, salt=None, root=None, rights=READ):
    """Register a user: scrypt over the password, then keep only w0 and L = w1*P."""
    scrypt = dict(scrypt or DEFAULT_SCRYPT)
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    w0, w1 = spake2plus.register(password.encode("utf-8"), salt, name.encode("utf-8"), **scrypt)
    w0, L = spake2plus.verifier_record(w0, w1)
    return User(name=name, scrypt=scrypt, salt=salt, w0=w0, L=L, root=root, rights=rights)


class Users:
    """A parsed users file: the server secret and the users by name."""

    def __init__(self, secret, users=(), secret_is_stored=True):
        self.secret = secret
        self.secret_is_stored = secret_is_stored
        self.by_name = {user.name: user for user in users}
        # An unknown name gets a cost drawn (stably, from the secret and the name) from the
        # real users' costs, in their proportions: a cost that one user in ten has, one unknown
        # name in ten shows too, so no cost marks a name as real or fake.
        self._costs = sorted(
            (tuple(user.scrypt[key] for key in ("n", "r", "p")) for user in self.by_name.values()),
        ) or [tuple(DEFAULT_SCRYPT[key] for key in ("n", "r", "p"))]
        # One fake verifier (w0, L) for every unknown name; its salt and cost still differ
        # per name. Without w1 or the discrete logarithm of L no client can tell two of its
        # handshakes apart, and its points are computed once, like a real user's.
        self._fake_w0 = self._derive(b"w0", b"") % (spake2plus.ORDER - 1) + 1
        self._fake_L = spake2plus.encode_point(
            spake2plus.GENERATOR * (self._derive(b"L", b"") % (spake2plus.ORDER - 1) + 1)
        )
        self._points = None  # (w0, L) -> VerifierPoints, see prepare()

    def __repr__(self):
        return f"<Users {len(self.by_name)} users>"

    def _derive(self, purpose, name_bytes):
        digest = hmac.new(self.secret, b"eketwist/1 fake " + purpose + b"\0" + name_bytes, hashlib.sha512)
        return int.from_bytes(digest.digest(), "big")

    @classmethod
    def new(cls):
        return cls(secrets.token_bytes(32))

    def lookup(self, name):
        """(user, known). An unknown name gets a stable fake verifier of the same shape, so
        the handshake looks the same for it and fails only at the key confirmation. The fake
        is derived for every name, known or not: the same work, so the time to answer does
        not tell them apart either."""
        name_bytes = name.encode("utf-8", "surrogatepass")
        n, r, p = self._costs[self._derive(b"cost", name_bytes) % len(self._costs)]
        fake = User(
            name=name,
            scrypt={"n": n, "r": r, "p": p},
            salt=self._derive(b"salt", name_bytes).to_bytes(64, "big")[:SALT_BYTES],
            w0=self._fake_w0,
            L=self._fake_L,
        )
        user = self.by_name.get(name)
        return (fake, False) if user is None else (user, True)

    def prepare(self):
        """Compute the fixed points of every verifier (each user's and the fake's), three of
        the five scalar multiplications a handshake would do: all at once, so that answering
        any name, known or not, recently seen or not, takes the same work (a cache filled as
        names log in would tell them apart). About 1 ms per user, at each (re)load."""
        points = {}
        for w0, L in {(user.w0, user.L) for user in self.by_name.values()} | {(self._fake_w0, self._fake_L)}:
            points[(w0, L)] = spake2plus.verifier_points(w0, L)
        self._points = points

    def verifier_points(self, user):
        """The precomputed points of `user` (from lookup); prepare() first if not done."""
        if self._points is None:
            self.prepare()
        return self._points[(user.w0, user.L)]


def _parse_user(obj):
    name = obj.get("user")
    problem = check_username(name)
    if problem:
        raise ValueError(problem)
    problem = check_scrypt(obj.get("scrypt"))
    if problem:
        raise ValueError(problem)
    try:
        salt = bytes.fromhex(obj["salt"])
        w0 = int.from_bytes(bytes.fromhex(obj["w0"]), "big")
        L = bytes.fromhex(obj["L"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("salt, w0 and L must be hex strings") from None
    if not 8 <= len(salt) <= 64:
        raise ValueError("salt must be 8 to 64 bytes")
    if not 0 < w0 < spake2plus.ORDER:
        raise ValueError("w0 is out of range")
    try:
        spake2plus.decode_point(L)
    except spake2plus.InvalidPoint:
        raise ValueError("L is not a valid point") from None
    root = obj.get("root")
    if root is not None and not (isinstance(root, str) and os.path.isabs(root) and "\x00" not in root and _is_utf8(root)):
        raise ValueError("root must be an absolute path")
    rights = parse_rights(obj.get("rights", READ))
    quotas = {}
    for quota in QUOTAS:
        value = obj.get(quota)
        if value is not None and not (type(value) is int and 0 <= value <= MAX_QUOTA):
            raise ValueError(f"{quota} must be a whole number, 0 or more")
        quotas[quota] = value
    known = {"user", "scrypt", "salt", "w0", "L", "root", "rights", *QUOTAS}
    extra = {k: v for k, v in obj.items() if k not in known}
    return User(
        name=name, scrypt=dict(obj["scrypt"]), salt=salt, w0=w0, L=L, root=root, rights=rights, extra=extra, **quotas,
    )


def parse(text, source="users file"):
    """Parse the users file text; raise UsersFileError naming the line of the first problem."""
    secret = None
    users = []
    seen = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{source}, line {lineno}"
        try:
            obj = json.loads(stripped)
        except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            raise UsersFileError(f"{where}: not a JSON object") from None
        if not isinstance(obj, dict):
            raise UsersFileError(f"{where}: not a JSON object")
        if "eketwist-users" in obj:
            if obj["eketwist-users"] != FORMAT_VERSION:
                raise UsersFileError(f"{where}: unsupported format version {obj['eketwist-users']!r}")
            try:
                secret = bytes.fromhex(obj["secret"])
            except (KeyError, TypeError, ValueError):
                secret = b""
            if len(secret) < 16:
                raise UsersFileError(f"{where}: the header's secret must be at least 16 bytes of hex")
            continue
        try:
            user = _parse_user(obj)
        except ValueError as problem:
            raise UsersFileError(f"{where}: {problem}") from None
        if user.name in seen:
            raise UsersFileError(f"{where}: user {user.name!r} appears twice")
        seen.add(user.name)
        users.append(user)
    if secret is None:
        # A hand-written file without a header: answers for unknown names then change at
        # each start, which the server logs as a warning.
        return Users(secrets.token_bytes(32), users, secret_is_stored=False)
    return Users(secret, users)


def _is_utf8(text):
    """False for lone surrogates (a JSON escape can make them), which no file name can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _missing_directory(path):
    """The message for a path whose directory does not exist, or None."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        return None
    return f"{path}: the directory {directory} does not exist"


def load(path):
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise UsersFileIOError(
            _missing_directory(path) or f"{path}: no such file (create it with: eke-users add NAME)"
        ) from None
    except OSError as problem:
        raise UsersFileIOError(f"{path}: cannot read: {problem.strerror or problem}") from None
    except UnicodeDecodeError:
        raise UsersFileError(f"{path}: not UTF-8 text, so not a users file") from None
    return parse(text, source=str(path))


def exposure(path):
    """A warning when users other than the file's owner and group may read or change it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if not (stat.S_ISREG(st.st_mode) and mode & 0o007):  # a directory is refused as unreadable
        return None
    return (
        f"{path} can be read or changed by any user (mode {mode:04o}): a reader can guess "
        f"passwords offline, a writer can add users; run: chmod o-rwx {path}"
    )


def dumps(users):
    lines = [
        "# eketwist users file: verifiers only, never passwords. Edit with eke-users.",
        json.dumps({"eketwist-users": FORMAT_VERSION, "secret": users.secret.hex()}),
    ]
    for user in users.by_name.values():
        line = json.dumps(user.to_json(), ensure_ascii=False)
        # A lone surrogate kept in an unknown field (from a JSON escape) cannot be written raw.
        lines.append(line if _is_utf8(line) else json.dumps(user.to_json()))
    return "\n".join(lines) + "\n"


def save(path, users):
    """Atomically replace the users file: a temporary file in the same directory, fsync,
    rename, fsync the directory. Readers see the old file or the new one, never a mix.
    The new file keeps the old one's owner, group and mode (a service user may read it through
    its group); a new file is 0600."""
    shown = path
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    try:
        _save(path, directory, users)
    except OSError as problem:
        message = _missing_directory(path) or f"{shown}: cannot save: {problem.strerror or problem}"
        if isinstance(problem, PermissionError):
            message += f" (the new copy is written in {directory}, then renamed over it)"
        raise UsersFileIOError(message) from None


def _save(path, directory, users):
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(prefix=".eke-users.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            if old is not None:
                _keep_owner(handle.fileno(), path, old)
            os.fchmod(handle.fileno(), 0o600 if old is None else stat.S_IMODE(old.st_mode))
            handle.write(dumps(users))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def writer_lock(path, on_wait=None):
    """Hold an exclusive flock on `<path>.lock` (created 0600) while reading, changing and
    saving the users file, so that two writers cannot each save their own copy and undo the
    other's change. Readers need no lock: save() replaces the file atomically. The lock is a
    file of its own because the users file itself is replaced at every save."""
    lock_path = f"{path}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as problem:
        raise UsersFileIOError(
            _missing_directory(path) or f"{lock_path}: cannot open the lock file: {problem.strerror}"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as problem:  # e.g. ENOLCK on a network file system
            raise UsersFileIOError(f"{lock_path}: cannot lock: {problem.strerror}") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _keep_owner(fd, path, old):
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except OSError:
        # Only root may give a file away, or to a group it is not in. A silent change of owner
        # or group could leave the server unable to read its users file: refuse instead.
        new = os.fstat(fd)
        if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
            raise UsersFileError(
                f"{path} belongs to {_account(old)}; running as {_account(new)}, eke-users cannot give "
                f"the new copy the same owner and group: run it as the file's owner or as root"
            ) from None


def _account(st):
    """'user:group' of a stat result, by name where there is one."""
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


class UsersStore:
    """The server's view of the users file: re-read when it changes on disk, keeping the last
    good copy (and logging why) when the new one is broken."""

    def __init__(self, path, log):
        self.path = path
        self.log = log
        # check(users) -> a problem or None: what a new file must also pass to replace the
        # last good copy (the daemon's: none of its own files inside a user's new root).
        self.check = None
        # reloaded(users): told of each new copy once it is in use (the daemon's: count the
        # roots of users with quotas).
        self.reloaded = None
        self._stamp = self._current_stamp()
        self.users = load(path)  # a broken file at start is fatal: the caller reports it
        self.users.prepare()  # before the first handshake, not during it
        self._warn_about()

    def _current_stamp(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self):
        stamp = self._current_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            self.reload(reason="it changed")
        return self.users

    def reload(self, reason):
        """Read the file again; a broken one is refused and the last good copy kept."""
        try:
            users = load(self.path)
            problem = self.check(users) if self.check is not None else None
            if problem:
                raise UsersFileError(problem)
            users.prepare()
        except UsersFileError as problem:
            self.log.error(
                "users file not reloaded ({reason}), keeping the last good copy: {problem}",
                reason=reason, problem=str(problem),
            )
            return False
        self.users = users
        if self.reloaded is not None:
            self.reloaded(users)
        self.log.info("users file reloaded ({reason}): {count} users", reason=reason, count=len(users.by_name))
        self._warn_about()
        return True

    def _warn_about(self):
        """Log what makes the file just read unsafe or useless, though it parses."""
        problem = exposure(self.path)
        if problem:
            self.log.warn("users file: {problem}", problem=problem)
        if not self.users.by_name:
            self.log.warn(
                "users file {path} has no users: nobody can log in (add one with eke-users)",
                path=self.path,
            )
        if not self.users.secret_is_stored:
            self.log.warn(
                "users file {path} has no header secret: unknown usernames get answers that "
                "change at each start and reload, unlike real users'; add the header line "
                "(docs/protocol.md, section 11)",
                path=self.path,
            )
