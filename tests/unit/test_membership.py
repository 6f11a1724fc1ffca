"""Live membership (proxy/membership.py): instances join, drain and leave while the proxy serves,
over its admin routes (the real proxy app on uvicorn, instances played by small vLLM-like apps),
and a proxy process re-reads its config file on SIGHUP (a real process, a real signal)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request

from lmcache_pd.cli.local import free_ports
from lmcache_pd.config import config_from_dict, keyring
from lmcache_pd.proxy.app import create_app

SECRET = "s" * 64


class Instance:
    """A vLLM-like instance: answers a prefill leg with DecodeParams (after ``delay`` seconds) and a
    decode leg with two tokens; ``legs`` counts the prefill legs it served."""

    def __init__(self, name: str):
        self.name, self.legs, self.delay, self.started = name, 0, 0.0, threading.Event()
        self.app = app = FastAPI()

        @app.get("/health")
        async def health() -> dict:
            return {}

        @app.post("/v1/completions")
        async def completions(request: Request) -> dict:
            body = await request.json()
            kv = body.get("kv_transfer_params") or {}
            if not kv.get("do_remote_decode"):
                return {"choices": [{"text": "ab"}]}
            self.legs += 1
            self.started.set()
            await asyncio.sleep(self.delay)
            return {"id": "c", "created": 1, "model": "tiny", "choices": [{
                "index": 0, "text": "x", "finish_reason": "length", "token_ids": [7], "prompt_token_ids": [1]}],
                "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False,
                                       "transfer_id": kv["transfer_id"], "num_tokens": 1, "prompt_digest": "d" * 32,
                                       "prefill_peer": self.name}}


def ask(url: str) -> int:
    return httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                      timeout=10).status_code


@pytest.fixture
def proxy(serve, monkeypatch):
    """(proxy url, {name: Instance}, headers with the bearer token): prefill-0 and decode-0
    routed to; decode-1 in the config (the prefills know it) but not routed to."""
    monkeypatch.setenv("LMCACHE_PD_SECRET", SECRET)
    insts = {n: Instance(n) for n in ("prefill-0", "prefill-1", "decode-0", "decode-1")}
    ports = dict(zip(insts, free_ports(len(insts))))
    for n, i in insts.items():
        serve(i.app, ports[n])
    p_port, *ctl = free_ports(5)
    cfg = config_from_dict({
        "model": {"path": "tiny"},
        "prefill": [{"name": "prefill-0", "http_port": ports["prefill-0"]}],
        "decode": [{"name": n, "http_port": ports[n], "control_port": ctl[2 * k], "data_port": ctl[2 * k + 1]}
                   for k, n in enumerate(("decode-0", "decode-1"))],
        "proxy": {"port": p_port, "decodes": ["decode-0"]},
    }, source="test")
    serve(create_app(cfg), p_port)
    headers = {"authorization": f"Bearer {keyring(cfg).api_token}"}
    yield f"http://127.0.0.1:{p_port}", insts, ports, headers


def test_an_instance_joins_drains_and_leaves_while_the_proxy_serves(proxy):
    url, insts, ports, auth = proxy
    p0, p1 = insts["prefill-0"], insts["prefill-1"]
    assert ask(url) == 200 and p0.legs == 1
    joined = httpx.post(f"{url}/admin/instances", headers=auth, json={
        "role": "prefill", "instance": {"name": "prefill-1", "http_port": ports["prefill-1"]}})
    assert joined.status_code == 201, joined.text
    for _ in range(4):
        assert ask(url) == 200
    assert (p0.legs, p1.legs) == (3, 2)  # in turn from the next request on
    # Drained while one of its requests is in flight: that one finishes, no new one comes.
    p0.delay, p0.started = 2.0, threading.Event()
    slow: list[int] = []
    for _ in range(2):  # (the next turn may be prefill-1's)
        t = threading.Thread(target=lambda: slow.append(ask(url)))
        t.start()
        while t.is_alive() and not p0.started.is_set():
            time.sleep(0.01)
        if p0.started.is_set():
            break
    assert p0.started.is_set()
    r = httpx.post(f"{url}/admin/instances/prefill-0/drain", headers=auth)
    assert r.status_code == 200 and r.json() == {"instance": "prefill-0", "draining": True}
    before = (p0.legs, p1.legs)
    for _ in range(3):
        assert ask(url) == 200
    assert t.is_alive(), "the drained instance's request ended before the others were sent"
    t.join(10)
    assert slow[-1] == 200 and (p0.legs, p1.legs) == (before[0], before[1] + 3)
    listed = httpx.get(f"{url}/admin/instances").json()["instances"]
    assert listed["prefill-0"]["draining"] is True and listed["prefill-1"]["draining"] is False
    metrics = httpx.get(f"{url}/metrics").text
    assert 'lmcache_pd_proxy_instance_draining{instance="prefill-0",role="prefill"} 1.0' in metrics
    routed = 1 + 4 + len(slow) + 3
    assert f'lmcache_pd_proxy_routes_total{{reason="round_robin",role="prefill"}} {routed}.0' in metrics, metrics
    # A decode the prefills know joins; then prefill-1 leaves and prefill-0 takes requests again.
    r = httpx.post(f"{url}/admin/instances", headers=auth, json={"role": "decode", "instance": {
        "name": "decode-1", "http_port": ports["decode-1"], "control_port": 1, "data_port": 2}})
    assert r.status_code == 201, r.text
    assert httpx.delete(f"{url}/admin/instances/prefill-1", headers=auth).status_code == 200
    assert httpx.post(f"{url}/admin/instances/prefill-0/undrain", headers=auth).status_code == 200
    legs = (p0.legs, p1.legs)
    assert ask(url) == 200 and (p0.legs, p1.legs) == (legs[0] + 1, legs[1])
    assert set(httpx.get(f"{url}/admin/instances").json()["instances"]) == {"prefill-0", "decode-0", "decode-1"}


def test_membership_changes_are_refused_without_the_token_or_with_a_bad_instance(proxy):
    url, insts, ports, auth = proxy
    good = {"role": "prefill", "instance": {"name": "prefill-1", "http_port": ports["prefill-1"]}}
    for r in (httpx.post(f"{url}/admin/instances", json=good),
              httpx.post(f"{url}/admin/instances", json=good, headers={"authorization": "Bearer nope"}),
              httpx.post(f"{url}/admin/instances/prefill-0/drain"),
              httpx.delete(f"{url}/admin/instances/prefill-0")):
        assert r.status_code == 401, r.text
    cases = [
        ({"role": "prefill", "instance": {"name": "prefill-1", "http_port": "x"}}, 400, "http_port"),
        ({"role": "prefill", "instance": {"name": "prefill-1", "http_port": 1, "colour": 3}}, 400, "colour"),
        ({"role": "router", "instance": {"name": "r", "http_port": 1}}, 400, "role"),
        ({"role": "decode", "instance": {"name": "decode-9", "http_port": 1, "control_port": 2, "data_port": 3}},
         409, "not in the deployment config"),
        ({"role": "prefill", "instance": {"name": "prefill-0", "http_port": 1}}, 409, "already routed to"),
    ]
    for body, status, says in cases:
        r = httpx.post(f"{url}/admin/instances", headers=auth, json=body)
        assert r.status_code == status and says in r.text, (body, r.status_code, r.text)
    assert httpx.post(f"{url}/admin/instances/nobody/drain", headers=auth).status_code == 404
    assert set(httpx.get(f"{url}/admin/instances").json()["instances"]) == {"prefill-0", "decode-0"}
    assert ask(url) == 200 and insts["prefill-0"].legs == 1


def test_a_proxy_process_reads_its_instances_again_on_sighup(serve, tmp_path: Path):
    insts = {n: Instance(n) for n in ("prefill-0", "prefill-1", "decode-0")}
    ports = dict(zip(insts, free_ports(3)))
    for n, i in insts.items():
        serve(i.app, ports[n])
    p_port, ctl, data = free_ports(3)
    base = {"model": {"path": "tiny"}, "prefill": [{"name": "prefill-0", "http_port": ports["prefill-0"]}],
            "decode": [{"name": "decode-0", "http_port": ports["decode-0"], "control_port": ctl, "data_port": data}],
            "proxy": {"port": p_port}}
    path = tmp_path / "pd.yaml"
    path.write_text(yaml.safe_dump(base))
    env = {k: v for k, v in os.environ.items() if k != "LMCACHE_PD_SECRET"}
    proc = subprocess.Popen([sys.executable, "-m", "lmcache_pd.cli.main", "launch", "--role", "proxy",
                             "--config", str(path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{p_port}"

    def members() -> set[str]:
        return set(httpx.get(f"{url}/admin/instances", timeout=2).json()["instances"])

    def wait(cond, what: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(what)

    try:
        wait(lambda: members() == {"prefill-0", "decode-0"}, "the proxy did not start")
        path.write_text(yaml.safe_dump({**base, "prefill": [*base["prefill"], {
            "name": "prefill-1", "http_port": ports["prefill-1"]}]}))
        proc.send_signal(signal.SIGHUP)
        wait(lambda: members() == {"prefill-0", "prefill-1", "decode-0"}, "prefill-1 did not join on SIGHUP")
        for _ in range(2):
            assert ask(url) == 200
        assert insts["prefill-1"].legs == 1
        path.write_text("prefill: [")  # a broken file: logged, nothing changes, the proxy serves on
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None and members() == {"prefill-0", "prefill-1", "decode-0"}
        path.write_text(yaml.safe_dump(base))
        proc.send_signal(signal.SIGHUP)
        wait(lambda: members() == {"prefill-0", "decode-0"}, "prefill-1 did not leave on SIGHUP")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert b"SIGHUP: the config did not load" in err, err[-2000:]
