"""The users file as eke-users and the daemon handle it: real files, real eke-users processes."""

import ctypes
import json
import os
import pathlib
import pty
import select
import signal
import stat
import subprocess
import sys
import time

import pytest
from twisted.logger import Logger, LogLevel, formatEvent

import eketwist
from eketwist import userdb
from eketwist.users import MIN_PASSWORD_LENGTH

from tests.support.processes import FAST_SCRYPT

USERS = [sys.executable, "-m", "eketwist.users"]
PASSWORD = "a password long enough\n"


def start_users(path, *args):
    return subprocess.Popen(
        [*USERS, "--users", str(path), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def eke_users(path, *args, password=None):
    return subprocess.run(
        [*USERS, "--users", str(path), *args], input=password, capture_output=True, text=True, timeout=60,
    )


def add_args(name):
    return "add", name, "--password-stdin", "--scrypt-n", str(FAST_SCRYPT["n"])


def _settled(process):
    """"exited", the CPU time of a sleeping process, or None while it runs."""
    if process.poll() is not None:
        return "exited"
    fields = pathlib.Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    state, utime, stime = fields[0], fields[11], fields[12]
    return (utime, stime) if state == "S" else None


def wait_until_settled(processes, timeout=60):
    """Wait until each process has exited or sleeps without using the CPU: then it waits for its
    password (having read the users file) or for another's lock."""
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        now = [_settled(process) for process in processes]
        if None not in now and now == previous:
            return
        previous = now
        time.sleep(0.2)
    raise AssertionError("the eke-users processes did not settle")


def saved(path, *names):
    users = userdb.Users.new()
    for name in names:
        users.by_name[name] = userdb.make_user(name, f"{name}'s password", FAST_SCRYPT)
    userdb.save(path, users)
    return users


def daemon_warnings(events):
    return [formatEvent(event) for event in events if event["log_level"] == LogLevel.warn]


def test_concurrent_adds_lose_no_user(tmp_path):
    path = tmp_path / "users"
    names = [f"user{i}" for i in range(8)]
    processes = [start_users(path, *add_args(name)) for name in names]
    # Without a lock, all eight now hold the same (empty) copy and the last to save wins.
    wait_until_settled(processes)
    for process, name in zip(processes, names):  # in any order: only the lock holder reads now
        process.stdin.write(f"{name}'s password\n")
        process.stdin.close()
    for process in processes:
        assert process.wait(60) == 0, process.stderr.read()
    assert sorted(userdb.load(path).by_name) == names
    assert oct((tmp_path / "users.lock").stat().st_mode & 0o777) == oct(0o600)


def test_a_removal_racing_an_add_stays_removed(tmp_path):
    path = tmp_path / "users"
    saved(path, "mallory")
    adding = start_users(path, *add_args("bob"))
    wait_until_settled([adding])  # it has read the file, mallory included
    removing = start_users(path, "remove", "mallory")
    wait_until_settled([removing])  # done, or waiting for the lock
    _, err = adding.communicate("bob's password\n", timeout=60)
    assert adding.returncode == 0, err
    _, err = removing.communicate(timeout=60)
    assert removing.returncode == 0, err
    assert sorted(userdb.load(path).by_name) == ["bob"]


def test_a_rewrite_keeps_mode_owner_and_group(tmp_path):
    path = tmp_path / "users"
    assert eke_users(path, *add_args("alice"), password=PASSWORD).returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # a new file
    # README's set-up for a dynamic service user: readable through the group.
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    path.chmod(0o640)
    before = path.stat()
    result = eke_users(path, *add_args("bob"), password=PASSWORD)
    assert result.returncode == 0, result.stderr
    after = path.stat()
    assert after.st_ino != before.st_ino  # really rewritten
    assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == (0o640, before.st_uid, before.st_gid)


def _without_cap_chown():
    # Root without CAP_CHOWN can give files away no more than any other user.
    if ctypes.CDLL(None, use_errno=True).prctl(24, 0, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_CHOWN
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to own the file as another user")
@pytest.mark.parametrize("owner", [(65534, 65534), (0, 65534)], ids=["another-user", "another-group"])
def test_a_rewrite_that_cannot_keep_the_owner_is_refused(tmp_path, owner):
    path = tmp_path / "users"
    saved(path, "alice")
    os.chown(path, *owner)
    path.chmod(0o640)
    before = path.read_bytes()
    result = subprocess.run(
        [*USERS, "--users", str(path), *add_args("bob")], input=PASSWORD, capture_output=True, text=True,
        timeout=60, preexec_fn=_without_cap_chown,
    )
    assert result.returncode == 1
    assert "cannot give the new copy the same owner and group" in result.stderr
    assert result.stderr.count("\n") == 1
    assert path.read_bytes() == before
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*owner, 0o640)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users", "users.lock"]  # no temporary file left


def test_eke_users_warns_about_a_file_others_can_read(tmp_path):
    path = tmp_path / "users"
    saved(path, "alice")
    path.chmod(0o640)  # group-readable is README's advice, not a problem
    assert eke_users(path, "list").stderr == ""
    path.chmod(0o644)
    for result in (eke_users(path, "list"), eke_users(path, *add_args("bob"), password=PASSWORD)):
        assert result.returncode == 0
        assert result.stderr.startswith("eke-users: warning: ") and result.stderr.count("\n") == 1
        assert "mode 0644" in result.stderr and "chmod o-rwx" in result.stderr


def test_the_daemon_warns_about_a_file_others_can_read(tmp_path):
    path = tmp_path / "users"
    users = saved(path, "alice")
    path.chmod(0o604)
    events = []
    store = userdb.UsersStore(str(path), Logger(observer=events.append))
    assert len(daemon_warnings(events)) == 1 and "mode 0604" in daemon_warnings(events)[0]
    users.by_name["bob"] = userdb.make_user("bob", "pw", FAST_SCRYPT)
    userdb.save(path, users)
    del events[:]
    assert "bob" in store.current().by_name
    assert len(daemon_warnings(events)) == 1 and "mode 0604" in daemon_warnings(events)[0]


def headerless(path, *names):
    """A hand-written file: user lines only. Returns the hex secrets in it."""
    users = [userdb.make_user(name, "pw", FAST_SCRYPT).to_json() for name in names]
    path.write_text("".join(json.dumps(user) + "\n" for user in users))
    path.chmod(0o600)
    return [user[key] for user in users for key in ("salt", "w0", "L")]


def test_eke_users_does_not_invent_a_secret_for_a_headerless_file(tmp_path):
    path = tmp_path / "users"
    secrets_in_file = headerless(path, "alice")
    before = path.read_bytes()
    changes = [
        add_args("bob"), ("passwd", "alice", "--password-stdin", "--scrypt-n", str(FAST_SCRYPT["n"])),
        ("modify", "alice", "--rights", "read-write"), ("remove", "alice"),
    ]
    for args in changes:
        result = eke_users(path, *args, password=PASSWORD)
        assert result.returncode == 1, args
        assert "no header line" in result.stderr and result.stderr.count("\n") == 1
        assert not any(secret in result.stderr for secret in secrets_in_file)
        assert path.read_bytes() == before
    assert eke_users(path, "list").returncode == 0  # reading it is fine
    # An empty file has no secret worth keeping: the first add writes the header.
    path.write_text("# users\n")
    path.chmod(0o600)
    assert eke_users(path, *add_args("bob"), password=PASSWORD).returncode == 0
    assert userdb.load(path).secret_is_stored


def test_the_daemon_loads_a_headerless_file_and_warns_at_each_reload(tmp_path):
    path = tmp_path / "users"
    headerless(path, "alice")
    events = []
    store = userdb.UsersStore(str(path), Logger(observer=events.append))
    assert "alice" in store.current().by_name
    assert ["no header secret" in text for text in daemon_warnings(events)] == [True]
    headerless(path, "alice", "bob")
    del events[:]
    assert "bob" in store.current().by_name
    assert ["no header secret" in text for text in daemon_warnings(events)] == [True]


def test_a_file_without_users_is_reported(tmp_path):
    path = tmp_path / "users"
    path.touch(mode=0o600)
    users = userdb.Users.new()
    for content in (lambda: None, lambda: userdb.save(path, users)):  # empty, then a header only
        content()
        result = eke_users(path, "list")
        assert (result.returncode, result.stdout) == (0, "")
        assert result.stderr == f"eke-users: warning: {path} has no users: nobody can log in\n"
    events = []
    store = userdb.UsersStore(str(path), Logger(observer=events.append))
    assert ["nobody can log in" in text for text in daemon_warnings(events)] == [True]
    users.by_name["alice"] = userdb.make_user("alice", "pw", FAST_SCRYPT)
    userdb.save(path, users)
    del events[:]
    assert "alice" in store.current().by_name and daemon_warnings(events) == []
    del users.by_name["alice"]
    userdb.save(path, users)
    assert store.current().by_name == {}
    assert ["nobody can log in" in text for text in daemon_warnings(events)] == [True]


# -- the command line: options, confirmations, passwords, errors --------------------------------

def users_command(*args, password=None, **options):
    """eke-users with exactly these arguments (no --users put first)."""
    return subprocess.run([*USERS, *args], input=password, capture_output=True, text=True, timeout=60, **options)


def fast(*args):
    return (*args, "--scrypt-n", str(FAST_SCRYPT["n"]))


def assert_one_line_error(result, code, *fragments):
    """The failure the CLI promises: its exit code, one line on stderr, no traceback, no warning."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stderr.startswith("eke-users: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.mark.parametrize("command", [
    fast("add", "carol", "--password-stdin"), fast("passwd", "alice", "--password-stdin"), ("modify", "alice", "--rights", "read-write"),
    ("remove", "alice"), ("list",),
])
def test_global_options_go_after_the_command_too(tmp_path, command):
    path = tmp_path / "users"
    saved(path, "alice")
    result = users_command(*command, "--users", str(path), password=PASSWORD)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (tmp_path / "eke-users").exists() is False  # not the default file
    # Given twice, the later one wins, as with every option.
    other = tmp_path / "other"
    saved(other, "alice")
    assert users_command("--users", str(tmp_path / "unused"), *command, "--users", str(other), password=PASSWORD).returncode == 0


def test_each_change_is_confirmed_in_one_line(tmp_path):
    path = tmp_path / "users"
    own = tmp_path / "alices-root"
    own.mkdir()
    steps = [
        (fast("add", "alice", "--password-stdin", "--rights", "read-write", "--root", str(own)), f"added alice (read-write, root {own})"),
        (fast("add", "bob", "--password-stdin"), "added bob (read, server root)"),
        (("modify", "bob", "--rights", "read-write"), "modified bob (read-write, server root)"),
        (("modify", "bob", "--rights", "read-write"), "bob unchanged (read-write, server root)"),
        (("modify", "alice", "--root", "default", "--rights", "read"), "modified alice (read, server root)"),
        (fast("passwd", "bob", "--password-stdin"), f"changed the password of bob (scrypt n={FAST_SCRYPT['n']})"),
        (("remove", "bob"), "removed bob (was read-write, server root)"),
    ]
    for args, line in steps:
        result = eke_users(path, *args, password=PASSWORD)
        assert (result.returncode, result.stdout, result.stderr) == (0, line + "\n", ""), args
    assert eke_users(path, "list").stdout == f"alice\tread\t(server root)\tscrypt n={FAST_SCRYPT['n']} r=8 p=1\tno quota\n"


def test_modify_with_nothing_to_change_is_a_usage_error(tmp_path):
    path = tmp_path / "users"
    saved(path, "bob")
    before = path.read_bytes()
    assert_one_line_error(eke_users(path, "modify", "bob"), 2, "nothing to change", "--root", "--rights")
    assert path.read_bytes() == before


def test_a_short_password_is_refused_unless_allowed(tmp_path):
    assert MIN_PASSWORD_LENGTH == 8  # README and --help say 8
    path = tmp_path / "users"
    short, enough = "x" * (MIN_PASSWORD_LENGTH - 1) + "\n", "x" * MIN_PASSWORD_LENGTH + "\n"
    for command in ("add", "passwd"):
        before = path.read_bytes() if path.exists() else None
        result = eke_users(path, *fast(command, "alice"), password=short)
        assert_one_line_error(result, 2, f"shorter than {MIN_PASSWORD_LENGTH} characters", "--allow-short-password")
        assert (path.read_bytes() if path.exists() else None) == before
        result = eke_users(path, *fast(command, "alice", "--allow-short-password"), password=short)
        assert result.returncode == 0 and result.stderr == ""
    assert eke_users(path, *fast("passwd", "alice"), password=enough).returncode == 0
    assert_one_line_error(eke_users(path, *fast("add", "bob", "--allow-short-password"), password="\n"), 2, "empty")
    for command in ("add", "passwd"):
        help_text = " ".join(users_command(command, "--help").stdout.split())
        assert f"at least {MIN_PASSWORD_LENGTH} characters unless --allow-short-password" in help_text


@pytest.mark.parametrize("command", [fast("add", "alice"), ("list",), ("modify", "alice", "--rights", "read"), ("remove", "alice")])
def test_a_missing_directory_is_named(tmp_path, command):
    path = tmp_path / "nonexistent" / "dir" / "users"
    result = eke_users(path, *command, password=PASSWORD)
    assert_one_line_error(result, 8, f"{path}: the directory {path.parent} does not exist")
    assert not (tmp_path / "nonexistent").exists()


def test_version():
    result = users_command("--version")
    assert (result.returncode, result.stdout) == (0, f"eke-users {eketwist.__version__}\n")


def test_help_lists_the_exit_codes():
    help_text = users_command("--help").stdout
    for code in ("0    success", "1    refused", "2    usage error", "8    the users file", "130  interrupted"):
        assert code in help_text


def _nested(path):
    path.write_text("[" * 100000 + "\n")


def _lone_surrogate_root(path):
    saved(path, "alice")
    user = json.loads(path.read_text().splitlines()[-1])
    path.write_text(path.read_text() + json.dumps(dict(user, user="bob", root="/srv/\ud800")) + "\n")


def _binary(path):
    path.write_bytes(b"\xff\xfe\x00garbage\n")


@pytest.mark.parametrize("prepare, args, stdin, code, fragment", [
    (None, ("add", "alice", "--scrypt-n", "x"), None, 2, "--scrypt-n"),
    (None, ("add", "alice", "--scrypt-n", "3"), None, 2, "--scrypt-n 3"),
    (None, fast("add", "alice", "--rights", "all"), None, 2, "--rights"),
    (None, fast("add", "alice", "--root", "/nonexistent/root"), None, 2, "--root /nonexistent/root: not a directory"),
    (None, fast("add", "alice", "--root", b"/tmp/\xff".decode("utf-8", "surrogateescape")), None, 2, "--root"),
    (None, fast("add", "a b"), None, 2, "NAME 'a b'"),
    (None, ("frobnicate",), None, 2, "frobnicate"),
    (None, (), None, 2, "COMMAND"),
    (None, fast("add", "alice"), "", 2, "standard input is empty"),
    (None, fast("add", "alice"), b"\xff\xfe long enough\n", 2, "not UTF-8"),
    ("saved", ("modify", "nobody", "--rights", "read"), None, 1, "no user 'nobody'"),
    ("saved", ("remove", "nobody"), None, 1, "no user 'nobody'"),
    ("saved", fast("passwd", "nobody"), PASSWORD, 1, "no user 'nobody'"),
    ("saved", fast("add", "alice"), PASSWORD, 1, "already exists"),
    (lambda path: path.write_text("{not json\n"), ("list",), None, 1, "line 1: not a JSON object"),
    (_nested, fast("add", "alice"), PASSWORD, 1, "line 1: not a JSON object"),
    (_binary, ("list",), None, 1, "not UTF-8 text"),
    (_lone_surrogate_root, ("list",), None, 1, "root must be an absolute path"),
    (lambda path: path.mkdir(), ("list",), None, 8, "cannot read: Is a directory"),
    (lambda path: path.mkdir(), fast("add", "alice"), PASSWORD, 8, "cannot read: Is a directory"),
    (None, ("list",), None, 8, "no such file"),
    (None, ("remove", "alice"), None, 8, "no such file"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, prepare, args, stdin, code, fragment):
    path = tmp_path / "users"
    if prepare == "saved":
        saved(path, "alice")
    elif prepare is not None:
        prepare(path)
        path.chmod(0o700)  # no warning about a file others may read
    if isinstance(stdin, bytes):
        result = subprocess.run([*USERS, "--users", str(path), *args], input=stdin, capture_output=True, timeout=60)
        result.stderr = result.stderr.decode()
    else:
        result = eke_users(path, *args, password=stdin)
    if code == 2 and not result.stderr.startswith("eke-users: "):  # argparse's own: usage, then the error
        assert result.returncode == 2 and fragment in result.stderr.splitlines()[-1]
        assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    else:
        assert_one_line_error(result, code, fragment)
    if path.is_file() and prepare in (None, "saved"):
        userdb.load(path)  # still whole


def test_without_a_terminal_the_password_is_the_first_line_of_stdin(tmp_path):
    # Without a terminal, getpass would read stdin with a GetPassWarning on stderr.
    path = tmp_path / "users"
    result = eke_users(path, *fast("add", "alice"), password=PASSWORD)
    assert (result.returncode, result.stdout, result.stderr) == (0, "added alice (read, server root)\n", "")
    assert "otherwise (or with --password-stdin) it is the first line of standard input" in " ".join(users_command("add", "--help").stdout.split())


def test_a_full_standard_output_is_reported(tmp_path):
    path = tmp_path / "users"
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [*USERS, "--users", str(path), *fast("add", "alice")], input=PASSWORD, stdout=full,
            stderr=subprocess.PIPE, text=True, timeout=60,
        )
    assert_one_line_error(result, 8, "standard output: No space left on device", "the change was made: added alice")
    assert "alice" in userdb.load(path).by_name


def _as_a_plain_user():
    """Root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH obeys file modes like anyone."""
    if os.geteuid() == 0:
        for cap in (1, 2):
            if ctypes.CDLL(None, use_errno=True).prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_permission_denied_names_the_path(tmp_path):
    directory = tmp_path / "etc"
    directory.mkdir()
    path = directory / "users"
    saved(path, "alice")
    (directory / "users.lock").touch(mode=0o600)

    def run(*args):
        return subprocess.run(
            [*USERS, "--users", str(path), *args], input=PASSWORD, capture_output=True, text=True, timeout=60,
            preexec_fn=_as_a_plain_user,
        )

    path.chmod(0o000)
    assert_one_line_error(run("list"), 8, f"{path}: cannot read: Permission denied")
    path.chmod(0o600)
    directory.chmod(0o500)  # the file is readable, but no new copy can be written beside it
    try:
        before = path.read_bytes()
        assert_one_line_error(run(*fast("add", "bob")), 8, f"{path}: cannot save: Permission denied", str(directory))
        assert path.read_bytes() == before
        (directory / "users.lock").unlink()
        assert_one_line_error(run("remove", "alice"), 8, f"{path}.lock: cannot open the lock file: Permission denied")
    finally:
        directory.chmod(0o700)


def test_ctrl_c_while_reading_the_password_from_a_pipe(tmp_path):
    path = tmp_path / "users"
    process = start_users(path, *fast("add", "alice"))
    wait_until_settled([process])  # reading stdin
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out, err) == (130, "", "eke-users: interrupted\n")
    assert not path.exists()


class Terminal:
    """eke-users with a pseudo-terminal for stdin, stdout and stderr: it prompts as for a person."""

    def __init__(self, *args):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen([*USERS, *args], stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.seen = b""

    def expect(self, text, timeout=60):
        deadline = time.monotonic() + timeout
        while text.encode() not in self.seen:
            assert time.monotonic() < deadline, self.seen
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the process has closed its side
                    chunk = b""
                assert chunk or text.encode() in self.seen, self.seen
                self.seen += chunk
        return self

    def type(self, text):
        os.write(self.master, text.encode())
        return self

    def finish(self):
        code = self.process.wait(60)
        try:
            while select.select([self.master], [], [], 0.2)[0]:
                chunk = os.read(self.master, 4096)
                if not chunk:
                    break
                self.seen += chunk
        except OSError:
            pass
        os.close(self.master)
        return code, self.seen.decode()


def test_on_a_terminal_the_password_is_asked_twice(tmp_path):
    path = tmp_path / "users"
    terminal = Terminal("--users", str(path), *fast("add", "alice"))
    terminal.expect("New password for alice: ").type("a password long enough\n").expect("Again: ").type("another one\n")
    code, seen = terminal.finish()
    assert code == 2 and "eke-users: the passwords do not match" in seen and "long enough" not in seen  # no echo
    terminal = Terminal("--users", str(path), *fast("add", "alice"))
    terminal.expect("New password for alice: ").type("a password long enough\n").expect("Again: ").type("a password long enough\n")
    code, seen = terminal.finish()
    assert code == 0 and "added alice (read, server root)" in seen and "Warning" not in seen


@pytest.mark.parametrize("stop, code, message", [
    (lambda terminal: terminal.process.send_signal(signal.SIGINT), 130, "eke-users: interrupted"),
    (lambda terminal: terminal.type("\x04"), 2, "eke-users: no password: end of input"),  # Ctrl-D
])
def test_ctrl_c_or_end_of_input_at_the_prompt(tmp_path, stop, code, message):
    path = tmp_path / "users"
    terminal = Terminal("--users", str(path), *fast("add", "alice"))
    stop(terminal.expect("New password for alice: "))
    exit_code, seen = terminal.finish()
    assert exit_code == code
    # The message starts a line of its own, after the prompt.
    assert seen.endswith(f"New password for alice: \r\n{message}" + seen.split(message, 1)[1]), seen
    assert seen.count("\n") == 2 and "Traceback" not in seen
    assert not path.exists()


# -- finer rights (docs/protocol.md section 7.7)


def test_rights_as_bundles_or_lists_of_names(tmp_path):
    path = tmp_path / "users"
    steps = [
        (fast("add", "carol", "--password-stdin", "--rights", "list,read,write"), "added carol (list,read,write, server root)"),
        (("modify", "carol", "--rights", "read,list"), "modified carol (read, server root)"),  # the bundle's set
        (("modify", "carol", "--rights", "chmod,delete,list"), "modified carol (list,delete,chmod, server root)"),
        (("modify", "carol", "--rights", ",".join(userdb.RIGHT_NAMES)), "modified carol (read-write, server root)"),
    ]
    for args, line in steps:
        result = eke_users(path, *args, password=PASSWORD)
        assert (result.returncode, result.stdout, result.stderr) == (0, line + "\n", ""), args
    eke_users(path, "modify", "carol", "--rights", "write,list")
    record = json.loads(path.read_text().splitlines()[-1])
    assert record["rights"] == ["list", "write"]  # a list in the file, in the canonical order
    assert userdb.load(path).by_name["carol"].rights == {"list", "write"}
    assert eke_users(path, "list").stdout.startswith("carol\tlist,write\t")
    eke_users(path, "modify", "carol", "--rights", "read-write")
    assert json.loads(path.read_text().splitlines()[-1])["rights"] == "read-write"


@pytest.mark.parametrize("rights", ["list,bogus", "read,", "Read", ""])
def test_an_unknown_right_is_a_usage_error_naming_it(tmp_path, rights):
    path = tmp_path / "users"
    saved(path, "bob")
    before = path.read_bytes()
    bad = [part for part in rights.split(",") if part not in userdb.RIGHT_NAMES][0]
    result = eke_users(path, "modify", "bob", "--rights", rights)
    # argparse's own usage error: the usage, then one line naming the option and the right
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--rights" in result.stderr.splitlines()[-1] and f"unknown right {bad!r}" in result.stderr.splitlines()[-1]
    assert path.read_bytes() == before


# -- quotas (docs/protocol.md sections 7.7 and 11)


def test_quotas_round_trip_through_eke_users_and_the_file(tmp_path):
    path = tmp_path / "users"
    steps = [
        (fast("add", "dave", "--password-stdin", "--quota-bytes", "10G", "--quota-files", "1000"),
         "added dave (read, server root, quota 10.0 GiB and 1000 files)"),
        (("modify", "dave", "--quota-bytes", "1500000"),  # only quotas: a change all the same
         "modified dave (read, server root, quota 1.4 MiB (1500000 bytes) and 1000 files)"),
        (("modify", "dave", "--quota-files", "none"), "modified dave (read, server root, quota 1.4 MiB (1500000 bytes))"),
        (("modify", "dave", "--quota-bytes", "1500000"), "dave unchanged (read, server root, quota 1.4 MiB (1500000 bytes))"),
        (("modify", "dave", "--quota-files", "1"), "modified dave (read, server root, quota 1.4 MiB (1500000 bytes) and 1 file)"),
    ]
    for args, line in steps:
        result = eke_users(path, *args, password=PASSWORD)
        assert (result.returncode, result.stdout, result.stderr) == (0, line + "\n", ""), args
    record = json.loads(path.read_text().splitlines()[-1])
    assert (record["quota_bytes"], record["quota_files"]) == (1500000, 1)
    assert eke_users(path, "list").stdout.endswith("\tquota 1.4 MiB (1500000 bytes) and 1 file\n")
    # A new password keeps the quotas, and so does the file's every other reader.
    assert eke_users(path, *fast("passwd", "dave", "--password-stdin"), password=PASSWORD).returncode == 0
    dave = userdb.load(path).by_name["dave"]
    assert (dave.quota_bytes, dave.quota_files, dave.has_quota) == (1500000, 1, True)
    eke_users(path, "modify", "dave", "--quota-bytes", "none", "--quota-files", "none")
    record = json.loads(path.read_text().splitlines()[-1])
    assert "quota_bytes" not in record and "quota_files" not in record
    assert eke_users(path, "list").stdout.endswith("\tno quota\n")
    assert not userdb.load(path).by_name["dave"].has_quota


@pytest.mark.parametrize(("option", "value", "problem"), [
    ("--quota-bytes", "10X", "not a size"), ("--quota-bytes", "-1", "must not be negative"),
    ("--quota-files", "1.5", "not a whole number"), ("--quota-files", "-3", "must not be negative"),
])
def test_a_bad_quota_is_a_usage_error_naming_the_option(tmp_path, option, value, problem):
    path = tmp_path / "users"
    saved(path, "bob")
    before = path.read_bytes()
    result = eke_users(path, "modify", "bob", option, value)
    assert result.returncode == 2 and option in result.stderr.splitlines()[-1] and problem in result.stderr
    assert path.read_bytes() == before


@pytest.mark.parametrize("value", ["-1", "1.5", "true", '"10G"', "9223372036854775808"])
def test_a_quota_that_is_not_a_count_makes_the_file_unusable(tmp_path, value):
    path = tmp_path / "users"
    saved(path, "bob")
    lines = path.read_text().splitlines()
    lines[-1] = lines[-1][:-1] + f', "quota_files": {value}}}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(userdb.UsersFileError, match=f"line {len(lines)}: quota_files must be a whole number"):
        userdb.load(path)


def test_quotas_and_unknown_members_are_kept_apart(tmp_path):
    path = tmp_path / "users"
    saved(path, "bob")
    lines = path.read_text().splitlines()
    lines[-1] = lines[-1][:-1] + ', "quota_bytes": 0, "later": {"x": 1}}'
    path.write_text("\n".join(lines) + "\n")
    bob = userdb.load(path).by_name["bob"]
    assert (bob.quota_bytes, bob.quota_files, bob.extra) == (0, None, {"later": {"x": 1}})
    eke_users(path, "modify", "bob", "--rights", "read-write")
    record = json.loads(path.read_text().splitlines()[-1])
    assert (record["quota_bytes"], record["later"]) == (0, {"x": 1})
