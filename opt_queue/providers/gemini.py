"""Google's Gemini API (``generateContent``) behind the provider seam, through the official
``google-genai`` SDK.

A row (a seed row or an OpenAI chat body) becomes a native ``generateContent`` request
(:func:`to_gemini`, the REST body: https://ai.google.dev/api/generate-content): system and
developer messages the ``systemInstruction``, ``assistant`` the ``model`` role, content parts their
``parts`` (text, ``inlineData`` for base64 images, ``fileData`` for URLs), tool calls
``functionCall`` parts and tool messages ``functionResponse`` parts; the parameters go to
``generationConfig`` (``max_tokens`` -> ``maxOutputTokens``, ``stop`` -> ``stopSequences``, ``n`` ->
``candidateCount``, a JSON schema -> ``responseJsonSchema``). The SDK sends it
(``should_return_http_response``: the raw body comes back, so the answer is read the same way in
both lanes and the native body is kept); its own retries are off.

The answer (``answers.read``, which knows a ``generateContent`` response by its shape) maps
``finishReason`` (``STOP`` -> ``stop``, ``MAX_TOKENS`` -> ``length``), ``functionCall`` parts to tool
calls, and usage (``promptTokenCount``, ``cachedContentTokenCount``, ``candidatesTokenCount`` +
``thoughtsTokenCount`` as output, the thoughts as reasoning). A prompt blocked by safety
(``promptFeedback.blockReason``) or an answer stopped for safety is a null with its reason.

Limits (https://ai.google.dev/gemini-api/docs/rate-limits) belong to the Google Cloud project and
model, not to a key: keys of one project form a ``group`` whose limits the user types (requests and
input tokens per minute, requests per day); the API sends no rate-limit headers. A 429
``RESOURCE_EXHAUSTED`` carries ``google.rpc.RetryInfo`` (the delay to honour) and
``google.rpc.QuotaFailure`` (the quota: per minute or per day, requests or input tokens, with its
value): the limiter learns a per-minute limit from it (https://ai.google.dev/gemini-api/docs/troubleshooting).

The batch lane's side is Batch Mode (https://ai.google.dev/gemini-api/docs/batch-mode):
``models/{model}:batchGenerateContent`` with the requests inline (each with ``metadata`` naming its
custom id; inline requests total at most 20 MB, so the lane's chunks for Gemini stay under that),
the batch named by its ``displayName`` (which the lane finds a lost batch by), ``batches/{id}`` to
look at it (``BATCH_STATE_PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ``CANCELLED``,
``EXPIRED``), ``batches/{id}:cancel``, and the answers inline in the finished batch
(``inlinedResponses``: a ``response`` or an ``error`` with a ``google.rpc.Code`` each).
"""

from __future__ import annotations

import json
import mimetypes
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from opt_queue.core import answers
from opt_queue.core.config import ApiKey
from opt_queue.core.request import CHAT_URL
from opt_queue.providers.base import (Answer, Batch, BatchEntry, Failure, Kind, NotMappable, classify_first,
                                      classify_other)
from opt_queue.providers.http import USER_AGENT, Http, json_body, unreachable

API_VERSION = "v1beta"
DROPPED = frozenset({"service_tier", "store", "user", "metadata", "parallel_tool_calls", "stream_options",
                     "prompt_cache_key", "safety_identifier", "logit_bias", "reasoning_effort", "modalities",
                     "verbosity", "prediction", "web_search_options", "audio", "stream"})
"""OpenAI parameters with no ``generateContent`` equivalent that do not change what is asked: left out."""
_CONFIG = {"temperature": "temperature", "top_p": "topP", "top_k": "topK", "seed": "seed",
           "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty",
           "top_logprobs": "logprobs"}


# -- the request --------------------------------------------------------------------------------
def _part(part: Any) -> dict[str, Any]:
    if isinstance(part, str):
        return {"text": part}
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return {"text": part.get("text", "")}
    if kind == "image_url":
        given = part.get("image_url")
        url = given.get("url", "") if isinstance(given, dict) else str(given or "")
        if url.startswith("data:") and ";base64," in url:
            media, data = url[5:].split(";base64,", 1)
            return {"inlineData": {"mimeType": media, "data": data}}
        return {"fileData": {"mimeType": mimetypes.guess_type(url)[0] or "image/jpeg", "fileUri": url}}
    raise NotMappable(f"a content part of type {kind!r} has no equivalent in the Gemini API; "
                      f"send text or images to gemini models")


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, list):
        return [_part(p) for p in content]
    return [{"text": "" if content is None else str(content)}]


def _contents(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names: dict[str, str] = {}  # tool call id -> function name (a functionResponse names its function)
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            continue
        if role == "tool":
            name = names.get(str(m.get("tool_call_id")), "tool")
            out.append({"role": "user", "parts": [{"functionResponse": {
                "name": name, "response": {"content": answers_text(m.get("content"))}}}]})
        elif role == "assistant":
            parts = [p for p in _parts(m.get("content")) if p.get("text") or "text" not in p]
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {}
                names[str(call.get("id"))] = fn.get("name", "")
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    args = {}
                parts.append({"functionCall": {"name": fn.get("name", ""), "args": args}})
            out.append({"role": "model", "parts": parts or [{"text": ""}]})
        elif role == "user":
            out.append({"role": "user", "parts": _parts(m.get("content"))})
        else:
            raise NotMappable(f"a message of role {role!r} has no equivalent in the Gemini API")
    return out


def answers_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def _tool_config(choice: Any) -> dict[str, Any]:
    if isinstance(choice, dict):
        return {"functionCallingConfig": {"mode": "ANY",
                                          "allowedFunctionNames": [(choice.get("function") or {}).get("name", "")]}}
    return {"functionCallingConfig": {"mode": {"auto": "AUTO", "required": "ANY", "none": "NONE"}.get(str(choice), "AUTO")}}


def to_gemini(body: dict[str, Any]) -> dict[str, Any]:
    """A ``generateContent`` request body (REST, camelCase) from an OpenAI chat completions body."""
    messages = body.get("messages") or []
    out: dict[str, Any] = {"contents": _contents(messages)}
    system = [answers_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    if system:
        out["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    config: dict[str, Any] = {}
    for name, native in _CONFIG.items():
        if body.get(name) is not None:
            config[native] = body[name]
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    if cap:
        config["maxOutputTokens"] = int(cap)
    if body.get("stop"):
        config["stopSequences"] = [body["stop"]] if isinstance(body["stop"], str) else list(body["stop"])
    if int(body.get("n") or 1) > 1:
        config["candidateCount"] = int(body["n"])
    if body.get("logprobs"):
        config["responseLogprobs"] = True
    fmt = body.get("response_format") or {}
    if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
        config["responseMimeType"] = "application/json"
        schema = (fmt.get("json_schema") or {}).get("schema")
        if schema:
            config["responseJsonSchema"] = schema
    if config:
        out["generationConfig"] = config
    if body.get("tools"):
        declarations = []
        for tool in body["tools"]:
            fn = tool.get("function") if tool.get("type") == "function" else None
            if not isinstance(fn, dict):
                raise NotMappable(f"a tool of type {tool.get('type')!r} has no equivalent in the Gemini API")
            declarations.append({k: v for k, v in (("name", fn.get("name", "")), ("description", fn.get("description")),
                                                   ("parameters", fn.get("parameters"))) if v is not None})
        out["tools"] = [{"functionDeclarations": declarations}]
        if body.get("tool_choice") is not None:
            out["toolConfig"] = _tool_config(body["tool_choice"])
    known = {"model", "messages", "max_tokens", "max_completion_tokens", "stop", "n", "logprobs",
             "response_format", "tools", "tool_choice", *_CONFIG}
    unknown = sorted(set(body) - known - DROPPED)
    if unknown:
        raise NotMappable(f"{', '.join(unknown)}: not a parameter opt-queue can map to the Gemini API; "
                          f"remove it for gemini models")
    return out


def sdk_config(native: dict[str, Any], raw: bool = True) -> types.GenerateContentConfig:
    """The SDK's config for a native request: its ``generationConfig`` flattened beside the
    system instruction and tools (the SDK nests them again on the wire), the raw response asked
    for (``raw``: a synchronous call)."""
    fields = {**native.get("generationConfig", {}),
              **{k: native[k] for k in ("systemInstruction", "tools", "toolConfig") if k in native}}
    if raw:
        fields["shouldReturnHttpResponse"] = True
    return types.GenerateContentConfig.model_validate(fields)


# -- Batch Mode ---------------------------------------------------------------------------------
STATES = {"JOB_STATE_PENDING": "validating", "JOB_STATE_QUEUED": "validating", "JOB_STATE_RUNNING": "in_progress",
          "JOB_STATE_UPDATING": "in_progress", "JOB_STATE_PAUSED": "in_progress",
          "JOB_STATE_SUCCEEDED": "completed", "JOB_STATE_PARTIALLY_SUCCEEDED": "completed",
          "JOB_STATE_FAILED": "failed", "JOB_STATE_CANCELLING": "cancelling", "JOB_STATE_CANCELLED": "cancelled",
          "JOB_STATE_EXPIRED": "expired"}
"""Batch Mode's states (as the SDK names them) in the batch lane's words."""
RPC_STATUS = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400,
              12: 501, 13: 500, 14: 503, 15: 500, 16: 401}
"""The HTTP status of each ``google.rpc.Code`` (an inline response's error states only its code)."""
RPC_NAME = {1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
            6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
            10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
            15: "DATA_LOSS", 16: "UNAUTHENTICATED"}
NAME_PREFIX = "opt-queue/"


def display_name(metadata: dict[str, str]) -> str:
    """A batch's display name from the lane's metadata (job, chunk, attempt's tag)."""
    return NAME_PREFIX + "/".join((metadata["opt_queue_job"], metadata["opt_queue_chunk"], metadata["opt_queue_tag"]))


def _metadata(name: str | None) -> dict[str, str]:
    if not name or not name.startswith(NAME_PREFIX):
        return {}
    parts = name[len(NAME_PREFIX):].rsplit("/", 2)
    if len(parts) != 3:
        return {}
    return dict(zip(("opt_queue_job", "opt_queue_chunk", "opt_queue_tag"), parts))


def _batch(job: Any) -> Batch:
    state = getattr(job.state, "value", job.state)
    error = getattr(job, "error", None)
    return Batch(id=job.name, status=STATES.get(str(state), "in_progress"),
                 created_at=job.create_time.timestamp() if job.create_time else 0.0,
                 metadata=_metadata(job.display_name), native=job,
                 errors=[(str(error.code), error.message)] if error is not None else [])


def _entry(number: int, item: Any) -> BatchEntry:
    """An inline response as a :data:`~opt_queue.providers.base.BatchEntry` (its custom id from its
    metadata, else its place: inline responses keep the requests' order)."""
    custom_id = (item.metadata or {}).get("custom_id", str(number))
    if item.error is not None:
        code = int(item.error.code or 2)
        body = {"error": {"code": RPC_STATUS.get(code, 500), "message": item.error.message or "",
                          "status": RPC_NAME.get(code, "UNKNOWN"), "details": item.error.details or []}}
        return {"custom_id": custom_id, "error": None,
                "response": {"status_code": RPC_STATUS.get(code, 500), "body": body, "request_id": None}}
    body = item.response.model_dump(mode="json", by_alias=True, exclude_none=True) if item.response else {}
    return {"custom_id": custom_id, "error": None,
            "response": {"status_code": 200, "body": body, "request_id": body.get("responseId")}}


# -- what errors say ----------------------------------------------------------------------------
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)s$")


def _details(body: Any) -> list[dict[str, Any]]:
    inner = body.get("error") if isinstance(body, dict) else None
    details = inner.get("details") if isinstance(inner, dict) else None
    return [d for d in details or [] if isinstance(d, dict)]


def retry_delay(body: Any) -> float | None:
    """``google.rpc.RetryInfo``'s ``retryDelay`` ("43s", "0.5s") in seconds."""
    for d in _details(body):
        if str(d.get("@type", "")).endswith("google.rpc.RetryInfo"):
            m = _DURATION.match(str(d.get("retryDelay", "")))
            if m:
                return float(m.group(1))
    return None


def quota_violations(body: Any) -> list[dict[str, Any]]:
    """``google.rpc.QuotaFailure``'s violations: which quota refused (``quotaId``, ``quotaValue``)."""
    return [v for d in _details(body) if str(d.get("@type", "")).endswith("google.rpc.QuotaFailure")
            for v in d.get("violations") or [] if isinstance(v, dict)]


def _reason(body: Any) -> str | None:
    for d in _details(body):
        if str(d.get("@type", "")).endswith("google.rpc.ErrorInfo"):
            return str(d.get("reason") or "") or None
    return None


def classify_status(status: int, body: Any, text: str = "") -> Failure:
    """Classify an error of the Gemini API by status, ``error.status`` and its details."""
    inner = body.get("error") if isinstance(body, dict) else None
    code = str(inner.get("status")) if isinstance(inner, dict) and inner.get("status") else None
    message = (inner.get("message") if isinstance(inner, dict) else None) or (text or "").strip()[:300] \
        or f"HTTP {status}"
    lowered = message.lower()
    if status == 429:
        violations = quota_violations(body)
        quota = " ".join(str(v.get("quotaId", "")) for v in violations)
        limits: dict[str, int] = {}
        for v in violations:
            qid = str(v.get("quotaId", ""))
            try:
                value = int(v.get("quotaValue"))
            except (TypeError, ValueError):
                continue
            if value == 0:
                return Failure(Kind.KEY_DEAD, f"{message} (this project has no quota {qid})", status,
                               "no_quota")
            if "PerMinute" in qid:
                limits["tokens" if "Token" in qid else "requests"] = value
        delay = retry_delay(body)
        if "PerDay" in quota and not limits:
            delay = max(delay or 0.0, 60.0)  # a day's quota: look again in a minute at the soonest
        return Failure(Kind.RATE_LIMITED, message, status, code or "RESOURCE_EXHAUSTED", retry_after=delay,
                       server_limits=limits, tokens="Token" in quota)
    if _reason(body) in ("API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED") or status in (401, 403) \
            or code == "FAILED_PRECONDITION":
        return Failure(Kind.KEY_DEAD, message, status, _reason(body) or code or "PERMISSION_DENIED")
    if status == 400 and ("token count" in lowered and "exceeds" in lowered):
        return Failure(Kind.TOO_LONG, message, status, "context_length_exceeded")
    if status == 404:
        return Failure(Kind.JOB_CONFIG, message, status, code or "NOT_FOUND")
    if status == 503 and "overloaded" in lowered:
        return Failure(Kind.SLOW_DOWN, message, status, "overloaded", retry_after=retry_delay(body))
    if status >= 500 or status in (408, 409):
        return Failure(Kind.TRANSIENT, message, status, code or f"http_{status}", retry_after=retry_delay(body))
    return Failure(Kind.BAD_ROW, message, status, code or f"http_{status}")


def classify(exc: BaseException) -> Failure:
    """What an exception of :meth:`GeminiProvider.call` means."""
    first = classify_first(exc, unreachable)
    if first is not None:
        return first
    if isinstance(exc, genai_errors.APIError):
        body = exc.details if isinstance(exc.details, dict) else None
        return classify_status(int(exc.code or 500), body, str(exc.message or ""))
    return classify_other(exc)


class GeminiProvider:
    """The Gemini API on one event loop (a :class:`~opt_queue.providers.base.Provider`): one
    ``genai.Client`` per key and base URL, on the loop's shared aiohttp session, retries off."""

    def __init__(self, http: Http | None = None) -> None:
        self.pool = http or Http()
        self._clients: dict[tuple[str, str, float], genai.Client] = {}

    def __repr__(self) -> str:
        return f"<GeminiProvider clients={len(self._clients)}>"

    def warm_up(self) -> None:
        self.pool.session()

    def client(self, key: ApiKey, timeout: float) -> genai.Client:
        ident = (key.fingerprint, key.api_base, timeout)
        found = self._clients.get(ident)
        if found is None:
            options = types.HttpOptions(base_url=key.api_base, api_version=API_VERSION, timeout=int(timeout * 1000),
                                        retry_options=types.HttpRetryOptions(attempts=1),
                                        headers={"User-Agent": USER_AGENT, **dict(key.headers)},
                                        aiohttp_client=self.pool.session())
            found = self._clients[ident] = genai.Client(api_key=key.secret.get_secret_value(), http_options=options)
        return found

    async def call(self, key: ApiKey, url: str, body: dict[str, Any], timeout: float,
                   on_send: Callable[[], None] | None = None) -> Answer:
        """Send one chat row as a ``generateContent`` request with ``key``; its :class:`Answer`."""
        if url != CHAT_URL:
            raise NotMappable(f"opt-queue sends only chat rows to the Gemini API, not {url}")
        native = to_gemini(body)
        with self.pool.sending(on_send):
            got = await self.client(key, timeout).aio.models.generate_content(
                model=body["model"], contents=native["contents"], config=sdk_config(native))
        raw = got.sdk_http_response
        data = json_body(raw.body or "") if raw is not None else None
        reply = answers.read(url, data)
        # the project's token window counts input tokens as billed: the usage is an exact reading
        return Answer(reply, data, request_id=(data or {}).get("responseId"),
                      prompt_counted=reply.prompt_tokens or None)

    def classify(self, exc: BaseException) -> Failure:
        return classify(exc)

    # -- Batch Mode (the batch lane's side of the seam: ``base.BatchProvider``) ------------------
    files = False  # inline requests (at most 20 MB a batch)
    names_batches = True  # by its display name

    async def upload(self, key: ApiKey, name: str, data: bytes, timeout: float) -> str:
        raise NotMappable("opt-queue sends Gemini batches' requests inline, not from a file")

    async def create_batch(self, key: ApiKey, endpoint: str, model: str, metadata: dict[str, str], timeout: float,
                           file_id: str | None = None,
                           requests: list[tuple[str, dict[str, Any]]] | None = None) -> Batch:
        if endpoint != CHAT_URL:
            raise NotMappable(f"opt-queue sends only chat rows to the Gemini API, not {endpoint}")
        inline = []
        for custom_id, body in requests or []:
            native = to_gemini(body)
            inline.append(types.InlinedRequest(contents=native["contents"], config=sdk_config(native, raw=False),
                                               metadata={"custom_id": custom_id}))
        created = await self.client(key, timeout).aio.batches.create(
            model=model, src=inline, config=types.CreateBatchJobConfig(display_name=display_name(metadata)))
        return _batch(created)

    async def batch(self, key: ApiKey, batch_id: str, timeout: float) -> Batch:
        return _batch(await self.client(key, timeout).aio.batches.get(name=batch_id))

    async def cancel_batch(self, key: ApiKey, batch_id: str, timeout: float) -> None:
        await self.client(key, timeout).aio.batches.cancel(name=batch_id)

    async def recent_batches(self, key: ApiKey, timeout: float) -> AsyncIterator[Batch]:
        pager = await self.client(key, timeout).aio.batches.list(config=types.ListBatchJobsConfig(page_size=100))
        async for job in pager:
            yield _batch(job)

    async def results(self, key: ApiKey, batch: Batch, timeout: float) -> AsyncIterator[BatchEntry]:
        """The inline responses, which come with the batch (inline batches are 20 MB at most)."""
        job = batch.native if batch.native is not None else (await self.batch(key, batch.id, timeout)).native
        responses = (job.dest.inlined_responses if job.dest is not None else None) or []
        for number, item in enumerate(responses):
            yield _entry(number, item)

    def classify_response(self, status: int, body: Any) -> Failure:
        return classify_status(status, body)

    async def close(self) -> None:
        self._clients.clear()  # their HTTP is the shared session, closed with it
