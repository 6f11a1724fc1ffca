"""Landing words: how a writer tells the decode's loader, with no host hop of its own, that a
hand-off's bytes are in.

The decode keeps a small file in ``/dev/shm`` (mode 0600, a random name that only its
authenticated peers learn, in its transport's descriptor): a process-shared POSIX semaphore,
then one 32-bit word per *place* (a pool page, or a vLLM block for direct hand-offs;
``handoff.signal_of``). A writer maps the same file. After a hand-off's last byte it writes the
reservation's generation into the hand-off's word and posts the semaphore: cuda_ipc from its copy
stream (``cuStreamWriteValue32`` into the file's pages registered with CUDA, then
``cuLaunchHostFunc`` calling libc's ``sem_post``: no Python, no thread of ours), loopback from its
copy thread. The decode's loader thread sleeps on that semaphore (its other wake-ups, from the
pool, post it too), looks at the words of the loads it has planned, and ends each whose word holds
its generation: TransferDone, the control server and a second thread leave the path between the
last byte and the load's end (docs/benchmarks.md: about 1 ms of a 16 MiB hand-off on one GPU).

Why host memory and not a word on the GPU: nothing on the decode's GPU waits for the bytes (a
stream blocked in ``cuStreamWaitValue32`` blocked a device-wide synchronize and streams sharing its
hardware queue, the reason the earlier design stayed off), and a host thread reads host memory
without a copy or a stream.

A word is only a hint that may be late, never a lie: only the hand-off's own writer writes its
generation, after its bytes (a late write by the writer of an ended reservation carries another
generation; it may overwrite a newer one, and that load then waits for TransferDone as before).

*Launched marks* (a decode whose loader watches: ``spin_s`` > 0, a flag in the file's header):
as a writer queues a hand-off's last copy it also sets, from its host thread, the generation with
:data:`LAUNCHED` into the word (unless the write landed already) and posts the semaphore. The loader, woken, sees the mark
and watches the word from a C loop (csrc/landing_spin.c, no GIL, at most ``spin_s`` per load)
instead of sleeping: the GPU's write of the generation reaches host memory microseconds after the
last byte, while the post from CUDA's host-function thread comes 50-150 us later. A mark is
never a generation (generations stay below :data:`LAUNCHED`), so it proves nothing.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import secrets
import threading
import time

import numpy as np

from lmcache_pd import host_build

_HEADER = 64  # the semaphore (sem_t: 32 bytes on x86-64 glibc), the spin flag, then the words, 64-byte aligned
_SPINS_AT = 32  # a 32-bit word in the header: 1 where the loader watches launched marks
LAUNCHED = 0x8000_0000
"""Set in a word by its writer as the hand-off's last copy is queued (a *mark*); generations stay
below it (handoff.signal_of)."""
_DIR = "/dev/shm"
_PREFIX = "lmcache-pd-landing-"
_CLOCK_MONOTONIC = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_sem_post = _libc.sem_post
_sem_post.argtypes = [ctypes.c_void_p]
_sem_trywait = _libc.sem_trywait
_sem_trywait.argtypes = [ctypes.c_void_p]
_sem_clockwait = getattr(_libc, "sem_clockwait", None)  # glibc 2.30+: a deadline on the monotonic clock
if _sem_clockwait is not None:
    _sem_clockwait.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Timespec)]
_sem_timedwait = _libc.sem_timedwait
_sem_timedwait.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]
SEM_POST = ctypes.cast(_sem_post, ctypes.c_void_p).value
"""libc's ``sem_post``, for ``cuLaunchHostFunc`` (it runs on CUDA's own thread, without Python)."""


@functools.cache
def _compiled() -> tuple[object, object] | None:
    """csrc/landing_spin.c's watch and mark, or None (no C compiler: loads wait on the semaphore,
    and writers mark nothing)."""
    dll = host_build.library("landing_spin.c", "loaders sleep on the landing semaphore, without watching")
    if dll is None:
        return None
    spin = dll.pd_spin_words
    spin.restype = ctypes.c_int
    spin.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
    mark = dll.pd_mark_word
    mark.restype = ctypes.c_int
    mark.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32]
    return spin, mark


def _pid_ns() -> str:
    """This process's PID namespace (its inode): a pid means a process only within it."""
    try:
        return os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return "0"


def _sweep() -> None:
    """Remove the landing words of our user's processes that died without closing them (killed):
    only those named from our PID namespace, whose pid no process has now."""
    ns, uid = _pid_ns(), os.getuid()
    try:
        names = [n for n in os.listdir(_DIR) if n.startswith(f"{_PREFIX}{ns}-")]
    except OSError:
        return
    for name in names:
        try:
            pid = int(name[len(_PREFIX) + len(ns) + 1:].split("-")[0])
            path = os.path.join(_DIR, name)
            if os.stat(path).st_uid != uid:
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
            except OSError:
                pass
        except (OSError, ValueError):  # (alive under another user, gone meanwhile, not ours)
            continue


def _size(slots: int) -> int:
    return -(-(_HEADER + 4 * slots) // mmap.PAGESIZE) * mmap.PAGESIZE


class _Mapped:
    def __init__(self, fd: int, nbytes: int, slots: int):
        self.slots = slots
        self.nbytes = nbytes
        self._map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._buf = (ctypes.c_char * nbytes).from_buffer(self._map)
        self.address = ctypes.addressof(self._buf)
        self.sem = self.address  # (the header's first bytes)
        self.words = np.frombuffer(self._buf, dtype=np.uint32, count=slots, offset=_HEADER)
        self._spins = np.frombuffer(self._buf, dtype=np.uint32, count=1, offset=_SPINS_AT)

    def word_address(self, slot: int) -> int:
        return self.address + _HEADER + 4 * slot

    def post(self) -> None:
        if self.words.size:  # (not once closed: the semaphore is gone with the mapping)
            _sem_post(self.sem)

    def close(self) -> None:
        self.words = np.zeros(0, dtype=np.uint32)
        self._spins = np.zeros(1, dtype=np.uint32)
        del self._buf
        self._map.close()


class LandingWords(_Mapped):
    """The decode's side: creates the file, reads the words, sleeps on the semaphore. ``spin_s``:
    the longest the loader watches a launched hand-off's word (0: never; also 0 where the watch
    cannot be built: no C compiler)."""

    def __init__(self, slots: int, spin_s: float = 0.0):
        if slots <= 0:
            raise ValueError("landing words need at least one slot")
        fns = _compiled() if spin_s > 0 else None
        self._spin = fns[0] if fns is not None else None
        self.spin_s = spin_s if self._spin is not None else 0.0
        _sweep()
        self.name = _PREFIX + f"{_pid_ns()}-{os.getpid()}-{secrets.token_hex(8)}"
        self._path = os.path.join(_DIR, self.name)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            nbytes = _size(slots)
            os.ftruncate(fd, nbytes)  # (zero-filled: every word 0, which no generation is)
            super().__init__(fd, nbytes, slots)
        except BaseException:
            os.unlink(self._path)
            raise
        finally:
            os.close(fd)
        if _libc.sem_init(ctypes.c_void_p(self.sem), 1, 0) != 0:  # pshared: posted by other processes
            err = ctypes.get_errno()
            self.close()
            raise OSError(err, "sem_init failed")
        self._spins[0] = int(self.spin_s > 0)  # (before any writer maps the file: its name is not out yet)

    def holds(self, slot: int, value: int) -> bool:
        return 0 <= slot < self.words.size and int(self.words[slot]) == value  # (size 0 once closed)

    def launched(self, slot: int, value: int) -> bool:
        """The word holds its writer's mark: the hand-off's last copy is queued, its bytes not yet in."""
        return 0 <= slot < self.words.size and int(self.words[slot]) == (value | LAUNCHED)

    def spin(self, watch: list[tuple[int, int]], budget_s: float) -> int | None:
        """Watch the words ``watch`` ((slot, value) each; slots checked by the caller) for up to
        ``budget_s`` without the GIL; the index of one that holds its value, else None (the
        budget ran out, or the semaphore was posted: those posts are taken, as :meth:`wait`
        takes them, and the caller looks again)."""
        if self._spin is None or not watch or not self.words.size:
            return None
        slots = np.array([w[0] for w in watch], dtype=np.int64)
        values = np.array([w[1] for w in watch], dtype=np.uint32)
        if slots.min() < 0 or slots.max() >= self.words.size:
            raise ValueError("a watched landing word outside the words")
        base = self.word_address(0)
        rc = self._spin(base, slots.ctypes.data, values.ctypes.data, len(watch), self.sem,
                        int(max(0.0, budget_s) * 1e9))
        if rc == -1:
            while _sem_trywait(self.sem) == 0:
                pass
        return rc if rc >= 0 else None

    def wait(self, timeout_s: float) -> bool:
        """Sleep (without the GIL) until a post or ``timeout_s``; True if posted. Posts that came
        meanwhile are taken too: one look serves them all."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        ts = _Timespec(int(deadline), int((deadline % 1) * 1e9))
        while True:
            if _sem_clockwait is not None:
                rc = _sem_clockwait(self.sem, _CLOCK_MONOTONIC, ctypes.byref(ts))
            else:  # (older glibc: the realtime clock, for the same span)
                wall = time.time() + max(0.0, deadline - time.monotonic())
                rc = _sem_timedwait(self.sem, ctypes.byref(_Timespec(int(wall), int((wall % 1) * 1e9))))
            if rc == 0:
                break
            if ctypes.get_errno() != errno.EINTR:  # ETIMEDOUT
                return False
        while _sem_trywait(self.sem) == 0:
            pass
        return True

    def close(self) -> None:
        if not self.words.size:
            return
        super().close()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass


class LandingMap(_Mapped):
    """A writer's side: a peer's words mapped here (same node: the name is a file in /dev/shm)."""

    def __init__(self, name: str, slots: int):
        if not name.startswith(_PREFIX) or "/" in name or slots <= 0:
            raise ValueError(f"not a landing-words name: {name!r}")
        self.name = name
        fd = os.open(os.path.join(_DIR, name), os.O_RDWR)
        try:
            nbytes = os.fstat(fd).st_size
            if nbytes < _HEADER + 4 * slots:
                raise ValueError(f"landing words {name!r} hold fewer than {slots} slots")
            super().__init__(fd, nbytes, slots)
        finally:
            os.close(fd)
        self._lock = threading.Lock()  # (a write from a copy thread against a close)
        # Where the peer's loader watches marks, the compare-and-swap that sets them, loaded here
        # (built at first use: not on the thread that launches a hand-off); None: mark nothing.
        fns = _compiled() if self._spins[0] else None
        self._mark = fns[1] if fns is not None else None

    def write(self, slot: int, value: int) -> None:
        """From this host thread (loopback): the word, then the post."""
        with self._lock:
            if 0 <= slot < self.words.size:
                self.words[slot] = value
                self.post()

    def mark(self, slot: int, value: int) -> None:
        """The hand-off's last copy is about to be queued (or is): its mark and a post, where the
        peer's loader watches marks (nothing otherwise: a post would only wake it for nothing).
        A compare-and-swap (csrc/landing_spin.c): a mark never hides ``value`` landed already.
        Best before the launch: the loader then wakes while the copy runs and watches the word
        as it lands (one H100, 16 MiB direct: 0.17-0.22 ms to the load's end, against 0.28 with
        the mark after the launch, the loader then finding the word already there)."""
        with self._lock:
            if 0 <= slot < self.words.size and self._mark is not None:
                self._mark(self.word_address(slot), value, LAUNCHED)
                self.post()

    def close(self) -> None:
        with self._lock:
            if self.words.size:
                super().close()
