"""Redis connections that ride out a restart of the server."""

from __future__ import annotations

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from opt_queue.core.errors import BrokerError


def connect(url: str, *, check: bool = False, timeout: float = 5.0, patient: bool = False) -> redis.Redis:
    """Return a client for ``url`` (``redis://``, ``rediss://``, with password) that retries
    dropped connections (``patient``: for about two minutes, enough for a Redis restart); with
    ``check``, fail fast with :class:`BrokerError` if nobody answers now."""
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout, socket_timeout=30, health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), 60 if patient else 8),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    except ValueError as exc:
        raise BrokerError(f"broker_url {redact_url(url)} is not a Redis URL: {exc}") from None
    if check:
        probe = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            probe.ping()
        except redis.AuthenticationError:
            raise BrokerError(f"Redis at {redact_url(url)} refused the password; check broker_url") from None
        except redis.RedisError as exc:
            raise BrokerError(f"cannot reach Redis at {redact_url(url)} ({exc}); is it running, "
                              f"and is broker_url (or OPT_QUEUE_BROKER_URL) right?") from None
        finally:
            probe.close()
    return client


def connect_async(url: str, *, max_connections: int, timeout: float = 5.0) -> redis.asyncio.Redis:
    """An asyncio client for ``url`` that, like ``connect(patient=True)``, rides out a restart.

    ``max_connections`` must cover the callers that can use Redis at once (a worker's rows in
    flight): connections open only as many are in use together, and running out is an error.
    """
    pool = redis.asyncio.ConnectionPool.from_url(
        url, max_connections=max_connections, socket_connect_timeout=timeout,
        socket_timeout=30,
        retry=redis.asyncio.retry.Retry(ExponentialBackoff(cap=2.0, base=0.05), 60),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    return redis.asyncio.Redis(connection_pool=pool)


def redact_url(url: str) -> str:
    """Hide the password of a broker URL."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0] if ":" in creds else ""
        return f"{scheme}://{user}:***@{host}"
    return url
