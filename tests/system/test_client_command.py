"""The client command as a user meets it: wrong inputs, interrupts, closed pipes, local
problems, passwords and TLS failures; every one a short message and its exit code, never a
traceback. The real `eke-client` against real daemons on 127.0.0.1."""

import json
import os
import pty
import signal
import subprocess
import time

import pytest

from eketwist import __version__
from tests.support.fixtures import make_root, make_users_file
from tests.support.processes import CLIENT, PASSWORD, Daemon, free_port, run_client

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("EKE_")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(port, root) of a daemon whose logins all succeed (failed ones have their own)."""
    base = tmp_path_factory.mktemp("client-command")
    root = make_root(base)
    (root / "many").mkdir()
    for index in range(4000):  # a listing of ~150 KiB: more than a pipe holds
        (root / "many" / f"entry-{index:05}-with-a-longer-name.txt").write_bytes(b"")
    with open(root / "big.bin", "wb") as handle:  # sparse: read fast, written slowly enough
        handle.truncate(4 * 1024**3)
    daemon = Daemon(base, root, make_users_file(base)).start()
    yield daemon.port, root
    daemon.stop()


def client(*args, env=None, **options):
    return subprocess.run(
        [*CLIENT, *args], capture_output=True, text=True, timeout=60,
        env=dict(CLEAN_ENV, **(env or {})), **options,
    )


def assert_one_clean_failure(result, code, *fragments):
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr
    assert 1 <= len(lines) <= 2 and lines[0].startswith("eke-client: "), result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# -- usage errors: caught before connecting, named, exit 2


@pytest.mark.parametrize("args, env, named", [
    (["ls"], {"EKE_PORT": "notaport"}, "EKE_PORT: not a port number: 'notaport'"),
    (["--port", "0", "ls"], {}, "--port: not a port number (1-65535): '0'"),
    (["--port", "99999", "ls"], {}, "--port"),
    (["--port", "x", "ls"], {}, "--port"),
    (["--timeout", "-1", "ls"], {}, "--timeout: must be more than 0"),
    (["--timeout", "0", "ls"], {}, "--timeout"),
    (["--timeout", "nan", "ls"], {}, "--timeout"),
    (["--ca-file", "ca.pem", "ls"], {}, "--ca-file goes with --tls"),
    (["--connect", "tcp:127.0.0.1:1", "--port", "5", "ls"], {}, "--port and --connect do not go together"),
    (["--connect", "tcp:127.0.0.1:1", "--host", "h", "ls"], {}, "--host and --connect"),
    (["--connect", "tcp:127.0.0.1:1", "--tls", "ls"], {}, "--tls and --connect"),
    (["--tls", "--ca-file", "missing.pem", "ls"], {}, "--ca-file missing.pem: No such file"),
    (["--tls", "--ca-file", "not.pem", "ls"], {}, "--ca-file not.pem: not a PEM certificate"),
    (["put", "adir"], {}, "adir: a directory: put -r"),
    (["put", "-", "x"], {}, "put -: reading from stdin is not supported"),
    (["get", "a", "b", "-"], {}, "one file only to stdout"),
    (["get", "--json", "a", "-"], {}, "no room for --json"),
    (["ls"], {"EKE_USER": ""}, "--user is required"),
    (["--host", "a..b", "ls"], {}, "--host: not a host name or address: 'a..b'"),
    (["--connect", "tcp:127.0.0.1:1", "--ca-file", "x", "ls"], {}, "--ca-file and --connect"),
    (["get", "a", "b", "not-a-directory"], {}, "not-a-directory: with several files to get"),
])
def test_usage_errors_name_the_option_before_connecting(tmp_path, args, env, named):
    (tmp_path / "adir").mkdir()
    (tmp_path / "not.pem").write_text("not a certificate\n")
    # Nothing listens on the port: a usage error is found before any connection is tried,
    # and before a password is asked for (there is none).
    env = {"EKE_USER": "alice", "EKE_PORT": str(free_port()), **env}
    result = client(*args, env=env, cwd=tmp_path)
    assert_one_clean_failure(result, 2, named)
    assert "Try 'eke-client --help'" in result.stderr


def test_help_and_version_work_whatever_the_environment():
    for args in (["--help"], ["get", "--help"], ["--version"]):
        result = client(*args, env={"EKE_PORT": "notaport"})
        assert result.returncode == 0 and result.stderr == ""
    assert client("--version").stdout == f"eke-client {__version__}\n"


# -- interrupts and closed pipes


def wait_for_data(path, process):
    deadline = time.monotonic() + 30
    while not (path.exists() and path.stat().st_size > 0):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_get_says_so_keeps_its_part_and_resumes(server, tmp_path, signum, code):
    port, _ = server
    command = [*CLIENT, "--port", str(port), "--user", "alice", "--json", "get", "big.bin"]
    process = subprocess.Popen(command, cwd=tmp_path, env=dict(CLEAN_ENV, EKE_PASSWORD=PASSWORD),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_data(tmp_path / "big.bin.part", process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=30)
    assert process.returncode == code, err
    assert err == "eke-client: interrupted: run the same command again to resume\n"
    document = json.loads(out)
    assert document["status"] == "interrupted" and document["error"]["exit"] == code
    assert document["files"] == [{"remote": "big.bin", "local": "big.bin", "status": "interrupted"}]
    kept = (tmp_path / "big.bin.part").stat().st_size
    assert kept > 0 and not (tmp_path / "big.bin").exists()
    # The same command again continues from what was kept.
    again = subprocess.Popen(command, cwd=tmp_path, env=dict(CLEAN_ENV, EKE_PASSWORD=PASSWORD),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while (tmp_path / "big.bin.part").stat().st_size <= kept and again.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    again.send_signal(signal.SIGINT)
    assert again.wait(30) in (0, 130)


def test_a_closed_stdout_ends_the_command_quietly(server):
    port, _ = server
    process = subprocess.Popen(
        [*CLIENT, "--port", str(port), "--user", "alice", "ls", "many"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(CLEAN_ENV, EKE_PASSWORD=PASSWORD),
    )
    assert process.stdout.readline().startswith(b"entry-00000")
    process.stdout.close()  # as `| head -1` does
    err = process.stderr.read()
    assert process.wait(30) == 141 and err == b""


def test_ctrl_c_at_the_password_prompt(server, tmp_path):
    port, _ = server
    pid, terminal = pty.fork()
    if pid == 0:
        os.execve(CLIENT[0], [*CLIENT, "--port", str(port), "--user", "alice", "ls"], CLEAN_ENV)
    screen = read_until(terminal, b"Password for alice: ")
    os.kill(pid, signal.SIGINT)
    screen += read_all(terminal)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 130, screen
    assert b"interrupted" in screen and b"Traceback" not in screen


def read_until(fd, wanted, timeout=30):
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        assert time.monotonic() < deadline, seen
        seen += os.read(fd, 1024)
    return seen


def read_all(fd):
    seen = b""
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # EIO: the other side has gone
            return seen
        if not chunk:
            return seen
        seen += chunk


# -- errors that name the right side


def test_local_problems_say_local_and_name_the_path(server, tmp_path):
    port, _ = server
    missing = run_client(port, "get", "hello.txt", "newdir/", cwd=tmp_path)
    assert_one_clean_failure(missing, 8, "hello.txt: local directory newdir does not exist")
    (tmp_path / "hello.txt").write_text("mine, different\n")
    differs = run_client(port, "get", "hello.txt", cwd=tmp_path)
    assert_one_clean_failure(differs, 10, "local hello.txt: exists and differs (use --force to replace it)")
    assert (tmp_path / "hello.txt").read_text() == "mine, different\n"
    forced = run_client(port, "get", "--force", "hello.txt", cwd=tmp_path)
    assert forced.returncode == 0 and (tmp_path / "hello.txt").read_bytes() == b"hello, world\n"
    # The same file again: skipped, in the words put uses, and no digest line for it.
    same = run_client(port, "get", "hello.txt", cwd=tmp_path)
    assert same.returncode == 0 and same.stdout == ""
    assert same.stderr == "hello.txt: skipped (already up to date)\n"
    absent = run_client(port, "get", "no-such.txt", cwd=tmp_path)
    assert_one_clean_failure(absent, 5, "no-such.txt: no such file on the server")


def test_a_refused_connection_names_host_and_port(tmp_path):
    port = free_port()
    for options, named in ((["--port", str(port)], f"127.0.0.1:{port}"), (["--connect", f"tcp:127.0.0.1:{port}"], f"tcp:127.0.0.1:{port}")):
        result = client(*options, "--user", "alice", "ls", env={"EKE_PASSWORD": "x"})
        assert_one_clean_failure(result, 3, f"cannot connect to {named}: ", "refused")


def test_get_to_stdout_writes_only_the_verified_file(server, tmp_path):
    port, root = server
    result = subprocess.run(
        [*CLIENT, "--port", str(port), "--user", "alice", "get", "sub/data.bin", "-"],
        capture_output=True, env=dict(CLEAN_ENV, EKE_PASSWORD=PASSWORD), cwd=tmp_path, timeout=60,
    )
    assert result.returncode == 0 and result.stdout == (root / "sub" / "data.bin").read_bytes()
    assert b"  -\n" in result.stderr and os.listdir(tmp_path) == []


def test_a_full_stdout_is_one_line_and_exit_8(server, tmp_path):
    port, _ = server
    for args in (["ls"], ["--json", "ls"], ["get", "hello.txt", str(tmp_path / "h")]):
        with open("/dev/full", "w") as full:
            result = subprocess.run([*CLIENT, "--port", str(port), "--user", "alice", *args], stdout=full,
                                    stderr=subprocess.PIPE, text=True, env=dict(CLEAN_ENV, EKE_PASSWORD=PASSWORD), timeout=60)
        assert result.returncode == 8 and "cannot write to stdout: No space left on device" in result.stderr
        assert "Traceback" not in result.stderr


def test_ls_json_errors_keep_the_ls_document(server):
    port, _ = server
    result = run_client(port, "--json", "ls", "nowhere")
    document = json.loads(result.stdout)
    assert result.returncode == 5 and document["command"] == "ls" and document["path"] == "nowhere"
    assert document["status"] == "error" and document["entries"] == [] and document["error"]["code"] == "not-found"


# -- passwords


def test_password_sources_are_checked_and_named(server, tmp_path):
    port, _ = server
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = client("--port", str(port), "--user", "alice", "--password-file", str(empty), "ls")
    assert_one_clean_failure(result, 2, f"--password-file {empty}: its first line is empty")
    shared = tmp_path / "shared"
    shared.write_text(PASSWORD + "\n")
    shared.chmod(0o644)
    result = client("--port", str(port), "--user", "alice", "--password-file", str(shared), "ls")
    assert result.returncode == 0
    assert result.stderr == f"eke-client: warning: {shared}: others can read this password file (chmod 600 {shared})\n"
    # No terminal and no password given: a message, not Python's GetPassWarning.
    result = client("--port", str(port), "--user", "alice", "ls", stdin=subprocess.DEVNULL, start_new_session=True)
    assert_one_clean_failure(result, 2, "no password: use --password-file, EKE_PASSWORD")


def test_a_mistyped_password_can_be_typed_again(tmp_path):
    base = tmp_path
    daemon = Daemon(base, make_root(base), make_users_file(base), "--failure-delay", "0.2").start()
    try:
        pid, terminal = pty.fork()
        if pid == 0:
            os.execve(CLIENT[0], [*CLIENT, "--port", str(daemon.port), "--user", "alice", "ls"], CLEAN_ENV)
        screen = read_until(terminal, b"Password for alice: ")
        os.write(terminal, b"wrong\n")
        screen += read_until(terminal, b"Password for alice: ")
        os.write(terminal, PASSWORD.encode() + b"\n")
        screen += read_all(terminal)
        _, status = os.waitpid(pid, 0)
    finally:
        daemon.stop()
    assert os.waitstatus_to_exitcode(status) == 0, screen
    text = screen.decode()
    assert "could not prove it knows your password" in text and "hello.txt" in text
    # The server said how long its next answer would wait, and the client passed it on.
    assert "slows down logins from this address after failed ones: its answer will take 0.2 s" in text


def test_a_lockout_has_its_own_message_and_exit_code(tmp_path):
    daemon = Daemon(tmp_path, make_root(tmp_path), make_users_file(tmp_path), "--max-failures", "2",
                    "--failure-delay", "0.01", "--lockout", "600").start()
    try:
        for _ in range(2):
            assert run_client(daemon.port, "ls", password="wrong").returncode == 4
        locked = run_client(daemon.port, "ls")
    finally:
        daemon.stop()
    assert_one_clean_failure(locked, 13, "too many failed logins from your address; try again in")


# -- TLS: which failure it is


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    from tests.system.test_operations import make_certificates

    base = tmp_path_factory.mktemp("tls")
    make_certificates(base, ["localhost"])
    port = free_port()
    daemon = Daemon(base, make_root(base), make_users_file(base))
    daemon.port = port
    index = daemon.command.index("--port") + 1
    daemon.command[index] = (
        f"ssl:{port}:interface=127.0.0.1:privateKey={base / 'key.pem'}:certKey={base / 'cert.pem'}"
    )
    daemon.start()
    yield port, base / "ca.pem"
    daemon.stop()


def test_tls_failures_say_which_case_it_is(tls_server, server):
    port, ca = tls_server
    plain_port, _ = server
    ok = run_client(port, "--host", "localhost", "--tls", "--ca-file", str(ca), "ls")
    assert ok.returncode == 0, ok.stderr
    cases = [
        (["--host", "localhost", "--tls"], port, "not signed by an authority you trust", "--ca-file"),
        (["--host", "127.0.0.1", "--tls", "--ca-file", str(ca)], port,
         "the server's certificate is not for 127.0.0.1; it is for localhost", "--host"),
        (["--host", "localhost"], port, "closed the connection before answering", "add --tls"),
        (["--host", "localhost", "--tls", "--ca-file", str(ca)], plain_port, "does not speak TLS on this port", "leave out --tls"),
    ]
    for options, target, reason, advice in cases:
        result = run_client(target, *options, "ls")
        assert_one_clean_failure(result, 3, "TLS failed" if "--tls" in options else "", reason, advice)
