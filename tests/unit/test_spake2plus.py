"""SPAKE2+ against RFC 9383's own test vectors, and point validation."""

import json
import pathlib

import pytest

from eketwist import pbkdf
from eketwist import spake2plus as s2

HERE = pathlib.Path(__file__).parent
VECTORS_COPY = HERE.parent / "data" / "spake2plus-vectors.json"
ALL_VECTORS = HERE.parent / "data" / "rfc9383-all-vectors.json"


@pytest.fixture(scope="module")
def vec():
    return {k: v for k, v in json.loads(VECTORS_COPY.read_text()).items()}


def test_our_suites_vectors_are_the_rfcs():
    """The vectors these tests use are RFC 9383's for our suite, value for value (both files
    are copies, in the repository, of the RFC's Appendix C)."""
    ours = json.loads(VECTORS_COPY.read_text())
    suites = {entry["suite"]: entry for entry in json.loads(ALL_VECTORS.read_text())["vectors"]}
    rfc = suites[ours["suite"]]
    assert ours["suite"] == "P256-SHA256-HKDF-SHA256-HMAC-SHA256"
    assert {key: ours[key] for key in rfc} == rfc


def h(value):
    return bytes.fromhex(value)


def test_m_and_n_are_the_rfc_points(vec):
    assert s2.M.xy[0] == int(vec["M_compressed"][2:], 16)
    assert s2.N.xy[0] == int(vec["N_compressed"][2:], 16)
    assert int(s2.M.xy[1]) % 2 == int(vec["M_compressed"][:2], 16) - 2
    assert int(s2.N.xy[1]) % 2 == int(vec["N_compressed"][:2], 16) - 2


def test_every_vector_value(vec):
    context = vec["Context"].encode()
    idp, idv = vec["idProver"].encode(), vec["idVerifier"].encode()
    w0, w1 = int(vec["w0"], 16), int(vec["w1"], 16)
    x, y = int(vec["x"], 16), int(vec["y"], 16)

    assert s2.verifier_record(w0, w1) == (w0, h(vec["L"]))
    got_x, share_p = s2.prover_share(w0, x)
    assert share_p == h(vec["shareP"])

    share_v, vkeys = s2.verifier_respond(context, idp, idv, w0, h(vec["L"]), share_p, y)
    assert share_v == h(vec["shareV"])
    pkeys = s2.prover_finish(context, idp, idv, w0, w1, x, share_p, share_v)

    z = s2.decode_point(h(vec["Z"]))
    v = s2.decode_point(h(vec["V"]))
    tt = s2.transcript(context, idp, idv, share_p, share_v, z, v, w0)
    assert tt == h(vec["TT"])
    for keys in (vkeys, pkeys):
        assert keys.confirm_p == h(vec["confirmP"])
        assert keys.confirm_v == h(vec["confirmV"])
        assert keys.shared == h(vec["K_shared"])


def test_intermediate_keys(vec):
    import hashlib

    k_main = hashlib.sha256(h(vec["TT"])).digest()
    assert k_main == h(vec["K_main"])
    ck = s2._hkdf(k_main, b"ConfirmationKeys", 64)
    assert ck[:32] == h(vec["K_confirmP"]) and ck[32:] == h(vec["K_confirmV"])


def test_wrong_password_gives_different_keys():
    salt = b"s" * 16
    w0, w1 = s2.register(b"right", salt, b"alice", n=2**10, r=8, p=1)
    bad0, bad1 = s2.register(b"wrong", salt, b"alice", n=2**10, r=8, p=1)
    _, L = s2.verifier_record(w0, w1)
    x, share_p = s2.prover_share(bad0)
    share_v, vkeys = s2.verifier_respond(b"ctx", b"alice", b"srv", w0, L, share_p)
    pkeys = s2.prover_finish(b"ctx", b"alice", b"srv", bad0, bad1, x, share_p, share_v)
    assert not s2.confirmation_matches(vkeys.confirm_v, pkeys.confirm_v)
    assert vkeys.shared != pkeys.shared


def test_register_is_deterministic_and_salted():
    a = s2.register(b"pw", b"1" * 16, b"u", n=2**10, r=8, p=1)
    assert a == s2.register(b"pw", b"1" * 16, b"u", n=2**10, r=8, p=1)
    assert a != s2.register(b"pw", b"2" * 16, b"u", n=2**10, r=8, p=1)
    assert all(0 <= w < s2.ORDER for w in a)


def test_default_scrypt_cost_is_accepted():
    # hashlib's default maxmem refuses n=2**15, r=8; register must raise it.
    s2.register(b"pw", b"1" * 16, b"u", n=2**15, r=8, p=1)


G = s2.encode_point(s2.GENERATOR)


@pytest.mark.parametrize(
    "data",
    [
        b"\x04" + bytes(64),  # pycryptodome's point at infinity
        b"\x04" + b"\x01" * 64,  # off the curve
        b"\x02" + G[1:33],  # compressed
        G[:-1],  # short
        G + b"\x00",  # long
        b"\x05" + G[1:],  # bad prefix
        b"\x04" + (s2.FIELD_PRIME + 1).to_bytes(32, "big") + G[33:],  # x out of range
        b"",
    ],
)
def test_decode_point_refuses(data):
    with pytest.raises(s2.InvalidPoint):
        s2.decode_point(data)


def test_decode_point_round_trip():
    assert s2.encode_point(s2.decode_point(G)) == G


def test_keys_repr_hides_secrets():
    keys = s2.Keys(b"A" * 32, b"B" * 32, b"C" * 32)
    assert "AAAA" not in repr(keys) and "4141" not in repr(keys)


def test_precomputed_verifier_points_give_the_same_answer(vec):
    context = vec["Context"].encode()
    w0, y = int(vec["w0"], 16), int(vec["y"], 16)
    points = s2.verifier_points(w0, h(vec["L"]))
    assert repr(points) == "VerifierPoints()"
    share_v, keys = s2.verifier_respond(context, b"client", b"server", w0, h(vec["L"]), h(vec["shareP"]), y, points=points)
    assert share_v == h(vec["shareV"]) and keys.shared == h(vec["K_shared"])


def test_the_largest_cost_a_client_accepts_can_be_computed():
    """The bound of docs/protocol.md section 3.2 (128·N·r <= 2^30) is reachable: at its edge
    scrypt needs 1 GiB, which hashlib's maxmem must allow (it refused it once)."""
    for n, r in ((2**20, 8), (2**19, 16)):
        assert pbkdf.check_scrypt({"n": n, "r": r, "p": 1}) is None
    w0, w1 = pbkdf.register(b"pw", b"salt" * 4, b"alice", n=2**20, r=8, p=1)
    assert 0 <= w0 < pbkdf.ORDER and 0 <= w1 < pbkdf.ORDER
