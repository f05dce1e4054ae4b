"""The Lua scripts shipped in ``opt_queue/lua``, registered once per Redis client."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

_ROW_SCRIPTS = ("claim", "publish", "release", "collected", "lease", "orphans", "dedupe")
"""Scripts on a job's row state: ``lua/_rows.lua`` (its helpers) is put in front of each."""
_NAMES = (*_ROW_SCRIPTS, "renew", "acquire", "stamp", "cancel", "settle", "learn", "due", "reserve")


def _read(name: str) -> str:
    return resources.files("opt_queue").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@cache
def source(name: str) -> str:
    """Return the text of script ``name`` as Redis runs it."""
    return (_read("_rows") + "\n" if name in _ROW_SCRIPTS else "") + _read(name)


class Scripts:
    """Registered scripts (redis-py's ``Script`` runs EVALSHA and reloads on NOSCRIPT)."""

    def __init__(self, client: redis.Redis) -> None:
        for name in _NAMES:
            setattr(self, name, client.register_script(source(name)))

    claim: Script
    publish: Script
    release: Script
    collected: Script
    lease: Script
    orphans: Script
    dedupe: Script
    renew: Script
    acquire: Script
    stamp: Script
    cancel: Script
    settle: Script
    learn: Script
    due: Script
    reserve: Script


_by_client: dict[int, Scripts] = {}


def scripts_for(client: redis.Redis) -> Scripts:
    """Return the (cached) registered scripts for ``client``."""
    got = _by_client.get(id(client))
    if got is None:
        got = _by_client[id(client)] = Scripts(client)
    return got


def queue(pipe: Any, script: Script, keys: list[str], args: list[Any]) -> None:
    """Queue ``script`` on ``pipe`` by its SHA alone.

    redis-py's own way (``script(..., client=pipe)``) costs a ``SCRIPT EXISTS`` round trip before
    every pipeline; :func:`run_pipeline` instead loads the scripts only when Redis has lost them.
    """
    pipe.evalsha(script.sha, len(keys), *keys, *args)


async def run_pipeline(client: Any, fill: Callable[[Any], None]) -> list[Any]:
    """Fill a fresh non-transactional pipeline of the asyncio ``client`` and run it.

    When Redis no longer knows a script (it restarted), load them all and run the pipeline once
    more: a script that met ``NOSCRIPT`` did nothing, and the pipelines built this way hold only
    reads, scripts and counters (a counter may then count twice; nothing else can).
    """
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        fill(pipe)
        try:
            return await pipe.execute()
        except NoScriptError:
            if attempt == 2:
                raise
            for name in _NAMES:
                await client.script_load(source(name))
    raise AssertionError("unreachable")
