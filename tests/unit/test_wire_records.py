"""The frame codec and the record cipher as plain functions, with hypothesis for framing."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eketwist import records, wire
from eketwist.errors import ProtocolError


def frames_of(stream, cuts, max_payload=wire.MAX_RECORD_PAYLOAD):
    decoder = wire.FrameDecoder(max_payload)
    got = []
    previous = 0
    for cut in sorted(cuts) + [len(stream)]:
        decoder.feed(stream[previous:cut], lambda kind, head, payload: got.append((kind, bytes(head), bytes(payload))))
        previous = max(previous, cut)
    return got, decoder


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(wire.KINDS), st.binary(max_size=3000)), max_size=8),
    st.lists(st.integers(min_value=0, max_value=30000), max_size=20),
)
def test_any_split_of_the_stream_gives_the_same_frames(frames, cuts):
    stream = b"".join(wire.header(kind, len(payload)) + payload for kind, payload in frames)
    got, decoder = frames_of(stream, [c for c in cuts if c <= len(stream)])
    assert [(kind, payload) for kind, _, payload in got] == frames
    assert all(head == wire.header(kind, len(payload)) for kind, head, payload in got)
    assert decoder.buffered == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_crashes_the_decoder(data):
    decoder = wire.FrameDecoder(64)
    try:
        decoder.feed(data, lambda *frame: None)
    except ProtocolError:
        pass
    assert decoder.buffered <= len(data)


def test_oversized_frame_is_refused_from_its_header_alone():
    decoder = wire.FrameDecoder(wire.MAX_HANDSHAKE_PAYLOAD)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.feed(wire.header(wire.HANDSHAKE, wire.MAX_HANDSHAKE_PAYLOAD + 1), lambda *f: None)


def test_limit_can_grow_between_frames():
    decoder = wire.FrameDecoder(10)
    big = b"x" * 100
    stream = wire.header(wire.HANDSHAKE, 2) + b"ok" + wire.header(wire.DATA, len(big)) + big
    got = []

    def on_frame(kind, head, payload):
        got.append(bytes(payload))
        decoder.max_payload = 1000

    decoder.feed(stream, on_frame)
    assert got == [b"ok", big]


@pytest.mark.parametrize(
    "payload",
    [b"", b"[]", b'{"type": 1}', b'{"no": "type"}', b"\xc3\x28", b'{"type":"x"', b"[" * 5000],
)
def test_decode_message_refuses_malformed(payload):
    with pytest.raises(ProtocolError):
        wire.decode_message(payload)


def test_decode_message_ignores_unknown_fields():
    assert wire.decode_message(b'{"type":"get","path":"a","future":[1,2]}')["path"] == "a"


def test_field_checks():
    message = {"type": "t", "s": "abc", "i": 5, "b": True, "h": "00ff", "n": "a\x00b"}
    assert wire.text_field(message, "s", 3) == "abc"
    assert wire.int_field(message, "i", 0, 5) == 5
    assert wire.hex_field(message, "h", 2) == b"\x00\xff"
    # NUL is a character like another to the format: a path holding one is refused by storage.
    assert wire.string_field(message, "n") == "a\x00b"
    assert wire.bool_field(message, "b") is True and wire.bool_field(message, "absent") is False
    for call in (
        lambda: wire.text_field(message, "s", 2),
        lambda: wire.string_field({"type": "t", "s": "\ud800"}, "s"),  # a lone surrogate
        lambda: wire.string_field(message, "i"),
        lambda: wire.bool_field(message, "i"),  # 1 is not true
        lambda: wire.bool_field({"type": "t", "b": None}, "b"),  # null is not a value
        lambda: wire.int_field(message, "i", 6, 9),
        lambda: wire.int_field(message, "b", 0, 9),  # a bool is not an int here
        lambda: wire.hex_field(message, "h", 3),
        lambda: wire.hex_field(message, "s", 1, 2),
        lambda: wire.text_field(message, "missing", 5),
    ):
        with pytest.raises(ProtocolError):
            call()


K = bytes(range(32))


def test_records_round_trip_in_order_and_directions_differ():
    client_send, client_receive = records.traffic_ciphers(K, is_client=True)
    server_send, server_receive = records.traffic_ciphers(K, is_client=False)
    head = wire.header(wire.DATA, 5 + records.TAG_BYTES)
    sealed = [client_send.seal(head, b"hello") for _ in range(3)]
    assert len(set(sealed)) == 3  # a fresh nonce per record
    assert [server_receive.open(head, s) for s in sealed] == [b"hello"] * 3
    back = server_send.seal(head, b"hello")
    assert back not in sealed
    assert client_receive.open(head, back) == b"hello"


def test_records_refuse_reorder_replay_tamper_and_wrong_header():
    send, _ = records.traffic_ciphers(K, is_client=True)
    _, receive = records.traffic_ciphers(K, is_client=False)
    head = wire.header(wire.DATA, 4 + records.TAG_BYTES)
    first, second = send.seal(head, b"abcd"), send.seal(head, b"efgh")
    for bad_head, bad_body in (
        (head, second),  # reordered: the counter expects the first record
        (wire.header(wire.CONTROL, 4 + records.TAG_BYTES), first),  # header is authenticated
        (head, first[:-1] + bytes([first[-1] ^ 1])),
    ):
        _, fresh = records.traffic_ciphers(K, is_client=False)
        with pytest.raises(records.RecordAuthenticationError):
            fresh.open(bad_head, bad_body)
    assert receive.open(head, first) == b"abcd"
    with pytest.raises(records.RecordAuthenticationError):
        receive.open(head, first)  # replayed


def test_record_cipher_repr_has_no_key_material():
    cipher = records.RecordCipher(K, records.CLIENT_TO_SERVER)
    assert repr(cipher) == "<RecordCipher records=0>"


def test_encode_message_is_compact_utf8():
    assert wire.encode_message({"type": "hello", "user": "zoë"}) == json.dumps(
        {"type": "hello", "user": "zoë"}, separators=(",", ":"), ensure_ascii=False
    ).encode()


def test_wanted_keeps_reads_on_frame_boundaries():
    frame = wire.header(wire.DATA, 100) + b"x" * 100
    decoder = wire.FrameDecoder(1000)
    assert decoder.wanted(whole=105) == 105
    decoder.feed(frame[:3], lambda *f: None)
    assert decoder.wanted() == 2  # the rest of the header
    decoder.feed(frame[3:40], lambda *f: None)
    assert decoder.wanted() == 65  # the rest of the frame
    got = []
    decoder.feed(frame[40:], lambda kind, head, payload: got.append(bytes(payload)))
    assert got == [b"x" * 100] and decoder.wanted(whole=105) == 105


@pytest.mark.parametrize(
    "payload, why",
    [
        (b'{"type":"stat","path":"a","path":"b"}', "appears twice"),  # which would win differs by parser
        (b'{"type":"stat","x":' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper"),
        (b'{"type":"stat","x":' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}", "nested deeper"),
        (b"\xef\xbb\xbf" + b'{"type":"stat"}', "not UTF-8 JSON"),  # a BOM is not JSON
        (b'{"type":"stat","x":NaN}', "NaN is not JSON"),
    ],
)
def test_malformed_messages_are_protocol_errors(payload, why):
    with pytest.raises(ProtocolError, match=why):
        wire.decode_message(payload)


def test_nesting_up_to_the_limit_is_accepted():
    deep = b'{"type":"t","x":' + b"[" * (wire.MAX_NESTING - 1) + b"]" * (wire.MAX_NESTING - 1) + b"}"
    assert wire.decode_message(deep)["type"] == "t"
