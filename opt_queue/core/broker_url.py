"""Broker URLs, read before anything connects: one Redis (``redis://``, ``rediss://``) or a set of
Sentinels in kombu's form, ``sentinel://host:26379;sentinel://host2:26379/0`` (a password as
``sentinel://:password@host:26379``: the master's, as kombu takes it), with the master's name
given apart (config ``sentinel_master``, env ``OPT_QUEUE_SENTINEL_MASTER``); and a URL's password
hidden wherever one is shown."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.connection

from opt_queue.core.errors import BrokerError

ENV_SENTINEL_MASTER = "OPT_QUEUE_SENTINEL_MASTER"
SENTINEL_PORT = 26379


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
