"""Our threads, named in the OS as in Python (L0: no import of ours).

Python names a thread for itself only; the OS (``top -H``, ``ps -L``, ``/proc/<pid>/task/*/comm``,
py-spy aside) shows the process's name for every thread, and inside vLLM that is
``VLLM::Worker`` for vLLM's own thread and for ours alike. On one CPU core our threads' work is
taken from the forward's, so an operator (and ``benchmarks/_thread_cpu.py``) must be able to
tell them apart: every thread of ours starts through :func:`thread`, which gives it its name in
the OS too (Linux keeps the first 15 bytes: ``pd-sender-0``, ``pd-tcp-send-12``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from typing import Any

_PR_SET_NAME = 15  # prctl(2)
_libc: Any = None


def _set_os_name(name: str) -> None:
    """The calling thread's OS name (Linux; elsewhere nothing): best effort, never raises."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):  # no libc or no prctl: the Python name still holds
        pass


def thread(target: Callable[..., Any], name: str, *args: Any, **kwargs: Any) -> threading.Thread:
    """A daemon thread running ``target(*args, **kwargs)``, named ``name`` in Python and in the
    OS (not started)."""

    def run() -> None:
        _set_os_name(name)
        target(*args, **kwargs)

    return threading.Thread(target=run, name=name, daemon=True)
