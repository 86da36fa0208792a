"""The log: text fields escaped, the log file and its rotations private."""

import os
import stat

from twisted.logger import formatEvent
from twisted.python.logfile import LogFile

from eketwist import logs


def test_safe_logger_escapes_text_fields_only():
    events = []
    log = logs.SafeLogger(observer=events.append)
    log.info("{code} after {seconds:.0f} s", code="\x1b]0;owned\x07\nfake line", seconds=2.4)
    assert formatEvent(events[0]) == "\\x1b]0;owned\\x07\\nfake line after 2 s"


def test_log_file_and_its_rotations_are_private(tmp_path):
    path = tmp_path / "twistd.log"
    old = os.umask(0o022)
    try:
        logs.restrict_log_file(str(path))
        log_file = LogFile.fromFullPath(str(path), rotateLength=10)
        log_file.write("x" * 20)
        log_file.write("y")  # rotates first
        log_file.close()
    finally:
        os.umask(old)
    assert (tmp_path / "twistd.log.1").exists()
    for name in ("twistd.log", "twistd.log.1"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
