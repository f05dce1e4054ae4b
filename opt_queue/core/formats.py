"""Output formats: one row's line in ``output.jsonl`` and in the errors file, and reading it back.

* ``seed`` (the default for seed and chat input): ``{"<index>": answer}``, where the answer is
  the text (a chat completion, a response, a completion), the vector (an embedding) or the
  result object (a moderation); ``{"<index>": null}`` for a row that failed for good.
* ``full``: ``{"<index>": {"text", "finish_reason", "usage", "tool_calls", "parsed"}}`` (plus
  ``choices`` when ``n > 1`` and ``logprobs`` when asked for; ``{"embedding", "usage"}`` or
  ``{"results", "usage"}`` for embeddings and moderations); ``{"<index>": null}`` for a failure.
* ``batch`` (the default for Batch-format input): the Batch API's output line
  ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``; a
  failed row is ``{"id", "custom_id", "response": null, "error": {"code", "message"}}`` in the
  output (that is its null) and in the errors file, as the Batch API's error file has it.

Reading is format-blind (:func:`parse`): resume, ``collect`` and ``merge`` treat every format alike.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from opt_queue.core.answers import RowResult, warning
from opt_queue.core.request import BATCH as BATCH_INPUT

if TYPE_CHECKING:
    from opt_queue.core.answers import Reply

SEED, FULL, BATCH, AUTO = "seed", "full", "batch", "auto"
FORMATS = (SEED, FULL, BATCH)


def resolve(requested: str | None, input_format: str) -> str:
    """The output format of a job: the one asked for, else ``batch`` for Batch-format input and
    ``seed`` for the rest."""
    if requested and requested != AUTO:
        return requested
    return BATCH if input_format == BATCH_INPUT else SEED


def detail(fmt: str, reply: Reply, parsed: Any, request_id: str | None, body: dict[str, Any]) -> dict[str, Any] | None:
    """What a row's result carries beyond its answer for output format ``fmt``: the ``full``
    object, the Batch API's ``response`` (status, request id, the whole body), nothing for ``seed``."""
    if fmt == FULL:
        return reply.full(parsed)
    if fmt == BATCH:
        return {"status_code": 200, "request_id": request_id, "body": body}
    return None


def answered(index: str, reply: Reply, parsed: Any, problem: str | None, *, output: str, key: str | None,
             model: str, attempts: int, cost: float | None, request_id: str | None, body: dict[str, Any],
             failure_key: str | None = None) -> RowResult:
    """A 200's result for its row, the same in both lanes: the answer, with what the output format
    ``output`` keeps of it; or, when a structured answer misses its schema (``problem``, after
    any asking again), a final null saying what was wrong, its usage counted."""
    spent = {"index": index, "key": key, "model": model, "attempts": attempts, "cost": cost,
             "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
             "cached_tokens": reply.cached_tokens, "reasoning_tokens": reply.reasoning_tokens}
    if problem is not None:
        return RowResult(answer=None, error_type="schema_invalid", error=problem, retryable=False,
                         request=failure_key, **spent)
    return RowResult(answer=reply.value, warning=warning(reply), detail=detail(output, reply, parsed, request_id, body),
                     **spent)


def batch_id(index: str) -> str:
    """The ``id`` of a row's Batch-format line (stable: a rewrite keeps it)."""
    return "batch_req_" + hashlib.sha256(index.encode()).hexdigest()[:24]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def line(fmt: str, r: RowResult) -> str:
    """The output line (with newline) of one row's result."""
    if fmt == BATCH:
        if r.answer is None:
            return _dumps({"id": batch_id(r.index), "custom_id": r.index, "response": None,
                           "error": {"code": r.error_type, "message": r.error}})
        return _dumps({"id": batch_id(r.index), "custom_id": r.index, "response": r.detail, "error": None})
    if fmt == FULL:
        detail = r.detail if r.copy_of is None or r.detail is None else {**r.detail, "copy_of": r.copy_of}
        return _dumps({r.index: None if r.answer is None else detail})
    return _dumps({r.index: r.answer})


def error_line(fmt: str, r: RowResult) -> str | None:
    """The errors file's line for a null row (why it is null) or for a kept answer with a warning
    (none in the ``batch`` format, whose body shows the finish reason); None: no line."""
    if fmt == BATCH:
        if r.answer is not None:
            return None
        return _dumps({"id": batch_id(r.index), "custom_id": r.index, "response": None,
                       "error": {"code": r.error_type, "message": r.error},
                       "attempts": r.attempts, "key": r.key, "model": r.model, **_spent(r), **_retry(r)})
    entry: dict[str, Any] = {"index": r.index, "error_type": r.error_type, "message": r.error,
                             "attempts": r.attempts, "key": r.key, "model": r.model, **_spent(r)}
    if r.answer is not None:
        if not r.warning:
            return None
        entry.update(error_type="finish_reason_length", message=r.warning, warning=True)
    else:
        entry.update(_retry(r))
    return _dumps(entry)


def _retry(r: RowResult) -> dict[str, Any]:
    """For a null: whether a re-run sends it again by itself, and what it failed as."""
    if r.retryable:
        return {}
    return {"retryable": False, "request": r.request}


def _spent(r: RowResult) -> dict[str, Any]:
    """What the row's last call used and cost (a null after a paid answer: schema_invalid, refusal);
    for a copy of another row's request, which row it copies."""
    if r.copy_of is not None:
        return {"copy_of": r.copy_of}
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "cost": r.cost}


def error_index(entry: Any) -> str | None:
    """The row an errors-file line is about (either shape), or None for a torn line."""
    if not isinstance(entry, dict):
        return None
    index = entry.get("index", entry.get("custom_id"))
    return str(index) if index is not None else None


def parse(obj: Any) -> tuple[str, Any] | None:
    """``(index, answer or None)`` of an output line in any format; None if it is not one."""
    if not isinstance(obj, dict):
        return None
    if "custom_id" in obj and "response" in obj:
        response = obj.get("response")
        ok = obj.get("error") is None and isinstance(response, dict)
        return str(obj["custom_id"]), (response.get("body") if ok else None)
    if len(obj) != 1:
        return None
    ((index, answer),) = obj.items()
    return index, answer


def format_of(obj: Any) -> str | None:
    """The format of an output line: ``batch``, ``full`` (an object with ``usage``), else ``seed``."""
    if isinstance(obj, dict) and "custom_id" in obj:
        return BATCH
    if isinstance(obj, dict) and len(obj) == 1:
        value = next(iter(obj.values()))
        return FULL if isinstance(value, dict) and "usage" in value else SEED if value is not None else None
    return None
