"""Transfer benchmark: a transport moving bytes between two processes, beside its ceiling.

For each size, the receiver (decode side) lives in a child process with a registered pool and
the sender (prefill side) in this process. Each figure is the median of ``--repeat`` timed
batches, from submit to the moment the sender knows the bytes are in the receiver's memory.
The ceiling is measured in the same run, alternating with the transport, on the same machine:
  tcp: a raw socket on loopback, sendall from one process and recv_into a preallocated buffer in
       another, acknowledged after the last byte (the same semantics as a transport batch);
  cuda_ipc: the in-process device copy ``dst.copy_(src)`` between the same two devices
       (peer access on), timed the same way (host clock, until the copy is complete).
Layout ``contiguous`` sends one range; ``paged`` sends 64 KiB ranges to scattered destinations,
as a paged KV cache does (per layer, per block).

    python benchmarks/transfer.py --transport tcp --sizes 1M,16M,256M,1G
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import struct
import sys
import threading
import time

import numpy as np
import torch
from _common import pick_devices

from lmcache_pd import TransferState, coalesce
from lmcache_pd import transport as transports

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * _UNITS[text[-1]]) if text[-1] in _UNITS else int(text)


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} B"


# --- raw socket ceiling -------------------------------------------------------------------------
_RAW_CHUNK = 64 << 10


def _raw_receiver(conn, max_bytes: int, chunked: bool) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    conn.send(srv.getsockname()[1])
    view = memoryview(bytearray(max_bytes))
    s, _ = srv.accept()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        head = s.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            break
        (n,) = struct.unpack("!Q", head)
        if chunked:  # scatter into 64 KiB views, up to 1024 per system call
            views = [view[o:min(o + _RAW_CHUNK, n)] for o in range(0, n, _RAW_CHUNK)]
            for i in range(0, len(views), 1024):
                part = views[i:i + 1024]
                # MSG_WAITALL on a blocking socket fills every view in one call (or the peer died).
                if s.recvmsg_into(part, 0, socket.MSG_WAITALL)[0] != sum(len(v) for v in part):
                    raise ConnectionError("short read")
        else:
            got = 0
            while got < n:  # MSG_WAITALL on a blocking socket: normally one system call
                got += s.recv_into(view[got:n], n - got, socket.MSG_WAITALL)
        s.sendall(b"A")
    s.close()


class RawSocket:
    """A ceiling: a plain socket from one process into a preallocated buffer in another, as one
    buffer (``chunked=False``) or as 64 KiB pieces (``chunked=True``); acknowledged at the end."""

    def __init__(self, size: int, chunked: bool):
        self.size = size
        self.chunked = chunked
        parent, child = mp.Pipe()
        self.proc = mp.get_context("spawn").Process(target=_raw_receiver, args=(child, size, chunked), daemon=True)
        self.proc.start()
        self.sock = socket.create_connection(("127.0.0.1", parent.recv()))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.payload = memoryview(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).data)
        self.pieces = [self.payload[o:o + _RAW_CHUNK] for o in range(0, size, _RAW_CHUNK)]

    def once(self) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(struct.pack("!Q", self.size))
        if self.chunked:
            for i in range(0, len(self.pieces), 1024):
                part = self.pieces[i:i + 1024]
                if self.sock.sendmsg(part) != sum(len(p) for p in part):  # blocking: all, or an error
                    raise ConnectionError("short write")
        else:
            self.sock.sendall(self.payload)
        assert self.sock.recv(1) == b"A"
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()
        self.proc.join(10)


# --- the transport ------------------------------------------------------------------------------
class DeviceCopy:
    """The ceiling for GPU transports: ``dst.copy_(src)`` in one process, complete."""

    def __init__(self, size: int, src_device: str, dst_device: str):
        self.src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=src_device)
        self.dst = torch.empty(size, dtype=torch.uint8, device=dst_device)
        torch.cuda.synchronize(self.src.device)

    def once(self) -> float:
        t0 = time.perf_counter()
        self.dst.copy_(self.src)
        torch.cuda.synchronize(self.dst.device)
        torch.cuda.synchronize(self.src.device)
        return time.perf_counter() - t0

    def close(self) -> None:
        pass


def _transport_receiver(conn, name: str, options: dict, size: int, device: str) -> None:
    rx = transports.create(name, options, host="127.0.0.1", port=0)
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
    chunk = min(64 << 10, size)
    n = size // chunk
    src = rng.permutation(n).astype(np.int64) * chunk  # scattered pages: nothing merges
    dst = rng.permutation(n).astype(np.int64) * chunk
    return coalesce(src, dst, np.full(n, chunk, dtype=np.int64))


class Sender:
    """The transport under test: receiver in a child process, sender here."""

    def __init__(self, name: str, options: dict, size: int, layout: str, src_device: str, dst_device: str):
        self.parent, child = mp.Pipe()
        self.proc = mp.get_context("spawn").Process(target=_transport_receiver,
                                                    args=(child, name, options, size, dst_device), daemon=True)
        self.proc.start()
        desc = self.parent.recv()
        self.tx = transports.create(name, options)
        src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=src_device)
        if src.is_cuda:
            torch.cuda.synchronize(src.device)
        self.region = self.tx.register(src)
        self.peer = self.tx.connect(desc, timeout_s=10)
        self.plan = plan_for(layout, size, np.random.default_rng(1))

    def once(self) -> float:
        ended = threading.Event()
        t0 = time.perf_counter()
        h = self.tx.submit(self.peer, self.region, self.plan, timeout_s=120)
        h.add_done_callback(lambda _h: ended.set())
        while not (state := self.tx.poll(h)).terminal:
            ended.wait(0.001)
        dt = time.perf_counter() - t0
        h.release()
        if state != TransferState.DONE:
            raise RuntimeError(f"transfer failed: {h.error}")
        return dt

    def close(self) -> None:
        self.tx.close()
        self.parent.send(b"done")
        self.proc.join(10)


def measure(size: int, repeat: int, name: str, options: dict, layouts: list[str], src_device: str,
            dst_device: str) -> tuple[float, dict[str, float]]:
    """Median GB/s of the ceiling and of each layout, measured in alternation so that both see
    the same machine (a 2-core box drifts by tens of percent from one second to the next)."""
    if name == "cuda_ipc":
        ceilings = {"ceiling": DeviceCopy(size, src_device, dst_device)}
    else:
        ceilings = {"raw": RawSocket(size, False), "raw-chunked": RawSocket(size, True)}
    runners = {**ceilings, **{layout: Sender(name, options, size, layout, src_device, dst_device)
                              for layout in layouts}}
    times: dict[str, list[float]] = {k: [] for k in runners}
    try:
        for i in range(repeat + 1):
            for key, runner in runners.items():
                dt = runner.once()
                if i:  # round 0 warms connections and touches the pages
                    times[key].append(dt)
    finally:
        for r in runners.values():
            r.close()
    gbps = {k: size / statistics.median(v) / 1e9 for k, v in times.items()}
    # The ceiling is the best of the ceiling methods: the transport must beat each of them.
    return max(gbps.pop(k) for k in ceilings), gbps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transport", default="tcp")
    ap.add_argument("--sizes", default="1M,16M,128M,1G")
    ap.add_argument("--layout", default="contiguous,paged")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--streams", type=int, default=None, help="tcp: connections per peer")
    ap.add_argument("--devices", default=None,
                    help="GPU transports: source,destination device (default cuda:0,cuda:<last>)")
    args = ap.parse_args(argv)
    src_device, dst_device = pick_devices(args.transport, args.devices)
    options = {"streams": args.streams} if args.streams else {}
    ok, reason = transports.available(args.transport)
    if not ok:
        print(f"transport {args.transport} unavailable: {reason}")
        return 1
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    where = f"{src_device} -> {dst_device}" + (f" ({torch.cuda.get_device_name(0)})" if "cuda" in src_device else "")
    print(f"# {args.transport} transfer between two processes, {where}; median of {args.repeat}")
    print(f"# python {sys.version.split()[0]}, torch {torch.__version__}, {mp.cpu_count()} cpus")
    ceiling_name = "device copy GB/s" if args.transport == "cuda_ipc" else "raw socket GB/s"
    print(f"{'size':>9} {'layout':>10} {'transport GB/s':>15} {ceiling_name:>16} {'ratio':>6}")
    for size in sizes:
        ceiling, got = measure(size, args.repeat, args.transport, options, args.layout.split(","),
                               src_device, dst_device)
        for layout, gbps in got.items():
            print(f"{human(size):>9} {layout:>10} {gbps:>15.2f} {ceiling:>16.2f} {gbps / ceiling:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
