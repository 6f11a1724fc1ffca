"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
import threading
import time

import pytest

# The longest modules first. scripts/test runs the suite on two workers (pytest-xdist, one module
# at a time each, in this order): a long module started last would run alone at the end.
LONGEST_FIRST = (
    "tests/integration/test_faults.py",
    "tests/integration/test_e2e_cache.py",
    "tests/integration/test_e2e.py",
    "tests/packaging/test_install.py",
    "tests/integration/test_e2e_nixl.py",
)


def pytest_configure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... under xdist
    if worker:  # parallel workers hand out disjoint ports (lmcache_pd.cli.local.free_ports)
        os.environ["LMCACHE_PD_PORT_SLICE"] = f"{int(worker[2:])}/{os.environ['PYTEST_XDIST_WORKER_COUNT']}"


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0], len(rank)))  # stable: order within a module stays


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
