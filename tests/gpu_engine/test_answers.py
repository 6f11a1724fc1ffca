"""The GPU-engine tests' reading of answers (answers.py), on CPU: a margin that cannot be read
fails the test instead of reading as no near-tie (before 2026-12-05, top-2 keyed by text lost one
of two tokens that decode alike, and ``tie_free`` let every such tie through)."""

from __future__ import annotations

import pytest

from tests.gpu_engine.answers import difference_evidence, first_difference, min_margin, top2


def answer(ids: list[int], tops: list[dict[str, float]]) -> dict:
    logprobs = {"tokens": [f"token_id:{t}" for t in ids], "top_logprobs": tops,
                "token_logprobs": [max(t.values()) for t in tops]}
    return {"choices": [{"token_ids": ids, "logprobs": logprobs}]}


def by_id(*pairs: tuple[int, float]) -> dict[str, float]:
    return {f"token_id:{t}": lp for t, lp in pairs}


def test_a_step_whose_top_2_collapsed_into_one_key_fails_naming_the_step():
    # Two byte tokens both decode to '': keyed by text, vLLM's top-2 came back as one entry.
    collapsed = answer([7, 9], [by_id((7, -0.1), (8, -2.5)), {"": -0.6932}])
    with pytest.raises(pytest.fail.Exception, match="step 1 of the answer carries {'': -0.6932}"):
        min_margin(collapsed)
    with pytest.raises(pytest.fail.Exception, match="step 1"):
        first_difference(answer([7, 5], [by_id((7, -0.1), (8, -2.5)), by_id((5, -0.7), (9, -0.71))]), collapsed)


def test_margins_are_read_from_the_top_2_by_token_id_whatever_their_order():
    ref = answer([7, 9, 4], [by_id((8, -2.5), (7, -0.1)), by_id((9, -0.65), (3, -0.75), (2, -3.0)),
                             by_id((4, -0.2), (1, -1.9))])
    assert [tuple(t for t, _ in step) for step in top2(ref)] == [
        ("token_id:7", "token_id:8"), ("token_id:9", "token_id:3"), ("token_id:4", "token_id:1")]
    assert min_margin(ref) == pytest.approx(0.1)
    got = answer([7, 3, 4], [by_id((7, -0.1), (8, -2.5)), by_id((3, -0.69), (9, -0.7)), by_id((4, -0.2), (1, -1.9))])
    assert first_difference(got, ref) == (1, 0.1)  # the colocated margin where they part
    assert first_difference(ref, ref) is None


def test_the_evidence_names_both_sides_top_2_by_token_id_and_the_drift_before_the_difference():
    ref = answer([7, 9], [by_id((7, -0.1), (8, -2.5)), by_id((9, -0.65), (3, -0.75))])
    got = answer([7, 3], [by_id((7, -0.13), (8, -2.4)), by_id((3, -0.69), (9, -0.7))])
    text = difference_evidence(got, ref, 1)
    assert "P/D's top-2 at step 1: token_id:3 -0.6900, token_id:9 -0.7000" in text
    assert "colocated's top-2 at step 1: token_id:9 -0.6500, token_id:3 -0.7500" in text
    assert "largest difference 0.0300 nats (step 0)" in text
