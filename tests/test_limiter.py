"""The Lua limiter on a real Redis: exact windows, atomicity under races, tokens, cooldowns, groups."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from opt_queue.config import ApiKey, Limits, fingerprint
from opt_queue.limiter import KeyPool, Lease, Never, Wait


def key(secret: str, limits: dict, group: str | None = None, models: tuple[str, ...] | None = None) -> ApiKey:
    return ApiKey(secret=SecretStr(secret), fingerprint=fingerprint(secret), api_base="http://x/v1",
                  limits=Limits.model_validate(limits), group=group, models=models)


def sent(pool: KeyPool, got: object) -> object:
    """Acquire's result, stamped as sent at once when it is a lease (as the engine does)."""
    if isinstance(got, Lease):
        pool.stamp(got)
    return got


def test_a_3_per_window_key_gets_exactly_3_then_waits_for_the_oldest(rclient: redis.Redis) -> None:
    pool = KeyPool(rclient, [key("sk-a", {"requests": ["3/2s"]})], margin=0.0)
    got = [sent(pool, pool.acquire("m", 1)) for _ in range(4)]
    assert [type(g) for g in got] == [Lease, Lease, Lease, Wait]
    wait = got[3]
    assert isinstance(wait, Wait) and 1.9 <= wait.seconds <= 2.01
    time.sleep(wait.seconds)
    assert isinstance(pool.acquire("m", 1), Lease)


def test_an_admission_not_yet_sent_holds_its_place_until_stamped(rclient: redis.Redis) -> None:
    """A request that waits for a thread after admission must not let its window run early."""
    pool = KeyPool(rclient, [key("sk-slow", {"requests": ["1/0.3s"]})], margin=0.0)
    lease = pool.acquire("m", 1)
    assert isinstance(lease, Lease)
    time.sleep(0.4)  # longer than the window, still not sent
    assert isinstance(pool.acquire("m", 1), Wait)
    stamp = pool.stamp(lease)
    assert stamp >= lease.at_ms + 400
    wait = pool.acquire("m", 1)
    assert isinstance(wait, Wait) and 0.25 <= wait.seconds <= 0.31


def test_a_cancelled_admission_gives_its_place_back(rclient: redis.Redis) -> None:
    pool = KeyPool(rclient, [key("sk-cancel", {"requests": ["1/min"], "tokens": ["100/min"]})], margin=0.0)
    lease = pool.acquire("m", 80)
    assert isinstance(lease, Lease) and isinstance(pool.acquire("m", 80), Wait)
    pool.cancel(lease)  # never sent
    assert isinstance(pool.acquire("m", 80), Lease)


def test_concurrent_acquires_admit_exactly_the_limit(redis_url: str) -> None:
    """50 threads, each with its own connection, race for one key allowing 10 per minute."""
    k = key("sk-race", {"requests": ["10/min"]})
    results: list[object] = []
    barrier = threading.Barrier(50)

    def worker() -> None:
        pool = KeyPool(redis.Redis.from_url(redis_url), [k], margin=0.0)
        barrier.wait()
        for _ in range(3):
            results.append(pool.acquire("m", 1))

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(type(r).__name__ for r in results) == {"Lease": 10, "Wait": 140}


def test_most_headroom_wins_and_keys_are_shared_fairly(rclient: redis.Redis) -> None:
    keys = [key(f"sk-{i}", {"requests": ["4/min"]}) for i in range(3)]
    pool = KeyPool(rclient, keys, margin=0.0)
    leases = [pool.acquire("m", 1) for _ in range(12)]
    assert all(isinstance(lease, Lease) for lease in leases)
    assert Counter(lease.key.fingerprint for lease in leases) == {k.fingerprint: 4 for k in keys}  # type: ignore[union-attr]
    assert isinstance(pool.acquire("m", 1), Wait)


def test_token_window_counts_estimates_and_only_settles_upwards(rclient: redis.Redis) -> None:
    """As on the server: a request counts its estimate (prompt + max_tokens) when admitted; a
    smaller usage gives nothing back, a larger one is added."""
    pool = KeyPool(rclient, [key("sk-t", {"tokens": ["1000/min"]})], margin=0.0)
    a = sent(pool, pool.acquire("m", 600))
    assert isinstance(a, Lease)
    assert isinstance(pool.acquire("m", 600), Wait)  # 1200 > 1000
    pool.settle(a, 100)  # the call used less: the window keeps 600
    assert isinstance(pool.acquire("m", 500), Wait)
    pool.settle(a, 800)  # the call used more than estimated: the window holds 800
    assert isinstance(pool.acquire("m", 201), Wait)
    assert isinstance(pool.acquire("m", 200), Lease)  # 1000 <= 1000
    assert isinstance(pool.acquire("m", 5000), Never)  # larger than the whole window


def test_group_keys_share_one_budget(rclient: redis.Redis) -> None:
    keys = [key("sk-g1", {"requests": ["2/min"]}, group="org"), key("sk-g2", {"requests": ["2/min"]}, group="org")]
    pool = KeyPool(rclient, keys, margin=0.0)
    leases = [pool.acquire("m", 1) for _ in range(3)]
    assert [type(x) for x in leases] == [Lease, Lease, Wait]
    assert {x.key.fingerprint for x in leases[:2]} == {k.fingerprint for k in keys}  # type: ignore[union-attr]


def test_cooldown_and_learned_lower_limit(rclient: redis.Redis) -> None:
    k = key("sk-c", {"requests": ["5/min", "100/day"]})
    pool = KeyPool(rclient, [k], margin=0.0)
    assert pool.cool(k, 0.3, {"requests": 2}) == pytest.approx(0.3, abs=0.05)
    w = pool.acquire("m", 1)
    assert isinstance(w, Wait) and w.seconds <= 0.31
    time.sleep(w.seconds)
    assert [type(sent(pool, pool.acquire("m", 1))) for _ in range(3)] == [Lease, Lease, Wait]  # learned 2 < 5


def test_models_and_exclusions_filter_candidates(rclient: redis.Redis) -> None:
    a, b = key("sk-m1", {}, models=("gpt-4o-mini",)), key("sk-m2", {})
    pool = KeyPool(rclient, [a, b], margin=0.0)
    assert all(pool.acquire("gpt-4o", 1).key == b for _ in range(5))  # type: ignore[union-attr]
    assert pool.acquire("gpt-4o", 1, exclude={b.fingerprint}) is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(1, 4), period_ms=st.integers(60, 200), tok_limit=st.integers(50, 200),
       ops=st.lists(st.tuples(st.integers(1, 80), st.integers(0, 40)), min_size=1, max_size=14))
def test_limiter_matches_the_sliding_log_model(rclient: redis.Redis, limit: int, period_ms: int,
                                               tok_limit: int, ops: list[tuple[int, int]]) -> None:
    """Against a model of the windows, on the timestamps Redis itself used: every admission keeps
    each window within its limit, and every refusal happened when a window really was full."""
    rclient.flushall()
    period = period_ms / 1000
    pool = KeyPool(rclient, [key("sk-prop", {"requests": [f"{limit}/{period}s"], "tokens": [f"{tok_limit}/{period}s"]})],
                   margin=0.0)
    admitted: list[tuple[int, int]] = []
    for tokens, sleep_ms in ops:
        got = pool.acquire("m", tokens)
        if isinstance(got, Never):
            assert tokens > tok_limit
            continue
        now = got.at_ms  # the instant the script decided, on Redis' clock
        live = [(t, w) for t, w in admitted if t > now - period_ms]
        fits = len(live) + 1 <= limit and sum(w for _, w in live) + tokens <= tok_limit
        assert isinstance(got, Lease) == fits, (got, live, now)
        if isinstance(got, Lease):
            admitted.append((pool.stamp(got), tokens))  # sent at once; its windows run from the stamp
        time.sleep(sleep_ms / 1000)
