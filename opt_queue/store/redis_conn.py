"""Redis connections that ride out a restart of the server, or a Sentinel failover.

A broker URL is either one Redis (``redis://``, ``rediss://``, with password) or a set of
Sentinels in kombu's form, ``sentinel://host:26379;sentinel://host2:26379/0`` (a password as
``sentinel://:password@host:26379``: the master's, as kombu takes it), with the master's name
given apart (config ``sentinel_master``, env ``OPT_QUEUE_SENTINEL_MASTER``). A Sentinel client asks
the Sentinels where the master is whenever it connects, so a connection lost in a failover comes
back to the promoted replica; so do kombu's (the Celery broker's) and Flower's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from opt_queue.core.errors import BrokerError

ENV_SENTINEL_MASTER = "OPT_QUEUE_SENTINEL_MASTER"
SENTINEL_PORT = 26379
_DOWN = [redis.ConnectionError, redis.TimeoutError]


@dataclass(frozen=True)
class Sentinels:
    """A ``sentinel://`` broker URL, read: where the Sentinels are, and the master's database and
    credentials."""

    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None

    def master_kwargs(self) -> dict[str, Any]:
        return {"db": self.db, "username": self.username, "password": self.password}


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


def is_sentinel(url: str) -> bool:
    return url.strip().lower().startswith("sentinel://")


def parse_sentinels(url: str) -> Sentinels:
    """Read a ``sentinel://h1:26379;sentinel://h2:26379/0`` URL; :class:`BrokerError` naming what is
    wrong and the form that works when it is malformed."""
    shown = redact_url(url)
    form = "sentinel://HOST:26379;sentinel://HOST2:26379/DB (sentinel://:PASSWORD@HOST:26379 with a password)"
    hosts: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    parts = [p.strip() for p in url.split(";")]
    for part in parts:
        if not part:
            raise BrokerError(f"broker_url {shown}: an empty Sentinel between ';' separators; write {form}")
        split = urlsplit(part)
        if split.scheme.lower() != "sentinel":
            raise BrokerError(f"broker_url {shown}: every Sentinel address starts with sentinel://, not "
                              f"{split.scheme or 'nothing'}://; write {form}")
        try:
            port = split.port or SENTINEL_PORT
        except ValueError:
            raise BrokerError(f"broker_url {shown}: a Sentinel port must be a number from 1 to 65535; "
                              f"write {form}") from None
        if not split.hostname:
            raise BrokerError(f"broker_url {shown}: a Sentinel address has no host; write {form}")
        path = split.path.strip("/")
        if path:
            if not path.isdigit():
                raise BrokerError(f"broker_url {shown}: the database after the last Sentinel must be a "
                                  f"number (/0), not /{path}; write {form}")
            db = int(path)
        if split.query or split.fragment:
            raise BrokerError(f"broker_url {shown}: a Sentinel URL takes no ?options; the master's name "
                              f"goes in \"sentinel_master\" (or {ENV_SENTINEL_MASTER})")
        username = username or (unquote(split.username) if split.username else None)
        password = password or (unquote(split.password) if split.password else None)
        hosts.append((split.hostname, port))
    return Sentinels(tuple(hosts), db, username, password)


def check_url(url: str, master: str | None) -> None:
    """Refuse a broker URL this module cannot connect to, before anything connects."""
    if is_sentinel(url):
        parse_sentinels(url)
        if not master:
            raise BrokerError(f"broker_url {redact_url(url)} names Sentinels: set \"sentinel_master\" in the "
                              f"config (or {ENV_SENTINEL_MASTER}) to the name of the master they watch")
        return
    try:
        redis.connection.parse_url(url)
    except ValueError as exc:
        raise BrokerError(f"broker_url {redact_url(url)} is not a Redis URL ({exc}); write "
                          f"redis://HOST:6379/0, rediss://..., or sentinel://HOST:26379;sentinel://...") from None


def master_name(master: str | None) -> str | None:
    """The Sentinel master's name: ``master``, else ``OPT_QUEUE_SENTINEL_MASTER``."""
    return master or os.environ.get(ENV_SENTINEL_MASTER) or None


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
        where = parse_sentinels(url)
        sentinels = redis.sentinel.Sentinel(
            list(where.hosts), sentinel_kwargs={"socket_connect_timeout": timeout, "socket_timeout": timeout})
        client = sentinels.master_for(str(master), **where.master_kwargs(), connection_class=_Following, **options)
        probe = sentinels.master_for(str(master), **where.master_kwargs(), socket_connect_timeout=timeout,
                                     socket_timeout=timeout) if check else None
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
        where = parse_sentinels(url)
        sentinels = redis.asyncio.sentinel.Sentinel(
            list(where.hosts), sentinel_kwargs={"socket_connect_timeout": timeout, "socket_timeout": timeout})
        return sentinels.master_for(str(master), **where.master_kwargs(), connection_class=_FollowingAsync,
                                    **options)
    pool = redis.asyncio.ConnectionPool.from_url(url, **options)
    return redis.asyncio.Redis(connection_pool=pool)


def redact_url(url: str) -> str:
    """Hide the password of a broker URL (of every Sentinel of a ``;``-separated list)."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0] if ":" in creds else ""
        return f"{scheme}://{user}:***@{host}"
    return url
