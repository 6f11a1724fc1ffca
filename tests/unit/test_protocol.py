"""Control-plane messages: round trip, and refusal of anything foreign before it is decoded."""

from __future__ import annotations

import struct

import msgspec
import pytest

from lmcache_pd import protocol as P
from lmcache_pd.errors import ProtocolError

COMPAT = P.CompatInfo(model="tiny", dtype="torch.bfloat16/auto", kv_layout="LBHNC", block_size=128, num_layers=2,
                      num_kv_heads=2, head_size=64, page_bytes=65536, tp_size=1, tp_rank=0, transport="tcp",
                      attn_backend="cpu_attn/vec", vllm_version="0.32.0")

MESSAGES = [
    P.Handshake(msg_id=1, peer="prefill-0", incarnation="abc", compat_hash=COMPAT.digest(), compat=COMPAT,
                payload=b"\x00\x01"),
    P.HandshakeReply(msg_id=1, incarnation="def", page_bytes=65536, num_pages=16, payload=b"desc"),
    P.Allocate(msg_id=2, transfer_id="t1", num_pages=3, num_tokens=300, prompt_digest="d" * 32, wait_s=1.5),
    P.Allocated(msg_id=2, transfer_id="t1", pages=[0, 1, 2], lease_s=30.0),
    P.TransferDone(msg_id=3, transfer_id="t1", num_bytes=196608, seconds=0.001),
    P.Cancel(msg_id=4, transfer_id="t1", reason="x"),
    P.Heartbeat(msg_id=5, transfer_ids=["t1", "t2"]),
    P.Ack(msg_id=5, incarnation="def"),
    P.Error(msg_id=6, code=P.ErrorCode.INCOMPATIBLE, message="no", fields=["dtype"]),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frames = P.encode(msg)
    assert len(frames) == 2 and frames[0] == P.HEADER
    assert P.decode(frames) == msg


def test_other_version_is_refused_before_the_body_is_read():
    old = struct.pack("!4sH", P.MAGIC, P.PROTOCOL_VERSION + 1)
    # The body is garbage: the version check must come first and say so.
    with pytest.raises(ProtocolError, match="protocol version"):
        P.decode([old, b"\xff\xff not msgpack"])
    assert P.peek_version(old) == P.PROTOCOL_VERSION + 1


@pytest.mark.parametrize("frames", [
    [b"XXXX\x00\x01", P.encode(MESSAGES[0])[1]],            # bad magic
    [P.HEADER],                                              # missing body
    [P.HEADER, b"", b""],                                    # extra frame
    [b"LMPD", b"body"],                                      # short header
    [P.HEADER, b"\xc1"],                                     # invalid msgpack
    [P.HEADER, msgspec.msgpack.encode({"type": "Allocate", "msg_id": 1})],  # missing fields
    [P.HEADER, msgspec.msgpack.encode({"type": "Shutdown", "msg_id": 1})],  # unknown tag
    [P.HEADER, msgspec.msgpack.encode({"type": "Allocate", "msg_id": "1", "transfer_id": "t", "num_pages": 1,
                                       "num_tokens": 1, "prompt_digest": "d", "wait_s": 1.0})],  # wrong type
    [P.HEADER, b"\x00" * (P.MAX_BODY_BYTES + 1)],           # oversized
])
def test_garbage_is_a_protocol_error(frames):
    with pytest.raises(ProtocolError):
        P.decode(frames)


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
