"""How the limiter learns the way a server counts tokens (``lua/calibrate.lua``), on a real Redis
with the time under the test's control: a server that counts a third of the estimate, or twice it,
is learned in a few responses, the factor scales later admissions, a factor stays on its scope, a
refused request leaves calibration, and a calibrated scope's windows follow the headers, not the
bill."""

from __future__ import annotations

import math
from typing import Any

import pytest
import redis

from opt_queue.store import keys as rkeys
from opt_queue.limits.limiter import Lease, Wait
from tests.test_limiter import T0, key, make  # noqa: F401  (the fixture)

LIMIT = 100_000
PERIOD_MS = 60_000


class Server:
    """A server's token window: it counts a prompt as ``ratio`` times the client's estimate, plus
    the completion's cap, when the request arrives (a sliding log of one header period)."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.log: list[tuple[int, int]] = []

    def arrive(self, at_ms: int, prompt: int, cap: int) -> tuple[int, int]:
        self.log = [(t, n) for t, n in self.log if t > at_ms - PERIOD_MS]
        self.log.append((at_ms, math.ceil(prompt * self.ratio) + cap))
        used = sum(n for _, n in self.log)
        return LIMIT, max(0, LIMIT - used)


def send(p: Any, server: Server, prompt: int, cap: int, model: str = "m", rounding: int = 0) -> Lease:
    lease = p.run(p.pool.acquire(model, prompt + cap, prompt=prompt))
    assert isinstance(lease, Lease), lease
    stamp = p.run(p.pool.stamp(lease))
    limit, remaining = server.arrive(stamp, prompt, cap)
    if rounding:  # as Anthropic states it: "rounded to the nearest thousand"
        remaining = min(limit, int(remaining / rounding + 0.5) * rounding)
    p.tell(lease, sent_ms=stamp, window=(limit, remaining), window_rounding=rounding)
    p.advance(500)
    return lease


def factor(rclient: redis.Redis, scope: str) -> float | None:
    got = rclient.hget(rkeys.bucket_state(scope), "tok_factor")
    return float(got) if got is not None else None


@pytest.mark.parametrize("ratio", [1 / 3, 2.0, 0.8])
def test_the_factor_converges_to_how_the_server_counts(make, rclient: redis.Redis, ratio: float) -> None:  # noqa: F811
    p = make([key("sk-a", {"tokens": [f"{LIMIT}/60s"]})], header_period=60.0)
    server = Server(ratio)
    first = send(p, server, 1000, 100)
    assert first.tokens == 1100  # the estimate holds until the server has said something
    assert factor(rclient, first.scope) == pytest.approx(ratio, rel=0.01)  # the probe alone: exact
    for _ in range(20):  # 1,000-token prompts: the window stays below the limit
        last = send(p, server, 1000, 100)
    assert factor(rclient, first.scope) == pytest.approx(ratio, rel=0.02)
    assert last.tokens == math.ceil(1000 * factor(rclient, first.scope)) + 100  # the cap is not scaled


def test_the_factor_follows_a_change_and_a_noisy_start(make, rclient: redis.Redis) -> None:  # noqa: F811
    p = make([key("sk-a", {"tokens": [f"{LIMIT}/60s"]})], header_period=60.0)
    server = Server(3.0)  # a first reading 3x the estimate (say, another client's traffic)
    lease = send(p, server, 1000, 100)
    assert factor(rclient, lease.scope) == pytest.approx(3.0, rel=0.01)
    server.ratio, server.log = 0.5, []
    p.advance(PERIOD_MS)  # the old traffic leaves both windows
    for n in range(1, 30):
        send(p, server, 1000, 100)
        if abs(factor(rclient, lease.scope) / 0.5 - 1) < 0.05:
            break
    assert n <= 18, n  # 6x too high to within 5% in 17 responses (down is the cautious way)
    server.ratio, server.log = 1.5, []
    p.advance(PERIOD_MS)
    for up in range(1, 30):
        send(p, server, 1000, 100)
        if abs(factor(rclient, lease.scope) / 1.5 - 1) < 0.05:
            break
    assert up <= 8, up


def test_a_refusal_on_tokens_raises_the_factor(make, rclient: redis.Redis) -> None:  # noqa: F811
    p = make([key("sk-a", {"tokens": [f"{LIMIT}/60s"]})], header_period=60.0)
    lease = send(p, Server(0.5), 1000, 100)
    p.tell(lease, verdict="429tok", cooldown=1.0, server={"tokens": LIMIT})
    assert factor(rclient, lease.scope) == pytest.approx(0.55, rel=0.01)
    p.tell(lease, verdict="429", cooldown=1.0, server={"requests": 10})  # a refusal on requests says nothing of tokens
    assert factor(rclient, lease.scope) == pytest.approx(0.55, rel=0.01)


def test_a_factor_stays_on_its_scope(make, rclient: redis.Redis) -> None:  # noqa: F811
    a = key("sk-a", {"tokens": [f"{LIMIT}/60s"]})
    b = key("sk-b", {"tokens": [f"{LIMIT}/60s"]}, models=("n",))
    p = make([a], header_period=60.0)
    q = make([b], header_period=60.0)
    lease = send(p, Server(0.25), 1000, 100)
    other = q.run(q.pool.acquire("n", 1100, prompt=1000))
    assert factor(rclient, lease.scope) == pytest.approx(0.25, rel=0.01)
    assert factor(rclient, other.scope) is None and other.tokens == 1100
    again = p.run(p.pool.acquire("m2", 1100, prompt=1000))  # the same key, another model: its own scope
    assert again.tokens == 1100


def test_the_factor_lets_a_token_bound_window_hold_what_the_server_allows(make, rclient: redis.Redis) -> None:  # noqa: F811
    """The estimate counts 4x what the server counts: after the probe, the 10,000-token window
    holds about 4x the rows the estimate would let in, and never more than the server allows."""
    p = make([key("sk-a", {"tokens": ["10000/60s"]})], header_period=60.0)
    server = Server(0.25)
    server_limit = 10_000
    admitted = 0
    while True:
        lease = p.run(p.pool.acquire("m", 1100, prompt=1000))
        if isinstance(lease, Wait):
            break
        stamp = p.run(p.pool.stamp(lease))
        _limit, _left = server.arrive(stamp, 1000, 100)
        p.tell(lease, sent_ms=stamp, window=(server_limit, max(0, server_limit - (LIMIT - _left))))
        admitted += 1
    used = sum(n for _, n in server.log)
    assert used <= server_limit
    # once the probe's answer tells the factor, the probe itself is counted again with it: the window
    # holds every row the server takes (28), where the estimate alone lets 9 in
    assert admitted == server_limit // 350


def test_a_refused_request_leaves_calibration_and_a_calibrated_scope_ignores_the_bill(
        make, rclient: redis.Redis) -> None:  # noqa: F811
    p = make([key("sk-a", {"tokens": [f"{LIMIT}/60s"]})], header_period=60.0)
    server = Server(0.5)
    first = send(p, server, 1000, 100)
    refused = p.run(p.pool.acquire("m", 1100, prompt=1000))
    p.run(p.pool.stamp(refused))
    p.tell(refused, refused=True)  # a 429: the server counted nothing
    window = rkeys.bucket_window(first.scope, "tok", 60.0)
    members = [m.decode() for m in rclient.zrange(window, 0, -1)]
    assert any(m.startswith(refused.uid.split(".")[0] + ":") for m in members)  # it keeps its place
    assert not any(m.startswith(refused.uid + ":") for m in members)  # without its estimate
    # the next reading is not lowered by the refused request
    send(p, server, 1000, 100)
    assert factor(rclient, first.scope) == pytest.approx(0.5, rel=0.01)
    # a bill above the admission's count raises nothing once the headers say how the server counts
    billed = send(p, server, 1000, 100)
    before = rclient.hget(rkeys.bucket_state(first.scope), "tsum:60000")
    p.tell(billed, used_tokens=5000)
    assert rclient.hget(rkeys.bucket_state(first.scope), "tsum:60000") == before


def test_a_factor_left_unread_for_ten_minutes_is_replaced_by_the_next_reading(make, rclient: redis.Redis) -> None:  # noqa: F811
    """A new job after a pause (other text, so another ratio) starts from its probe's reading, not
    from the last job's factor moved a little."""
    p = make([key("sk-a", {"tokens": [f"{LIMIT}/60s"]})], header_period=60.0)
    lease = send(p, Server(0.3), 1000, 100)
    assert factor(rclient, lease.scope) == pytest.approx(0.3, rel=0.01)
    p.advance(11 * 60_000)
    send(p, Server(0.9), 1000, 100)
    assert factor(rclient, lease.scope) == pytest.approx(0.9, rel=0.01)


def test_a_first_reading_far_above_the_estimate_is_capped(make, rclient: redis.Redis) -> None:  # noqa: F811
    """A probe whose reading counts traffic the limiter never saw (an earlier run's requests still in
    the server's window) would throttle the job to a crawl: the first reading moves at most to 3x."""
    p = make([key("sk-a", {"tokens": [f"{LIMIT}/60s"]})], header_period=60.0)
    server = Server(0.9)
    server.log = [(T0 - 1000, 9000)]  # another client's (or run's) tokens in the server's window
    lease = send(p, server, 1000, 100)
    assert factor(rclient, lease.scope) == pytest.approx(3.0)


def test_an_upper_bound_larger_than_the_window_is_sent_alone_and_teaches_the_scope(
        make, rclient: redis.Redis) -> None:  # noqa: F811
    """A model whose tokenizer opt-queue does not have gets an upper-bound estimate of its prompt.
    Larger than the key's whole token window, it is no reason to give up before the server has said
    anything: the request goes alone, in an empty window, charged the whole window; the server's
    answer teaches the scope, and then it is judged by the scope's own count. An exact count, or a
    completion cap larger than the window, is still refused at once."""
    from opt_queue.limits.limiter import Never

    limit = 2_000
    p = make([key("sk-a", {"tokens": [f"{limit}/60s"]})], header_period=60.0)
    unknown, exact = "llama-3.1-8b", "gpt-4o-mini"
    assert isinstance(p.run(p.pool.acquire(exact, 3_000, prompt=2_900)), Never)  # its count is exact
    assert isinstance(p.run(p.pool.acquire(unknown, 2_600, prompt=100)), Never)  # the cap alone: 2,500
    first = p.run(p.pool.acquire(unknown, 3_000, prompt=2_900))
    assert isinstance(first, Lease) and first.tokens == limit  # alone, charged the whole window
    second = p.run(p.pool.acquire(unknown, 3_000, prompt=2_900))
    assert isinstance(second, Wait) and not second.too_large  # behind it, not refused
    # the server counted the prompt as 900 (not 2,900): its answer teaches the scope
    stamp = p.run(p.pool.stamp(first))
    p.tell(first, sent_ms=stamp, window=(limit, limit - 1_000))
    assert factor(rclient, first.scope) == pytest.approx(900 / 2_900, rel=0.02)
    p.advance(60_500)  # the first request's window has passed
    later = p.run(p.pool.acquire(unknown, 3_000, prompt=2_900))
    assert isinstance(later, Lease) and later.tokens == math.ceil(2_900 * 900 / 2_900) + 100
    # a learned scope judges by its own count: a prompt it counts above the window never fits
    assert isinstance(p.run(p.pool.acquire(unknown, 8_000, prompt=7_900)), Never)


@pytest.mark.parametrize("ratio", [0.46, 1.3])
def test_a_server_that_rounds_what_remains_is_read_by_how_precise_each_reading_is(
        make, rclient: redis.Redis, ratio: float) -> None:  # noqa: F811
    """Anthropic rounds remaining tokens to the nearest thousand: a first reading in a nearly empty
    window may be off by half its count. It takes the high end (never below the truth), and the
    readings of a fuller window, more precise, bring the factor to the truth."""
    p = make([key("sk-r", {"tokens": [f"{LIMIT}/60s"]})], header_period=60.0)
    server = Server(ratio)
    first = send(p, server, 1000, 0, rounding=1000)
    assert factor(rclient, first.scope) >= ratio  # the high end of a reading that may be 50% off
    for _ in range(60):
        send(p, server, 1000, 0, rounding=1000)
    assert factor(rclient, first.scope) == pytest.approx(ratio, rel=0.06)


def test_a_server_without_token_headers_is_read_from_what_it_billed(make, rclient: redis.Redis) -> None:  # noqa: F811
    """Gemini states no window, but its token window counts input tokens as it bills them: one
    answer's billed prompt over the estimate is an exact reading of how the server counts."""
    p = make([key("sk-g", {"tokens": ["1000/60s"]}, provider="gemini")], header_period=60.0)

    def admit() -> Lease | Wait:
        got = p.run(p.pool.acquire("m", 400, prompt=400))
        if isinstance(got, Lease):
            p.run(p.pool.stamp(got))
        return got

    first = admit()
    assert isinstance(first, Lease)
    p.tell(first, used_tokens=200, prompt_counted=200)  # the server billed half the estimate
    assert factor(rclient, first.scope) == pytest.approx(0.5)
    more = 0
    while isinstance(admit(), Lease):
        more += 1
    assert more == 3  # 400 (the first, as admitted) + 3 x 200 <= 1000; without the reading: 1
