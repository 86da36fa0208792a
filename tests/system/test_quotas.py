"""Quotas with a real daemon: the usage after a kill -9 mid-upload and a restart is what the
disk holds, files and partial uploads (docs/protocol.md section 7.7: counted from the disk at
each start, so nothing can drift)."""

import dataclasses
import json
import os
import time

from eketwist import userdb

from tests.support.fixtures import make_root, make_users_file
from tests.support.processes import WRITER_PASSWORD, Daemon, run_client, start_client, write_random


def on_disk(root):
    sizes = []
    for top, _, names in os.walk(root):
        for name in names:
            path = os.path.join(top, name)
            if os.path.isfile(path) and not os.path.islink(path):
                sizes.append(os.lstat(path).st_size)
    return sum(sizes), len(sizes)


def df(port):
    result = run_client(port, "--json", "df", user="writer", password=WRITER_PASSWORD)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["space"]


def test_after_a_kill_mid_upload_and_a_restart_the_usage_is_what_the_disk_holds(tmp_path):
    root = make_root(tmp_path)
    users_path = make_users_file(tmp_path)
    users = userdb.load(users_path)
    users.by_name["writer"] = dataclasses.replace(users.by_name["writer"], quota_bytes=1 << 30, quota_files=100)
    userdb.save(users_path, users)
    big = write_random(tmp_path / "big.bin", 200 * 1024 * 1024)
    small = write_random(tmp_path / "small.bin", 12345)
    daemon = Daemon(tmp_path, root, users_path).start()
    try:
        assert run_client(daemon.port, "put", str(small), user="writer", password=WRITER_PASSWORD).returncode == 0
        space = df(daemon.port)
        assert (space["used_bytes"], space["used_files"]) == on_disk(root)
        uploading = start_client(daemon.port, "put", str(big), user="writer", password=WRITER_PASSWORD)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            parts = [name for name in os.listdir(root) if name.startswith(".eke-part.")]
            if parts and os.lstat(root / parts[0]).st_size > 0:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the upload never started")
        daemon.kill()  # SIGKILL: no shutdown, no accounting saved anywhere
        uploading.wait(60)
        daemon.start()
        space = df(daemon.port)
        assert (space["quota_bytes"], space["quota_files"]) == (1 << 30, 100)
        assert (space["used_bytes"], space["used_files"]) == on_disk(root)
        assert any(name.startswith(".eke-part.") for name in os.listdir(root))  # the partial counts
        assert space["used_files"] == 5  # hello.txt, empty, sub/data.bin, small.bin, the partial
    finally:
        daemon.stop()
