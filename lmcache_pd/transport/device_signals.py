"""Device-side signals: a 32-bit value written into GPU memory by one stream, waited for by another.

Two CUDA driver calls, through ctypes (CuPy does not wrap them): ``cuStreamWriteValue32`` puts a
write of ``value`` at ``address`` on a stream, after the work queued before it (with a memory
barrier: the writes before it are visible first); ``cuStreamWaitValue32`` makes a stream wait,
on the GPU, until the word at ``address`` equals ``value``. The prefill's copy stream writes,
through the peer's CUDA IPC mapping, into a slot beside the decode pool; the decode's loader
stream waits on it with the scatter queued behind. No thread of either process wakes between
the bytes landing and the scatter starting.

The waiting stream holds no SM while it waits (the GPU's front end does), but nothing else on
it runs until the value comes: a receiver that gives up writes the value itself
(:func:`write` on another stream), so that no stream of ours waits forever.

:class:`Notifier` tells a host thread that queued work ended without a Python callback on
CUDA's own thread (which would need the GIL: a thread that holds it while a device-wide
synchronization waits for that callback would deadlock the process): ``cuLaunchHostFunc``
calls libc's ``sem_post`` on a POSIX semaphore, and the waiting thread sleeps in ``sem_wait``.
"""

from __future__ import annotations

import ctypes
import threading

_WAIT_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ
_WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: ordered after prior writes (a barrier)
_lib: tuple[object, object, object] | None = None
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
        raise RuntimeError(f"CUDA driver error {rc} in a stream memory operation")


def write(device: int, stream: int, address: int, value: int) -> None:
    """Queue, on ``stream``, the write of ``value`` at ``address`` (after the stream's prior work)."""
    _call(_calls()[0], device, ctypes.c_void_p(stream), ctypes.c_uint64(address), ctypes.c_uint32(value),
          _WRITE_DEFAULT)


def wait(device: int, stream: int, address: int, value: int) -> None:
    """Queue, on ``stream``, a wait until the word at ``address`` equals ``value``."""
    _call(_calls()[1], device, ctypes.c_void_p(stream), ctypes.c_uint64(address), ctypes.c_uint32(value), _WAIT_EQ)


class Notifier:
    """A POSIX semaphore posted by the GPU's host-function thread (no Python runs there)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._sem = ctypes.create_string_buffer(64)  # sem_t is 32 bytes on x86-64 glibc
        if self._libc.sem_init(self._sem, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "sem_init failed")
        self._post = ctypes.cast(self._libc.sem_post, ctypes.c_void_p)

    def after(self, device: int, stream: int) -> None:
        """Post once ``stream``'s work queued so far has run."""
        _call(_calls()[2], device, ctypes.c_void_p(stream), self._post, ctypes.cast(self._sem, ctypes.c_void_p))

    def post(self) -> None:
        self._libc.sem_post(self._sem)

    def wait(self) -> None:
        """Sleep (without the GIL: ctypes releases it) until a post."""
        while self._libc.sem_wait(self._sem) != 0:  # EINTR: a signal came; wait again
            pass
