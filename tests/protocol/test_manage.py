"""REMOVE, RMDIR, RENAME, CHMOD, HASH and SPACE (docs/protocol.md section 7.10) through the real
ServerProtocol, in memory (tests/support/conversation.py: a StringTransport, a Clock, threads run
by hand), in version 1 and pipelined in version 2; and the serving machine's part alone."""

import dataclasses
import hashlib
import json
import os
import stat

import pytest
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from eketwist import serving, userdb, wire
from eketwist.errors import ProtocolError

from ..support.conversation import Conversation, make_world, threads_by_hand
from ..support.processes import FAST_SCRYPT


@pytest.fixture
def threads():
    with threads_by_hand() as pool:
        yield pool


@pytest.fixture
def fresh_world(tmp_path):
    """A world of its own (the shared one is module-wide): root with hello.txt and sub/."""
    return make_world(tmp_path, FAST_SCRYPT)


def world_with_rights(tmp_path, rights):
    """A world whose user "fuzzer" has `rights` (a bundle's name or a set of rights)."""
    root, users_path, _, _ = world = make_world(tmp_path, FAST_SCRYPT)
    users = userdb.load(users_path)
    users.by_name["fuzzer"] = dataclasses.replace(users.by_name["fuzzer"], rights=rights)
    userdb.save(users_path, users)
    return world


def connected(world, version=1):
    conversation = Conversation(world, version=version)
    conversation.reach("ready")
    conversation.frames_out()
    return conversation


def settle(conversation, threads):
    """Thread work, timers due now, and a listing's or a file's producer pulled (nothing
    reads a StringTransport), until nothing is left to do."""
    for _ in range(200):
        threads.run()
        conversation.factory.clock.advance(0)
        transport = conversation.transport
        if transport.producer is not None and transport.producer is not conversation.proto and not transport.streaming:
            transport.producer.resumeProducing()
            continue
        if not threads.pending:
            return


def ask(conversation, threads, *messages):
    """Send `messages` in one write; the CONTROL answers once everything has settled."""
    conversation.feed(b"".join(conversation.message_frame(message) for message in messages))
    settle(conversation, threads)
    return [json.loads(plaintext) for kind, plaintext in conversation.frames_out() if kind == wire.CONTROL]


def make_tree(root):
    (root / "t" / "a" / "b").mkdir(parents=True)
    (root / "t" / "x.txt").write_text("x")
    (root / "t" / "a" / "y.txt").write_text("y")
    (root / "t" / "a" / "b" / "z.txt").write_text("z")


# -- version 1: one request at a time


@pytest.mark.parametrize("version", [1, 2])
def test_each_request_answered_and_the_connection_stays_ready(fresh_world, threads, version):
    root = fresh_world[0]
    make_tree(root)
    (root / "empty").mkdir()
    conversation = connected(fresh_world, version)
    data = (root / "hello.txt").read_bytes()

    assert ask(conversation, threads, {"type": "remove", "path": "t/x.txt"}) == [{"type": "done", "removed": 1}]
    assert ask(conversation, threads, {"type": "rmdir", "path": "empty"}) == [{"type": "done", "removed": 1}]
    assert ask(conversation, threads, {"type": "rename", "path": "hello.txt", "to": "t/a/hi.txt"}) == [
        {"type": "done", "removed": 0}
    ]
    assert ask(conversation, threads, {"type": "chmod", "path": "t/a/hi.txt", "mode": 0o7640}) == [
        {"type": "done", "removed": 0}
    ]
    assert stat.S_IMODE((root / "t" / "a" / "hi.txt").stat().st_mode) == 0o640
    [digest] = ask(conversation, threads, {"type": "hash", "path": "t/a/hi.txt"})
    st = (root / "t" / "a" / "hi.txt").stat()
    assert digest == {"type": "digest", "name": "hi.txt", "size": len(data), "mtime": st.st_mtime,
                      "sha1": hashlib.sha1(data).hexdigest()}
    [space] = ask(conversation, threads, {"type": "space"})
    assert set(space) == {"type", "total", "free", "files_free"} and space["type"] == "space"
    assert 0 <= space["free"] <= space["total"]
    assert ask(conversation, threads, {"type": "remove", "path": "t", "recursive": True}) == [
        {"type": "done", "removed": 6}
    ]
    assert not (root / "t").exists()
    assert conversation.proto.state == "ready" and not conversation.transport.disconnecting


def test_a_recursive_remove_and_a_hash_work_in_state_working(fresh_world, threads):
    root = fresh_world[0]
    make_tree(root)
    conversation = connected(fresh_world)
    for request in ({"type": "remove", "path": "t", "recursive": True}, {"type": "hash", "path": "hello.txt"}):
        conversation.feed(conversation.message_frame(request))
        assert conversation.proto.state == "working" and threads.pending
        assert conversation.proto._TimeoutMixin__timeoutCall is None  # it waits for our disk, not for the client
        assert not conversation.frames_out()
        settle(conversation, threads)
        assert conversation.proto.state == "ready"
        assert [json.loads(p)["type"] for _, p in conversation.frames_out()] == [
            "done" if request["type"] == "remove" else "digest"
        ]


def test_version_1_a_request_while_working_is_a_protocol_error(fresh_world, threads):
    root = fresh_world[0]
    make_tree(root)
    conversation = connected(fresh_world)
    answers = ask(conversation, threads, {"type": "remove", "path": "t", "recursive": True}, {"type": "space"})
    assert [answer["type"] for answer in answers] == ["error"] and answers[0]["code"] == "protocol"
    assert conversation.transport.disconnecting


@pytest.mark.parametrize("request_, code", [
    ({"type": "remove", "path": ".."}, "bad-path"),
    ({"type": "remove", "path": ""}, "bad-path"),
    ({"type": "remove", "path": "sub"}, "not-a-file"),
    ({"type": "remove", "path": "nothing", "recursive": True}, "not-found"),
    ({"type": "remove", "path": ".eke-part.0123"}, "bad-path"),
    ({"type": "rmdir", "path": "hello.txt"}, "not-a-directory"),
    ({"type": "rmdir", "path": "full"}, "not-empty"),
    ({"type": "rmdir", "path": "."}, "bad-path"),
    ({"type": "rename", "path": "hello.txt", "to": "full/f"}, "exists"),
    ({"type": "rename", "path": "full", "to": "full/inner"}, "bad-path"),
    ({"type": "rename", "path": "hello.txt", "to": "no/such"}, "not-found"),
    ({"type": "rename", "path": "sub", "to": "full", "force": True}, "not-empty"),
    ({"type": "rename", "path": "hello.txt", "to": ""}, "bad-path"),
    ({"type": "chmod", "path": "link", "mode": 0o644}, "not-a-file"),
    ({"type": "chmod", "path": "", "mode": 0o755}, "bad-path"),
    ({"type": "hash", "path": "sub"}, "not-a-file"),
    ({"type": "hash", "path": "nothing"}, "not-found"),
    ({"type": "hash", "path": "link-out"}, "bad-path"),
])
@pytest.mark.parametrize("version", [1, 2])
def test_refusals_leave_the_connection_ready(fresh_world, threads, request_, code, version, tmp_path):
    root = fresh_world[0]
    (root / "full").mkdir()
    (root / "full" / "f").write_text("f")
    os.symlink("hello.txt", root / "link")
    os.symlink("/etc/passwd", root / "link-out")
    conversation = connected(fresh_world, version)
    if version == 1:  # one at a time
        answers = ask(conversation, threads, request_) + ask(conversation, threads, {"type": "stat", "path": "hello.txt"})
    else:
        answers = ask(conversation, threads, request_, {"type": "stat", "path": "hello.txt"})
    assert [answer["type"] for answer in answers] == ["error", "entry"], answers
    assert answers[0]["code"] == code and not conversation.transport.disconnecting
    assert (root / "hello.txt").read_bytes() == b"hello\n" and (root / "full" / "f").exists()


@pytest.mark.parametrize("message", [
    {"type": "remove"}, {"type": "remove", "path": 5}, {"type": "remove", "path": "a", "recursive": "yes"},
    {"type": "remove", "path": "a", "recursive": None}, {"type": "rmdir", "path": None},
    {"type": "rename", "path": "a"}, {"type": "rename", "path": "a", "to": 5}, {"type": "rename", "to": "b"},
    {"type": "rename", "path": "a", "to": "b", "force": 1}, {"type": "chmod", "path": "a"},
    {"type": "chmod", "path": "a", "mode": 0o10000}, {"type": "chmod", "path": "a", "mode": -1},
    {"type": "chmod", "path": "a", "mode": "644"}, {"type": "chmod", "path": "a", "mode": 420.0},
    {"type": "chmod", "path": "a", "mode": True}, {"type": "hash", "path": ["a"]}, {"type": "hash"},
    {"type": "rename", "path": "a", "to": "b\ud800"},
])
@pytest.mark.parametrize("version", [1, 2])
def test_a_member_of_the_wrong_type_is_a_protocol_error(fresh_world, threads, message, version):
    conversation = connected(fresh_world, version)
    answers = ask(conversation, threads, message)
    assert [(answer["type"], answer["code"]) for answer in answers] == [("error", "protocol")]
    assert conversation.transport.disconnecting


@pytest.mark.parametrize("kind", ["remove", "rmdir", "rename", "chmod", "hash", "space"])
def test_the_new_requests_are_no_longer_unsupported(fresh_world, threads, kind):
    message = {"type": kind, "path": "nothing", "to": "elsewhere", "mode": 0o600}
    conversation = connected(fresh_world)
    [answer] = ask(conversation, threads, message)
    assert answer.get("code") != "unsupported"
    assert answer["type"] == ("space" if kind == "space" else "error")


# -- version 2: pipelined, each request sees the effects of those before it (7.9 rules 1 and 7)


def test_pipelined_with_uploads_and_downloads_in_order(fresh_world, threads):
    root = fresh_world[0]
    make_tree(root)
    conversation = connected(fresh_world, version=2)
    content = os.urandom(70_000)
    sha1 = hashlib.sha1(content).hexdigest()
    conversation.feed(
        conversation.message_frame({"type": "put", "path": "t/new.bin", "size": len(content), "inline": True})
        + conversation.record(wire.DATA, content)
        + conversation.message_frame({"type": "end", "size": len(content), "sha1": sha1})
        # Behind the upload's commit: it must see the file stored.
        + conversation.message_frame({"type": "hash", "path": "t/new.bin"})
        + conversation.message_frame({"type": "rename", "path": "t/new.bin", "to": "moved.bin"})
        + conversation.message_frame({"type": "chmod", "path": "moved.bin", "mode": 0o600})
        + conversation.message_frame({"type": "stat", "path": "moved.bin"})
        + conversation.message_frame({"type": "remove", "path": "t", "recursive": True})
        + conversation.message_frame({"type": "list", "path": "t"})
        + conversation.message_frame({"type": "get", "path": "moved.bin"})
        + conversation.message_frame({"type": "rmdir", "path": "sub"})
        + conversation.message_frame({"type": "remove", "path": "moved.bin"})
        + conversation.message_frame({"type": "space"})
    )
    out = []
    for _ in range(100):
        settle(conversation, threads)
        out += conversation.frames_out()
        if conversation.proto.state == "ready" and not conversation.proto.owed and conversation.proto._next_request is None:
            break
        conversation.proto.transport.producer and conversation.proto.transport.producer.resumeProducing()
    answers = [json.loads(p) if kind == wire.CONTROL else ("data", len(p)) for kind, p in out]
    kinds = [answer[0] if isinstance(answer, tuple) else answer["type"] for answer in answers]
    assert kinds[:6] == ["stored", "digest", "done", "done", "entry", "done"], answers
    assert answers[1]["sha1"] == sha1 and answers[1]["size"] == len(content)
    assert answers[4]["entry"]["mode"] == 0o600
    assert answers[5] == {"type": "done", "removed": 6}  # t, a, b and their three files: new.bin had left
    assert answers[6]["type"] == "error" and answers[6]["code"] == "not-found"
    assert kinds[7] == "file" and kinds[-4:] == ["end", "done", "done", "space"], kinds
    assert answers[-4]["sha1"] == sha1
    assert not (root / "t").exists() and not (root / "moved.bin").exists() and not (root / "sub").exists()
    assert not conversation.transport.disconnecting


def test_pipelined_requests_wait_for_a_recursive_remove(fresh_world, threads):
    root = fresh_world[0]
    make_tree(root)
    conversation = connected(fresh_world, version=2)
    conversation.feed(
        conversation.message_frame({"type": "remove", "path": "t", "recursive": True})
        + conversation.message_frame({"type": "stat", "path": "t"})
    )
    assert conversation.proto.state == "working" and conversation.proto._next_request is not None
    assert not conversation.frames_out()
    settle(conversation, threads)
    answers = [json.loads(p) for _, p in conversation.frames_out()]
    assert answers[0] == {"type": "done", "removed": 6}
    assert answers[1]["type"] == "error" and answers[1]["code"] == "not-found"


def test_a_recursive_remove_leaves_a_running_uploads_partial_file_and_says_busy(fresh_world, threads):
    root = fresh_world[0]
    make_tree(root)
    uploading = connected(fresh_world)
    uploading.feed(uploading.message_frame({"type": "put", "path": "t/a/b/up.bin", "size": 10}))
    assert [json.loads(p)["type"] for _, p in uploading.frames_out()] == ["ready"]
    remover = Conversation(fresh_world, factory=uploading.factory, host="127.0.0.2")
    remover.reach("ready")
    remover.frames_out()
    [answer] = ask(remover, threads, {"type": "remove", "path": "t", "recursive": True})
    assert answer["type"] == "error" and answer["code"] == "busy"
    parts = os.listdir(root / "t" / "a" / "b")
    assert len(parts) == 1 and parts[0].startswith(".eke-part.")
    assert sorted(os.listdir(root / "t")) == ["a"] and os.listdir(root / "t" / "a") == ["b"]
    # The upload goes on and is stored.
    content = b"0123456789"
    uploading.feed(uploading.message_frame({"type": "upload", "offset": 0}) + uploading.record(wire.DATA, content)
                   + uploading.message_frame({"type": "end", "size": 10, "sha1": hashlib.sha1(content).hexdigest()}))
    settle(uploading, threads)
    assert [json.loads(p)["type"] for _, p in uploading.frames_out()] == ["stored"]
    assert (root / "t" / "a" / "b" / "up.bin").read_bytes() == content


def test_rename_of_a_file_being_uploaded_by_the_same_user_is_busy(fresh_world, threads):
    root = fresh_world[0]
    uploading = connected(fresh_world)
    uploading.feed(uploading.message_frame({"type": "put", "path": "hello.txt", "size": 10, "force": True}))
    other = Conversation(fresh_world, factory=uploading.factory, host="127.0.0.2")
    other.reach("ready")
    other.frames_out()
    [answer] = ask(other, threads, {"type": "rename", "path": "hello.txt", "to": "bye.txt"})
    assert (answer["type"], answer["code"]) == ("error", "busy")
    assert (root / "hello.txt").exists()


# -- the serving machine alone


@pytest.mark.parametrize("message, request_, state", [
    ({"type": "remove", "path": "a"}, serving.Remove("a", False), serving.Ready()),
    ({"type": "remove", "path": "a", "recursive": False}, serving.Remove("a", False), serving.Ready()),
    ({"type": "remove", "path": "a", "recursive": True}, serving.Remove("a", True), serving.Working("remove")),
    ({"type": "rmdir", "path": "d"}, serving.RemoveDirectory("d"), serving.Ready()),
    ({"type": "rename", "path": "a", "to": "b"}, serving.Rename("a", "b", False), serving.Ready()),
    ({"type": "rename", "path": "a", "to": "", "force": True}, serving.Rename("a", "", True), serving.Ready()),
    ({"type": "chmod", "path": "a", "mode": 0o7777}, serving.ChangeMode("a", 0o7777), serving.Ready()),
    ({"type": "chmod", "path": "a", "mode": 0}, serving.ChangeMode("a", 0), serving.Ready()),
    ({"type": "hash", "path": "a"}, serving.Hash("a"), serving.Working("hash")),
    ({"type": "space"}, serving.Space(), serving.Ready()),
    ({"type": "space", "path": 5, "later": True}, serving.Space(), serving.Ready()),
])
def test_each_request_is_parsed_into_its_object(message, request_, state):
    machine = serving.Serving()
    assert machine.receive(message) == request_
    assert machine.state == state


@pytest.mark.parametrize("message", [
    {"type": "remove", "path": "a", "recursive": True}, {"type": "hash", "path": "a"},
])
def test_working_waits_in_version_2_and_refuses_in_version_1(message):
    for version in (1, 2):
        machine = serving.Serving(version)
        machine.receive(message)
        if version == 2:
            assert machine.receive({"type": "stat", "path": "a"}) == serving.Wait()
        else:
            with pytest.raises(ProtocolError):
                machine.receive({"type": "stat", "path": "a"})
        machine.done()
        assert machine.state == serving.Ready()


# -- rights (section 7.7): each request refused without its right, naming it, served with it

RIGHTFUL = [
    ("list", {"type": "stat", "path": "hello.txt"}, "entry"),
    ("list", {"type": "list", "path": "sub"}, "entries"),
    ("list", {"type": "space"}, "space"),
    ("read", {"type": "get", "path": "hello.txt"}, "file"),
    ("read", {"type": "hash", "path": "hello.txt"}, "digest"),
    ("write", {"type": "put", "path": "new.txt", "size": 3}, "ready"),
    ("write", {"type": "put", "path": "new.txt", "size": 3, "force": True}, "ready"),
    ("overwrite", {"type": "put", "path": "hello.txt", "size": 3, "force": True}, "ready"),
    ("delete", {"type": "remove", "path": "hello.txt"}, "done"),
    ("delete", {"type": "remove", "path": "sub", "recursive": True}, "done"),
    ("delete", {"type": "rmdir", "path": "sub"}, "done"),
    ("rename", {"type": "rename", "path": "hello.txt", "to": "bye.txt"}, "done"),
    ("overwrite", {"type": "rename", "path": "hello.txt", "to": "other.txt", "force": True}, "done"),
    ("mkdir", {"type": "mkdir", "path": "made"}, "done"),
    ("chmod", {"type": "chmod", "path": "hello.txt", "mode": 0o600}, "done"),
]


@pytest.mark.parametrize("right, request_, answer", RIGHTFUL)
def test_each_right_is_enforced_on_its_requests(tmp_path, threads, right, request_, answer):
    allowed = world_with_rights(tmp_path / "allowed", "read-write")
    refused = world_with_rights(tmp_path / "refused", [name for name in wire.RIGHTS if name != right])
    for world in (allowed, refused):
        (world[0] / "other.txt").write_text("other")
    [served] = ask(connected(allowed), threads, request_)[:1]
    assert served["type"] == answer, served
    [refusal] = ask(connected(refused), threads, request_)
    assert (refusal["type"], refusal["code"]) == ("error", "permission-denied")
    assert refusal["message"].endswith(f"permission denied: your account lacks the {right} right")
    root = refused[0]
    assert (root / "hello.txt").read_bytes() == b"hello\n" and (root / "sub").is_dir()
    assert (root / "other.txt").read_text() == "other" and not (root / "made").exists()


def test_a_read_account_may_list_and_read_only(tmp_path, threads):
    world = world_with_rights(tmp_path, "read")
    conversation = connected(world)
    for request_ in ({"type": "stat", "path": "hello.txt"}, {"type": "hash", "path": "hello.txt"}, {"type": "space"}):
        [answer] = ask(conversation, threads, request_)
        assert answer["type"] != "error"
    [answer] = ask(conversation, threads, {"type": "remove", "path": "hello.txt"})
    assert answer["message"] == (
        "hello.txt: permission denied on the server (read-only account): your account lacks the delete right"
    )


# -- the log: every change, with the user, the address and the paths (escaped)


@pytest.fixture
def log_lines():
    from twisted.logger import formatEvent, globalLogPublisher

    lines = []

    def observe(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def test_every_change_is_logged_with_user_address_and_paths(fresh_world, threads, log_lines):
    root = fresh_world[0]
    make_tree(root)
    conversation = connected(fresh_world, version=2)
    answers = ask(
        conversation, threads,
        {"type": "mkdir", "path": "new\ndir"}, {"type": "mkdir", "path": "new\ndir", "mode": 0o750},
        {"type": "chmod", "path": "hello.txt", "mode": 0o4640}, {"type": "rename", "path": "hello.txt", "to": "t/h.txt"},
        {"type": "rename", "path": "t/h.txt", "to": "t/x.txt", "force": True}, {"type": "remove", "path": "t/x.txt"},
        {"type": "rmdir", "path": "new\ndir"}, {"type": "remove", "path": "t", "recursive": True},
        {"type": "hash", "path": "nothing"},
    )
    assert [answer["type"] for answer in answers] == ["done"] * 8 + ["error"]
    who = "fuzzer from 127.0.0.1:40000: "
    changes = [line[len(who):] for line in log_lines if line.startswith(who)]
    assert changes[:7] == [
        "made the directory new\\ndir",  # once: the second MKDIR only gave it its mode
        "changed the mode of hello.txt to 0640",
        "renamed hello.txt to t/h.txt",
        "renamed t/h.txt to t/x.txt (force)",
        "removed t/x.txt (1 name)",
        "removed the directory new\\ndir",
        changes[6],
    ]
    assert changes[6].startswith("removed t (5 names, ") and changes[6].endswith(" s)")
    assert changes[7] == "hash nothing refused: nothing: no such file on the server"


def test_a_remove_refused_part_way_logs_what_went(fresh_world, threads, log_lines):
    root = fresh_world[0]
    make_tree(root)
    uploading = connected(fresh_world)
    uploading.feed(uploading.message_frame({"type": "put", "path": "t/a/up.bin", "size": 10}))
    remover = Conversation(fresh_world, factory=uploading.factory, host="127.0.0.2")
    remover.reach("ready")
    remover.frames_out()
    [answer] = ask(remover, threads, {"type": "remove", "path": "t", "recursive": True})
    assert answer["code"] == "busy"
    who = "fuzzer from 127.0.0.2:40000: "
    lines = [line[len(who):] for line in log_lines if line.startswith(who)]
    assert lines == [
        "removed 4 names under t before the refusal",  # x.txt, y.txt, b/z.txt and b
        "remove t refused: t/a: an upload into it is in progress; the rest was removed",
    ]


def test_a_put_with_force_never_replaces_without_overwrite_a_name_that_appears_meanwhile(tmp_path, threads):
    """PUT with force of a name that is not there needs no overwrite right; if the name
    appears before the upload is committed (someone else's file, in a drop box), it is not
    replaced: exists."""
    world = world_with_rights(tmp_path, userdb.Rights({"list", "read", "write"}))
    root = world[0]
    conversation = connected(world)
    content = b"evil"
    [ready] = ask(conversation, threads, {"type": "put", "path": "report.pdf", "size": len(content), "force": True})
    assert ready["type"] == "ready"
    (root / "report.pdf").write_bytes(b"the victim's")  # appears before the END
    conversation.feed(
        conversation.message_frame({"type": "upload", "offset": 0}) + conversation.record(wire.DATA, content)
        + conversation.message_frame({"type": "end", "size": len(content), "sha1": hashlib.sha1(content).hexdigest()})
    )
    settle(conversation, threads)
    [answer] = [json.loads(p) for kind, p in conversation.frames_out() if kind == wire.CONTROL]
    assert answer["type"] == "error" and answer["code"] == "exists", answer
    assert (root / "report.pdf").read_bytes() == b"the victim's"


def test_hashes_take_turns_per_user_and_server_wide_and_one_whose_client_left_stops(fresh_world, threads):
    """HASH reads a whole file in a thread of the pool commits need too: one at a time per
    user, HASHING_LIMIT at once in all; one whose connection has gone stops before it reads
    (a read-only user's ten HASHes of a huge file held every thread)."""
    from eketwist import spake2plus

    root, users_path, _, _ = fresh_world
    (root / "big.bin").write_bytes(os.urandom(300_000))
    users = userdb.load(users_path)
    keys = {}
    for name in ("ann", "ben"):
        users.by_name[name] = userdb.make_user(name, "pw", FAST_SCRYPT, rights=userdb.READ)
        keys[name] = spake2plus.register(b"pw", users.by_name[name].salt, name.encode(), **FAST_SCRYPT)
    userdb.save(users_path, users)
    first = connected(fresh_world)
    factory = first.factory

    def another(user, host):
        world = (root, users_path, *keys[user]) if user != "fuzzer" else fresh_world
        conversation = Conversation(world, factory=factory, host=host, user=user)
        conversation.reach("ready")
        conversation.frames_out()
        return conversation

    again = another("fuzzer", "127.0.0.2")  # the same user: waits for its own first
    ann = another("ann", "127.0.0.3")
    ben = another("ben", "127.0.0.4")  # a third user: waits for a server-wide turn
    everyone = [first, again, ann, ben]
    for conversation in everyone:
        conversation.feed(conversation.message_frame({"type": "hash", "path": "big.bin"}))
    factory.clock.advance(0)
    running = [args[2].username for _, _, args, _ in threads.pending]
    assert sorted(running) == ["ann", "fuzzer"] and factory.HASHING_LIMIT == 2
    ben.proto.connectionLost(Failure(ConnectionLost()))  # gone while waiting: never reads
    settle(first, threads)
    digest = hashlib.sha1((root / "big.bin").read_bytes()).hexdigest()
    for conversation in (first, again, ann):
        [answer] = [json.loads(p) for kind, p in conversation.frames_out() if kind == wire.CONTROL]
        assert answer["type"] == "digest" and answer["sha1"] == digest
    assert factory.hashing.tokens == factory.HASHING_LIMIT  # every turn given back
    assert factory._hashing_by_user == {}  # and no user's turn kept
