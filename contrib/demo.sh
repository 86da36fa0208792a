#!/usr/bin/env bash
# `make demo`: a demo root and user, the daemon on 127.0.0.1, one verified download, then stop.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DEMO=demo
PASSWORD=correct-horse-battery-staple

rm -rf "$DEMO"
mkdir -p "$DEMO/files" "$DEMO/downloads"
echo "creating $DEMO/files/sample.bin (64 MiB of random bytes)"
head -c $((64 * 1024 * 1024)) /dev/urandom > "$DEMO/files/sample.bin"
echo "adding user 'demo' to $DEMO/eke-users"
printf '%s\n' "$PASSWORD" | "$BIN/eke-users" --users "$DEMO/eke-users" add demo --password-stdin

PORT=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "starting the daemon on 127.0.0.1:$PORT (log: $DEMO/twistd.log)"
"$BIN/twistd" --pidfile "$DEMO/twistd.pid" --logfile "$DEMO/twistd.log" \
    eke --port "tcp:$PORT:interface=127.0.0.1" --root "$DEMO/files" --users "$DEMO/eke-users" --server-id demo
trap 'kill "$(cat "$DEMO/twistd.pid")" 2>/dev/null || true; echo "daemon stopped"' EXIT
for _ in $(seq 100); do
    "$BIN/python" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null && break
    sleep 0.1
done

echo "downloading sample.bin with the client"
EKE_PASSWORD="$PASSWORD" "$BIN/eke-client" --port "$PORT" --user demo get sample.bin "$DEMO/downloads/" | tee "$DEMO/result.txt"
echo "verified SHA-1 (client):   $(cut -d' ' -f1 "$DEMO/result.txt")"
echo "SHA-1 of the original:     $(sha1sum "$DEMO/files/sample.bin" | cut -d' ' -f1)"
echo "server log:"
grep -E "authenticated|sent " "$DEMO/twistd.log" | sed 's/^/  /'
