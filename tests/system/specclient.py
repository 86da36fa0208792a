"""A minimal blocking eketwist client built from docs/protocol.md alone, for conformance tests.

Nothing here imports eketwist: frames are packed with struct, messages with json, SPAKE2+ is
computed with P-256 point arithmetic from pycryptodome, HKDF and HMAC with hmac/hashlib,
records with cryptography's AESGCM. Section numbers refer to docs/protocol.md.
"""

import hashlib
import hmac
import json
import secrets
import socket
import struct
from dataclasses import dataclass

from Crypto.PublicKey import ECC
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# §2 Frames
HEADER = struct.Struct(">IB")
HANDSHAKE, CONTROL, DATA = 0, 1, 2
LIMIT_BEFORE_AUTH = 4096
LIMIT_AFTER_AUTH = 2097168
MAX_PLAINTEXT = 2097152
TAG = 16
MAX_CONTROL_PLAINTEXT = 65536  # §3

# §4.1 P-256 (SEC 2) and RFC 9383's M and N
FIELD = 2**256 - 2**224 + 2**192 + 2**96 - 1
ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
G = ECC.EccPoint(
    0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
    0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
    "p256",
)
CONTEXT = b"eketwist/1 SPAKE2+-P256-SHA256-HKDF-SHA256-HMAC-SHA256"


class ProtocolViolation(Exception):
    """The server sent something docs/protocol.md does not allow."""


class ServerError(Exception):
    """The server answered with an ERROR message."""

    def __init__(self, message):
        super().__init__(f"{message.get('code')}: {message.get('message')}")
        self.code = message.get("code")
        self.message = message


def decompress(hex_point):
    raw = bytes.fromhex(hex_point)
    x = int.from_bytes(raw[1:], "big")
    y = pow((x**3 - 3 * x + B) % FIELD, (FIELD + 1) // 4, FIELD)
    if y % 2 != raw[0] - 2:
        y = FIELD - y
    return ECC.EccPoint(x, y, "p256")


M = decompress("02886e2f97ace46e55ba9dd7242579f2993b64e16ef3dcab95afd497333d8fa12f")
N = decompress("03d8bbd6c639c62937b04d997f38c3770719c629d7014d49a24b4f98baa1292b49")


def encode_point(point):
    if point.is_point_at_infinity():
        return b"\x04" + bytes(64)
    x, y = point.xy
    return b"\x04" + int(x).to_bytes(32, "big") + int(y).to_bytes(32, "big")


def decode_point(raw):
    """§4.1: 65 bytes, 04, coordinates below the prime, on the curve, not the identity."""
    if len(raw) != 65 or raw[0] != 4:
        raise ProtocolViolation("a point is not 65 bytes starting with 04")
    x, y = int.from_bytes(raw[1:33], "big"), int.from_bytes(raw[33:], "big")
    if x >= FIELD or y >= FIELD or (x == 0 and y == 0):
        raise ProtocolViolation("a point has a coordinate out of range or is the identity")
    try:
        return ECC.EccPoint(x, y, "p256")
    except ValueError:
        raise ProtocolViolation("a point is not on the curve") from None


def len8(data):
    """RFC 9383's len(x) || x, len as 8 bytes little-endian."""
    return struct.pack("<Q", len(data)) + data


def hkdf(ikm, info, length, salt=b""):
    """RFC 5869 with SHA-256."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def password_to_w(password, user, salt, n, r, p):
    """§4.2: (w0, w1) from the password."""
    pw_input = len8(password.encode()) + len8(user.encode()) + len8(b"")
    out = hashlib.scrypt(pw_input, salt=salt, n=n, r=r, p=p, dklen=80, maxmem=256 * n * r * p + 2**24)
    return int.from_bytes(out[:40], "big") % ORDER, int.from_bytes(out[40:], "big") % ORDER


@dataclass
class Transcript:
    Z: bytes
    V: bytes
    TT: bytes
    K_main: bytes
    K_confirmP: bytes
    K_confirmV: bytes
    K_shared: bytes
    confirmP: bytes
    confirmV: bytes  # the value the server must send


class Prover:
    """§4.3, the client's side of SPAKE2+."""

    def __init__(self, w0, w1, x=None):
        self.w0, self.w1 = w0, w1
        self.x = x if x is not None else 1 + secrets.randbelow(ORDER - 1)
        self.shareP = encode_point(G * self.x + M * w0)

    def finish(self, shareV, context, id_prover, id_verifier):
        point = decode_point(shareV) + (-(N * self.w0))
        Zp, Vp = point * self.x, point * self.w1
        if Zp.is_point_at_infinity() or Vp.is_point_at_infinity():
            raise ProtocolViolation("Z or V is the identity")
        Z, V = encode_point(Zp), encode_point(Vp)
        TT = (len8(context) + len8(id_prover) + len8(id_verifier) + len8(encode_point(M))
              + len8(encode_point(N)) + len8(self.shareP) + len8(shareV) + len8(Z) + len8(V)
              + len8(self.w0.to_bytes(32, "big")))
        K_main = hashlib.sha256(TT).digest()
        keys = hkdf(K_main, b"ConfirmationKeys", 64)
        K_confirmP, K_confirmV = keys[:32], keys[32:]
        return Transcript(
            Z=Z, V=V, TT=TT, K_main=K_main, K_confirmP=K_confirmP, K_confirmV=K_confirmV,
            K_shared=hkdf(K_main, b"SharedKey", 32),
            confirmP=hmac.new(K_confirmP, shareV, hashlib.sha256).digest(),
            confirmV=hmac.new(K_confirmV, self.shareP, hashlib.sha256).digest(),
        )


@dataclass
class TrafficKeys:
    key_c2s: bytes
    iv_c2s: bytes
    key_s2c: bytes
    iv_s2c: bytes


def traffic_keys(K_shared):
    """§5."""
    def h(info, n):
        return hkdf(K_shared, info.encode("ascii"), n)
    return TrafficKeys(h("eketwist/1 client-to-server key", 32), h("eketwist/1 client-to-server iv", 12),
                       h("eketwist/1 server-to-client key", 32), h("eketwist/1 server-to-client iv", 12))


def nonce(iv, counter):
    """§6: iv XOR the counter as a 12-byte big-endian integer."""
    return (int.from_bytes(iv, "big") ^ counter).to_bytes(12, "big")


def canonical(obj):
    """The canonical JSON of §3: members sorted, no whitespace, UTF-8."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def frame(kind, payload):
    return HEADER.pack(len(payload), kind) + payload


@dataclass
class Frame:
    kind: int
    header: bytes
    payload: bytes


@dataclass
class Record:
    kind: int
    header: bytes
    plaintext: bytes
    counter: int

    def message(self):
        return json.loads(self.plaintext)


class Connection:
    """One connection to the server, blocking, with a timeout on every read."""

    def __init__(self, port, host="127.0.0.1", timeout=20.0, check_canonical=True):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.check_canonical = check_canonical
        self.authenticated = False
        self.keys = None
        self.send_counter = self.recv_counter = 0
        self.params = self.params_raw = None

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- frames ---------------------------------------------------------------------------

    def send_raw(self, data):
        self.sock.sendall(data)

    def _recv_exact(self, n):
        buffer = bytearray(n)
        view, got = memoryview(buffer), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                if got == 0:
                    return None
                raise ProtocolViolation(f"the connection closed inside a frame ({got} of {n} bytes)")
            got += k
        return bytes(buffer)

    def read_frame(self):
        """The next frame, or None at a clean end of stream. A reset counts as the end too."""
        try:
            header = self._recv_exact(HEADER.size)
        except ConnectionResetError:
            return None
        if header is None:
            return None
        length, kind = HEADER.unpack(header)
        limit = LIMIT_AFTER_AUTH if self.authenticated else LIMIT_BEFORE_AUTH
        if length > limit:
            raise ProtocolViolation(f"a frame of {length} bytes, over this state's limit {limit}")
        payload = self._recv_exact(length) if length else b""
        if payload is None:
            raise ProtocolViolation("the connection closed after a frame header")
        return Frame(kind, header, payload)

    def parse(self, payload):
        message = json.loads(payload.decode("utf-8"))
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise ProtocolViolation(f"not a message: {payload[:200]!r}")
        if self.check_canonical and canonical(message) != payload:
            raise ProtocolViolation(f"not canonical JSON: {payload[:200]!r}")
        return message

    # -- handshake (§3, §4) ---------------------------------------------------------------

    def send_handshake(self, message):
        self.send_raw(frame(HANDSHAKE, canonical(message)))

    def recv_handshake(self):
        """(message, payload bytes); raises EOFError at the end of the stream."""
        f = self.read_frame()
        if f is None:
            raise EOFError("the server closed the connection")
        if f.kind != HANDSHAKE:
            raise ProtocolViolation(f"a frame of kind {f.kind} before OK")
        return self.parse(f.payload), f.payload

    def hello(self, user, version=1, **extra):
        self.user = user
        self.send_handshake({"type": "hello", "version": version, "user": user, **extra})
        message, raw = self.recv_handshake()
        if message["type"] == "error":
            raise ServerError(message)
        if message["type"] != "params":
            raise ProtocolViolation(f"expected PARAMS, got {message['type']}")
        self.params, self.params_raw = message, raw
        cost = message["scrypt"]
        n, r, p = cost["n"], cost["r"], cost["p"]
        if not (n & (n - 1) == 0 and 2**10 <= n <= 2**20 and 1 <= r <= 16 and 1 <= p <= 4
                and 128 * n * r <= 2**30):
            raise ProtocolViolation(f"scrypt cost out of bounds: {cost}")
        salt = bytes.fromhex(message["salt"])
        if not 8 <= len(salt) <= 64:
            raise ProtocolViolation("salt length out of bounds")
        return message

    def share(self, password, x=None):
        """Send SHARE; return the server's SHARE message and our transcript."""
        cost = self.params["scrypt"]
        w0, w1 = password_to_w(password, self.user, bytes.fromhex(self.params["salt"]),
                               cost["n"], cost["r"], cost["p"])
        self.prover = Prover(w0, w1, x)
        self.send_handshake({"type": "share", "share": self.prover.shareP.hex()})
        message, raw = self.recv_handshake()
        if message["type"] == "error":
            raise ServerError(message)
        if message["type"] != "share":
            raise ProtocolViolation(f"expected SHARE, got {message['type']}")
        self.server_share, self.server_share_raw = message, raw
        self.transcript = self.prover.finish(
            bytes.fromhex(message["share"]), CONTEXT, self.user.encode(),
            self.params["server"].encode())
        return message, self.transcript

    def confirm_valid(self):
        return hmac.compare_digest(bytes.fromhex(self.server_share["confirm"]), self.transcript.confirmV)

    def confirm(self):
        """Send CONFIRM (whether or not confirmV matched: tests decide); return the answer."""
        self.send_handshake({"type": "confirm", "confirm": self.transcript.confirmP.hex()})
        message, raw = self.recv_handshake()
        self.ok_raw = raw
        if message["type"] == "ok":
            self.authenticated = True
            self.keys = traffic_keys(self.transcript.K_shared)
            self.send_aead, self.recv_aead = AESGCM(self.keys.key_c2s), AESGCM(self.keys.key_s2c)
        return message

    def login(self, user, password):
        self.hello(user)
        self.share(password)
        if not self.confirm_valid():
            raise ProtocolViolation("the server could not prove it knows the password (confirmV)")
        message = self.confirm()
        if message["type"] == "error":
            raise ServerError(message)
        if message["type"] != "ok":
            raise ProtocolViolation(f"expected OK, got {message['type']}")
        return self

    # -- records (§6) ---------------------------------------------------------------------

    def seal(self, kind, plaintext, counter=None):
        """The bytes of one record; advances the send counter unless `counter` is given."""
        if counter is None:
            counter = self.send_counter
            self.send_counter += 1
        header = HEADER.pack(len(plaintext) + TAG, kind)
        return header + self.send_aead.encrypt(nonce(self.keys.iv_c2s, counter), plaintext, header)

    def send_record(self, kind, plaintext):
        self.send_raw(self.seal(kind, plaintext))

    def send_control(self, message):
        self.send_record(CONTROL, canonical(message))

    def send_tampered(self, kind, plaintext, bit=0):
        """A record with one bit of its ciphertext flipped (the counter is still spent)."""
        data = bytearray(self.seal(kind, plaintext))
        data[HEADER.size + bit // 8] ^= 1 << (bit % 8)
        self.send_raw(bytes(data))

    def recv_record(self):
        """The next record decrypted, or None at the end of the stream."""
        f = self.read_frame()
        if f is None:
            return None
        if f.kind not in (CONTROL, DATA):
            raise ProtocolViolation(f"a frame of kind {f.kind} after OK")
        plaintext = self.recv_aead.decrypt(nonce(self.keys.iv_s2c, self.recv_counter), f.payload, f.header)
        if len(plaintext) > MAX_PLAINTEXT:
            raise ProtocolViolation("a record over 2 MiB")
        if f.kind == CONTROL and len(plaintext) > MAX_CONTROL_PLAINTEXT:
            raise ProtocolViolation("a CONTROL plaintext over 65536 bytes")
        record = Record(f.kind, f.header, plaintext, self.recv_counter)
        self.recv_counter += 1
        return record

    def recv_message(self):
        """The next CONTROL message (raises on EOF or DATA)."""
        record = self.recv_record()
        if record is None:
            raise EOFError("the server closed the connection")
        if record.kind != CONTROL:
            raise ProtocolViolation("DATA where a message was expected")
        return self.parse(record.plaintext)

    def records_until_eof(self):
        """Every record until the server closes, decrypted (a failure to decrypt raises)."""
        records = []
        while (record := self.recv_record()) is not None:
            records.append(record)
        return records

    # -- requests (§7) --------------------------------------------------------------------

    def request(self, message):
        """Send one request; return its single answer (an ERROR is returned, not raised)."""
        self.send_control(message)
        return self.recv_message()

    def stat(self, path):
        return self.request({"type": "stat", "path": path})

    def list(self, path, recursive=False, **extra):
        """(entries, plaintexts of every ENTRIES message); raises ServerError on ERROR."""
        self.send_control({"type": "list", "path": path, "recursive": recursive, **extra})
        entries, plaintexts = [], []
        while True:
            record = self.recv_record()
            if record is None:
                raise EOFError("closed during a listing")
            message = self.parse(record.plaintext)
            if message["type"] == "error":
                raise ServerError(message)
            if message["type"] != "entries":
                raise ProtocolViolation(f"expected ENTRIES, got {message['type']}")
            entries.extend(message["entries"])
            plaintexts.append(record.plaintext)
            if not message["more"]:
                return entries, plaintexts

    def get(self, path, offset=None, sha1=None):
        """(FILE, DATA records' plaintexts, END); raises ServerError on a refusal."""
        request = {"type": "get", "path": path}
        if offset is not None:
            request["offset"] = offset
        if sha1 is not None:
            request["sha1"] = sha1.hex()
        self.send_control(request)
        header = self.recv_message()
        if header["type"] == "error":
            raise ServerError(header)
        if header["type"] != "file":
            raise ProtocolViolation(f"expected FILE, got {header['type']}")
        chunks = []
        while True:
            record = self.recv_record()
            if record is None:
                raise EOFError("closed during a download")
            if record.kind == DATA:
                chunks.append(record.plaintext)
                continue
            end = self.parse(record.plaintext)
            if end["type"] == "error":
                raise ServerError(end)
            if end["type"] != "end":
                raise ProtocolViolation(f"expected END, got {end['type']}")
            return header, chunks, end

    def put_offer(self, path, size, **extra):
        """Send PUT; return READY or the ERROR."""
        return self.request({"type": "put", "path": path, "size": size, **extra})

    def send_data(self, data, chunk=1 << 20):
        for i in range(0, len(data), chunk):
            self.send_record(DATA, data[i:i + chunk])

    def put(self, path, data, offset=0, **extra):
        """A whole upload from `offset` 0; returns (READY, STORED or ERROR)."""
        ready = self.put_offer(path, len(data), **extra)
        if ready["type"] != "ready":
            return ready, None
        self.send_control({"type": "upload", "offset": offset})
        self.send_data(data[offset:])
        self.send_control({"type": "end", "size": len(data), "sha1": hashlib.sha1(data).hexdigest()})
        return ready, self.recv_message()


def connect_login(port, user, password, **kwargs):
    return Connection(port, **kwargs).login(user, password)
