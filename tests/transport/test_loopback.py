"""The loopback transport's scripted behaviours (used by tests of the layers above)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

from lmcache_pd import transport as transports
from lmcache_pd._types import BatchState
from lmcache_pd.errors import PeerLost
from lmcache_pd.layout import coalesce
from tests.transport.handles import wait

ONE = coalesce(np.array([0]), np.array([0]), np.array([8]))


def pair(**options):
    rx = transports.create("loopback", {})
    tx = transports.create("loopback", options)
    region = rx.register(torch.zeros(64, dtype=torch.uint8))
    sid = tx.register(torch.ones(64, dtype=torch.uint8))
    return tx, rx, sid, rx.export_descriptor(region)


def test_fail_every_nth_batch():
    tx, rx, sid, desc = pair(fail_every=2)
    peer = tx.connect(desc, 1)
    states = [wait(tx, tx.submit(peer, sid, ONE, 1)) for _ in range(4)]
    assert states == [BatchState.DONE, BatchState.FAILED] * 2
    tx.close()
    rx.close()


def test_delay_past_deadline_times_out_and_release_cancels():
    tx, rx, sid, desc = pair(delay_s=0.3)
    peer = tx.connect(desc, 1)
    assert wait(tx, tx.submit(peer, sid, ONE, timeout_s=0.1)) == BatchState.TIMEOUT
    h = tx.submit(peer, sid, ONE, timeout_s=5)
    h2 = tx.submit(peer, sid, ONE, timeout_s=5)
    h2.close()  # queued behind h: canceled before it runs
    assert h2.state == BatchState.CANCELED
    assert wait(tx, h) == BatchState.DONE
    tx.close()
    rx.close()


def test_closing_a_batch_whose_copy_is_wedged_waits_only_until_its_deadline(caplog):
    # A copy that began cannot be recalled, so close() waits for it; but a copy wedged past the
    # batch's own deadline (a hung device) must not hang the failure path that closes it.
    tx, rx, sid, desc = pair(copy_s=2.0)
    peer = tx.connect(desc, 1)
    h = tx.submit(peer, sid, ONE, timeout_s=0.3)
    while h.id not in tx._copying:  # the copy began
        time.sleep(0.001)
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="lmcache_pd.transport.base"):
        h.close()
    waited = time.monotonic() - t0
    assert 0.1 < waited < 1.5, f"close() waited {waited:.2f} s"
    assert "timeouts.data_s" in caplog.text and f"batch #{h.id}" in caplog.text
    tx.close()
    rx.close()


def test_refuse_connect():
    tx, rx, sid, desc = pair(refuse_connect=True)
    with pytest.raises(PeerLost):
        tx.connect(desc, 1)
    tx.close()
    rx.close()
