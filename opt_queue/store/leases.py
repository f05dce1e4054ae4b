"""Row leases: a row being worked on holds a lease in Redis (``lua/lease.lua``): its index in the
job's lease set, scored by when the lease expires on Redis' clock, and the worker process that
holds it. The holder renews its leases every few seconds (:class:`Leases`); a second copy of the
row (a redelivery, a hand-back, a recovered message) that finds the lease held waits for the
holder's result instead of calling the API. Publishing a result or giving a row back ends its lease.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import Any, Awaitable, Callable

import redis

from opt_queue.store.jobs import AsyncJob
from opt_queue.store.redis_conn import stop_task

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0
"""Default lease length: a dead worker's rows are enqueued again this long after it stopped
renewing them (plus one recovery pass)."""
TAKEN, HELD, DONE = 1, 0, 2
"""Per-row replies of ``lua/lease.lua``."""


def owner_id() -> str:
    """A name for this worker process's leases: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leases:
    """The leases one worker process holds, renewed in the background (asyncio client).

    ``take`` returns the job's status and, per row, :data:`TAKEN`, :data:`HELD` (another live
    process works on it) or :data:`DONE`. A lease that another process took over after it expired
    (this process stalled for longer than the lease) shows up in :attr:`lost`; a row whose lease is
    lost must not call the API."""

    def __init__(self, client: Any, seconds: float = LEASE_SECONDS,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.client = client
        self.sleep = sleep  # how the renewer waits between renewals (tests drive it)
        self.owner = owner_id()
        self.ms = int(seconds * 1000)
        self.held: dict[str, set[str]] = {}
        self.lost: set[tuple[str, str]] = set()
        self._renewer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Leases {sum(map(len, self.held.values()))} held by {self.owner}>"

    async def take(self, job: AsyncJob, indices: list[str]) -> tuple[str, dict[str, int]]:
        """Take the leases of ``indices`` of ``job``: ``(status, code per index)``; status
        ``unknown`` (the job was reset or expired) or ``stopped`` come with no codes."""
        reply = await job.take_leases(self.owner, self.ms, indices)
        status = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        codes = dict(zip(indices, (int(c) for c in reply[1:])))
        held = self.held.setdefault(job.id, set())
        for index, code in codes.items():
            if code == TAKEN:
                held.add(index)
                self.lost.discard((job.id, index))
        return status, codes

    def forget(self, job_id: str, index: str) -> None:
        """The row's lease ended in Redis (its result was published or it was given back)."""
        held = self.held.get(job_id)
        if held is not None:
            held.discard(index)
            if not held:
                del self.held[job_id]
        self.lost.discard((job_id, index))

    async def give_up(self, job: AsyncJob, indices: list[str]) -> None:
        """End leases in Redis without a result (hand-back, a retry after a Redis error)."""
        mine = [i for i in indices if i in self.held.get(job.id, ())]
        if mine:
            await job.renew_leases(self.owner, 0, mine)
        for index in mine:
            self.forget(job.id, index)

    async def renew(self) -> None:
        """Extend every lease this process holds; note the ones it lost."""
        for job_id, held in list(self.held.items()):
            if not held:
                continue
            lost = await AsyncJob(self.client, job_id).renew_leases(self.owner, self.ms, list(held))
            for raw in lost:
                index = raw.decode() if isinstance(raw, bytes) else str(raw)
                if (job_id, index) not in self.lost:
                    log.warning("row %s of job %s: its lease was taken over by another worker "
                                "(this one stalled for over %.0fs)", index, job_id, self.ms / 1000)
                self.lost.add((job_id, index))

    def start(self) -> None:
        """Renew in the background, four times per lease length (call on the running loop)."""
        async def forever() -> None:
            while True:
                await self.sleep(self.ms / 4000)
                try:
                    await self.renew()
                except redis.RedisError as exc:  # Redis restarting: keep trying; leases last a while
                    log.warning("could not renew row leases (%s); trying again", type(exc).__name__)
        self._renewer = asyncio.ensure_future(forever())

    async def stop(self) -> None:
        if self._renewer is not None:
            await stop_task(self._renewer)  # (one cancel() may not stop it: see stop_task)
            self._renewer = None
