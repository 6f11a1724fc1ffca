"""No byte of an ended hand-off lands in pages another hand-off was given.

Real processes, the real control plane and tcp transport, real TCP between two network
namespaces joined by a veth pair whose prefill-to-decode direction is throttled (``tc tbf``).
The test creates both namespaces and deletes them; traffic flows only between the two
addresses it gave them.
  ns D: the decode receiver (decode-0) and prefill worker 2, on D's own address (unthrottled);
  ns P: prefill worker 1, whose hand-offs cross the throttled link.
Hand-off A (1024 tokens, 8 MiB, from worker 1) is cancelled on the decode side while its
bytes are still arriving; hand-off B (from worker 2) follows at once and needs the whole pool,
so it is granted A's pages. B's KV in the decode's blocks must equal B's KV at worker 2,
bitwise. Before the fix, A's tcp stream kept writing into the pages B had been given.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.client import wait_for
from tests.integration.nsnode import BLOCK

ROOT = Path(__file__).resolve().parents[2]
PAGES = 64  # the decode pool: 8 MiB of 128 KiB pages; A and B each need all of it
TOKENS = PAGES * BLOCK


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def namespaces():
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs iproute2 (ip, tc) to build two network namespaces")
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_NET_ADMIN) to build two network namespaces")
    tag = f"{os.getpid() % 100000}"
    ns_p, ns_d = f"pdt{tag}p", f"pdt{tag}d"
    net = 10 + os.getpid() % 200
    addr_p, addr_d = f"10.213.{net}.1", f"10.213.{net}.2"
    made: list[str] = []
    try:
        for ns in (ns_p, ns_d):
            r = _ip("netns", "add", ns, check=False)
            if r.returncode:
                pytest.skip(f"cannot create a network namespace here: {r.stderr.strip()}")
            made.append(ns)
        _ip("link", "add", f"v{tag}p", "type", "veth", "peer", "name", f"v{tag}d")
        _ip("link", "set", f"v{tag}p", "netns", ns_p)
        _ip("link", "set", f"v{tag}d", "netns", ns_d)
        _ip("-n", ns_p, "addr", "add", f"{addr_p}/30", "dev", f"v{tag}p")
        _ip("-n", ns_d, "addr", "add", f"{addr_d}/30", "dev", f"v{tag}d")
        for ns, dev in ((ns_p, f"v{tag}p"), (ns_d, f"v{tag}d")):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        # Worker 1 -> decode at 16 Mbit/s (2 MB/s): A's 8 MiB take about 4 s to cross.
        subprocess.run(["ip", "netns", "exec", ns_p, "tc", "qdisc", "add", "dev", f"v{tag}p", "root", "tbf",
                        "rate", "16mbit", "burst", "32kbit", "latency", "100ms"], check=True, capture_output=True)
        yield ns_p, ns_d, addr_d
    finally:
        for ns in made:
            _ip("netns", "del", ns, check=False)


class Proc:
    """A node process in a namespace (tests/integration/nsnode.py), one JSON command at a time."""

    def __init__(self, ns: str, spec: dict):
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.integration.nsnode",
                                   json.dumps(spec)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        assert json.loads(self.p.stdout.readline()) == {"ready": True}, f"{spec['instance']} did not start"

    def __call__(self, op: str, **kw) -> object:
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()
        out = json.loads(self.p.stdout.readline())
        assert "error" not in out, out["error"]
        return out["ok"]

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self("quit")
            except (BrokenPipeError, ValueError, json.JSONDecodeError):
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()


def test_a_late_write_of_a_cancelled_handoff_never_lands_in_the_next_ones_pages(namespaces, tmp_path):
    ns_p, ns_d, addr_d = namespaces
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    cfg = {
        "model": {"path": "ns-test"},
        "prefill": [{"name": "prefill-1", "http_port": 18001}, {"name": "prefill-2", "http_port": 18002}],
        "decode": [{"name": "decode-0", "host": addr_d, "http_port": 18003, "control_port": 18100,
                    "data_port": 18200}],
        # The namespaces stand in for two hosts, but share the pid namespace: with same-host
        # reads the decode would copy A out of the prefill's memory and the throttled link would
        # carry none of it.
        "transport": {"name": "tcp", "options": {"same_host_reads": False}},
        "pool": {"size_mib": PAGES * 128 // 1024},
        "auth": {"secret_file": str(secret)},
        "timeouts": {"handshake_s": 5, "control_s": 5, "alloc_s": 20, "transfer_s": 40, "data_s": 30,
                     "lease_s": 40, "heartbeat_s": 1, "peer_s": 40},
    }
    procs: list[Proc] = []
    try:
        decode = Proc(ns_d, {"role": "decode", "instance": "decode-0", "cfg": cfg, "fill": 0xEE, "blocks": 2 * PAGES})
        procs.append(decode)
        slow = Proc(ns_p, {"role": "prefill", "instance": "prefill-1", "cfg": cfg, "fill": 0xAA, "blocks": PAGES})
        procs.append(slow)
        fast = Proc(ns_d, {"role": "prefill", "instance": "prefill-2", "cfg": cfg, "fill": None, "seed": 5,
                           "blocks": PAGES})
        procs.append(fast)
        blocks = list(range(PAGES))

        # A: over the throttled link, into the whole pool; the decode waits for it ...
        decode("load", req="dA", tid="A", num_tokens=TOKENS, digest="a" * 32, blocks=blocks)
        slow("send", req="pA", tid="A", peer="decode-0", num_tokens=TOKENS, digest="a" * 32, blocks=blocks)
        # ... and gives up while A's bytes are arriving: its first pages hold them, its last not yet.
        wait_for(lambda: decode("pool_fill", layer=0, page=2, byte=0xAA) == 1.0, 30, "A's first bytes in the pool",
                 every_s=0.02)
        assert decode("pool_fill", layer=1, page=PAGES - 1, byte=0xAA) == 0.0, "A arrived before it was cancelled"
        decode("cancel", req="dA")

        # B: at once, from worker 2, unthrottled; it needs every page, so it gets A's.
        fast("send", req="pB", tid="B", peer="decode-0", num_tokens=TOKENS, digest="b" * 32, blocks=blocks)
        (sent_b,) = wait_for(lambda: fast("results"), 40, "B's hand-off to end", every_s=0.02)
        assert sent_b["ok"], sent_b["error"]
        time.sleep(0.5)  # B's pages sit READY: before the fix, A's stream kept writing into them
        decode("load", req="dB", tid="B", num_tokens=TOKENS, digest="b" * 32, blocks=[PAGES + b for b in blocks])
        loads: dict[str, dict] = {}

        def both_loads() -> bool:
            loads.update((r["req_id"], r) for r in decode("results", wait_s=0.1))
            return len(loads) == 2

        wait_for(both_loads, 40, "both loads to end", every_s=0.02)

        assert loads["dB"]["ok"], loads["dB"]["error"]
        assert decode("digest", blocks=[PAGES + b for b in blocks]) == fast("digest", blocks=blocks), \
            "B's KV in the decode's blocks differs from B's KV at its prefill: another hand-off wrote into its pages"
        assert not loads["dA"]["ok"] and "aborted" in loads["dA"]["error"]

        # The decode told worker 1 (Ended), which stopped writing A and said so (its Cancel).
        (sent_a,) = wait_for(lambda: slow("results"), 40, "A's hand-off to end at worker 1", every_s=0.02)
        assert not sent_a["ok"] and "decode side ended the hand-off" in sent_a["error"], sent_a["error"]
        status = decode("status")
        assert status["control"]["ended_sent"] >= 1
        wait_for(lambda: decode("status")["pool"]["free_pages"] == PAGES, 10, "the pool to be whole again",
                 every_s=0.02)
    finally:
        for p in procs:
            p.close()
