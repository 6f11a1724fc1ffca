"""What small kernels of another process cost a forward running on the same GPU.

A layered hand-off lets the decode scatter each layer as it lands (``pool.scatter_landed``),
while the prefill's forward computes the next layers. With prefill and decode on one GPU (two
processes, no MPS) the GPU runs one process's context at a time, so every scatter of the decode
may cost the forward a switch of contexts each way. This measures it without vLLM: process P
runs a stand-in forward of real matrix products (``--layers`` layers of Llama-3-8B's MLP on
``--tokens`` tokens, bf16) on its default stream; a thread of P waits for each layer's event,
then tells process D, which copies ``--mib`` MiB (the layer's KV) on a stream of its own and
waits for it, as the decode's loader scatters a landed layer. Modes:

- ``alone``: nobody else on the GPU (the ceiling);
- ``other process, per layer``: D copies once per layer, during the forward;
- ``same process, per layer``: P's thread makes the same copy itself, on a stream of its own
  (what the prefill's own cuda_ipc copies are: one context, no switch).

Prints the forward's GPU time (median of ``--repeat``, CUDA events on P's stream) per mode and
its ratio to ``alone``.

    python benchmarks/shared_gpu.py [--tokens 1024] [--layers 8] [--mib 4] [--repeat 30]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import threading

import torch


def _decode(conn, mib: int) -> None:
    """Process D: a copy of ``mib`` MiB per message, waited for, as the loader's scatter."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    stream = torch.cuda.Stream()
    conn.send("ready")
    while (msg := conn.recv()) != "bye":
        with torch.cuda.stream(stream):
            dst.copy_(src)
        stream.synchronize()
        conn.send(msg)


def _forward(x: torch.Tensor, weights: list[tuple[torch.Tensor, ...]], on_layer) -> float:
    """One stand-in forward; ``on_layer(event)`` after each layer's kernels are queued. GPU ms."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    h = x
    for gate, up, down in weights:
        h = (torch.nn.functional.silu(h @ gate) * (h @ up)) @ down
        layer = torch.cuda.Event()
        layer.record()
        on_layer(layer)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--mib", type=int, default=4, help="bytes D copies per layer (1024 tokens x 32 KiB / 8 layers)")
    ap.add_argument("--repeat", type=int, default=30)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("shared_gpu.py: needs a CUDA device")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    d = ctx.Process(target=_decode, args=(child, a.mib), daemon=True)
    d.start()
    assert parent.recv() == "ready"
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    weights = [tuple(torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=g) * 0.01
                     for shape in ((4096, 14336), (4096, 14336), (14336, 4096))) for _ in range(a.layers)]
    x = torch.randn(a.tokens, 4096, device=dev, dtype=torch.bfloat16, generator=g)
    own = torch.cuda.Stream()
    src = torch.empty(a.mib << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)

    pipe = threading.Lock()  # one copy at a time in both modes, as D makes them (and one message on the pipe)

    def other(event: torch.cuda.Event) -> None:
        event.synchronize()
        with pipe:
            parent.send("layer")
            parent.recv()

    def same(event: torch.cuda.Event) -> None:
        event.synchronize()
        with pipe, torch.cuda.stream(own):
            dst.copy_(src)
            own.synchronize()

    modes = {"alone": None, "other process, per layer": other, "same process, per layer": same}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(3):  # warm-up: cuBLAS picks its kernels
        _forward(x, weights, lambda e: None)
    for _ in range(a.repeat):  # modes take turns, so that drift hits each alike
        for mode, react in modes.items():
            threads: list[threading.Thread] = []

            def on_layer(event, react=react, threads=threads):
                if react is not None:  # a thread, as the sender's: vLLM's thread never waits
                    t = threading.Thread(target=react, args=(event,))
                    t.start()
                    threads.append(t)
            times[mode].append(_forward(x, weights, on_layer))
            for t in threads:
                t.join()
            torch.cuda.synchronize()
    parent.send("bye")
    d.join(10)
    base = statistics.median(times["alone"])
    print(f"# stand-in forward: {a.layers} layers of Llama-3-8B's MLP on {a.tokens} tokens, bf16, "
          f"{torch.cuda.get_device_name()}; {a.mib} MiB copied per layer; median of {a.repeat}")
    print("| mode | forward, GPU ms | ratio to alone |")
    print("|---|---:|---:|")
    for mode, ts in times.items():
        med = statistics.median(ts)
        print(f"| {mode} | {med:.3f} | {med / base:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
