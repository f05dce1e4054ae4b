"""A worker's queues of rows waiting for a slot: one Redis call admits them all, in order.

A row that finds no free slot joins the queue of its model, its job's budget and the keys it may
not use (the engine's row loop). One task per queue asks ``acquire.lua`` for the rows at its head,
up to :data:`BATCH` in one call, gives each admitted row its lease, and sleeps until the earliest
slot of the keys frees (the script's wait, exact when it looked at every key) before asking again.

Why not let each row poll for itself: the rows waiting for a window all wake when it opens, hundreds
per worker, each asking Redis to look at its keys; on a busy machine that herd delays the sends by
more than the safety margin, and with many keys the waits are sampled, so a row wakes for a slot
another row took while a free slot goes unseen. A queue asks once for all of its rows and looks at
every key up to :data:`FULL_SCAN`, so its wait is exact and the slot is taken when it frees.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis

from opt_queue.limits.limiter import AsyncKeyPool, Lease, Wait
from opt_queue.store.budget import Budget

log = logging.getLogger(__name__)

BATCH = 64
"""Rows one call asks slots for, at most."""
FULL_SCAN = 256
"""A queue's call looks at every bucket serving the model up to this many, else at a random sample
of this many (its wait is then a hint: it looks again after at most :data:`SAMPLED_POLL`)."""
SAMPLED_POLL = 0.2
"""Longest sleep after a sampled call found no room."""
MAX_SLEEP = 5.0
"""Longest sleep between two calls: a learned limit may rise meanwhile."""
CHECK_EVERY = 1.0
"""How often a waiting row asks whether it is still wanted (its job stopped, its row answered by
another copy, a key retired for its job): the engine's answer reads Redis, cached for a second."""
RETRY = "retry"
"""What a waiting row gets when its request needs more than a slot (the job's budget is spent, or
the request is too large for some keys): it asks for itself again, which tells it what to do."""

Group = tuple[str, frozenset[str], str | None]
"""A queue: the model, the keys its rows may not use, the job's budget hash."""


@dataclass
class _Waiter:
    tokens: int
    budget: Budget | None
    prompt: int
    output: int
    future: asyncio.Future[Lease | str]


@dataclass
class _Queue:
    waiters: deque[_Waiter] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


class Admissions:
    """The admission queues of one worker process (on its event loop)."""

    def __init__(self, pool: AsyncKeyPool, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.pool = pool
        self.sleep = sleep  # how a queue waits for its next slot (tests record the waits it asks for)
        self._queues: dict[Group, _Queue] = {}
        self._giving_back: set[asyncio.Task[None]] = set()  # held until done (the loop keeps weak refs)
        self.calls = 0  # script calls made (for tests and benchmarks)

    def waiting(self, model: str, exclude: set[str], budget: Budget | None) -> bool:
        """Whether rows of this group are queued already (a new one queues behind them)."""
        got = self._queues.get(self._group(model, exclude, budget))
        return got is not None and bool(got.waiters)

    @staticmethod
    def _group(model: str, exclude: set[str], budget: Budget | None) -> Group:
        return model, frozenset(exclude), budget.key if budget else None

    async def wait(self, model: str, tokens: int, exclude: set[str], budget: Budget | None,
                   timeout: float, still_wanted: Callable[[], Awaitable[bool]] | None = None,
                   every: float = CHECK_EVERY, prompt: int = 0, output: int = 0) -> Lease | str | None:
        """Queue a request until it is admitted (its :class:`Lease`), :data:`RETRY`, or ``timeout``
        seconds pass (None; the request is no longer queued). Every ``every`` seconds
        ``still_wanted`` is awaited, the request keeping its place meanwhile; when it says no, the
        request leaves (None). A Redis error reaches the caller."""
        group = self._group(model, exclude, budget)
        q = self._queues.get(group)
        if q is None:
            q = self._queues[group] = _Queue()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Lease | str] = loop.create_future()
        q.waiters.append(_Waiter(tokens, budget, prompt, output, future))
        if q.task is None or q.task.done():
            q.task = asyncio.create_task(self._serve(group, q))
        deadline = loop.time() + timeout
        try:
            while not future.done():
                left = deadline - loop.time()
                if left <= 0:
                    break
                await asyncio.wait({future}, timeout=min(left, every))
                if not future.done() and left > every and still_wanted is not None and not await still_wanted():
                    break
        except BaseException:  # cancelled, or still_wanted failed: the row is gone from the queue
            if future.done() and not future.cancelled() and future.exception() is None:
                got = future.result()
                if isinstance(got, Lease):
                    self._give_back(got)  # admitted, but its row is gone: the slot goes back
            future.cancel()
            raise
        if not future.done():
            future.cancel()  # timed out, or no longer wanted: the queue skips it
            return None
        return future.result()

    def _give_back(self, lease: Lease) -> None:
        async def cancel() -> None:
            try:
                await self.pool.cancel(lease)
            except redis.RedisError as exc:  # it expires with its reservation instead
                log.warning("an unused admission could not be given back (%s)", type(exc).__name__)
        task = asyncio.ensure_future(cancel())
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def _serve(self, group: Group, q: _Queue) -> None:
        try:
            await self._admit_all(group, q)
        except Exception as exc:  # a bug must not leave rows waiting for ever: they see it
            log.exception("admission queue for %s failed", group[0])
            for w in q.waiters:
                if not w.future.done():
                    w.future.set_exception(exc)
        finally:
            if self._queues.get(group) is q:
                del self._queues[group]

    async def _admit_all(self, group: Group, q: _Queue) -> None:
        model, exclude, _ = group
        while True:
            while q.waiters and q.waiters[0].future.done():
                q.waiters.popleft()
            if not q.waiters:
                return
            batch = [w for w in q.waiters if not w.future.done()][:BATCH]
            plan = self.pool.plan_many(model, [(w.tokens, w.budget, w.prompt, w.output) for w in batch], set(exclude),
                                       FULL_SCAN)
            if plan is None:  # no usable key any more: each row finds out for itself
                for w in batch:
                    _settle(w, RETRY)
                continue
            self.calls += 1
            try:
                results = await self.pool.run_acquire(plan)
            except redis.RedisError as exc:  # every row of the queue would meet it: they all see it
                for w in q.waiters:
                    if not w.future.done():
                        w.future.set_exception(exc)
                continue
            wait: Wait | None = None
            for w, got in zip(batch, results):
                if isinstance(got, Wait) and not got.too_large:
                    wait = got  # this row and the ones behind it wait (for a slot, or the budget)
                    break
                if isinstance(got, Lease) and w.future.done():
                    self._give_back(got)  # it stopped waiting meanwhile
                else:
                    _settle(w, got if isinstance(got, Lease) else RETRY)
            if wait is None:
                continue
            seconds = wait.seconds if wait.exact else min(wait.seconds, SAMPLED_POLL)
            await self.sleep(min(seconds, MAX_SLEEP))


def _settle(w: _Waiter, value: Lease | str) -> None:
    if not w.future.done():
        w.future.set_result(value)
