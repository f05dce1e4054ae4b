"""OpenAI's API (and Azure OpenAI's) behind the provider seam: one call of any endpoint, what its
failure means, and what its headers say about the key.

Calls go through the official ``openai`` SDK (``api_client: "openai"``, the default):
``AsyncOpenAI`` on the SDK's aiohttp transport, one client per key and base URL, kept open, all
sharing the loop's connection pool; ``max_retries=0`` (the engine's error policy is the only retry
loop) and raw responses, so that the ``x-ratelimit-*`` headers reach the limiter. Errors are
classified from the SDK's exception types and their bodies.

``api_client: "aiohttp"`` sends the same documented wire format (a JSON body, a bearer token, JSON
back) over aiohttp directly: the SDK's request building costs more CPU than the HTTP exchange
itself (docs/benchmarks.md), which matters only to a worker process pushing hundreds of rows a
second on a small machine.

:func:`classify` turns any exception of a call into a :class:`Failure` with a :class:`Kind` that
the error policy acts on; :func:`parse_duration` and :func:`retry_after_seconds` read the
server's pacing hints, :func:`server_limits` and :func:`token_window` its ``x-ratelimit-*``
headers. All are pure and unit-tested without a server.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai

try:
    from httpx2 import Response as _HttpResponse  # the SDK's HTTP library (openai 3.5x)
except ImportError:  # pragma: no cover - SDKs on httpx
    from httpx import Response as _HttpResponse  # type: ignore[no-redef]

from opt_queue.core import answers
from opt_queue.core.config import ApiKey
from opt_queue.providers.base import (Answer, Batch, BatchEntry, CallFailed, Failure, Kind, classify_first, classify_other,
                                      classify_sdk)
from opt_queue.providers.http import KEEPALIVE, USER_AGENT, Http, json_body, kept, request_leaving, unreachable
from opt_queue.core.request import ENDPOINTS

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_TRY_AGAIN_RE = re.compile(r"try again in ([0-9hmsµu.]+)", re.IGNORECASE)


def parse_duration(text: str | None) -> float | None:
    """Parse a Go duration (``12ms``, ``1.5s``, ``6m0s``, ``1h2m3s``) or plain seconds."""
    if text is None:
        return None
    text = str(text).strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def retry_after_seconds(headers: Any, message: str = "", rate_limited: bool = True) -> float | None:
    """How long the server asks us to wait: ``retry-after-ms``, ``retry-after``, and on a 429 also
    the ``x-ratelimit-reset-*`` headers or "try again in 20s" in the message. A reset header says
    when a window empties, which is a retry hint only for a request refused by that window: on a
    5xx it would wait for nothing (a minute, for a per-minute window)."""
    get = headers.get if headers is not None else (lambda _k: None)
    ms = get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    names = ("retry-after", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
    for name in names if rate_limited else names[:1]:
        value = parse_duration(get(name))
        if value is not None:
            return value
    if not rate_limited:
        return None
    m = _TRY_AGAIN_RE.search(message or "")
    return parse_duration(m.group(1).rstrip(".")) if m else None


def server_limits(headers: Any) -> dict[str, int]:
    """Return ``{"requests": n, "tokens": n}`` from ``x-ratelimit-limit-*`` headers when present."""
    out: dict[str, int] = {}
    if headers is None:
        return out
    for dim in ("requests", "tokens"):
        value = headers.get(f"x-ratelimit-limit-{dim}")
        try:
            if value is not None and int(value) > 0:
                out[dim] = int(value)
        except ValueError:
            pass
    return out


def on_tokens(message: str | None) -> bool:
    """Whether a 429's message says the tokens-per-minute limit refused it (OpenAI: "... on tokens
    per min (TPM): Limit 30000, Used 29000, Requested 1500")."""
    lowered = (message or "").lower()
    return "tokens per min" in lowered or "(tpm)" in lowered


def token_window(headers: Any) -> tuple[int, int] | None:
    """``(x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens)``: how much of its token window the
    server had counted when the request arrived; None when either is missing or unreadable."""
    if headers is None:
        return None
    try:
        limit = int(headers.get("x-ratelimit-limit-tokens") or 0)
        remaining = int(headers.get("x-ratelimit-remaining-tokens") or -1)
    except ValueError:
        return None
    if limit <= 0 or remaining < 0:
        return None
    return limit, min(remaining, limit)


def _error_fields(body: Any) -> tuple[str | None, str | None]:
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner.get("code") or inner.get("type"), inner.get("message")
    return None, None


def classify_status(status: int, body: Any, headers: Any, text: str = "") -> Failure:
    """Classify an HTTP error response by status, error code and message."""
    code, message = _error_fields(body)
    message = message or (text or "").strip()[:300] or f"HTTP {status}"
    lowered = message.lower()
    failure = _classify(status, code, message, lowered, headers)
    failure.server_limits = server_limits(headers)  # the API's own errors carry its limits too
    if failure.kind is Kind.RATE_LIMITED:
        failure.tokens = on_tokens(message)
        if not failure.server_limits:
            failure.server_limits = limits_in_message(message)
    return failure


_LIMIT_IN_MESSAGE = re.compile(r"on (requests|tokens) per min\b.*?limit:? (\d+)", re.IGNORECASE)


def limits_in_message(message: str) -> dict[str, int]:
    """A per-minute limit an OpenAI-style 429 states ("... on requests per min (RPM): Limit 3,
    Used 3, Requested 1."), for proxies that pass the message on but not the headers."""
    m = _LIMIT_IN_MESSAGE.search(message or "")
    return {m.group(1).lower(): int(m.group(2))} if m and int(m.group(2)) > 0 else {}


def _classify(status: int, code: str | None, message: str, lowered: str, headers: Any) -> Failure:
    if status == 503 and (code == "slow_down" or "slow down" in lowered):
        return Failure(Kind.SLOW_DOWN, message, status, "slow_down",
                       retry_after=retry_after_seconds(headers, rate_limited=False))
    if status == 429:
        if code == "insufficient_quota" or "exceeded your current quota" in lowered:
            return Failure(Kind.KEY_DEAD, message, status, "insufficient_quota")
        if "request too large" in lowered:
            return Failure(Kind.TOO_LARGE, message, status, code or "request_too_large")
        if code == "resource_unavailable" or "resource unavailable" in lowered:
            return Failure(Kind.FLEX_UNAVAILABLE, message, status, "resource_unavailable",
                           retry_after=retry_after_seconds(headers, rate_limited=False))
        return Failure(Kind.RATE_LIMITED, message, status, code or "rate_limit_exceeded",
                       retry_after=retry_after_seconds(headers, message))
    if status in (401, 403):
        return Failure(Kind.KEY_DEAD, message, status, code or ("invalid_api_key" if status == 401 else "forbidden"))
    if status == 400 and (code == "context_length_exceeded" or "maximum context length" in lowered):
        return Failure(Kind.TOO_LONG, message, status, "context_length_exceeded")
    if status == 404 or (status == 400 and code in ("unknown_parameter", "unsupported_parameter",
                                                    "invalid_model", "model_not_found")):
        return Failure(Kind.JOB_CONFIG, message, status, code or "not_found")
    if status >= 500 or status in (408, 409):
        return Failure(Kind.TRANSIENT, message, status, code or f"http_{status}",
                       retry_after=retry_after_seconds(headers, rate_limited=False))
    return Failure(Kind.BAD_ROW, message, status, code or f"http_{status}")


def classify(exc: BaseException) -> Failure:
    """Classify an exception raised by :func:`call` (through the SDK, or over aiohttp directly)."""
    found = classify_first(exc, unreachable) or classify_sdk(exc, openai, classify_status)
    if found is not None:
        return found
    if isinstance(exc, asyncio.TimeoutError):  # an OSError too: checked first
        return Failure(Kind.TRANSIENT, "the request timed out", code="timeout")
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return Failure(Kind.TRANSIENT, f"connection error: {type(exc).__name__}", code="connection_error")
    return classify_other(exc)


KEPT_HEADERS = ("x-ratelimit", "retry", "x-request-id")


class OpenAIProvider:
    """OpenAI's API on one event loop (a :class:`~opt_queue.providers.base.Provider`): one client
    per key and base URL, kept open, all on one connection pool. :meth:`call` sends one request of
    any endpoint.

    ``api_client: "openai"`` (the default) goes through the official SDK (``AsyncOpenAI`` or
    ``AsyncAzureOpenAI`` on the SDK's aiohttp transport); ``"aiohttp"`` sends the same documented
    wire format over aiohttp directly."""

    def __init__(self, api_client: str = "openai", http: Http | None = None) -> None:
        self.kind = api_client
        self.pool = http or Http()
        self._http: Any = None
        self._clients: dict[tuple[str, str], openai.AsyncOpenAI] = {}

    def __repr__(self) -> str:
        return f"<OpenAIProvider {self.kind} clients={len(self._clients)}>"

    def warm_up(self) -> None:
        """Create the connection pool now, not between an admission and its request."""
        self.pool.session()

    def _sdk_http_client(self) -> Any:
        """The SDK's aiohttp-based HTTP client on our session, whose trace hook reads the send time
        right before the body is written; the request hook when that is not possible."""
        try:
            from openai._vendor.httpx_aiohttp import AiohttpTransport  # the SDK's own aiohttp transport
        except ImportError:
            return openai.DefaultAioHttpClient(
                # the engine bounds the requests in flight: the pool must not (aiohttp's default of
                # 100 connections would hold sends back after their stamps)
                limits=type(openai.DEFAULT_CONNECTION_LIMITS)(
                    max_connections=1_000_000, max_keepalive_connections=None, keepalive_expiry=KEEPALIVE),
                event_hooks={"request": [request_leaving]})
        return openai.DefaultAioHttpClient(transport=AiohttpTransport(client=self.pool.session()))

    def client(self, key: ApiKey, timeout: float) -> openai.AsyncOpenAI:
        """The SDK client of ``key`` (one per key and base URL, kept open)."""
        ident = (key.fingerprint, key.api_base)
        found = self._clients.get(ident)
        if found is None:
            if self._http is None:
                self._http = self._sdk_http_client()
            common: dict[str, Any] = {"api_key": key.secret.get_secret_value(), "max_retries": 0,
                                      "timeout": timeout, "http_client": self._http,
                                      "default_headers": {"User-Agent": USER_AGENT, **dict(key.headers)}}
            if key.azure is not None:
                found = openai.AsyncAzureOpenAI(azure_endpoint=key.azure.endpoint, api_version=key.azure.api_version,
                                                azure_deployment=key.azure.deployment, **common)
            else:
                found = openai.AsyncOpenAI(base_url=key.api_base, **common)
            self._clients[ident] = found
        return found

    async def close(self) -> None:
        """Close the connection pools."""
        self._clients.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        await self.pool.close()

    async def call(self, key: ApiKey, url: str, body: dict[str, Any], timeout: float,
                   on_send: Callable[[], None] | None = None) -> Answer:
        """Send one request of endpoint ``url`` with ``key``; return its :class:`Answer`.

        ``on_send`` is called (once, synchronously) right before the request leaves: the limiter
        reads the send time then. Nothing is retried here: the engine's policy decides. Errors
        raise the SDK's exceptions (or, with ``api_client: "aiohttp"``, :class:`CallFailed`, a
        timeout or an ``aiohttp.ClientError``), or ``answers``' BadResponse, ContentFiltered or
        Refused; :meth:`classify` says what each means.
        """
        if self.kind == "aiohttp":
            data, headers = await self._call_aiohttp(key, url, body, timeout, on_send)
        else:
            with self.pool.sending(on_send):
                raw = await _sdk_create(self.client(key, timeout), url, body, timeout)
            data, headers = json_body(raw.text), kept(raw.headers, KEPT_HEADERS)
        return Answer(answers.read(url, data), data, request_id=headers.get("x-request-id"),
                      server_limits=server_limits(headers), token_window=token_window(headers))

    def classify(self, exc: BaseException) -> Failure:
        """What an exception raised by :meth:`call` means (:func:`classify`)."""
        return classify(exc)

    # -- the Batch API (the batch lane's side of the seam: ``base.BatchProvider``) ------------
    files = True  # a batch reads its requests from an uploaded JSONL file
    names_batches = True  # a batch keeps its metadata

    async def upload(self, key: ApiKey, name: str, data: bytes, timeout: float) -> str:
        uploaded = await self.client(key, timeout).files.create(file=(name, data), purpose="batch", timeout=timeout)
        return uploaded.id

    async def create_batch(self, key: ApiKey, endpoint: str, model: str, metadata: dict[str, str], timeout: float,
                           file_id: str | None = None,
                           requests: list[tuple[str, dict[str, Any]]] | None = None) -> Batch:
        if file_id is None:
            raise ValueError("OpenAI's Batch API reads its requests from an uploaded file")
        created = await self.client(key, timeout).batches.create(
            input_file_id=file_id, endpoint=endpoint, completion_window="24h", metadata=metadata,  # type: ignore[arg-type]
            timeout=timeout)
        return _batch(created)

    async def batch(self, key: ApiKey, batch_id: str, timeout: float) -> Batch:
        return _batch(await self.client(key, timeout).batches.retrieve(batch_id, timeout=timeout))

    async def cancel_batch(self, key: ApiKey, batch_id: str, timeout: float) -> None:
        await self.client(key, timeout).batches.cancel(batch_id, timeout=timeout)

    async def recent_batches(self, key: ApiKey, timeout: float) -> AsyncIterator[Batch]:
        async for found in self.client(key, timeout).batches.list(limit=100, timeout=timeout):
            yield _batch(found)

    async def results(self, key: ApiKey, batch: Batch, timeout: float) -> AsyncIterator[BatchEntry]:
        """The lines of the batch's output and error files (already :data:`BatchEntry`'s shape),
        each as it downloads (the SDK's streaming response)."""
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                files = self.client(key, timeout).files.with_streaming_response
                async with files.content(file_id, timeout=timeout) as response:
                    async for line in response.iter_lines():
                        if line.strip():
                            yield json.loads(line)

    def classify_response(self, status: int, body: Any) -> Failure:
        return classify_status(status, body, {}, json.dumps(body))

    async def _call_aiohttp(self, key: ApiKey, url: str, body: dict[str, Any], timeout: float,
                            on_send: Callable[[], None] | None) -> tuple[Any, dict[str, str]]:
        if key.azure is not None:
            raise ValueError("Azure keys need api_client \"openai\"")
        payload = json.dumps(body, ensure_ascii=False).encode()
        target = key.api_base.rstrip("/") + "/" + ENDPOINTS[url].path
        headers = {**dict(key.headers), "Authorization": "Bearer " + key.secret.get_secret_value(),
                   "Content-Type": "application/json"}
        async with self.pool.session().post(target, data=payload, headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=timeout),
                                       trace_request_ctx={"on_send": on_send}) as response:
            raw = await response.read()
            status, got = response.status, response.headers
        text = raw.decode("utf-8", errors="replace")
        if status >= 400:
            try:
                error_body = json.loads(text)
            except ValueError:
                error_body = None
            raise CallFailed(classify_status(status, error_body, got, text))
        return json_body(text), kept(got, KEPT_HEADERS)


async def _sdk_create(client: openai.AsyncOpenAI, url: str, body: dict[str, Any], timeout: float) -> Any:
    """One request through the SDK client's own ``post``, the call each endpoint's method makes,
    asking for the raw HTTP response: the client's authentication, base URL (Azure's deployment
    routes included), headers, error types and ``max_retries=0`` apply, while the typed parameter
    transform and response objects, which cost the worker more CPU than the HTTP exchange itself
    (docs/benchmarks.md), are skipped. The body is sent as the row gives it."""
    return await client.post("/" + ENDPOINTS[url].path, cast_to=_HttpResponse, body=body,
                             options={"timeout": timeout})


def _batch(sdk_batch: Any) -> Batch:
    errors = getattr(getattr(sdk_batch, "errors", None), "data", None) or []
    return Batch(id=sdk_batch.id, status=sdk_batch.status, input_file_id=getattr(sdk_batch, "input_file_id", None),
                 output_file_id=sdk_batch.output_file_id, error_file_id=sdk_batch.error_file_id,
                 created_at=float(sdk_batch.created_at or 0), metadata=dict(sdk_batch.metadata or {}),
                 errors=[(getattr(e, "code", None), getattr(e, "message", None)) for e in errors],
                 requests=int(getattr(getattr(sdk_batch, "request_counts", None), "total", 0) or 0))
