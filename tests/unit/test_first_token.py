"""The first token from the prefill (``proxy.first_token=prefill``), over real sockets: the proxy
and scripted vLLM-like prefill and decode instances, each served by uvicorn.

The client gets the prefill's token before the decode has answered; the decode is asked to
continue the prompt's token ids plus that token, one token fewer, with the prefill's hand-off
parameters; its answer reaches the client stitched to the first token. Requests the decode
cannot continue exactly take the decode-samples path, counted by why. (The real vLLM path,
token for token against colocated, is in tests/integration/test_e2e.py.)
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fastapi.responses import StreamingResponse

from lmcache_pd.cli.local import free_ports
from lmcache_pd.config import config_from_dict
from lmcache_pd.proxy.app import create_app
from lmcache_pd.proxy.first_token import refusal
from tests.scripted import Scripted

PROMPT_IDS = [1, 2, 3]
FIRST = 7
DECODE_DELAY_S = 1.0


class Prefill(Scripted):
    """A prefill instance: one token (``FIRST``), its ids, the hand-off parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.finish_reason = "length"
        self.token_ids = True

    async def answer(self, body: dict):
        if body.get("stream"):  # serving a request whole (a fallback): one event
            choice = {"index": 0, "text": "x", "finish_reason": "length"}
            return StreamingResponse(iter([b"data: " + json.dumps({"id": "cmpl-req", "choices": [choice]}).encode()
                                           + b"\n\ndata: [DONE]\n\n"]), media_type="text/event-stream")
        kv = body.get("kv_transfer_params") or {}
        choice = {"index": 0, "text": "x", "finish_reason": self.finish_reason, "stop_reason": None}
        if body.get("return_token_ids") and self.token_ids:
            choice |= {"token_ids": [FIRST], "prompt_token_ids": PROMPT_IDS}
        if body.get("logprobs") is not None:
            choice["logprobs"] = logprobs("x", 0)
            if body.get("return_tokens_as_token_ids"):
                choice["logprobs"]["tokens"] = [f"token_id:{FIRST}"]
        answer = {"id": "cmpl-req", "created": 100, "model": "tiny", "choices": [choice],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
        if kv.get("do_remote_decode"):
            answer["kv_transfer_params"] = {
                "do_remote_prefill": True, "do_remote_decode": False, "transfer_id": kv["transfer_id"],
                "num_tokens": 3, "prompt_digest": "d" * 32, "prefill_peer": "prefill-0"}
        return answer


def logprobs(text: str, offset: int) -> dict:
    """vLLM's completion logprobs for one character per token, starting at ``offset``."""
    return {"tokens": list(text), "token_logprobs": [-0.5] * len(text),
            "top_logprobs": [{c: -0.5, "z": -1.5} for c in text], "text_offset": list(range(offset, offset + len(text)))}


class Decode(Scripted):
    """A decode instance: answers "ab" (token ids 8, 9) after DECODE_DELAY_S, whole or streamed."""

    def __init__(self) -> None:
        super().__init__()
        self.answered_at: float | None = None

    async def answer(self, body: dict):
        await asyncio.sleep(DECODE_DELAY_S)
        self.answered_at = time.monotonic()
        ids = body.get("return_token_ids")
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": 2,
                 "total_tokens": len(body["prompt"]) + 2}
        report = {"lmcache_pd": {"loaded": True}}
        lp = body.get("logprobs")
        if not body.get("stream"):
            return {"id": "cmpl-req", "created": 101, "model": "tiny", "usage": usage,
                    "choices": [{"index": 0, "text": "ab", "finish_reason": "length", "stop_reason": None,
                                 "logprobs": logprobs("ab", 0) if lp else None,
                                 "token_ids": [8, 9] if ids else None,
                                 "prompt_token_ids": body["prompt"] if ids else None}],
                    "kv_transfer_params": report}

        def event(text, tok, first=False, finish=None):
            choice = {"index": 0, "text": text, "finish_reason": finish, "token_ids": [tok] if ids else None,
                      "logprobs": logprobs(text, 0 if first else 1) if lp else None,
                      "prompt_token_ids": body["prompt"] if ids and first else None}
            return b"data: " + json.dumps({"id": "cmpl-req", "created": 101, "model": "tiny",
                                           "choices": [choice]}).encode() + b"\n\n"

        async def events():
            yield event("a", 8, first=True)
            yield event("b", 9, finish="length")
            yield b"data: " + json.dumps({"id": "cmpl-req", "choices": [], "usage": usage,
                                          "kv_transfer_params": report}).encode() + b"\n\ndata: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture
def deployment(serve):
    """(proxy url, prefill, decode); ``dead_decode=True`` names a decode port nothing listens on."""
    prefill, decode = Prefill(), Decode()
    p_port, d_port, x_port, d_ctrl, d_data = free_ports(5)
    serve(prefill.app, p_port)
    serve(decode.app, d_port)

    def make(dead_decode: bool = False, **proxy):
        cfg = config_from_dict({
            "model": {"path": "tiny"},
            "prefill": [{"name": "prefill-0", "http_port": p_port}],
            "decode": [{"name": "decode-0", "http_port": free_ports(1)[0] if dead_decode else d_port,
                        "control_port": d_ctrl, "data_port": d_data}],
            "proxy": {"port": x_port, "handoff_report": True, **proxy},
        }, source="test")
        serve(create_app(cfg), x_port)
        return f"http://127.0.0.1:{x_port}"

    return make, prefill, decode


def body(**extra) -> dict:
    return {"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0, **extra}


def events_of(raw: str) -> list[dict]:
    return [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]


def test_the_client_streams_the_prefills_token_before_the_decode_answered(deployment):
    make, prefill, decode = deployment
    url = make()
    t0 = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30, json=body(
            stream=True, min_tokens=2, return_token_ids=True, logprobs=1,
            stream_options={"include_usage": True})) as r:
        chunks = r.iter_raw()
        first = next(chunks)
        first_at = time.monotonic()
        raw = (first + b"".join(chunks)).decode()
    assert decode.answered_at is not None and first_at < decode.answered_at, "the first token waited for the decode"
    assert first_at - t0 < DECODE_DELAY_S
    events = events_of(raw)
    assert events_of(first.decode())[0]["choices"][0]["text"] == "x"
    assert [e["choices"][0]["text"] for e in events if e["choices"]] == ["x", "a", "b"]
    assert [e["choices"][0]["token_ids"] for e in events if e["choices"]] == [[FIRST], [8], [9]]
    # Logprobs: the first token's from the prefill; the decode's offsets follow its text.
    assert [e["choices"][0]["logprobs"]["text_offset"] for e in events if e["choices"]] == [[0], [1], [2]]
    assert [e["choices"][0]["logprobs"]["tokens"] for e in events if e["choices"]] == [["x"], ["a"], ["b"]]
    assert events[0]["choices"][0]["prompt_token_ids"] == PROMPT_IDS  # once, and the client's prompt only
    assert all(e["choices"][0]["prompt_token_ids"] is None for e in events[1:] if e["choices"])
    assert {e["id"] for e in events} == {"cmpl-req"} and {e["created"] for e in events} == {100}
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert raw.endswith("data: [DONE]\n\n") and "kv_transfer_params" not in raw
    # The prefill: one token, its ids asked for, at least one token (min_tokens) before an end.
    (p,) = prefill.seen
    assert (p["max_tokens"], p["min_tokens"], p["return_token_ids"], p["stream"]) == (1, 1, True, False)
    # The decode: the prompt's ids plus the first token, one token fewer, the prefill's parameters.
    (d,) = decode.seen
    assert d["prompt"] == [*PROMPT_IDS, FIRST] and (d["max_tokens"], d["min_tokens"]) == (2, 1)
    assert d["kv_transfer_params"]["num_tokens"] == 3 and d["kv_transfer_params"]["do_remote_prefill"]
    assert d["stream_options"] == {"include_usage": True}


def test_a_whole_answer_is_stitched_to_the_first_token(deployment):
    make, _, decode = deployment
    url = make()
    r = httpx.post(f"{url}/v1/completions", json=body(return_token_ids=True, logprobs=1), timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    (choice,) = out["choices"]
    assert (choice["text"], choice["token_ids"], choice["prompt_token_ids"]) == ("xab", [FIRST, 8, 9], PROMPT_IDS)
    assert choice["logprobs"] == logprobs("xab", 0)  # the prefill's, then the decode's after "x"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert (out["id"], out["created"]) == ("cmpl-req", 100) and "kv_transfer_params" not in out
    assert json.loads(r.headers["x-lmcache-pd-handoff"]) == {"loaded": True}
    # Without return_token_ids the client gets none (the proxy asked the prefill for them).
    r = httpx.post(f"{url}/v1/completions", json=body(), timeout=30)
    assert r.json()["choices"][0]["token_ids"] is None and "return_token_ids" not in decode.seen[-1]
    stats = httpx.get(f"{url}/metrics").text
    assert 'lmcache_pd_proxy_first_tokens_total{reason="",source="prefill"} 2.0' in stats


@pytest.mark.parametrize("stream", [False, True])
def test_a_first_token_that_ends_the_answer_is_the_whole_answer(deployment, stream):
    make, prefill, decode = deployment
    url = make()
    prefill.finish_reason = "stop"  # end of sequence: nothing for the decode to generate
    t0 = time.monotonic()
    if stream:
        raw = httpx.post(f"{url}/v1/completions", json=body(stream=True, stream_options={"include_usage": True}),
                         timeout=30).text
        events = events_of(raw)
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]] == ["stop"]
        assert events[0]["choices"][0]["text"] == "x" and events[-1]["usage"]["completion_tokens"] == 1
        assert raw.endswith("data: [DONE]\n\n")
    else:
        out = httpx.post(f"{url}/v1/completions", json=body(), timeout=30).json()
        assert (out["choices"][0]["text"], out["choices"][0]["finish_reason"]) == ("x", "stop")
        assert "kv_transfer_params" not in out
    assert time.monotonic() - t0 < DECODE_DELAY_S  # the client did not wait for the decode
    # The decode still loads the hand-off (one token, answer dropped), which frees its pages now.
    deadline = time.monotonic() + 5
    while not decode.seen:
        assert time.monotonic() < deadline, "the decode was not asked to take the hand-off's pages"
        time.sleep(0.02)
    drain = decode.seen[0]
    assert drain["max_tokens"] == 1 and drain["kv_transfer_params"]["num_tokens"] == 3
    assert drain["stream"] is False and "stream_options" not in drain  # vLLM refuses stream_options unstreamed


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_of_token_ids_is_not_sent_back_by_the_prefill(deployment, stream):
    """The proxy knows the ids: the prefill returns only its token's id (in logprobs the proxy
    asked for and the client does not see), not the prompt's ids."""
    make, prefill, decode = deployment
    url = make()
    r = httpx.post(f"{url}/v1/completions", json=body(prompt=[4, 5], return_token_ids=True, stream=stream), timeout=30)
    (p,) = prefill.seen
    assert "return_token_ids" not in p and (p["logprobs"], p["return_tokens_as_token_ids"]) == (0, True)
    assert decode.seen[0]["prompt"] == [4, 5, FIRST]
    if stream:
        events = events_of(r.text)
        assert events[0]["choices"][0]["prompt_token_ids"] == [4, 5]
        assert [e["choices"][0]["token_ids"] for e in events if e["choices"]] == [[FIRST], [8], [9]]
        assert all(e["choices"][0]["logprobs"] is None for e in events if e["choices"])
    else:
        (choice,) = r.json()["choices"]
        assert (choice["text"], choice["token_ids"], choice["prompt_token_ids"]) == ("xab", [FIRST, 8, 9], [4, 5])
        assert choice["logprobs"] is None


def test_one_token_requests_are_the_prefills_alone(deployment):
    make, prefill, decode = deployment
    url = make()
    out = httpx.post(f"{url}/v1/completions", json=body(max_tokens=1), timeout=30).json()
    assert out["choices"][0]["text"] == "x"
    assert "kv_transfer_params" not in prefill.seen[0] and not decode.seen  # no hand-off to nowhere


@pytest.mark.parametrize("extra,why", [({"stop": ["\n"]}, "stop"), ({"seed": 1}, "seed"),
                                       ({"bad_words": ["q"]}, "bad_words"), ({"presence_penalty": 0.5}, "presence_penalty"),
                                       ({"response_format": {"type": "json_object"}}, "response_format")])
def test_requests_the_decode_cannot_continue_exactly_take_the_decode_samples_path(deployment, extra, why):
    make, prefill, decode = deployment
    assert refusal("/v1/completions", body(**extra)) == why
    url = make(dispatch="sequential")
    out = httpx.post(f"{url}/v1/completions", json=body(**extra), timeout=30).json()
    assert out["choices"][0]["text"] == "ab"  # the decode's own, from its own first token
    assert decode.seen[0]["prompt"] == "hi" and "return_token_ids" not in prefill.seen[0]
    stats = httpx.get(f"{url}/metrics").text
    assert f'lmcache_pd_proxy_first_tokens_total{{reason="{why}",source="decode"}} 1.0' in stats


def test_chat_and_a_first_token_proxy_switched_off_take_the_decode_samples_path(deployment):
    assert refusal("/v1/chat/completions", {"messages": []}) == "chat"
    assert refusal("/v1/completions", body(temperature=0.7, top_p=0.9, min_tokens=2, ignore_eos=True)) is None
    make, _, decode = deployment
    url = make(first_token="decode", dispatch="sequential")
    assert httpx.post(f"{url}/v1/completions", json=body(), timeout=30).json()["choices"][0]["text"] == "ab"
    assert decode.seen[0]["prompt"] == "hi"


def test_an_unreachable_decode_is_continued_by_the_prefill_instance(deployment):
    make, prefill, _ = deployment
    url = make(dead_decode=True)
    out = httpx.post(f"{url}/v1/completions", json=body(stream=True), timeout=30).text
    events = events_of(out)
    # The prefill instance computes the continuation itself: no hand-off parameters for it.
    assert [e["choices"][0]["text"] for e in events if e["choices"]] == ["x", "x"]
    assert prefill.seen[-1]["prompt"] == [*PROMPT_IDS, FIRST] and "kv_transfer_params" not in prefill.seen[-1]


def test_a_prefill_answer_without_token_ids_is_recomputed_by_the_decode(deployment):
    make, prefill, decode = deployment
    prefill.token_ids = False  # e.g. a server that ignores return_token_ids
    url = make()
    out = httpx.post(f"{url}/v1/completions", json=body(), timeout=30).json()
    assert out["choices"][0]["text"] == "ab" and decode.seen[0]["prompt"] == "hi"
    assert "kv_transfer_params" not in decode.seen[0]
    assert 'lmcache_pd_proxy_fallbacks_total{reason="no_first_token"} 1.0' in httpx.get(f"{url}/metrics").text
