"""The Lua scripts shipped in ``opt_queue/lua``, registered once per Redis client."""

from __future__ import annotations

from functools import cache
from importlib import resources

import redis
from redis.commands.core import Script

_NAMES = ("claim", "publish", "release", "acquire", "stamp", "cancel", "settle", "cool")


@cache
def source(name: str) -> str:
    """Return the text of ``lua/<name>.lua``."""
    return resources.files("opt_queue").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    """Registered scripts (redis-py's ``Script`` runs EVALSHA and reloads on NOSCRIPT)."""

    def __init__(self, client: redis.Redis) -> None:
        for name in _NAMES:
            setattr(self, name, client.register_script(source(name)))

    claim: Script
    publish: Script
    release: Script
    acquire: Script
    stamp: Script
    cancel: Script
    settle: Script
    cool: Script


_by_client: dict[int, Scripts] = {}


def scripts_for(client: redis.Redis) -> Scripts:
    """Return the (cached) registered scripts for ``client``."""
    got = _by_client.get(id(client))
    if got is None:
        got = _by_client[id(client)] = Scripts(client)
    return got
