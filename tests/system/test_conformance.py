"""Conformance of the real daemon to docs/protocol.md, through a client written from the page.

The client (tests/system/specclient.py) imports nothing from eketwist: if our encoder drifts from the
page, these tests fail. The parts follow the page's sections (§N). The daemons are real `twistd eke`
processes on 127.0.0.1, with users made by the real `eke-users`.

The last part, "Decisions", tests rules being added to the page (path types and contents, root
aliases, member types and ranges, usernames, the final flush, symlinks, partial names).
"""

import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import specclient as spec
from .specclient import CONTROL, DATA, HANDSHAKE, canonical, frame

BIN = pathlib.Path(sys.executable).parent
REPO = pathlib.Path(__file__).resolve().parents[2]
ALICE_PW = "alice's conformance password"
READER_PW = "reader's conformance password"
SERVER_ID = "conformance"
COST = {"n": 1024, "r": 8, "p": 1}
MiB = 1 << 20


# -- daemons --------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_user(users, name, password, rights):
    subprocess.run(
        [str(BIN / "eke-users"), "--users", str(users), "add", name, "--password-stdin",
         "--scrypt-n", "1024", "--rights", rights],
        input=password + "\n", text=True, check=True, capture_output=True, timeout=60)


class Daemon:
    def __init__(self, base, root, users, *options):
        self.base, self.root, self.users = base, root, users
        self.port = free_port()
        with open(base / "twistd.out", "wb") as output:  # the daemon keeps its own copy of the fd
            self.process = subprocess.Popen(
                [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(base / "twistd.log"),
                 "--umask", "022", "eke", "--port", f"tcp:{self.port}:interface=127.0.0.1",
                 "--root", str(root), "--users", str(users), "--server-id", SERVER_ID, *options],
                cwd=base, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                pass
            try:
                self.process.wait(0.05)  # a pause that also notices a daemon that died
            except subprocess.TimeoutExpired:
                if time.monotonic() < deadline:
                    continue
            self.stop()
            raise AssertionError(f"the daemon did not start: {(base / 'twistd.out').read_text()}"
                                 f"{self.log()}")

    def log(self):
        path = self.base / "twistd.log"
        return path.read_text() if path.exists() else ""

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


NO_LIMITS = ["--handshake-rate", "10000", "--handshake-burst", "10000"]


def make_root(root):
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello, world\n")
    os.chmod(root / "hello.txt", 0o640)
    (root / "empty").write_bytes(b"")
    (root / "sub" / "data.bin").write_bytes(os.urandom(300_000))
    os.symlink("hello.txt", root / "link.txt")
    os.symlink("../hello.txt", root / "sub" / "link")
    os.symlink("tree", root / "dirlink")  # a recursive listing must not descend through it
    (root / "big.bin").write_bytes(os.urandom(5 * MiB + 12345))
    with open(root / "huge.bin", "wb") as huge:  # only ever cut short: sparse, nothing to write
        huge.truncate(64 * MiB)
    for d in ("tree/a/b", "tree/d", "up"):
        (root / d).mkdir(parents=True)
    for f in ("tree/a/b/c.txt", "tree/a/x.txt", "tree/e.txt"):
        (root / f).write_bytes(f.encode())
    (root / "names").mkdir()  # names whose JSON needs escapes or non-ASCII
    for name in ("caf\u00e9", 'q"uote\\back\tslash\x01', "sep\u2028x", "emoji\U0001F600", "del\x7f"):
        (root / "names" / name).write_bytes(b"")
    (root / "many").mkdir()
    for i in range(1200):  # ~300 KB of entries: several ENTRIES messages
        (root / "many" / f"{i:05d}-{'n' * 180}").write_bytes(b"")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("conformance")
    root = base / "root"
    make_root(root)
    (base / "etc").mkdir()
    users = base / "etc" / "users"
    add_user(users, "alice", ALICE_PW, "read-write")
    add_user(users, "reader", READER_PW, "read")
    daemon = Daemon(base, root, users, *NO_LIMITS, "--max-upload-size", "100M")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A daemon of its own for failed logins, with the guessing limits lifted."""
    base = tmp_path_factory.mktemp("failures")
    root = base / "root"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello\n")
    (base / "etc").mkdir()
    users = base / "etc" / "users"
    add_user(users, "alice", ALICE_PW, "read-write")
    add_user(users, "bob", "bob's password", "read")
    daemon = Daemon(base, root, users, *NO_LIMITS, "--max-failures", "100000",
                    "--failure-delay", "0.001", "--max-source-delay", "0.001",
                    "--max-user-delay", "0.001")
    yield daemon
    daemon.stop()


@pytest.fixture
def alice(server):
    with spec.connect_login(server.port, "alice", ALICE_PW) as connection:
        yield connection


@pytest.fixture
def reader(server):
    with spec.connect_login(server.port, "reader", READER_PW) as connection:
        yield connection


# -- helpers --------------------------------------------------------------------------------

def sha1(data):
    return hashlib.sha1(data).hexdigest()


def assert_handshake_error_then_close(connection, code):
    """§3.7: before OK, an ERROR (a HANDSHAKE frame) and the connection closes: nothing else."""
    first = connection.read_frame()
    assert first is not None, "closed without an ERROR"
    assert first.kind == HANDSHAKE
    message = json.loads(first.payload)
    assert message["type"] == "error" and message["code"] == code, message
    assert isinstance(message["message"], str)
    assert first.payload == canonical(message)
    after = connection.read_frame()
    assert after is None, f"a frame after the ERROR: {after}"
    return message


def assert_fatal(connection, code, in_flight=False):
    """§3.7/§6/§9: an ERROR record is the last frame, then the end of the stream. With
    `in_flight`, records of a running download (DATA, END) may precede it; each must decrypt
    in order. Any other message fails at once (no waiting for a timeout)."""
    records = []
    while True:
        record = connection.recv_record()
        assert record is not None, f"closed without an ERROR after {len(records)} records"
        records.append(record)
        if record.kind == DATA:
            assert in_flight, "DATA where an ERROR was expected"
            continue
        message = connection.parse(record.plaintext)
        if message["type"] == "error":
            break
        assert in_flight and message["type"] == "end", f"{message} where an ERROR was expected"
    assert message["code"] == code, message
    after = connection.recv_record()
    assert after is None, f"a record after the ERROR: {after.kind} {after.plaintext[:100]!r}"
    return records


def assert_refusal(connection, answer, code):
    assert answer["type"] == "error" and answer["code"] == code, answer
    assert isinstance(answer["message"], str)
    assert_ready(connection)


def assert_ready(connection):
    entry = connection.stat("hello.txt")
    assert entry["type"] == "entry" and entry["entry"]["name"] == "hello.txt", entry


def entry_matches(entry, path, kind):
    st = os.lstat(path)
    assert entry["kind"] == kind
    assert entry["mode"] == st.st_mode & 0o777
    assert abs(entry["mtime"] - st.st_mtime) < 1e-3
    if kind != "dir":
        assert entry["size"] == st.st_size


def interrupted_upload(server, path, data, sent):
    """PUT, UPLOAD 0, `sent` bytes of DATA, then close; waits until the server closes its side."""
    c = spec.connect_login(server.port, "alice", ALICE_PW)
    ready = c.put_offer(path, len(data))
    assert ready == {"type": "ready", "offset": 0}, ready
    c.send_control({"type": "upload", "offset": 0})
    c.send_data(data[:sent], chunk=256 * 1024)
    c.sock.shutdown(socket.SHUT_WR)
    assert c.read_frame() is None  # the server answers nothing, and closes
    c.close()


def wait_for(predicate, seconds=10):
    """For disk state left behind by the server's threads (no read can wait for it)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def partial_name(user, base):
    return ".eke-part." + hashlib.sha256(user.encode() + b"\0" + base.encode()).hexdigest()[:32]


# == RFC 9383 vectors (§4.3) ================================================================

# RFC 9383's vectors, committed with the tests (they were read from outside the repository,
# and in a clean clone this test skipped: it could not fail in CI).
VECTOR_FILES = [REPO / "tests" / "data" / name for name in ("rfc9383-all-vectors.json", "spake2plus-vectors.json")]


def test_spake2plus_matches_rfc9383_vectors():
    for path in VECTOR_FILES:
        data = json.loads(path.read_text())
        vectors = data.get("vectors", [data])
        v = next(v for v in vectors if v["suite"] == "P256-SHA256-HKDF-SHA256-HMAC-SHA256")
        prover = spec.Prover(int(v["w0"], 16), int(v["w1"], 16), int(v["x"], 16))
        assert prover.shareP.hex() == v["shareP"]
        assert spec.encode_point(spec.G * int(v["w1"], 16)).hex() == v["L"]
        t = prover.finish(bytes.fromhex(v["shareV"]), v["Context"].encode(),
                          v["idProver"].encode(), v["idVerifier"].encode())
        for name in ("Z", "V", "TT", "K_main", "K_confirmP", "K_confirmV", "confirmP",
                     "confirmV", "K_shared"):
            assert getattr(t, name).hex() == v[name], (path.name, name)


# == Handshake (§3, §4) =====================================================================

def test_handshake_messages_and_canonical_json(server):
    with spec.Connection(server.port) as c:
        params = c.hello("alice")
        assert c.params_raw == json.dumps(params, separators=(",", ":"), sort_keys=True,
                                          ensure_ascii=False).encode()
        assert params["type"] == "params" and params["server"] == SERVER_ID
        assert params["scrypt"] == COST
        assert len(bytes.fromhex(params["salt"])) == 16 and params["salt"] == params["salt"].lower()
        share, _ = c.share(ALICE_PW)
        assert c.server_share_raw == canonical(share)
        assert set(share) >= {"type", "share", "confirm"}
        spec.decode_point(bytes.fromhex(share["share"]))  # a valid point
        assert len(bytes.fromhex(share["confirm"])) == 32
        assert c.confirm_valid(), "confirmV is not HMAC(K_confirmV, shareP)"
        assert c.confirm() == {"type": "ok"}
        assert c.ok_raw == b'{"type":"ok"}'
        assert c.stat("hello.txt")["entry"]["name"] == "hello.txt"


def test_wrong_password_is_auth_failed_then_close(guarded):
    with spec.Connection(guarded.port) as c:
        c.hello("alice")
        c.share("not the password")
        assert not c.confirm_valid()  # §4.4: a real client stops here; we go on to see the server
        c.send_handshake({"type": "confirm", "confirm": c.transcript.confirmP.hex()})
        assert_handshake_error_then_close(c, "auth-failed")


def test_unknown_user_same_shape_then_auth_failed(guarded):
    with spec.Connection(guarded.port) as c:
        known = c.hello("alice")
        known_share, _ = c.share(ALICE_PW)
    with spec.Connection(guarded.port) as c:
        unknown = c.hello("mallory")
        assert sorted(unknown) == sorted(known)
        assert unknown["server"] == known["server"]
        assert len(unknown["salt"]) == len(known["salt"]) == 32
        assert unknown["scrypt"] == known["scrypt"] == COST
        assert c.params_raw == canonical(unknown)
        share, _ = c.share("any password")
        assert sorted(share) == sorted(known_share)
        assert len(share["share"]) == 130 and len(share["confirm"]) == 64
        spec.decode_point(bytes.fromhex(share["share"]))
        assert not c.confirm_valid()
        c.send_handshake({"type": "confirm", "confirm": c.transcript.confirmP.hex()})
        assert_handshake_error_then_close(c, "auth-failed")
    with spec.Connection(guarded.port) as c:  # §3.2: stable across connections
        again = c.hello("mallory")
        assert again["salt"] == unknown["salt"] and again["scrypt"] == unknown["scrypt"]


def test_unsupported_version(guarded):
    with spec.Connection(guarded.port) as c:
        c.send_handshake({"type": "hello", "version": 3, "user": "alice"})
        assert_handshake_error_then_close(c, "unsupported")


def test_frame_over_4096_before_auth_is_protocol_from_its_header(guarded):
    with spec.Connection(guarded.port) as c:
        c.send_raw(spec.HEADER.pack(4097, HANDSHAKE))  # the header alone: checked before payload
        assert_handshake_error_then_close(c, "protocol")


def test_frame_of_exactly_4096_before_auth_is_accepted(guarded):
    with spec.Connection(guarded.port) as c:
        message = {"type": "hello", "version": 1, "user": "alice", "padding": ""}
        message["padding"] = "x" * (4096 - len(canonical(message)))
        payload = canonical(message)
        assert len(payload) == 4096
        c.send_raw(frame(HANDSHAKE, payload))
        params, _ = c.recv_handshake()
        assert params["type"] == "params"  # unknown members ignored (§3)


def test_control_frame_before_auth_is_protocol(guarded):
    with spec.Connection(guarded.port) as c:
        c.send_raw(frame(CONTROL, os.urandom(40)))
        assert_handshake_error_then_close(c, "protocol")


# == Records (§6) ===========================================================================

def test_records_counters_nonce_and_header_as_aad(alice):
    k = alice.keys
    assert alice.send_counter == 0 and alice.recv_counter == 0
    # by hand: the first client record has counter 0, nonce iv_c2s XOR 0, AAD its header
    plaintext = canonical({"type": "stat", "path": "hello.txt"})
    header = spec.HEADER.pack(len(plaintext) + 16, CONTROL)
    alice.send_raw(header + AESGCM(k.key_c2s).encrypt(k.iv_c2s, plaintext, header))
    f = alice.read_frame()
    assert f.kind == CONTROL and spec.HEADER.unpack(f.header)[0] == len(f.payload)
    s2c = AESGCM(k.key_s2c)
    for wrong_nonce, wrong_aad in ((spec.nonce(k.iv_s2c, 1), f.header), (k.iv_s2c, b""),
                                   (k.iv_s2c, f.header[:4])):
        with pytest.raises(InvalidTag):
            s2c.decrypt(wrong_nonce, f.payload, wrong_aad)
    entry = json.loads(s2c.decrypt(k.iv_s2c, f.payload, f.header))
    assert entry["type"] == "entry"
    # an ERROR answering a request is an ordinary CONTROL record with the next counter (1)
    plaintext = canonical({"type": "frobnicate"})
    header = spec.HEADER.pack(len(plaintext) + 16, CONTROL)
    alice.send_raw(header + AESGCM(k.key_c2s).encrypt(spec.nonce(k.iv_c2s, 1), plaintext, header))
    f = alice.read_frame()
    assert f.kind == CONTROL
    error = json.loads(s2c.decrypt(spec.nonce(k.iv_s2c, 1), f.payload, f.header))
    assert error["type"] == "error" and error["code"] == "unsupported"
    alice.send_counter = alice.recv_counter = 2
    assert_ready(alice)


def test_counters_run_over_control_and_data_alike(alice, server):
    _, chunks, _ = alice.get("big.bin")  # decrypting in order checks every counter
    assert alice.recv_counter == 2 + len(chunks)
    assert_ready(alice)
    assert alice.recv_counter == 3 + len(chunks)


def test_replayed_record_is_integrity(alice):
    record = alice.seal(CONTROL, canonical({"type": "stat", "path": "hello.txt"}))
    alice.send_raw(record)
    assert alice.recv_message()["type"] == "entry"
    alice.send_raw(record)
    assert_fatal(alice, "integrity")


# == Requests (§7) ==========================================================================

def test_stat_file(alice, server):
    answer = alice.stat("hello.txt")
    assert answer["type"] == "entry"
    assert answer["entry"]["name"] == "hello.txt"
    entry_matches(answer["entry"], server.root / "hello.txt", "file")
    answer = alice.stat("sub/data.bin")
    assert answer["entry"]["name"] == "data.bin"
    entry_matches(answer["entry"], server.root / "sub" / "data.bin", "file")


def test_stat_directory(alice, server):
    answer = alice.stat("sub")
    assert answer["entry"]["name"] == "sub"
    entry_matches(answer["entry"], server.root / "sub", "dir")


def test_stat_root(alice, server):
    answer = alice.stat("")
    assert answer["entry"]["name"] == "."
    entry_matches(answer["entry"], server.root, "dir")


def test_stat_missing_is_not_found(alice):
    assert_refusal(alice, alice.stat("no-such-file"), "not-found")


def test_list_plain(alice, server):
    entries, plaintexts = alice.list("")
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names))
    assert set(names) == set(os.listdir(server.root))
    by_name = {e["name"]: e for e in entries}
    entry_matches(by_name["hello.txt"], server.root / "hello.txt", "file")
    entry_matches(by_name["sub"], server.root / "sub", "dir")
    assert by_name["link.txt"]["kind"] == "symlink"
    assert all(len(p) < 65536 for p in plaintexts)
    assert_ready(alice)


def test_list_empty_directory(alice):
    alice.send_control({"type": "list", "path": "tree/d", "recursive": False})
    assert alice.recv_message() == {"type": "entries", "entries": [], "more": False}


def test_canonical_json_with_unusual_names(alice, server):
    """Every message the client parses is compared with its canonical bytes; these names need
    escapes (quote, backslash, tab, U+0001) or are raw UTF-8 (é, U+2028, U+1F600, DEL)."""
    entries, _ = alice.list("names")
    assert sorted(e["name"] for e in entries) == sorted(os.listdir(server.root / "names"))
    for name in os.listdir(server.root / "names"):
        assert alice.stat("names/" + name)["entry"]["name"] == name


def test_list_in_several_batches_each_under_64k(alice, server):
    entries, plaintexts = alice.list("many")
    assert len(plaintexts) > 1
    assert all(len(p) < 65536 for p in plaintexts)
    assert sorted(e["name"] for e in entries) == sorted(os.listdir(server.root / "many"))
    for p in plaintexts[:-1]:
        assert json.loads(p)["more"] is True
    assert json.loads(plaintexts[-1])["more"] is False


def test_list_of_a_file_gives_its_entry(alice, server):
    entries, _ = alice.list("hello.txt")
    assert len(entries) == 1
    entry_matches(entries[0], server.root / "hello.txt", "file")


def check_recursive(entries, top):
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), "a name listed twice"
    position = {name: i for i, name in enumerate(names)}
    expected = set()
    for directory, dirs, files in os.walk(top):  # os.walk does not follow symlinks to dirs
        relative = os.path.relpath(directory, top)
        for name in dirs + files:
            if not name.startswith(".eke-part."):
                expected.add(name if relative == "." else f"{relative}/{name}")
    assert set(names) == expected
    for name in names:
        assert not name.startswith("/") and "" not in name.split("/")
        assert all(s not in (".", "..") for s in name.split("/"))
        if "/" in name:
            parent = name.rsplit("/", 1)[0]
            assert position[parent] < position[name], f"{name} came before its directory"
            assert entries[position[parent]]["kind"] == "dir"


def test_list_recursive_directories_first(alice, server):
    entries, plaintexts = alice.list("tree", recursive=True)
    check_recursive(entries, server.root / "tree")
    assert {e["name"]: e["kind"] for e in entries}["a/b/c.txt"] == "file"
    entries, plaintexts = alice.list("", recursive=True)
    check_recursive(entries, server.root)
    assert all(len(p) < 65536 for p in plaintexts)
    assert_ready(alice)


def test_mkdir(alice, server):
    assert alice.request({"type": "mkdir", "path": "up/newdir", "mode": 0o750}) == {"type": "done"}
    st = os.stat(server.root / "up" / "newdir")
    assert (st.st_mode & 0o7777) == 0o750
    assert_refusal(alice, alice.request({"type": "mkdir", "path": "sub"}), "exists")
    assert_refusal(alice, alice.request({"type": "mkdir", "path": "hello.txt"}), "exists")
    assert_refusal(alice, alice.request({"type": "mkdir", "path": "up/nope/child"}), "not-found")
    assert not (server.root / "up" / "nope").exists()
    with spec.connect_login(server.port, "alice", ALICE_PW) as other:  # not made on this one
        answer = other.request({"type": "mkdir", "path": "up/newdir", "mode": 0o700})
        assert_refusal(other, answer, "exists")
    assert (os.stat(server.root / "up" / "newdir").st_mode & 0o7777) == 0o750  # left as it was


def test_mkdir_again_on_the_same_connection_sets_mode_and_mtime(alice, server):
    assert alice.request({"type": "mkdir", "path": "up/treedir"}) == {"type": "done"}
    answer = alice.request({"type": "mkdir", "path": "up/treedir", "mode": 0o711, "mtime": 1600000000.5})
    assert answer == {"type": "done"}  # §7.4's exception (the page does not name the answer)
    st = os.stat(server.root / "up" / "treedir")
    assert st.st_mode & 0o7777 == 0o711 and abs(st.st_mtime - 1600000000.5) < 1e-3


def test_mkdir_read_only_account(reader, server):
    assert_refusal(reader, reader.request({"type": "mkdir", "path": "up/readers"}), "permission-denied")
    assert not (server.root / "up" / "readers").exists()


def check_file_header(header, path, name, offset=0):
    st = os.stat(path)
    assert header["type"] == "file" and header["name"] == name and header["digest"] == "sha1"
    assert header["size"] == st.st_size and header["offset"] == offset
    assert header["mode"] == st.st_mode & 0o777
    assert abs(header["mtime"] - st.st_mtime) < 1e-3


def test_get_empty_file(alice, server):
    header, chunks, end = alice.get("empty")
    check_file_header(header, server.root / "empty", "empty")
    assert b"".join(chunks) == b""
    assert end == {"type": "end", "size": 0, "sha1": sha1(b"")}


def test_get_small_file(alice, server):
    header, chunks, end = alice.get("hello.txt")
    check_file_header(header, server.root / "hello.txt", "hello.txt")
    assert b"".join(chunks) == b"hello, world\n"
    assert end == {"type": "end", "size": 13, "sha1": sha1(b"hello, world\n")}
    header, chunks, end = alice.get("sub/data.bin")
    content = (server.root / "sub" / "data.bin").read_bytes()
    check_file_header(header, server.root / "sub" / "data.bin", "data.bin")
    assert b"".join(chunks) == content and end["sha1"] == sha1(content)


def test_get_several_mib_in_several_records(alice, server):
    content = (server.root / "big.bin").read_bytes()
    header, chunks, end = alice.get("big.bin")
    check_file_header(header, server.root / "big.bin", "big.bin")
    assert len(chunks) >= 3  # at most 2 MiB of plaintext a record
    assert all(0 < len(c) <= 2 * MiB for c in chunks)
    assert b"".join(chunks) == content
    assert end == {"type": "end", "size": len(content), "sha1": sha1(content)}
    assert_ready(alice)


def test_get_resume_with_true_prefix(alice, server):
    content = (server.root / "big.bin").read_bytes()
    offset = 3 * MiB + 7
    header, chunks, end = alice.get("big.bin", offset, hashlib.sha1(content[:offset]).digest())
    check_file_header(header, server.root / "big.bin", "big.bin", offset=offset)
    assert b"".join(chunks) == content[offset:]
    assert end == {"type": "end", "size": len(content), "sha1": sha1(content)}  # whole file


def test_get_resume_at_the_full_size_sends_no_data(alice):
    content = b"hello, world\n"
    header, chunks, end = alice.get("hello.txt", len(content), hashlib.sha1(content).digest())
    assert header["offset"] == len(content) and chunks == []
    assert end == {"type": "end", "size": len(content), "sha1": sha1(content)}


def test_get_resume_with_wrong_sha1_starts_over(alice, server):
    content = (server.root / "big.bin").read_bytes()
    header, chunks, end = alice.get("big.bin", 1000, hashlib.sha1(b"x" * 1000).digest())
    assert header["offset"] == 0
    assert b"".join(chunks) == content
    assert end == {"type": "end", "size": len(content), "sha1": sha1(content)}


def test_get_refusals(alice):
    for path, code in (("no-such-file", "not-found"), ("sub", "not-a-file")):
        alice.send_control({"type": "get", "path": path})
        assert_refusal(alice, alice.recv_message(), code)


def test_put_new_file(alice, server):
    data = os.urandom(3 * MiB + 99)
    ready, stored = alice.put("up/new.bin", data, mode=0o640, mtime=1700000000.25)
    assert ready == {"type": "ready", "offset": 0}  # no sha1 when the offset is 0
    assert stored == {"type": "stored", "size": len(data), "sha1": sha1(data)}
    path = server.root / "up" / "new.bin"
    assert path.read_bytes() == data
    st = os.stat(path)
    assert st.st_mode & 0o7777 == 0o640
    assert abs(st.st_mtime - 1700000000.25) < 1e-3
    assert_ready(alice)


def test_put_exists_without_force_and_force_replaces(alice, server):
    path = server.root / "up" / "replace.txt"
    path.write_bytes(b"old")
    ready = alice.put_offer("up/replace.txt", 3)
    assert_refusal(alice, ready, "exists")
    assert path.read_bytes() == b"old"
    ready, stored = alice.put("up/replace.txt", b"new contents", force=True)
    assert ready["type"] == "ready" and stored["type"] == "stored"
    assert path.read_bytes() == b"new contents"


def test_put_read_only_account(reader, server):
    assert_refusal(reader, reader.put_offer("up/by-reader", 1), "permission-denied")
    assert not (server.root / "up" / "by-reader").exists()


def test_put_refusals(alice, server):
    assert_refusal(alice, alice.put_offer("sub", 1, force=True), "not-a-file")
    assert_refusal(alice, alice.put_offer("up/no-dir/x", 1), "not-found")
    assert_refusal(alice, alice.put_offer("up/too-large.bin", 200 * MiB), "too-large")
    assert not (server.root / "up" / "too-large.bin").exists()


def test_put_same_path_twice_at_once_is_busy(server):
    with spec.connect_login(server.port, "alice", ALICE_PW) as first:
        assert first.put_offer("up/busy.bin", 10)["type"] == "ready"
        with spec.connect_login(server.port, "alice", ALICE_PW) as second:
            assert_refusal(second, second.put_offer("up/busy.bin", 10), "busy")


def test_put_wrong_sha1_after_end_is_integrity_and_stays_ready(alice, server):
    data = b"some bytes to upload"
    assert alice.put_offer("up/bad-digest.txt", len(data))["offset"] == 0
    alice.send_control({"type": "upload", "offset": 0})
    alice.send_data(data)
    alice.send_control({"type": "end", "size": len(data), "sha1": sha1(b"other bytes")})
    assert_refusal(alice, alice.recv_message(), "integrity")  # §7.5: the connection stays ready
    assert not (server.root / "up" / "bad-digest.txt").exists()
    assert not (server.root / "up" / partial_name("alice", "bad-digest.txt")).exists()


def test_put_more_bytes_than_size_is_integrity_and_close(alice, server):
    assert alice.put_offer("up/overflow.bin", 10)["offset"] == 0
    alice.send_control({"type": "upload", "offset": 0})
    alice.send_record(DATA, b"x" * 11)
    assert_fatal(alice, "integrity")
    assert not (server.root / "up" / "overflow.bin").exists()


def test_put_resume_after_dropped_connection(server):
    data = os.urandom(3 * MiB)
    sent = MiB + 1024
    interrupted_upload(server, "up/resumed.bin", data, sent)
    deadline = time.monotonic() + 10
    while True:  # the server may still be closing the first upload: `busy` until it has
        c = spec.connect_login(server.port, "alice", ALICE_PW)
        ready = c.put_offer("up/resumed.bin", len(data))
        if ready.get("code") != "busy" or time.monotonic() > deadline:
            break
        c.close()
        time.sleep(0.05)
    with c:
        assert ready["type"] == "ready", ready
        offset = ready["offset"]
        assert 0 < offset <= sent, ready
        assert ready["sha1"] == sha1(data[:offset])
        c.send_control({"type": "upload", "offset": offset})
        c.send_data(data[offset:])
        c.send_control({"type": "end", "size": len(data), "sha1": sha1(data)})
        assert c.recv_message() == {"type": "stored", "size": len(data), "sha1": sha1(data)}
    assert (server.root / "up" / "resumed.bin").read_bytes() == data


def test_list_all_shows_own_partial_upload(server):
    data = os.urandom(MiB)
    interrupted_upload(server, "up/shown.bin", data, 300_000)
    wait_for(lambda: (server.root / "up" / partial_name("alice", "shown.bin")).exists())
    with spec.connect_login(server.port, "alice", ALICE_PW) as c:
        entries, _ = c.list("up")
        assert not any(e["name"].startswith(".eke-part.") for e in entries)
        assert "shown.bin" not in [e["name"] for e in entries]
        entries, _ = c.list("up", all=True)
        partial = [e for e in entries if e["name"] == "shown.bin"]
        assert len(partial) == 1 and partial[0]["kind"] == "partial"
        assert 0 < partial[0]["size"] <= 300_000
    with spec.connect_login(server.port, "reader", READER_PW) as c:
        entries, _ = c.list("up", all=True)  # never other users' partial uploads
        assert "shown.bin" not in [e["name"] for e in entries]


def test_unknown_request_is_unsupported_and_connection_stays(alice):
    answer = alice.request({"type": "frobnicate", "path": "hello.txt"})
    assert_refusal(alice, answer, "unsupported")


def test_control_plaintext_of_65536_bytes_is_accepted(alice):
    message = {"type": "stat", "path": "hello.txt", "padding": ""}
    message["padding"] = "p" * (65536 - len(canonical(message)))
    assert len(canonical(message)) == 65536
    alice.send_record(CONTROL, canonical(message))
    assert alice.recv_message()["entry"]["name"] == "hello.txt"


def test_control_plaintext_over_65536_bytes_is_protocol(alice):
    message = {"type": "stat", "path": "hello.txt", "padding": ""}
    message["padding"] = "p" * (65537 - len(canonical(message)))
    alice.send_record(CONTROL, canonical(message))
    assert_fatal(alice, "protocol")


def test_frame_over_the_record_limit_is_protocol_from_its_header(alice):
    alice.send_raw(spec.HEADER.pack(2097169, DATA))  # the header alone
    assert_fatal(alice, "protocol")


def test_unknown_frame_kind_after_login_is_protocol(alice):
    alice.send_raw(frame(3, bytes(32)))
    assert_fatal(alice, "protocol")


def test_unknown_frame_kind_before_login_is_protocol(guarded):
    with spec.Connection(guarded.port) as c:
        c.send_raw(frame(3, canonical({"type": "hello", "version": 1, "user": "alice"})))
        assert_handshake_error_then_close(c, "protocol")


@pytest.mark.parametrize("payload", [b"not json", b"[1]", b'{"version": 1}', b'{"type": 1}',
                                     rb'{"type": "hello", "version": 1, "user": "a\ud800"}',
                                     b"\xff\xfe"], ids=repr)
def test_malformed_hello_is_protocol(guarded, payload):
    with spec.Connection(guarded.port) as c:
        c.send_raw(frame(HANDSHAKE, payload))
        assert_handshake_error_then_close(c, "protocol")


@pytest.mark.parametrize("point", [
    "04" + "00" * 64,                                   # the identity
    "04" + "00" * 63 + "01",                            # not on the curve
    "02" + "886e2f97ace46e55ba9dd7242579f2993b64e16ef3dcab95afd497333d8fa12f",  # compressed
    "04" + "ff" * 64,                                   # coordinates >= the prime
], ids=["identity", "off-curve", "compressed", "over-prime"])
def test_invalid_share_point_is_protocol(guarded, point):
    with spec.Connection(guarded.port) as c:
        c.hello("alice")
        c.send_handshake({"type": "share", "share": point})
        assert_handshake_error_then_close(c, "protocol")


# == Fatal errors end the stream (§3.7, §6, §9) ===============================================

def start_huge_get(connection):
    connection.send_control({"type": "get", "path": "huge.bin"})
    header = connection.recv_message()
    assert header["type"] == "file" and header["size"] == 64 * MiB
    return header


def test_tampered_control_record_during_get(alice):
    start_huge_get(alice)
    alice.send_tampered(CONTROL, canonical({"type": "stat", "path": "hello.txt"}), bit=5)
    assert_fatal(alice, "integrity", in_flight=True)


def test_new_request_while_data_streams(alice):
    start_huge_get(alice)
    alice.send_control({"type": "stat", "path": "hello.txt"})
    records = assert_fatal(alice, "protocol", in_flight=True)
    assert sum(r.kind == DATA for r in records) * 2 * MiB < 64 * MiB  # it stopped streaming


def test_handshake_frame_after_login_during_get(alice):
    start_huge_get(alice)
    alice.send_raw(frame(HANDSHAKE, canonical({"type": "hello", "version": 1, "user": "alice"})))
    assert_fatal(alice, "protocol", in_flight=True)


def test_handshake_frame_after_login_when_ready(alice):
    alice.send_raw(frame(HANDSHAKE, canonical({"type": "hello", "version": 1, "user": "alice"})))
    assert_fatal(alice, "protocol")


def test_tampered_data_record_during_upload(alice, server):
    data = os.urandom(2 * MiB)
    assert alice.put_offer("up/tampered.bin", len(data)) == {"type": "ready", "offset": 0}
    alice.send_control({"type": "upload", "offset": 0})
    alice.send_record(DATA, data[:MiB])
    alice.send_tampered(DATA, data[MiB:], bit=1000)
    records = assert_fatal(alice, "integrity")
    assert len(records) == 1
    assert not (server.root / "up" / "tampered.bin").exists()
    # Bad data is worth nothing: its partial file goes too (§7.5), once the server has seen the close.
    part = server.root / "up" / (".eke-part." + hashlib.sha256(b"alice\0tampered.bin").hexdigest()[:32])
    deadline = time.monotonic() + 5
    while part.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not part.exists()


# == Refusals, protocol errors and edge cases (§3, §7.8) =====================================

NOT_STRINGS = [1, None, ["hello.txt"], {"p": "hello.txt"}, True, "<missing>"]


def request_with_path(kind, path):
    message = {"stat": {"type": "stat"}, "get": {"type": "get"},
               "list": {"type": "list", "recursive": False},
               "mkdir": {"type": "mkdir"}, "put": {"type": "put", "size": 1}}[kind]
    if path != "<missing>":
        message = {**message, "path": path}
    return message


@pytest.mark.parametrize("kind", ["stat", "get", "list", "mkdir", "put"])
@pytest.mark.parametrize("path", NOT_STRINGS, ids=repr)
def test_decision_path_must_be_a_string(alice, kind, path):
    alice.send_control(request_with_path(kind, path))
    assert_fatal(alice, "protocol")


BAD_PATHS = {
    "over-4096-bytes": "d/" * 2048 + "x",
    "nul": "sub\u0000data.bin",
    "absolute": "/hello.txt",
    "dotdot": "../hello.txt",
    "inner-dotdot": "sub/../hello.txt",
    "part-name": ".eke-part.0123456789abcdef0123456789abcdef",
    "inner-part-name": "up/.eke-part.x",
    "name-over-255-bytes": "a" * 256,
    "name-over-255-bytes-utf8": "\u00e9" * 128,
}


@pytest.mark.parametrize("case", list(BAD_PATHS))
def test_decision_bad_path_is_a_refusal(alice, server, case):
    path = BAD_PATHS[case]
    assert len(path.encode()) > 4096 or case != "over-4096-bytes"
    for kind in ("stat", "get", "list", "mkdir", "put"):
        answer = alice.request(request_with_path(kind, path))
        assert answer["type"] == "error" and answer["code"] == "bad-path", (kind, answer)
        assert_ready(alice)


@pytest.mark.parametrize("alias", ["", ".", "./"])
def test_decision_root_aliases(alice, server, alias):
    answer = alice.stat(alias)
    assert answer["entry"]["name"] == "." and answer["entry"]["kind"] == "dir", answer
    alice.send_control({"type": "get", "path": alias})
    assert_refusal(alice, alice.recv_message(), "not-a-file")
    assert_refusal(alice, alice.put_offer(alias, 1, force=True), "not-a-file")
    assert_refusal(alice, alice.request({"type": "mkdir", "path": alias}), "exists")
    entries, _ = alice.list(alias)
    assert {e["name"] for e in entries} == set(os.listdir(server.root))


WRONG_TYPES = [
    ("list", "recursive", 1), ("list", "recursive", "true"), ("list", "recursive", None),
    ("list", "all", 0), ("list", "all", None),
    ("put", "force", 1), ("put", "force", "yes"), ("put", "force", None),
    ("get", "offset", "0"), ("get", "offset", None), ("get", "offset", True), ("get", "offset", 1.5),
    ("put", "size", "1"), ("put", "size", None), ("put", "size", 1.5), ("put", "size", False),
    ("put", "mode", "644"), ("put", "mode", None), ("put", "mode", 420.5),
    ("mkdir", "mode", "755"), ("mkdir", "mode", None),
    ("put", "mtime", "1700000000"), ("put", "mtime", None), ("put", "mtime", True),
    ("mkdir", "mtime", "now"), ("mkdir", "mtime", None),
]

OUT_OF_RANGE = [
    ("get", "offset", -1), ("get", "offset", 2**63),
    ("put", "size", -1), ("put", "size", 2**63),
    ("put", "mode", -1), ("put", "mode", 0o10000), ("mkdir", "mode", 0o10000),
    ("put", "mtime", 2**40), ("put", "mtime", -(2**40)), ("put", "mtime", 2.0**40),
    ("mkdir", "mtime", 2**40),
]

BASE = {
    "list": {"type": "list", "path": ""},
    "get": {"type": "get", "path": "hello.txt", "sha1": "00" * 20},
    "put": {"type": "put", "path": "up/typed.bin", "size": 1},
    "mkdir": {"type": "mkdir", "path": "up/typed-dir"},
}


@pytest.mark.parametrize("kind,member,value", WRONG_TYPES + OUT_OF_RANGE, ids=repr)
def test_decision_member_type_and_range(alice, server, kind, member, value):
    alice.send_control({**BASE[kind], member: value})
    assert_fatal(alice, "protocol")
    assert not (server.root / "up" / "typed-dir").exists()


def test_decision_largest_offset_is_accepted(alice):
    header, chunks, _ = alice.get("hello.txt", 2**63 - 1, bytes(20))
    assert header["offset"] == 0 and b"".join(chunks) == b"hello, world\n"


def test_decision_setuid_setgid_sticky_accepted_and_ignored(alice, server):
    _, stored = alice.put("up/setuid.bin", b"#!/bin/sh\n", mode=0o4755)
    assert stored["type"] == "stored", stored
    assert os.stat(server.root / "up" / "setuid.bin").st_mode & 0o7777 == 0o755
    _, stored = alice.put("up/all-bits.bin", b"x", mode=0o7777)
    assert stored["type"] == "stored", stored
    assert os.stat(server.root / "up" / "all-bits.bin").st_mode & 0o7000 == 0


INVALID_USERS = {
    "empty": "",
    "65-bytes": "u" * 65,
    "33-two-byte-chars": "\u00e9" * 33,
    "space": "al ice",
    "nbsp": "al\u00a0ice",
    "line-separator": "al\u2028ice",
    "zero-width-space": "al\u200bice",
    "control": "al\u0001ice",
    "del": "al\u007fice",
    "tab": "al\tice",
    "soft-hyphen-Cf": "al\u00adice",
    "private-use-Co": "al\ue000ice",
}


@pytest.mark.parametrize("case", list(INVALID_USERS))
def test_decision_invalid_username(guarded, case):
    with spec.Connection(guarded.port) as c:
        c.send_handshake({"type": "hello", "version": 1, "user": INVALID_USERS[case]})
        message = assert_handshake_error_then_close(c, "auth-failed")
        text = message["message"].lower()  # the page's wording is not fixed: "invalid" or "not a valid"
        assert "user" in text and ("invalid" in text or "not a valid" in text), message


@pytest.mark.parametrize("name", ["u" * 64, "\u00e9" * 32, "\u00e9l\u00e8ve-\u4e2d"])
def test_decision_valid_unusual_usernames_get_params(guarded, name):
    with spec.Connection(guarded.port) as c:
        assert c.hello(name)["type"] == "params"


def test_decision_message_during_final_flush(alice, server):
    data = os.urandom(MiB)
    assert alice.put_offer("up/flush.bin", len(data)) == {"type": "ready", "offset": 0}
    alice.send_control({"type": "upload", "offset": 0})
    alice.send_data(data)
    end = alice.seal(CONTROL, canonical({"type": "end", "size": len(data), "sha1": sha1(data)}))
    stat = alice.seal(CONTROL, canonical({"type": "stat", "path": "hello.txt"}))
    alice.send_raw(end + stat)
    records = alice.records_until_eof()
    messages = [alice.parse(r.plaintext) for r in records]
    assert [m["type"] for m in messages] == ["stored", "error"], messages
    assert messages[0] == {"type": "stored", "size": len(data), "sha1": sha1(data)}
    assert messages[1]["code"] == "protocol"
    assert (server.root / "up" / "flush.bin").read_bytes() == data


def test_decision_stat_symlink_is_not_followed(alice, server):
    for path, name in (("link.txt", "link.txt"), ("sub/link", "link")):
        entry = alice.stat(path)["entry"]
        assert entry["name"] == name and entry["kind"] == "symlink", entry
        assert entry["size"] == os.lstat(server.root / path).st_size


def test_decision_get_symlink_serves_target_under_requested_name(alice):
    for path, name in (("link.txt", "link.txt"), ("sub/link", "link")):
        header, chunks, end = alice.get(path)
        assert header["name"] == name and header["size"] == 13, header
        assert b"".join(chunks) == b"hello, world\n"
        assert end["sha1"] == sha1(b"hello, world\n")


def test_decision_partial_upload_name(server):
    (server.root / "up" / "deep").mkdir()
    interrupted_upload(server, "up/deep/named.bin", os.urandom(MiB), 200_000)
    expected = server.root / "up" / "deep" / partial_name("alice", "named.bin")
    wait_for(expected.exists)
    assert [p.name for p in (server.root / "up" / "deep").iterdir()] == [expected.name]
    assert len(expected.name) == len(".eke-part.") + 32


def test_decision_list_of_a_symlink_lists_its_directory_or_gives_the_link(alice, server):
    through_link, _ = alice.list("dirlink")
    assert sorted(e["name"] for e in through_link) == sorted(os.listdir(server.root / "tree"))
    (entry,), _ = alice.list("link.txt")
    assert entry["name"] == "link.txt" and entry["kind"] == "symlink"


# == Second pass: what a reviewer probing from the page found (§3, §7, §7.5, §7.6) ==========

@pytest.mark.parametrize("message", [
    {"type": "upload", "offset": 0}, {"type": "end", "size": 0, "sha1": "00" * 20},
    {"type": "ready", "offset": 0}, {"type": "stored", "size": 0, "sha1": "00" * 20},
])
def test_out_of_place_steps_in_ready_are_unsupported(alice, message):
    assert_refusal(alice, alice.request(message), "unsupported")


def test_data_in_ready_is_protocol(alice):
    alice.send_record(DATA, b"")
    assert_fatal(alice, "protocol")


def test_a_member_twice_is_protocol(alice):
    alice.send_record(CONTROL, b'{"type":"stat","path":"nope","path":"hello.txt"}')
    assert_fatal(alice, "protocol")


def test_nesting_past_32_levels_is_protocol(alice):
    alice.send_record(CONTROL, b'{"type":"stat","path":"hello.txt","x":' + b"[" * 33 + b"]" * 33 + b"}")
    assert_fatal(alice, "protocol")


def test_put_with_force_replaces_a_symlink_not_its_target(alice, server):
    os.symlink("../hello.txt", server.root / "up" / "pointer")
    before = (server.root / "hello.txt").read_bytes()
    assert alice.put_offer("up/pointer", 3)["code"] == "exists"  # without force
    assert alice.put("up/pointer", b"new", force=True)[1]["type"] == "stored"
    assert not (server.root / "up" / "pointer").is_symlink()
    assert (server.root / "up" / "pointer").read_bytes() == b"new"
    assert (server.root / "hello.txt").read_bytes() == before


def test_a_partial_longer_than_the_new_size_starts_over(server):
    data = os.urandom(MiB)
    interrupted_upload(server, "up/shrunk.bin", data, 600_000)
    part = server.root / "up" / partial_name("alice", "shrunk.bin")
    wait_for(lambda: part.exists() and part.stat().st_size > 0)
    deadline = time.monotonic() + 10
    while True:
        c = spec.connect_login(server.port, "alice", ALICE_PW)
        ready = c.put_offer("up/shrunk.bin", 1000)
        if ready.get("code") != "busy" or time.monotonic() > deadline:
            break
        c.close()
        time.sleep(0.05)
    with c:
        assert ready == {"type": "ready", "offset": 0}
        assert part.stat().st_size == 0  # emptied at once


def test_exists_after_end_keeps_the_partial_and_force_resumes_at_its_size(alice, server):
    data = b"the bytes of a file that appeared meanwhile\n"
    assert alice.put_offer("up/raced.txt", len(data))["offset"] == 0
    alice.send_control({"type": "upload", "offset": 0})
    alice.send_data(data)
    (server.root / "up" / "raced.txt").write_bytes(b"someone else's")
    alice.send_control({"type": "end", "size": len(data), "sha1": sha1(data)})
    assert_refusal(alice, alice.recv_message(), "exists")
    ready = alice.put_offer("up/raced.txt", len(data), force=True)
    assert ready == {"type": "ready", "offset": len(data), "sha1": sha1(data)}


def test_a_control_message_of_type_data_in_ready_is_unsupported(alice):
    assert_refusal(alice, alice.request({"type": "data"}), "unsupported")


# -- §7.10: managing files, against the real daemon


def test_managing_files(alice, reader, server):
    base = server.root / "up" / "manage"
    (base / "tree" / "deeper").mkdir(parents=True)
    (base / "tree" / "deeper" / "f").write_bytes(b"f")
    (base / "tree" / "g").write_bytes(b"g")
    (base / "empty").mkdir()
    data = b"manage me\n"
    (base / "a.txt").write_bytes(data)
    st = os.stat(base / "a.txt")
    assert alice.request({"type": "hash", "path": "up/manage/a.txt"}) == {
        "type": "digest", "name": "a.txt", "size": len(data), "mtime": st.st_mtime, "sha1": sha1(data),
    }
    assert alice.request({"type": "chmod", "path": "up/manage/a.txt", "mode": 0o600}) == {"type": "done", "removed": 0}
    assert os.stat(base / "a.txt").st_mode & 0o7777 == 0o600
    assert alice.request({"type": "rename", "path": "up/manage/a.txt", "to": "up/manage/b.txt"}) == {
        "type": "done", "removed": 0,
    }
    assert_refusal(alice, alice.request({"type": "rename", "path": "up/manage/b.txt", "to": "hello.txt"}), "exists")
    assert_refusal(alice, alice.request({"type": "rmdir", "path": "up/manage/tree"}), "not-empty")
    assert_refusal(alice, alice.request({"type": "rmdir", "path": "up/manage/b.txt"}), "not-a-directory")
    assert_refusal(alice, alice.request({"type": "remove", "path": "up/manage/tree"}), "not-a-file")
    assert alice.request({"type": "rmdir", "path": "up/manage/empty"}) == {"type": "done", "removed": 1}
    assert alice.request({"type": "remove", "path": "up/manage/tree", "recursive": True}) == {"type": "done", "removed": 4}
    assert alice.request({"type": "remove", "path": "up/manage/b.txt"}) == {"type": "done", "removed": 1}
    assert os.listdir(base) == []
    space = alice.request({"type": "space"})
    assert space["type"] == "space" and 0 <= space["free"] <= space["total"] and isinstance(space["files_free"], int)
    assert_refusal(reader, reader.request({"type": "remove", "path": "hello.txt"}), "permission-denied")
    assert reader.request({"type": "space"})["type"] == "space"
    assert (server.root / "hello.txt").exists()
    assert alice.request({"type": "rmdir", "path": "up/manage"}) == {"type": "done", "removed": 1}
