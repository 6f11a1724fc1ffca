"""End-to-end hand-off between two processes: paged cache -> decode pool -> paged cache.

One hand-off is Allocate (zmq; by default done before the clock starts, as the connector
reserves the pages while the last prompt chunk computes; ``--no-reserve`` times it), the transport's copy from the prefill's paged blocks straight
into the pool pages, TransferDone (zmq), then the decode loader's scatter into the decode's
paged blocks (benchmarks/_pairs.py, HandoffPair). A hand-off above ``--group-mib`` streams: its
groups are scattered as they land, overlapped with the transfer of the next ones.
Shape: Llama-3-8B KV (128 KiB per token), random block tables on both sides. The ceiling is a copy of the same bytes between the same
devices in one process, measured in this run. The last repeat of each size is checked bitwise.
benchmarks/transfer.py runs the same hand-off inside its sweep; this one takes token counts.
``--verify`` times every size twice, with ``integrity.verify`` off and on (a second pair of
processes), and prints what the check costs. ``--direct`` does the same with a second pair with
``transport.direct`` on (the decode's load is asked for before the prefill's Allocate, so the
prefill writes straight into the decode's blocks: no pool, no scatter). ``--against JSON`` does the same with a second pair
whose transport options are JSON (``'{"signals": false}'``: cuda_ipc's decode scatter waiting for
TransferDone on the host instead of the copy's device-side signal).
``--unprepared`` does the same with a twin of the main pair whose reservations name no blocks (its
launch planned at the submit, not laid out at the grant: node/on_caller.py); ``--main-direct``
makes the main pair (and that twin) direct; ``--settle-ms`` puts that long between the grant and
the submit. Column *hand-off ms*: the submit to the benchmark's decode thread learning that the load
ended (it waits on the loader's condition); *load ended*: the submit to the load's end on the
decode (the loader's record of it, which vLLM's next ``get_finished`` there finds: vLLM looks
once a step and never waits on that condition). Columns *signaled*: hand-offs whose decode load ended on the landing signal (``'{"signals": true}'``,
transport/landing.py), before TransferDone; *spun*: of those, the ones whose word the decode's
loader saw while watching it (cuda_ipc's ``spin_us``: a launched mark), not on the semaphore's post;
*on caller*: planned and submitted on the submitting thread (pages granted ahead).

    python benchmarks/handoff.py --transport cuda_ipc --tokens 128,1024,8192,32768 [--group-mib 0] [--verify]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from _ceilings import best_ceiling
from _common import pick_devices, pin
from _pairs import TOKEN_BYTES, HandoffPair
from _thread_cpu import own_threads_cpu

DONE_THREAD = "pd-cuda-ipc-done"
"""cuda_ipc's completion thread (its CPU per hand-off: transport.options.completion_wait)."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transport", default="cuda_ipc")
    ap.add_argument("--tokens", default="128,1024,8192,32768")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--devices", default=None, help="prefill,decode devices (default cuda:0,cuda:<last>)")
    ap.add_argument("--group-mib", type=int, default=None,
                    help="transport.group_mib: stream hand-offs in groups of this size (0: one group; "
                         "default: the config default)")
    ap.add_argument("--no-reserve", action="store_true",
                    help="allocate the decode pages inside the timed hand-off (no reservation ahead)")
    ap.add_argument("--verify", action="store_true", help="also time each size with integrity.verify on")
    ap.add_argument("--against", default=None, metavar="JSON",
                    help="also time each size with these transport options (a second pair of processes)")
    ap.add_argument("--options", default="{}", metavar="JSON", help="transport options of the main pair")
    ap.add_argument("--direct", action="store_true",
                    help="also time each size with transport.direct on (a second pair; with --layered: "
                         "the one pair has it on)")
    ap.add_argument("--unprepared", action="store_true",
                    help="also time each size with a twin of the main pair whose reservations name no blocks "
                         "(the launch planned at the submit, not laid out at the grant: node/on_caller.py)")
    ap.add_argument("--settle-ms", type=float, default=0.0,
                    help="ms between the grant and the submit (a deployment's rest of the last chunk's forward, "
                         "in which both processes finish handling the grant; default 0: right after it)")
    ap.add_argument("--main-direct", action="store_true",
                    help="the main pair (and its --unprepared twin) with transport.direct on")
    ap.add_argument("--layered", action="store_true",
                    help="behind a stand-in forward (--forward-us per layer per token; a spinning kernel "
                         "on a GPU, small matrix products on the prefill's thread on a CPU): whole hand-off "
                         "after it against layer by layer during it (transport.layerwise): a batch per "
                         "layer from the sender's thread and, where the transport can (cuda_ipc), the "
                         "layers prepared at once and each posted by the forward's thread "
                         "(transport.post_layers: mode 'posted'), taking turns")
    ap.add_argument("--forward-stream", choices=("own", "default"), default="own",
                    help="with --layered on a GPU: the stream the stand-in forward runs on: a stream of "
                         "its own, or the device's default stream, as vLLM's forward does (a wait for "
                         "the default stream there waits for every layer queued after the one sent)")
    ap.add_argument("--host-paced", action="store_true",
                    help="with --layered on a GPU: the stand-in forward keeps its host as busy as its GPU "
                         "(16 kernels per layer, each after as much time in Python, releasing the GIL "
                         "between them), as vLLM's eager forward does: then the sender's work on this "
                         "process's GIL shows in the forward's time (the forward ms column, per mode)")
    ap.add_argument("--modes", default="", metavar="M,M",
                    help="with --layered: only these modes (of whole, layered / last chunk, chunked, posted, "
                         "'posted first': posted with the forward's first layer waiting until the layers "
                         "were prepared; default: all but 'posted first'; whole always runs: the others' "
                         "share hidden is against it)")
    ap.add_argument("--chunks", type=int, default=1,
                    help="with --layered: the stand-in forward is a chunked prefill of this many chunks")
    ap.add_argument("--cpus", default="", metavar="P,D",
                    help="pin this process (the prefill side) to core P and the decode side to core D, "
                         "as a CPU deployment pins its instances (unpinned, the two trade cores and "
                         "the time after the forward moves by about 0.5 ms between runs)")
    ap.add_argument("--forward-us", type=float, default=0.6,
                    help="with --layered: the stand-in forward's time per layer per prompt token, us "
                         "(0.6: Llama-3-8B at about 800 TFLOP/s; on a CPU, 3 keeps the transfer under it), "
                         "at least 20 us per layer")
    args = ap.parse_args(argv)
    args.decode_cpu = None
    if args.cpus:
        p_cpu, args.decode_cpu = (int(c) for c in args.cpus.split(","))
        pin(p_cpu)
    if args.layered:
        return layered(args)
    if sum(map(bool, (args.verify, args.against, args.direct, args.unprepared))) > 1:
        ap.error("--verify, --against, --direct and --unprepared each need the second pair: give one")
    from lmcache_pd import transport as transports

    ok, why = transports.available(args.transport)
    if not ok:
        print(f"skipped: transport {args.transport} unavailable: {why}")
        return 0
    p_dev, d_dev = pick_devices(args.transport, args.devices)
    tokens = [int(t) for t in args.tokens.split(",")]
    options = json.loads(args.options)
    pair = HandoffPair(args.transport, options, max(tokens), p_dev, d_dev, group_mib=args.group_mib,
                       reserve=not args.no_reserve, decode_cpu=args.decode_cpu, direct=args.main_direct,
                       settle_s=args.settle_ms / 1e3)
    checked = None
    if args.verify or args.against or args.direct or args.unprepared:
        checked = HandoffPair(args.transport, json.loads(args.against) if args.against else options, max(tokens),
                              p_dev, d_dev, group_mib=args.group_mib, reserve=not args.no_reserve,
                              verify=args.verify, direct=args.direct or args.main_direct, decode_cpu=args.decode_cpu,
                              ahead=not args.unprepared, settle_s=args.settle_ms / 1e3)
    second = ("verify on" if args.verify else "direct" if args.direct else "unprepared" if args.unprepared
              else f"options {args.against}")
    where = f"{p_dev} -> {d_dev}" + (f" ({torch.cuda.get_device_name(0)})" if "cuda" in p_dev else "")
    print(f"# {args.transport} hand-off, {where}; python {sys.version.split()[0]}, torch {torch.__version__}")
    print("# Llama-3-8B KV (32 layers, 8 heads, head 128, bf16, block 16); median of", args.repeat,
          "; pages", "allocated in the hand-off" if args.no_reserve else "reserved ahead", "; options", options,
          "; direct" if args.main_direct else "", f"; {args.settle_ms:g} ms between grant and submit")
    print(f"{'tokens':>7} {'bytes':>9} {'hand-off ms':>12} {'load ended':>10} {'GB/s':>8} {'ceiling GB/s':>13} {'ratio':>6}  check    "
          f"| ms: allocate  transfer  after-transfer | scatter (overlapped)  groups  signaled  spun  on-caller  prepared"
          f" | ms: launch  to-loaded  to-woken | to-loaded: copy  seen  told  loaded | last byte -> loader"
          + (f"  | {second}: ms  ratio  check  signaled  direct  scatter ms" if checked else ""))
    status = 0
    try:
        pair.once(tokens[0])  # links the peers (handshake, IPC open) and builds the kernels
        if checked is not None:
            checked.once(tokens[0])
        for n_tok in tokens:
            nbytes = n_tok * TOKEN_BYTES
            ceiling = best_ceiling(args.transport, nbytes, p_dev, d_dev)
            times, copies, verified = [], [], []
            pair.phases.clear()
            for _ in range(args.repeat):  # the two modes take turns: both meet the same machine state
                # Each pair right after the ceiling's copy (this process's GPU work): had one pair
                # followed the other's decode scatter, its copy would wait for the GPU to switch
                # back from that process's context (0.14 ms of its launch, 2026-12-07, one H100).
                copies.append(ceiling.once())
                times.append(pair.once(n_tok))
                if checked is not None:
                    ceiling.once()
                    verified.append(checked.once(n_tok))
            ceiling.close()
            ok = pair.check_last()
            status |= not ok
            extra = ""
            if checked is not None:
                v_ok = checked.check_last()
                status |= not v_ok
                v = statistics.median(verified)
                extra = (f"  | {v * 1e3:>13.3f} {v / statistics.median(times):>6.2f}  {'bitwise' if v_ok else 'MISMATCH'}"
                         f"  {sum(p['signaled'] for p in checked.phases[-args.repeat:]):>2.0f}/{args.repeat}"
                         f"  {sum(p['direct'] for p in checked.phases[-args.repeat:]):>2.0f}/{args.repeat}"
                         f"  {statistics.median(p['scatter'] for p in checked.phases[-args.repeat:]) * 1e3:>9.3f}")
            t, c = statistics.median(times), statistics.median(copies)
            counts = ("groups", "signaled", "spun", "on_caller", "direct", "prepared")
            ph = {k: statistics.median(p[k] for p in pair.phases) * (1 if k in counts else 1e3)
                  for k in pair.phases[0]}
            signaled = sum(p["signaled"] for p in pair.phases)
            on_caller = sum(p["on_caller"] for p in pair.phases)
            print(f"{n_tok:>7} {nbytes / 2**20:>7.0f}Mi {t * 1e3:>12.3f} {ph['ended']:>10.3f} {nbytes / t / 1e9:>8.1f} "
                  f"{nbytes / c / 1e9:>13.1f} {c / t:>6.2f}  {'bitwise ' if ok else 'MISMATCH'} "
                  f"| {ph['allocate']:>12.3f} {ph['transfer']:>9.3f} {ph['after transfer']:>15.3f} "
                  f"| {ph['scatter']:>20.3f} {ph['groups']:>7.0f} {signaled:>6}/{len(pair.phases)} "
                  f"{sum(p['spun'] for p in pair.phases):>2}/{len(pair.phases)} "
                  f"{on_caller:>6}/{len(pair.phases)} {sum(p['prepared'] for p in pair.phases):>6}/{len(pair.phases)}"
                  f" | {ph['launch']:>10.3f} {ph['to_loaded']:>10.3f} "
                  f"{ph['to_woken']:>9.3f} | {ph['copy']:>15.3f} {ph['seen']:>5.3f} {ph['told']:>5.3f} "
                  f"{ph['loaded']:>7.3f} | {ph['to_loader']:>19.3f}{extra}", flush=True)
            if checked is not None:  # the second pair's split (a direct one's differs: no scatter)
                q = {k: statistics.median(p[k] for p in checked.phases[-args.repeat:]) * 1e3
                     for k in ("launch", "to_loaded", "to_woken", "copy", "to_loader", "loaded", "ended")}
                spun = sum(p["spun"] for p in checked.phases[-args.repeat:])
                print(f"{'':>7} {second}: ms: load ended {q['ended']:.3f}  launch {q['launch']:.3f}  copy {q['copy']:.3f}  to loader "
                      f"{q['to_loader']:.3f}  loaded {q['loaded']:.3f}  woken {q['to_woken']:.3f}  spun {spun}/{args.repeat}",
                      flush=True)
    finally:
        pair.close()
        if checked is not None:
            checked.close()
    return status


def layered(args) -> int:
    """Whole against layered hand-offs behind one stand-in forward (a pair, the modes taking
    turns). With ``--chunks`` K > 1 the forward is a chunked prefill of K chunks, and layered
    hand-offs go two ways: from the last chunk's forward with every block (``last chunk``), or
    chunk by chunk, each chunk's blocks during its own forward (``chunked``)."""
    from lmcache_pd import transport as transports

    ok, why = transports.available(args.transport)
    p_dev, d_dev = pick_devices(args.transport, args.devices)
    cuda = p_dev.startswith("cuda")
    if not ok or (cuda and not torch.cuda.is_available()):
        print(f"skipped: {'no CUDA device' if ok else f'transport {args.transport} unavailable: {why}'}")
        return 0
    tokens = [int(t) for t in args.tokens.split(",")]
    options = json.loads(args.options)
    chunks = max(1, args.chunks)
    pair = HandoffPair(args.transport, options, max(tokens), p_dev, d_dev, group_mib=args.group_mib,
                       direct=args.direct, decode_cpu=args.decode_cpu, forward_stream=args.forward_stream,
                       host_paced=args.host_paced and cuda)
    modes = {"whole": {"layered": False}, "layered" if chunks == 1 else "last chunk": {"layered": True, "pieces": False}}
    if chunks > 1:
        modes["chunked"] = {"layered": True, "pieces": True}
    if pair.tx.transport.capabilities.posts_layers:  # the last chunk's layers posted by the forward's thread
        modes["posted"] = {"layered": True, "pieces": chunks > 1, "posted": True}
        modes["posted first"] = {**modes["posted"], "prepared_first": True}
    wanted = {m.strip() for m in args.modes.split(",") if m.strip()} or set(modes) - {"posted first"}
    if unknown := wanted - set(modes):
        print(f"skipped: no mode {sorted(unknown)} here (modes: {', '.join(modes)})")
        return 1
    modes = {m: kw for m, kw in modes.items() if m in wanted | {"whole"}}
    layered_modes = [m for m in modes if m != "whole"]
    print(f"# {args.transport}{' direct' if args.direct else ''} hand-off behind a stand-in forward of 32 layers in {chunks} chunk(s)"
          f"{' on the default stream' if cuda and args.forward_stream == 'default' else ''}"
          f"{', paced by its host' if cuda and args.host_paced else ''}, {p_dev} -> "
          f"{d_dev} ({torch.cuda.get_device_name(0) if cuda else 'CPU'}{f', cores {args.cpus}' if args.cpus else ''}); {args.forward_us} us per layer per token (at least 20); "
          f"median of {args.repeat}; options {options}")
    print("| tokens | bytes | forward ms: " + " / ".join(modes) + " | forward end -> loaded ms: " + " / ".join(modes)
          + " | transfer after the forward ms: " + " / ".join(modes)
          + " | transfer hidden: " + " / ".join(layered_modes) + " | check |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    status = 0
    try:
        pair.once(tokens[0])
        pair.once(tokens[0], forward_us=20, layered=True, chunks=chunks)
        for n_tok in tokens:
            per_layer = max(20.0, args.forward_us * n_tok)
            rows: dict[str, list[dict]] = {m: [] for m in modes}
            checks = {}
            for _ in range(args.repeat):
                for m, kw in modes.items():
                    cpu0 = own_threads_cpu(DONE_THREAD)
                    pair.once(n_tok, forward_us=per_layer, chunks=chunks, **kw)
                    rows[m].append({**pair.phases[-1], "done_cpu": own_threads_cpu(DONE_THREAD) - cpu0})
            for m, kw in modes.items():  # the last hand-off of each mode, checked bitwise
                pair.once(n_tok, forward_us=per_layer, chunks=chunks, **kw)
                checks[m] = pair.check_last()
            status |= not all(checks.values())
            med = {m: {k: statistics.median(p[k] for p in rows[m]) for k in ("forward", "exposed", "transfer_exposed")}
                   for m in rows}
            # The transfer's share that ran before the forward ended (as on CPU, docs/benchmarks.md):
            # the whole hand-off's transfer all runs after it.
            hidden = {m: 1 - max(0.0, med[m]["transfer_exposed"]) / med["whole"]["transfer_exposed"]
                      for m in layered_modes}
            print(f"| {n_tok} | {n_tok * TOKEN_BYTES / 2**20:.0f} MiB | "
                  + " / ".join(f"{med[m]['forward'] * 1e3:.3f}" for m in modes) + " | "
                  + " / ".join(f"{med[m]['exposed'] * 1e3:.3f}" for m in modes) + " | "
                  + " / ".join(f"{med[m]['transfer_exposed'] * 1e3:.3f}" for m in modes) + " | "
                  + " / ".join(f"{hidden[m]:.0%}" for m in layered_modes) + " | "
                  + ("bitwise" if all(checks.values()) else f"MISMATCH {checks}") + " |", flush=True)
            for m in modes:  # where the time after the forward goes (sender side)
                last = {k: statistics.median(p[k] for p in rows[m])
                        for k in ("last_submit", "last_done", "last_landed", "batches", "marking", "in_submit",
                                  "in_prepare", "done_cpu")}
                on_gpu = (f"; last byte {last['last_landed'] * 1e3:+.3f} ms from it on the GPU" if cuda else "")
                print(f"#   {n_tok} {m}: {last['batches']:.0f} batches, last submitted {last['last_submit'] * 1e3:+.3f} ms "
                      f"and last done {last['last_done'] * 1e3:+.3f} ms from the forward's end (host){on_gpu}; "
                      f"host ms in the forward's marks {last['marking'] * 1e3:.3f}, in the transport's submit "
                      f"{last['in_submit'] * 1e3:.3f} and prepare_layers {last['in_prepare'] * 1e3:.3f}"
                      + (f"; CPU of the completion thread ({DONE_THREAD}) {last['done_cpu'] * 1e3:.3f} ms"
                         if args.transport == "cuda_ipc" else ""), flush=True)
    finally:
        pair.close()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
