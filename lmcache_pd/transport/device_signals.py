"""Stream memory operations and host functions, through ctypes (CuPy does not wrap them).

``cuStreamWriteValue32`` puts a write of ``value`` at ``address`` on a stream, after the work
queued before it (with a memory barrier: the writes before it are visible first). cuda_ipc's
copy stream writes, after a hand-off's bytes, the reservation's generation into the decode's
landing word: host memory that both processes map (landing.py), page-locked here for the GPU
(:func:`host_register`), then posts the decode loader's semaphore (:func:`post_after`:
``cuLaunchHostFunc`` calling libc's ``sem_post``, so no Python runs on CUDA's own thread, which
would need the GIL: a thread holding it while a device-wide synchronization waits for that
callback would deadlock the process).

``cuStreamWaitValue32`` makes a stream wait, on the GPU, until a word equals a value
(benchmarks/gpu_floor.py's orderings). No stream of ours waits so: a stream blocked in it
blocks a device-wide synchronize of its process, and the streams the driver put on its hardware
queue (node/loader.py's history of it).

:class:`Notifier` tells a host thread that queued work ended (the same host function, on a
semaphore of its own).
"""

from __future__ import annotations

import ctypes
import logging
import threading

from lmcache_pd.transport.landing import SEM_POST, LandingMap

log = logging.getLogger(__name__)

_WAIT_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ
_WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: ordered after prior writes (a barrier)
_CU_MEMHOSTREGISTER = 0x1 | 0x2  # PORTABLE (every context) | DEVICEMAP (a device address for it)
_lib: tuple[object, object, object] | None = None
_host: tuple[object, object, object] | None = None
_lib_lock = threading.Lock()
_bound = threading.local()


def _calls() -> tuple[object, object, object]:
    global _lib
    with _lib_lock:
        if _lib is None:
            cuda = ctypes.CDLL("libcuda.so.1")
            fns = []
            # The _v2 entry points need no device attribute (CUDA 11.7+ drivers); the plain names
            # are the first version, which some drivers enable only on request.
            for name in ("cuStreamWriteValue32", "cuStreamWaitValue32"):
                fn = getattr(cuda, name + "_v2", None) or getattr(cuda, name)
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
                fns.append(fn)
            host = cuda.cuLaunchHostFunc
            host.restype = ctypes.c_int
            host.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            _lib = (fns[0], fns[1], host)
        return _lib


def _host_calls() -> tuple[object, object, object]:
    global _host
    with _lib_lock:
        if _host is None:
            cuda = ctypes.CDLL("libcuda.so.1")
            reg = getattr(cuda, "cuMemHostRegister_v2", None) or cuda.cuMemHostRegister
            reg.restype = ctypes.c_int
            reg.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            ptr = getattr(cuda, "cuMemHostGetDevicePointer_v2", None) or cuda.cuMemHostGetDevicePointer
            ptr.restype = ctypes.c_int
            ptr.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
            unreg = cuda.cuMemHostUnregister
            unreg.restype = ctypes.c_int
            unreg.argtypes = [ctypes.c_void_p]
            _host = (reg, ptr, unreg)
        return _host


def _call(fn, device: int, *args) -> None:
    from cupy.cuda import runtime

    current = runtime.getDevice()
    bind = current != device or not getattr(_bound, "ok", False)
    if bind:  # a driver call needs the device's context current on this thread
        runtime.setDevice(device)
    try:
        rc = fn(*args)
    finally:
        if current != device:
            runtime.setDevice(current)
    _bound.ok = True
    if rc != 0:
        raise RuntimeError(f"CUDA driver error {rc} in a stream memory operation or host registration")


def write(device: int, stream: int, address: int, value: int) -> None:
    """Queue, on ``stream``, the write of ``value`` at ``address`` (after the stream's prior work)."""
    _call(_calls()[0], device, ctypes.c_void_p(stream), ctypes.c_uint64(address), ctypes.c_uint32(value),
          _WRITE_DEFAULT)


def wait(device: int, stream: int, address: int, value: int) -> None:
    """Queue, on ``stream``, a wait until the word at ``address`` equals ``value``."""
    _call(_calls()[1], device, ctypes.c_void_p(stream), ctypes.c_uint64(address), ctypes.c_uint32(value), _WAIT_EQ)


def post_after(device: int, stream: int, sem: int) -> None:
    """Queue, on ``stream``, libc's ``sem_post(sem)`` once the work queued before it has run
    (``cuLaunchHostFunc``: CUDA's own thread calls it, no Python runs; ``sem`` may be a
    process-shared semaphore another process sleeps on)."""
    _call(_calls()[2], device, ctypes.c_void_p(stream), ctypes.c_void_p(SEM_POST), ctypes.c_void_p(sem))


def host_register(device: int, address: int, nbytes: int) -> int:
    """Page-lock host memory (here: a file both processes map) for the GPU; its device address."""
    reg, ptr, _ = _host_calls()
    _call(reg, device, ctypes.c_void_p(address), ctypes.c_size_t(nbytes), _CU_MEMHOSTREGISTER)
    out = ctypes.c_uint64()
    try:
        _call(ptr, device, ctypes.byref(out), ctypes.c_void_p(address), 0)
    except RuntimeError:
        host_unregister(device, address)
        raise
    return out.value


def host_unregister(device: int, address: int) -> None:
    _call(_host_calls()[2], device, ctypes.c_void_p(address))


class Notifier:
    """A POSIX semaphore posted by the GPU's host-function thread (no Python runs there)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._sem = ctypes.create_string_buffer(64)  # sem_t is 32 bytes on x86-64 glibc
        if self._libc.sem_init(self._sem, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "sem_init failed")

    def after(self, device: int, stream: int) -> None:
        """Post once ``stream``'s work queued so far has run."""
        post_after(device, stream, ctypes.addressof(self._sem))

    def post(self) -> None:
        self._libc.sem_post(self._sem)

    def wait(self) -> None:
        """Sleep (without the GIL: ctypes releases it) until a post."""
        while self._libc.sem_wait(self._sem) != 0:  # EINTR: a signal came; wait again
            pass


class Ring:
    """A peer's landing words mapped here and page-locked for our GPU: the queueing thread marks a
    word launched (where the peer's loader watches marks), the copy stream then writes it and
    posts the peer's semaphore."""

    def __init__(self, words: LandingMap, device: int):
        self.words, self.device = words, device
        self.base = host_register(device, words.address, words.nbytes)  # its device address
        self.users = 0  # peers (the pool's, its blocks') that signal through it

    def bound(self, slot: int, value: int) -> Bell | None:
        """What ends a batch with the landing signal (slot, value) (None: a slot outside the
        peer's words)."""
        if not 0 <= slot < self.words.slots:
            return None
        return Bell(self, slot, value)

    def close(self) -> None:
        try:
            host_unregister(self.device, self.words.address)
        except RuntimeError as e:
            log.debug("unregistering landing words failed: %s", e)
        self.words.close()


class Bell:
    """One batch's landing signal: :meth:`mark` from the thread about to queue the batch's last
    copy (landing.py's launched mark: where the peer's loader watches, it wakes now, and watches
    the word by the time the bytes land), then :meth:`ring` on the stream after the copy: the
    word's write and the post."""

    def __init__(self, ring: Ring, slot: int, value: int):
        self._ring, self._slot, self._value = ring, slot, value
        self._at = ring.base + ring.words.word_address(slot) - ring.words.address  # its device address
        self._marked = False

    def mark(self) -> None:
        if not self._marked:
            self._marked = True
            self._ring.words.mark(self._slot, self._value)

    def ring(self, stream: int) -> None:
        write(self._ring.device, stream, self._at, self._value)  # after the copy, with a barrier
        post_after(self._ring.device, stream, self._ring.words.sem)
        self.mark()  # (where nobody marked it ahead; a mark never hides a landed value)
