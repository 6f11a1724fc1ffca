"""Wire protocol of the control plane and the kv_transfer_params contract (L1; no torch, no zmq).

Every control-plane message is two zmq frames:
  frame 0: fixed header ``b"LMPD" + u16 protocol version`` (checked before anything is decoded),
  frame 1: msgpack body, one struct of the tagged union :data:`Message`.
The handshake is two-phase: the decode side compares ``compat_hash`` first and decodes the
opaque ``payload`` (the transport descriptor) only when it matches.

PROTOCOL_VERSION history:
  1: first version (handshake, allocate, transfer done, cancel, heartbeat, ack, error).
  2: Landed (one-way): the first pages of a reservation hold their bytes, so the decode side
     may scatter them while the rest is still in flight (streamed hand-off).
  3: decode-side reuse: Allocate carries the prompt's chunk chain hashes and tenant;
     Allocated says how many leading pages the decode side holds in its own cache tiers
     (``skip_pages``): its pages cover only the rest, and only the rest is sent.
"""

from __future__ import annotations

import enum
import hashlib
import struct

import msgspec

from lmcache_pd.errors import ProtocolError

PROTOCOL_VERSION = 3
MAGIC = b"LMPD"
_HEADER = struct.Struct("!4sH")
HEADER = _HEADER.pack(MAGIC, PROTOCOL_VERSION)
MAX_BODY_BYTES = 1 << 20
"""Larger bodies are refused unread: no legitimate control message comes close."""


class CompatInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What must match for a byte copy of KV pages to be correct (see vllm_connector.md s7)."""

    model: str
    dtype: str
    kv_layout: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_size: int
    page_bytes: int
    tp_size: int
    tp_rank: int
    transport: str
    attn_backend: str
    vllm_version: str

    def digest(self) -> str:
        return hashlib.sha256(msgspec.msgpack.encode(msgspec.to_builtins(self))).hexdigest()[:32]

    def differing(self, other: CompatInfo) -> tuple[str, ...]:
        return tuple(f for f in self.__struct_fields__ if getattr(self, f) != getattr(other, f))


class ErrorCode(enum.IntEnum):
    MALFORMED = 1
    VERSION = 2
    INCOMPATIBLE = 3
    NOT_HANDSHAKEN = 4
    STALE_INCARNATION = 5
    POOL_TOO_SMALL = 6
    POOL_TIMEOUT = 7
    UNKNOWN_TRANSFER = 8
    BAD_STATE = 9
    DUPLICATE = 10
    INTERNAL = 11


class _Msg(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    msg_id: int


class Handshake(_Msg):
    peer: str
    incarnation: str
    compat_hash: str
    compat: CompatInfo
    payload: bytes
    """The prefill side's transport descriptor; opaque here, decoded only after the hash matched."""


class HandshakeReply(_Msg):
    incarnation: str
    page_bytes: int
    num_pages: int
    payload: bytes
    """The decode side's transport descriptor (its pool region)."""


class Allocate(_Msg):
    transfer_id: str
    num_pages: int
    num_tokens: int
    prompt_digest: str
    wait_s: float
    """How long the decode side may queue this request for free pages (the sender's deadline)."""
    chains: list[bytes] = []
    """Chain hashes of the prompt's full chunks (``cache.chunk_tokens`` each; cache/keys.py),
    empty when the prefix cache is off. The decode side only uses them to look into its own
    tiers: what it loads from them is keyed by the chains of its own copy of the prompt."""
    tenant: str | None = None
    """The request's cache namespace (vLLM's ``cache_salt``)."""


class Allocated(_Msg):
    transfer_id: str
    pages: list[int]
    """One page per block of the prompt after the skipped ones, in block order."""
    lease_s: float
    skip_pages: int = 0
    """Leading blocks of the prompt the decode side holds already (whole chunks): not sent."""


class TransferDone(_Msg):
    transfer_id: str
    num_bytes: int
    seconds: float


class Landed(_Msg):
    """One-way (no reply): pages ``[0, pages)`` of the reservation, in the order of its
    Allocated reply, hold their final bytes. Only ever grows; TransferDone still ends the write."""

    transfer_id: str
    pages: int


class Cancel(_Msg):
    transfer_id: str
    reason: str


class Heartbeat(_Msg):
    transfer_ids: list[str]


class Ack(_Msg):
    incarnation: str


class Error(_Msg):
    code: ErrorCode
    message: str
    fields: list[str] = []


Message = (Handshake | HandshakeReply | Allocate | Allocated | TransferDone | Landed | Cancel | Heartbeat | Ack
           | Error)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> list[bytes]:
    return [HEADER, _encoder.encode(msg)]


def decode(frames: list[bytes]) -> Message:
    """Check the header, then decode the body. Raises ProtocolError on anything else."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    header, body = frames
    version = peek_version(header)
    if version is None:
        raise ProtocolError("bad header: not an lmcache-pd peer")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is not ours ({PROTOCOL_VERSION}): "
                            "run the same lmcache-pd release on prefill and decode")
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"malformed message: {e}") from None


def peek_version(header: bytes) -> int | None:
    """Version in a header, or None if it is not one of ours (for error replies)."""
    if len(header) != _HEADER.size:
        return None
    magic, version = _HEADER.unpack(header)
    return version if magic == MAGIC else None


# --- kv_transfer_params: what travels client -> proxy -> P -> proxy -> D --------------------
# The key names do_remote_decode / do_remote_prefill are vLLM's own convention: vLLM's serving
# layer reads them (vllm_connector.md s5.6), so we keep them.


class PrefillParams(msgspec.Struct, frozen=True, kw_only=True):
    """What the proxy puts into the prefill request."""

    do_remote_decode: bool = True
    do_remote_prefill: bool = False
    transfer_id: str
    decode_peer: str
    """Name of the decode instance (resolved in the prefill's own config, never an address)."""


class DecodeParams(msgspec.Struct, frozen=True, kw_only=True):
    """What the prefill returns (request_finished) and the proxy forwards to the decode."""

    do_remote_prefill: bool = True
    do_remote_decode: bool = False
    transfer_id: str
    num_tokens: int
    prompt_digest: str
    prefill_peer: str


def params_from_dict(data: object, kind: type[PrefillParams] | type[DecodeParams]):
    """Typed view of a request's kv_transfer_params, or None if it is not ours / malformed."""
    if not isinstance(data, dict):
        return None
    fields = {k: data[k] for k in kind.__struct_fields__ if k in data}
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError:
        return None


def prompt_digest(token_ids: list[int] | tuple[int, ...]) -> str:
    """sha256 of the prompt's token ids: D checks that P computed KV for the same prompt."""
    h = hashlib.sha256()
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.hexdigest()[:32]
