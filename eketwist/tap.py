"""The twistd plugin's Options and makeService: `twistd eke --port 4000 --root ./files`."""

import os
import socket

from twisted.application import internet, service, strports
from twisted.python import usage

from . import server, userdb


class Options(usage.Options):
    synopsis = "[--port ENDPOINT] [--root DIR] [--users FILE] [--server-id NAME]"
    longdesc = (
        "Serve the files under --root to users who prove they know their password with "
        "SPAKE2+ (RFC 9383); every byte is then encrypted and authenticated. Users are "
        "managed with eke-users; the users file is re-read when it changes."
    )
    optParameters = [
        ["port", "p", "4000", "where to listen: a port number (TCP on all interfaces) or a Twisted "
         "endpoint such as tcp:4000:interface=127.0.0.1, ssl:..., systemd:domain=INET:name=eke"],
        ["root", "r", ".", "the directory whose files are served"],
        ["users", "u", "./eke-users", "the users file (create it with eke-users add NAME)"],
        ["server-id", None, socket.gethostname(), "this server's name in the handshake (idVerifier)"],
        ["handshake-timeout", None, server.DEFAULT_HANDSHAKE_TIMEOUT, "seconds a client has to authenticate", float],
        ["idle-timeout", None, server.DEFAULT_IDLE_TIMEOUT, "seconds an authenticated connection may stay idle", float],
        ["max-upload-size", None, None, "the largest upload accepted, in bytes (suffixes K, M, G, T; default: no limit)"],
        ["partial-max-age", None, server.DEFAULT_PARTIAL_MAX_AGE,
         "seconds after which an abandoned partial upload is deleted (default: 7 days)", float],
    ]

    def postOptions(self):
        port = self["port"]
        if port.isdigit():
            self["port"] = f"tcp:{port}"
        root = self["root"]
        if not os.path.isdir(root):
            raise usage.UsageError(f"--root {root}: not a directory")
        if not self["server-id"] or len(self["server-id"].encode("utf-8")) > 255:
            raise usage.UsageError("--server-id must be 1 to 255 bytes")
        if self["max-upload-size"] is not None:
            self["max-upload-size"] = parse_size(self["max-upload-size"])
        for name in ("handshake-timeout", "idle-timeout", "partial-max-age"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        try:
            userdb.load(self["users"])
        except userdb.UsersFileError as problem:
            raise usage.UsageError(str(problem)) from None


def parse_size(text):
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "")
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise usage.UsageError(f"--max-upload-size {text}: not a size") from None
    if value < 0:
        raise usage.UsageError("--max-upload-size must not be negative")
    return value


def makeService(options):
    factory = server.ServerFactory(
        root=options["root"],
        users_path=options["users"],
        server_id=options["server-id"],
        handshake_timeout=options["handshake-timeout"],
        idle_timeout=options["idle-timeout"],
        max_upload_size=options["max-upload-size"],
        partial_max_age=options["partial-max-age"],
    )
    top = service.MultiService()
    strports.service(options["port"], factory).setServiceParent(top)
    # Abandoned partial uploads: swept at start and then every hour (or age, if shorter).
    sweep_every = min(3600.0, options["partial-max-age"])
    internet.TimerService(sweep_every, factory.sweep_partial_uploads).setServiceParent(top)
    return top
