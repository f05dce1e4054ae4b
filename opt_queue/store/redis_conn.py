"""Redis connections that ride out a restart of the server, or a Sentinel failover.

A broker URL (read in :mod:`opt_queue.core.broker_url`) is either one Redis or a set of Sentinels
with the master's name given apart. A Sentinel client asks
the Sentinels where the master is whenever it connects, so a connection lost in a failover comes
back to the promoted replica; so do kombu's (the Celery broker's) and Flower's.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from opt_queue.core.broker_url import check_url, is_sentinel, master_name, parse_sentinels, redact_url
from opt_queue.core.errors import BrokerError

_DOWN = [redis.ConnectionError, redis.TimeoutError]

STOP_POLL = 0.05
"""Seconds between two cancellations of a task that :func:`stop_task` has not stopped yet."""


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and return once it has ended, however it ended.

    One ``cancel()`` is not enough for a task that talks to Redis: on Python 3.11 a cancellation
    that arrives as a command's socket write completes is swallowed by ``asyncio.wait_for``
    (which redis-py's asyncio connection writes through; CPython bpo-42130, gone in 3.12), and
    the task goes on as if nothing was asked. Measured with redis-py 8.2: 40 of 2,400 tasks
    looping on ``ZADD`` survived one ``cancel()``. A lease renewer that survived kept a batch
    step's lease for ever and no worker took the step again. So the task is cancelled again
    until it has ended."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=STOP_POLL)


class _Following(redis.sentinel.SentinelManagedConnection):  # type: ignore[misc]
    """A Sentinel-managed connection that asks the Sentinels again whenever it reconnects.

    redis-py's (8.x) asks them only when the pool hands a connection out: a command whose
    connection broke reconnects, on the client's retry, through ``connect_check_health``, to the
    address it had, with the connection's own retries (60 here) nested inside the client's: a
    worker kept dialling a dead master for two minutes after a failover. Here every reconnection
    dials the master the Sentinels name now, once a retry."""

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self.is_connected and retry_socket_connect and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
            retry_socket_connect = False
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class _FollowingAsync(redis.asyncio.sentinel.SentinelManagedConnection):  # type: ignore[misc]
    """:class:`_Following` for the asyncio client."""

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self.is_connected and retry_socket_connect and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
            retry_socket_connect = False
        await super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


def _master(sentinel_class: Any, connection_class: Any, url: str, master: str, timeout: float, **options: Any) -> Any:
    """A client (sync or asyncio, as ``sentinel_class``) of the master that the Sentinels of ``url``
    name ``master``, its connections of ``connection_class``."""
    where = parse_sentinels(url)
    sentinels = sentinel_class(
        list(where.hosts), sentinel_kwargs={"socket_connect_timeout": timeout, "socket_timeout": timeout})
    return sentinels.master_for(master, **where.master_kwargs(), connection_class=connection_class, **options)


def _retry(patient: bool) -> Retry:
    return Retry(ExponentialBackoff(cap=2.0, base=0.05), 60 if patient else 8)


def connect(url: str, *, check: bool = False, timeout: float = 5.0, patient: bool = False,
            master: str | None = None) -> redis.Redis:
    """Return a client for ``url`` (one Redis, or the master that Sentinels name: ``master``, else
    ``OPT_QUEUE_SENTINEL_MASTER``) that retries dropped connections (``patient``: for about two
    minutes, enough for a Redis restart or a failover); with ``check``, fail fast with
    :class:`BrokerError` if nobody answers now."""
    master = master_name(master)
    check_url(url, master)
    options: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": 30,
                               "health_check_interval": 30, "retry": _retry(patient),
                               "retry_on_error": _DOWN}
    if is_sentinel(url):
        client = _master(redis.sentinel.Sentinel, _Following, url, str(master), timeout, **options)
        probe = _master(redis.sentinel.Sentinel, redis.sentinel.SentinelManagedConnection, url, str(master),
                        timeout, socket_connect_timeout=timeout, socket_timeout=timeout) if check else None
    else:
        client = redis.Redis.from_url(url, **options)
        probe = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout) if check else None
    if probe is not None:
        try:
            probe.ping()
        except redis.AuthenticationError:
            raise BrokerError(f"Redis at {redact_url(url)} refused the password; check broker_url") from None
        except redis.sentinel.MasterNotFoundError:
            raise BrokerError(f"no Sentinel of {redact_url(url)} knows a master named {master!r} that is up; "
                              f"check \"sentinel_master\" and that the Sentinels are running") from None
        except redis.RedisError as exc:
            raise BrokerError(f"cannot reach Redis at {redact_url(url)} ({exc}); is it running, "
                              f"and is broker_url (or OPT_QUEUE_BROKER_URL) right?") from None
        finally:
            probe.close()
    return client


def connect_async(url: str, *, max_connections: int, timeout: float = 5.0,
                  master: str | None = None) -> redis.asyncio.Redis:
    """An asyncio client for ``url`` that, like ``connect(patient=True)``, rides out a restart or a
    failover.

    ``max_connections`` must cover the callers that can use Redis at once (a worker's rows in
    flight): connections open only as many are in use together, and running out is an error.
    """
    master = master_name(master)
    check_url(url, master)
    options: dict[str, Any] = {
        "max_connections": max_connections, "socket_connect_timeout": timeout, "socket_timeout": 30,
        "retry": redis.asyncio.retry.Retry(ExponentialBackoff(cap=2.0, base=0.05), 60),
        "retry_on_error": _DOWN}
    if is_sentinel(url):
        return _master(redis.asyncio.sentinel.Sentinel, _FollowingAsync, url, str(master), timeout, **options)
    pool = redis.asyncio.ConnectionPool.from_url(url, **options)
    return redis.asyncio.Redis(connection_pool=pool)
