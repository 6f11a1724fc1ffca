"""Waiting for a condition in tests, with a deadline: importable anywhere (no proxy, no vLLM)."""

from __future__ import annotations

import time


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.2):
    """``predicate()``'s first truthy value, asked every ``every_s`` for up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (out := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s")
        time.sleep(every_s)
    return out
