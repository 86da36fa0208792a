"""The client command's output: status lines, progress bars, results, listings (see Reporter)."""

import os
import stat
import sys
import time
from collections import deque

from .errors import Interrupted, LocalIOError
from .sizes import human_size
from .textsafe import escape, json_text


class Reporter:
    """Everything the user sees: progress bars (stderr, terminals only), status lines, and the
    results (stdout: `SHA1  PATH` lines, listings, or one JSON document).

    The one place that shows text from the server (names, error messages, the paths made of
    them): every text line goes through textsafe.escape, every JSON document through
    json_text, so that no control character reaches a terminal raw."""

    def __init__(self, args, out=sys.stdout, err=sys.stderr, on_output_closed=None):
        self.quiet = args.quiet
        self.path = getattr(args, "path", None)  # ls's
        self.json = args.json
        self.out = out
        self.err = err
        self.bars = not (args.quiet or args.no_progress) and err.isatty()
        self.files = []
        self.started = time.monotonic()
        self._overall = None
        self._results = None  # stat's entries, df's space: in --json's document
        self.extra = {}  # more members of --json's document (sync's counts)
        self._on_output_closed = on_output_closed
        self.output_closed = False  # a closed pipe: nothing more is written anywhere
        self._broken: set = set()  # the streams that failed

    def _above_bars(self, line, stream):
        """A line on its own above the progress bars (they are cleared and drawn again)."""
        from tqdm import tqdm

        if id(stream) in self._broken:
            return
        try:
            tqdm.write(line, file=stream)
            stream.flush()
        except OSError as problem:
            self.output_was_closed(problem, stream)

    def _put(self, stream, text, flush=True):
        """Write to stdout or stderr; a closed pipe (`| head`) ends the command quietly."""
        if id(stream) in self._broken:
            return
        try:
            stream.write(text)
            if flush:
                stream.flush()
        except OSError as problem:
            self.output_was_closed(problem, stream)

    def output_was_closed(self, problem=None, stream=None):
        """`stream` (stdout or stderr) could not be written: the command ends, quietly for a
        closed pipe (`| head`), else saying why on the other stream (exit 8). The failed
        descriptors then lead nowhere: Python would complain again when it flushes at exit."""
        quiet = problem is None or isinstance(problem, BrokenPipeError)
        failed = (self.out, self.err) if quiet else (stream,)
        self._broken.update(id(each) for each in failed)
        self.output_closed = self.output_closed or quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        for each in failed:
            try:
                os.dup2(devnull, each.fileno())
            except (OSError, ValueError, AttributeError):
                pass
        os.close(devnull)
        if self._on_output_closed is not None:
            name = "stderr" if stream is self.err else "stdout"
            self._on_output_closed(None if quiet else LocalIOError(f"cannot write to {name}: {problem.strerror}"))

    def say(self, text):
        if not self.quiet:
            self._write(text)

    def verified(self, name, size, resumed_from, seconds):
        """The status line of a file transferred and verified."""
        details = []
        if seconds >= 0.1:  # below, a rate says more about timers than about the link
            details.append(f"{human_size((size - resumed_from) / seconds)}/s")
        if resumed_from:
            details.append(f"resumed at {human_size(resumed_from)} ({100 * resumed_from // max(size, 1)}%)")
        extra = f" ({', '.join(details)})" if details else ""
        self.say(f"{name}: {human_size(size)} verified in {seconds:.2f} s{extra}")

    def warn(self, text):
        self._write(f"eke-client: warning: {text}")

    def error(self, text):
        self._write(f"eke-client: {text}")

    def _write(self, text):
        text = escape(text)
        if self.bars:
            self._above_bars(text, self.err)
        else:
            self._put(self.err, text + "\n")

    def overall(self, total_bytes, count):
        """With several files, a bar over all of them: `total_bytes` as far as known (a
        download's total grows as the server names sizes it had not listed)."""
        if self.bars and count > 1:
            self._overall = _bar(self.err, total_bytes, "total", position=0, leave=True, files=count)

    def progress(self, counted=False):
        """A file's bar (None without bars); `counted`: its size is in the overall total."""
        if not self.bars:
            return None
        return _FileBar(self.err, self._overall, counted)

    def done(self, record):
        self.files.append(record)
        if record["status"] == "ok" and "sha1" in record and not self.json:
            # A file written to stdout (get REMOTE -) has its digest on stderr.
            stream = self.err if record["local"] == "-" else self.out
            line = f"{record['sha1']}  {escape(record['local'])}"
            if self.bars:
                self._above_bars(line, stream)
            else:
                self._put(stream, line + "\n")

    def finish(self, command, error=None):
        """The end: --json's document (for ls, only when it failed: a listing is its own)."""
        if self._overall is not None:
            self._overall.close()
        if not self.json:
            return
        status = "ok"
        if isinstance(error, Interrupted):
            status = "interrupted"
        elif error is not None or any(f["status"] == "error" for f in self.files):
            status = "error"
        if command == "ls":
            summary = {"command": command, "status": status, "path": self.path, "entries": []}
        elif command == "stat":
            summary = {"command": command, "status": status, "entries": self._results or []}
        elif command == "df":
            summary = {"command": command, "status": status, "space": self._results}
        else:
            summary = {
                "command": command, "status": status, "files": self.files,
                "bytes": sum(f.get("bytes", 0) for f in self.files),
                "seconds": round(time.monotonic() - self.started, 6),
                **self.extra,
            }
        if error is not None:
            summary["error"] = {"code": error.code, "message": error.message, "exit": error.exit_code}
        self._put(self.out, json_text(summary) + "\n")

    def planned(self, action, name, record):
        """A change a dry run would make: a line on stdout, or a file of --json's document."""
        self.files.append({**record, "status": "planned", "action": action})
        if not self.json:
            self._put(self.out, f"{action} {escape(name)}\n")

    def entries(self, found):
        """stat's result: (path, entry) pairs, in the order asked."""
        if self.json:
            self._results = [{**entry.to_json(), "path": path} for path, entry in found]
            return
        for path, entry in found:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["mtime"]))
            self._put(self.out, f"{_mode_string(entry)} {entry['size']:>12} {when} {escape(path)}\n")

    def space(self, space):
        """df's result."""
        if self.json:
            self._results = space
            return
        free = 100 * space["free"] // max(space["total"], 1)
        lines = [f"disk: {human_size(space['free'])} free of {human_size(space['total'])} ({free}%)"]
        if space["files_free"] >= 0:
            lines.append(f"files: {space['files_free']} more can be created")
        if "quota_bytes" in space:
            left = max(space["quota_bytes"] - space["used_bytes"], 0)
            lines.append(f"quota: {human_size(space['used_bytes'])} used of {human_size(space['quota_bytes'])} "
                         f"({human_size(left)} left)")
        if "quota_files" in space:
            left = max(space["quota_files"] - space["used_files"], 0)
            lines.append(f"file quota: {space['used_files']} files of {space['quota_files']} ({left} left)")
        self._put(self.out, "".join(line + "\n" for line in lines))

    def listing(self, path, entries, long=False):
        """The result of `ls`: one line per entry, or one JSON document."""
        try:
            self._listing(path, entries, long)
            self.out.flush()
        except OSError as problem:
            self.output_was_closed(problem, self.out)

    def _listing(self, path, entries, long):
        out = self.out
        if self.json:
            # Entry by entry: the whole listing as dicts at once would cost more than the listing.
            out.write(f'{{"command": "ls", "status": "ok", "path": {json_text(path)}, "entries": [')
            for index, entry in enumerate(entries):
                out.write((", " if index else "") + json_text(entry.to_json()))
            out.write("]}\n")
            return
        for entry in entries:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["mtime"]))
            name = escape(entry["name"])
            if long:
                out.write(f"{_mode_string(entry)} {entry['size']:>12} {when} {name}\n")
            else:
                out.write(f"{name}\t{entry['kind']}\t{entry['size']}\t{when}\n")


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

    def progress(self, counted=False):
        return self._reporter.progress(counted)

    def __getattr__(self, name):
        if name not in ("say", "warn", "error", "done", "verified"):
            raise AttributeError(name)
        return lambda *args: self._held.append((name, args))

    def replay(self):
        for name, args in self._held:
            getattr(self._reporter, name)(*args)
        self._held.clear()


class _FileBar:
    """One bar per file, feeding the overall bar if there is one."""

    def __init__(self, err, overall, counted):
        self._err = err
        self._overall = overall
        self._bar = None
        self._counted = counted

    def start(self, name, size, initial=0):
        self._bar = _bar(
            self._err, size, escape(name), initial=initial, position=1 if self._overall is not None else 0,
            leave=self._overall is None,
        )
        if self._overall is not None:
            if not self._counted:
                self._overall.total += size
            self._overall.update(initial)

    def update(self, nbytes):
        self._bar.update(nbytes)
        if self._overall is not None:
            self._overall.update(nbytes)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            if self._overall is not None:
                self._overall.files_done += 1
                self._overall.refresh()


_FILE_FORMAT = "{desc}: {percentage:3.0f}% |{bar}| {size_n}/{size_total} [{elapsed}<{remaining}, {size_rate}]"
_OVERALL_FORMAT = (
    "{desc}: {percentage:3.0f}% |{bar}| {files_done}/{files} files, {size_n}/{size_total} "
    "[{elapsed}<{remaining}, {size_rate}]"
)


def _bar(err, total, desc, files=None, **options):
    """A tqdm bar whose sizes and rate are in binary units, like every size we print (tqdm's
    own would mix 1024 for sizes with 1000 for rates, and say MB for both)."""
    from tqdm import tqdm

    class Bar(tqdm):
        files_done = 0

        @property
        def format_dict(self):
            values = super().format_dict
            rate = values.get("rate")
            values.update(
                size_n=human_size(values["n"]),
                size_total=human_size(values["total"]) if values.get("total") else "?",
                size_rate=f"{human_size(rate)}/s" if rate else "-",
                files=files, files_done=self.files_done,
            )
            return values

    return Bar(
        total=total, desc=desc, file=err, bar_format=_OVERALL_FORMAT if files else _FILE_FORMAT,
        **options,
    )


def _mode_string(entry):
    kinds = {"dir": "d", "symlink": "l", "file": "-", "other": "?", "partial": "p"}
    return kinds[entry["kind"]] + stat.filemode(entry["mode"])[1:]
