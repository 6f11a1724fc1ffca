"""The first token from the prefill (``proxy.first_token=prefill``; L6, no torch, no vllm).

The prefill computes the whole prompt and samples the first token, as a colocated instance
would. The client gets that token as soon as the prefill answers; the decode then continues
from it: its prompt is the prompt's token ids plus that token, the KV of every prompt token
comes from the hand-off, and the first thing the decode computes is the sampled token's own
KV, which is the first decode step of a colocated instance too. So:
  - TTFT is the prefill's own (plus the proxy), not the prefill's plus a hand-off plus the
    decode's scheduling of the last prompt token;
  - the first token cannot differ from a colocated run's: the prefill sampled it from logits
    of the same forward a colocated instance runs (no near-tie flips on the first token).

The decode's answer is then stitched to the first token: its text and token ids after the
prefill's, its usage counting the first token as generated (not as prompt).

Only requests the decode can continue exactly take this path (``refusal`` says why not):
  - ``/v1/completions`` only: chat answers are shaped by the server's chat template, tool and
    reasoning parsers, which a completions continuation would lose;
  - no ``stop`` strings (one split across the first token and the next would not be seen), no
    ``bad_words`` (the same), no structured output (its grammar would restart after the first
    token), no presence or frequency penalty (they count output tokens, and the first token
    would count as prompt), no ``seed`` (the sampler's stream would restart), no
    ``truncate_prompt_tokens``, no logits processor arguments.
Logprobs are kept: the first token's come from the prefill, the rest from the decode, whose
text offsets are moved past the first token's text.
The others take the decode-samples path (``proxy.dispatch``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

_COMPLETIONS = "/v1/completions"
_NOT_CONTINUABLE = ("seed", "truncate_prompt_tokens", "logits_processors", "vllm_xargs",
                    "structured_outputs", "response_format", "guided_json", "guided_regex", "guided_choice",
                    "guided_grammar", "guided_decoding_backend")
"""Fields that, when set, keep a request off this path (see the module doc)."""
_NOT_IF_TRUTHY = ("stop", "bad_words", "presence_penalty", "frequency_penalty")


def refusal(path: str, body: dict[str, Any]) -> str | None:
    """Why this (splittable) request cannot take the first token from the prefill; None if it can."""
    if path != _COMPLETIONS:
        return "chat"
    for key in _NOT_CONTINUABLE:
        if body.get(key) is not None:
            return key
    for key in _NOT_IF_TRUTHY:
        if body.get(key):
            return key
    return None


def max_new(body: dict[str, Any]) -> int | None:
    """The client's token budget (None: up to the model's length)."""
    n = body.get("max_tokens")
    return n if isinstance(n, int) else None


def _ids_known(body: dict[str, Any]) -> bool:
    """The client's prompt is token ids (the proxy checked them) and it asked for no logprobs: the
    prefill need not send the prompt back (8192 tokens are some 40 KB each way, on the path to the
    first token); its sampled token's id comes in its logprobs (``return_tokens_as_token_ids``)."""
    return isinstance(body.get("prompt"), list) and body.get("logprobs") is None


def prefill_body(body: dict[str, Any], params: dict[str, Any], *, first_token: bool) -> dict[str, Any]:
    """The prefill's request: one token, not streamed, with the hand-off parameters. For the first
    token it also returns the token ids (the sampled one, and the prompt's where the proxy does
    not know them) and keeps ``min_tokens`` (end of sequence may not come first if the client
    asked for at least one token)."""
    out = dict(body, kv_transfer_params=params, stream=False, max_tokens=1)
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    min_tokens = body.get("min_tokens") or 0
    for key in ("stream_options", "min_tokens", "min_completion_tokens"):
        out.pop(key, None)
    if first_token:
        if _ids_known(body):
            out.pop("return_token_ids", None)
            out["logprobs"], out["return_tokens_as_token_ids"] = 0, True
        else:
            out["return_token_ids"] = True
        if isinstance(min_tokens, int) and min_tokens > 0:
            out["min_tokens"] = 1
    return out


class BadAnswer(ValueError):
    """The prefill's answer lacks what the continuation needs (token ids, one choice)."""


class Continuation:
    """The prefill's one-token answer, and the decode's request and answers continuing it."""

    def __init__(self, body: dict[str, Any], answer: dict[str, Any]):
        try:
            choice = answer["choices"][0]
            self.text: str = choice["text"]
            self.finish_reason: str | None = choice.get("finish_reason")
            if _ids_known(body):
                token = choice["logprobs"]["tokens"]
                if len(token) != 1 or not isinstance(token[0], str) or not token[0].startswith("token_id:"):
                    raise BadAnswer(f"prefill answer with tokens {token[:2]!r}, not one 'token_id:N'")
                self.token_ids: list[int] = [int(token[0].removeprefix("token_id:"))]
                self.prompt_ids: list[int] = body["prompt"]
                self.logprobs: dict[str, Any] | None = None  # asked for by the proxy, not the client
            else:
                self.token_ids = list(choice["token_ids"])
                self.prompt_ids = list(choice["prompt_token_ids"])
                self.logprobs = choice.get("logprobs")
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise BadAnswer(f"prefill answer without {e}") from None
        # (A prompt of the client's own ids was checked by the proxy: only the prefill's are.)
        theirs = self.token_ids if self.prompt_ids is body.get("prompt") else (*self.token_ids, *self.prompt_ids)
        if len(self.token_ids) != 1 or not all(isinstance(t, int) for t in theirs):
            raise BadAnswer(f"prefill answer with {len(self.token_ids)} tokens, not 1")
        self.body = body
        self.answer = answer
        self.want_ids = bool(body.get("return_token_ids"))
        self.id, self.created = answer.get("id"), answer.get("created")

    @property
    def finished(self) -> bool:
        """The first token ended the answer (end of sequence, a stop token, or max_tokens 1)."""
        return self.finish_reason == "stop" or max_new(self.body) == 1

    def decode_body(self, kv: dict[str, Any] | None) -> dict[str, Any]:
        """The decode's request: the prompt's token ids plus the first token, one token fewer to
        generate; ``kv``: the prefill's hand-off parameters (None: the decode computes it all)."""
        out = dict(self.body, prompt=self.prompt_ids + self.token_ids)
        if (n := max_new(self.body)) is not None:
            out["max_tokens"] = n - 1
        if isinstance(m := self.body.get("min_tokens"), int) and m > 0:
            out["min_tokens"] = m - 1
        out.pop("kv_transfer_params", None)
        if kv is not None:
            out["kv_transfer_params"] = kv
        return out

    def drain_body(self, kv: dict[str, Any]) -> dict[str, Any]:
        """A one-token request that makes the decode load (and so free) the hand-off's pages when
        the first token ended the answer; its own answer is dropped."""
        out = dict(self.decode_body(kv), max_tokens=1, stream=False)
        for key in ("stream_options", "min_tokens", "return_token_ids"):
            out.pop(key, None)
        return out

    # --- answers -------------------------------------------------------------------------
    def _ids(self, choice: dict[str, Any], token_ids: list[int] | None) -> None:
        """The token id fields of a choice as vLLM fills them: only if the client asked."""
        if "token_ids" in choice or self.want_ids:
            choice["token_ids"] = token_ids if self.want_ids else None
        if "prompt_token_ids" in choice:
            choice["prompt_token_ids"] = None

    def _logprobs(self, choice: dict[str, Any]) -> None:
        """The decode's logprobs follow the first token's text (completions' ``text_offset``)."""
        lp = choice.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("text_offset"), list):
            lp["text_offset"] = [o + len(self.text) for o in lp["text_offset"]]

    def _usage(self, usage: dict[str, Any] | None) -> None:
        """The first token was the decode's prompt: for the client it is generated."""
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            usage["prompt_tokens"] -= 1
            usage["completion_tokens"] = usage.get("completion_tokens", 0) + 1
            if isinstance(details := usage.get("prompt_tokens_details"), dict) and details.get("cached_tokens"):
                details["cached_tokens"] = min(details["cached_tokens"], usage["prompt_tokens"])

    def alone(self) -> dict[str, Any]:
        """The whole answer when the first token ended it."""
        out = json.loads(json.dumps(self.answer))
        out.pop("kv_transfer_params", None)
        choice = out["choices"][0]
        self._ids(choice, self.token_ids)
        choice["logprobs"] = self.logprobs
        if self.want_ids:
            choice["prompt_token_ids"] = self.prompt_ids
        if self.finish_reason is None:
            choice["finish_reason"] = "length"
        return out

    def whole(self, answer: dict[str, Any]) -> dict[str, Any]:
        """The decode's whole answer continued from the first token."""
        answer.pop("kv_transfer_params", None)
        answer["id"], answer["created"] = self.id, self.created
        choice = answer["choices"][0]
        choice["text"] = self.text + choice.get("text", "")
        self._logprobs(choice)
        first = self.logprobs
        if isinstance(first, dict) and isinstance(rest := choice.get("logprobs"), dict):
            choice["logprobs"] = {k: list(first.get(k) or ()) + list(rest.get(k) or ()) for k in rest}
        self._ids(choice, self.token_ids + list(choice.get("token_ids") or ()))
        if self.want_ids:
            choice["prompt_token_ids"] = self.prompt_ids
        self._usage(answer.get("usage"))
        return answer

    def first_event(self, finished: bool = False) -> bytes:
        """The stream's first event: the first token (and its end, if it ended the answer)."""
        choice: dict[str, Any] = {"index": 0, "text": self.text, "logprobs": self.logprobs,
                                  "finish_reason": (self.finish_reason or "length") if finished else None,
                                  "stop_reason": self.answer["choices"][0].get("stop_reason") if finished else None}
        if self.want_ids:
            choice["prompt_token_ids"], choice["token_ids"] = self.prompt_ids, self.token_ids
        event = {"id": self.id, "object": "text_completion", "created": self.created,
                 "model": self.answer.get("model"), "choices": [choice]}
        return _event(event)

    def alone_events(self) -> list[bytes]:
        """The whole stream when the first token ended the answer."""
        out = [self.first_event(finished=True)]
        if (self.body.get("stream_options") or {}).get("include_usage") and isinstance(self.answer.get("usage"), dict):
            out.append(_event({"id": self.id, "object": "text_completion", "created": self.created,
                               "model": self.answer.get("model"), "choices": [], "usage": self.answer["usage"]}))
        out.append(b"data: [DONE]\n\n")
        return out

    def event(self, data: dict[str, Any]) -> dict[str, Any]:
        """One of the decode's stream events, continued from the first token."""
        if "choices" not in data:  # an error event
            return data
        data["id"], data["created"] = self.id, self.created
        for choice in data.get("choices") or ():
            if "prompt_token_ids" in choice:
                choice["prompt_token_ids"] = None
            self._logprobs(choice)
        self._usage(data.get("usage"))
        return data

    async def events(self, decoded: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The decode's stream (whole events, already without hand-off parameters), continued."""
        async for chunk in decoded:
            out = []
            for ev in chunk.split(b"\n\n"):
                if not ev.strip():
                    continue
                if ev.startswith(b"data: {"):
                    try:
                        ev = _event(self.event(json.loads(ev[6:])))[:-2]
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        pass
                out.append(ev + b"\n\n")
            if out:
                yield b"".join(out)


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
