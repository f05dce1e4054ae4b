"""Anthropic's Messages API behind the provider seam, through the official ``anthropic`` SDK.

A row comes in the formats every provider takes (a seed row or an OpenAI chat body) and leaves as a
native Messages request (:func:`to_messages`): system and developer messages become the top-level
``system``, content parts their blocks (text, images by URL or base64), tool calls ``tool_use``
blocks and tool messages ``tool_result`` blocks; ``max_tokens``, which the API requires, comes
from the row, else the config's model, else :data:`DEFAULT_MAX_TOKENS`. A parameter that would
change what is asked and has no Messages equivalent (``n`` > 1, ``logprobs``) stops the job with
its name, before anything is paid; ones that only tune OpenAI's service (``seed``,
``service_tier``, penalties, ...) are left out.

The answer (``answers.read``, which knows a Messages response by its shape) becomes the same :class:`answers.Reply` as an OpenAI answer: the
text, ``finish_reason`` mapped (``end_turn`` -> ``stop``, ``max_tokens`` -> ``length``,
``tool_use`` -> ``tool_calls``), ``tool_use`` blocks as tool calls, usage in OpenAI's names
(prompt tokens = input + cache reads + cache writes, cached = cache reads) and the native body
kept (``native`` in the ``full`` format). ``stop_reason: refusal`` is a null with its reason.

Limits (https://docs.anthropic.com/en/api/rate-limits): requests, input tokens and output tokens
per minute, per organization and model, stated in ``anthropic-ratelimit-*`` headers (reset times
are RFC 3339 timestamps, remaining tokens rounded). The input-token window is the one opt-queue's
token window paces: Anthropic counts a request's input against it, not its ``max_tokens``.
Errors (https://docs.anthropic.com/en/api/errors): 429 ``rate_limit_error`` with ``retry-after``,
529 ``overloaded_error`` (a transient slow-down of the whole API, no attempt used), 401/403 and a
spent credit balance retire the key, ``prompt is too long`` is a context-length failure.

The batch lane's side (https://docs.anthropic.com/en/api/creating-message-batches): Message Batches
(``/v1/messages/batches``) take their requests inline, ``{"custom_id", "params"}`` each (custom ids
match ``^[a-zA-Z0-9_-]{1,64}$``), and keep no metadata; a batch is ``in_progress``, ``canceling``
or ``ended``, and once ended its results (``results_url``, JSONL, in any order) say of each request
``succeeded``, ``errored``, ``canceled`` or ``expired``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic

try:
    from httpx2 import Response as _HttpResponse  # the SDK's HTTP library
except ImportError:  # pragma: no cover - SDKs on httpx
    from httpx import Response as _HttpResponse  # type: ignore[no-redef]

from opt_queue.core import answers
from opt_queue.core.config import ApiKey
from opt_queue.core.request import CHAT_URL
from opt_queue.providers.base import (REQUIRED_MAX_TOKENS, Answer, Batch, BatchEntry, Failure, Kind, NotMappable,
                                      classify_first, classify_other, classify_sdk)
from opt_queue.providers.http import USER_AGENT, Http, json_body, kept, request_leaving, unreachable

DEFAULT_MAX_TOKENS = REQUIRED_MAX_TOKENS["anthropic"]
"""``max_tokens`` of a Messages request when neither the row nor the config's model gives one
(the engine sets it on the row: ``providers.REQUIRED_MAX_TOKENS``)."""
KEPT_HEADERS = ("anthropic-ratelimit-", "retry-after", "request-id")
REMAINING_ROUNDING = 1000
"""Anthropic states remaining tokens "rounded to the nearest thousand" (its rate-limits page)."""
DROPPED = frozenset({"seed", "service_tier", "presence_penalty", "frequency_penalty", "logit_bias", "store",
                     "parallel_tool_calls", "stream_options", "prompt_cache_key", "safety_identifier",
                     "reasoning_effort", "modalities", "verbosity", "prediction", "web_search_options", "audio"})
"""OpenAI parameters that tune OpenAI's service and have no Messages equivalent: left out."""


# -- the request --------------------------------------------------------------------------------
def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def _block(part: Any) -> dict[str, Any]:
    """One OpenAI content part as a Messages content block."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return {"type": "text", "text": part.get("text", "")}
    if kind == "image_url":
        url = (part.get("image_url") or {}).get("url", "") if isinstance(part.get("image_url"), dict) \
            else str(part.get("image_url") or "")
        if url.startswith("data:") and ";base64," in url:
            media, data = url[5:].split(";base64,", 1)
            return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise NotMappable(f"a content part of type {kind!r} has no equivalent in Anthropic's Messages API; "
                      f"send text or images to claude models")


def _content(content: Any) -> Any:
    if isinstance(content, list):
        return [_block(p) for p in content]
    return "" if content is None else str(content)


def _message(m: dict[str, Any]) -> dict[str, Any]:
    role = m.get("role")
    if role == "tool":
        return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": str(m.get("tool_call_id", "")),
                                             "content": _text_of(m.get("content"))}]}
    if role == "assistant" and m.get("tool_calls"):
        blocks: list[dict[str, Any]] = []
        text = _text_of(m.get("content"))
        if text:
            blocks.append({"type": "text", "text": text})
        for call in m["tool_calls"]:
            fn = call.get("function") or {}
            try:
                arguments = json.loads(fn.get("arguments") or "{}")
            except ValueError:
                arguments = {}
            blocks.append({"type": "tool_use", "id": call.get("id", ""), "name": fn.get("name", ""),
                           "input": arguments})
        return {"role": "assistant", "content": blocks}
    if role not in ("user", "assistant"):
        raise NotMappable(f"a message of role {role!r} has no equivalent in Anthropic's Messages API")
    return {"role": role, "content": _content(m.get("content"))}


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool.get("function") if tool.get("type") == "function" else None
    if not isinstance(fn, dict):
        raise NotMappable(f"a tool of type {tool.get('type')!r} has no equivalent in Anthropic's Messages API")
    out = {"name": fn.get("name", ""), "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if fn.get("description"):
        out["description"] = fn["description"]
    return out


def _tool_choice(choice: Any) -> dict[str, Any]:
    if isinstance(choice, dict):
        return {"type": "tool", "name": (choice.get("function") or {}).get("name", "")}
    return {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}.get(
        str(choice), {"type": "auto"})


def to_messages(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request (``POST /v1/messages``) from an OpenAI chat completions body."""
    if int(body.get("n") or 1) > 1:
        raise NotMappable("n > 1 has no equivalent in Anthropic's Messages API; remove \"n\" for claude models")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise NotMappable("logprobs have no equivalent in Anthropic's Messages API; remove them for claude models")
    messages = body.get("messages") or []
    system = [_text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    out: dict[str, Any] = {
        "model": body["model"],
        "max_tokens": int(body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS),
        "messages": [_message(m) for m in messages if m.get("role") not in ("system", "developer")],
    }
    if system:
        out["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p", "top_k", "metadata"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("tools"):
        out["tools"] = [_tool(t) for t in body["tools"]]
        if body.get("tool_choice") is not None:
            out["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("user") and "metadata" not in out:
        out["metadata"] = {"user_id": str(body["user"])}
    fmt = body.get("response_format") or {}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
        out["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    unknown = sorted(set(body) - DROPPED - {"model", "messages", "max_tokens", "max_completion_tokens", "n",
                                             "logprobs", "top_logprobs", "temperature", "top_p", "top_k",
                                             "metadata", "stop", "tools", "tool_choice", "user",
                                             "response_format", "stream"})
    if unknown:
        raise NotMappable(f"{', '.join(unknown)}: not a parameter opt-queue can map to Anthropic's Messages API; "
                          f"remove it for claude models")
    return out


# -- what the headers and errors say ------------------------------------------------------------
def _int(headers: Any, name: str) -> int | None:
    try:
        value = headers.get(name) if headers is not None else None
        return int(value) if value is not None else None
    except ValueError:
        return None


def server_limits(headers: Any) -> dict[str, int]:
    """``{"requests": n, "tokens": n, "output_tokens": n}``: the requests, input tokens and output
    tokens per minute the headers state."""
    out: dict[str, int] = {}
    for dim, name in (("requests", "anthropic-ratelimit-requests-limit"),
                      ("tokens", "anthropic-ratelimit-input-tokens-limit"),
                      ("output_tokens", "anthropic-ratelimit-output-tokens-limit")):
        value = _int(headers, name)
        if value is not None and value > 0:
            out[dim] = value
    return out


def token_window(headers: Any) -> tuple[int, int] | None:
    """``(input-tokens limit, remaining)`` as the server counted its window when the request arrived."""
    limit = _int(headers, "anthropic-ratelimit-input-tokens-limit")
    remaining = _int(headers, "anthropic-ratelimit-input-tokens-remaining")
    if not limit or limit <= 0 or remaining is None or remaining < 0:
        return None
    return limit, min(remaining, limit)


def output_window(headers: Any) -> tuple[int, int] | None:
    """``(output-tokens limit, remaining)`` as the response states them."""
    limit = _int(headers, "anthropic-ratelimit-output-tokens-limit")
    remaining = _int(headers, "anthropic-ratelimit-output-tokens-remaining")
    if not limit or limit <= 0 or remaining is None or remaining < 0:
        return None
    return limit, min(remaining, limit)


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def classify_status(status: int, body: Any, headers: Any, text: str = "") -> Failure:
    """Classify an error response of the Messages API by status, error type and message."""
    inner = body.get("error") if isinstance(body, dict) else None
    kind = inner.get("type") if isinstance(inner, dict) else None
    message = (inner.get("message") if isinstance(inner, dict) else None) or (text or "").strip()[:300] \
        or f"HTTP {status}"
    lowered = message.lower()
    limits = server_limits(headers)
    if status == 529 or kind == "overloaded_error":
        return Failure(Kind.SLOW_DOWN, message, status, "overloaded_error", retry_after=_retry_after(headers))
    if status == 429:
        return Failure(Kind.RATE_LIMITED, message, status, kind or "rate_limit_error",
                       retry_after=_retry_after(headers), server_limits=limits,
                       tokens="input tokens" in lowered or "input_tokens" in lowered,
                       output="output tokens" in lowered or "output_tokens" in lowered)
    if status in (401, 403) or kind == "billing_error" or "credit balance" in lowered:
        return Failure(Kind.KEY_DEAD, message, status, kind or "authentication_error", server_limits=limits)
    if status == 400 and ("prompt is too long" in lowered or "context window" in lowered):
        return Failure(Kind.TOO_LONG, message, status, "context_length_exceeded", server_limits=limits)
    if status == 404:
        return Failure(Kind.JOB_CONFIG, message, status, kind or "not_found_error", server_limits=limits)
    if status >= 500 or status in (408, 409):
        return Failure(Kind.TRANSIENT, message, status, kind or f"http_{status}", retry_after=_retry_after(headers))
    return Failure(Kind.BAD_ROW, message, status, kind or f"http_{status}", server_limits=limits)


ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
                "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
                "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529}
"""The HTTP status of each error type (https://docs.anthropic.com/en/api/errors): an errored
request of a batch states only its type."""
NOT_RUN = {"canceled": "batch_cancelled", "expired": "batch_expired"}


def _batch(sdk_batch: Any) -> Batch:
    """A Message Batch in the batch lane's words: ``ended`` is ``completed``, or ``cancelled`` /
    ``expired`` when it was cancelled or requests expired."""
    counts = sdk_batch.request_counts
    status = {"in_progress": "in_progress", "canceling": "cancelling"}.get(sdk_batch.processing_status)
    if status is None:
        status = "cancelled" if sdk_batch.cancel_initiated_at else "expired" if counts.expired else "completed"
    total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
    return Batch(id=sdk_batch.id, status=status, created_at=sdk_batch.created_at.timestamp(), requests=total,
                 native=sdk_batch.results_url)


def _entry(line: dict[str, Any]) -> BatchEntry:
    """A result line of a Message Batch as a :data:`~opt_queue.providers.base.BatchEntry`."""
    result = line.get("result") or {}
    kind = result.get("type")
    if kind == "succeeded":
        return {"custom_id": line.get("custom_id"), "error": None,
                "response": {"status_code": 200, "body": result.get("message"), "request_id": None}}
    if kind == "errored":
        body = result.get("error") or {}
        error_type = (body.get("error") or {}).get("type") if isinstance(body, dict) else None
        return {"custom_id": line.get("custom_id"), "error": None,
                "response": {"status_code": ERROR_STATUS.get(str(error_type), 500), "body": body, "request_id": None}}
    return {"custom_id": line.get("custom_id"), "response": None,
            "error": {"code": NOT_RUN.get(str(kind), f"batch_{kind}"), "message": f"the request was {kind} before it ran"}}


def classify(exc: BaseException) -> Failure:
    """What an exception of :meth:`AnthropicProvider.call` means."""
    return classify_first(exc, unreachable) or classify_sdk(exc, anthropic, classify_status) or classify_other(exc)


class AnthropicProvider:
    """Anthropic's Messages API on one event loop (a :class:`~opt_queue.providers.base.Provider`):
    one ``AsyncAnthropic`` per key and base URL, kept open, on the loop's shared connection pool,
    ``max_retries=0`` (the engine's policy is the only retry loop)."""

    def __init__(self, http: Http | None = None) -> None:
        self.pool = http or Http()
        self._http: Any = None
        self._clients: dict[tuple[str, str], anthropic.AsyncAnthropic] = {}

    def __repr__(self) -> str:
        return f"<AnthropicProvider clients={len(self._clients)}>"

    def warm_up(self) -> None:
        self.pool.session()

    def _sdk_http_client(self) -> Any:
        try:
            from anthropic._vendor.httpx_aiohttp import AiohttpTransport  # the SDK's own aiohttp transport
        except ImportError:
            return anthropic.DefaultAsyncHttpxClient(event_hooks={"request": [request_leaving]})
        return anthropic.DefaultAioHttpClient(transport=AiohttpTransport(client=self.pool.session()))

    def client(self, key: ApiKey, timeout: float) -> anthropic.AsyncAnthropic:
        ident = (key.fingerprint, key.api_base)
        found = self._clients.get(ident)
        if found is None:
            if self._http is None:
                self._http = self._sdk_http_client()
            found = anthropic.AsyncAnthropic(api_key=key.secret.get_secret_value(), base_url=key.api_base,
                                             max_retries=0, timeout=timeout, http_client=self._http,
                                             default_headers={"User-Agent": USER_AGENT, **dict(key.headers)})
            self._clients[ident] = found
        return found

    async def call(self, key: ApiKey, url: str, body: dict[str, Any], timeout: float,
                   on_send: Callable[[], None] | None = None) -> Answer:
        """Send one chat row as a Messages request with ``key``; its :class:`Answer`."""
        if url != CHAT_URL:
            raise NotMappable(f"Anthropic's API has no {url} endpoint; rows of claude models must be chat rows")
        native = to_messages(body)
        with self.pool.sending(on_send):
            raw = await self.client(key, timeout).post("/v1/messages", cast_to=_HttpResponse, body=native,
                                                       options={"timeout": timeout})
        data, headers = json_body(raw.text), kept(raw.headers, KEPT_HEADERS)
        return Answer(answers.read(url, data), data, request_id=headers.get("request-id"),
                      server_limits=server_limits(headers), token_window=token_window(headers),
                      token_rounding=REMAINING_ROUNDING, output_window=output_window(headers))

    def classify(self, exc: BaseException) -> Failure:
        return classify(exc)

    # -- Message Batches (the batch lane's side of the seam: ``base.BatchProvider``) -------------
    files = False  # the requests go with the create call
    names_batches = False  # a Message Batch keeps no metadata: a lost one is found by time and size

    async def upload(self, key: ApiKey, name: str, data: bytes, timeout: float) -> str:
        raise NotMappable("Message Batches take their requests inline, not from a file")

    async def create_batch(self, key: ApiKey, endpoint: str, model: str, metadata: dict[str, str], timeout: float,
                           file_id: str | None = None,
                           requests: list[tuple[str, dict[str, Any]]] | None = None) -> Batch:
        if endpoint != CHAT_URL:
            raise NotMappable(f"Anthropic's API has no {endpoint} endpoint; rows of claude models must be chat rows")
        params = [{"custom_id": custom_id, "params": to_messages(body)} for custom_id, body in requests or []]
        created = await self.client(key, timeout).messages.batches.create(requests=params,  # type: ignore[arg-type]
                                                                          timeout=timeout)
        return _batch(created)

    async def batch(self, key: ApiKey, batch_id: str, timeout: float) -> Batch:
        return _batch(await self.client(key, timeout).messages.batches.retrieve(batch_id, timeout=timeout))

    async def cancel_batch(self, key: ApiKey, batch_id: str, timeout: float) -> None:
        await self.client(key, timeout).messages.batches.cancel(batch_id, timeout=timeout)

    async def recent_batches(self, key: ApiKey, timeout: float) -> AsyncIterator[Batch]:
        async for found in self.client(key, timeout).messages.batches.list(limit=100, timeout=timeout):
            yield _batch(found)  # the most recently created first (the API's documentation)

    async def results(self, key: ApiKey, batch: Batch, timeout: float) -> AsyncIterator[BatchEntry]:
        """The batch's results file, streamed as the SDK's ``batches.results`` streams it (the
        batch's ``results_url``) but kept as the API wrote it: the answers' native bodies stay whole."""
        url = batch.native or (await self.batch(key, batch.id, timeout)).native
        if not url:
            raise anthropic.AnthropicError(f"batch {batch.id} has no results_url: it has not ended")
        raw = await self.client(key, timeout).get(url, cast_to=_HttpResponse, stream=True,
                                                  options={"headers": {"Accept": "application/binary"},
                                                           "timeout": timeout})
        try:
            async for line in raw.aiter_lines():
                if line.strip():
                    yield _entry(json.loads(line))
        finally:
            await raw.aclose()

    def classify_response(self, status: int, body: Any) -> Failure:
        return classify_status(status, body, {}, "")

    async def close(self) -> None:
        self._clients.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
