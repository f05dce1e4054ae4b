"""The Lua scripts shipped in ``opt_queue/store/lua``, registered once per Redis client."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

log = logging.getLogger(__name__)

_ROW_SCRIPTS = ("claim", "unclaim", "publish", "release", "collected", "lease", "orphans", "dedupe", "prune")
"""Scripts on a job's row state: ``lua/_rows.lua`` (its helpers) is put in front of each."""
_NAMES = (*_ROW_SCRIPTS, "renew", "acquire", "stamp", "cancel", "settle", "settle_out", "out_mode", "learn", "calibrate", "calibrate_usage", "due", "reserve")


def _read(name: str) -> str:
    return resources.files("opt_queue.store").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


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
    unclaim: Script
    publish: Script
    release: Script
    collected: Script
    lease: Script
    orphans: Script
    dedupe: Script
    prune: Script
    renew: Script
    acquire: Script
    stamp: Script
    cancel: Script
    settle: Script
    settle_out: Script
    out_mode: Script
    learn: Script
    calibrate: Script
    calibrate_usage: Script
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


async def run_pipeline(client: Any, fill: Callable[[Any], None], durable: bool = False) -> list[Any]:
    """Run what ``fill`` queues on a pipeline of the asyncio ``client``; return its replies.

    ``durable``: the writes must reach the replicas :func:`durable_writes` asks of ``client``
    before this returns (a result that a failover must not lose); the round trip then ends with
    ``WAIT``, on the connection that made the writes (``WAIT`` counts that connection's writes).

    The fills of all coroutines that ask in the same turn of the event loop go out as one
    non-transactional pipeline (see :class:`Coalescer`): one round trip and one connection for
    all of them, each fill's commands in its own order. A fill's own error (a script's error,
    a Python error while filling) is raised to its caller only; a connection error to every
    caller of that round trip.

    When Redis no longer knows a script (it restarted), the scripts are loaded and the fills that
    met ``NOSCRIPT`` run once more: a script that met ``NOSCRIPT`` did nothing, and the fills
    built this way hold only reads, scripts and counters (a counter may then count twice;
    nothing else can).
    """
    return await _coalescer(client).run(fill, durable)


WAIT_MS = 1000
"""How long a durable round trip waits for its replicas: a replica that lags longer than this (or
is down) slows rows by this much each, and is logged, but stops nothing."""


def durable_writes(client: Any, replicas: int) -> None:
    """Make the durable round trips of the asyncio ``client`` wait (Redis ``WAIT``) until
    ``replicas`` replicas hold their writes; 0: no waiting (one Redis has no replica)."""
    _coalescer(client).replicas = replicas


def _coalescer(client: Any) -> Coalescer:
    """The one :class:`Coalescer` of the asyncio ``client``."""
    coalescer = _coalescers.get(client)
    if coalescer is None:
        coalescer = _coalescers[client] = Coalescer(client)
    return coalescer


async def run_script(client: Any, script: Script, keys: list[str], args: list[Any]) -> Any:
    """Run ``script`` on the asyncio ``client`` by way of :func:`run_pipeline`; return its reply."""
    return (await run_pipeline(client, lambda pipe: queue(pipe, script, keys, args)))[0]


class Coalescer:
    """Gathers the pipelines that one event loop's coroutines ask for into one round trip.

    A worker has hundreds of rows in flight, and each row asks Redis something several times
    (its lease, its admission, its send-time stamp, its result). Each round trip through
    redis-py's asyncio client costs far more CPU than the commands it carries (a connection
    taken from the pool and given back, a timeout, the reply's parsing set up), so the rows'
    requests are sent together: the first fill of a turn of the loop schedules a flush for the
    next turn, and every fill queued until then goes out in that flush. Round trips may overlap
    (a flush does not wait for the one before it), so this adds no latency beyond one turn.

    The first round trip loads every script in front of its fills. A fill that meets ``NOSCRIPT``
    runs again, but the commands after the missing script in it ran the first time: the order
    within the fill is broken (a probe's answer marked before its calibration let the burst in on
    the estimate; 429s). Loaded up front, a script is missing only once Redis has lost them.
    """

    replicas = 0
    """Replicas a durable round trip waits for (:func:`durable_writes`)."""
    _short_since = 0.0

    def __init__(self, client: Any) -> None:
        self.client = client
        self._loaded = False  # the scripts were loaded in front of a round trip that succeeded
        self._pending: list[tuple[Callable[[Any], None], asyncio.Future[list[Any]]]] = []
        self._durable = False
        self._flushes: set[asyncio.Task[None]] = set()

    async def run(self, fill: Callable[[Any], None], durable: bool = False) -> list[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((fill, future))
        self._durable = self._durable or durable
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        durable, self._durable = self._durable and self.replicas > 0, False
        task = asyncio.ensure_future(self._execute(batch, durable))
        self._flushes.add(task)  # a reference, so that the task is not collected while it runs
        task.add_done_callback(self._flushes.discard)

    async def _execute(self, batch: list[tuple[Callable[[Any], None], asyncio.Future[list[Any]]]],
                       durable: bool = False) -> None:
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            loading = not self._loaded
            if loading:  # before the first fills: see the class docstring
                _queue_loads(pipe)
            spans = []
            for fill, future in batch:
                start = len(pipe.command_stack)
                try:
                    fill(pipe)
                except Exception as exc:  # this caller's bug, not the others'
                    del pipe.command_stack[start:]
                    _settle(future, exc)
                    continue
                spans.append((fill, future, start, len(pipe.command_stack)))
            if durable:
                pipe.execute_command("WAIT", self.replicas, WAIT_MS)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # the round trip failed: for every caller in it
                for _fill, future, _start, _end in spans:
                    _settle(future, exc)
                return
            except BaseException:  # cancelled (the loop is closing): so are its callers
                for _fill, future, _start, _end in spans:
                    future.cancel()
                raise
            if loading and not any(isinstance(r, Exception) for r in replies[:len(_NAMES)]):
                self._loaded = True
            if durable:
                self._check_replicas(replies[-1])
            again = []
            for fill, future, start, end in spans:
                part = replies[start:end]
                error = next((r for r in part if isinstance(r, Exception)), None)
                if isinstance(error, NoScriptError) and attempt == 1:
                    again.append((fill, future))
                else:
                    _settle(future, error if error is not None else part)
            if not again:
                return
            batch = again
            try:
                load = self.client.pipeline(transaction=False)
                _queue_loads(load)
                await load.execute()
            except Exception as exc:
                for _fill, future in batch:
                    _settle(future, exc)
                return

    def _check_replicas(self, acked: Any) -> None:
        """Log (once a minute at most) when fewer replicas than asked took a durable write."""
        if isinstance(acked, int) and acked >= self.replicas:
            return
        now = time.monotonic()
        if now - self._short_since >= 60:
            self._short_since = now
            log.warning("Redis: %s of the %d replicas asked for took a result within %d ms (WAIT); a "
                        "failover now could lose it and pay its row again", acked, self.replicas, WAIT_MS)


def _queue_loads(pipe: Any) -> None:
    """Queue on ``pipe`` the loading of every script (``SCRIPT LOAD`` of one already loaded costs
    little and changes nothing)."""
    for name in _NAMES:
        pipe.script_load(source(name))


def _settle(future: asyncio.Future[list[Any]], outcome: Any) -> None:
    if future.done():  # its caller was cancelled
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


_coalescers: weakref.WeakKeyDictionary[Any, Coalescer] = weakref.WeakKeyDictionary()
