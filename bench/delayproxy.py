"""A TCP proxy that delays each direction by a fixed time: a long link on one machine.

    python -m bench.delayproxy --listen PORT --target HOST:PORT [--delay-ms 10]

This kernel has no netem qdisc (issue 14), so the benchmarks put this in front of a server's
port instead. Every chunk read is written out `delay` after it arrived, in arrival order: the
delay is a stamp per chunk, not a sleep per chunk, so it adds latency without capping
throughput (what stays capped is this process's CPU: the bench measures a raw TCP copy through
it). With the default 10 ms each way, a round trip takes 20 ms more than on 127.0.0.1.

The connection's set-up costs a round trip as on a real link: the proxy connects to the target
`delay` after accepting (when a SYN would arrive), and holds the client's first bytes until a
SYN-ACK would have returned to it. Half-closes are forwarded after the bytes before them.
What is queued per direction is bounded (nothing is dropped): past `max_queued` bytes (32 MiB,
this kernel's largest TCP receive window, tcp_rmem), or while the receiving side's buffer is
full, the sending side is not read. So a stream may have as much in flight as on a real link
with large windows, and no more.

From Python, `DelayProxy(target_port)` runs it in a process of its own for a `with` block and
gives its `port` (an ephemeral one on 127.0.0.1) and `pid`.
"""

import argparse
import asyncio
import collections
import pathlib
import subprocess
import sys

CHECKOUT = pathlib.Path(__file__).resolve().parents[1]


class Direction:
    """One direction of one connection: bytes read from `source`, written to `sink` later."""

    def __init__(self, loop, delay, max_queued, on_finished, earliest=0.0):
        self.loop = loop
        self.on_finished = on_finished
        self.delay = delay
        self.max_queued = max_queued
        self.earliest = earliest  # no byte leaves before this (the set-up's round trip)
        self.queue = collections.deque()  # (due, bytes), due times in arrival order
        self.queued = 0
        self.timer = None
        self.source = None  # transports; the sink may come later (the connect to the target)
        self.sink = None
        self.sink_full = False
        self.reading_paused = False
        self.ended = False  # the source sent EOF or went away
        self.finished = False  # ... and everything before it was written

    def arrived(self, data):
        due = max(self.loop.time(), self.earliest) + self.delay
        self.queue.append((due, data))
        self.queued += len(data)
        self._schedule()
        self._flow()

    def end(self):
        if not self.ended:
            self.ended = True
            self._schedule()

    def sink_ready(self, sink):
        self.sink = sink
        self._schedule()

    def sink_paused(self, full):
        self.sink_full = full
        self._flow()

    def _schedule(self):
        if self.timer is not None or self.sink is None or self.finished:
            return
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._release)
        elif self.ended:
            self.finished = True
            if self.sink.can_write_eof():
                self.sink.write_eof()
            self.on_finished()

    def _release(self):
        self.timer = None
        now = self.loop.time()
        chunks = []
        while self.queue and self.queue[0][0] <= now:
            chunks.append(self.queue.popleft()[1])
        if chunks:
            self.queued -= sum(map(len, chunks))
            self.sink.writelines(chunks)
        self._schedule()
        self._flow()

    def _flow(self):
        """Read the source only while the queue and the sink's buffer have room."""
        if self.source is None or self.ended:
            return
        stop = self.sink_full or self.queued > self.max_queued
        if stop and not self.reading_paused:
            self.source.pause_reading()
        elif not stop and self.reading_paused:
            self.source.resume_reading()
        self.reading_paused = stop

    def abandon(self):
        """The sink went away: nothing queued can be delivered any more."""
        self.cancel()
        self.queue.clear()
        self.queued = 0
        self.ended = self.finished = True
        self.on_finished()

    def cancel(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Side(asyncio.Protocol):
    """One of the proxy's two sockets: what it reads goes out by `outgoing`; what it
    receives comes in by `incoming`, whose sink is this socket."""

    def __init__(self, pair, outgoing, incoming):
        self.pair = pair
        self.outgoing = outgoing
        self.incoming = incoming
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.outgoing.source = transport
        self.incoming.sink_ready(transport)

    def data_received(self, data):
        self.outgoing.arrived(data)

    def eof_received(self):
        self.outgoing.end()
        return True  # keep the other direction open: a half-close, forwarded in its turn

    def pause_writing(self):
        self.incoming.sink_paused(True)

    def resume_writing(self):
        self.incoming.sink_paused(False)

    def connection_lost(self, exc):
        # A reset, or the close below: what this socket sent still goes out, then its end;
        # what was queued for it is dropped.
        self.outgoing.end()
        if not self.incoming.finished:
            self.incoming.abandon()


class Pair:
    """A client's connection and the proxy's own to the target."""

    def __init__(self, loop, target, delay, max_queued):
        opened = loop.time()
        # Client to target: held until a SYN-ACK would be back at the client, then delayed.
        self.up = Direction(loop, delay, max_queued, self.check_done, earliest=opened + 2 * delay)
        self.down = Direction(loop, delay, max_queued, self.check_done)
        self.client = Side(self, self.up, self.down)
        self.server = None
        self.loop = loop
        self.target = target
        self.closed = False
        self.connect = loop.call_later(delay, self._connect)

    def _connect(self):
        self.connect = asyncio.ensure_future(self._open())

    async def _open(self):
        try:
            await self.loop.create_connection(lambda: self._server_side(), *self.target)
        except OSError:
            self.close()

    def _server_side(self):
        self.server = Side(self, self.down, self.up)
        return self.server

    def check_done(self):
        """Both directions through (each end seen and forwarded, or dropped): close both."""
        if self.up.finished and self.down.finished:
            self.close()
        elif self.server is None and self.down.finished:  # the client left before the connect
            self.close()

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.connect.cancel()
        for direction in (self.up, self.down):
            direction.cancel()
        for side in (self.client, self.server):
            if side is not None and side.transport is not None:
                side.transport.close()


async def serve(listen_port, target, delay, max_queued=32 * 1024 * 1024, host="127.0.0.1", ready=None):
    """Until cancelled. `ready(port)` is called once listening."""
    loop = asyncio.get_running_loop()

    def accepted():
        return Pair(loop, target, delay, max_queued).client

    server = await loop.create_server(accepted, host, listen_port)
    if ready is not None:
        ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


class DelayProxy:
    """`with DelayProxy(target_port, delay_ms=10) as proxy:` ... connect to proxy.port."""

    def __init__(self, target_port, delay_ms=10.0, target_host="127.0.0.1"):
        self.command = [sys.executable, "-m", "bench.delayproxy", "--listen", "0",
                        "--target", f"{target_host}:{target_port}", "--delay-ms", str(delay_ms)]
        self.delay_ms = delay_ms
        self.process = None
        self.port = None

    def __enter__(self):
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True, cwd=CHECKOUT)
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"the delaying proxy did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])
        return self

    @property
    def pid(self):
        return self.process.pid

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="port (0: any free one), or HOST:PORT; HOST defaults to 127.0.0.1")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="added to each direction (default: 10)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    target_host, _, target_port = args.target.rpartition(":")

    def ready(bound):
        print(f"listening on {host or '127.0.0.1'}:{bound}", flush=True)

    try:
        asyncio.run(serve(int(port), (target_host or "127.0.0.1", int(target_port)), args.delay_ms / 1000,
                          host=host or "127.0.0.1", ready=ready))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
