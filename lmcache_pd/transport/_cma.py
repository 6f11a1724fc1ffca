"""Cross-memory reads (Linux ``process_vm_readv``): tcp's same-host path.

When the two ends of a tcp connection run on one host, the receiver copies each batch straight
out of the sender's memory instead of out of the socket. On loopback the kernel does most of a
TCP send's work (the copy into socket buffers and the receive stack) on the *sender's* core;
with reads the sender's core does none of it, and the receiver's one copy is the only one.
That is what a prefill confined to one core needs while its forward runs (docs/benchmarks.md).

The kernel allows the read only to a process that could ptrace the target (same user, or
CAP_SYS_PTRACE). A pid means something only on one host and in one pid namespace: ``host_id``
names both, and the sender proves a pid is its own (``read_proof``) before any read is trusted.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
from functools import cache

import numpy as np

from lmcache_pd.transport._tcp_wire import _IOV_MAX  # the kernel's bound on a call's ranges, as for sendmsg


@cache
def _readv():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.process_vm_readv
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_ssize_t
    return fn


@cache
def host_id() -> bytes:
    """16 bytes naming this boot of this host and this process's pid namespace (zeros: unknown,
    which matches no one's, as ``offer`` sends none then)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip()
        pidns = os.readlink("/proc/self/ns/pid").encode()
    except OSError:
        return bytes(16)
    return hashlib.sha256(boot + b"/" + pidns).digest()[:16]


def supported() -> bool:
    return _readv() is not None and host_id() != bytes(16)


class ReadError(OSError):
    pass


def read(pid: int, dst: np.ndarray, src: np.ndarray, lengths: np.ndarray) -> None:
    """Copy ``lengths[i]`` bytes from address ``src[i]`` of process ``pid`` to our address
    ``dst[i]``, every range or raise ReadError (a short read is a fault: the range was not mapped).

    The GIL is released for each system call (ctypes does), at most _IOV_MAX ranges a call."""
    fn = _readv()
    if fn is None:
        raise ReadError(errno.ENOSYS, "process_vm_readv is not available")
    n = len(lengths)
    local = np.empty((n, 2), dtype=np.uint64)  # struct iovec {void *base; size_t len;}, on 64-bit Linux
    local[:, 0], local[:, 1] = dst, lengths
    remote = np.empty((n, 2), dtype=np.uint64)
    remote[:, 0], remote[:, 1] = src, lengths
    for i in range(0, n, _IOV_MAX):
        k = min(_IOV_MAX, n - i)
        want = int(lengths[i:i + k].sum())
        got = fn(pid, local[i:].ctypes.data, k, remote[i:].ctypes.data, k, 0)
        if got != want:
            err = ctypes.get_errno() if got < 0 else errno.EFAULT
            raise ReadError(err, f"read {got} of {want} bytes from process {pid}: {os.strerror(err)}")


def read_proof(pid: int, address: int, expected: bytes) -> str:
    """Why ``pid`` cannot be read, or "" when ``address`` there holds ``expected``: the sender put
    its hello's fresh nonce there, so a key holder cannot name another process (say, one of a user
    it cannot read itself) and have us copy that one's memory into the pool."""
    got = np.zeros(len(expected), dtype=np.uint8)
    try:
        read(pid, np.array([got.ctypes.data], dtype=np.uint64), np.array([address], dtype=np.uint64),
             np.array([len(expected)], dtype=np.uint64))
    except ReadError as e:
        return str(e)
    return "" if got.tobytes() == expected else f"process {pid} does not hold this connection's nonce"
