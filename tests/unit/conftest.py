"""Fixtures of the unit tests (helpers are in kv.py, nodes.py, control_peers.py, cache_instances.py)."""

from __future__ import annotations

import pytest

from tests.unit.nodes import Node, make_cfg


@pytest.fixture(params=["tcp", "loopback", "nixl", "cuda_ipc"])
def node(request):
    from lmcache_pd import transport as transports

    ok, why = transports.available(request.param)
    if not ok:
        pytest.skip(f"transport {request.param!r} unavailable here: {why}")
    n = Node(make_cfg(request.param))
    yield n
    n.close()
