"""Control-plane frames: round trip, tags, key classes, and refusal of anything foreign before it is decoded."""

from __future__ import annotations

import struct

import msgspec
import pytest

from lmcache_pd import auth
from lmcache_pd import protocol as P
from lmcache_pd.errors import ProtocolError
from tests.unit.kv import COMPAT

KEYS = auth.Keyring(b"a test secret of 32 bytes......")
KEY = KEYS.control.to_decode

MESSAGES = [
    P.Hello(msg_id=1, peer="prefill-0", incarnation="abc", nonce=b"n" * 16),
    P.Challenge(msg_id=1, nonce=b"n" * 16, cookie=b"c" * 16),
    P.Handshake(msg_id=1, peer="prefill-0", incarnation="abc", compat_hash=COMPAT.digest(), compat=COMPAT,
                nonce=b"n" * 16, cookie=b"c" * 16),
    P.HandshakeReply(msg_id=1, incarnation="def", page_bytes=65536, num_pages=16, descriptor=b"desc"),
    P.Allocate(msg_id=2, transfer_id="t1", num_pages=3, num_tokens=300, prompt_digest="d" * 32, wait_s=1.5),
    P.Allocated(msg_id=2, transfer_id="t1", pages=[0, 1, 2], lease_s=30.0),
    P.TransferDone(msg_id=3, transfer_id="t1", num_bytes=196608, seconds=0.001),
    P.Cancel(msg_id=4, transfer_id="t1", reason="x"),
    P.Heartbeat(msg_id=5, transfer_ids=["t1", "t2"]),
    P.Ack(msg_id=5, incarnation="def"),
    P.Error(msg_id=6, code=P.ErrorCode.INCOMPATIBLE, message="no", fields=["dtype"]),
]
ANY = {P.KEY_DEPLOYMENT: (P._Msg,), P.KEY_SESSION: (P._Msg,)}


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frames = P.seal(msg, KEY, key_class=P.KEY_SESSION, seq=7)
    assert len(frames) == 3 and frames[0] == P.HEADER and len(frames[2]) == P.AUTH_BYTES
    frame = P.split(frames)
    assert (frame.key_class, frame.seq) == (P.KEY_SESSION, 7)
    assert P.verified(frame, KEY)
    assert P.decode_body(frame, ANY) == msg


def test_a_tag_verifies_only_under_its_key_and_over_its_bytes():
    frames = P.seal(MESSAGES[4], KEY, key_class=P.KEY_SESSION, seq=1)
    assert not P.verified(P.split(frames), KEYS.control.to_prefill)  # the other direction
    assert not P.verified(P.split(frames), auth.Keyring(b"another secret of 32 bytes.....").control.to_decode)
    assert not P.verified(P.split(frames), auth.Keyring(None).control.to_decode)
    for i in range(3):  # a flipped bit anywhere: in the header, the body, the seq or the tag
        for pos in (0, len(frames[i]) // 2, len(frames[i]) - 1):
            bad = [bytearray(f) for f in frames]
            bad[i][pos] ^= 0x01
            try:
                frame = P.split([bytes(f) for f in bad])
            except ProtocolError:
                continue  # the header or the key class is no longer ours
            assert not P.verified(frame, KEY), (i, pos)
    moved = P.split(frames)._replace(seq=2)  # the same tag on another sequence number
    assert not P.verified(moved, KEY)


def test_each_key_class_and_direction_admits_only_its_messages():
    def decoded(msg, key_class, allowed):
        return P.decode_body(P.split(P.seal(msg, KEY, key_class=key_class, seq=0)), allowed)

    assert decoded(MESSAGES[0], P.KEY_DEPLOYMENT, P.TO_DECODE) == MESSAGES[0]
    for msg, key_class, allowed in [(MESSAGES[4], P.KEY_DEPLOYMENT, P.TO_DECODE),  # Allocate before a session
                                    (MESSAGES[0], P.KEY_SESSION, P.TO_DECODE),     # Hello inside one
                                    (MESSAGES[5], P.KEY_SESSION, P.TO_DECODE),     # a reply sent as a request
                                    (MESSAGES[4], P.KEY_SESSION, P.TO_PREFILL),    # a request sent as a reply
                                    (MESSAGES[3], P.KEY_DEPLOYMENT, P.TO_PREFILL)]:
        with pytest.raises(ProtocolError, match="not accepted"):
            decoded(msg, key_class, allowed)


def test_another_version_is_refused_before_its_body_is_decoded():
    other = struct.pack("!4sH", P.MAGIC, P.PROTOCOL_VERSION + 1)
    head = struct.pack("!BQ", P.KEY_SESSION, 1)
    body = b"\xff\xff not msgpack"
    frame = P.split([other, body, head + auth.tag(KEY, other, head, body)])
    assert frame.version == P.PROTOCOL_VERSION + 1 and P.verified(frame, KEY)  # authentic, so it is told why
    with pytest.raises(ProtocolError, match="protocol version"):
        P.decode_body(frame, ANY)
    assert P.peek_version(other) == P.PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolError, match="version <= 3"):  # the frames of version 3 and before
        P.split([struct.pack("!4sH", P.MAGIC, 3), b"body"])


GOOD = P.seal(MESSAGES[4], KEY, key_class=P.KEY_SESSION, seq=1)


@pytest.mark.parametrize("frames", [
    [b"XXXX\x00\x04", *GOOD[1:]],                          # bad magic
    [P.HEADER],                                              # missing body and tag
    [*GOOD, b""],                                            # extra frame
    [b"LMPD", *GOOD[1:]],                                    # short header
    [GOOD[0], GOOD[1], GOOD[2][:-1]],                        # short tag
    [GOOD[0], GOOD[1], b"\x07" + GOOD[2][1:]],               # unknown key class
    [P.HEADER, b"\x00" * (P.MAX_BODY_BYTES + 1), GOOD[2]],   # oversized
])
def test_garbage_is_refused_by_split(frames):
    with pytest.raises(ProtocolError):
        P.split(frames)


@pytest.mark.parametrize("body", [
    b"\xc1",                                                                   # invalid msgpack
    msgspec.msgpack.encode({"type": "Allocate", "msg_id": 1}),                 # missing fields
    msgspec.msgpack.encode({"type": "Shutdown", "msg_id": 1}),                 # unknown tag
    msgspec.msgpack.encode({"type": "Allocate", "msg_id": "1", "transfer_id": "t", "num_pages": 1,
                            "num_tokens": 1, "prompt_digest": "d", "wait_s": 1.0}),  # wrong type
])
def test_an_authentic_but_malformed_body_is_a_protocol_error(body):
    head = struct.pack("!BQ", P.KEY_SESSION, 1)
    frame = P.split([P.HEADER, body, head + auth.tag(KEY, P.HEADER, head, body)])
    assert P.verified(frame, KEY)
    with pytest.raises(ProtocolError):
        P.decode_body(frame, ANY)


def test_compat_digest_and_differences():
    other = msgspec.structs.replace(COMPAT, dtype="torch.float16/auto", block_size=16)
    assert other.digest() != COMPAT.digest()
    assert COMPAT.differing(other) == ("dtype", "block_size")
    assert COMPAT.digest() == msgspec.structs.replace(COMPAT).digest()


def test_kv_transfer_params_views():
    pp = P.params_from_dict({"do_remote_decode": True, "transfer_id": "t", "decode_peer": "decode-0", "x": 1},
                            P.PrefillParams)
    assert pp == P.PrefillParams(transfer_id="t", decode_peer="decode-0")
    assert P.params_from_dict({"do_remote_decode": True}, P.PrefillParams) is None
    assert P.params_from_dict(None, P.DecodeParams) is None
    assert P.params_from_dict({"transfer_id": 3, "num_tokens": 1, "prompt_digest": "d", "prefill_peer": "p"},
                              P.DecodeParams) is None


def test_prompt_digest_depends_on_every_token():
    a = P.prompt_digest([1, 2, 3])
    assert a == P.prompt_digest((1, 2, 3))
    assert a != P.prompt_digest([1, 2, 4]) and a != P.prompt_digest([1, 2]) and a != P.prompt_digest([3, 2, 1])
