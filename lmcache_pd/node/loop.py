"""An asyncio event loop in one owned thread (``start``/``close``), for the prefill sender."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from lmcache_pd.threads import thread

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str):
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread = thread(self._run, name)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        """Run ``coro`` on the loop and wait for it, at most ``timeout_s``."""
        return self.submit(coro).result(timeout_s)

    def close(self, shutdown: Coroutine[Any, Any, Any] | None = None, timeout_s: float = 5.0) -> None:
        if not self._thread.is_alive():
            if shutdown is not None:
                shutdown.close()
            return
        if shutdown is not None:
            try:
                self.call(shutdown, timeout_s)
            except Exception:  # noqa: BLE001 - shutdown is best effort; the loop stops regardless
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()


async def woken(wake: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``wake`` is set or ``timeout_s`` passed, whichever comes first. Unlike
    ``asyncio.wait_for(wake.wait(), ...)`` it makes no task per call: the transfer loops wait
    once per batch that lands, and the last one's wait is on the hand-off's path."""
    if wake.is_set():
        return
    try:
        async with asyncio.timeout(timeout_s):
            await wake.wait()
    except TimeoutError:
        pass


def waker(loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> Callable[..., None]:
    """A callback for another thread (a transport's batch done, vLLM's layer marks) that sets
    ``wake`` on ``loop``; once the loop is closed (the sender shut down while a batch still
    ran) it does nothing instead of raising in that thread."""
    def call(*_args: object) -> None:
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop is closed
            pass
    return call
