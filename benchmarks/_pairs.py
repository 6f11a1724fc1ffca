"""What the benchmarks time: a transport alone, or a whole hand-off, between two processes.

RawPair — the transport alone: the receiver (decode side) in a child process with a registered
  pool, the sender here; one batch is timed from submit to the moment the sender knows the bytes
  are in the receiver's memory. ``paged`` sends 64 KiB ranges (one block of one layer of the
  Llama-3-8B shape below) to scattered pages; ``contiguous`` one range.
HandoffPair — the whole hand-off: a KVReceiver (pool, zmq control server, transport, loader)
  over a paged cache in a child process, a KVSender over its own paged cache here. One hand-off
  is Allocate (zmq), the copy from the prefill's blocks into the pool pages, TransferDone (zmq)
  and the decode's scatter into its blocks; timed from the sender's submit to the moment the
  decode side has the bytes in its blocks (one host clock: both processes on this machine).
Shape: Llama-3-8B KV (32 layers, 8 KV heads, head 128, bf16, block 16): 128 KiB per token,
64 KiB per layer-block, 2 MiB per block of all layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import multiprocessing as mp
import threading
import time

import numpy as np
import torch
from _common import pin, sync

from lmcache_pd import BatchState, Keyring, coalesce, config_from_dict
from lmcache_pd import protocol as P
from lmcache_pd import transport as transports
from lmcache_pd.device_clock import clock_for

LAYERS, HEADS, BLOCK, C = 32, 8, 16, 256
TOKEN_BYTES = LAYERS * HEADS * C * 2
RANGE_BYTES = HEADS * BLOCK * C * 2  # one block of one layer
_SPIN = (torch.ones(96, 96), torch.ones(96, 96))


def _busy(us: float) -> None:
    """The CPU stand-in for one layer's forward: ``us`` of small matrix products, each with the
    GIL released as vLLM's CPU kernels do, so the sender's threads get the GIL between them as
    they would between a real forward's ops."""
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        torch.mm(*_SPIN)


_PACED_OPS = 16
"""Kernels per layer of a host-paced stand-in forward (``HandoffPair(host_paced=True)``)."""


def _paced(us: float) -> None:
    """The host's share of one op of an eager forward: ``us`` of Python holding the GIL, then a
    release of it (``time.sleep(0)``), as each of PyTorch's ops releases it while it dispatches."""
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass
    time.sleep(0)


# --- the transport alone ------------------------------------------------------------------------
BENCH_SECRET = b"benchmarks' own shared secret...."


def security(encrypt: bool) -> dict:
    """Transport keywords for ``auth.encrypt`` (both sides derive their keys from one secret)."""
    return {"keys": Keyring(BENCH_SECRET), "encrypt": True} if encrypt else {}


def _raw_receiver(conn, name: str, options: dict, size: int, device: str, encrypt: bool = False) -> None:
    rx = transports.create(name, options, host="127.0.0.1", port=0, **security(encrypt))
    pool = rx.allocate(size, torch.device(device))
    region = rx.register(pool)
    if rx.capabilities.listens:
        rx.listen()
    conn.send(rx.export_descriptor(region))
    conn.recv()  # until the sender is done
    rx.close()


def plan_for(layout: str, size: int, rng: np.random.Generator):
    if layout == "contiguous":
        return coalesce(np.array([0]), np.array([0]), np.array([size]))
    chunk = min(RANGE_BYTES, size)
    n = size // chunk
    src = rng.permutation(n).astype(np.int64) * chunk  # scattered pages: nothing merges
    dst = rng.permutation(n).astype(np.int64) * chunk
    return coalesce(src, dst, np.full(n, chunk, dtype=np.int64))


class RawPair:
    """Buffers of ``size`` bytes on both sides; ``once(plan)`` times one batch of any plan within."""

    def __init__(self, name: str, options: dict, size: int, src_device: str, dst_device: str,
                 encrypt: bool = False):
        self.parent, child = mp.Pipe()
        self.proc = mp.get_context("spawn").Process(target=_raw_receiver,
                                                    args=(child, name, options, size, dst_device, encrypt),
                                                    daemon=True)
        self.proc.start()
        if not self.parent.poll(300):
            raise RuntimeError("receiver did not start")
        desc = self.parent.recv()
        self.tx = transports.create(name, options, **security(encrypt))
        self.src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=src_device)
        sync(src_device)
        self.region = self.tx.register(self.src)
        self.peer = self.tx.connect(desc, timeout_s=30)

    def once(self, plan) -> float:
        ended = threading.Event()
        t0 = time.perf_counter()
        h = self.tx.submit(self.peer, self.region, plan, timeout_s=120)
        h.add_done_callback(lambda _h: ended.set())
        while not (state := self.tx.poll(h)).terminal:
            ended.wait(0.001)
        dt = time.perf_counter() - t0
        h.close()
        if state != BatchState.DONE:
            raise RuntimeError(f"transfer failed: {h.error}")
        return dt

    @property
    def path(self) -> str:
        return self.tx.stats.path

    def close(self) -> None:
        self.tx.close()
        self.parent.send(b"done")
        self.proc.join(10)


# --- a whole hand-off ---------------------------------------------------------------------------
def cache(num_blocks: int, device: str, seed: int) -> list[torch.Tensor]:
    per_layer = num_blocks * HEADS * BLOCK * C
    g = torch.Generator(device=device).manual_seed(seed)
    buf = torch.randn(LAYERS * per_layer, dtype=torch.bfloat16, device=device, generator=g)
    return [buf[i * per_layer:(i + 1) * per_layer].view(num_blocks, HEADS, BLOCK, C) for i in range(LAYERS)]


def blocks_hash(layers: list[torch.Tensor], blocks: list[int]) -> str:
    idx = torch.tensor(blocks, device=layers[0].device)
    h = hashlib.sha256()
    for t in layers:
        h.update(t.index_select(0, idx).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def compat(kv_page_bytes: int, transport: str) -> P.CompatInfo:
    return P.CompatInfo(model="llama-3-8b-shape", dtype="torch.bfloat16/auto", kv_layout="LBHNC", block_size=BLOCK,
                        num_layers=LAYERS, num_kv_heads=HEADS, head_size=C, page_bytes=kv_page_bytes, tp_size=1,
                        tp_rank=0, transport=transport, attn_backend="bench", vllm_version="none")


def _decode_side(conn, cfg_dict: dict, device: str, num_blocks: int, transport: str, cpu: int | None = None) -> None:
    from lmcache_pd.handoff import Handoff, LoadSpec
    from lmcache_pd.node.receiver import KVReceiver
    from lmcache_pd.node.worker import NodeConfig, Worker
    from lmcache_pd.ops import kv_layout_of

    if cpu is not None:  # (a deployment's decode instance has cores of its own)
        pin(cpu)
    cfg = config_from_dict(cfg_dict, source="benchmark")
    layers = cache(num_blocks, device, seed=2)
    kv, buf = kv_layout_of(layers)
    rx = KVReceiver(Worker("decode-0", 0, compat(kv.page_bytes, transport)), NodeConfig.of(cfg), kv=kv,
                    kv_buffer=buf)
    rx.start()
    conn.send("ready")
    while (msg := conn.recv()) != "bye":
        kind, args = msg
        if kind == "hash":
            conn.send(blocks_hash(layers, args))
            continue
        req_id, tid, n_tok, digest, blocks = args
        rx.submit_load(LoadSpec(req_id, Handoff(tid, "prefill-0", n_tok, digest), blocks))
        conn.send("submitted")
        while not (done := rx.drain(wait_s=1.0)):  # blocks: a polling loop would compete for the GIL
            pass
        woken = time.time()  # this thread (the worker's, in a deployment) learns that the load ended
        conn.send((time.monotonic(), done[0].ok, done[0].error, done[0].scatter_s, done[0].groups, done[0].signaled,
                   done[0].done_at, woken, done[0].ready_at, done[0].spun))
    rx.close()


class HandoffPair:
    """Hand-offs of up to ``max_tokens`` tokens; random block tables on both sides. ``decode_cpu``:
    the one core the decode side runs on (``_common.pin``; pin this process the same way)."""

    def __init__(self, transport: str, options: dict, max_tokens: int, p_dev: str, d_dev: str,
                 group_mib: int | None = None, reserve: bool = True, verify: bool = False, direct: bool = False,
                 decode_cpu: int | None = None, forward_stream: str = "own", host_paced: bool = False,
                 ahead: bool = True, settle_s: float = 0.0):
        from lmcache_pd.cli.local import free_ports
        from lmcache_pd.node.sender import KVSender
        from lmcache_pd.node.worker import NodeConfig, Worker
        from lmcache_pd.ops import kv_layout_of

        max_blocks = -(-max_tokens // BLOCK)
        self.num_blocks = max_blocks * 2 + 8
        page = LAYERS * HEADS * BLOCK * C * 2
        http_p, http_d, ctrl, data = free_ports(4)
        cfg_dict = {
            "model": {"path": "none"},
            "prefill": [{"name": "prefill-0", "http_port": http_p}],
            "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data}],
            "transport": {"name": transport, "options": options, "direct": direct,
                          **({} if group_mib is None else {"group_mib": group_mib})},
            "pool": {"size_mib": max_blocks * page // 2**20 + 64},
            "timeouts": {"data_s": 120, "transfer_s": 180},
            "integrity": {"verify": verify},
        }
        ctx = mp.get_context("spawn")
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_decode_side, args=(child, cfg_dict, d_dev, self.num_blocks, transport, decode_cpu),
                                daemon=True)
        self.proc.start()
        deadline = time.monotonic() + 300
        while not self.parent.poll(0.2):  # (a decode side that died, e.g. on a config error, says so now)
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"decode side did not start (exit code {self.proc.exitcode})")
        if self.parent.recv() != "ready":
            raise RuntimeError("decode side did not start")
        cfg = config_from_dict(cfg_dict, source="benchmark")
        self.layers = cache(self.num_blocks, p_dev, seed=1)
        kv, buf = kv_layout_of(self.layers)
        self.tx = KVSender(Worker("prefill-0", 0, compat(kv.page_bytes, transport)), NodeConfig.of(cfg), kv=kv,
                           kv_buffer=buf)
        self.tx.start()
        self.reserve = reserve
        self.ahead = ahead
        self.settle_s = settle_s
        """Seconds between the grant and the submit: in a deployment the rest of the last chunk's
        forward (the reservation goes out as it starts), in which both processes finish handling
        the grant; 0: the submit right after it, meeting that tail."""
        """The reservation names the blocks the hand-off sends, so its launch is laid out when
        the pages are granted (node/on_caller.py); False: planned at the submit."""
        """Reserve the decode pages before the clock starts, as the connector does while the
        forward of the last prompt chunk runs (that forward always outlasts one round trip)."""
        self.rng = np.random.default_rng(0)
        self.seq = 0
        self._fwd: torch.cuda.Stream | None = None  # the stand-in forward's stream (once used)
        self._fwd_default = forward_stream == "default"  # on the device's default stream, as vLLM's
        self._host_paced = host_paced
        """On a GPU, the stand-in forward keeps its host as busy as its GPU, as vLLM's eager forward
        of a 1024-token prompt does: each layer is ``_PACED_OPS`` kernels, each launched after the
        host spent the previous one's time in Python (``_paced``). Another thread of this process
        that takes the GIL (the sender's) then delays the forward's end, as it would vLLM's."""
        self._cycles: float | None = None  # torch.cuda._sleep cycles per us (once measured)
        self.last: tuple[list[int], list[int]] = ([], [])
        self._submits: list[tuple[float, object]] = []  # (wall clock, handle) of each batch submitted
        self._host = {"submit": 0.0, "prepare_layers": 0.0}  # seconds inside each, this hand-off
        for name in ("submit", "prepare_layers"):
            real = getattr(self.tx.transport, name)

            def submit(*args, _real=real, _name=name, **kwargs):
                t = time.perf_counter()
                out = _real(*args, **kwargs)
                self._host[_name] += time.perf_counter() - t
                self._submits.append((time.time(), getattr(out, "handle", out)))  # (a LayerPosts' batch)
                return out
            setattr(self.tx.transport, name, submit)
        self.phases: list[dict[str, float]] = []
        """Per hand-off, seconds: allocate (link + Allocate round trip; with a reservation, what
        was left of it: taking the reserved pages), transfer (the copy into
        the pool, every group), after transfer (the rest: TransferDone's first half, the part of
        the scatter not overlapped with the transfer, wake-ups, the benchmark's own polling);
        and, overlapping those, scatter (pool -> decode blocks, all groups) and groups (count)."""

    def once(self, n_tok: int, forward_us: float = 0.0, layered: bool = False, chunks: int = 1,
             pieces: bool = True, posted: bool = False, prepared_first: bool = False) -> float:
        """One hand-off; its seconds from the submit to the decode's blocks holding it.

        ``forward_us`` > 0: a stand-in for the prefill's forward runs first on a stream of its
        own, ``forward_us`` per layer (a spinning kernel, then an event per layer; on a CPU,
        small matrix products on this thread, then the layer's mark), over
        ``chunks`` prompt chunks one after the other (chunked prefill: each chunk's forward
        computes its share of the blocks, ``forward_us`` / ``chunks`` per layer); the hand-off
        goes after it (``layered``: each layer as its event completes, on the device, through
        ``KVSender.submit_layered``, one piece per chunk, or with ``pieces`` False all blocks
        from the last chunk's forward, as vLLMs that do not name preempted requests do; else the
        whole hand-off once the forward ended, as a request that finished; ``posted``: the last
        chunk's layers prepared at once and each posted by the forward's thread as it marks it,
        ``transport.post_layers``, where the transport can; else a batch per layer from the
        sender's thread; ``prepared_first``: the forward's first layer waits until they were
        prepared, so the preparation's cost on the sender's thread shows apart from the posts').
        Then the phases also
        hold "forward", "exposed" (the forward's end -> the decode's end of the load) and
        "transfer_exposed" (the forward's end -> the sender seeing the last byte in the decode
        pool)."""
        from lmcache_pd.handoff import Handoff, SendSpec

        n = -(-n_tok // BLOCK)
        p_blocks = [int(b) for b in self.rng.choice(np.arange(self.num_blocks), n, replace=False)]
        d_blocks = [int(b) for b in self.rng.choice(np.arange(self.num_blocks), n, replace=False)]
        self.seq += 1
        tid = f"t{self.seq}"
        digest = P.prompt_digest(list(range(n_tok)))
        self.parent.send(("load", (f"d-{tid}", tid, n_tok, digest, tuple(d_blocks))))
        assert self.parent.recv() == "submitted"
        if self.reserve:
            # (the blocks named: its launch is laid out at the grant, as the connector's is)
            self.tx.reserve(Handoff(tid, "decode-0", n_tok, digest), tuple(p_blocks) if self.ahead else None).result(60)
            time.sleep(self.settle_s)
        spec = SendSpec(f"p-{tid}", Handoff(tid, "decode-0", n_tok, digest), tuple(p_blocks))
        forward_end = forward_end_gpu = 0.0
        if forward_us > 0:
            forward_start = time.time()
            self.tx._io.post_layers = posted  # (the sender's setting, per hand-off here: the modes take turns)
            self._host = dict.fromkeys(self._host, 0.0)
            forward_end, stamp, marks, marking = self._forward(spec, p_blocks, forward_us, layered, chunks, pieces,
                                                               prepared_first)
            forward_end_gpu = stamp.wall() if stamp is not None else forward_end  # (a CPU's: the host's)
            if marks is not None:
                marks.forward_done(forward_end, stamp)
            submits, self._submits = self._submits, []
        t0, t0_wall = time.monotonic(), time.time()
        if forward_us <= 0 or not layered:
            self.tx.submit(spec)
        t_done, ok, error, scatter_s, groups, signaled, loaded_at, woken, ready_at, spun = self.parent.recv()
        sent = []
        while not sent:
            sent = self.tx.drain()
            time.sleep(0.00005)
        if not ok or not sent[0].ok:
            raise RuntimeError(f"hand-off failed: {error or sent[0].error}")
        self.last = (p_blocks, d_blocks)
        total = t_done - t0
        s = sent[0]
        self.phases.append({"allocate": s.allocate_s, "transfer": s.seconds,
                            "after transfer": total - s.allocate_s - s.seconds, "scatter": scatter_s,
                            "groups": groups, "signaled": int(signaled), "spun": int(spun),
                            "on_caller": int(s.on_caller),
                            "prepared": int(s.prepared),
                            "direct": int(s.direct),
                            # Wall-clock marks (one machine): plan and launch on the caller's
                            # thread; from the launch to the decode loader's end of the load (the
                            # GPU's copy and scatter and the wake-ups between); to the worker's
                            # thread learning of it.
                            "launch": s.first_byte_at - t0_wall, "to_loaded": loaded_at - s.first_byte_at,
                            # The submit to the load's end on the decode: what vLLM's next look
                            # there (get_finished, once a step) finds; "woken" then adds the
                            # benchmark's own thread waking on it.
                            "ended": loaded_at - t0_wall,
                            "to_woken": woken - loaded_at,
                            # to_loaded's parts: the copy (its last byte: cuda_ipc's GPU stamp, else
                            # the transport's report); until the sender's loop saw it (before its
                            # TransferDone); until the decode's loader found every page in the pool;
                            # its scatter and the load's end.
                            "copy": s.last_byte_at - s.first_byte_at,
                            "seen": s.done_at - s.done_s - s.last_byte_at,
                            "told": ready_at - (s.done_at - s.done_s), "loaded": loaded_at - ready_at,
                            # The last byte to the decode's loader starting the load's end (a
                            # signaled load: woken by the landing word, without seen and told).
                            "to_loader": ready_at - s.last_byte_at,
                            **({"forward": forward_end - forward_start, "exposed": loaded_at - forward_end,
                                  # GPU stamps at both ends (device_clock.py; cuda_ipc stamps its
                                  # batches): the transfer's last byte after the forward's last kernel.
                                  "transfer_exposed": s.last_byte_at - forward_end_gpu,
                                  **self._batches(submits + self._submits, forward_end, forward_end_gpu),
                                  # Host seconds: in the forward's marks (posts included) on its
                                  # thread; in the transport's submit and prepare_layers.
                                  "marking": marking, "in_submit": self._host["submit"],
                                  "in_prepare": self._host["prepare_layers"]}
                               if forward_us > 0 else {})})
        self._submits = []
        return total

    def _forward(self, spec, p_blocks: list[int], forward_us: float, layered: bool, chunks: int, pieces: bool,
                 prepared_first: bool = False):
        """The stand-in forward (see :meth:`once`): its end on the host, its end's stamp on the
        GPU (None on a CPU), the last piece's marks (None: not layered), and the seconds its
        thread spent in the marks."""
        from lmcache_pd.node.layered import LayerMarks

        n = len(p_blocks)
        cuda = self.layers[0].is_cuda
        stream = self._forward_stream() if cuda else None
        cycles = int(forward_us / chunks * self._cycles_per_us()) if cuda else 0
        bounds = [n * k // chunks for k in range(chunks + 1)]  # the blocks each chunk completes
        sent = marks = None
        marking = 0.0
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            for c in range(chunks):
                final = c == chunks - 1
                marks = LayerMarks(LAYERS) if layered and (pieces or final) else None
                if marks is not None:
                    first = bounds[c] if pieces else 0
                    blocks = tuple(p_blocks[:bounds[c + 1]])
                    if sent is None:
                        piece = dataclasses.replace(spec, block_ids=blocks, layered=True, first_block=first,
                                                    final=final)
                        sent = self.tx.submit_layered(piece, marks)
                    else:
                        sent.add(blocks, first, marks, final)
                    if prepared_first and final:
                        deadline = time.monotonic() + 30
                        while not self._host["prepare_layers"] and time.monotonic() < deadline:
                            time.sleep(0.0001)
                for i in range(LAYERS):
                    ready = None
                    if cuda:
                        if self._host_paced:
                            for _ in range(_PACED_OPS):
                                torch.cuda._sleep(cycles // _PACED_OPS)
                                _paced(forward_us / chunks / _PACED_OPS)
                        else:
                            torch.cuda._sleep(cycles)
                        ready = torch.cuda.Event()
                        ready.record(stream)
                    else:
                        _busy(forward_us / chunks)
                    if marks is not None:
                        t = time.perf_counter()
                        marks.layer(i, ready)
                        marking += time.perf_counter() - t
        if not cuda:
            return time.time(), None, marks, marking
        end_stamp = clock_for(stream.device).stamp(stream)  # the forward's end on the GPU
        end_stamp.event.synchronize()  # (recorded after the last layer's event: wait for it, not that)
        return time.time(), end_stamp, marks, marking

    @staticmethod
    def _batches(submits: list[tuple[float, object]], forward_end: float, forward_end_gpu: float) -> dict[str, float]:
        """When the hand-off's batches were submitted and done, from the forward's end (seconds):
        its last submit, its last batch done as the host learned it (the transport's t_done,
        monotonic; from the host's end of the forward), and its last byte on the GPU (the batch's
        stamp; from the forward's end on the GPU)."""
        if not submits:
            return {"last_submit": 0.0, "last_done": 0.0, "last_landed": 0.0, "batches": 0}
        offset = time.time() - time.monotonic()
        landed = [h.landed_at for _, h in submits]
        return {"last_submit": max(t for t, _ in submits) - forward_end,
                "last_done": max(h.t_done for _, h in submits) + offset - forward_end,
                "last_landed": max(landed) - forward_end_gpu if all(landed) else float("nan"), "batches": len(submits)}

    def _forward_stream(self) -> torch.cuda.Stream:
        if self._fwd is None:
            device = self.layers[0].device
            self._fwd = torch.cuda.default_stream(device) if self._fwd_default else torch.cuda.Stream(device=device)
        return self._fwd

    def _cycles_per_us(self) -> float:
        """The spinning kernel's clock (``torch.cuda._sleep`` counts cycles), measured once."""
        if self._cycles is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1000)
            start.record()
            torch.cuda._sleep(10_000_000)
            end.record()
            end.synchronize()
            self._cycles = 10_000_000 / (start.elapsed_time(end) * 1e3)
        return self._cycles

    def check_last(self) -> bool:
        """The decode's blocks of the last hand-off equal the prefill's, bitwise (sha256)."""
        p_blocks, d_blocks = self.last
        self.parent.send(("hash", d_blocks))
        return self.parent.recv() == blocks_hash(self.layers, p_blocks)

    @property
    def path(self) -> str:
        return self.tx.transport.stats.path

    def close(self) -> None:
        self.tx.close()
        self.parent.send("bye")
        self.proc.join(30)
