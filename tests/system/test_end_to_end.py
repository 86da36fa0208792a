"""End to end: a real `twistd eke` process, the real client and users commands, 127.0.0.1."""

import hashlib
import os
import subprocess
import sys

import pytest

from tests.support.processes import CLIENT, PASSWORD, BIN as VENV_BIN, free_port, run_client


@pytest.fixture(scope="module")
def reading_server(tmp_path_factory):
    """(port, root) of one daemon for this module's tests that only log in with the right
    password and read, adding files of their own names if any: each daemon start costs about
    half a second of a core. A test that fails logins (the delays they earn would carry over),
    changes the users file or reads the log has a daemon of its own (twistd_server)."""
    from tests.support.fixtures import make_root, make_users_file
    from tests.support.processes import Daemon

    base = tmp_path_factory.mktemp("reading-server")
    root = make_root(base)
    server = Daemon(base, root, make_users_file(base)).start()
    yield server.port, root
    server.stop()


def test_large_download_through_twistd_and_the_client_command(twistd_server, root, tmp_path):
    port, log = twistd_server
    big = root / "big.bin"
    with open(big, "wb") as handle:
        for _ in range(52):
            handle.write(os.urandom(1024 * 1024))
    expected = hashlib.sha1(big.read_bytes()).hexdigest()
    result = run_client(port, "get", "big.bin", str(tmp_path / "out.bin"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{expected}  {tmp_path / 'out.bin'}\n"
    assert hashlib.sha1((tmp_path / "out.bin").read_bytes()).hexdigest() == expected
    assert "Traceback" not in result.stderr
    text = log.read_text()
    assert "alice authenticated from 127.0.0.1" in text
    assert f"sent big.bin ({52 * 1024 * 1024} bytes" in text and expected in text
    assert PASSWORD not in text


def test_default_destination_and_directory_destination(reading_server, tmp_path):
    port, root = reading_server
    assert run_client(port, "get", "hello.txt", cwd=tmp_path).returncode == 0
    assert (tmp_path / "hello.txt").read_bytes() == (root / "hello.txt").read_bytes()
    (tmp_path / "into").mkdir()
    assert run_client(port, "-q", "get", "sub/data.bin", str(tmp_path / "into")).returncode == 0
    assert (tmp_path / "into" / "data.bin").read_bytes() == (root / "sub" / "data.bin").read_bytes()


def test_exit_codes_and_messages(twistd_server, tmp_path):
    port, log = twistd_server
    # The failed logins last: each failure delays this address's next answer (0.5 s, 1 s, ...).
    missing = run_client(port, "get", "missing.txt", cwd=tmp_path)
    assert missing.returncode == 5 and "missing.txt: no such file on the server" in missing.stderr
    escape = run_client(port, "get", "../x", cwd=tmp_path)
    assert escape.returncode == 9 and "path refused" in escape.stderr
    wrong = run_client(port, "get", "hello.txt", password="wrong", cwd=tmp_path)
    assert wrong.returncode == 4 and "could not prove it knows your password" in wrong.stderr
    unknown = run_client(port, "get", "hello.txt", user="nobody", cwd=tmp_path)
    assert unknown.returncode == 4 and unknown.stderr == wrong.stderr
    refused = run_client(free_port(), "get", "hello.txt", cwd=tmp_path)
    assert refused.returncode == 3 and "cannot connect" in refused.stderr
    usage = subprocess.run([*CLIENT, "get", "x"], capture_output=True, text=True)
    assert usage.returncode == 2
    for result in (wrong, unknown, missing, escape, refused):
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "hello.txt").exists() and not (tmp_path / "missing.txt").exists()
    assert "authentication failed for nobody from 127.0.0.1" in log.read_text()


def test_password_file_and_help(reading_server, tmp_path):
    port, _ = reading_server
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    result = subprocess.run(
        [*CLIENT, "--port", str(port), "--user", "alice", "--password-file", str(tmp_path / "pw"), "get", "hello.txt"],
        capture_output=True, text=True, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "EKE_PASSWORD"},
    )
    assert result.returncode == 0, result.stderr
    help_text = subprocess.run([str(VENV_BIN / "eke-client"), "--help"], capture_output=True, text=True).stdout
    for code in ("3  connection", "4  authentication", "5  remote file not found", "6  integrity", "EKE_PASSWORD"):
        assert code in help_text


def test_users_tool_and_live_reload(twistd_server, users_file, tmp_path):
    port, log = twistd_server
    users = [str(VENV_BIN / "eke-users"), "--users", str(users_file)]
    add = subprocess.run([*users, "add", "bob", "--password-stdin", "--scrypt-n", "1024"], input="bob's password\n", text=True, capture_output=True)
    assert add.returncode == 0, add.stderr
    assert oct(users_file.stat().st_mode & 0o777) == "0o600"
    assert "bob's password" not in users_file.read_text()
    # Picked up by the running server without a restart.
    assert run_client(port, "get", "hello.txt", user="bob", password="bob's password", cwd=tmp_path).returncode == 0
    again = subprocess.run([*users, "add", "bob", "--password-stdin"], input="x\n", text=True, capture_output=True)
    assert again.returncode == 1 and "already exists" in again.stderr
    passwd = subprocess.run([*users, "passwd", "bob", "--password-stdin", "--scrypt-n", "1024"], input="bob's new password\n", text=True, capture_output=True)
    assert passwd.returncode == 0
    assert run_client(port, "get", "hello.txt", user="bob", password="bob's password", cwd=tmp_path).returncode == 4
    listing = subprocess.run([*users, "list"], capture_output=True, text=True).stdout
    assert "alice" in listing and "bob" in listing
    assert subprocess.run([*users, "remove", "bob"]).returncode == 0
    assert run_client(port, "get", "hello.txt", user="bob", password="bob's new password", cwd=tmp_path).returncode == 4
    # A broken file is not loaded: the last good copy keeps serving, and the log says why.
    # (Asked from another address: bob's two failures delay 127.0.0.1's next answer by 1 s.)
    users_file.write_text(users_file.read_text() + "{not json\n")
    elsewhere = f"tcp:host=127.0.0.1:port={port}:bindAddress=127.0.0.2"
    assert run_client(port, "--connect", elsewhere, "get", "hello.txt", cwd=tmp_path).returncode == 0
    assert "not reloaded" in log.read_text()


def test_default_scrypt_cost_end_to_end(twistd_server, users_file, tmp_path):
    port, _ = twistd_server
    subprocess.run([str(VENV_BIN / "eke-users"), "--users", str(users_file), "add", "carol", "--password-stdin"],
                   input="carol pw\n", text=True, check=True)
    assert '"n": 32768' in users_file.read_text()
    assert run_client(port, "get", "hello.txt", user="carol", password="carol pw", cwd=tmp_path).returncode == 0


def test_twistd_refuses_a_port_in_use(root, users_file, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [str(VENV_BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile", "-", "eke",
             "--port", f"tcp:{port}:interface=127.0.0.1", "--root", str(root), "--users", str(users_file)],
            capture_output=True, text=True, timeout=30, cwd=tmp_path,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in result.stdout  # the log, on stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such file"), ('{"user": "x"}\n', "line 1"), ('# c\n\n{"eketwist-users": 1, "secret": "zz"}\n', "line 3")],
)
def test_twistd_refuses_a_bad_users_file(root, tmp_path, content, message):
    users = tmp_path / "users"
    if content is not None:
        users.write_text(content)
    result = subprocess.run(
        [str(VENV_BIN / "twistd"), "--nodaemon", "--pidfile=", "eke", "--port", "tcp:0:interface=127.0.0.1",
         "--root", str(root), "--users", str(users)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )
    assert result.returncode != 0 and message in result.stdout + result.stderr


def test_twistd_help_explains_options(tmp_path):
    result = subprocess.run([str(VENV_BIN / "twistd"), "eke", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0
    for option in ("--port", "--root", "--users", "--server-id", "--handshake-timeout", "--idle-timeout"):
        assert option in result.stdout


def test_a_plain_pip_install_provides_the_plugin_and_commands(tmp_path):
    """`pip install .` (not editable) must install twisted/plugins/eke_plugin.py beside eketwist."""
    source = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), source],
        check=True, timeout=300,
    )
    assert (target / "twisted" / "plugins" / "eke_plugin.py").exists()
    assert not (target / "twisted" / "__init__.py").exists()
    assert not (target / "twisted" / "plugins" / "__init__.py").exists()
    assert (target / "bin" / "eke-client").exists() and (target / "bin" / "eke-users").exists()
    code = "from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker; " \
           "import eketwist; print(eketwist.__file__); print([p.tapname for p in getPlugins(IServiceMaker)])"
    env = dict(os.environ, PYTHONPATH=str(target))
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert shown.startswith(str(target)) and "'eke'" in shown


def run_on_a_terminal(port, *args, cwd):
    """The client with stderr on a pseudo-terminal of 100 columns: (exit code, stdout, screen)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = dict(os.environ, EKE_PASSWORD=PASSWORD)
    process = subprocess.Popen(
        [*CLIENT, "--port", str(port), "--user", "alice", *args],
        stdout=subprocess.PIPE, stderr=slave, cwd=cwd, env=env,
    )
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO once the client has exited
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    code = process.wait(60)
    return code, process.stdout.read().decode(), shown.decode(errors="replace")


def test_progress_bar_on_a_terminal_only(reading_server, tmp_path):
    port, root = reading_server
    (root / "mid.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    code, out, screen = run_on_a_terminal(port, "get", "mid.bin", cwd=tmp_path)
    assert code == 0 and out.endswith("  mid.bin\n")
    # Sizes in binary units, the same in the bar and in the line after it.
    assert "mid.bin" in screen and "100%" in screen and "3.0 MiB/3.0 MiB" in screen
    assert "mid.bin: 3.0 MiB verified in" in screen and "MB" not in screen
    # Several files: an overall bar as well, with files and bytes done of the total, and the
    # results on lines of their own, never after a bar on the same line.
    (tmp_path / "all").mkdir()
    code, out, screen = run_on_a_terminal(port, "get", "mid.bin", "hello.txt", "all", cwd=tmp_path)
    assert code == 0 and "2/2 files" in screen and "total: 100%" in screen
    for line in screen.replace("\r\n", "\n").split("\n"):
        assert "verified in" not in line or line.split("\r")[-1].startswith(("mid.bin", "hello.txt", "all/")), line
    # A tree: the total is known from the listing from the start.
    (root / "bars").mkdir()
    for name in ("one.bin", "two.bin"):
        (root / "bars" / name).write_bytes(os.urandom(100_000))
    code, out, screen = run_on_a_terminal(port, "get", "-r", "bars", "tree", cwd=tmp_path)
    assert code == 0 and "files, 0 B/" in screen and "files, 0 B/?" not in screen
    # Not a terminal, or --quiet: no bar at all.
    plain = run_client(port, "get", "mid.bin", str(tmp_path / "again.bin"))
    assert plain.returncode == 0 and "%" not in plain.stderr
    code, out, screen = run_on_a_terminal(port, "-q", "get", "mid.bin", "q.bin", cwd=tmp_path)
    assert code == 0 and screen.strip() == ""


def test_exit_codes_are_documented_everywhere():
    from eketwist import errors

    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    protocol = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "protocol.md")).read()
    codes = {cls.exit_code for cls in errors.BY_CODE.values()}
    for code in codes:
        assert f"\n| {code} |" in readme
        assert f"\n  {code} " in errors.EXIT_CODES_HELP
    for wire_code, cls in errors.BY_CODE.items():
        if wire_code not in ("usage", "connection", "local-io", "interrupted", "output-closed", "name-mismatch"):
            assert f"| {wire_code} " in protocol, wire_code


def test_connect_endpoint_and_silent_server_timeout(reading_server, tmp_path):
    import socket

    port, _ = reading_server
    env = dict(os.environ, EKE_PASSWORD=PASSWORD)
    result = subprocess.run(
        [*CLIENT, "--connect", f"tcp:host=127.0.0.1:port={port}", "--user", "alice", "get", "hello.txt"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    with socket.socket() as silent:  # accepts (by the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = __import__("time").monotonic()
        result = run_client(silent.getsockname()[1], "--timeout", "0.3", "get", "hello.txt", cwd=tmp_path)
        elapsed = __import__("time").monotonic() - started
    assert result.returncode == 3 and "made no progress for 0.3 s" in result.stderr
    assert elapsed < 20
    bad = subprocess.run([*CLIENT, "--connect", "nonsense:x", "--user", "alice", "get", "hello.txt"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "--connect nonsense:x: not a client endpoint" in bad.stderr


def test_client_defers_modules_it_does_not_use():
    """The client loads http.cookiejar (which Twisted imports only to re-export it) on first
    use: out of start-up, yet whole for whoever reads it."""
    script = (
        "import sys\n"
        "from eketwist import client\n"
        "client._load_on_first_use('http.cookiejar')\n"
        "from twisted.internet import defer\n"
        "from twisted.python import compat\n"
        "assert 'urllib.request' not in sys.modules, 'http.cookiejar was loaded at start-up'\n"
        "from http import cookiejar\n"
        "assert cookiejar.CookieJar().__class__.__name__ == 'CookieJar'\n"
        "assert 'urllib.request' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
