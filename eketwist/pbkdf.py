"""The password side of SPAKE2+ registration (RFC 9383, section 3.2) with scrypt: password to
(w0, w1), and the bounds a client accepts for the cost.

Kept free of heavy imports (hashlib only), so that the client can run it in a thread while it
is still loading Twisted and the elliptic-curve code.
"""

import hashlib
import struct

# The order of the P-256 group.
ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# w0s and w1s are each 40 bytes (k + 64 bits of margin) so reduction mod ORDER is unbiased.
W_BYTES = 40
# What a client accepts from a server, so a fake server cannot make it burn minutes or
# gigabytes (2**20 * 8 * 128 bytes = 1 GiB is the most it will spend).
SCRYPT_BOUNDS = {"n": (2**10, 2**20), "r": (1, 16), "p": (1, 4)}
MAX_SCRYPT_MEMORY = 1 << 30


def scrypt_memory(n, r, p):
    """Bytes scrypt needs (OpenSSL: V, 128·r·(N+2), and B, 128·r·p): at the largest cost
    accepted, 1 GiB and a little, within what hashlib lets maxmem be (below 2^31)."""
    return 128 * r * (n + 2 + p)


def len_prefixed(data):
    return struct.pack("<Q", len(data)) + data


def register(password, salt, id_prover, *, n, r, p):
    """Derive (w0, w1) from a password with scrypt, as RFC 9383 section 3.2 recommends.

    The scrypt input is len(pw)||pw||len(idProver)||idProver||len(idVerifier)||idVerifier with
    an empty idVerifier, so that renaming the server does not invalidate every stored verifier.
    """
    pbkdf_input = len_prefixed(password) + len_prefixed(id_prover) + len_prefixed(b"")
    # scrypt needs 128*n*r bytes; hashlib's default cap (32 MiB) refuses n=2**15, r=8.
    maxmem = scrypt_memory(n, r, p) + 1024 * 1024  # OpenSSL's own needs, and some headroom
    out = hashlib.scrypt(pbkdf_input, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=2 * W_BYTES)
    w0 = int.from_bytes(out[:W_BYTES], "big") % ORDER
    w1 = int.from_bytes(out[W_BYTES:], "big") % ORDER
    return w0, w1


def check_scrypt(params):
    """Return a problem with scrypt parameters, or None."""
    try:
        n, r, p = params["n"], params["r"], params["p"]
    except (KeyError, TypeError):
        return "scrypt parameters must have n, r and p"
    for key, value in (("n", n), ("r", r), ("p", p)):
        low, high = SCRYPT_BOUNDS[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return f"scrypt {key} must be between {low} and {high}"
    if n & (n - 1):
        return "scrypt n must be a power of two"
    if 128 * n * r > MAX_SCRYPT_MEMORY:
        return "scrypt parameters would need more than 1 GiB"
    return None
