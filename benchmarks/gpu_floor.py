"""The floor under a hand-off between two processes on one GPU, with timestamps taken on the GPU.

A hand-off on one GPU is: the prefill's copy into the decode's memory, then the decode's scatter
of the same bytes, then a decode thread that learns of it. ``benchmarks/handoff.py`` measures our
whole path; this script measures the same three steps with nothing of ours in them (raw CUDA
calls through CuPy and ctypes, no zmq, no threads of ours), in several orderings, so that what
our path adds, and what two CUDA contexts sharing one GPU cost by themselves, can be told apart:

- ``signal, armed first``: the decode queues ``cuStreamWaitValue32`` + the scatter + a host
  notification (``cuLaunchHostFunc`` -> ``sem_post``) before the prefill copies; the prefill's
  stream writes the value after its copy (what ``transport.options.signals`` does);
- ``signal, armed after``: the prefill copies and writes the value, then tells the decode
  through a pipe, which queues the same wait + scatter + notification (a "launching" message);
- ``host ordered``: the prefill copies and synchronizes its stream, tells the decode through a
  pipe, which scatters and synchronizes (what our path does without signals, less zmq);
- ``one process``: the same as ``signal, armed first`` with both streams in one process (one
  context);
- ``landing word``: the decode's thread sleeps on the semaphore of its landing words
  (lmcache_pd/transport/landing.py); the prefill's stream, after its copy, writes the word in
  that host memory and posts the semaphore from CUDA's host-function thread (what
  ``transport.options.signals`` does now); the decode thread wakes and finds the word (a direct
  hand-off: nothing to scatter); ``landing word, scatter``: the same, then the decode launches
  the scatter and synchronizes (a hand-off through the pool);
- ``copy only``: the prefill's copy into the decode's memory, launch to synchronize.

Each step is stamped on the GPU (a one-thread kernel reading ``%globaltimer``, one device-wide
nanosecond clock, so that both processes' stamps compare); the host's launch and wake-up are
stamped with ``time.time_ns()``, and the offset between the two clocks is measured first.

    python benchmarks/gpu_floor.py --sizes 2M,16M,1G --repeat 30
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import parse_size  # noqa: E402

from lmcache_pd.transport.landing import LandingMap, LandingWords  # noqa: E402

_STAMP_SRC = r"""
extern "C" __global__ void stamp(unsigned long long* out, int i) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    out[i] = t;
}
"""
# GPU stamps of one round (slots in each process's stamp buffer)
P_START, P_COPIED, P_SIGNALED = 0, 1, 2
D_ARMED, D_RELEASED, D_SCATTERED = 3, 4, 5
SLOTS = 6


def _stamper():
    import cupy

    return cupy.RawKernel(_STAMP_SRC, "stamp")


def _stamp(kernel, stream, buf, slot: int) -> None:
    import numpy as np

    kernel((1,), (1,), (buf, np.int32(slot)), stream=stream)


def _offset_ns(kernel, stream, buf) -> int:
    """globaltimer - time.time_ns(), from the tightest of 20 stamps bracketed by host clocks."""
    best = None
    for _ in range(20):
        a = time.time_ns()
        _stamp(kernel, stream, buf, 0)
        stream.synchronize()
        b = time.time_ns()
        g = int(buf[0].get())
        if best is None or b - a < best[0]:
            best = (b - a, g - (a + b) // 2)
    return best[1]


def _arm(kernel, stream, stamps, device: int, word: int, value: int, dst: int, src: int, nbytes: int,
         notifier) -> None:
    """Queue on ``stream``: a wait until ``word`` holds ``value``, the scatter's copy, the host
    notification; each stamped."""
    from cupy.cuda import runtime

    from lmcache_pd.transport import device_signals as sig

    _stamp(kernel, stream, stamps, D_ARMED)
    sig.wait(device, stream.ptr, word, value)
    _stamp(kernel, stream, stamps, D_RELEASED)
    runtime.memcpyAsync(dst, src, nbytes, runtime.memcpyDeviceToDevice, stream.ptr)
    _stamp(kernel, stream, stamps, D_SCATTERED)
    notifier.after(device, stream.ptr)


def _segments(t0: int, woken: int, p: list[int], d: list[int], p_offset: int, d_offset: int,
              seen: int = 0) -> dict[str, float]:
    """One round's steps, us: host clocks ``t0`` (launch) and ``woken``, GPU stamps ``p`` and ``d``
    (each process's offset: globaltimer - time.time_ns()); ``seen``: a landing word's reader woke."""
    if seen:
        out = {"total": (woken - t0) / 1e3, "launch -> copy starts": (p[P_START] - t0 - p_offset) / 1e3,
               "copy": (p[P_COPIED] - p[P_START]) / 1e3,
               "copied -> word seen": (seen + p_offset - p[P_COPIED]) / 1e3}
        if woken > seen:
            out |= {"copied -> scatter starts": (d[D_RELEASED] - p[P_COPIED]) / 1e3,
                    "scatter": (d[D_SCATTERED] - d[D_RELEASED]) / 1e3,
                    "scattered -> host woken": (woken + d_offset - d[D_SCATTERED]) / 1e3}
        return out
    return {"total": (woken - t0) / 1e3,
            "launch -> copy starts": (p[P_START] - t0 - p_offset) / 1e3,
            "copy": (p[P_COPIED] - p[P_START]) / 1e3,
            "copied -> scatter starts": (d[D_RELEASED] - p[P_COPIED]) / 1e3,
            "scatter": (d[D_SCATTERED] - d[D_RELEASED]) / 1e3,
            "scattered -> host woken": (woken + d_offset - d[D_SCATTERED]) / 1e3}


def _decode(conn, nbytes: int, device: int) -> None:
    """The decode process: owns the destination, the value word and the scatter's target."""
    import cupy
    from cupy.cuda import runtime

    from lmcache_pd.transport import device_signals as sig

    cupy.cuda.Device(device).use()
    landing = runtime.malloc(nbytes)
    blocks = runtime.malloc(nbytes)
    word_ptr = runtime.malloc(4)
    runtime.memset(word_ptr, 0, 4)
    stamps = cupy.zeros(SLOTS, dtype=cupy.uint64)
    kernel = _stamper()
    stream = cupy.cuda.Stream(non_blocking=True)
    notifier = sig.Notifier()
    words = LandingWords(16)
    conn.send((runtime.ipcGetMemHandle(landing), runtime.ipcGetMemHandle(word_ptr),
               _offset_ns(kernel, stream, stamps), words.name))

    def arm(value: int) -> None:
        _arm(kernel, stream, stamps, device, word_ptr, value, blocks, landing, nbytes, notifier)

    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        mode, value = msg
        seen = 0
        if mode.startswith("landing"):
            conn.send("waiting")
            while not words.holds(0, value):
                words.wait(5.0)
            seen = time.time_ns()
            if mode == "landing word, scatter":
                _stamp(kernel, stream, stamps, D_RELEASED)
                runtime.memcpyAsync(blocks, landing, nbytes, runtime.memcpyDeviceToDevice, stream.ptr)
                _stamp(kernel, stream, stamps, D_SCATTERED)
                stream.synchronize()
        elif mode == "armed first":
            arm(value)
            conn.send("armed")
            notifier.wait()
        elif mode == "armed after":
            conn.recv()  # the prefill launched its copy and the value's write
            arm(value)
            notifier.wait()
        else:  # host ordered
            conn.recv()  # the prefill's copy is done
            _stamp(kernel, stream, stamps, D_RELEASED)
            runtime.memcpyAsync(blocks, landing, nbytes, runtime.memcpyDeviceToDevice, stream.ptr)
            _stamp(kernel, stream, stamps, D_SCATTERED)
            stream.synchronize()
        woken = time.time_ns() if mode != "landing word" else seen
        conn.send((woken, [int(x) for x in stamps.get()], seen))
    words.close()
    runtime.free(landing)
    runtime.free(blocks)
    runtime.free(word_ptr)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(nbytes: int, repeat: int, device: int) -> dict[str, dict[str, float]]:
    import cupy
    from cupy.cuda import runtime

    from lmcache_pd.transport import device_signals as sig

    cupy.cuda.Device(device).use()
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_decode, args=(child_conn, nbytes, device), daemon=True)
    child.start()
    landing_h, word_h, d_offset, words_name = conn.recv()
    ring = LandingMap(words_name, 16)
    ring_dev = sig.host_register(device, ring.address, ring.nbytes)
    word0 = ring_dev + ring.word_address(0) - ring.address
    landing = runtime.ipcOpenMemHandle(landing_h)
    word = runtime.ipcOpenMemHandle(word_h)
    src = runtime.malloc(nbytes)
    runtime.memset(src, 1, nbytes)
    stamps = cupy.zeros(SLOTS, dtype=cupy.uint64)
    kernel = _stamper()
    stream = cupy.cuda.Stream(non_blocking=True)
    offset = _offset_ns(kernel, stream, stamps)
    value = 0
    results: dict[str, dict[str, float]] = {}

    def copy_and_signal(v: int) -> None:
        _stamp(kernel, stream, stamps, P_START)
        runtime.memcpyAsync(landing, src, nbytes, runtime.memcpyDeviceToDevice, stream.ptr)
        _stamp(kernel, stream, stamps, P_COPIED)
        if v:
            sig.write(device, stream.ptr, word, v)
        _stamp(kernel, stream, stamps, P_SIGNALED)

    def copy_and_land(v: int) -> None:
        _stamp(kernel, stream, stamps, P_START)
        runtime.memcpyAsync(landing, src, nbytes, runtime.memcpyDeviceToDevice, stream.ptr)
        _stamp(kernel, stream, stamps, P_COPIED)
        sig.write(device, stream.ptr, word0, v)
        sig.post_after(device, stream.ptr, ring.sem)

    for mode in ("armed first", "armed after", "host ordered", "landing word", "landing word, scatter"):
        rows: dict[str, list[float]] = {}
        for i in range(repeat + 3):
            value += 1
            conn.send((mode, value))
            if mode == "armed first" or mode.startswith("landing"):
                conn.recv()
            t0 = time.time_ns()
            if mode.startswith("landing"):
                copy_and_land(value)
            else:
                copy_and_signal(value if mode != "host ordered" else 0)
            if mode == "armed after":
                conn.send("launched")
            elif mode == "host ordered":
                stream.synchronize()
                conn.send("copied")
            woken, d, seen = conn.recv()
            stream.synchronize()
            p = [int(x) for x in stamps.get()]
            if i < 3:  # warm-up
                continue
            for k, v in _segments(t0, woken, p, d, offset, d_offset, seen).items():
                rows.setdefault(k, []).append(v)
        results[f"signal, {mode}" if mode.startswith("armed") else mode] = {k: _median(v) for k, v in rows.items()}
    conn.send(("stop", 0))
    child.join(30)
    sig.host_unregister(device, ring.address)
    ring.close()
    runtime.ipcCloseMemHandle(landing)
    runtime.ipcCloseMemHandle(word)

    # One process, one context: the same as "armed first" on two streams.
    blocks = runtime.malloc(nbytes)
    landing2 = runtime.malloc(nbytes)
    word2 = runtime.malloc(4)
    runtime.memset(word2, 0, 4)
    d_stream = cupy.cuda.Stream(non_blocking=True)
    d_stamps = cupy.zeros(SLOTS, dtype=cupy.uint64)
    notifier = sig.Notifier()
    rows = {}
    for i in range(repeat + 3):
        value += 1
        _arm(kernel, d_stream, d_stamps, device, word2, value, blocks, landing2, nbytes, notifier)
        t0 = time.time_ns()
        _stamp(kernel, stream, stamps, P_START)
        runtime.memcpyAsync(landing2, src, nbytes, runtime.memcpyDeviceToDevice, stream.ptr)
        _stamp(kernel, stream, stamps, P_COPIED)
        sig.write(device, stream.ptr, word2, value)
        notifier.wait()
        woken = time.time_ns()
        cupy.cuda.Device(device).synchronize()
        p, d = [int(x) for x in stamps.get()], [int(x) for x in d_stamps.get()]
        if i < 3:
            continue
        for k, v in _segments(t0, woken, p, d, offset, offset).items():
            rows.setdefault(k, []).append(v)
    results["signal, one process"] = {k: _median(v) for k, v in rows.items()}

    # The ceiling: one copy of the same bytes, launch to synchronize.
    copies = []
    for i in range(repeat + 3):
        t0 = time.perf_counter_ns()
        runtime.memcpyAsync(landing2, src, nbytes, runtime.memcpyDeviceToDevice, stream.ptr)
        stream.synchronize()
        if i >= 3:
            copies.append((time.perf_counter_ns() - t0) / 1e3)
    results["copy only"] = {"total": _median(copies)}
    for ptr in (src, blocks, landing2, word2):
        runtime.free(ptr)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2M,16M,1G")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--device", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - any reason means no GPU here
        print(f"skipped: no CUDA device ({e})")
        return 0
    cols = ["total", "launch -> copy starts", "copy", "copied -> word seen", "copied -> scatter starts", "scatter",
            "scattered -> host woken"]
    print(f"# two processes on {cupy.cuda.runtime.getDeviceProperties(args.device)['name'].decode()}; "
          f"median of {args.repeat}, us; GPU stamps from %globaltimer")
    print("| size | ordering | " + " | ".join(cols) + " |")
    print("|---:|---|" + "---:|" * len(cols))
    for size in args.sizes.split(","):
        nbytes = parse_size(size)
        for mode, seg in run(nbytes, args.repeat, args.device).items():
            print(f"| {size} | {mode} | " + " | ".join(f"{seg[c]:.1f}" if c in seg else "-" for c in cols) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
