"""A TCP relay in a process of its own: ``python -m tests.integration.relay LISTEN TARGET``.

The fault tests put it between a prefill instance and its decode peer's control port; stopping
it (SIGSTOP) partitions the control plane the way a dead switch does: connections stay open,
bytes stop moving, and nobody is told. SIGCONT heals the partition.
"""

from __future__ import annotations

import socket
import sys
import threading


def pump(src: socket.socket, dst: socket.socket, flip_at: int | None = None,
         gate: threading.Event | None = None, tally: list[int] | None = None) -> None:
    """Forward ``src`` to ``dst`` until either closes; ``flip_at``: invert the byte at that offset
    of the stream on its way (an on-path attacker, for tests/transport/test_tcp.py); ``gate``:
    hold what was read until it is set (bytes in flight, for tests/unit/test_layered.py);
    ``tally[0]``: the bytes forwarded so far (tests/transport/test_tcp_reads.py)."""
    seen = 0
    try:
        while data := src.recv(1 << 16):
            if gate is not None:
                gate.wait()
            if flip_at is not None and seen <= flip_at < seen + len(data):
                data = bytearray(data)
                data[flip_at - seen] ^= 0xFF
            seen += len(data)
            if tally is not None:
                tally[0] = seen
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main(listen: int, target: int) -> None:
    srv = socket.create_server(("127.0.0.1", listen))
    print(f"relay 127.0.0.1:{listen} -> 127.0.0.1:{target}", flush=True)
    while True:
        conn, _ = srv.accept()
        try:
            up = socket.create_connection(("127.0.0.1", target), timeout=5)
        except OSError:
            conn.close()
            continue
        up.settimeout(None)
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
