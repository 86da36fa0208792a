"""The client command's output: status lines, progress bars, results, listings (see Reporter)."""

import stat
import sys
import time
from collections import deque

from .textsafe import escape, json_text


class Reporter:
    """Everything the user sees: progress bars (stderr, terminals only), status lines, and the
    results (stdout: `SHA1  PATH` lines, listings, or one JSON document).

    The one place that shows text from the server (names, error messages, the paths made of
    them): every text line goes through textsafe.escape, every JSON document through
    json_text, so that no control character reaches a terminal raw."""

    def __init__(self, args, out=sys.stdout, err=sys.stderr):
        self.quiet = args.quiet
        self.json = args.json
        self.out = out
        self.err = err
        self.bars = not (args.quiet or args.no_progress) and err.isatty()
        self.files = []
        self.started = time.monotonic()
        self._overall = None

    def say(self, text):
        if not self.quiet:
            self._write(text)

    def warn(self, text):
        self._write(f"eke-client: warning: {text}")

    def error(self, text):
        self._write(f"eke-client: {text}")

    def _write(self, text):
        text = escape(text)
        if self.bars:
            from tqdm import tqdm

            tqdm.write(text, file=self.err)
        else:
            self.err.write(text + "\n")
            self.err.flush()

    def overall(self, total_bytes, count):
        if self.bars and count > 1:
            from tqdm import tqdm

            self._overall = tqdm(
                total=total_bytes, desc=f"{count} files", unit="B", unit_scale=True,
                unit_divisor=1024, file=self.err, position=0, leave=True,
            )

    def progress(self):
        if not self.bars:
            return None
        return _FileBar(self.err, self._overall)

    def done(self, record):
        self.files.append(record)
        if record["status"] == "ok" and not self.json:
            self.out.write(f"{record['sha1']}  {escape(record['local'])}\n")
            self.out.flush()

    def finish(self, command, error=None):
        if self._overall is not None:
            self._overall.close()
        if self.json:
            summary = {
                "command": command,
                "status": "error" if error or any(f["status"] == "error" for f in self.files) else "ok",
                "files": self.files,
                "bytes": sum(f.get("bytes", 0) for f in self.files),
                "seconds": round(time.monotonic() - self.started, 6),
            }
            if error is not None:
                summary["error"] = {"code": error.code, "message": error.message, "exit": error.exit_code}
            self.out.write(json_text(summary) + "\n")
            self.out.flush()

    def listing(self, path, entries, long=False):
        """The result of `ls`: one line per entry, or one JSON document."""
        if self.json:
            # Entry by entry: the whole listing as dicts at once would cost more than the listing.
            self.out.write(f'{{"command": "ls", "status": "ok", "path": {json_text(path)}, "entries": [')
            for index, entry in enumerate(entries):
                self.out.write((", " if index else "") + json_text(entry.to_json()))
            self.out.write("]}\n")
            return
        for entry in entries:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["mtime"]))
            name = escape(entry["name"])
            if long:
                self.out.write(f"{_mode_string(entry)} {entry['size']:>12} {when} {name}\n")
            else:
                self.out.write(f"{name}\t{entry['kind']}\t{entry['size']}\t{when}\n")


class InOrder:
    """The reports of transfers that run side by side (pipelined), given in the order the
    transfers started, whatever finishes first: the output and --json read as the plan does."""

    def __init__(self, reporter):
        self.reporter = reporter
        self._turns: deque = deque()

    def turn(self):
        """A stand-in for the Reporter for the next transfer (take turns in starting order)."""
        turn = _Turn(self.reporter)
        self._turns.append(turn)
        return turn

    def settle(self, turn):
        """`turn`'s transfer is over: its reports go out once every earlier one's have."""
        turn.settled = True
        while self._turns and self._turns[0].settled:
            self._turns.popleft().replay()


class _Turn:
    """A Reporter's lines and results held until their turn; progress bars stay live."""

    def __init__(self, reporter):
        self._reporter = reporter
        self._held = []
        self.settled = False

    def progress(self):
        return self._reporter.progress()

    def __getattr__(self, name):
        if name not in ("say", "warn", "error", "done"):
            raise AttributeError(name)
        return lambda *args: self._held.append((name, args))

    def replay(self):
        for name, args in self._held:
            getattr(self._reporter, name)(*args)
        self._held.clear()


class _FileBar:
    """One tqdm bar per file, feeding the overall bar if there is one."""

    def __init__(self, err, overall):
        self._err = err
        self._overall = overall
        self._bar = None

    def start(self, name, size, initial=0):
        from tqdm import tqdm

        self._bar = tqdm(
            total=size, initial=initial, desc=escape(name), unit="B", unit_scale=True, unit_divisor=1024,
            file=self._err, position=1 if self._overall is not None else 0,
            leave=self._overall is None,
        )
        if self._overall is not None:
            self._overall.update(initial)

    def update(self, nbytes):
        self._bar.update(nbytes)
        if self._overall is not None:
            self._overall.update(nbytes)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _mode_string(entry):
    kinds = {"dir": "d", "symlink": "l", "file": "-", "other": "?", "partial": "p"}
    return kinds[entry["kind"]] + stat.filemode(entry["mode"])[1:]
