"""Load generator for handshake capacity: many concurrent connections each performing full
SPAKE2+ handshakes as fast as the server answers. The client's scrypt output is computed once
(so that what is measured is the server). Usage:
  python -m bench.loadgen PORT USER PASSWORD CONCURRENCY TOTAL [--hold]
Prints one JSON line: {"handshakes", "failures", "seconds"}; with --hold, keeps every
connection open after its handshake until stdin closes (idle connections for memory figures).
"""

import asyncio
import json
import struct
import sys
import time

from eketwist import spake2plus
from eketwist.wire import CONTEXT

HEADER = struct.Struct(">IB")


async def _frame(reader):
    length, kind = HEADER.unpack(await reader.readexactly(5))
    return json.loads(await reader.readexactly(length))


def _send(writer, message):
    payload = json.dumps(message).encode()
    writer.write(HEADER.pack(len(payload), 0) + payload)


async def handshake(port, user, derived, hold):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    _send(writer, {"type": "hello", "version": 1, "user": user})
    params = await _frame(reader)
    key = (params["salt"], json.dumps(params["scrypt"], sort_keys=True))
    if key not in derived:
        derived[key] = None  # computed once: it is the client's cost, not the server's
        w = spake2plus.register(derived["password"], bytes.fromhex(params["salt"]), user.encode(), **params["scrypt"])
        derived[key] = w
    w0, w1 = derived[key]
    x, share_p = spake2plus.prover_share(w0)
    _send(writer, {"type": "share", "share": share_p.hex()})
    reply = await _frame(reader)
    keys = spake2plus.prover_finish(CONTEXT, user.encode(), params["server"].encode(), w0, w1, x, share_p,
                                    bytes.fromhex(reply["share"]))
    _send(writer, {"type": "confirm", "confirm": keys.confirm_p.hex()})
    ok = (await _frame(reader))["type"] == "ok"
    if hold:
        return ok, writer
    writer.close()
    return ok, None


async def main(port, user, password, concurrency, total, hold):
    derived = {"password": password.encode()}
    # Derive once before the clock starts.
    await handshake(port, user, derived, False)
    remaining = total
    results = {"handshakes": 0, "failures": 0}
    held = []

    async def worker():
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                ok, writer = await handshake(port, user, derived, hold)
            except (OSError, asyncio.IncompleteReadError):
                ok, writer = False, None
            results["handshakes" if ok else "failures"] += 1
            if writer is not None:
                held.append(writer)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    results["seconds"] = time.monotonic() - started
    print(json.dumps(results), flush=True)
    if hold:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        for writer in held:
            writer.close()


if __name__ == "__main__":
    port, user, password, concurrency, total = sys.argv[1:6]
    asyncio.run(main(int(port), user, password, int(concurrency), int(total), "--hold" in sys.argv))
