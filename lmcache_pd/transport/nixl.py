"""NIXL transport (UCX backend): RDMA across hosts, shared memory or CUDA IPC within one.

The decode side registers its pool with a NIXL agent once and exports, in the handshake reply,
NIXL's own agent metadata (NIXL's binary format, parsed by NIXL; never pickle) plus the pool's
address, size and memory kind. The prefill side loads that metadata once per peer and, per
transfer, posts one WRITE of every range of the plan (push: the side that has the bytes starts
the transfer, as in the 49 GB/s push figure of vLLM issue 52607, not the 0.5 GB/s pull). NIXL
reports a WRITE done after its UCX endpoint flush, so DONE means the bytes are in the peer's
memory; the sender then tells the decode side over the control plane.

Threads: NIXL's own progress thread spins a full core (its Python API hard-codes the delay to
0, docs/transports.md), so it is off by default; one completion thread of ours polls in-flight
transfers every ``poll_interval_us`` and, when idle on the decode side, progresses the worker
every ``idle_progress_ms`` (receivers on UCX's tcp transport need target-side progress); idle on
the prefill side, it sleeps until a transfer is posted. All agent calls hold one lock.

Which UCX transport carried the data (cma, sysv, cuda_ipc, rc_mlx5, tcp...) is read from UCX's
protocol-selection report (``UCX_PROTO_INFO``), which this module routes to a log file before
UCX starts unless the user set those variables; it is logged once per peer and kept in
``stats.path``.
"""

from __future__ import annotations

import atexit
import importlib
import itertools
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from types import ModuleType
from typing import Any

import msgspec
import numpy as np
import torch

from lmcache_pd._types import BatchState
from lmcache_pd.errors import PeerLost, TransportUnavailable
from lmcache_pd.layout import RangePlan
from lmcache_pd.transport._nixl_peers import Descriptor, InFlight, Peer
from lmcache_pd.transport._staging import Region, Stager
from lmcache_pd.transport._ucx_report import flush_c_streams, route_ucx_report, ucx_write_paths
from lmcache_pd.transport.base import BatchHandle, Capabilities, PeerId, RegionId, Transport, gpu_uuid

log = logging.getLogger(__name__)
_MODULES = ("nixl_cu13", "nixl_cu12", "nixl")  # the CUDA 13 / 12 wheels, or a source build
_live: weakref.WeakSet[NixlTransport] = weakref.WeakSet()
_TIDY_S = 0.1
"""The prefill side's idle wake-up while something is left to tidy (parked requests, UCX's report)."""


@atexit.register
def _close_all() -> None:
    # An agent torn down at exit while our thread still calls into it aborts the process
    # ("terminate called"): stop the threads first.
    for t in list(_live):
        t.close()


def _import_nixl() -> ModuleType:
    errors = []
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
            mod.nixl_agent  # noqa: B018 - the meta-package `nixl` may lack the API
            if not os.environ.get("NIXL_LOG_LEVEL"):  # NIXL prints INFO lines to stdout per agent
                logging.getLogger("nixl").setLevel(logging.WARNING)
            return mod
        except (ImportError, AttributeError) as e:
            errors.append(f"{name}: {e}")
    raise TransportUnavailable("NIXL is not installed (pip install nixl-cu12 or nixl-cu13): " + "; ".join(errors))


class NixlOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    backend: str = "UCX"
    ucx_tls: str = ""
    """UCX_TLS for the instance (``lmcache-pd launch`` sets it, unless the environment already
    does: ``NixlTransport.environment``); empty: UCX chooses."""
    progress_thread: bool = False
    """NIXL's own progress thread (spins one core; worth it only where RDMA needs it)."""
    num_threads: int = 0
    """UCX backend worker threads (0: NIXL's default)."""
    poll_interval_us: int = 20
    """Sleep between polls of in-flight transfers."""
    idle_progress_ms: float = 1.0
    """Worker progress period when nothing is in flight, on the decode side (target-side
    progress; the prefill side does not wake when idle)."""
    report_path: bool = True
    """Route UCX's protocol report to a file to learn which UCX transport carried the data."""
    stage_ranges: int = 64
    """A GPU source whose plan has more ranges than this is first gathered on the GPU (one kernel
    launch) into a registered staging buffer in destination order, so that NIXL posts one write
    per run of consecutive destination bytes: UCX pays microseconds per descriptor (measured in
    docs/benchmarks.md). Costs GPU memory equal to the bytes in flight. 0: never stage."""

    def __post_init__(self) -> None:
        if self.poll_interval_us < 0 or self.idle_progress_ms <= 0 or self.num_threads < 0 or self.stage_ranges < 0:
            raise ValueError("poll_interval_us, num_threads and stage_ranges must be >= 0, idle_progress_ms > 0")


class NixlTransport(Transport):
    name = "nixl"
    capabilities = Capabilities(remote=True, mem_kinds=frozenset({"cpu", "cuda"}), listens=False, direct=True)
    Options = NixlOptions

    @classmethod
    def environment(cls, options: msgspec.Struct) -> dict[str, str]:
        assert isinstance(options, NixlOptions)
        return {"UCX_TLS": options.ucx_tls} if options.ucx_tls else {}

    def __init__(self, options: NixlOptions, **kwargs: object):
        super().__init__(options, **kwargs)  # type: ignore[arg-type]
        self._nixl = _import_nixl()
        if options.ucx_tls and os.environ.get("UCX_TLS") != options.ucx_tls:
            log.warning("transport.options.ucx_tls=%r is not this process's UCX_TLS (%r): lmcache-pd launch "
                        "sets it; started another way, set UCX_TLS yourself", options.ucx_tls,
                        os.environ.get("UCX_TLS"))
        self._report = route_ucx_report() if options.report_path else None
        self._name = f"lmcache-pd-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}"
        conf = self._nixl.nixl_agent_config(
            enable_prog_thread=options.progress_thread, backends=[options.backend],
            num_threads=options.num_threads,
            sync_mode=self._nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        try:
            self._agent = self._nixl.nixl_agent(self._name, conf)
        except Exception as e:  # noqa: BLE001 - NIXL raises its own exception types
            raise TransportUnavailable(f"cannot create a NIXL agent: {e}") from e
        if options.backend not in self._agent.backends:
            raise TransportUnavailable(f"NIXL backend {options.backend!r} is not available "
                                       f"(plugins: {', '.join(self._agent.get_plugin_list())})")
        self._lock = threading.Lock()  # every agent call
        self._regions: dict[RegionId, Region] = {}
        self._peers: dict[PeerId, Peer] = {}
        self._agents: dict[str, int] = {}  # remote agent name -> peers using it
        self._ids = itertools.count(1)
        self._inflight: list[InFlight] = []
        self._stager = Stager(self._register_stage)
        self._unreported: dict[PeerId, str] = {}  # peers whose UCX path is not known yet -> source memory
        self._next_report = 0.0
        self._report_size = -1
        self._report_text = ""
        self._parked: list[Any] = []  # xfer handles NIXL could not release yet
        self._target = False  # peers write into a region of ours (export_descriptor): progress when idle
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pd-nixl", daemon=True)  # started by register
        _live.add(self)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            _import_nixl()
        except TransportUnavailable as e:
            return False, str(e)
        return True, ""

    # --- both sides ---------------------------------------------------------------------------
    def register(self, buffer: torch.Tensor, extents: tuple[tuple[int, int], ...] = ()) -> RegionId:
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError("nixl registers flat contiguous uint8 tensors only")
        mem = "VRAM" if buffer.is_cuda else "DRAM"
        device = (buffer.device.index or 0) if buffer.is_cuda else 0
        # A span over several allocations: UCX registers each one (descriptors then name
        # addresses inside them); the bytes between them are not memory.
        memory = [buffer[o:o + n] for o, n in extents] if extents else buffer
        with self._lock:
            reg = self._agent.register_memory(memory)
            if self._thread.ident is None and not self._stop.is_set():
                self._thread.start()
        rid = next(self._ids)
        self._regions[rid] = Region(buffer, buffer.data_ptr(), buffer.numel(), device, mem, reg)
        return rid

    def _register_stage(self, buffer: torch.Tensor) -> Any:
        with self._lock:
            return self._agent.register_memory(buffer)

    def export_descriptor(self, region: RegionId) -> bytes:
        r = self._regions[region]
        with self._lock:
            md = self._agent.get_agent_metadata()
        with self._wake:
            self._target = True
            self._wake.notify()
        return msgspec.msgpack.encode(Descriptor(self._name, md, r.address, r.nbytes, r.device, r.mem,
                                                  gpu_uuid(r.buffer.device)))

    # --- prefill side -------------------------------------------------------------------------
    def connect(self, descriptor: bytes, timeout_s: float, session: bytes = b"") -> PeerId:
        try:
            d = msgspec.msgpack.decode(descriptor, type=Descriptor)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise PeerLost(f"not a nixl descriptor: {e}") from None
        if d.mem not in ("DRAM", "VRAM") or d.nbytes < 0:
            raise PeerLost(f"nixl descriptor names memory kind {d.mem!r}, size {d.nbytes}")
        with self._lock:
            try:
                if d.agent not in self._agents:
                    name = self._agent.add_remote_agent(d.metadata)
                    name = name.decode() if isinstance(name, bytes) else name
                    if name != d.agent:
                        self._agent.remove_remote_agent(name)
                        raise PeerLost(f"nixl metadata names agent {name!r}, descriptor {d.agent!r}")
                    self._agents[d.agent] = 0
                    try:  # optional: moves connection set-up out of the first transfer
                        self._agent.make_connection(d.agent)
                    except Exception as e:  # noqa: BLE001
                        log.debug("nixl make_connection to %s: %s", d.agent, e)
                self._agents[d.agent] += 1
            except PeerLost:
                raise
            except Exception as e:  # noqa: BLE001 - NIXL's loader raises its own types on bad bytes
                raise PeerLost(f"nixl refused the peer's metadata: {e}") from None
        pid = next(self._ids)
        self._peers[pid] = Peer(d.agent, d.address, d.nbytes, d.device, d.mem,
                                 device_uuid=d.device_uuid if d.agent != self._name else "")  # (one process: one context)
        return pid

    def shares_device(self, peer: PeerId, region: RegionId) -> bool:
        p, r = self._peers.get(peer), self._regions.get(region)
        return p is not None and r is not None and bool(p.device_uuid) and p.device_uuid == gpu_uuid(r.buffer.device)

    def submit(self, peer: PeerId, region: RegionId, plan: RangePlan, timeout_s: float,
               after: torch.cuda.Event | None = None, *, ticket: bytes = b"") -> BatchHandle:
        src = self._regions[region]
        p = self._peers.get(peer)
        handle = BatchHandle(self, plan.nbytes, time.monotonic(), timeout_s)
        if p is None:
            self._finish(handle, BatchState.FAILED, time.monotonic(), "nixl peer was disconnected")
            return handle
        if not len(plan):
            self._finish(handle, BatchState.DONE, time.monotonic())
            return handle
        if (int((plan.dst_offsets + plan.lengths).max()) > p.nbytes or int(plan.dst_offsets.min()) < 0
                or int((plan.src_offsets + plan.lengths).max()) > src.nbytes or int(plan.src_offsets.min()) < 0):
            self._finish(handle, BatchState.FAILED, time.monotonic(), "range plan outside a registered region")
            return handle
        if src.mem == "VRAM":
            # UCX copies on streams of its own, so the bytes must be complete before the post.
            # Given the producer's event, wait for it alone (the sender already has: no cost).
            # Never for a whole stream then: vLLM's forward runs on the default stream, and its
            # synchronize waits for every layer and step queued after the event too. Without an
            # event (a direct caller), the current stream's work is what wrote the bytes.
            if after is not None:
                after.synchronize()
            else:
                torch.cuda.current_stream(src.buffer.device).synchronize()
        stage = None
        if src.mem == "VRAM" and 0 < self.options.stage_ranges < len(plan):  # type: ignore[attr-defined]
            try:
                stage, plan = self._stager.gather(src, plan, after)
                src = stage
            except Exception as e:  # noqa: BLE001 - CUDA or NIXL registration errors
                self._finish(handle, BatchState.FAILED, time.monotonic(), f"nixl staging failed: {e}")
                return handle
        n = len(plan)
        error = "nixl transfer failed at post"
        local = np.empty((n, 3), dtype=np.uint64)
        local[:, 0] = plan.src_offsets + src.address
        local[:, 1] = plan.lengths
        local[:, 2] = src.device
        remote = np.empty((n, 3), dtype=np.uint64)
        remote[:, 0] = plan.dst_offsets + p.address
        remote[:, 1] = plan.lengths
        remote[:, 2] = p.device
        xfer = None
        with self._lock:
            try:
                xfer = self._agent.initialize_xfer(
                    "WRITE", self._agent.get_xfer_descs(local, src.mem), self._agent.get_xfer_descs(remote, p.mem),
                    p.agent)
                status = self._agent.transfer(xfer)
            except Exception as e:  # noqa: BLE001
                error = f"nixl refused the transfer: {e}"
                status = "ERR"
        if xfer is None:
            self._stager.put_back(stage)
            self._finish(handle, BatchState.FAILED, time.monotonic(), error)
            return handle
        if status in ("DONE", "ERR"):
            self._release_xfer(xfer)
            self._stager.put_back(stage)
            if status == "DONE":
                self._done(handle, peer, src.mem)
            else:
                self._finish(handle, BatchState.FAILED, time.monotonic(), error)
            return handle
        handle.state = BatchState.IN_FLIGHT
        with self._wake:
            self._inflight.append(InFlight(handle, xfer, handle.t_submit + timeout_s, peer, src.mem, stage))
            self._wake.notify()
        return handle

    def _done(self, handle: BatchHandle, peer: PeerId, src_mem: str) -> None:
        p = self._peers.get(peer)
        if self._report and p is not None and p.report_tries >= 0 and peer not in self._unreported:
            self._unreported[peer] = src_mem  # read later, off the transfer's path
            with self._wake:
                self._wake.notify()  # (a prefill side asleep with nothing in flight: see _idle_s)
        self._finish(handle, BatchState.DONE, time.monotonic())

    def _maybe_report(self) -> None:
        """Learn from UCX's report which transport carried the data (completion thread, at most
        twice a second: the report is a growing text file, and reading it on the submit path once
        cost 3-5 ms per transfer)."""
        now = time.monotonic()
        if not self._unreported or now < self._next_report:
            return
        self._next_report = now + 0.5
        flush_c_streams()
        try:
            size = os.path.getsize(self._report)  # type: ignore[arg-type]
            if size != self._report_size:
                self._report_size = size
                with open(self._report, errors="replace") as f:  # type: ignore[arg-type]
                    self._report_text = f.read()
        except OSError as e:
            log.debug("cannot read UCX's protocol report %s: %s", self._report, e)
        for peer, src_mem in list(self._unreported.items()):
            p = self._peers.get(peer)
            if p is None:
                del self._unreported[peer]
                continue
            paths = ucx_write_paths(self._report_text, src_mem, p.mem)
            p.report_tries += 1
            if paths:
                self.stats.path = "UCX " + ",".join(paths)
                log.info("nixl: data to %s carried by %s", p.agent, self.stats.path)
            elif p.report_tries < 40:
                continue
            else:
                log.info("nixl: UCX's report names no transport towards %s", p.agent)
            p.report_tries = -1
            del self._unreported[peer]

    # --- completion thread --------------------------------------------------------------------
    def _idle_s(self) -> float | None:
        """How long the completion thread sleeps with nothing in flight (None: until woken).

        Only a target (the decode side, whose pool peers write into) needs its UCX worker
        progressed when idle (``idle_progress_ms``). The prefill side posts writes and polls them
        while they fly; idle, it wakes only for what is left to tidy (parked requests, UCX's
        report), else not at all: every wake-up takes the GIL of vLLM's engine process, whose
        own thread then waits (1000 a second at the default 1 ms)."""
        if self._target:
            return self.options.idle_progress_ms / 1000.0  # type: ignore[attr-defined]
        return _TIDY_S if self._parked or self._unreported else None

    def _run(self) -> None:
        poll_s = self.options.poll_interval_us / 1e6  # type: ignore[attr-defined]
        while not self._stop.is_set():
            with self._wake:
                if not self._inflight and not self._stop.is_set():
                    self._wake.wait(self._idle_s())
                batch = list(self._inflight)
            try:
                if not batch:
                    with self._lock:
                        self._agent.get_new_notifs()  # progresses the worker (target side)
                    self._retry_parked()
                    self._maybe_report()
                    continue
                self._poll(batch)
            except Exception:  # noqa: BLE001 - the thread must survive to end every handle
                log.exception("nixl completion thread")
            if poll_s:
                time.sleep(poll_s)

    def _poll(self, batch: list[InFlight]) -> None:
        now = time.monotonic()
        ended: list[tuple[InFlight, BatchState, str | None]] = []
        with self._lock:
            for item in batch:
                try:
                    status, err = self._agent.check_xfer_state(item.xfer), "peer gone or memory not registered"
                except Exception as e:  # noqa: BLE001
                    status, err = "ERR", str(e)
                if item.handle.state == BatchState.CANCELED:
                    # Ended only once NIXL has released the request (aborted) or it has finished:
                    # the peer must not reuse pages a write is still landing in. Bounded by the
                    # transfer's deadline, after which the request is parked.
                    if status != "PROC" or self._try_release(item.xfer) or now > item.deadline:
                        ended.append((item, BatchState.CANCELED, "canceled"))
                elif status == "DONE":
                    ended.append((item, BatchState.DONE, None))
                elif status == "ERR":
                    ended.append((item, BatchState.FAILED, f"nixl transfer failed: {err}"))
                elif now > item.deadline:
                    ended.append((item, BatchState.TIMEOUT, "nixl transfer passed its deadline"))
        if not ended:
            return
        with self._wake:
            gone = {id(e[0]) for e in ended}
            self._inflight = [i for i in self._inflight if id(i) not in gone]
        for item, state, error in ended:
            self._release_xfer(item.xfer)
            self._stager.put_back(item.stage)
            if state == BatchState.DONE:
                self._done(item.handle, item.peer, item.src_mem)
            else:
                self._finish(item.handle, state, time.monotonic(), error)

    @staticmethod
    def _try_release(xfer: Any) -> bool:
        try:
            xfer.release()
            return True
        except Exception:  # noqa: BLE001 - NIXL could not abort it
            return False

    def _release_xfer(self, xfer: Any) -> None:
        # A request NIXL cannot release yet (a timed-out one still in flight) is parked and
        # released once it ends, so no UCX request is leaked.
        with self._lock:
            if self._try_release(xfer):
                return
            log.debug("nixl could not release a transfer yet; parked")
            self._parked.append(xfer)
        with self._wake:
            self._wake.notify()  # (retried while idle: see _idle_s)

    def _retry_parked(self) -> None:
        if not self._parked:
            return
        with self._lock:
            self._parked = [x for x in self._parked if not self._try_release(x)]

    def close_batch(self, handle: BatchHandle) -> None:
        if handle.state.terminal:
            return
        # Cancel: the completion thread ends it (releasing the NIXL request; one NIXL cannot
        # abort is parked until it ends). Wait for that, so pages are not reused under a write.
        handle.state = BatchState.CANCELED
        with self._wake:
            self._wake.notify()
        self._await_stopped(handle, lambda: handle.t_done is None and not self._stop.is_set())

    def disconnect(self, peer: PeerId) -> None:
        p = self._peers.pop(peer, None)
        if p is None:
            return
        with self._lock:
            self._agents[p.agent] -= 1
            if self._agents[p.agent] == 0:
                del self._agents[p.agent]
                try:
                    self._agent.remove_remote_agent(p.agent)
                except Exception as e:  # noqa: BLE001
                    log.debug("nixl remove_remote_agent %s: %s", p.agent, e)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        with self._wake:
            self._wake.notify()
        if self._thread.ident is not None:
            self._thread.join(5.0)
        with self._wake:
            left, self._inflight = self._inflight, []
        for item in left:
            self._release_xfer(item.xfer)
            self._finish(item.handle, BatchState.CANCELED, time.monotonic(), "transport closed")
        for pid in list(self._peers):
            self.disconnect(pid)
        with self._lock:
            for r in [*self._regions.values(), *self._stager.buffers()]:
                try:
                    self._agent.deregister_memory(r.reg)
                except Exception as e:  # noqa: BLE001
                    log.debug("nixl deregister: %s", e)
        self._regions.clear()
