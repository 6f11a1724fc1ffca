"""The contract suite runs against every registered transport; unavailable ones skip with the reason."""

from __future__ import annotations

import pytest

from lmcache_pd import transport as transports
from lmcache_pd.cli.local import free_ports


@pytest.fixture(params=transports.names())
def transport_name(request) -> str:
    ok, reason = transports.available(request.param)
    if not ok:
        pytest.skip(f"transport {request.param!r} unavailable here: {reason}")
    return request.param


@pytest.fixture
def pair(transport_name):
    """(sender, receiver) of one transport; the receiver listens on a free loopback port."""
    receiver = transports.create(transport_name, {}, host="127.0.0.1", port=free_ports(1)[0])
    sender = transports.create(transport_name, {})
    yield sender, receiver
    sender.close()
    receiver.close()
