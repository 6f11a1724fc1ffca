"""Fixtures shared by every test folder."""

from __future__ import annotations

import threading
import time

import pytest


class _Served:
    """An ASGI app served by uvicorn on a thread, on a real socket."""

    def __init__(self, app, port: int):
        import uvicorn  # here, not at the top: the GPU machine's tests (scripts/gpu-check) run without it

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def serve():
    """``serve(app, port)`` runs an ASGI app on 127.0.0.1:port until the test ends."""
    running: list[_Served] = []

    def start(app, port: int) -> None:
        running.append(_Served(app, port))

    yield start
    for s in running:
        s.close()
