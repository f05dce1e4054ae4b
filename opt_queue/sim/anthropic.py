"""The simulated API's Anthropic Messages endpoint (``POST /v1/messages``), for the anthropic
provider's tests and ``demo``.

It follows Anthropic's documentation where opt-queue relies on it:

- authentication by ``x-api-key`` (or ``Authorization: Bearer``, which the ``anthropic`` SDK 2.x
  sends) with an ``anthropic-version`` header (https://docs.anthropic.com/en/api/overview); ``max_tokens``, ``messages`` and a known ``model``
  required, a top-level ``system``, content blocks (text, image, tool_use, tool_result);
- rate limits per organization (or key) and model (https://docs.anthropic.com/en/api/rate-limits):
  requests, **input** tokens and **output** tokens per minute, each its own window. Input tokens
  count on arrival (cache reads do not count); output tokens count either as ``max_tokens`` on
  arrival, adjusted to the real output at the end (``anthropic_output_count: "max_tokens"``), or
  only as written (``"actual"``): the documentation has said both. Every answer and every 429 carry
  ``anthropic-ratelimit-{requests,input-tokens,output-tokens,tokens}-{limit,remaining,reset}``,
  resets as RFC 3339 timestamps, remaining tokens rounded to ``anthropic_token_rounding``, stating
  the windows as the request left them on arrival or, ``anthropic_headers_at: "end"``, once its
  output was counted as written (the documentation does not say which);
- errors (https://docs.anthropic.com/en/api/errors) as ``{"type": "error", "error": {"type",
  "message"}}``: 401 ``authentication_error``, 400 ``invalid_request_error`` (``prompt is too
  long`` past the model's context), 404 ``not_found_error``, 429 ``rate_limit_error`` with
  ``retry-after``, 500 ``api_error`` at ``transient_rate``, 529 ``overloaded_error`` at
  ``overloaded_rate``; a ``request-id`` header.

Message Batches (https://docs.anthropic.com/en/api/creating-message-batches): ``POST
/v1/messages/batches`` (``requests`` of ``{"custom_id", "params"}``, custom ids matching
``^[a-zA-Z0-9_-]{1,64}$`` and unique, each ``params`` checked when the batch runs, as the API does:
an invalid one is an ``errored`` result), ``GET`` it, list them newest first (``limit``,
``after_id``), ``POST .../cancel``, and ``GET .../results`` (JSONL, once ``ended``: ``succeeded``,
``errored``, ``canceled``, ``expired``). Batches run as the simulated Batch API's do
(``batch_delay``, ``batch_expire_after``, ``batch_cancel_delay``: ``batch.SimBatches``); rate limits
do not apply to them.

Answers are those of the OpenAI endpoints for the same conversation (:func:`conversation` gives
the messages :func:`~opt_queue.sim.api.sim_answer` takes); a last message containing ``REFUSE``
gets ``stop_reason: "refusal"``, a request with ``tools`` a ``tool_use`` block.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import re
import time
from collections import deque
from typing import Any

from aiohttp import web

from opt_queue.core.config import fingerprint
from opt_queue.core.request import CHAT_URL
from opt_queue.sim.common import _schema_instance, count_tokens, prompt_key, sim_answer

CLAUDE_MODELS = {"claude-sonnet-4-5": 200_000, "claude-haiku-4-5": 200_000, "claude-opus-4-1": 200_000}
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
RESULT_TYPES = {"batch_expired": "expired", "batch_cancelled": "canceled"}


class Refused(Exception):
    """A request the Messages API refuses: its status, error type and message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.kind, "message": self.message}}


def _rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") if b.get("type") == "text" else
                       _text(b.get("content")) if b.get("type") == "tool_result" else ""
                       for b in content if isinstance(b, dict))
    return ""


def conversation(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A Messages request as OpenAI-style messages (``system`` first), to answer and count it."""
    out = [{"role": "system", "content": _text(body["system"])}] if body.get("system") else []
    return out + [{"role": m.get("role"), "content": _text(m.get("content"))} for m in body.get("messages") or []]


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Refused(400, "invalid_request_error",
                      "There was an issue with the format or content of your request.") from None


def error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}}, status=status)


class _Windows:
    """One organization's model: requests, input tokens and output tokens over the last minute."""

    def __init__(self) -> None:
        self.log: deque[list[float]] = deque()  # [arrival, input tokens, output tokens charged]

    def expire(self, now: float, minute: float) -> None:
        while self.log and self.log[0][0] <= now - minute:
            self.log.popleft()

    def used(self) -> tuple[int, int, int]:
        return len(self.log), int(sum(e[1] for e in self.log)), int(sum(e[2] for e in self.log))


class SimMessages:
    """``POST /v1/messages`` on a :class:`~opt_queue.sim.api.SimAPI` (its keys, counters, latency)."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.windows: dict[tuple[str, str], _Windows] = {}
        self.calls = 0
        self.admitted = 0  # calls past the limits (overloaded_every counts them)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self.create)
        app.router.add_post("/v1/messages/batches", self.create_batch)
        app.router.add_get("/v1/messages/batches", self.list_batches)
        app.router.add_get("/v1/messages/batches/{id}", self.retrieve_batch)
        app.router.add_post("/v1/messages/batches/{id}/cancel", self.cancel_batch)
        app.router.add_get("/v1/messages/batches/{id}/results", self.batch_results)

    def _key(self, request: web.Request) -> Any:
        """The key a request authenticates with (a Refused: the error the API answers)."""
        secret = (request.headers.get("x-api-key", "").strip()  # the documented header; SDK 2.x sends
                  or request.headers.get("Authorization", "").removeprefix("Bearer ").strip())  # a bearer
        self.api.calls_per_key[fingerprint(secret)] += 1
        k = self.api.key(secret)
        if k is None or k.dead in ("invalid", "forbidden"):
            raise Refused(401, "authentication_error", "invalid x-api-key")
        if k.dead == "quota":
            raise Refused(400, "invalid_request_error", "Your credit balance is too low to access the Anthropic "
                                                        "API. Please go to Plans & Billing to upgrade or purchase credits.")
        if not request.headers.get("anthropic-version"):
            raise Refused(400, "invalid_request_error", "anthropic-version: header is required")
        return k

    def read(self, body: Any) -> tuple[Any, list[dict[str, Any]]]:
        """A Messages request as the simulated API reads it, ``(req, conversation)`` (a Refused:
        the API refuses it)."""
        cfg = self.api.config
        model = body.get("model") if isinstance(body, dict) else None
        if model not in cfg.models:
            raise Refused(404, "not_found_error", f"model: {model}")
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            raise Refused(400, "invalid_request_error", "max_tokens: Field required")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise Refused(400, "invalid_request_error", "messages: Field required")
        said = conversation(body)
        req = self.api.read_request(CHAT_URL, {"model": model, "messages": said, "max_tokens": body["max_tokens"]},
                                    model, cfg.usage_count, cfg.limit_count)
        if req.prompt_tokens + body["max_tokens"] > cfg.models[model]:
            raise Refused(400, "invalid_request_error", f"prompt is too long: {req.prompt_tokens} tokens > "
                                                        f"{cfg.models[model] - body['max_tokens']} maximum")
        return req, said

    async def create(self, request: web.Request) -> web.StreamResponse:
        api, cfg = self.api, self.api.config
        api.called()
        self.calls += 1
        try:
            k = self._key(request)
            body = await _json(request)
            api.record(body, _url="/v1/messages")
            req, said = self.read(body)
        except Refused as refused:
            return error(refused.status, refused.kind, refused.message)
        model = body["model"]
        now = time.monotonic()
        win = self.windows.setdefault((k.org or k.key, model), _Windows())
        win.expire(now, cfg.minute)
        limits = k.limits(model)
        charge = body["max_tokens"] if cfg.anthropic_output_count == "max_tokens" else 0
        refused = self._refused(limits, win, req.limit_prompt, charge)
        if refused is not None:
            api.rate_limited += 1
            api.refusals[refused] += 1
            wait = self._wait(win, now, cfg.minute)
            resp = error(429, "rate_limit_error", f"This request would exceed the rate limit for your organization "
                                                  f"of {self._limit_of(limits, refused)} {refused}. For details, "
                                                  f"refer to: https://docs.claude.com/en/api/rate-limits.")
            resp.headers["retry-after"] = str(max(1, math.ceil(wait)))
            resp.headers.update(self._headers(limits, win, now))
            return resp
        entry = [now, float(req.limit_prompt), float(charge)]
        win.log.append(entry)
        seen = self._headers(limits, win, now)  # as the request left the windows on arrival
        scope = f"{k.org or fingerprint(k.key)}/{model}"
        api.peak_window_tokens[scope] = max(api.peak_window_tokens[scope], win.used()[1])
        roll = api.rng.random()
        self.admitted += 1
        if roll < cfg.overloaded_rate or (cfg.overloaded_every and self.admitted % cfg.overloaded_every == 0):
            api.faults["overloaded"] += 1
            return error(529, "overloaded_error", "Overloaded")
        if roll < cfg.overloaded_rate + cfg.transient_rate:
            api.faults["transient"] += 1
            return error(500, "api_error", "Internal server error")
        delay = cfg.latency + (api.rng.uniform(0, cfg.latency_jitter) if cfg.latency_jitter else 0.0)
        api.in_flight += 1  # the API's count: max_in_flight in its stats
        api.max_in_flight = max(api.max_in_flight, api.in_flight)
        try:
            if delay > 0:
                await asyncio.sleep(delay)
        finally:
            api.in_flight -= 1
        data = self._answer(body, req, said)
        entry[2] = float(data["usage"]["output_tokens"])  # the output window holds what was written
        if cfg.anthropic_headers_at == "end":  # the windows once the answer is counted as written
            win.expire(time.monotonic(), cfg.minute)
            seen = self._headers(limits, win, time.monotonic())
        api.answered += 1
        api.prompt_tokens_billed += req.prompt_tokens
        api.last_answer = time.monotonic()
        api.paid(req)
        api.per_key[fingerprint(k.key)] += 1
        resp = web.json_response(data, dumps=lambda o: json.dumps(o, ensure_ascii=False))
        resp.headers["request-id"] = f"req_sim{api.calls}"
        if cfg.send_headers:
            resp.headers.update(seen)
        return resp

    # -- Message Batches ----------------------------------------------------------------------------
    def _answer_batched(self, number: int, params: dict[str, Any]) -> tuple[int, dict[str, Any], Any]:
        try:
            req, said = self.read(params)
        except Refused as refused:
            return refused.status, refused.body(), None
        return 200, self._answer(params, req, said), req

    def _public(self, request: web.Request, batch: Any) -> dict[str, Any]:
        ended = batch.status in ("completed", "expired", "cancelled")
        counts = {"processing": 0 if ended else len(batch.lines), "succeeded": 0, "errored": 0, "canceled": 0,
                  "expired": 0}
        for result in batch.results:
            kind = RESULT_TYPES.get(result.code, "expired") if result.status is None else \
                "succeeded" if result.status == 200 else "errored"
            counts[kind] += 1
        base = f"{request.scheme}://{request.host}"
        return {"id": batch.id, "type": "message_batch",
                "processing_status": "ended" if ended else "canceling" if batch.status == "cancelling" else "in_progress",
                "request_counts": counts, "created_at": _rfc3339(batch.created_at),
                "expires_at": _rfc3339(batch.created_at + 86400), "ended_at": _rfc3339(batch.ended_at),
                "archived_at": None, "cancel_initiated_at": _rfc3339(batch.cancel_asked_at),
                "results_url": f"{base}/v1/messages/batches/{batch.id}/results" if ended else None}

    def _batch(self, request: web.Request) -> Any:
        k = self._key(request)
        batch = self.api.batches.batches.get(request.match_info["id"])
        if batch is None or batch.kind != "anthropic" or batch.org != (k.org or k.key):
            raise Refused(404, "not_found_error", f"batch {request.match_info['id']} not found")
        self.api.batches.advance(batch)
        return batch

    async def create_batch(self, request: web.Request) -> web.Response:
        try:
            k = self._key(request)
            body = await _json(request)
            requests = body.get("requests") if isinstance(body, dict) else None
            if not isinstance(requests, list) or not requests:
                raise Refused(400, "invalid_request_error", "requests: Field required")
            if len(requests) > self.api.config.batch_max_lines:
                raise Refused(413, "request_too_large", f"a batch holds at most {self.api.config.batch_max_lines} requests")
            ids = [r.get("custom_id") if isinstance(r, dict) else None for r in requests]
            bad = next((i for i in ids if not isinstance(i, str) or not CUSTOM_ID.match(i)), False)
            if bad is not False:
                raise Refused(400, "invalid_request_error", f"requests: custom_id {bad!r} does not match "
                                                            f"^[a-zA-Z0-9_-]{{1,64}}$")
            if len(set(ids)) != len(ids):
                raise Refused(400, "invalid_request_error", "requests: custom_id values must be unique")
            if any(not isinstance(r.get("params"), dict) for r in requests):
                raise Refused(400, "invalid_request_error", "requests: params: Field required")
        except Refused as refused:
            return error(refused.status, refused.kind, refused.message)
        lines = [{"custom_id": r["custom_id"], "body": r["params"]} for r in requests]
        model = str(requests[0]["params"].get("model") or "")
        batch = self.api.batches.start("anthropic", k.org or k.key, model, lines, self._answer_batched, "msgbatch")
        return web.json_response(self._public(request, batch))

    async def list_batches(self, request: web.Request) -> web.Response:
        try:
            k = self._key(request)
        except Refused as refused:
            return error(refused.status, refused.kind, refused.message)
        mine = self.api.batches.mine(k.org or k.key, "anthropic")
        after = request.query.get("after_id")
        if after:
            ids = [b.id for b in mine]
            mine = mine[ids.index(after) + 1:] if after in ids else []
        limit = int(request.query.get("limit", 20))
        page = mine[:limit]
        return web.json_response({"data": [self._public(request, b) for b in page], "has_more": len(mine) > limit,
                                  "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None})

    async def retrieve_batch(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self._public(request, self._batch(request)))
        except Refused as refused:
            return error(refused.status, refused.kind, refused.message)

    async def cancel_batch(self, request: web.Request) -> web.Response:
        try:
            batch = self._batch(request)
        except Refused as refused:
            return error(refused.status, refused.kind, refused.message)
        self.api.batches.ask_cancel(batch)
        self.api.batches.advance(batch)
        return web.json_response(self._public(request, batch))

    async def batch_results(self, request: web.Request) -> web.Response:
        try:
            batch = self._batch(request)
        except Refused as refused:
            return error(refused.status, refused.kind, refused.message)
        if batch.status not in ("completed", "expired", "cancelled"):
            return error(400, "invalid_request_error", f"Message Batch {batch.id} has not ended yet")
        out = []
        for result in batch.results:
            if result.status is None:
                entry: dict[str, Any] = {"type": RESULT_TYPES.get(result.code, "expired")}
            elif result.status == 200:
                entry = {"type": "succeeded", "message": result.body}
            else:
                entry = {"type": "errored", "error": result.body}
            out.append(json.dumps({"custom_id": result.custom_id, "result": entry}, ensure_ascii=False))
        return web.Response(body=("\n".join(out) + "\n").encode(), content_type="application/binary")

    @staticmethod
    def _refused(limits: Any, win: _Windows, prompt: int, charge: int) -> str | None:
        requests, inputs, outputs = win.used()
        if limits.rpm is not None and requests + 1 > limits.rpm:
            return "requests per minute"
        if limits.tpm is not None and inputs + prompt > limits.tpm:
            return "input tokens per minute"
        if limits.otpm is not None and outputs + max(charge, 1) > limits.otpm:
            return "output tokens per minute"
        return None

    @staticmethod
    def _limit_of(limits: Any, what: str) -> int:
        return {"requests per minute": limits.rpm, "input tokens per minute": limits.tpm,
                "output tokens per minute": limits.otpm}[what]

    @staticmethod
    def _wait(win: _Windows, now: float, minute: float) -> float:
        return (win.log[0][0] + minute - now) if win.log else 1.0

    def _headers(self, limits: Any, win: _Windows, now: float) -> dict[str, str]:
        cfg = self.api.config
        if not cfg.send_headers:
            return {}
        requests, inputs, outputs = win.used()
        reset = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=max(self._wait(win, now, cfg.minute), 0))
        stamp = reset.isoformat(timespec="seconds").replace("+00:00", "Z")
        step = max(1, cfg.anthropic_token_rounding)
        out: dict[str, str] = {}
        left: list[int] = []
        for name, limit, used, rounded in (("requests", limits.rpm, requests, False),
                                           ("input-tokens", limits.tpm, inputs, True),
                                           ("output-tokens", limits.otpm, outputs, True)):
            if limit is None:
                continue
            remaining = max(0, limit - used)
            if rounded:  # "rounded to the nearest thousand" (Anthropic's documentation)
                remaining = min(limit, int(remaining / step + 0.5) * step)
                left.append(remaining)
            out[f"anthropic-ratelimit-{name}-limit"] = str(limit)
            out[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
            out[f"anthropic-ratelimit-{name}-reset"] = stamp
        if left:  # the most restrictive of the token limits
            tightest = min(n for n in (limits.tpm, limits.otpm) if n is not None)
            out["anthropic-ratelimit-tokens-limit"] = str(tightest)
            out["anthropic-ratelimit-tokens-remaining"] = str(min(left))
            out["anthropic-ratelimit-tokens-reset"] = stamp
        return out

    def _answer(self, body: dict[str, Any], req: Any, said: list[dict[str, Any]]) -> dict[str, Any]:
        """The Messages response: the OpenAI endpoint's answer to the same conversation."""
        model, cap = body["model"], body["max_tokens"]
        last = said[-1]["content"] if said else ""
        usage_cached = 0
        stop = "end_turn"
        if "REFUSE" in last:
            content: list[dict[str, Any]] = []
            stop = "refusal"
        elif body.get("tools"):
            tool = body["tools"][0]
            content = [{"type": "tool_use", "id": "toolu_" + prompt_key(said)[:12], "name": tool.get("name", "tool"),
                        "input": {"text": last[:40]}}]
            stop = "tool_use"
        else:
            text = sim_answer(model, said)
            fmt = (body.get("output_config") or {}).get("format") or {}
            if fmt.get("type") == "json_schema":
                text = json.dumps(_schema_instance(fmt.get("schema"), text), ensure_ascii=False)
            elif count_tokens(text) > cap:
                text, stop = text[: 4 * cap], "max_tokens"
            content = [{"type": "text", "text": text}]
        written = sum(count_tokens(b.get("text") or json.dumps(b.get("input"))) for b in content) or 1
        return {"id": f"msg_sim{self.calls}", "type": "message", "role": "assistant", "model": model,
                "content": content, "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": req.prompt_tokens - usage_cached, "output_tokens": min(written, cap),
                          "cache_read_input_tokens": usage_cached, "cache_creation_input_tokens": 0}}
