"""Which UCX transport carried a NIXL transfer, from UCX's own protocol-selection report.

UCX prints, with ``UCX_PROTO_INFO=y``, one table per (endpoint configuration, operation) naming
the transport used for each size range. ``route_ucx_report`` sends that report to a file before
UCX starts (unless the user routed it already); ``ucx_write_paths`` reads the put tables.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import tempfile

_TITLE = re.compile(r"\|\s*(?P<ctx>.*?)\s+(?P<scope>self|intra-node|inter-node)\s+cfg#\d+\s*\|")
_WRITE = re.compile(r"remote memory write by ucp_put\*.*?\bfrom (?P<src>[\w/-]+)(?: memory)? to (?P<dst>[\w/-]+)")
_UCX_MEM = {"DRAM": "host", "VRAM": "cuda"}
_ROW = re.compile(r"\|\s*[\d.]+(?:inf)?\s*\|[^|]*\|\s*(?P<cfg>[^|]*?)\s*\|\s*$")
_TL = re.compile(r"\b([a-z_0-9]+/[A-Za-z_0-9:.\-]+)")


def route_ucx_report() -> str | None:
    """Make UCX write its protocol-selection report to a file we can read (before UCX starts).

    The file name carries UCX's ``%p`` (pid), so child processes that inherit the environment
    write files of their own. A user's own ``UCX_LOG_FILE`` is kept (read if the report is on).
    """
    on = os.environ.get("UCX_PROTO_INFO", "").lower()
    if on in ("n", "no", "0", "off"):
        return None
    if not os.environ.get("UCX_LOG_FILE"):
        os.environ["UCX_LOG_FILE"] = os.path.join(tempfile.gettempdir(), "lmcache-pd-ucx-%p.log")
        os.environ["UCX_PROTO_INFO"] = on = "y"
    if on not in ("y", "yes", "1", "on"):
        return None
    return os.environ["UCX_LOG_FILE"].replace("%p", str(os.getpid())).replace("%h", socket.gethostname())


def flush_c_streams() -> None:
    """UCX writes its report through a buffered C stream: a table may sit in the buffer for a
    long time. ``fflush(NULL)`` flushes every C output stream of the process (stdout too)."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def ucx_write_paths(report: str, src_mem: str = "DRAM", dst_mem: str = "DRAM") -> list[str]:
    """UCX transports chosen for ``ucp_put`` towards other processes, from UCX's protocol report.

    The report prints one table per (endpoint configuration, operation); a title line names the
    scope (``self``, ``intra-node``, ``inter-node``) and the next the operation with its memory
    types (``from host memory to host``, ``from cuda memory to cuda``). We keep the ``Config``
    column (``cma/memory``, ``cuda_ipc/cuda``, ``rc_mlx5/mlx5_0:1``...) of write tables between
    the given memory kinds whose scope is not ``self``.
    """
    want = (_UCX_MEM[src_mem], _UCX_MEM[dst_mem])
    found: list[str] = []
    scope = None
    in_write = False
    for line in report.splitlines():
        if m := _TITLE.search(line):
            scope, in_write = m["scope"], False
            continue
        if w := _WRITE.search(line):
            in_write = (scope is not None and scope != "self" and w["src"].startswith(want[0])
                        and w["dst"].startswith(want[1]))
            continue
        if in_write and (row := _ROW.search(line)):
            for tl in _TL.findall(row["cfg"]):
                if tl not in found:
                    found.append(tl)
    return found
