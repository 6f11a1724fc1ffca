"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
import threading
import time

import pytest

# scripts/test runs the suite on two pytest-xdist workers (--dist loadgroup). The modules that
# start vLLM instances form one group, run by one worker, one module after the other, in this
# order: two deployments starting at once on a 2-core machine each took 4.5 minutes to start, and
# their timing-bound tests failed. Every other module is a group of its own (its module-scoped
# fixtures start once), taken by the other worker meanwhile, longest first.
VLLM_MODULES = (
    "tests/integration/test_faults.py",
    "tests/integration/test_e2e_cache.py",
    "tests/integration/test_e2e.py",
    "tests/integration/test_e2e_nixl.py",
)
LONGEST_FIRST = (*VLLM_MODULES, "tests/packaging/test_install.py", "tests/integration/test_netns.py",
                 "tests/unit/test_fuzz.py", "tests/unit/test_first_token.py", "tests/unit/test_node.py")


def pytest_configure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... under xdist
    if worker:  # parallel workers hand out disjoint ports (lmcache_pd.cli.local.free_ports)
        os.environ["LMCACHE_PD_PORT_SLICE"] = f"{int(worker[2:])}/{os.environ['PYTEST_XDIST_WORKER_COUNT']}"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0], len(rank)))  # stable: order within a module stays
    if not config.pluginmanager.hasplugin("xdist"):  # the GPU machine's pytest has no xdist
        return
    for item in items:
        module = item.nodeid.partition("::")[0]
        item.add_marker(pytest.mark.xdist_group("vllm" if module in VLLM_MODULES else module))


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
