"""The simulated API's Gemini endpoint (``POST /v1beta/models/{model}:generateContent``), for the
gemini provider's tests and ``demo``.

It follows Google's documentation where opt-queue relies on it:

- authentication by ``x-goog-api-key`` (or ``?key=``); an unknown key is a 400
  ``INVALID_ARGUMENT`` with ``google.rpc.ErrorInfo`` reason ``API_KEY_INVALID``
  (https://ai.google.dev/gemini-api/docs/troubleshooting);
- limits per Google Cloud **project** (a key's ``org``) and model, never per key: requests and
  input tokens per minute, requests per day (https://ai.google.dev/gemini-api/docs/rate-limits).
  No rate-limit headers. A refusal is a 429 ``RESOURCE_EXHAUSTED`` whose details hold a
  ``google.rpc.QuotaFailure`` (the ``quotaId`` and its ``quotaValue``) and a
  ``google.rpc.RetryInfo`` (``retryDelay``, when the window frees);
- a prompt past the model's context is a 400 ``The input token count (N) exceeds the maximum
  number of tokens allowed (M).``; an unknown model a 404 ``NOT_FOUND``; 500 ``INTERNAL`` at
  ``transient_rate``; 503 ``UNAVAILABLE`` "The model is overloaded" at ``overloaded_rate``.

Batch Mode (https://ai.google.dev/gemini-api/docs/batch-mode): ``POST
/v1beta/models/{model}:batchGenerateContent`` with inline requests (each with its ``metadata``), an
operation named ``batches/{id}`` whose ``metadata`` holds the batch (``displayName``, ``state``
``BATCH_STATE_RUNNING`` / ``SUCCEEDED`` / ``CANCELLED`` / ``EXPIRED``, and once it ended its
``output.inlinedResponses``: a ``response`` or an ``error`` with a ``google.rpc.Code`` each, the
requests' order and metadata kept; requests the batch never ran have none), ``GET
/v1beta/batches/{id}``, ``GET /v1beta/batches`` (``pageSize``, ``pageToken``) and ``POST
/v1beta/batches/{id}:cancel``. Batches run as the simulated Batch API's do (``batch.SimBatches``);
rate limits do not apply to them.

Answers are those of the OpenAI endpoints for the same conversation (system instruction first,
``model`` turns as ``assistant``). A prompt containing ``UNSAFE`` is blocked
(``promptFeedback.blockReason: SAFETY``), one whose last turn contains ``REFUSE`` stops with
``finishReason: SAFETY``; ``tools`` get a ``functionCall``; ``gemini-2.5-*`` models report
``thoughtsTokenCount``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import time
from typing import Any

from aiohttp import web

from opt_queue.core.config import fingerprint
from opt_queue.core.request import CHAT_URL
from opt_queue.sim.common import Windows, _schema_instance, count_tokens, prompt_key, sim_answer

GEMINI_MODELS = {"gemini-2.5-flash": 1_048_576, "gemini-2.5-pro": 1_048_576, "gemini-2.0-flash": 1_048_576}
QUOTAS = {"requests per min (RPM)": ("GenerateRequestsPerMinutePerProjectPerModel", "rpm"),
          "tokens per min (TPM)": ("GenerateContentInputTokensPerModelPerMinute", "tpm"),
          "requests per day (RPD)": ("GenerateRequestsPerDayPerProjectPerModel", "rpd")}
"""The windows of :class:`~opt_queue.sim.common.Windows` as the Gemini API names their quotas."""
STATES = {"in_progress": "BATCH_STATE_RUNNING", "cancelling": "BATCH_STATE_RUNNING",
          "completed": "BATCH_STATE_SUCCEEDED", "cancelled": "BATCH_STATE_CANCELLED", "expired": "BATCH_STATE_EXPIRED"}
RPC_CODES = {400: 3, 403: 7, 404: 5, 429: 8, 500: 13, 503: 14}
"""``google.rpc.Code`` of an HTTP status, as an inline response's error states it."""


class Refused(Exception):
    """A request the Gemini API refuses: its status, ``error.status`` and message (and details)."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details

    def response(self) -> web.Response:
        return error(self.status, self.code, self.message, self.details)


def _time(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _text(parts: Any) -> str:
    return "".join(p.get("text", "") for p in parts or [] if isinstance(p, dict))


def conversation(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A ``generateContent`` request as OpenAI-style messages (the system instruction first)."""
    system = (body.get("systemInstruction") or {}).get("parts") if isinstance(body.get("systemInstruction"), dict) else None
    out = [{"role": "system", "content": _text(system)}] if system else []
    return out + [{"role": "assistant" if c.get("role") == "model" else "user", "content": _text(c.get("parts"))}
                  for c in body.get("contents") or [] if isinstance(c, dict)]


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Refused(400, "INVALID_ARGUMENT", "Invalid JSON payload received.") from None


def error(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message, "status": code,
                                        **({"details": details} if details else {})}}, status=status)


class SimGemini:
    """``generateContent`` on a :class:`~opt_queue.sim.api.SimAPI` (its keys, counters, latency)."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.windows: dict[tuple[str, str], Windows] = {}
        self.admitted = 0  # calls past the limits (overloaded_every counts them)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{call}", self.create)
        app.router.add_get("/v1beta/batches", self.list_batches)
        app.router.add_get("/v1beta/batches/{id}", self.retrieve_batch)
        app.router.add_post("/v1beta/batches/{call}", self.cancel_batch)

    def _key(self, request: web.Request) -> Any:
        """The key a request authenticates with (a Refused: the error the API answers)."""
        secret = request.headers.get("x-goog-api-key") or request.query.get("key", "")
        self.api.calls_per_key[fingerprint(secret)] += 1
        k = self.api.key(secret)
        if k is None or k.dead == "invalid":
            raise Refused(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}])
        if k.dead in ("forbidden", "quota"):
            raise Refused(403, "PERMISSION_DENIED", "Permission denied: Consumer has been suspended.")
        return k

    def read(self, model: str, body: Any) -> tuple[Any, list[dict[str, Any]], int]:
        """A ``generateContent`` request as the simulated API reads it, ``(req, conversation,
        maxOutputTokens)`` (a Refused: the API refuses it)."""
        cfg = self.api.config
        if model not in cfg.models:
            raise Refused(404, "NOT_FOUND", f"models/{model} is not found for API version v1beta, or is not "
                                            f"supported for generateContent.")
        if not isinstance(body, dict) or not body.get("contents"):
            raise Refused(400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified")
        said = conversation(body)
        cap = int((body.get("generationConfig") or {}).get("maxOutputTokens") or 0)
        req = self.api.read_request(CHAT_URL, {"model": model, "messages": said, "max_tokens": cap},
                                    model, cfg.usage_count, cfg.limit_count)
        if req.prompt_tokens > cfg.models[model]:
            raise Refused(400, "INVALID_ARGUMENT", f"The input token count ({req.prompt_tokens}) exceeds the "
                                                   f"maximum number of tokens allowed ({cfg.models[model]}).")
        return req, said, cap

    async def create(self, request: web.Request) -> web.StreamResponse:
        api, cfg = self.api, self.api.config
        model, _, method = request.match_info["call"].partition(":")
        if method == "batchGenerateContent":
            return await self.create_batch(request, model)
        if method != "generateContent":
            return error(404, "NOT_FOUND", f"Method {method or 'none'} is not found.")
        api.called()
        try:
            k = self._key(request)
            body = await _json(request)
            api.record(body, _url="generateContent", model=model)
            req, said, cap = self.read(model, body)
        except Refused as refused:
            return refused.response()
        now = time.monotonic()
        win = self.windows.setdefault((k.org or k.key, model), Windows())
        limits = k.limits(model)
        refused = win.check(now, req.limit_prompt, limits, cfg)  # input tokens only, on arrival
        if refused is not None:
            return self._exhausted(model, limits, *refused)
        win.admit(now, req.limit_prompt)
        scope = f"{k.org or fingerprint(k.key)}/{model}"
        api.peak_window_tokens[scope] = max(api.peak_window_tokens[scope],
                                            sum(t for ts, t in win.log if ts > now - cfg.minute))
        roll = api.rng.random()
        self.admitted += 1
        if roll < cfg.overloaded_rate or (cfg.overloaded_every and self.admitted % cfg.overloaded_every == 0):
            api.faults["overloaded"] += 1
            return error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        if roll < cfg.overloaded_rate + cfg.transient_rate:
            api.faults["transient"] += 1
            return error(500, "INTERNAL", "An internal error has occurred. Please retry or report in "
                                          "https://developers.generativeai.google/guide/troubleshooting")
        delay = cfg.latency + (api.rng.uniform(0, cfg.latency_jitter) if cfg.latency_jitter else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        api.answered += 1
        api.prompt_tokens_billed += req.prompt_tokens
        api.last_answer = time.monotonic()
        api.paid(req)
        api.per_key[fingerprint(k.key)] += 1
        return web.json_response(self._answer(model, body, req, said, cap),
                                 dumps=lambda o: json.dumps(o, ensure_ascii=False))

    # -- Batch Mode ---------------------------------------------------------------------------------
    def _answerer(self, model: str) -> Any:
        def answer(number: int, body: dict[str, Any]) -> tuple[int, dict[str, Any], Any]:
            try:
                req, said, cap = self.read(model, body)
            except Refused as refused:
                return refused.status, {"code": RPC_CODES.get(refused.status, 2), "message": refused.message}, None
            return 200, self._answer(model, body, req, said, cap), req
        return answer

    def _public(self, batch: Any) -> dict[str, Any]:
        """The batch as the API returns it: a long-running operation whose metadata is the batch."""
        ended = batch.status in ("completed", "expired", "cancelled")
        meta: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": f"models/{batch.model}", "displayName": (batch.metadata or {}).get("displayName", ""),
            "state": STATES.get(batch.status, "BATCH_STATE_PENDING"), "name": f"batches/{batch.id}",
            "createTime": _time(batch.created_at), "updateTime": _time(batch.ended_at or batch.created_at),
            "batchStats": {"requestCount": str(len(batch.lines)),
                           "pendingRequestCount": str(0 if ended else len(batch.lines))}}
        if ended:
            meta["endTime"] = _time(batch.ended_at)
            responses = []
            for result, line in zip(batch.results, batch.lines):
                if result.status is None:
                    continue  # the batch ended before it ran
                entry: dict[str, Any] = {"metadata": line.get("metadata") or {}}
                if result.status == 200:
                    entry["response"] = result.body
                else:
                    entry["error"] = result.body
                responses.append(entry)
            meta["output"] = {"inlinedResponses": {"inlinedResponses": responses}}
        return {"name": f"batches/{batch.id}", "metadata": meta, "done": ended}

    def _batch(self, request: web.Request, batch_id: str) -> Any:
        k = self._key(request)
        batch = self.api.batches.batches.get(batch_id)
        if batch is None or batch.kind != "gemini" or batch.org != (k.org or k.key):
            raise Refused(404, "NOT_FOUND", f"Batch batches/{batch_id} not found.")
        self.api.batches.advance(batch)
        return batch

    async def create_batch(self, request: web.Request, model: str) -> web.Response:
        try:
            k = self._key(request)
            body = await _json(request)
            if model not in self.api.config.models:
                raise Refused(404, "NOT_FOUND", f"models/{model} is not found for API version v1beta.")
            spec = (body or {}).get("batch") if isinstance(body, dict) else None
            inline = (((spec or {}).get("inputConfig") or {}).get("requests") or {}).get("requests")
            if not isinstance(inline, list) or not inline:
                raise Refused(400, "INVALID_ARGUMENT", "* batch.input_config: requests is not specified")
            if len(inline) > self.api.config.batch_max_lines:
                raise Refused(400, "INVALID_ARGUMENT", f"a batch holds at most {self.api.config.batch_max_lines} requests")
        except Refused as refused:
            return refused.response()
        lines = [{"custom_id": str((r.get("metadata") or {}).get("custom_id", n)), "body": r.get("request") or {},
                  "metadata": r.get("metadata")} for n, r in enumerate(inline)]
        batch = self.api.batches.start("gemini", k.org or k.key, model, lines, self._answerer(model), "gbatch",
                                       metadata={"displayName": str(spec.get("displayName") or "")})
        return web.json_response(self._public(batch))

    async def list_batches(self, request: web.Request) -> web.Response:
        try:
            k = self._key(request)
        except Refused as refused:
            return refused.response()
        mine = self.api.batches.mine(k.org or k.key, "gemini")
        first = int(request.query.get("pageToken") or 0)
        size = int(request.query.get("pageSize") or 50)
        page = mine[first:first + size]
        out: dict[str, Any] = {"operations": [self._public(b) for b in page]}
        if first + size < len(mine):
            out["nextPageToken"] = str(first + size)
        return web.json_response(out)

    async def retrieve_batch(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self._public(self._batch(request, request.match_info["id"])))
        except Refused as refused:
            return refused.response()

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch_id, _, method = request.match_info["call"].partition(":")
        if method != "cancel":
            return error(404, "NOT_FOUND", f"Method {method or 'none'} is not found.")
        try:
            batch = self._batch(request, batch_id)
        except Refused as refused:
            return refused.response()
        self.api.batches.ask_cancel(batch)
        self.api.batches.advance(batch)
        return web.json_response({})

    def _exhausted(self, model: str, limits: Any, what: str, wait: float) -> web.Response:
        api = self.api
        api.rate_limited += 1
        api.refusals[what] += 1
        quota, field = QUOTAS[what]
        return error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan and billing "
                                                "details. For more information on this error, head to: "
                                                "https://ai.google.dev/gemini-api/docs/rate-limits.", [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                {"quotaMetric": "generativelanguage.googleapis.com/generate_content_paid_tier_requests",
                 "quotaId": quota, "quotaDimensions": {"location": "global", "model": model},
                 "quotaValue": str(getattr(limits, field))}]},
            {"@type": "type.googleapis.com/google.rpc.Help",
             "links": [{"description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{max(1, math.ceil(wait))}s"}])

    def _answer(self, model: str, body: dict[str, Any], req: Any, said: list[dict[str, Any]], cap: int) -> dict:
        usage = {"promptTokenCount": req.prompt_tokens}
        last = said[-1]["content"] if said else ""
        if any("UNSAFE" in m["content"] for m in said):
            return {"promptFeedback": {"blockReason": "SAFETY"},
                    "usageMetadata": {**usage, "totalTokenCount": req.prompt_tokens}, "modelVersion": model}
        finish = "STOP"
        if "REFUSE" in last:
            candidate: dict[str, Any] = {"finishReason": "SAFETY", "index": 0,
                                         "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                                                            "probability": "HIGH", "blocked": True}]}
            written = 0
        else:
            if body.get("tools"):
                fn = ((body["tools"][0].get("functionDeclarations") or [{}])[0]).get("name", "tool")
                parts: list[dict[str, Any]] = [{"functionCall": {"name": fn, "args": {"text": last[:40]}}}]
            else:
                text = sim_answer(model, said)
                config = body.get("generationConfig") or {}
                if config.get("responseMimeType") == "application/json":
                    text = json.dumps(_schema_instance(config.get("responseJsonSchema"), text)
                                      if config.get("responseJsonSchema") else {"answer": text}, ensure_ascii=False)
                elif cap and count_tokens(text) > cap:
                    text, finish = text[: 4 * cap], "MAX_TOKENS"
                parts = [{"text": text}]
            written = sum(count_tokens(p.get("text") or json.dumps(p.get("functionCall"))) for p in parts)
            candidate = {"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}
        thoughts = 2 * written if model.startswith("gemini-2.5") and written else 0
        usage.update(candidatesTokenCount=written, totalTokenCount=req.prompt_tokens + written + thoughts)
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model,
                "responseId": "sim" + prompt_key(said)[:12]}
