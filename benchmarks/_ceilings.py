"""Ceilings the transports are compared against, each measured in the same run.

  RawSocket  — TCP: a plain socket from one process into a preallocated buffer in another,
               acknowledged after the last byte (the semantics of a transport batch);
  DeviceCopy — GPU paths: ``dst.copy_(src)`` in one process between the same two devices (peer
               access on), until complete;
  HostCopy   — host paths other than TCP: ``dst.copy_(src)`` between two host buffers (pinned
               when a GPU exists), the memory-bandwidth bound of any host-to-host transport.
Each has ``once() -> seconds`` and ``close()``.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import struct
import time

import numpy as np
import torch
from _common import sync

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
    """As one buffer (``chunked=False``) or as 64 KiB pieces (``chunked=True``)."""

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


class DeviceCopy:
    def __init__(self, size: int, src_device: str, dst_device: str):
        self.src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=src_device)
        self.dst = torch.empty(size, dtype=torch.uint8, device=dst_device)
        sync(src_device)

    def once(self) -> float:
        t0 = time.perf_counter()
        self.dst.copy_(self.src)
        sync(self.dst.device)
        sync(self.src.device)
        return time.perf_counter() - t0

    def close(self) -> None:
        del self.src, self.dst


class HostCopy(DeviceCopy):
    def __init__(self, size: int, *_devices: str):
        pin = torch.cuda.is_available()
        self.src = torch.randint(0, 256, (size,), dtype=torch.uint8).pin_memory() if pin else \
            torch.randint(0, 256, (size,), dtype=torch.uint8)
        self.dst = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        self.dst.fill_(0)  # touch the pages outside the timed copies


def ceilings_for(transport: str, size: int, src_device: str, dst_device: str) -> dict:
    """The ceiling methods for a transport on these devices; the best of them is the ceiling."""
    if torch.device(src_device).type == "cuda" or torch.device(dst_device).type == "cuda":
        return {"device copy": DeviceCopy(size, src_device, dst_device)}
    if transport == "tcp":  # (and a host copy: on one host its receiver reads the sender's memory itself)
        return {"raw socket": RawSocket(size, False), "raw socket, 64 KiB pieces": RawSocket(size, True),
                "host copy": HostCopy(size)}
    return {"host copy": HostCopy(size)}


def best_ceiling(transport: str, size: int, src_device: str, dst_device: str):
    """The fastest of :func:`ceilings_for`'s methods on one probe (the others closed)."""
    methods = list(ceilings_for(transport, size, src_device, dst_device).values())
    best = min(methods, key=lambda c: c.once())
    for other in methods:
        if other is not best:
            other.close()
    return best
