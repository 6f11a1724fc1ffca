"""The contract suite runs against every registered transport (and tcp once more, encrypted:
``auth.encrypt``); unavailable ones skip with the reason."""

from __future__ import annotations

import pytest

from lmcache_pd import auth
from lmcache_pd import transport as transports
from lmcache_pd.cli.local import free_ports

ENCRYPTED = "+encrypted"


@pytest.fixture(params=[*transports.names(), "tcp" + ENCRYPTED])
def transport_name(request) -> str:
    name = request.param.removesuffix(ENCRYPTED)
    ok, reason = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {reason}")
    return request.param


@pytest.fixture
def pair(transport_name):
    """(sender, receiver) of one transport; the receiver listens on a free loopback port."""
    name = transport_name.removesuffix(ENCRYPTED)
    extra = {"keys": auth.Keyring(b"the contract suite's test secret"), "encrypt": True} \
        if transport_name.endswith(ENCRYPTED) else {}
    receiver = transports.create(name, {}, host="127.0.0.1", port=free_ports(1)[0], **extra)
    sender = transports.create(name, {}, **extra)
    yield sender, receiver
    sender.close()
    receiver.close()
