"""Test helper: wait for a transfer handle to end."""

from __future__ import annotations

import time

from lmcache_pd._types import BatchState
from lmcache_pd.transport import Transport


def wait(t: Transport, handle, timeout_s: float = 10.0) -> BatchState:
    deadline = time.monotonic() + timeout_s
    while not (state := t.poll(handle)).terminal:
        assert time.monotonic() < deadline, f"{handle} did not end within {timeout_s} s"
        time.sleep(0.001)
    return state
