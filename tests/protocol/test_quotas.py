"""Quotas (docs/protocol.md sections 7.7 and 7.10) through the real ServerProtocol, in memory
(tests/support/conversation.py): refusals before READY and of inline PUTs, what resume and
replace count, what REMOVE frees, SPACE, and uploads running at once on several connections."""

import dataclasses
import hashlib
import json
import os
import time

import pytest

from eketwist import quotas, userdb, wire

from ..support.conversation import Conversation, make_world, threads_by_hand
from ..support.processes import FAST_SCRYPT
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from .test_manage import ask, log_lines, settle  # noqa: F401 - log_lines is a fixture


@pytest.fixture
def threads():
    with threads_by_hand() as pool:
        yield pool


def world_with_quota(tmp_path, quota_bytes=None, quota_files=None):
    """make_world's root (hello.txt: 6 bytes, 1 file), its user "fuzzer" with these quotas."""
    root, users_path, _, _ = world = make_world(tmp_path, FAST_SCRYPT)
    users = userdb.load(users_path)
    users.by_name["fuzzer"] = dataclasses.replace(
        users.by_name["fuzzer"], quota_bytes=quota_bytes, quota_files=quota_files,
    )
    userdb.save(users_path, users)
    return world


def connected(world, threads, factory=None, host="127.0.0.1", version=1):
    conversation = Conversation(world, factory=factory, host=host, version=version)
    conversation.reach("ready")
    conversation.frames_out()
    return conversation


def answers(conversation):
    return [json.loads(p) for kind, p in conversation.frames_out() if kind == wire.CONTROL]


def usage(conversation, root):
    return conversation.factory.accounts.usage_of(str(root))


def on_disk(root):
    """(bytes, files) of the regular files under root, partial uploads included, by os.walk."""
    sizes = [os.lstat(os.path.join(top, name)).st_size for top, _, names in os.walk(root) for name in names
             if os.path.isfile(os.path.join(top, name)) and not os.path.islink(os.path.join(top, name))]
    return sum(sizes), len(sizes)


def wait_for_disk(root, nbytes):
    """Until the files under root hold `nbytes`: a kept partial's bytes reach the disk from a
    write-behind thread (a real one), after the connection's end is handled."""
    deadline = time.monotonic() + 10
    while on_disk(root)[0] != nbytes:
        assert time.monotonic() < deadline, on_disk(root)
        time.sleep(0.01)


def upload(conversation, threads, path, content, force=False, offset=0):
    """PUT, UPLOAD from `offset`, DATA, END: the answers after UPLOAD (STORED or an ERROR)."""
    [ready] = ask(conversation, threads, {"type": "put", "path": path, "size": len(content), "force": force})
    assert ready["type"] == "ready", ready
    conversation.feed(
        conversation.message_frame({"type": "upload", "offset": offset})
        + (conversation.record(wire.DATA, content[offset:]) if content[offset:] else b"")
        + conversation.message_frame({"type": "end", "size": len(content), "sha1": hashlib.sha1(content).hexdigest()})
    )
    settle(conversation, threads)
    return answers(conversation)


def test_the_count_scans_files_and_partials_and_never_follows_a_symlink(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "one").write_bytes(b"x" * 10)
    (root / "a" / "b" / ".eke-part.0123").write_bytes(b"y" * 5)  # a partial upload counts
    (root / "empty").write_bytes(b"")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "big").write_bytes(b"z" * 1000)
    os.symlink(tmp_path / "outside", root / "a" / "link-to-dir")
    os.symlink(tmp_path / "outside" / "big", root / "link-to-file")
    os.mkfifo(root / "fifo")
    assert quotas.scan(str(root)) == (15, 3)


def test_the_count_walks_a_deep_tree(tmp_path):
    root = tmp_path / "root"
    deep = root
    for level in range(12):
        deep = deep / f"d{level}"
        (deep).mkdir(parents=True)
        (deep / "f").write_bytes(b"x" * level)
    assert quotas.scan(str(root)) == (sum(range(12)), 12)


def test_a_put_over_the_byte_quota_is_refused_before_ready_and_logged(tmp_path, threads, log_lines):
    world = world_with_quota(tmp_path, quota_bytes=100)
    root = world[0]
    conversation = connected(world, threads)
    [refusal] = ask(conversation, threads, {"type": "put", "path": "big.iso", "size": 95})
    assert refusal == {"type": "error", "code": "no-space", "message": "big.iso: over your quota of 100 B (6 B used)"}
    assert conversation.proto.state == "ready"
    assert [name for name in os.listdir(root) if name.startswith(".eke-part.")] == []
    assert any("put big.iso refused: big.iso: over your quota of 100 B" in line for line in log_lines)
    assert upload(conversation, threads, "fits.bin", b"x" * 94)[0]["type"] == "stored"  # 6 + 94 = 100
    assert (usage(conversation, root).bytes, usage(conversation, root).files) == (100, 2) == on_disk(root)
    [space] = ask(conversation, threads, {"type": "space"})
    assert (space["quota_bytes"], space["used_bytes"]) == (100, 100) and "quota_files" not in space


def test_the_file_quota_counts_names_and_a_replace_holds_one_while_it_runs(tmp_path, threads):
    world = world_with_quota(tmp_path, quota_files=3)
    root = world[0]
    conversation = connected(world, threads)
    assert upload(conversation, threads, "two.txt", b"2")[0]["type"] == "stored"
    assert upload(conversation, threads, "three.txt", b"3")[0]["type"] == "stored"
    [refusal] = ask(conversation, threads, {"type": "put", "path": "four.txt", "size": 1})
    assert (refusal["code"], refusal["message"]) == ("no-space", "four.txt: over your quota of 3 files (3 used)")
    [refusal] = ask(conversation, threads, {"type": "put", "path": "two.txt", "size": 2, "force": True})
    assert refusal["code"] == "no-space"  # its partial file is a fourth while it runs
    [done] = ask(conversation, threads, {"type": "remove", "path": "three.txt"})
    assert done["type"] == "done"
    assert upload(conversation, threads, "two.txt", b"22", force=True)[0]["type"] == "stored"
    [space] = ask(conversation, threads, {"type": "space"})
    assert (space["quota_files"], space["used_files"]) == (3, 2) and "quota_bytes" not in space


def test_an_inline_put_over_the_quota_is_refused_and_its_data_dropped(tmp_path, threads):
    world = world_with_quota(tmp_path, quota_bytes=50)
    root = world[0]
    conversation = connected(world, threads, version=2)
    content = os.urandom(60)
    got = ask(
        conversation, threads,
        {"type": "put", "path": "inline.bin", "size": len(content), "inline": True},
    )
    conversation.feed(
        conversation.record(wire.DATA, content)
        + conversation.message_frame({"type": "end", "size": len(content), "sha1": hashlib.sha1(content).hexdigest()})
        + conversation.message_frame({"type": "stat", "path": "inline.bin"})
    )
    settle(conversation, threads)
    got += answers(conversation)
    assert got[0]["code"] == "no-space" and "over your quota of 50 B" in got[0]["message"]
    assert got[1]["code"] == "not-found"
    assert not conversation.transport.disconnecting and on_disk(root) == (6, 1)


def test_a_replace_needs_room_for_both_while_it_runs_and_then_gives_the_old_back(tmp_path, threads):
    world = world_with_quota(tmp_path, quota_bytes=1000)
    root = world[0]
    (root / "sub" / "big").write_bytes(b"b" * 900)  # before the count: 906 used
    conversation = connected(world, threads)
    # The old file stays until the new one takes its place (and could be removed meanwhile
    # to make room for a third): its room is not lent to the upload.
    [refusal] = ask(conversation, threads, {"type": "put", "path": "sub/big", "size": 990, "force": True})
    assert refusal["code"] == "no-space"
    assert upload(conversation, threads, "sub/big", b"c" * 90, force=True)[0]["type"] == "stored"  # 906 + 90
    assert usage(conversation, root).bytes == 96 == on_disk(root)[0]  # the old 900 given back


def test_a_kept_partial_counts_and_its_resume_counts_only_the_missing_bytes(tmp_path, threads):
    world = world_with_quota(tmp_path, quota_bytes=1306)
    root = world[0]
    content = os.urandom(1000)
    first = connected(world, threads)
    [ready] = ask(first, threads, {"type": "put", "path": "file.bin", "size": 1000})
    first.feed(first.message_frame({"type": "upload", "offset": 0}) + first.record(wire.DATA, content[:600]))
    first.proto.connectionLost(Failure(ConnectionLost()))  # the partial file is kept
    settle(first, threads)
    factory = first.factory
    wait_for_disk(root, 606)
    assert (usage(first, root).bytes, usage(first, root).used_bytes) == (606, 606)
    # Another user of the root takes 300 bytes: 906 used. The resume needs 400 more: it fits
    # only because the partial file's 600 bytes are counted already.
    other = connected(world, threads, factory=factory, host="127.0.0.2")
    assert upload(other, threads, "other.bin", b"o" * 300)[0]["type"] == "stored"
    assert usage(other, root).bytes == 906
    resumed = connected(world, threads, factory=factory, host="127.0.0.3")
    [ready] = ask(resumed, threads, {"type": "put", "path": "file.bin", "size": 1000})
    assert ready.get("offset") == 600, ready
    [space] = ask(other, threads, {"type": "space"})  # (the uploader may not ask now)
    assert space["used_bytes"] == 1306  # the missing 400 reserved
    resumed.feed(
        resumed.message_frame({"type": "upload", "offset": 600}) + resumed.record(wire.DATA, content[600:])
        + resumed.message_frame({"type": "end", "size": 1000, "sha1": hashlib.sha1(content).hexdigest()})
    )
    settle(resumed, threads)
    assert answers(resumed)[0]["type"] == "stored"
    assert (usage(resumed, root).bytes, usage(resumed, root).files) == on_disk(root) == (1306, 3)


def test_remove_and_rename_free_what_they_removed(tmp_path, threads):
    world = world_with_quota(tmp_path, quota_bytes=10_000, quota_files=10)
    root = world[0]
    (root / "sub" / "d").mkdir()
    (root / "sub" / "d" / "a").write_bytes(b"a" * 100)
    (root / "sub" / "d" / ".eke-part.00112233445566778899aabbccddeeff").write_bytes(b"p" * 50)
    (root / "sub" / "b").write_bytes(b"b" * 200)
    (root / "sub" / "c").write_bytes(b"c" * 300)
    conversation = connected(world, threads)
    settle(conversation, threads)
    assert usage(conversation, root).bytes == 656
    done = ask(conversation, threads, {"type": "rename", "path": "sub/c", "to": "sub/b", "force": True})
    assert done[0]["type"] == "done" and usage(conversation, root).bytes == 456 == on_disk(root)[0]
    done = ask(conversation, threads, {"type": "remove", "path": "sub/d", "recursive": True})
    assert done[0] == {"type": "done", "removed": 3}
    assert (usage(conversation, root).bytes, usage(conversation, root).files) == on_disk(root) == (306, 2)
    ask(conversation, threads, {"type": "remove", "path": "sub/b"})
    assert (usage(conversation, root).bytes, usage(conversation, root).files) == on_disk(root) == (6, 1)


@pytest.mark.parametrize("version", [1, 2])
def test_uploads_running_at_once_never_pass_the_quota_together(tmp_path, threads, version):
    world = world_with_quota(tmp_path, quota_bytes=6 + 4 * 1000)  # room for four of the six
    root = world[0]
    first = connected(world, threads, version=version)
    settle(first, threads)
    connections = [first] + [
        connected(world, threads, factory=first.factory, host=f"127.0.0.{index}", version=version) for index in range(2, 7)
    ]
    contents = [os.urandom(1000) for _ in connections]
    # Every PUT first, then every upload's data: all six are in flight together.
    offers = [ask(each, threads, {"type": "put", "path": f"f{index}", "size": 1000})[0]
              for index, each in enumerate(connections)]
    assert [offer["type"] for offer in offers] == ["ready"] * 4 + ["error"] * 2
    assert {offer.get("code") for offer in offers[4:]} == {"no-space"}
    for each, content in zip(connections[:4], contents):
        each.feed(
            each.message_frame({"type": "upload", "offset": 0}) + each.record(wire.DATA, content)
            + each.message_frame({"type": "end", "size": 1000, "sha1": hashlib.sha1(content).hexdigest()})
        )
    for each in connections[:4]:
        settle(each, threads)
        assert answers(each)[0]["type"] == "stored"
    counted = usage(first, root)
    assert (counted.bytes, counted.files, counted.reserved_bytes, counted.reserved_files) == (4006, 5, 0, 0)
    assert on_disk(root) == (4006, 5)


def test_a_put_waits_for_the_count_and_other_users_do_not(tmp_path, threads):
    world = world_with_quota(tmp_path, quota_bytes=100)
    root = world[0]
    conversation = connected(world, threads)
    assert not usage(conversation, root).counted  # the count waits in its thread
    conversation.feed(conversation.message_frame({"type": "put", "path": "x", "size": 10}))
    assert answers(conversation) == [] and conversation.proto.state == "working"
    conversation.feed(conversation.message_frame({"type": "stat", "path": "x"}))  # held meanwhile
    settle(conversation, threads)
    got = answers(conversation)
    assert got[0]["type"] == "ready"
    assert usage(conversation, root).counted


def test_the_sweep_of_stale_partial_uploads_gives_their_room_back(tmp_path, threads):
    world = world_with_quota(tmp_path, quota_bytes=2000)
    root = world[0]
    first = connected(world, threads)
    [ready] = ask(first, threads, {"type": "put", "path": "file.bin", "size": 1000})
    first.feed(first.message_frame({"type": "upload", "offset": 0}) + first.record(wire.DATA, b"p" * 700))
    first.proto.connectionLost(Failure(ConnectionLost()))  # the partial file is kept, and counted
    settle(first, threads)
    factory = first.factory
    # The sweep frees what the file holds when it is removed (a stale partial, hours old, was
    # written long ago).
    wait_for_disk(root, 706)
    assert usage(first, root).bytes == 706
    [part] = [name for name in os.listdir(root) if name.startswith(".eke-part.")]
    old = os.stat(root / part).st_mtime - 2 * factory.partial_max_age
    os.utime(root / part, (old, old))
    swept = factory.sweep_partial_uploads()
    settle(first, threads)
    assert swept.result == 1 and not (root / part).exists()
    assert (usage(first, root).bytes, usage(first, root).files) == (6, 1) == on_disk(root)


def test_a_quota_given_by_a_reload_counts_the_root_then(tmp_path, threads):
    world = world_with_quota(tmp_path)  # no quota yet: nothing is counted
    root, users_path = world[0], world[1]
    first = connected(world, threads)
    assert upload(first, threads, "before.bin", b"b" * 50)[0]["type"] == "stored"
    factory = first.factory
    assert usage(first, root) is None
    users = userdb.load(users_path)
    users.by_name["fuzzer"] = dataclasses.replace(users.by_name["fuzzer"], quota_bytes=100)
    userdb.save(users_path, users)
    later = connected(world, threads, factory=factory, host="127.0.0.2")
    settle(later, threads)
    # Counted from the disk when the reload gave the quota: what was uploaded before counts.
    assert (usage(later, root).bytes, usage(later, root).files) == (56, 2) == on_disk(root)
    [refusal] = ask(later, threads, {"type": "put", "path": "big.bin", "size": 45})
    assert refusal["code"] == "no-space" and "over your quota of 100 B (56 B used)" in refusal["message"]


def test_a_root_inside_a_counted_root_counts_in_it_too(tmp_path, threads):
    """bob has a quota on the server's root; fuzzer's own root lies inside it, without a
    quota: what fuzzer uploads, keeps and removes counts in bob's root as well (it was left
    out, and bob's REMOVE of it then took his usage below the disk's)."""
    root, users_path, _, _ = world = world_with_quota(tmp_path)
    (root / "inner").mkdir()
    users = userdb.load(users_path)
    users.by_name["fuzzer"] = dataclasses.replace(users.by_name["fuzzer"], root=str(root / "inner"))
    users.by_name["bob"] = dataclasses.replace(
        userdb.make_user("bob", "bob's pw", FAST_SCRYPT, rights=userdb.READ_WRITE), quota_bytes=1000,
    )
    userdb.save(users_path, users)
    conversation = connected(world, threads)
    settle(conversation, threads)  # bob's root counted at the start
    outer = usage(conversation, root)
    assert (outer.bytes, outer.files) == (6, 1)
    [ready] = ask(conversation, threads, {"type": "put", "path": "big.bin", "size": 500})
    assert ready["type"] == "ready" and outer.used_bytes == 506  # reserved in bob's root too
    conversation.feed(
        conversation.message_frame({"type": "upload", "offset": 0}) + conversation.record(wire.DATA, b"x" * 500)
        + conversation.message_frame({"type": "end", "size": 500, "sha1": hashlib.sha1(b"x" * 500).hexdigest()})
    )
    settle(conversation, threads)
    assert answers(conversation)[0]["type"] == "stored"
    assert (outer.bytes, outer.files, outer.used_bytes) == (506, 2, 506) == (*on_disk(root), 506)
    [done] = ask(conversation, threads, {"type": "remove", "path": "big.bin"})
    assert done["type"] == "done" and (outer.bytes, outer.files) == (6, 1) == on_disk(root)


def test_a_partial_removed_just_before_its_resume_is_not_counted_out_twice(tmp_path, threads, monkeypatch):
    """The sweep (or a REMOVE) may take a kept partial file between the PUT's look at it and
    the lock on it: its bytes are freed by the sweep, and the new upload must not subtract
    them again when it ends."""
    from eketwist import storage

    world = world_with_quota(tmp_path, quota_bytes=2000)
    root = world[0]
    content = os.urandom(1000)
    first = connected(world, threads)
    ask(first, threads, {"type": "put", "path": "file.bin", "size": 1000})
    first.feed(first.message_frame({"type": "upload", "offset": 0}) + first.record(wire.DATA, content[:600]))
    first.proto.connectionLost(Failure(ConnectionLost()))
    settle(first, threads)
    wait_for_disk(root, 606)
    factory = first.factory
    real_part_file = storage.PartFile

    def swept_first(name, part_name, *args, dir_fd=None, **kwargs):
        st = os.stat(part_name, dir_fd=dir_fd)
        os.unlink(part_name, dir_fd=dir_fd)  # the sweep, at the worst moment
        factory.accounts.freed(str(root), storage.Removed(1, st.st_size, 1))
        monkeypatch.setattr(storage, "PartFile", real_part_file)
        return real_part_file(name, part_name, *args, dir_fd=dir_fd, **kwargs)

    monkeypatch.setattr(storage, "PartFile", swept_first)
    again = connected(world, threads, factory=factory, host="127.0.0.2")
    assert upload(again, threads, "file.bin", content)[0]["type"] == "stored"
    assert (usage(again, root).bytes, usage(again, root).files) == on_disk(root) == (1006, 2)
