"""The daemon's log: text from peers escaped, and a log file only its owner can read.

`SafeLogger` is `twisted.logger.Logger` whose events carry every text field escaped
(`textsafe.escape`): a username, an error code or a path sent by a peer cannot put escape
sequences on the terminal of whoever reads the log, nor forge a line. It is the one place this
happens; every module of the daemon logs through it (`log = SafeLogger()`).

`restrict_log_file` runs before twistd opens its log: it creates the file 0600 (or takes the
"others" bits off an existing one). twistd's LogFile then keeps that mode for the files it
creates when it rotates (it reads the mode of the existing file).
"""

import os
import stat

from twisted.logger import Logger

from .textsafe import escape


class SafeLogger(Logger):
    def emit(self, level, format=None, **kwargs):
        for key, value in kwargs.items():
            if isinstance(value, str) and not key.startswith("log_"):
                kwargs[key] = escape(value)
        super().emit(level, format, **kwargs)


def restrict_log_file(path):
    """Make sure the log file at `path` exists and is not readable by others."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:
        return  # twistd reports why it cannot open it
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o007:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o007)
    except OSError:
        pass
    finally:
        os.close(fd)
