"""kombu's Redis transport with one Redis client per channel.

kombu 5.x's Redis channel (``kombu/transport/redis.py``, ``Channel.conn_or_acquire``) builds a new
``redis.Redis`` for every operation that takes no client: each message's acknowledgement, its
``unacked`` bookkeeping, each restore. Building one costs ~155 us here (measured: 20,000 in a
loop), and a task costs a few of them; the connections come from the channel's pool either way.
This channel builds that client once per connection pool and hands it out again: a
``redis.Redis`` over a pool is safe to share between threads (each command takes a connection
from the pool; pipelines are made per use).

Used for ``redis://`` broker URLs (``app.configure``); ``rediss://``, sockets and Sentinel keep
kombu's own transport. ``OPT_QUEUE_STOCK_TRANSPORT=1`` turns it off (for a kombu release that
changes the channel, and to measure it: docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis

NAME = "opt_queue.transport:Transport"


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    _shared: tuple[Any, Any] | None = None  # (the pool, the client built over it)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool  # a new pool after a fork or a disconnect: a new client with it
        shared = self._shared
        if shared is None or shared[0] is not pool:
            shared = self._shared = (pool, self._create_client())
        yield shared[1]


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel
