"""Decode-side reuse: a decode worker's own tiers supply the leading chunks of a prompt, and the
prefill side sends only the rest (real sender and receiver, real zmq, TCP transport, or CUDA IPC
on a GPU machine; a real CacheIO with a memory tier on the decode side)."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import torch
import zmq

from lmcache_pd import auth
from lmcache_pd import protocol as P
from lmcache_pd.cache.keys import ChunkKey, chain_hashes
from lmcache_pd.handoff import CacheSaveSpec, Handoff, LoadSpec, SendSpec
from lmcache_pd.node.cache_io import CacheIO
from lmcache_pd.node.receiver import KVReceiver
from lmcache_pd.node.sender import KVSender
from lmcache_pd.node.worker import NodeConfig, Worker
from lmcache_pd.ops import kv_layout_of
from tests.unit.kv import vllm_like_cache
from tests.unit.nodes import BLOCK, CPT, HEADS, LAYERS, PAGE, C, make_cfg

CHUNK = 2 * BLOCK  # two blocks per chunk
DIGEST = "d" * 32


def tokens(n: int, seed: int = 0) -> list[int]:
    return [(i * 7 + seed) % 1000 for i in range(n)]


def chains(toks: list[int]) -> tuple[bytes, ...]:
    return tuple(chain_hashes(toks, CHUNK, max_chunks=len(toks) // CHUNK))


class Pair:
    """A prefill sender and a decode receiver whose worker has a prefix cache (memory tier)."""

    def __init__(self, transport: str = "tcp", *, decode_skip: bool = True):
        self.cfg = make_cfg(transport, pool_mib=2, cache={"enabled": True, "chunk_tokens": CHUNK,
                                                          "decode_skip": decode_skip, "hold_s": 30})
        device = "cuda" if transport == "cuda_ipc" else "cpu"
        self.p_layers = vllm_like_cache(LAYERS, 40, HEADS, BLOCK, C, torch.bfloat16, "LBHNC", device)
        self.d_layers = vllm_like_cache(LAYERS, 48, HEADS, BLOCK, C, torch.bfloat16, "LBHNC", device)
        p_kv, p_buf = kv_layout_of(self.p_layers)
        d_kv, d_buf = kv_layout_of(self.d_layers)
        self.io = CacheIO(self.cfg.cache, instance="decode-0", rank=0, compat=msgspec.structs.asdict(CPT), kv=d_kv,
                          kv_buffer=d_buf, block_size=BLOCK)
        self.io.start()
        self.receiver = KVReceiver(Worker("decode-0", 0, CPT), NodeConfig.of(self.cfg), kv=d_kv, kv_buffer=d_buf,
                                   cache=self.io)
        self.receiver.start()
        self.sender = KVSender(Worker("prefill-0", 0, CPT), NodeConfig.of(self.cfg), kv=p_kv, kv_buffer=p_buf)
        self.sender.start()

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()
        self.io.close()

    def handoff(self, tid: str, toks: list[int], p_blocks: list[int], d_blocks: list[int], *,
                sent_chains: tuple[bytes, ...] | None = None, own_chains: tuple[bytes, ...] | None = None):
        n = len(toks)
        self.sender.submit(SendSpec(f"p-{tid}", Handoff(tid, "decode-0", n, DIGEST, chains(toks) if sent_chains is None else sent_chains), tuple(p_blocks)))
        self.receiver.submit_load(LoadSpec(f"d-{tid}", Handoff(tid, "prefill-0", n, DIGEST, chains(toks) if own_chains is None else own_chains), tuple(d_blocks)))
        sends, loads = [], []
        deadline = time.monotonic() + 15
        while not sends or not loads:
            assert time.monotonic() < deadline, "hand-off did not end"
            sends += self.sender.drain()
            loads += self.receiver.drain()
            time.sleep(0.005)
        return sends[0], loads[0]

    def save(self, req_id: str, toks: list[int], d_blocks: list[int]) -> None:
        """What the decode worker does when the request ends: its prompt chunks into its tiers."""
        k = len(toks) // CHUNK
        self.io.submit_save(CacheSaveSpec(req_id, chains(toks)[:k], None, tuple(d_blocks[:2 * k])), None)
        deadline = time.monotonic() + 10
        while not (done := self.io.drain()):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert done[0].ok, done[0].error
        assert self.io.cache.flush(10)

    def block(self, layers, b: int) -> list[bytes]:
        return [t[b].view(torch.uint8).cpu().numpy().tobytes() for t in layers]

    def pool_full(self) -> bool:
        deadline = time.monotonic() + 2
        while self.receiver.pool.free_pages != self.receiver.pool.num_pages:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def fill(layers, blocks: list[int], byte: int) -> None:
    for t in layers:
        for b in blocks:
            t[b].view(torch.uint8).fill_(byte)  # (t[list] would fill a copy)


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


@pytest.fixture(params=["tcp", "cuda_ipc"])
def any_pair(request):
    from lmcache_pd import transport as transports

    ok, why = transports.available(request.param)
    if not ok:
        pytest.skip(f"transport {request.param!r} unavailable here: {why}")
    p = Pair(request.param)
    yield p
    p.close()


def first_turn(pair: Pair) -> tuple[list[int], list[int]]:
    """Turn 1: 69 tokens (5 blocks, 2 full chunks), nothing cached yet; the decode saves them."""
    t1 = tokens(4 * BLOCK + 5)
    s, ld = pair.handoff("t1", t1, [1, 2, 3, 4, 5], [10, 11, 12, 13, 14])
    assert s.ok and ld.ok and s.skipped_pages == 0 and s.num_bytes == 5 * PAGE and ld.cache_tokens == 0
    pair.save("d-t1", t1, [10, 11, 12, 13, 14])
    return t1, [10, 11, 12, 13]


@pytest.mark.parametrize("local", [0, 1, 3])
def test_held_chunks_are_not_sent_and_arrive_from_the_decode_tiers(any_pair, local):
    pair = any_pair
    t1, held_blocks = first_turn(pair)
    turn1 = [pair.block(pair.d_layers, b) for b in held_blocks]
    # Turn 2 re-sends the history: 8 blocks + 3 tokens. The prefill's copy of the first four
    # blocks is poisoned: if they were sent, the decode would receive the poison.
    t2 = t1[:4 * BLOCK] + tokens(4 * BLOCK + 3, seed=5)
    p_blocks, d_all = [20, 21, 22, 23, 24, 25, 26, 27, 28], [30, 31, 32, 33, 34, 35, 36, 37, 38]
    fill(pair.p_layers, p_blocks[:4], 0xAB)
    # vLLM's own prefix cache on the decode holds the first `local` blocks: they are not loaded.
    fill(pair.d_layers, d_all, 0xEE)
    s, ld = pair.handoff("t2", t2, p_blocks, d_all[local:])
    assert s.ok and ld.ok, (s.error, ld.error)
    assert s.skipped_pages == 4 and s.num_bytes == ld.num_bytes == 5 * PAGE  # 9 blocks, 4 held
    assert ld.cache_tokens == (4 - local) * BLOCK
    for i in range(local):  # untouched: vLLM holds them
        assert set(pair.block(pair.d_layers, d_all[i])[0]) == {0xEE}
    for i in range(local, 4):  # from the decode's tiers: turn 1's bytes, not the poison
        assert pair.block(pair.d_layers, d_all[i]) == turn1[i]
    for i in range(4, 9):
        assert pair.block(pair.d_layers, d_all[i]) == pair.block(pair.p_layers, p_blocks[i])
    assert pair.pool_full() and pair.io.cache.holds.owners() == 0


def test_vllm_holding_more_than_the_cache_loads_nothing_from_it(pair):
    t1, _ = first_turn(pair)
    t2 = t1[:4 * BLOCK] + tokens(4 * BLOCK + 3, seed=5)
    p_blocks, d_all = [20, 21, 22, 23, 24, 25, 26, 27, 28], [30, 31, 32, 33, 34, 35, 36, 37, 38]
    s, ld = pair.handoff("t2", t2, p_blocks, d_all[6:])  # vLLM holds 6 blocks, the tiers 4
    assert s.ok and ld.ok and s.skipped_pages == 4 and ld.cache_tokens == 0
    for i in range(6, 9):
        assert pair.block(pair.d_layers, d_all[i]) == pair.block(pair.p_layers, p_blocks[i])
    assert pair.pool_full() and pair.io.cache.holds.owners() == 0


def test_the_last_page_is_always_sent(pair):
    t1, _ = first_turn(pair)
    t2 = t1[:4 * BLOCK]  # exactly the two cached chunks: 4 blocks
    s, ld = pair.handoff("t2", t2, [20, 21, 22, 23], [30, 31, 32, 33])
    assert s.ok and ld.ok and s.skipped_pages == 2 and s.num_bytes == 2 * PAGE
    assert ld.cache_tokens == 2 * BLOCK
    assert pair.pool_full()


def test_a_prefill_naming_other_chunks_makes_the_decode_recompute(pair):
    """The prefill side's chains name chunks the decode holds, but the decode's own prompt
    differs there: it loads by its own chains, misses, and vLLM recomputes. Nothing wrong is
    ever loaded, and the pages and holds come back."""
    t1, _ = first_turn(pair)
    other = tokens(4 * BLOCK + 3, seed=9)
    s, ld = pair.handoff("t2", other, [20, 21, 22, 23, 24], [30, 31, 32, 33, 34], sent_chains=chains(t1))
    assert not ld.ok and "decode cache: chunk 0 of 2 is in no tier" in ld.error
    assert not s.ok  # the decode refused the rest of the hand-off as soon as the chunks missed
    assert pair.pool_full() and pair.io.cache.holds.owners() == 0


def test_more_chains_than_the_prompt_has_are_ignored(pair):
    t1, _ = first_turn(pair)
    t2 = t1[:2 * BLOCK + 1]  # 3 blocks, 1 full chunk; the prefill claims two
    s, ld = pair.handoff("t2", t2, [20, 21, 22], [30, 31, 32], sent_chains=chains(t1))
    assert s.ok and ld.ok and s.skipped_pages == 0 and s.num_bytes == 3 * PAGE


def test_decode_skip_off_sends_everything():
    pair = Pair(decode_skip=False)
    try:
        t1, _ = first_turn(pair)
        s, ld = pair.handoff("t2", t1, [20, 21, 22, 23, 24], [30, 31, 32, 33, 34])
        assert s.ok and ld.ok and s.skipped_pages == 0 and s.num_bytes == 5 * PAGE
    finally:
        pair.close()


def test_the_hold_keeps_chunks_from_eviction_until_released(pair):
    t1, _ = first_turn(pair)
    memory = pair.io.cache.tiers[0]
    held = set(memory._index.keys())
    assert pair.receiver.prefix.hold(P.Allocate(msg_id=1, transfer_id="tx", num_pages=5, num_tokens=69, prompt_digest="d",
                                         wait_s=1, chains=list(chains(t1)))) == 4
    memory._index.capacity = memory._index.bytes  # full: a new chunk has to evict one
    other = ChunkKey(held.pop().tenant, b"\1" * 32)
    held = set(memory._index.keys())
    assert not memory.put(other, b"x" * 16) and set(memory._index.keys()) == held
    pair.receiver.prefix.release("tx")
    assert pair.io.cache.holds.owners() == 0
    assert memory.put(other, b"x" * 16) and other in set(memory._index.keys())


class FakeDecode:
    """A decode control plane that answers Allocate with a crafted reply, and records Cancels."""

    def __init__(self, endpoint: str, reply: dict, descriptor: bytes):
        self.reply = reply
        self.descriptor = descriptor
        self.cancels: list[str] = []
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.bind(endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        keys, session, seq = auth.Keyring(None), None, 0  # the sender under test has no secret
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            identity, *frames = self._sock.recv_multipart()
            msg = P.decode_unverified(frames)
            if isinstance(msg, P.Hello):
                self._sock.send_multipart([identity, *P.seal(P.Challenge(msg_id=msg.msg_id, nonce=msg.nonce,
                                                                         cookie=b"c" * 16), keys.control.to_prefill,
                                                             key_class=P.KEY_DEPLOYMENT, seq=0)])
                continue
            if isinstance(msg, P.Handshake):
                session = keys.session(identity, msg.nonce, msg.cookie)
                out = P.HandshakeReply(msg_id=msg.msg_id, incarnation="x", page_bytes=PAGE, num_pages=16,
                                       descriptor=self.descriptor)
            elif isinstance(msg, P.Allocate):
                out = P.Allocated(msg_id=msg.msg_id, transfer_id=msg.transfer_id, lease_s=5, **self.reply)
            else:
                if isinstance(msg, P.Cancel):
                    self.cancels.append(msg.transfer_id)
                out = P.Ack(msg_id=msg.msg_id, incarnation="x")
            seq += 1
            self._sock.send_multipart([identity, *P.seal(out, session.to_prefill, key_class=P.KEY_SESSION, seq=seq)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close(linger=0)
        self._ctx.term()


@pytest.mark.parametrize("reply", [
    {"pages": [0, 1, 2], "skip_pages": 1},  # not a whole chunk
    {"pages": [0], "skip_pages": 4},  # more than the chains name
    {"pages": [0, 1, 2, 3, 4], "skip_pages": 2},  # pages + skipped != blocks
    {"pages": [], "skip_pages": 5},  # skips everything
    {"pages": [0, 1, 2], "skip_pages": -2},
])
def test_a_bad_allocated_reply_fails_the_handoff_and_gives_the_pages_back(reply):
    """The sender trusts no count from the decode side: a reply that does not add up ends the
    hand-off (the decode side recomputes) and its pages are cancelled at once."""
    from lmcache_pd import transport as transports

    cfg = make_cfg("tcp", cache={"enabled": True, "chunk_tokens": CHUNK})
    rx = transports.create("tcp", {}, host="127.0.0.1", port=cfg.decode[0].data_port)
    region = rx.register(rx.allocate(16 * PAGE, torch.device("cpu")))
    rx.listen()
    fake = FakeDecode(f"tcp://127.0.0.1:{cfg.decode[0].control_port}", reply, rx.export_descriptor(region))
    layers = vllm_like_cache(LAYERS, 8, HEADS, BLOCK, C, torch.bfloat16, "LBHNC")
    kv, buf = kv_layout_of(layers)
    sender = KVSender(Worker("prefill-0", 0, CPT), NodeConfig.of(cfg), kv=kv, kv_buffer=buf)
    sender.start()
    try:
        toks = tokens(4 * BLOCK + 5)  # 5 blocks, 2 chunks named
        sender.submit(SendSpec("p", Handoff("t", "decode-0", len(toks), DIGEST, chains(toks)[:1]), (1, 2, 3, 4, 5)))
        deadline = time.monotonic() + 10
        while not (out := sender.drain()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not out[0].ok and "bad pages" in out[0].error
        assert fake.cancels == ["t"]
    finally:
        sender.close()
        fake.close()
        rx.close()
