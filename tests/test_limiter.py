"""The Lua limiter on a real Redis, driven through the worker's asyncio pool with the time under the
test's control: exact windows, atomicity, tokens, groups, scopes per model, limits discovered from
the server (up, down, expiry, 429s, slow_down), pacing of large limits, probes."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest
import redis
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from opt_queue.core.config import ApiKey, Config, Limits, fingerprint
from opt_queue.limits.limiter import (
    CEILING,
    DISCOVER,
    FIXED,
    PACE,
    AsyncKeyPool,
    Lease,
    Never,
    Report,
    Wait,
    WindowSpec,
    margin_ms,
    window_plan,
)

T0 = 1_700_000_000_000


def key(secret: str, limits: dict, group: str | None = None, models: tuple[str, ...] | None = None,
        model_limits: dict[str, dict] | None = None, provider: str = "openai") -> ApiKey:
    return ApiKey(secret=SecretStr(secret), fingerprint=fingerprint(secret), api_base="http://x/v1",
                  limits=Limits.model_validate(limits), group=group, models=models, provider=provider,
                  model_limits=tuple((m, Limits.model_validate(v)) for m, v in (model_limits or {}).items()))


class Pool:
    """The asyncio pool on its own loop, with the clock at ``now`` (ms) until the test moves it."""

    def __init__(self, redis_url: str, keys: list[ApiKey], **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        kw.setdefault("margin", 0.0)
        self.pool = AsyncKeyPool(redis.asyncio.Redis.from_url(redis_url), keys, **kw)
        self.pool.now_ms = T0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def advance(self, ms: int) -> None:
        self.pool.now_ms += ms  # type: ignore[operator]

    def acquire(self, model: str = "m", tokens: int = 1, exclude: set[str] | None = None, send: bool = True,
                output: int = 0) -> Any:
        got = self.run(self.pool.acquire(model, tokens, exclude, output=output))
        if send and isinstance(got, Lease):
            self.run(self.pool.stamp(got))  # sent at once, as the engine does
        return got

    def tell(self, lease: Lease, **fields: Any) -> float:
        """Report what a call told the limiter (as the engine does, in one round trip); fields not
        given say nothing: no tokens used, no word on the key. Return the cooldown it took."""
        return self.run(self.pool.report(lease, Report(**{"used_tokens": 0, "answered": None, **fields})))

    def close(self) -> None:
        self.run(self.pool.client.aclose())
        self.loop.close()


@pytest.fixture()
def make(redis_url: str, rclient: redis.Redis):
    made: list[Pool] = []

    def build(keys: list[ApiKey], **kw: Any) -> Pool:
        made.append(Pool(redis_url, keys, **kw))
        return made[-1]

    yield build
    for p in made:
        p.close()


# -- pure window arithmetic ---------------------------------------------------------------------
def test_window_plan_says_which_limits_are_configured_discovered_or_paced() -> None:
    plan = window_plan(Limits(rpm=500, rpd=10000), 60.0)
    assert plan == (WindowSpec("req", 60.0, 500, CEILING), WindowSpec("req", 86400.0, 10000, FIXED),
                    WindowSpec("req", 1.0, 0, PACE), WindowSpec("tok", 60.0, 0, DISCOVER))
    bare = window_plan(Limits(), 6.0, Limits(requests=["100/6s"]))
    assert bare == (WindowSpec("req", 6.0, 100, DISCOVER), WindowSpec("req", 0.1, 0, PACE),
                    WindowSpec("tok", 6.0, 0, DISCOVER))
    assert [w.dim for w in plan] == sorted(w.dim for w in plan)  # request windows first


def test_the_margin_is_a_share_of_the_window_with_a_cap() -> None:
    assert margin_ms(60.0, 0.01, 0.25) == 250
    assert margin_ms(6.0, 0.01, 0.25) == 60
    assert margin_ms(1.0, 0.01, 0.25) == 10


# -- exact windows ------------------------------------------------------------------------------
def test_a_3_per_window_key_gets_exactly_3_then_waits_for_the_oldest(make) -> None:
    p = make([key("sk-a", {"requests": ["3/2s"]})])
    got = [p.acquire() for _ in range(4)]
    assert [type(g) for g in got] == [Lease, Lease, Lease, Wait]
    assert got[3].seconds == pytest.approx(2.001, abs=0.001)
    p.advance(1999)
    assert isinstance(p.acquire(), Wait)
    p.advance(2)
    assert isinstance(p.acquire(), Lease)


def test_the_margin_lengthens_each_window_by_its_share(make) -> None:
    p = make([key("sk-mg", {"requests": ["2/10s"]})], margin=0.25, fraction=0.01)
    p.acquire(), p.acquire()
    assert p.acquire().seconds == pytest.approx(10.101, abs=0.001)  # 1% of 10 s, under the 0.25 s cap


def test_an_admission_not_yet_sent_holds_its_place_until_stamped(make) -> None:
    """A request that waits for the event loop after admission must not let its window run early."""
    p = make([key("sk-slow", {"requests": ["1/0.3s"]})])
    lease = p.acquire(send=False)
    assert isinstance(lease, Lease)
    p.advance(400)  # longer than the window, still not sent
    assert isinstance(p.acquire(), Wait)
    assert p.run(p.pool.stamp(lease)) == T0 + 400
    p.advance(299)
    assert isinstance(p.acquire(), Wait)
    p.advance(2)
    assert isinstance(p.acquire(), Lease)


def test_a_cancelled_admission_gives_its_place_back(make) -> None:
    p = make([key("sk-cancel", {"requests": ["1/min"], "tokens": ["100/min"]})])
    lease = p.acquire(tokens=80, send=False)
    assert isinstance(lease, Lease) and isinstance(p.acquire(tokens=80), Wait)
    p.run(p.pool.cancel(lease))  # never sent
    assert isinstance(p.acquire(tokens=80), Lease)


def test_concurrent_acquires_admit_exactly_the_limit(redis_url: str) -> None:
    """150 admissions in flight at once on 30 connections race for a key allowing 10 per minute."""
    k = key("sk-race", {"requests": ["10/min"]})

    async def race() -> Counter:
        pools = [AsyncKeyPool(redis.asyncio.Redis.from_url(redis_url), [k]) for _ in range(30)]
        got = await asyncio.gather(*(pools[i % 30].acquire("m", 1) for i in range(150)))
        for p in pools:
            await p.client.aclose()
        return Counter(type(r).__name__ for r in got)

    assert asyncio.run(race()) == {"Lease": 10, "Wait": 140}


def test_most_headroom_wins_and_keys_are_shared_fairly(make) -> None:
    keys = [key(f"sk-{i}", {"requests": ["4/min"]}) for i in range(3)]
    p = make(keys)
    leases = [p.acquire() for _ in range(12)]
    assert all(isinstance(lease, Lease) for lease in leases)
    assert Counter(lease.key.fingerprint for lease in leases) == {k.fingerprint: 4 for k in keys}
    assert isinstance(p.acquire(), Wait)


def test_token_window_counts_estimates_and_only_settles_upwards(make) -> None:
    """As on the server: a request counts its estimate (prompt + max_tokens) when admitted; a
    smaller usage gives nothing back, a larger one is added."""
    p = make([key("sk-t", {"tokens": ["1000/min"]})])
    a = p.acquire(tokens=600)
    assert isinstance(a, Lease)
    assert isinstance(p.acquire(tokens=600), Wait)  # 1200 > 1000
    p.tell(a, used_tokens=100)  # the call used less: the window keeps 600
    assert isinstance(p.acquire(tokens=500), Wait)
    p.tell(a, used_tokens=800)  # the call used more than estimated: the window holds 800
    assert isinstance(p.acquire(tokens=201), Wait)
    assert isinstance(p.acquire(tokens=200), Lease)  # 1000 <= 1000
    assert isinstance(p.acquire(tokens=5000), Never)  # larger than the whole window
    p.advance(60_001)
    assert isinstance(p.acquire(tokens=1000), Lease)  # the window emptied and gave its tokens back


def test_an_output_window_holds_the_cap_until_the_answer_says_what_was_written(make) -> None:
    """Anthropic's third window: a request holds its max_tokens there from admission (a server that
    charges it on arrival), then what it wrote (where every server ends), up or down."""
    p = make([key("sk-ant-o", {"output_tokens": ["1000/min"]}, provider="anthropic")])
    a, b = p.acquire(tokens=10, output=400), p.acquire(tokens=10, output=400)
    assert isinstance(a, Lease) and isinstance(b, Lease) and a.out_tokens == 400
    assert isinstance(p.acquire(tokens=10, output=400), Wait)  # 1200 > 1000
    p.tell(a, output_tokens=50)  # a wrote 50: the window holds 450
    c = p.acquire(tokens=10, output=400)
    assert isinstance(c, Lease) and isinstance(p.acquire(tokens=10, output=400), Wait)  # 850, then 1250
    p.tell(b, output_tokens=900)  # b wrote more than it asked for (a server may): 50 + 900 + 400
    assert isinstance(p.acquire(tokens=10, output=1), Wait)
    p.run(p.pool.cancel(c))  # never sent: its 400 come back
    assert isinstance(p.acquire(tokens=10, output=50), Lease)  # 950 + 50
    # larger than the whole window: it may pass a server that counts output as written, so it
    # goes alone, in an empty window (the headers of its answer tell)
    assert isinstance(p.acquire(tokens=10, output=5000), Wait)
    p.advance(60_001)
    alone = p.acquire(tokens=10, output=5000)
    assert isinstance(alone, Lease) and isinstance(p.acquire(tokens=10, output=1), Wait)
    p.tell(alone, output_tokens=20)
    assert isinstance(p.acquire(tokens=10, output=980), Lease)  # 20 + 980


def test_an_output_window_learns_from_its_headers_whether_its_server_holds_max_tokens(make) -> None:
    """Headers showing less used than a request's own max_tokens (rounding allowed for) refute a
    server that holds max_tokens on arrival: requests then hold one token from their admission and
    what they wrote after it; an output-token 429 while they do refutes that reading for good. A
    request waiting for room in an output window looks again soon: answers free it early."""
    p = make([key("sk-ant-w", {"output_tokens": ["1000/min"]}, provider="anthropic")])
    a, _b = p.acquire(tokens=10, output=400), p.acquire(tokens=10, output=400)
    waiting = p.acquire(tokens=10, output=400)
    assert isinstance(waiting, Wait) and waiting.seconds <= 0.25  # not the minute to the oldest's expiry
    p.tell(a, output_tokens=20, output_window=(1000, 0), window_rounding=1000)  # 800 used: max_tokens held
    assert isinstance(p.acquire(tokens=10, output=400), Lease)  # 20 + 400 + 400
    assert isinstance(p.acquire(tokens=10, output=400), Wait)  # still holding max_tokens
    p.advance(60_001)
    c = p.acquire(tokens=10, output=900)
    p.tell(c, output_tokens=20, output_window=(1000, 1000), window_rounding=1000)  # at most 500 used < 900
    held = [p.acquire(tokens=10, output=900) for _ in range(5)]
    assert all(isinstance(h, Lease) and h.out_tokens == 1 for h in held)  # one token each now
    p.tell(held[0], refused=True, output_refused=True)  # an output-token 429: the server holds them after all
    assert isinstance(p.acquire(tokens=10, output=990), Wait)  # 20 + 4 + 990 > 1000: max_tokens held again
    p.advance(60_001)
    e = p.acquire(tokens=10, output=900)
    assert e.out_tokens == 900
    p.pool._out_written.clear()  # another worker process reads the same headers again
    p.tell(e, output_tokens=20, output_window=(1000, 1000), window_rounding=1000)
    assert isinstance(p.acquire(tokens=10, output=990), Wait)  # the refutation holds: 20 + 990
    assert isinstance(p.acquire(tokens=10, output=1001), Never)  # a server that holds max_tokens: never


def test_only_a_provider_with_an_output_window_gets_one_and_it_learns_the_limit_from_headers(make) -> None:
    plain = make([key("sk-oa-o", {})])
    assert isinstance(plain.acquire(tokens=10, output=10**7), Lease)  # OpenAI's keys: no output window
    p = make([key("sk-ant-d", {}, provider="anthropic")], probe=60.0)
    first = p.acquire(tokens=10, output=400)  # the scope's probe: its windows count it
    assert isinstance(first, Lease) and [w.dim for w in first.windows].count("out") == 1
    p.tell(first, server={"requests": 50, "output_tokens": 500}, output_tokens=400, answered=True)
    assert isinstance(p.acquire(tokens=10, output=400), Wait)  # 400 + 400 > the 500 the headers state
    assert isinstance(p.acquire(tokens=10, output=100), Lease)


def test_group_keys_share_one_budget(make) -> None:
    cfg = Config.model_validate({"api_keys": ["sk-g1", "sk-g2", "sk-solo"], "groups": {"org": {
        "keys": ["sk-g1", fingerprint("sk-g2")], "rpm": 2}}, "limits": {"rpm": 5}})
    keys = cfg.keys()
    assert [k.group for k in keys] == ["org", "org", None]
    p = make(keys[:2])
    leases = [p.acquire() for _ in range(3)]
    assert [type(x) for x in leases] == [Lease, Lease, Wait]  # the group's 2, not 2 x 5
    assert {x.key.fingerprint for x in leases[:2]} == {k.fingerprint for k in keys[:2]}


def test_each_model_is_its_own_scope_with_its_own_limits(make) -> None:
    k = key("sk-pm", {"rpm": 1}, model_limits={"big": {"rpm": 3}})
    p = make([k])
    assert [type(p.acquire("small")) for _ in range(2)] == [Lease, Wait]
    assert [type(p.acquire("big")) for _ in range(4)] == [Lease, Lease, Lease, Wait]


def test_models_and_exclusions_filter_candidates(make) -> None:
    a, b = key("sk-m1", {}, models=("gpt-4o-mini",)), key("sk-m2", {})
    p = make([a, b])
    assert all(p.acquire("gpt-4o").key == b for _ in range(5))
    assert p.acquire("gpt-4o", exclude={b.fingerprint}) is None


# -- limits from the server ---------------------------------------------------------------------
def test_a_discovered_limit_follows_the_headers_up_and_down_and_expires(make) -> None:
    p = make([key("sk-d", {})], refresh=600.0)
    first = [p.acquire() for _ in range(50)]
    assert all(isinstance(x, Lease) for x in first)  # nothing known, no default: no limit yet
    p.tell(first[0], server={"requests": 3})
    assert isinstance(p.acquire(), Wait)  # 50 in the window, the server says 3
    p.advance(60_001)
    assert [type(p.acquire()) for _ in range(4)] == [Lease, Lease, Lease, Wait]
    p.tell(first[0], server={"requests": 600})  # an upgrade: at once, up
    assert all(isinstance(p.acquire(), Lease) for _ in range(6))
    p.tell(first[0], server={"requests": 5})
    p.advance(600_001)  # not read again for the whole ttl: the learned limit is dropped
    assert all(isinstance(p.acquire(), Lease) for _ in range(20))


def test_a_configured_limit_is_a_ceiling_that_the_server_may_lower(make) -> None:
    p = make([key("sk-ceil", {"rpm": 4})])
    a = p.acquire()
    p.tell(a, server={"requests": 1000})
    assert [type(p.acquire()) for _ in range(4)] == [Lease, Lease, Lease, Wait]  # 4, not 1000
    p.advance(60_001)
    p.tell(a, server={"requests": 2})
    assert [type(p.acquire()) for _ in range(3)] == [Lease, Lease, Wait]


def test_a_429_without_headers_teaches_half_of_what_the_window_held(make) -> None:
    p = make([key("sk-nh", {})])
    leases = [p.acquire() for _ in range(20)]
    assert p.tell(leases[-1], verdict="429", cooldown=1.0) == pytest.approx(1.0)
    p.advance(1000)
    assert isinstance(p.acquire(), Wait)  # 20 held, 10 taught
    p.tell(leases[-1], verdict="429", cooldown=0.0)  # the burst's other 429s do not lower it further
    p.advance(60_001)
    assert [type(p.acquire()) for _ in range(12)].count(Lease) == 10


def test_a_429_with_headers_cools_and_learns(make) -> None:
    p = make([key("sk-429", {})])
    a = p.acquire()
    p.tell(a, verdict="429", cooldown=2.0, server={"requests": 2})
    w = p.acquire()
    assert isinstance(w, Wait) and w.seconds == pytest.approx(2.0, abs=0.01)
    p.advance(2000)
    assert [type(p.acquire()) for _ in range(2)] == [Lease, Wait]  # 2 per minute, 1 already used


def test_slow_down_halves_the_minute_limit_and_ramps_back(make) -> None:
    p = make([key("sk-slow", {"rpm": 100})], header_period=60.0)
    a = p.acquire()
    p.tell(a, verdict="slow")
    assert sum(isinstance(p.acquire(), Lease) for _ in range(60)) == 49  # 50 in all
    p.advance(120_001)  # two header periods: back to 100
    assert sum(isinstance(p.acquire(), Lease) for _ in range(120)) == 100


def test_a_request_larger_than_a_slowed_window_waits_for_the_ramp_back_not_refused_for_ever(make) -> None:
    # 120 tokens a minute, slowed twice (30 left): a 50-token request still fits the key's real
    # window, so it waits until the limit ramps back past 50, and never counts as too large
    p = make([key("sk-slow-tok", {"tpm": 120})], header_period=60.0)
    for _ in range(2):
        p.tell(p.acquire(tokens=1), verdict="slow")
    got = p.acquire(tokens=50)
    assert isinstance(got, Wait) and not got.too_large, got
    # slowed to a quarter, back to 1 over 120 s: 50/120 of the window in (50/120 - 1/4) / (3/4) * 120 s
    assert got.seconds == pytest.approx(26.67, abs=0.01)
    assert isinstance(p.acquire(tokens=121), Never)  # larger than the real window: never
    p.advance(26_660)
    assert isinstance(p.acquire(tokens=50), Wait)  # then the window's 2 tokens still in it
    p.advance(33_341)  # a minute: they expired, the window ramped back to 75
    assert isinstance(p.acquire(tokens=50), Lease)


def test_large_limits_are_paced_within_the_minute(make) -> None:
    p = make([key("sk-big", {"rpm": 6000})])  # 6000/min: at most 100 in any second
    assert sum(isinstance(p.acquire(), Lease) for _ in range(150)) == 100
    p.advance(1001)
    assert sum(isinstance(p.acquire(), Lease) for _ in range(150)) == 100
    small = make([key("sk-small", {"rpm": 300})])  # below the threshold: a burst is fine
    assert sum(isinstance(small.acquire(), Lease) for _ in range(400)) == 300


def test_a_scope_that_never_answered_takes_one_request_at_a_time(make) -> None:
    p = make([key("sk-probe", {})], probe=60.0)
    probe = p.acquire()
    assert isinstance(probe, Lease) and isinstance(p.acquire(), Wait)
    p.tell(probe, answered=True)
    assert all(isinstance(p.acquire(), Lease) for _ in range(10))


# -- against a model of the windows -------------------------------------------------------------
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(1, 4), period_ms=st.integers(60, 2000), tok_limit=st.integers(50, 200),
       ops=st.lists(st.tuples(st.integers(1, 80), st.integers(0, 800), st.booleans()), min_size=1, max_size=25))
def test_limiter_matches_the_sliding_log_model(redis_url: str, rclient: redis.Redis, limit: int, period_ms: int,
                                               tok_limit: int, ops: list[tuple[int, int, bool]]) -> None:
    """Against a model of the windows: every admission keeps each window within its limit, and
    every refusal happened when a window really was full (time moves only when the test says)."""
    rclient.flushall()
    p = Pool(redis_url, [key(f"sk-prop{random.random()}", {"requests": [f"{limit}/{period_ms / 1000}s"],
                                                            "tokens": [f"{tok_limit}/{period_ms / 1000}s"]})])
    try:
        admitted: list[tuple[int, int]] = []
        for tokens, step_ms, send_later in ops:
            got = p.acquire(tokens=tokens, send=False)
            now = p.pool.now_ms
            live = [(t, w) for t, w in admitted if t > now - period_ms]
            if isinstance(got, Never):
                assert tokens > tok_limit
                continue
            fits = len(live) + 1 <= limit and sum(w for _, w in live) + tokens <= tok_limit
            assert isinstance(got, Lease) == fits, (got, live, now)
            if isinstance(got, Wait):
                assert got.seconds > 0
            p.advance(step_ms)
            if isinstance(got, Lease):
                # sent now, or after the step: its windows run from the send either way
                if not send_later:
                    p.pool.now_ms -= step_ms  # type: ignore[operator]
                admitted.append((p.run(p.pool.stamp(got)), tokens))
                p.pool.now_ms = now + step_ms
    finally:
        p.close()


# -- the job's budget, reserved and settled with the admission ----------------------------------
def test_a_budget_reserves_worst_cases_waits_for_settlements_then_says_it_is_reached(
        make, rclient: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    from opt_queue.store.budget import Budget, BudgetReached
    from opt_queue.core.prices import Usage

    meta = "oq:{budget-test}:meta"
    rclient.delete(meta)
    rclient.hset(meta, mapping={"max_tokens_total": 100, "max_cost_nano": 1000})
    p = make([key("sk-budget-a", {"rpm": 1000})])

    def admit(tokens: int, cost: int) -> Any:
        return p.run(p.pool.acquire("m", tokens, budget=Budget(meta, cost, tokens)))

    def settle(lease: Lease, tokens: int, cost: float) -> None:
        p.tell(lease, used_tokens=tokens, usage=Usage(input_tokens=tokens, cost=cost))

    first, second = admit(40, 100), admit(40, 100)
    assert isinstance(first, Lease) and isinstance(second, Lease)
    assert rclient.hmget(meta, "reserved_tokens", "reserved_nano") == [b"80", b"200"]
    third = admit(40, 100)  # 80 reserved + 40 > 100 tokens: it waits for what is in flight
    assert isinstance(third, Wait) and not third.exact
    settle(first, 30, 30e-9)  # the real usage: 30 tokens, 30 nano-dollars
    assert isinstance(admit(40, 100), Wait)  # 30 spent + 40 reserved + 40 > 100
    settle(second, 30, 30e-9)
    third = admit(40, 100)  # 60 spent + 40 = 100: fits exactly
    assert isinstance(third, Lease)
    assert isinstance(admit(1, 1), Wait)
    settle(third, 40, 40e-9)
    assert isinstance(admit(1, 1), BudgetReached)  # 100 of 100 spent, nothing in flight
    assert rclient.hmget(meta, "spent_tokens", "spent_nano", "reserved_tokens", "reserved_nano") == \
        [b"100", b"100", b"0", b"0"]
    # the cost side of the budget: a cancelled admission gives its share back
    rclient.hset(meta, mapping={"max_tokens_total": 0, "max_cost_nano": 400})
    lease = admit(5, 250)
    assert isinstance(lease, Lease) and isinstance(admit(5, 100), Wait)
    p.run(p.pool.cancel(lease))
    assert isinstance(admit(5, 300), Lease)
    assert isinstance(admit(5, 1), Wait)


def test_the_clock_is_calibrated_before_the_first_stamp(redis_url: str) -> None:
    """A first reading taken behind a burst (a 400 ms round trip whose TIME was read late in it)
    would put the first stamps hundreds of ms late; the calibration's quiet round trips replace it."""
    import time

    from opt_queue.limits.limiter import RedisClock
    from opt_queue.store.redis_conn import connect_async

    async def go() -> tuple[int, int]:
        client = connect_async(redis_url, max_connections=2)
        seconds, micros = await client.time()
        truth = int(seconds) * 1000 + int(micros) // 1000
        clock = RedisClock()
        t0 = time.monotonic()
        clock.observe(t0 - 0.4, t0, truth + 150)  # 350 ms off: its TIME read late in a 400 ms round trip
        before = clock.now_ms()
        await clock.calibrate(client)
        after = clock.now_ms()
        seconds, micros = await client.time()
        now = int(seconds) * 1000 + int(micros) // 1000
        await client.aclose()
        return (before or 0) - truth, (after or 0) - now

    before, after = asyncio.run(go())
    assert before > 100  # the burst's reading was off
    assert abs(after) <= 100, after  # within a quiet round trip, even on a loaded machine

