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
  resets as RFC 3339 timestamps, remaining tokens rounded down to ``anthropic_token_rounding``;
- errors (https://docs.anthropic.com/en/api/errors) as ``{"type": "error", "error": {"type",
  "message"}}``: 401 ``authentication_error``, 400 ``invalid_request_error`` (``prompt is too
  long`` past the model's context), 404 ``not_found_error``, 429 ``rate_limit_error`` with
  ``retry-after``, 500 ``api_error`` at ``transient_rate``, 529 ``overloaded_error`` at
  ``overloaded_rate``; a ``request-id`` header.

Answers are those of the OpenAI endpoints for the same conversation (:func:`conversation` gives
the messages :func:`~opt_queue.sim.api.sim_answer` takes); a last message containing ``REFUSE``
gets ``stop_reason: "refusal"``, a request with ``tools`` a ``tool_use`` block.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import time
from collections import deque
from typing import Any

from aiohttp import web

from opt_queue.core.config import fingerprint
from opt_queue.core.request import CHAT_URL
from opt_queue.sim.common import _schema_instance, count_tokens, prompt_key, sim_answer

CLAUDE_MODELS = {"claude-sonnet-4-5": 200_000, "claude-haiku-4-5": 200_000, "claude-opus-4-1": 200_000}


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

    async def create(self, request: web.Request) -> web.StreamResponse:
        api, cfg = self.api, self.api.config
        api.calls += 1
        self.calls += 1
        api.last_call = time.monotonic()
        api.first_call = api.first_call or api.last_call
        secret = (request.headers.get("x-api-key", "").strip()  # the documented header; SDK 2.x sends
                  or request.headers.get("Authorization", "").removeprefix("Bearer ").strip())  # a bearer
        api.calls_per_key[fingerprint(secret)] += 1
        k = api.key(secret)
        if k is None or k.dead in ("invalid", "forbidden"):
            return error(401, "authentication_error", "invalid x-api-key")
        if k.dead == "quota":
            return error(400, "invalid_request_error", "Your credit balance is too low to access the Anthropic "
                                                        "API. Please go to Plans & Billing to upgrade or purchase credits.")
        if not request.headers.get("anthropic-version"):
            return error(400, "invalid_request_error", "anthropic-version: header is required")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "invalid_request_error", "There was an issue with the format or content of your request.")
        model = body.get("model") if isinstance(body, dict) else None
        if model not in cfg.models:
            return error(404, "not_found_error", f"model: {model}")
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            return error(400, "invalid_request_error", "max_tokens: Field required")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return error(400, "invalid_request_error", "messages: Field required")
        if len(api.requests) < 10000:
            api.requests.append({"_url": "/v1/messages", **{n: v for n, v in body.items() if n != "messages"}})
        said = conversation(body)
        req = api.read_request(CHAT_URL, {"model": model, "messages": said, "max_tokens": body["max_tokens"]},
                               model, cfg.usage_count, cfg.limit_count)
        if req.prompt_tokens + body["max_tokens"] > cfg.models[model]:
            return error(400, "invalid_request_error", f"prompt is too long: {req.prompt_tokens} tokens > "
                                                       f"{cfg.models[model] - body['max_tokens']} maximum")
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
        if delay > 0:
            await asyncio.sleep(delay)
        data = self._answer(body, req, said)
        entry[2] = float(data["usage"]["output_tokens"])  # the output window holds what was written
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
