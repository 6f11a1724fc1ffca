"""Routing policies on recorded instance states (proxy/policies.py; no processes, no I/O)."""

from __future__ import annotations

import pytest

from lmcache_pd.config import RoutingConfig
from lmcache_pd.errors import ConfigError
from lmcache_pd.proxy.policies import Ask, InstanceView, KVAware, Policy, RoundRobin, Route, make_policy

CFG = RoutingConfig()


def v(name: str, **kw) -> InstanceView:
    return InstanceView(name, **kw)


def test_round_robin_takes_usable_instances_in_turn_and_never_a_draining_one():
    rr = RoundRobin(CFG)
    prefills = [v("p0"), v("p1", healthy=False), v("p2"), v("p3", draining=True)]
    decodes = [v("d0"), v("d1")]
    got = [rr.route(Ask(100), prefills, decodes) for _ in range(4)]
    assert [(r.prefill, r.decode) for r in got] == [("p0", "d0"), ("p2", "d1"), ("p0", "d0"), ("p2", "d1")]
    # All down: try one anyway (a stale check), but still never a draining one.
    down = [v("p0", healthy=False), v("p1", draining=True)]
    assert {rr.route(Ask(100), down, decodes).prefill for _ in range(3)} == {"p0"}
    assert rr.route(Ask(100), prefills, [v("d0", draining=True)]) is None
    alone = rr.route(Ask(100, splittable=False), prefills, decodes)
    assert alone.prefill is None and alone.prefill_reason == "not_splittable"


def test_kv_aware_prefill_goes_where_the_least_work_is_left_counting_what_each_holds():
    kv = KVAware(CFG)
    d = [v("d0")]
    # p1 holds 600 of the 1024 tokens in its own tiers: 424 to compute, against 1024 on p0.
    r = kv.route(Ask(1024), [v("p0"), v("p1", local_tokens=600)], d)
    assert (r.prefill, r.prefill_reason) == ("p1", "cached_prefix")
    # A token only in the remote tier is worth half of one (remote_weight 0.5): p2's 1024 remote
    # tokens leave 512 to compute, more than p1's 424.
    r = kv.route(Ask(1024), [v("p1", local_tokens=600), v("p2", remote_tokens=1024)], d)
    assert r.prefill == "p1"
    r = kv.route(Ask(1024), [v("p1", local_tokens=400), v("p2", remote_tokens=1024)], d)
    assert r.prefill == "p2"
    # A queue outweighs a hit: p1 holds nearly all of it but has 5000 prompt tokens queued.
    r = kv.route(Ask(1024), [v("p0"), v("p1", local_tokens=1000, queued_tokens=5000)], d)
    assert (r.prefill, r.prefill_reason) == ("p0", "least_work")
    # Equal instances share the work in turn.
    assert {kv.route(Ask(1024), [v("p0"), v("p1")], d).prefill for _ in range(4)} == {"p0", "p1"}
    # An unknown prompt length: the queues decide.
    assert kv.route(Ask(None), [v("p0", queued_tokens=10), v("p1")], d).prefill == "p1"


def test_kv_aware_decode_keeps_a_conversation_where_its_history_is_unless_that_one_is_overloaded():
    kv = KVAware(CFG)
    p = [v("p0")]
    history = v("d1", local_tokens=800, running=3, free_pages=50, pool_pages=100)
    r = kv.route(Ask(1024), p, [v("d0"), history])
    assert (r.decode, r.decode_reason) == ("d1", "affinity")
    # Overloaded by requests, or by its pool: the least loaded decode instead.
    busy = v("d1", local_tokens=800, running=200, waiting=56)
    full = v("d1", local_tokens=800, free_pages=4, pool_pages=100)
    for d1 in (busy, full):
        r = kv.route(Ask(1024), p, [v("d0", running=5), d1, v("d2", running=2)])
        assert (r.decode, r.decode_reason) == ("d2", "affinity_broken"), d1
    # Least loaded: fewest requests, then the most free pages.
    r = kv.route(Ask(1024), p, [v("d0", running=1, free_pages=10), v("d1", running=1, free_pages=90)])
    assert (r.decode, r.decode_reason) == ("d1", "least_loaded")  # (nobody held any of it)
    # One that just joined, its pool not read yet, takes its turn rather than losing every tie
    # to one that reported free pages (CI, 2026-12-04: a rejoined decode got none of 4 requests).
    got = {kv.route(Ask(1024), p, [v("d0", free_pages=90, pool_pages=100), v("d1")]).decode for _ in range(4)}
    assert got == {"d0", "d1"}
    # Every decode overloaded: the least loaded of them, rather than none.
    r = kv.route(Ask(1024), p, [v("d0", running=300), v("d1", running=260)])
    assert r.decode == "d1"


def test_kv_aware_sends_a_prompt_its_decode_almost_holds_to_the_decode_alone():
    kv = KVAware(RoutingConfig(decode_alone_tokens=64))
    p, d = [v("p0")], [v("d0", local_tokens=960)]
    r = kv.route(Ask(1024), p, d)  # 64 tokens left to compute: the decode does it
    assert (r.prefill, r.decode, r.prefill_reason) == (None, "d0", "decode_holds_prompt")
    assert kv.route(Ask(1025), p, d).prefill == "p0"  # 65 left: split as usual
    r = kv.route(Ask(64), p, [v("d0")])  # a short prompt, nothing held: the decode computes it
    assert (r.prefill, r.prefill_reason) == (None, "short_prompt")
    assert kv.route(Ask(65), p, [v("d0")]).prefill == "p0"
    assert kv.route(Ask(None), p, [v("d0")]).prefill == "p0"  # length unknown: split
    by_share = KVAware(RoutingConfig(decode_alone_fraction=0.9))
    assert by_share.route(Ask(1024), p, [v("d0", local_tokens=922)]).prefill is None
    assert by_share.route(Ask(1024), p, [v("d0", local_tokens=921)]).prefill == "p0"
    # The defaults never send a prompt to the decode alone for what it holds.
    assert KVAware(CFG).route(Ask(1024), p, [v("d0", local_tokens=1023)]).prefill == "p0"
    # Not splittable: the decode alone, whatever the rest.
    r = KVAware(CFG).route(Ask(1024, splittable=False), p, d)
    assert (r.prefill, r.prefill_reason) == (None, "not_splittable")


class FirstOnly(Policy):
    """A user's own policy: always the first decode, never a prefill."""

    name = "first_only"

    def route(self, ask, prefills, decodes):
        return Route(decodes[0].name, None, "mine", "mine")


def test_policies_are_chosen_by_name_and_a_bad_name_is_refused_naming_proxy_policy():
    assert isinstance(make_policy("round_robin", CFG), RoundRobin)
    assert isinstance(make_policy("kv_aware", CFG), KVAware)
    mine = make_policy("tests.unit.test_policies:FirstOnly", CFG)
    assert mine.route(Ask(10), [v("p0")], [v("d0"), v("d1")]) == Route("d0", None, "mine", "mine")
    for bad, why in (("fastest", "neither a built-in"), ("no.such.module:X", "cannot load"),
                     ("tests.unit.test_policies:Nope", "cannot load"),
                     ("tests.unit.test_policies:v", "not a subclass")):
        with pytest.raises(ConfigError, match=why) as e:
            make_policy(bad, CFG)
        assert e.value.field == "proxy.policy"
