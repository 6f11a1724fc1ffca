"""The contract suite runs against every registered transport, and tcp twice more: encrypted
(``auth.encrypt``), and with the payload in the socket (``same_host_reads`` off: by default the
suite's pairs, in one process, read each other's memory); unavailable ones skip with the reason."""

from __future__ import annotations

import pytest

from lmcache_pd import auth
from lmcache_pd import transport as transports
from lmcache_pd.cli.local import free_ports

ENCRYPTED = "+encrypted"
SOCKET = "+socket"


@pytest.fixture(params=[*transports.names(), "tcp" + ENCRYPTED, "tcp" + SOCKET])
def transport_name(request) -> str:
    name = request.param.removesuffix(ENCRYPTED).removesuffix(SOCKET)
    ok, reason = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {reason}")
    return request.param


@pytest.fixture
def pair(transport_name):
    """(sender, receiver) of one transport; the receiver listens on a free loopback port."""
    name = transport_name.removesuffix(ENCRYPTED).removesuffix(SOCKET)
    extra = {"keys": auth.Keyring(b"the contract suite's test secret"), "encrypt": True} \
        if transport_name.endswith(ENCRYPTED) else {}
    options = {"same_host_reads": False} if transport_name.endswith(SOCKET) else {}
    receiver = transports.create(name, options, host="127.0.0.1", port=free_ports(1)[0], **extra)
    sender = transports.create(name, options, **extra)
    yield sender, receiver
    sender.close()
    receiver.close()
