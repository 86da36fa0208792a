"""SPAKE2+ (RFC 9383) for the suite P256-SHA256-HKDF-SHA256-HMAC-SHA256, as pure functions.

No I/O and no state beyond the values passed in: the protocol machines call these. The client
is the Prover, the server the Verifier. Secrets (w0, w1, x, y, keys) are plain integers and
bytes that callers must never log.
"""

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from Crypto.PublicKey import ECC
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import pbkdf

CURVE = "p256"
# P-256 field prime and group order (SEC 2); the cofactor h is 1.
FIELD_PRIME = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
ORDER = pbkdf.ORDER
SCALAR_BYTES = 32
POINT_BYTES = 65  # uncompressed SEC1: 0x04 || x || y


class InvalidPoint(ValueError):
    """A received point is malformed, off the curve, or the identity."""


def _point(x, y):
    return ECC.EccPoint(x, y, curve=CURVE)


GENERATOR = ECC.construct(curve="P-256", d=1).pointQ


def decode_point(data):
    """Decode an uncompressed SEC1 point, refusing anything but a valid non-identity point."""
    if len(data) != POINT_BYTES or data[0] != 0x04:
        raise InvalidPoint("not an uncompressed SEC1 P-256 point")
    x = int.from_bytes(data[1:33], "big")
    y = int.from_bytes(data[33:], "big")
    if x >= FIELD_PRIME or y >= FIELD_PRIME:
        raise InvalidPoint("point coordinate out of range")
    # pycryptodome reads (0, 0) as the point at infinity instead of refusing it.
    if x == 0 and y == 0:
        raise InvalidPoint("point is the identity")
    try:
        point = _point(x, y)
    except ValueError:
        raise InvalidPoint("point is not on the curve") from None
    if point.is_point_at_infinity():
        raise InvalidPoint("point is the identity")
    return point


def encode_point(point):
    x, y = point.xy
    return b"\x04" + int(x).to_bytes(32, "big") + int(y).to_bytes(32, "big")


def _decompress(hex_compressed):
    raw = bytes.fromhex(hex_compressed)
    x = int.from_bytes(raw[1:], "big")
    # P-256 has p = 3 mod 4, so a square root is a single exponentiation.
    b = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
    rhs = (pow(x, 3, FIELD_PRIME) - 3 * x + b) % FIELD_PRIME
    y = pow(rhs, (FIELD_PRIME + 1) // 4, FIELD_PRIME)
    if (y & 1) != (raw[0] & 1):
        y = FIELD_PRIME - y
    return _point(x, y)


# RFC 9383 section 4: the fixed points M and N for P-256.
M = _decompress("02886e2f97ace46e55ba9dd7242579f2993b64e16ef3dcab95afd497333d8fa12f")
N = _decompress("03d8bbd6c639c62937b04d997f38c3770719c629d7014d49a24b4f98baa1292b49")


len_prefixed = pbkdf.len_prefixed
# Registration (password to w0, w1) lives in pbkdf, which loads without the curve code.
register = pbkdf.register


def _hkdf(ikm, info, length):
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def verifier_record(w0, w1):
    """What the server stores: w0 and L = w1*P. Never w1, never the password."""
    return w0, encode_point(GENERATOR * w1)


def random_scalar():
    # Uniform in [1, ORDER-1]: zero would make the share a function of w0 alone.
    return secrets.randbelow(ORDER - 1) + 1


@dataclass(frozen=True)
class Keys:
    """The result of a SPAKE2+ run on one side. repr() hides every secret."""

    confirm_p: bytes = field(repr=False)
    confirm_v: bytes = field(repr=False)
    shared: bytes = field(repr=False)


def _nonidentity(point):
    # Only a peer that knows w0 can force this; refuse rather than hash the identity.
    if point.is_point_at_infinity():
        raise InvalidPoint("derived point is the identity")
    return point


def transcript(context, id_prover, id_verifier, share_p, share_v, z, v, w0):
    return b"".join(
        len_prefixed(item)
        for item in (
            context,
            id_prover,
            id_verifier,
            encode_point(M),
            encode_point(N),
            share_p,
            share_v,
            encode_point(z),
            encode_point(v),
            w0.to_bytes(SCALAR_BYTES, "big"),
        )
    )


def key_schedule(tt, share_p, share_v):
    """RFC 9383 section 3.4: K_main, the confirmation keys and values, K_shared."""
    k_main = hashlib.sha256(tt).digest()
    confirmation_keys = _hkdf(k_main, b"ConfirmationKeys", 64)
    k_confirm_p, k_confirm_v = confirmation_keys[:32], confirmation_keys[32:]
    return Keys(
        confirm_p=hmac.new(k_confirm_p, share_v, hashlib.sha256).digest(),
        confirm_v=hmac.new(k_confirm_v, share_p, hashlib.sha256).digest(),
        shared=_hkdf(k_main, b"SharedKey", 32),
    )


def prover_share(w0, x=None):
    """The Prover's first step: (x, shareP = x*P + w0*M)."""
    x = random_scalar() if x is None else x
    return x, encode_point(GENERATOR * x + M * w0)


def prover_finish(context, id_prover, id_verifier, w0, w1, x, share_p, share_v_bytes):
    """The Prover's second step, given the Verifier's share. Raises InvalidPoint."""
    share_v = decode_point(share_v_bytes)
    base = share_v + N * (ORDER - w0)
    z, v = _nonidentity(base * x), _nonidentity(base * w1)
    tt = transcript(context, id_prover, id_verifier, share_p, share_v_bytes, z, v, w0)
    return key_schedule(tt, share_p, share_v_bytes)


@dataclass(frozen=True)
class VerifierPoints:
    """What the Verifier can compute once per verifier: w0*N, -w0*M and L as a point.
    repr() hides them (they derive from w0)."""

    w0_n: object = field(repr=False)
    minus_w0_m: object = field(repr=False)
    L: object = field(repr=False)


def verifier_points(w0, l_bytes):
    """Precompute a verifier's fixed points: three of the five scalar multiplications a
    handshake would otherwise do (raises InvalidPoint for a bad L)."""
    return VerifierPoints(N * w0, M * (ORDER - w0), decode_point(l_bytes))


def verifier_respond(context, id_prover, id_verifier, w0, l_bytes, share_p_bytes, y=None, points=None):
    """The Verifier's only step: (shareV, Keys) from the Prover's share. Raises InvalidPoint.
    `points`: verifier_points(w0, l_bytes), if the caller keeps them."""
    share_p = decode_point(share_p_bytes)
    points = points or verifier_points(w0, l_bytes)
    y = random_scalar() if y is None else y
    share_v = encode_point(GENERATOR * y + points.w0_n)
    z = _nonidentity((share_p + points.minus_w0_m) * y)
    v = _nonidentity(points.L * y)
    tt = transcript(context, id_prover, id_verifier, share_p_bytes, share_v, z, v, w0)
    return share_v, key_schedule(tt, share_p_bytes, share_v)


def confirmation_matches(expected, received):
    return hmac.compare_digest(expected, received)
