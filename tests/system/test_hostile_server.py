"""The real client command against a server that turns hostile (tests/hostileserver.py): before
authentication anyone can play it, after it a thief of the users file can. Whatever it sends,
the client's output carries no raw control character or forged line, and nothing it names
escapes the limits the client sets."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from eketwist.requesting import MAX_LISTING_BYTES

from tests.support.hostileserver import HostileServer, Tree, entry, make_alice
from tests.support.processes import server_options
from tests.support.rawclient import CONTROL, HEADER

PASSWORD = "alice's secret on a hostile server"
ALICE = make_alice(PASSWORD)
# What a terminal would obey: C0 controls (but our tab and newline), DEL, C1 (U+009B is CSI).
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
FORGED = "da39a3ee5e6b4b0d3255bfef95601890afd80709  /etc/passwd"
# Clear the screen, set the window title, then a prompt that is not ours.
SCREEN_TRICKS = "\x1b[2J\x1b[H\x1b]0;eke\x07\x9b31m\nPassword for alice (again): "


def run_client(server, *args, cwd=None, extra_env=None, command=None):
    """The real client command against `server`; (exit code, stdout, stderr) as text."""
    env = dict(os.environ, EKE_PASSWORD=PASSWORD, **(extra_env or {}))
    process = subprocess.run(
        [*(command or [sys.executable, "-m", "eketwist.client"]), *server_options(server.port, args), "--user", "alice", *args],
        capture_output=True, env=env, cwd=cwd, timeout=120,
    )
    server.stop()
    return process.returncode, process.stdout.decode("utf-8"), process.stderr.decode("utf-8")


def assert_shows_no_controls(*outputs):
    for output in outputs:
        assert not RAW_CONTROL.search(output), output
        assert "Password for" not in output.replace("\\nPassword for", ""), output
        assert FORGED not in output.splitlines(), output


@pytest.mark.parametrize("how", ["prelude", "endpoint"])
def test_error_before_authentication_is_shown_escaped(how):
    server = HostileServer(ALICE, preauth_error={"code": "try-later\x1b]0;x\x07", "message": SCREEN_TRICKS})
    connect = ["--connect", f"tcp:host=127.0.0.1:port={server.port}"] if how == "endpoint" else []
    code, out, err = run_client(server, *connect, "ls")
    assert code == 1  # an unknown code is a generic failure
    assert_shows_no_controls(out, err)
    assert err == "eke-client: \\x1b[2J\\x1b[H\\x1b]0;eke\\x07\\x9b31m\\nPassword for alice (again): \n"


def test_error_before_authentication_in_json_has_no_raw_controls(tmp_path):
    server = HostileServer(ALICE, preauth_error={"code": "busy", "message": SCREEN_TRICKS + "\u2028"})
    code, out, err = run_client(server, "--json", "get", "x", cwd=tmp_path)
    assert code == 12
    assert_shows_no_controls(out, err)
    assert json.loads(out)["error"]["message"] == SCREEN_TRICKS + "\u2028"


def test_error_after_authentication_is_shown_escaped(tmp_path):
    tree = Tree()
    tree.on_get = lambda conn, message: conn.send({"type": "error", "code": "not-found", "message": SCREEN_TRICKS})
    code, out, err = run_client(HostileServer(ALICE, tree), "get", "x", cwd=tmp_path)
    assert code == 5
    assert_shows_no_controls(out, err)
    assert "\\x1b[2J" in err


HOSTILE_NAMES = [
    entry("a\x1b]0;title\x07b"),
    entry("c\x9b2Jd"),
    entry("e\u2028f\\g"),
    entry("x\n" + FORGED),
]


@pytest.mark.parametrize("options", [[], ["-l"], ["-R"]])
def test_names_in_a_listing_are_shown_escaped(options):
    code, out, err = run_client(HostileServer(ALICE, Tree(HOSTILE_NAMES)), "ls", *options)
    assert code == 0, err
    assert_shows_no_controls(out, err)
    lines = out.splitlines()
    assert len(lines) == len(HOSTILE_NAMES)
    assert lines[0].endswith("a\\x1b]0;title\\x07b") or "a\\x1b]0;title\\x07b\t" in lines[0]
    assert any("e\\u2028f\\\\g" in line for line in lines)  # a real backslash is doubled


def test_names_in_a_json_listing_have_no_raw_controls():
    code, out, err = run_client(HostileServer(ALICE, Tree(HOSTILE_NAMES)), "--json", "ls")
    assert code == 0, err
    assert_shows_no_controls(out, err)
    assert [e["name"] for e in json.loads(out)["entries"]] == [e["name"] for e in HOSTILE_NAMES]


def test_names_in_a_tree_download_are_shown_escaped(tmp_path):
    forger = "x\n" + FORGED.split("/")[0]  # directories x\nda39...  and x\nda39...  /etc
    files = ["a\x1b]0;title\x07b", "c\x9b2Jd", "e\u2028f", forger + "/etc/passwd"]
    tree = Tree([
        entry("a\x1b]0;title\x07b"), entry("c\x9b2Jd"), entry("e\u2028f"), entry("link\x1b[2J", "symlink"),
        entry(forger, "dir", mode=0o755), entry(forger + "/etc", "dir", mode=0o755), entry(forger + "/etc/passwd"),
    ])
    code, out, err = run_client(HostileServer(ALICE, tree), "get", "-r", "top", cwd=tmp_path)
    assert code == 0, err
    assert_shows_no_controls(out, err)
    assert len(out.splitlines()) == len(files)  # one `SHA1  PATH` line per file
    assert "top/x\\n" + FORGED in out
    assert sorted(os.listdir(tmp_path / "top")) == sorted(files[:3] + [forger])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_tree_download_keeps_only_permission_bits_within_the_umask(tmp_path, umask):
    """A server cannot make what we receive setuid, setgid or sticky, nor writable (or, with
    umask 077, readable) by the machine's other accounts: our umask applies, as to any file
    we create."""
    tree = Tree([entry("d", "dir", mode=0o7777), entry("d/e", "dir", mode=0o6750), entry("d/e/f", mode=0o7777)])
    previous = os.umask(umask)  # the client inherits it
    try:
        code, out, err = run_client(HostileServer(ALICE, tree), "get", "-r", "top", cwd=tmp_path)
    finally:
        os.umask(previous)
    assert code == 0, err
    assert (tmp_path / "top/d").stat().st_mode & 0o7777 == 0o777 & ~umask
    assert (tmp_path / "top/d/e").stat().st_mode & 0o7777 == 0o750 & ~umask
    assert (tmp_path / "top/d/e/f").stat().st_mode & 0o7777 & ~(0o777 & ~umask) == 0


def test_a_huge_listing_is_refused_within_its_memory_budget(tmp_path):
    """A listing of long names past MAX_LISTING_BYTES (its entries count their real size):
    refused, and the client's peak memory stays within the budget plus its own start-up."""
    count = MAX_LISTING_BYTES // 4000 + 10_000
    listing = (entry(f"{i:08d}" + "x" * 3992) for i in range(count))
    server = HostileServer(ALICE, Tree(listing))
    peak_file = tmp_path / "peak"
    env = dict(os.environ, EKE_PASSWORD=PASSWORD, PEAK_FILE=str(peak_file))
    # The client's own peak (VmHWM of its address space, read as it exits): a child's
    # ru_maxrss also counts the parent it was spawned from, here the whole test process.
    measured = (
        "import atexit, runpy, sys\n"
        "def peak():\n"
        "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "    open(__import__('os').environ['PEAK_FILE'], 'w').write(hwm)\n"
        "atexit.register(peak)\n"
        "sys.argv[0] = 'eke-client'\n"
        "runpy.run_module('eketwist.client', run_name='__main__', alter_sys=True)\n"
    )
    command = [sys.executable, "-c", measured, "--port", str(server.port), "--user", "alice", "ls"]
    process = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    err = process.stderr.decode()
    server.stop()
    assert process.returncode == 7, err
    assert err == "eke-client: the listing of your root is larger than this client holds (256 MiB)\n"
    assert int(peak_file.read_text()) * 1024 < MAX_LISTING_BYTES + 100 * 2**20


def cut_short(conn, message):
    """A get answered with the first bytes of a file, then the connection gone."""
    conn.send({"type": "file", "name": "x", "size": 100, "mtime": 0, "mode": 0o644, "digest": "sha1", "offset": 0})
    conn.send_data(b"the first half")
    conn.sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("planted", ["writable by others", "another user's", "a FIFO"])
def test_a_part_file_planted_by_someone_else_is_refused(tmp_path, planted):
    """In a directory others can write to, LOCAL.part may be someone else's: downloading into
    it would let them read the file. The client refuses it and asks for nothing; once it is
    gone, the client's own part file is private."""
    part = tmp_path / "report.pdf.part"
    if planted == "a FIFO":
        os.mkfifo(part, 0o600)
    else:
        part.write_bytes(b"planted")
        part.chmod(0o666 if planted == "writable by others" else 0o600)
    if planted == "another user's":
        if os.geteuid() != 0:
            pytest.skip("needs root to give a file to another user")
        os.chown(part, 65534, 65534)
    tree = Tree(contents={"report.pdf": b"the secret report"})
    code, out, err = run_client(HostileServer(ALICE, tree), "get", "report.pdf", cwd=tmp_path)
    assert code == 8, err
    assert "report.pdf.part: refusing to use it" in err
    assert tree.requests == []
    assert not (tmp_path / "report.pdf").exists()
    if planted != "a FIFO":
        assert part.read_bytes() == b"planted"

    part.unlink()
    tree = Tree()
    tree.on_get = cut_short
    code, out, err = run_client(HostileServer(ALICE, tree), "get", "report.pdf", cwd=tmp_path)
    assert code == 3, err
    assert part.read_bytes() == b"the first half"
    assert part.stat().st_mode & 0o7777 == 0o600


# Runs the real client's main() and, once authenticated, looks for the password (by its
# SHA-256, so as not to hold it) among everything Python can reach: what gc tracks, the
# untracked tuples and dicts they hold, and the locals of every running frame.
FIND_PASSWORD = """
import gc, hashlib, os, sys
from eketwist import client, client_protocol

TARGET = os.environ.pop("TEST_PASSWORD_SHA256")
LENGTH = int(os.environ.pop("TEST_PASSWORD_LENGTH"))

def holders():
    gc.unfreeze()  # the client froze what it had imported: gc.get_objects() would skip it
    found = []
    def check(value, where, depth=0):
        if isinstance(value, (str, bytes)) and len(value) == LENGTH:
            data = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
            if hashlib.sha256(data).hexdigest() == TARGET:
                found.append(where)
        elif depth < 3 and isinstance(value, (tuple, dict)) and not gc.is_tracked(value):
            for item in ([*value.keys(), *value.values()] if isinstance(value, dict) else value):
                check(item, where, depth + 1)
    for obj in gc.get_objects():
        for referent in gc.get_referents(obj):
            check(referent, type(obj).__name__)
    for frame in sys._current_frames().values():
        while frame is not None:
            for name, value in frame.f_locals.items():
                check(value, f"{frame.f_code.co_name}() local {name}")
            frame = frame.f_back
    return found

authenticated = client_protocol.ClientProtocol._authenticated
def authenticated_then_look(self, done):
    authenticated(self, done)
    print("password held by:", holders(), file=sys.stderr)
client_protocol.ClientProtocol._authenticated = authenticated_then_look
client.main(sys.argv[1:])
"""


@pytest.mark.parametrize("how", ["prelude", "endpoint"])
def test_no_reference_to_the_password_after_authentication(how):
    import hashlib

    server = HostileServer(ALICE, Tree())
    connect = ["--connect", f"tcp:host=127.0.0.1:port={server.port}"] if how == "endpoint" else []
    digest = {"TEST_PASSWORD_SHA256": hashlib.sha256(PASSWORD.encode()).hexdigest(), "TEST_PASSWORD_LENGTH": str(len(PASSWORD))}
    command = [sys.executable, "-c", FIND_PASSWORD]
    code, out, err = run_client(server, *connect, "ls", extra_env=digest, command=command)
    assert code == 0, err
    assert "password held by: []\n" in err, err


# The real client with Python's recursion limit lowered to 300 frames.
LOW_RECURSION_LIMIT_CLIENT = [
    sys.executable, "-c",
    "import runpy, sys\n"
    "sys.setrecursionlimit(300)\n"
    "sys.argv[0] = 'eke-client'\n"
    "runpy.run_module('eketwist.client', run_name='__main__', alter_sys=True)\n",
]


def test_put_of_a_very_deep_tree_plans_it_all_then_creates_it(tmp_path):
    """Deeper than the recursion limit: os.walk's recursion died at about 970 levels, after
    creating as many remote directories. Now every directory is created, all before the first
    file. The client runs with the limit at 300 frames, so 400 levels are past it as 1,500
    were past the default 1,000, at a fraction of the cost (1,500 levels, 3,000 requests: 2 s)."""
    depth = 400
    deepest = str(tmp_path / "deep")
    os.mkdir(deepest)
    for _ in range(depth):  # os.makedirs and Path.mkdir(parents=True) recurse too
        deepest += "/d"
        os.mkdir(deepest)
    with open(deepest + "/leaf.txt", "wb") as leaf:
        leaf.write(b"at the bottom")
    tree = Tree()
    try:
        code, out, err = run_client(HostileServer(ALICE, tree), "put", "-r", "deep", cwd=tmp_path,
                                    command=LOW_RECURSION_LIMIT_CLIENT)
    finally:
        subprocess.run(["rm", "-rf", str(tmp_path / "deep")], check=True)  # pytest's rmtree recurses
    assert code == 0, err[-2000:]
    kinds = [message["type"] for message in tree.requests if isinstance(message, dict)]
    created = [message["path"] for message in tree.requests if message["type"] == "mkdir" and "mtime" not in message]
    assert kinds[:2] == ["stat", "mkdir"] and kinds.index("put") == 2 + depth
    assert created == ["deep"] + ["deep" + "/d" * level for level in range(1, depth + 1)]
    assert [m["path"] for m in tree.requests if m["type"] == "put"] == ["deep" + "/d" * depth + "/leaf.txt"]
    assert len(tree.requests) == 1 + 2 * (depth + 1) + 1


def test_a_tampered_record_during_an_upload_ends_it_at_once(tmp_path):
    """The client's fatal ERROR is the last thing it sends: its upload stops there, and it
    closes (docs/protocol.md §6), however much of the file was still to go."""
    source = tmp_path / "big.bin"
    with open(source, "wb") as big:  # its bytes do not matter: sparse, nothing to write
        big.truncate(64 * 1024 * 1024)
    seen = {}

    def serve(conn):
        while (request := conn.recv())["type"] == "stat":  # is the destination a directory?
            conn.send({"type": "error", "code": "not-found", "message": "no such file"})
        assert request["type"] == "put"
        conn.send({"type": "ready", "offset": 0})
        assert conn.recv() == {"type": "upload", "offset": 0}
        assert isinstance(conn.recv(), bytes)  # the first DATA record: the upload is streaming
        head = HEADER.pack(len(b'{"type":"stored"}') + 16, CONTROL)
        sealed = bytearray(conn.send_cipher.seal(head, b'{"type":"stored"}'))
        sealed[0] ^= 1
        conn.sock.sendall(head + bytes(sealed))
        after = []
        while (message := conn.recv()) is not None:
            after.append(message)
        seen["after"] = after

    code, out, err = run_client(HostileServer(ALICE, serve), "put", str(source), "big.bin")
    assert code == 6, err
    after = seen["after"]
    errors = [i for i, message in enumerate(after) if isinstance(message, dict) and message.get("type") == "error"]
    assert errors and after[errors[0]]["code"] == "integrity", after[-3:]
    assert errors[0] == len(after) - 1, f"{len(after) - 1 - errors[0]} records after the client's ERROR"
    data_bytes = sum(len(message) for message in after if isinstance(message, bytes))
    assert data_bytes < 32 * 1024 * 1024  # it stopped, rather than sending the rest first
