"""The HTTP ground every provider stands on: one aiohttp connection pool per event loop, and the
hook that tells the limiter the moment a request's bytes leave.

The limiter stamps each request with its send time (``on_send``), which must be read right before
the body is written: after the connection is made (a new connection in a burst can take long),
not before an SDK's own request building. aiohttp's trace hook does that; the SDKs (whose HTTP
client runs on this pool through their aiohttp transport) do not pass a callback on, so a row's
task hands it over in a context variable (:meth:`Http.sending`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp

from opt_queue import __version__
from opt_queue.core import answers

USER_AGENT = f"opt-queue/{__version__}"
KEEPALIVE = 60.0
"""Idle connections are kept a minute: a burst after a quiet limit window reuses them instead of
opening hundreds at once (slow, and it delays requests past their stamp)."""
for _name in ("httpx", "httpx2", "openai", "anthropic", "google_genai"):  # one INFO line per request
    logging.getLogger(_name).setLevel(max(logging.getLogger(_name).level, logging.WARNING))

_on_send: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("opt_queue_on_send", default=None)


async def _body_sending(session: Any, context: Any, params: Any) -> None:
    """aiohttp trace hook, awaited right before a chunk of the request body is written. Runs the
    row's ``on_send`` once: passed with the request (a direct aiohttp call) or, through an SDK,
    which does not pass it on, in the context variable the row's task set."""
    hooks = context.trace_request_ctx
    if isinstance(hooks, dict):
        callback = hooks.pop("on_send", None)
    else:
        callback = _on_send.get()
        _on_send.set(None)
    if callback is not None:
        callback()


async def request_leaving(request: Any) -> None:
    """Fallback when an SDK's aiohttp transport cannot take our session: httpx's request hook, the
    last step before the transport (a new connection is made after it)."""
    callback = _on_send.get()
    if callback is not None:
        _on_send.set(None)
        callback()


class Http:
    """One event loop's aiohttp session, shared by every provider and key (the engine bounds the
    requests in flight, so the pool itself is unbounded)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=KEEPALIVE)
            trace = aiohttp.TraceConfig()
            trace.on_request_chunk_sent.append(_body_sending)
            self._session = aiohttp.ClientSession(connector=connector, trace_configs=[trace],
                                                  headers={"User-Agent": USER_AGENT})
        return self._session

    @staticmethod
    @contextlib.contextmanager
    def sending(on_send: Callable[[], None] | None) -> Iterator[None]:
        """Within this block, the next request body written on this task's context runs ``on_send``."""
        token = _on_send.set(on_send)
        try:
            yield
        finally:
            _on_send.reset(token)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _is_httpx_connect_error(exc: BaseException) -> bool:
    """httpx's ConnectError (the SDK's own HTTP stack, ``httpx`` or its ``httpx2`` fork)."""
    return any(t.__name__ == "ConnectError" and t.__module__.split(".")[0] in ("httpx", "httpx2")
               for t in type(exc).__mro__)


def unreachable(exc: BaseException) -> BaseException | None:
    """The error under ``exc`` that says no connection could be made (refused, DNS, TLS), if any.
    The SDK's aiohttp transport reports such an error as a connect *timeout*, which it is not; a
    server that accepted the connection and then did not answer in time is a timeout."""
    seen: BaseException | None = exc
    for _ in range(8):  # the SDK wraps httpx's error, which wraps aiohttp's
        if seen is None:
            return None
        if isinstance(seen, aiohttp.ClientConnectorError) or _is_httpx_connect_error(seen):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def kept(headers: Any, prefixes: tuple[str, ...]) -> dict[str, str]:
    """The response headers a provider reads (its rate limits, retry hints, request id), lower-cased."""
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(prefixes)}


def json_body(text: str) -> Any:
    """A 200 response's JSON body; :class:`answers.BadResponse` when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        raise answers.BadResponse("the server answered 200 with a body that is not JSON") from None
