"""Wire protocol of the control plane and the kv_transfer_params contract (L1; no torch, no zmq).

Every control-plane message is three zmq frames:
  frame 0: fixed header ``b"LMPD" + u16 protocol version``,
  frame 1: msgpack body, one struct of the tagged union :data:`Message`,
  frame 2: ``key class:u8, seq:u64`` and an HMAC-SHA256 tag over the header, those 9 bytes and
           the body (auth.py). Class 0 is the deployment's control key (the messages that open a
           session: Hello, Challenge, Handshake, and errors to them); class 1 the session's key,
           with a sequence number that grows by one per frame in each direction.
A receiver checks sizes, then the tag, then the sequence number, and decodes the body only after
all of them pass: a frame that fails any is dropped and counted, and changes no state.
A session opens in two round trips: Hello(nonce) -> Challenge(cookie) -> Handshake(nonce,
cookie) -> HandshakeReply, the reply already tagged with the session's keys (derived from the
nonce and the cookie). The decode side compares ``compat_hash`` (and recomputes it from
``compat``) before it grants a session; only then does the prefill side get the decode's
transport descriptor (opaque bytes, decoded by the transport).

PROTOCOL_VERSION history:
  1: first version (handshake, allocate, transfer done, cancel, heartbeat, ack, error).
  2: Landed (one-way): the first pages of a reservation hold their bytes, so the decode side
     may scatter them while the rest is still in flight (streamed hand-off).
  3: decode-side reuse: Allocate carries the prompt's chunk chain hashes and tenant;
     Allocated says how many leading pages the decode side holds in its own cache tiers
     (``skip_pages``): its pages cover only the rest, and only the rest is sent.
  4: authenticated frames (third frame: key class, sequence number, HMAC tag); Hello and
     Challenge open a session; Handshake carries the nonce and the cookie; errors to
     unauthenticated frames are no longer sent (they are dropped and counted).
  5: write admission: HandshakeReply gives the session a ``data_token`` (its data connections
     name it, so the decode side knows whose batch it reads); Allocated names the
     reservation's ``generation`` (every data batch names its hand-off by transfer id and
     generation); Ended (one-way, decode -> prefill): the decode side ended a hand-off the
     prefill was still writing, so the prefill stops, and confirms with a Cancel;
     TransferDone may carry a ``digest`` of the hand-off's bytes (``integrity.verify``).
  6: Handshake no longer carries a transport descriptor of the prefill side (no transport
     needed one); HandshakeReply's is named ``descriptor``.
  7: Landed may name whole ``layers`` instead of leading ``pages``: those layers hold their
     final bytes in every page of the reservation (a layered hand-off over a transport whose
     receiver does not see batches land: cuda_ipc, nixl), so the decode side scatters them
     while the prefill's forward computes the next ones. Direct hand-offs (``transport.direct``):
     HandshakeReply may carry ``blocks`` (the decode's vLLM KV cache: a second transport
     descriptor and its geometry), Allocate says whether the prefill can write there
     (``direct``), and Allocated may name the decode's vLLM ``blocks`` for its last pages: the
     prefill writes those straight into them, and the decode has nothing to scatter.
  8: prefill and decode of different TP sizes (issue 20, heads.py): CompatInfo carries the
     model's KV head count (``model_kv_heads``); ``compat_hash`` covers only what every rank of
     both instances shares (``CompatInfo.shared``), and the decode side checks the per-rank
     fields (``PER_RANK``) itself: the head mapping between the two TP sizes must work, and the prefill's rank
     must be one that sends heads to this decode rank (``heads.senders_of``). A reservation of a
     decode rank that merges heads from several prefill ranks is written by each of them: every
     one Allocates the same transfer id (the later ones join the first's pages) and sends its own
     TransferDone.
  9: a direct hand-off takes no pool page: Allocated's ``pages`` for it are places past the
     pool (``num_pages + i``), which name where each block stands (the digest's places) and
     are never written.
  10: the writers of a reservation that several prefill ranks share (a narrower decode) write
     their heads into sections of its pages (``heads.page_sections``: per run of consecutive
     pages, one writer's heads of every page after the other's), no longer into each page's
     head slots; the decode scatters from there. No message changed: what the bytes mean did.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from typing import Annotated, NamedTuple

import msgspec

from lmcache_pd import auth
from lmcache_pd.errors import ProtocolError

PROTOCOL_VERSION = 10
MAGIC = b"LMPD"
_HEADER = struct.Struct("!4sH")
HEADER = _HEADER.pack(MAGIC, PROTOCOL_VERSION)
_AUTH = struct.Struct("!BQ")
AUTH_BYTES = _AUTH.size + auth.TAG_BYTES
KEY_DEPLOYMENT = 0
"""Frames that open a session (and errors to them): tagged with the deployment's control key."""
KEY_SESSION = 1
"""Every other frame: tagged with the session's key, sequence numbers from 1."""
MAX_BODY_BYTES = 1 << 20
"""Larger bodies are refused unread: no legitimate control message comes close."""


Name = Annotated[str, msgspec.Meta(max_length=256)]
"""Ids and names on the wire (transfer ids, peers, incarnations, digests): bounded, so that no
peer makes this side keep megabytes per entry (tombstones, sessions)."""
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Blob = Annotated[bytes, msgspec.Meta(max_length=64)]
"""Nonces, cookies, tokens, chain hashes."""


class CompatInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What must match for a byte copy of KV pages to be correct: whole pages copy safely only
    between the same attention backend (and, on CPU, instruction set: its page format differs),
    dtype, block size and layout. The per-rank fields (:data:`PER_RANK`: the rank's own heads and
    page size, its TP size and rank) may differ between prefill and decode as long as the head
    mapping between the two TP sizes works (heads.py): the decode side checks that itself."""

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
    model_kv_heads: int = 0
    """The model's KV heads (all ranks); 0: not known, ``num_kv_heads * tp_size``."""

    @property
    def total_kv_heads(self) -> int:
        return self.model_kv_heads or self.num_kv_heads * self.tp_size

    def shared(self) -> CompatInfo:
        """What every rank of both instances must agree on: the per-rank fields cleared."""
        return msgspec.structs.replace(self, **{f: 0 for f in PER_RANK})

    def digest(self) -> str:
        """Hash of :meth:`shared`: equal between ranks of any TP size of one model and setup."""
        return hashlib.sha256(msgspec.msgpack.encode(msgspec.to_builtins(self.shared()))).hexdigest()[:32]

    def differing(self, other: CompatInfo) -> tuple[str, ...]:
        """The shared fields that differ (the per-rank ones are the decode side's own check)."""
        return tuple(f for f in self.__struct_fields__
                     if f not in PER_RANK and getattr(self, f) != getattr(other, f))


PER_RANK = ("num_kv_heads", "page_bytes", "tp_size", "tp_rank", "model_kv_heads")
"""CompatInfo's fields that differ between ranks or TP sizes, or may be unknown on one side
(``model_kv_heads``): the decode side checks them itself (control/ranks.py)."""


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


class Hello(_Msg):
    """Asks for a cookie (the decode side keeps no state for it)."""

    peer: Name
    incarnation: Name
    nonce: Blob


class Challenge(_Msg):
    nonce: Blob
    """The Hello's nonce, echoed: the prefill side takes only an answer to its own Hello."""
    cookie: Blob


class Handshake(_Msg):
    peer: Name
    incarnation: Name
    compat_hash: Name
    compat: CompatInfo
    nonce: Blob
    """The Hello's nonce and the Challenge's cookie: the cookie is redeemed once, so a recorded
    Handshake cannot open a session again; both also seed the session's keys."""
    cookie: Blob


class BlocksRegion(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The decode's vLLM KV cache as a prefill may write into it (a direct hand-off): its
    transport descriptor and its geometry (layout.KVLayout's fields)."""

    descriptor: bytes
    num_blocks: int
    block_bytes: int
    block_stride: int
    layer_offsets: Annotated[list[int], msgspec.Meta(max_length=1 << 12)]
    extents: Annotated[list[tuple[int, int]], msgspec.Meta(max_length=1 << 12)] = []


class HandshakeReply(_Msg):
    incarnation: Name
    page_bytes: int
    num_pages: int
    descriptor: bytes
    """The decode side's transport descriptor (its pool region; opaque here, decoded by the
    transport)."""
    data_token: Blob = b""
    """Names this session on the data plane: the prefill's transport connections present it,
    and the decode side admits their batches only into this session's reservations."""
    blocks: BlocksRegion | None = None
    """With ``transport.direct``: the decode's vLLM KV cache, for direct hand-offs."""


class Allocate(_Msg):
    transfer_id: Name
    num_pages: int
    num_tokens: int
    prompt_digest: Name
    wait_s: float
    """How long the decode side may queue this request for free pages (the sender's deadline)."""
    chains: Annotated[list[Blob], msgspec.Meta(max_length=1 << 16)] = []
    """Chain hashes of the prompt's full chunks (``cache.chunk_tokens`` each; cache/keys.py),
    empty when the prefix cache is off. The decode side only uses them to look into its own
    tiers: what it loads from them is keyed by the chains of its own copy of the prompt."""
    tenant: Name | None = None
    """The request's cache namespace (vLLM's ``cache_salt``)."""
    signals: bool = False
    """The sender's last data batch ends with the reservation's landing signal (transport
    ``capabilities.signals``, transport/landing.py): the decode may end the load on it, before
    TransferDone."""
    direct: bool = False
    """The sender can write into the decode's vLLM blocks (it connected to HandshakeReply's
    ``blocks``): the decode may name them in Allocated."""
    decode_sent: bool = False
    """With ``direct``: the proxy sent the decode's request together with the prefill's, so the
    decode side may hold this Allocate briefly (``timeouts.direct_wait_s``) for its blocks."""


class Allocated(_Msg):
    transfer_id: Name
    pages: list[int]
    """One page per block of the prompt after the skipped ones, in block order (a direct
    hand-off's: places past the pool, ``num_pages + i``, never written; version 9)."""
    lease_s: float
    skip_pages: int = 0
    """Leading blocks of the prompt the decode side holds already (whole chunks): not sent."""
    generation: int = 0
    """The reservation's number, new for every reservation of this pool: each data batch names
    it with the transfer id, so a batch of an ended hand-off is never admitted into pages that
    went to another."""
    blocks: Annotated[list[int], msgspec.Meta(max_length=1 << 20)] = []
    """A direct hand-off (Allocate.direct): the decode's vLLM blocks for the last
    ``len(blocks)`` pages, in order. The prefill writes those pages' blocks there instead of
    into the pool, and sends none of the pages before them (the decode holds their blocks)."""


class TransferDone(_Msg):
    transfer_id: Name
    num_bytes: int
    seconds: float
    digest: int | None = None
    """With ``integrity.verify``: digests.cache_digest of the bytes sent (between TP sizes,
    digests.plan_sum of them, a signed 64-bit value), checked by the decode."""


class Landed(_Msg):
    """One-way (no reply): part of the reservation holds its final bytes; TransferDone still
    ends the write. Either ``pages``: pages ``[0, pages)``, in the order of its Allocated reply,
    every layer (a streamed hand-off; only ever grows), or ``layers``: those layers, in every
    page (a layered hand-off whose receiver does not see batches land)."""

    transfer_id: Name
    pages: int = 0
    layers: Annotated[list[int], msgspec.Meta(max_length=1 << 12)] = []


class Cancel(_Msg):
    transfer_id: Name
    reason: Text


class Ended(_Msg):
    """One-way (decode -> prefill, no reply): the decode side ended this hand-off while the
    prefill was still writing it (the request was aborted, a deadline or the lease passed).
    The prefill stops writing and answers with a Cancel: its pages may then be reused."""

    transfer_id: Name
    generation: int
    reason: Text


class Heartbeat(_Msg):
    transfer_ids: Annotated[list[Name], msgspec.Meta(max_length=1 << 16)]


class Ack(_Msg):
    incarnation: Name


class Error(_Msg):
    code: ErrorCode
    message: Text
    fields: Annotated[list[Name], msgspec.Meta(max_length=64)] = []


Message = (Hello | Challenge | Handshake | HandshakeReply | Allocate | Allocated | TransferDone | Landed | Cancel
           | Ended | Heartbeat | Ack | Error)

# Which message may come under which key, in which direction: anything else is refused.
TO_DECODE = {KEY_DEPLOYMENT: (Hello, Handshake), KEY_SESSION: (Allocate, TransferDone, Landed, Cancel, Heartbeat)}
TO_PREFILL = {KEY_DEPLOYMENT: (Challenge, Error), KEY_SESSION: (HandshakeReply, Allocated, Ended, Ack, Error)}

def ticket(transfer_id: str, generation: int) -> bytes:
    """What a data batch names its hand-off by (opaque to transports, checked by the pool)."""
    return _encoder.encode((transfer_id, generation))


def read_ticket(raw: bytes) -> tuple[str, int]:
    """The (transfer id, generation) a data batch names; raises ProtocolError if it names none."""
    try:
        tid, generation = msgspec.msgpack.decode(raw, type=tuple[Name, int])
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        raise ProtocolError(f"a data batch without a readable ticket: {e}") from None
    return tid, generation


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class Frame(NamedTuple):
    """A received message, split but not yet trusted: check :func:`verified` before decoding."""

    version: int
    key_class: int
    seq: int
    header: bytes
    body: bytes
    tag: bytes


def seal(msg: Message, key: bytes, *, key_class: int, seq: int) -> list[bytes]:
    body = _encoder.encode(msg)
    head = _AUTH.pack(key_class, seq)
    return [HEADER, body, head + auth.tag(key, HEADER, head, body)]


def split(frames: list[bytes]) -> Frame:
    """Check the frame count, header and sizes. Raises ProtocolError; reads nothing of the body.
    The tag layout does not depend on the version, so a peer of another release is told so only
    if its frame is authentic."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}"
                            + (" (a peer of protocol version <= 3?)" if len(frames) == 2 else ""))
    header, body, tail = frames
    version = peek_version(header)
    if version is None:
        raise ProtocolError("bad header: not an lmcache-pd peer")
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    if len(tail) != AUTH_BYTES:
        raise ProtocolError(f"auth frame of {len(tail)} bytes, not {AUTH_BYTES}")
    key_class, seq = _AUTH.unpack_from(tail)
    if key_class not in (KEY_DEPLOYMENT, KEY_SESSION):
        raise ProtocolError(f"unknown key class {key_class}")
    return Frame(version, key_class, seq, bytes(header), bytes(body), bytes(tail[_AUTH.size:]))


def verified(frame: Frame, key: bytes) -> bool:
    """The tag covers the header, the key class and sequence number the frame claims, and the body."""
    return auth.check(key, frame.tag, frame.header, _AUTH.pack(frame.key_class, frame.seq), frame.body)


def refusal(frame: Frame, *, deployment_key: bytes, session_key: bytes | None, last_seq: int) -> str | None:
    """Why a received frame must be dropped, or None: ``"unauthenticated"`` when its tag does not
    verify (a session frame with no session counts so), ``"stale"`` when a session frame's
    sequence number is not above ``last_seq``. Both ends apply this before decoding anything."""
    if frame.key_class == KEY_SESSION:
        if session_key is None or not verified(frame, session_key):
            return "unauthenticated"
        return "stale" if frame.seq <= last_seq else None
    return None if verified(frame, deployment_key) else "unauthenticated"


def decode_body(frame: Frame, allowed: dict[int, tuple[type, ...]]) -> Message:
    """Decode a verified frame's body; only the types ``allowed`` under its key class pass."""
    if frame.version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {frame.version} is not ours ({PROTOCOL_VERSION}): "
                            "run the same lmcache-pd release on prefill and decode")
    try:
        msg = _decoder.decode(frame.body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"malformed message: {e}") from None
    if not isinstance(msg, allowed[frame.key_class]):
        raise ProtocolError(f"{type(msg).__name__} is not accepted under key class {frame.key_class}")
    return msg


def decode_unverified(frames: list[bytes]) -> Message:
    """Decode the body of a frame triple without checking its tag: for tests and tools only."""
    frame = split(frames)
    return decode_body(frame, {frame.key_class: (_Msg,)})


def peek_version(header: bytes) -> int | None:
    """Version in a header, or None if it is not one of ours (for error replies)."""
    if len(header) != _HEADER.size:
        return None
    magic, version = _HEADER.unpack(header)
    return version if magic == MAGIC else None


# --- kv_transfer_params: what travels client -> proxy -> P -> proxy -> D --------------------
# The key names do_remote_decode / do_remote_prefill are vLLM's own convention: vLLM's serving
# layer reads them (the scheduler's remote_prefill_cached_tokens, a decode request rejected
# before the engine still reaching the connector's request_finished), so we keep them.


class PrefillParams(msgspec.Struct, frozen=True, kw_only=True):
    """What the proxy puts into the prefill request."""

    do_remote_decode: bool = True
    do_remote_prefill: bool = False
    transfer_id: Name
    decode_peer: Name
    """Name of the decode instance (resolved in the prefill's own config, never an address)."""
    decode_sent: bool = False
    """The proxy sent the decode's request together with this one (``dispatch: concurrent``)."""


class DecodeParams(msgspec.Struct, frozen=True, kw_only=True):
    """What the prefill returns (request_finished) and the proxy forwards to the decode.

    With ``proxy.dispatch=concurrent`` the proxy sends the decode request before the prefill
    has answered: ``num_tokens`` is then 0 and ``prompt_digest`` empty (not known yet), and the
    decode's loader alone checks its prompt against the one the prefill reserved pages for.
    The decode's prompt may be longer than ``num_tokens`` (``proxy.first_token=prefill``: the
    proxy appends the prefill's sampled token); its first ``num_tokens`` must match the digest."""

    do_remote_prefill: bool = True
    do_remote_decode: bool = False
    transfer_id: Name
    num_tokens: int
    prompt_digest: Name
    prefill_peer: Name

    @property
    def early(self) -> bool:
        """Sent before the prefill answered (its prompt not known to the proxy)."""
        return self.num_tokens == 0


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
