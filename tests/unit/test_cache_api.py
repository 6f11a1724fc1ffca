"""The cache's HTTP control API and metrics on one worker (real HTTP server, real tiers)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (run scripts/setup)")

from lmcache_pd.cli.local import free_ports  # noqa: E402
from lmcache_pd.node.cache_io import NoCacheIO  # noqa: E402
from lmcache_pd.node.worker_api import WorkerAPI  # noqa: E402
from tests.unit.cache_instances import CHUNK, Instance, cfg_with_cache, prompt, request  # noqa: E402


@pytest.fixture
def served(tmp_path):
    inst = Instance(cfg_with_cache(tmp_path))
    api = WorkerAPI(inst.io, instance=inst.name, rank=0, host="127.0.0.1", port=free_ports(1)[0])
    api.start()
    url = f"http://127.0.0.1:{api.address[1]}"
    yield inst, url
    api.close()
    inst.close()


def call(url: str, path: str, body: dict | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(url + path, None if body is None else json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read().decode()
            return r.status, json.loads(raw) if r.headers["content-type"] == "application/json" else raw
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def save(inst, toks, salt=None, rid="a"):
    inst.save(toks, range(len(toks) // 16 + 1), salt=salt, rid=rid)


def test_lookup_pin_and_clear_by_prefix_tenant_and_all(served):
    inst, url = served
    toks = prompt(3 * CHUNK + 5)
    save(inst, toks)
    save(inst, toks, salt="alice", rid="b")
    assert call(url, "/cache/lookup", {"token_ids": toks + [1, 2]}) == (
        200, {"cached_tokens": 3 * CHUNK, "chunks": 3, "full_chunks": 3, "tiers": {"memory": 3 * CHUNK}})
    assert call(url, "/cache/lookup", {"token_ids": toks, "tenant": "bob"})[1]["cached_tokens"] == 0
    assert call(url, "/cache/pin", {"token_ids": toks}) == (200, {"chunks": 3})
    assert call(url, "/cache/unpin", {"token_ids": toks}) == (200, {"chunks": 3})

    # clear a prefix: its chunks go, so every prompt extending it misses from there
    status, out = call(url, "/cache/clear", {"token_ids": toks[: 2 * CHUNK]})
    assert status == 200 and out["removed"] == {"memory": 2, "disk": 2}
    assert call(url, "/cache/lookup", {"token_ids": toks})[1]["cached_tokens"] == 0
    assert call(url, "/cache/lookup", {"token_ids": toks, "tenant": "alice"})[1]["cached_tokens"] == 3 * CHUNK

    status, out = call(url, "/cache/clear", {"tenant": "alice"})
    assert status == 200 and out["removed"] == {"memory": 3, "disk": 3}
    save(inst, toks, rid="c")
    assert call(url, "/cache/clear", {"all": True})[1]["removed"] == {"memory": 3, "disk": 3}
    assert inst.io.cache.stats().tiers["disk"].entries == 0


def test_a_lookup_by_chain_hashes_answers_as_one_by_token_ids(served):
    """The proxy sends the prompt's chain hashes (computed once for every instance) instead of its
    token ids: the same answer, per tenant; a clear by chains removes that prefix only."""
    from lmcache_pd.chains import chain_hashes

    inst, url = served
    toks = prompt(3 * CHUNK + 5)
    save(inst, toks)
    save(inst, toks, salt="alice", rid="b")
    for tenant in (None, "alice", "bob"):
        chains = [c.hex() for c in chain_hashes(toks, CHUNK, tenant=tenant)]
        by_ids = call(url, "/cache/lookup", {"token_ids": toks, "tenant": tenant})
        assert call(url, "/cache/lookup", {"chains": chains, "tenant": tenant}) == by_ids
        assert by_ids[1]["cached_tokens"] == (0 if tenant == "bob" else 3 * CHUNK)
    alice = [c.hex() for c in chain_hashes(toks, CHUNK, tenant="alice")]
    assert call(url, "/cache/clear", {"chains": alice[2:], "tenant": "alice"})[1]["removed"] == {"memory": 1, "disk": 1}
    assert call(url, "/cache/lookup", {"chains": alice, "tenant": "alice"})[1]["cached_tokens"] == 2 * CHUNK
    assert call(url, "/cache/lookup", {"token_ids": toks})[1]["cached_tokens"] == 3 * CHUNK


@pytest.mark.parametrize("body", [{}, {"all": True, "tenant": "x"}, {"token_ids": "abc"}, {"token_ids": [1.5]},
                                  {"tenant": 7}, {"all": "yes"}, [], {"chains": "ab"}, {"chains": ["zz"]},
                                  {"chains": ["ab" * 16]}, {"chains": [7]}, {"chains": [], "token_ids": [1]},
                                  {"chains": ["ab" * 32], "tenant": "x", "all": True}])
def test_bad_requests_are_refused_and_change_nothing(served, body):
    inst, url = served
    toks = prompt(2 * CHUNK + 1)
    save(inst, toks)
    status, out = call(url, "/cache/clear", body)
    assert status == 400 and "error" in out
    assert call(url, "/cache/lookup", {"token_ids": toks})[1]["cached_tokens"] == 2 * CHUNK


def test_unknown_route_and_garbled_json(served):
    _, url = served
    assert call(url, "/cache/nope", {})[0] == 404
    req = urllib.request.Request(url + "/cache/lookup", b"{not json", {"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 400


def test_stats_and_prometheus_metrics(served):
    inst, url = served
    toks = prompt(3 * CHUNK + 1)
    save(inst, toks)
    assert inst.matched(request("again", toks)) == (3 * CHUNK, True)  # a recorded lookup: 3 chunks in memory
    status, stats = call(url, "/cache/stats")
    assert status == 200 and stats["chunk_tokens"] == CHUNK
    assert stats["hit_tokens"]["memory"] == 3 * CHUNK
    assert stats["tiers"]["disk"]["entries"] == 3 and stats["tiers"]["memory"]["written_bytes"] > 0
    assert stats["holds"] == 1  # the lookup holds its chunks for a load that has not come yet
    status, text = call(url, "/metrics")
    assert status == 200
    lines = text.splitlines()
    hit = [ln for ln in lines if ln.startswith("lmcache_pd_cache_hit_tokens_total{") and 'tier="memory"' in ln]
    assert hit and float(hit[0].split()[-1]) == 3 * CHUNK
    assert any(ln.startswith("lmcache_pd_cache_evictions_total{") for ln in lines)
    assert any(ln.startswith('lmcache_pd_cache_up{') and ln.endswith(" 1.0") for ln in lines)
    assert any(ln.startswith('lmcache_pd_cache_holds{') and ln.endswith(" 1.0") for ln in lines)


def test_with_a_secret_every_post_needs_the_token(tmp_path):
    from lmcache_pd import auth

    keys = auth.Keyring(b"the deployment's secret for http")
    inst = Instance(cfg_with_cache(tmp_path))
    api = WorkerAPI(inst.io, instance=inst.name, rank=0, host="127.0.0.1", port=free_ports(1)[0], keys=keys)
    api.start()
    url = f"http://127.0.0.1:{api.address[1]}"
    try:
        toks = prompt(2 * CHUNK + 1)
        save(inst, toks)

        def clear(headers: dict) -> int:
            req = urllib.request.Request(url + "/cache/clear", json.dumps({"all": True}).encode(),
                                         {"content-type": "application/json", **headers})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        for bad in ({}, {"authorization": "Bearer nope"}, {"authorization": f"Basic {keys.api_token}"},
                    {"authorization": f"Bearer {auth.Keyring(b'another secret for the http api').api_token}"}):
            assert clear(bad) == 401
        assert call(url, "/cache/lookup", {"token_ids": toks})[0] == 401  # every POST
        assert inst.io.cache.stats().tiers["memory"].entries == 2  # nothing was cleared
        assert call(url, "/cache/stats")[0] == 200  # reads stay open for monitoring
        assert clear({"authorization": f"Bearer {keys.api_token}"}) == 200
        assert inst.io.cache.stats().tiers["memory"].entries == 0
    finally:
        api.close()
        inst.close()


def test_hand_off_state_and_its_metrics_without_a_cache():
    status = {"pool": {"pages": 8, "free_pages": 6, "expired_total": 2}, "control": {"unauthenticated": 3},
              "blocks": {"held_requests": 1}}
    api = WorkerAPI(NoCacheIO(), instance="decode-0", rank=0, host="127.0.0.1", port=free_ports(1)[0],
                    status=lambda: status)
    api.start()
    url = f"http://127.0.0.1:{api.address[1]}"
    try:
        assert call(url, "/pd/stats") == (200, status)
        code, text = call(url, "/metrics")
        lines = text.splitlines()
        assert code == 200
        assert 'lmcache_pd_pool_free_pages{instance="decode-0",rank="0"} 6.0' in lines
        assert 'lmcache_pd_pool_expired_total{instance="decode-0",rank="0"} 2.0' in lines
        assert 'lmcache_pd_control_unauthenticated_total{instance="decode-0",rank="0"} 3.0' in lines
        assert call(url, "/cache/stats")[0] == 404  # the cache is off here
        assert call(url, "/cache/lookup", {"token_ids": [1]})[0] == 404
    finally:
        api.close()


def raw_http(port: int, data: bytes, timeout_s: float = 3.0) -> bytes:
    """Send raw bytes, return what comes back until the server closes or ``timeout_s`` passes."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


def test_hostile_http_clients_get_clear_answers_and_hold_nothing(tmp_path):
    """A negative Content-Length, a non-ASCII bearer token, a client that sends nothing."""
    from lmcache_pd import auth

    keys = auth.Keyring(b"the deployment's secret for http")
    api = WorkerAPI(NoCacheIO(), instance="decode-0", rank=0, host="127.0.0.1", port=free_ports(1)[0], keys=keys,
                    io_timeout_s=0.5)
    api.start()
    port = api.address[1]
    try:
        t0 = time.monotonic()
        out = raw_http(port, f"POST /cache/lookup HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {keys.api_token}\r\n"
                             "content-length: -1\r\n\r\n{}".encode())
        assert out.startswith(b"HTTP/1.1 400") and b"content-length -1" in out, out[:200]
        assert time.monotonic() - t0 < 2.5  # answered and closed, not read to the stream's end
        out = raw_http(port, "POST /cache/clear HTTP/1.1\r\nhost: x\r\nauthorization: Bearer \u00e9t\u00e9\r\n"
                             "content-length: 2\r\n\r\n{}".encode())
        assert out.startswith(b"HTTP/1.1 401"), out[:200]
        t0 = time.monotonic()
        assert raw_http(port, b"", timeout_s=5) == b""  # says nothing: dropped after io_timeout_s
        assert time.monotonic() - t0 < 2.5
    finally:
        api.close()
