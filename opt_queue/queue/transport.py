"""kombu's Redis transport with one Redis client per channel, and acknowledgements that ride on
the channel's next round trip.

kombu 5.x's Redis channel (``kombu/transport/redis.py``, ``Channel.conn_or_acquire``) builds a new
``redis.Redis`` for every operation that takes no client: each message's acknowledgement, its
``unacked`` bookkeeping, each restore. Building one costs ~155 us here (measured: 20,000 in a
loop), and a task costs a few of them; the connections come from the channel's pool either way.
This channel builds that client once per connection pool and hands it out again: a
``redis.Redis`` over a pool is safe to share between threads (each command takes a connection
from the pool; pipelines are made per use).

Each delivered message costs kombu two round trips besides its ``BRPOP``: one to record it as
unacknowledged (``QoS.append``), one to remove that record when it is acknowledged (``QoS.ack``,
in the pool thread that ran the task). Here an acknowledgement is done in memory at once and its
record removed with the channel's next round trip: the next delivery's record (one pipeline for
both); else, once a ``BRPOP`` found the queues empty (it waits ``brpop_timeout``, 1 s), before
the next one; else at the channel's closing. A worker killed in between leaves those records
behind, and their messages come back once ``visibility_timeout`` has passed, as kombu does for the tasks a killed worker was running: a row
that comes back so finds its result published and costs no API call (``Engine.process``).

Used for ``redis://`` broker URLs (``app.configure``); ``rediss://``, sockets and Sentinel keep
kombu's own transport. ``OPT_QUEUE_STOCK_TRANSPORT=1`` turns it off (for a kombu release that
changes the channel, and to measure it: docs/benchmarks.md).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

NAME = "opt_queue.queue.transport:Transport"
ACKS_HELD = 256
"""At most this many acknowledgements wait for a delivery to ride on (a worker with more tasks
running than that, finishing faster than it takes new ones, flushes them on its own)."""


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu_redis.QoS (``append``, ``ack``: kombu/transport/redis.py), its ack's round trip
    deferred to the channel's next one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acked: deque[str] = deque()  # acknowledged, their records not yet removed from Redis

    def ack(self, delivery_tag: str) -> None:
        self._acked.append(delivery_tag)  # any thread; deque appends and pops are atomic
        virtual.QoS.ack(self, delivery_tag)  # kombu's in-memory part (its Redis part waits)

    def append(self, message: Any, delivery_tag: str) -> None:
        with self.pipe_or_acquire() as pipe:
            self._remove_acked(pipe)
            self._record(pipe, message, delivery_tag)
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)  # kombu's in-memory part

    def flush_acks(self) -> None:
        """Remove the records of the messages acknowledged since the last round trip."""
        if self._acked:
            with self.pipe_or_acquire() as pipe:
                self._remove_acked(pipe)
                pipe.execute()

    def _remove_acked(self, pipe: Any) -> None:
        for _ in range(len(self._acked)):
            self._remove_from_indices(self._acked.popleft(), pipe)

    def _record(self, pipe: Any, message: Any, delivery_tag: str) -> None:
        # kombu_redis.QoS.append's commands, on the given pipeline
        delivery = message.delivery_info
        pipe.zadd(self.unacked_index_key, {delivery_tag: kombu_redis.time()})
        pipe.hset(self.unacked_key, delivery_tag,
                  kombu_redis.dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS
    _shared: tuple[Any, Any] | None = None  # (the pool, the client built over it)

    _waited = False  # the last BRPOP found the queues empty

    def _brpop_start(self, timeout: Any = None) -> None:
        # While messages come, each delivery's round trip carries the acks; when they stop, the
        # acks go before the channel waits again (a BRPOP returns empty within brpop_timeout)
        if self._qos is not None and (self._waited or len(self._qos._acked) >= ACKS_HELD):
            self._qos.flush_acks()
        super()._brpop_start(timeout)

    def _brpop_read(self, **options: Any) -> Any:
        try:
            got = super()._brpop_read(**options)
        except Empty:
            self._waited = True
            raise
        self._waited = False
        return got

    def close(self) -> None:
        if self._qos is not None and not self._closing:
            try:
                self._qos.flush_acks()
            except self.connection_errors:  # the records stay: their messages come back later
                pass
        super().close()

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._pool is None and getattr(self.connection, "client", None) is None:
            # The broker connection was lost and kombu has closed it: no pool can be built (kombu
            # reads the closed connection's address, and its AttributeError stopped the worker,
            # "Unrecoverable error", when a Redis restart met a channel closing). A connection
            # error is one kombu's closing ignores; the unacknowledged records stay in Redis and
            # their messages come back after visibility_timeout.
            raise kombu_redis.redis.ConnectionError("the broker connection is closed")
        pool = self.pool  # a new pool after a fork or a disconnect: a new client with it
        shared = self._shared
        if shared is None or shared[0] is not pool:
            shared = self._shared = (pool, self._create_client())
        yield shared[1]


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel
