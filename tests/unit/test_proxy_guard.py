"""The proxy towards clients, over real sockets: the proxy and a scripted
vLLM-like backend (FastAPI, serving both the prefill and the decode role) each run by uvicorn.

Answers carry no ``kv_transfer_params``; bodies are bounded; a client that goes away drops its
backend request; GET routes forward the client's Authorization. (Resending is in
test_proxy_resend.py; the real vLLM path in tests/integration/test_e2e.py.)
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmcache_pd.cli.local import free_ports
from lmcache_pd.config import config_from_dict
from lmcache_pd.proxy.app import create_app

REPORT_HEADER = "x-lmcache-pd-handoff"  # (proxy/answers.py; spelled out: the header is part of the contract)
REPORT = {"lmcache_pd": {"transfer_id": "t-1", "loaded": True, "error": "", "cache_tokens": 0}}


class Backend:
    """What the proxy sees of a vLLM with our connector: the prefill answers with DecodeParams,
    the decode with a report in ``kv_transfer_params``; ``hold`` makes the decode never answer."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.seen: list[dict] = []
        self.headers: list[dict] = []
        self.gone_at: float | None = None
        self.hold = False
        app = self.app

        @app.get("/health")
        async def health() -> dict:
            return {}

        @app.get("/v1/models")
        async def models(request: Request) -> dict:
            self.headers.append(dict(request.headers))
            return {"data": [{"id": "tiny"}]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.seen.append(body)
            kv = body.get("kv_transfer_params") or {}
            if kv.get("do_remote_decode"):  # the prefill leg
                return {"id": "cmpl-1", "created": 1, "model": "tiny", "choices": [{
                    "index": 0, "text": "x", "finish_reason": "length", "token_ids": [7],
                    "prompt_token_ids": [1, 2, 3]}], "kv_transfer_params": {
                    "do_remote_prefill": True, "do_remote_decode": False, "transfer_id": kv["transfer_id"],
                    "num_tokens": 3, "prompt_digest": "d" * 32, "prefill_peer": "prefill-0"}}
            if self.hold:  # the decode leg, which never answers: watch for the proxy dropping it
                while not await request.is_disconnected():
                    await asyncio.sleep(0.02)
                self.gone_at = time.monotonic()
                return JSONResponse({})
            if body.get("stream"):
                async def events():
                    yield b'data: {"choices": [{"text": "a"}]}\n\n'
                    yield b'data: {"choices": [{"text": "b"}], "kv_transfer_params": ' + json.dumps(REPORT).encode() \
                        + b'}\n\ndata: [DONE]\n\n'
                return StreamingResponse(events(), media_type="text/event-stream")
            return {"choices": [{"text": "ab"}], "kv_transfer_params": REPORT}


@pytest.fixture
def proxied(serve):
    """(proxy url, backend, proxy config dict) with handoff_report off, as by default."""
    backend = Backend()
    b_port, b2_port, p_port, d_ctrl, d_data = free_ports(5)
    serve(backend.app, b_port)  # the prefill
    serve(backend.app, b2_port)  # the decode
    made = []

    def make(**proxy):
        cfg = config_from_dict({
            "model": {"path": "tiny"},
            "prefill": [{"name": "prefill-0", "http_port": b_port}],
            "decode": [{"name": "decode-0", "http_port": b2_port, "control_port": d_ctrl, "data_port": d_data}],
            "proxy": {"port": p_port + len(made), **proxy},
        }, source="test")
        serve(create_app(cfg), p_port + len(made))
        made.append(1)
        return f"http://127.0.0.1:{p_port + len(made) - 1}"

    yield make, backend


def test_answers_reach_the_client_without_kv_transfer_params(proxied):
    make, backend = proxied
    url = make()
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    # (proxy.first_token=prefill: the prefill's token "x", then the decode's "ab")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "xab"
    assert "kv_transfer_params" not in r.json() and REPORT_HEADER not in r.headers
    assert any((b.get("kv_transfer_params") or {}).get("do_remote_prefill") for b in backend.seen)  # the decode's
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2,
                                                              "stream": True}) as s:
        text = b"".join(s.iter_raw()).decode()
    events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    assert [e["choices"][0]["text"] for e in events] == ["x", "a", "b"] and "[DONE]" in text
    assert "kv_transfer_params" not in text and "t-1" not in text


def test_the_operator_may_ask_for_the_report_in_a_header(proxied):
    make, _ = proxied
    url = make(handoff_report=True)
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert "kv_transfer_params" not in r.json()
    assert json.loads(r.headers[REPORT_HEADER]) == REPORT["lmcache_pd"]


def test_bodies_beyond_max_body_mib_are_refused_unread(proxied):
    make, backend = proxied
    url = make(max_body_mib=1)
    port = int(url.rsplit(":", 1)[1])
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:  # says 40 MiB, sends a little
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 41943040\r\n\r\n{\"prompt\": \"")
        answer = c.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413") and b"proxy.max_body_mib" in answer
    assert time.monotonic() - t0 < 3
    big = {"model": "tiny", "prompt": "x" * (2 << 20)}  # chunked: no length to go by
    r = httpx.post(f"{url}/v1/completions", content=(json.dumps(big).encode()[i:i + 65536]
                                                    for i in range(0, 3 << 20, 65536)))
    assert r.status_code == 413 and not backend.seen


@pytest.mark.parametrize("raw, says", [
    (b'{"model": "tiny", "prompt": [1, 2], "temperature": NaN}', "not valid JSON"),  # strict JSON
    (b'{"model": "tiny", "prompt": [1, 2]', "not valid JSON"),
    (b'[{"model": "tiny"}]', "must be a JSON object"),
])
def test_bodies_that_are_not_json_objects_are_refused_and_reach_no_backend(proxied, raw, says):
    make, backend = proxied
    url = make()
    r = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    assert not backend.seen


def test_only_a_prompt_of_integers_is_split_as_token_ids(proxied):
    """JSON's true is no token id (Python's bool is an int): such a prompt goes to the decode
    whole, whose vLLM answers it, and no prefill computes it."""
    make, backend = proxied
    url = make()
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [1, True, 3], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ab"
    assert [b.get("kv_transfer_params") for b in backend.seen] == [None]
    backend.seen.clear()
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2})
    assert r.status_code == 200  # (this backend's prefill answer names no token: the decode computes)
    assert backend.seen[0]["kv_transfer_params"]["do_remote_decode"] and backend.seen[0]["prompt"] == [1, 2, 3]


def test_a_non_streaming_client_that_goes_away_drops_the_backend_request(proxied):
    make, backend = proxied
    url = make()
    backend.hold = True
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    c.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n" % len(body) + body)
    deadline = time.monotonic() + 5
    while len(backend.seen) < 2:  # the prefill leg answered, the decode leg waits
        assert time.monotonic() < deadline
        time.sleep(0.02)
    left = time.monotonic()
    c.close()  # the client goes away
    while backend.gone_at is None:
        assert time.monotonic() < left + 3, "the decode request was not dropped with its client"
        time.sleep(0.02)
    assert backend.gone_at - left < 1.5
    stats = httpx.get(f"{url}/metrics").text
    assert "lmcache_pd_proxy_client_gone_total 1.0" in stats


def test_a_streaming_client_that_goes_away_after_its_first_token_drops_the_decode_request(proxied):
    """The first token (the prefill's) reached the client; the decode's stream has not started
    when the client goes: the proxy closes the decode request (vLLM would abort it). The answer had
    started, so the client is not counted as gone before it."""
    make, backend = proxied
    url = make()
    backend.hold = True
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": True}).encode()
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    c.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while b"data: {" not in got:
        got += c.recv(65536)
    assert b'"text":"x"' in got  # the prefill's token
    deadline = time.monotonic() + 5
    while len(backend.seen) < 2:  # the decode leg was sent and waits
        assert time.monotonic() < deadline
        time.sleep(0.02)
    left = time.monotonic()
    c.close()
    while backend.gone_at is None:
        assert time.monotonic() < left + 3, "the decode request was not dropped with its client"
        time.sleep(0.02)
    assert backend.gone_at - left < 1.5
    assert "lmcache_pd_proxy_client_gone_total 0.0" in httpx.get(f"{url}/metrics").text


def test_the_completion_routes_take_post_only(proxied):
    make, _ = proxied
    url = make()
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 405 and r.headers["allow"] == "POST" and "POST" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/nothing").status_code == 404


def test_get_routes_forward_the_clients_authorization(proxied):
    make, backend = proxied
    url = make()
    r = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer the-clients-vllm-key"})
    assert r.status_code == 200
    assert backend.headers[-1].get("authorization") == "Bearer the-clients-vllm-key"
