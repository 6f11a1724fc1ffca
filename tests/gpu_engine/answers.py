"""Reading greedy answers of vLLM's completions API (``logprobs: 2``, token ids as keys): where
P/D and colocated first differ, how close the colocated top-2 were there, and the evidence that
tells rounding from wrong KV. Used by test_engine.py; tested on CPU by test_answers.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def top2(resp: dict) -> list[tuple[tuple[str, float], tuple[str, float]]]:
    """Each step's two likeliest tokens, (token, logprob) first to second. An answer that does not
    carry two per step fails the test: a missing margin would read as no near-tie."""
    tops = resp["choices"][0]["logprobs"]["top_logprobs"]
    out = []
    for step, t in enumerate(tops):
        if not t or len(t) < 2:
            pytest.fail(f"step {step} of the answer carries {t!r}, not a top-2 to read a margin from")
        first, second = sorted(t.items(), key=lambda kv: -kv[1])[:2]
        out.append((first, second))
    return out


def token_ids(resp: dict) -> list[int]:
    return resp["choices"][0]["token_ids"]


def first_difference(got: dict, ref: dict) -> tuple[int, float | None] | None:
    """(step, colocated top-2 logprob margin there) of the first differing token, or None."""
    a, b = token_ids(got), token_ids(ref)
    if a == b:
        return None
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    tops = top2(ref)
    margin = None
    if i < len(tops):
        (_, first), (_, second) = tops[i]
        margin = round(first - second, 4)
    return i, margin


def assert_same_tokens(got: dict, ref: dict, what: str, again: Callable[[], dict] | None = None) -> None:
    """Token for token; on a difference, say where, how close the colocated top-2 were there, and
    what tells rounding from wrong KV (``difference_evidence``; ``again`` sends the same request
    through P/D once more)."""
    diff = first_difference(got, ref)
    if diff is not None:
        pytest.fail(f"{what}: P/D tokens differ from colocated at step {diff[0]} (colocated top-2 margin "
                    f"{diff[1]} nats)\n  P/D       {token_ids(got)}\n  colocated {token_ids(ref)}\n"
                    + difference_evidence(got, ref, diff[0], again))


def difference_evidence(got: dict, ref: dict, step: int, again: Callable[[], dict] | None = None) -> str:
    """What a difference at ``step`` looks like from the logprobs. Rounding (the decode's own
    kernels for the tokens it computes) moves the shared tokens' logprobs by a few bf16 steps and
    flips only a close pair; KV that is not the prefill's moves them from the first step on, and
    far. A race would not repeat: the same request is sent ``again`` twice."""
    lines = []
    for name, r in (("P/D", got), ("colocated", ref)):
        tops = top2(r)
        top = tops[step] if step < len(tops) else ()
        lines.append(f"  {name}'s top-2 at step {step}: " + ", ".join(f"{t} {lp:.4f}" for t, lp in top))
    a = got["choices"][0]["logprobs"]["token_logprobs"][:step]
    b = ref["choices"][0]["logprobs"]["token_logprobs"][:step]
    drift = [abs(x - y) for x, y in zip(a, b) if x is not None and y is not None]
    if drift:
        k = max(range(len(drift)), key=drift.__getitem__)
        lines.append(f"  the shared tokens' logprobs before it: largest difference {drift[k]:.4f} nats (step {k}), "
                     f"per step {[round(d, 4) for d in drift]}")
    if again is not None:
        for k in range(2):
            d = first_difference(again(), ref)
            lines.append(f"  through P/D again ({k + 1}): {'identical' if d is None else f'differ at {d}'}")
    return "\n".join(lines)


def min_margin(resp: dict) -> float:
    """The smallest top-2 logprob margin over the answer's steps (nats)."""
    return min((first - second for (_, first), (_, second) in top2(resp)), default=float("inf"))
