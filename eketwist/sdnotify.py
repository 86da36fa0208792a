"""systemd's notification protocol (sd_notify): a datagram to $NOTIFY_SOCKET, nothing else.

Used for Type=notify units: READY=1 once the daemon listens, RELOADING=1 / READY=1 around a
reload, STOPPING=1 when it shuts down. Without $NOTIFY_SOCKET it does nothing.
"""

import os
import socket


def notify(state, environ=os.environ):
    """Send `state` (e.g. "READY=1") to the service manager; True if it was sent."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError:
        return False
    return True
