"""ucxx (the successor of ucx-py) moving host memory between two processes: is it a better UCX
path than NIXL? (the decision is in docs/transports.md).

ucxx is not a dependency of lmcache-pd; run this in an environment that has it:
    python -m venv /tmp/ucxx && /tmp/ucxx/bin/pip install ucxx-cu12 numpy
    /tmp/ucxx/bin/python benchmarks/ucxx_probe.py --sizes 4M,16M,64M,256M
ucxx has no descriptor lists: a transfer is tag messages. ``contiguous`` sends one message;
``paged`` sends one 64 KiB message per range into scattered offsets of the receiver's buffer
(the KV-cache pattern; ucxx would otherwise need a gather copy first). Each is timed from the
first send to the receiver's acknowledgement, median of ``--repeat``, beside a host copy of the
same bytes (the ceiling) measured in the same run. Compare with
``benchmarks/transfer.py --transports nixl --no-handoff`` on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time

import numpy as np

PIECE = 64 << 10


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _server(port_q, max_bytes: int) -> None:
    import ucxx

    async def main() -> None:
        done = asyncio.Event()
        buf = np.zeros(max_bytes, dtype=np.uint8)

        async def handler(ep) -> None:
            head = np.empty(3, dtype=np.int64)
            while True:
                await ep.recv(head)
                mode, n, seed = (int(x) for x in head)
                if mode < 0:
                    break
                if mode == 0:
                    await ep.recv(buf[:n])
                else:  # one message per 64 KiB range, each into a scattered slot
                    slots = np.random.default_rng(seed).permutation(n // PIECE)
                    await asyncio.gather(*(ep.recv(buf[s * PIECE:(s + 1) * PIECE]) for s in slots))
                await ep.send(np.ones(1, dtype=np.uint8))
            done.set()

        listener = ucxx.create_listener(handler)
        port_q.put(listener.port)
        await done.wait()
        listener.close()

    asyncio.run(main())


async def _client(port: int, sizes: list[int], repeat: int, layouts: list[str]) -> None:
    import ucxx

    ep = await ucxx.create_endpoint("127.0.0.1", port)
    data = np.random.default_rng(0).integers(0, 255, max(sizes), dtype=np.uint8)
    ack = np.empty(1, dtype=np.uint8)
    print(f"{'size':>9} {'layout':>11} {'ucxx GB/s':>10} {'host copy GB/s':>15} {'ratio':>6}")
    for n in sizes:
        dst = np.empty(n, dtype=np.uint8)
        for layout in layouts:
            times, copies = [], []
            for i in range(repeat + 1):
                t0 = time.perf_counter()
                await ep.send(np.array([0 if layout == "contiguous" else 1, n, i], dtype=np.int64))
                if layout == "contiguous":
                    await ep.send(data[:n])
                else:
                    await asyncio.gather(*(ep.send(data[o:o + PIECE]) for o in range(0, n, PIECE)))
                await ep.recv(ack)
                dt = time.perf_counter() - t0
                t1 = time.perf_counter()
                np.copyto(dst, data[:n])
                dc = time.perf_counter() - t1
                if i:
                    times.append(dt)
                    copies.append(dc)
            g, c = n / statistics.median(times) / 1e9, n / statistics.median(copies) / 1e9
            print(f"{n >> 20:>6} MiB {layout:>11} {g:>10.2f} {c:>15.2f} {g / c:>6.2f}", flush=True)
    await ep.send(np.array([-1, 0, 0], dtype=np.int64))
    await ep.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4M,16M,64M,256M")
    ap.add_argument("--layout", default="contiguous,paged")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_server, args=(q, max(sizes)), daemon=True)
    proc.start()
    asyncio.run(_client(q.get(timeout=60), sizes, args.repeat, args.layout.split(",")))
    proc.join(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
