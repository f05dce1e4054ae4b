"""The simulated API's batches: how a batch runs (:class:`SimBatches`, which every provider's batch
endpoints share: Anthropic's Message Batches in ``anthropic.py``, Gemini's Batch Mode in
``gemini.py``), and OpenAI's Files and Batches endpoints, for the batch lane's tests and
``demo --lane batch``.

``POST /v1/files`` (multipart, ``purpose: batch``), ``GET /v1/files/{id}`` and
``GET /v1/files/{id}/content``; ``POST /v1/batches``, ``GET /v1/batches`` (newest first, ``limit``
and ``after``), ``GET /v1/batches/{id}`` and ``POST /v1/batches/{id}/cancel``. A batch is
``in_progress`` from its creation and its rows finish in file order over ``batch_delay`` seconds;
it is ``completed`` then, or ``expired`` at ``batch_expire_after`` with the rows finished so far
(the rest in the error file with ``batch_expired``), or ``cancelled`` when asked, with the rows
finished so far. A batch whose prompt tokens, added to its organization's batches in progress for
the model, exceed ``batch_enqueued_tokens`` is ``failed`` with ``token_limit_exceeded`` at once, as
the real API does. Answers and usage are those of the synchronous endpoints (``SimAPI.read_request``);
rate limits do not apply (the Batch API has its own pool). Time is read when a batch is looked at.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from opt_queue.core.config import fingerprint
from opt_queue.core.request import ENDPOINTS



class SimAPI(Protocol):
    """What the batches take of the simulated API they belong to (``simapi.SimAPI``)."""

    config: Any
    calls_per_key: Counter[str]

    def authorize(self, secret: str) -> tuple[Any, web.Response | None]: ...

    def read_request(self, url: str, body: dict[str, Any], model: str, usage_count: str = "typical",
                     limit_count: str = "typical") -> Any: ...

    def paid(self, req: Any) -> None: ...

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


Answerer = Callable[[int, dict[str, Any]], tuple[int, dict[str, Any], Any]]
"""How a batch's request is answered: (its place, its native body) -> (status, body, the request as
``SimAPI.read_request`` read it when it was answered, else None)."""


@dataclass
class Result:
    """One request's outcome in a finished batch: ``status`` None when the batch ended before it
    ran (``code`` says why: ``batch_expired``, ``batch_cancelled``)."""

    custom_id: str
    status: int | None
    body: dict[str, Any] | None = None
    code: str = ""


@dataclass
class _Batch:
    id: str
    org: str
    endpoint: str
    input_file_id: str
    model: str
    lines: list[dict[str, Any]]
    """``{"custom_id", "body"}`` each (OpenAI's file lines carry ``method`` and ``url`` too)."""
    tokens: int
    created: float
    metadata: dict[str, str] | None = None
    status: str = "in_progress"
    cancelled_at: float | None = None
    errors: list[dict[str, str]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    done: int = 0
    failed: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    kind: str = "openai"
    answer: Answerer | None = None
    results: list[Result] = field(default_factory=list)
    ended_at: int | None = None
    cancel_asked_at: int | None = None

    def public(self) -> dict[str, Any]:
        """The batch object as OpenAI's API returns it."""
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint, "input_file_id": self.input_file_id,
                "completion_window": "24h", "status": self.status, "output_file_id": self.output_file_id,
                "error_file_id": self.error_file_id, "created_at": self.created_at, "metadata": self.metadata,
                "errors": {"object": "list", "data": self.errors} if self.errors else None,
                "request_counts": {"total": len(self.lines), "completed": self.done, "failed": self.failed}}


class SimBatches:
    """Files and batches of one simulated API."""

    def __init__(self, api: SimAPI) -> None:
        self.api = api
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self.counts: Counter[str] = Counter()
        self._next = 0

    def stats(self) -> dict[str, Any]:
        """``files``, ``batches`` created, ``failed`` ones, ``lines`` answered, ``cancelled``..."""
        return dict(self.counts)

    def routes(self, app: web.Application) -> None:
        for prefix in ("/v1", ""):
            app.router.add_post(prefix + "/files", self.upload)
            app.router.add_get(prefix + "/files/{id}", self.file_info)
            app.router.add_get(prefix + "/files/{id}/content", self.content)
            app.router.add_post(prefix + "/batches", self.create)
            app.router.add_get(prefix + "/batches", self.list)
            app.router.add_get(prefix + "/batches/{id}", self.retrieve)
            app.router.add_post(prefix + "/batches/{id}/cancel", self.cancel)

    def _id(self, kind: str) -> str:
        self._next += 1
        return f"{kind}_sim{self._next}"

    # -- what every provider's batch endpoints share ---------------------------------------------
    def start(self, kind: str, org: str, model: str, lines: list[dict[str, Any]], answer: Answerer,
              prefix: str, **fields: Any) -> _Batch:
        """A new batch of ``kind``'s endpoints, in progress from now."""
        batch = _Batch(self._id(prefix), org, fields.pop("endpoint", ""), fields.pop("input_file_id", ""), model,
                       lines, fields.pop("tokens", 0), time.monotonic(), kind=kind, answer=answer, **fields)
        self.batches[batch.id] = batch
        self.counts["batches"] += 1
        return batch

    def mine(self, org: str, kind: str) -> list[_Batch]:
        """An organization's batches of ``kind``'s endpoints, newest first, brought up to date."""
        found = [b for b in reversed(self.batches.values()) if b.org == org and b.kind == kind]
        for b in found:
            self.advance(b)
        return found

    def ask_cancel(self, batch: _Batch) -> None:
        """Cancel a batch that is in progress (it stays ``cancelling`` for ``batch_cancel_delay``);
        ``cancel_requests`` counts every request, ``cancelled`` every batch cancelled."""
        self.counts["cancel_requests"] += 1
        if batch.status == "in_progress":
            batch.status, batch.cancelled_at = "cancelling", time.monotonic()
            batch.cancel_asked_at = int(time.time())
            self.counts["cancelled"] += 1

    def _org(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        secret = (request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                  or request.headers.get("api-key", "").strip())
        self.api.calls_per_key[fingerprint(secret)] += 1
        k, refused = self.api.authorize(secret)
        return (None, refused) if k is None else (k.org or k.key, None)

    # -- files ------------------------------------------------------------------------------------
    async def upload(self, request: web.Request) -> web.Response:
        _org, refused = self._org(request)
        if refused is not None:
            return refused
        form = await request.post()
        upload = form.get("file")
        if upload is None or form.get("purpose") != "batch":
            return _error(400, "a file and purpose 'batch' are required")
        data = upload.file.read() if hasattr(upload, "file") else str(upload).encode()
        file_id = self._id("file")
        self.files[file_id] = data
        self.counts["files"] += 1
        return web.json_response({"id": file_id, "object": "file", "bytes": len(data), "purpose": "batch",
                                  "filename": getattr(upload, "filename", "batch.jsonl"),
                                  "created_at": int(time.time())})

    async def file_info(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        if file_id not in self.files:
            return _error(404, f"No such File object: {file_id}", 404)
        return web.json_response({"id": file_id, "object": "file", "bytes": len(self.files[file_id])})

    async def content(self, request: web.Request) -> web.Response:
        _org, refused = self._org(request)
        if refused is not None:
            return refused
        data = self.files.get(request.match_info["id"])
        if data is None:
            return _error(404, f"No such File object: {request.match_info['id']}", 404)
        return web.Response(body=data, content_type="application/octet-stream")

    # -- batches ----------------------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        org, refused = self._org(request)
        if refused is not None:
            return refused
        assert org is not None
        body = await request.json()
        data = self.files.get(body.get("input_file_id", ""))
        if data is None:
            return _error(400, f"Invalid 'input_file_id': {body.get('input_file_id')}")
        endpoint = body.get("endpoint")
        url = endpoint if endpoint in ENDPOINTS else "/v1" + str(endpoint)
        lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        problem = self._check(lines, url)
        if problem:
            return _error(400, problem)
        model = lines[0]["body"].get("model") or ""
        tokens = 0
        for line in lines:
            try:
                tokens += self.api.read_request(url, line["body"], model,
                                                limit_count=self.api.config.limit_count).limit_prompt
            except ValueError:
                pass  # answered with a 400 in the error file
        batch = self.start("openai", org, model, lines, self._answer_openai(url, model), "batch", endpoint=url,
                           input_file_id=body["input_file_id"], tokens=tokens, metadata=body.get("metadata"))
        limit = self.api.config.batch_enqueued_tokens
        enqueued = sum(b.tokens for b in self.batches.values() if b.org == org and b.kind == "openai"
                       and b.model == model and b.status == "in_progress" and b is not batch)
        if limit and enqueued + tokens > limit:
            batch.status, batch.errors = "failed", [{
                "code": "token_limit_exceeded", "line": None, "param": None,
                "message": f"Enqueued token limit reached for {model} in organization org-sim. Limit: "
                           f"{limit:,} enqueued tokens. Please try again once some in_progress batches "
                           f"have been completed."}]
            self.counts["failed"] += 1
        return web.json_response(batch.public())

    def _check(self, lines: list[dict[str, Any]], url: str) -> str | None:
        if not lines:
            return "The batch input file is empty."
        if len(lines) > self.api.config.batch_max_lines:
            return f"The batch input file has {len(lines)} requests; at most {self.api.config.batch_max_lines}."
        ids = [line.get("custom_id") for line in lines]
        if len(set(ids)) != len(ids):
            return "The batch input file has duplicate custom_id values."
        if any(line.get("url") != url for line in lines):
            return f"Every line of the batch input file must have the url {url}."
        if len({line.get("body", {}).get("model") for line in lines}) != 1:
            return "The batch input file must contain requests for a single model."
        return None

    async def list(self, request: web.Request) -> web.Response:
        org, refused = self._org(request)
        if refused is not None:
            return refused
        limit = int(request.query.get("limit", 20))
        after = request.query.get("after")
        mine = [b for b in reversed(self.batches.values()) if b.org == org and b.kind == "openai"]
        if after:
            ids = [b.id for b in mine]
            mine = mine[ids.index(after) + 1:] if after in ids else []
        page = mine[:limit]
        for b in page:
            self.advance(b)
        return web.json_response({"object": "list", "data": [b.public() for b in page],
                                  "has_more": len(mine) > limit, "last_id": page[-1].id if page else None})

    def _batch(self, request: web.Request) -> _Batch | web.Response:
        """The batch the request names, brought up to date, or the error the API answers."""
        org, refused = self._org(request)
        if refused is not None:
            return refused
        batch = self.batches.get(request.match_info["id"])
        if batch is None or batch.org != org or batch.kind != "openai":
            return _error(404, f"No batch found with id '{request.match_info['id']}'.", 404)
        self.advance(batch)
        return batch

    async def retrieve(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        return batch if isinstance(batch, web.Response) else web.json_response(batch.public())

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        if isinstance(batch, web.Response):
            return batch
        self.ask_cancel(batch)
        return web.json_response(batch.public())

    def advance(self, batch: _Batch) -> None:
        """Bring the batch to what the time says: cancelled, expired or completed, with its results."""
        if batch.status in TERMINAL:
            return
        cfg = self.api.config
        now = time.monotonic()
        elapsed = now - batch.created
        if batch.status == "cancelling":
            if now - (batch.cancelled_at or now) >= cfg.batch_cancel_delay:  # rows stop at the cancel
                self._finish(batch, "cancelled", (batch.cancelled_at or now) - batch.created, "batch_cancelled")
        elif cfg.batch_expire_after and elapsed >= cfg.batch_expire_after and cfg.batch_expire_after < cfg.batch_delay:
            self._finish(batch, "expired", cfg.batch_expire_after, "batch_expired")
        elif elapsed >= cfg.batch_delay:
            self._finish(batch, "completed", elapsed, "")
        else:
            batch.done = int(len(batch.lines) * elapsed / cfg.batch_delay) if cfg.batch_delay else len(batch.lines)

    def _finish(self, batch: _Batch, status: str, worked: float, code: str) -> None:
        delay = self.api.config.batch_delay
        finished = len(batch.lines) if not delay else min(len(batch.lines), math.ceil(len(batch.lines) * worked / delay))
        answer = batch.answer or self._answer_openai(batch.endpoint, batch.model)
        for number, line in enumerate(batch.lines):
            custom_id = str(line.get("custom_id"))
            if number >= finished:
                batch.results.append(Result(custom_id, None, code=code))
                continue
            got, body, req = answer(number, line["body"])
            if req is not None and got == 200:
                self.api.paid(req)
                self.counts["lines"] += 1
            batch.results.append(Result(custom_id, got, body))
        batch.status, batch.ended_at = status, int(time.time())
        batch.done = sum(1 for r in batch.results if r.status == 200)
        batch.failed = len(batch.results) - batch.done
        if batch.kind == "openai":
            self._files(batch, status)

    def _answer_openai(self, url: str, model: str) -> Answerer:
        def answer(number: int, body: dict[str, Any]) -> tuple[int, dict[str, Any], Any]:
            try:
                req = self.api.read_request(url, body, model, self.api.config.usage_count)
            except ValueError as exc:
                return 400, {"error": {"message": str(exc), "type": "invalid_request_error", "param": None,
                                       "code": None}}, None
            return 200, req.response(number, 0), req
        return answer

    def _files(self, batch: _Batch, status: str) -> None:
        """OpenAI's output and error files of a finished batch."""
        out, err = [], []
        for number, result in enumerate(batch.results):
            line: dict[str, Any] = {"id": f"batch_req_{batch.id}_{number}", "custom_id": result.custom_id}
            if result.status is None:
                err.append({**line, "response": None, "error": {
                    "code": result.code, "message": f"This request could not be executed before the batch was {status}."}})
                continue
            line["response"] = {"status_code": result.status, "request_id": f"req_b{batch.id}_{number}",
                                "body": result.body}
            (out if result.status == 200 else err).append({**line, "error": None})
        if out:
            batch.output_file_id = self._id("file")
            self.files[batch.output_file_id] = _jsonl(out)
        if err:
            batch.error_file_id = self._id("file")
            self.files[batch.error_file_id] = _jsonl(err)


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()


def _error(status: int, message: str, code: Any = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                        "code": code}}, status=status)
