"""The seam between the engine and an API: what a provider is, what it gives back and what its
failures mean. Nothing here knows a provider's wire format.

A provider (:class:`Provider`) sends one request of a row with one key and returns an
:class:`Answer`, or raises; its :meth:`Provider.classify` turns whatever it raised into a
:class:`Failure`, whose :class:`Kind` is all the engine's error policy acts on. The engine reads
no header and catches no SDK exception itself: a provider reads its own rate-limit headers into
``Answer.server_limits`` / ``Answer.token_window`` (and ``Failure.server_limits``), and says
whether a 429 was the tokens' window (``Failure.tokens``).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from opt_queue.core import answers
from opt_queue.core.config import ApiKey


class Kind(enum.Enum):
    """What a failed call means for the row and the key (the error policy: docs/how-it-works.md)."""

    RATE_LIMITED = "rate_limited"        # cool the key, try another, no attempt used
    SLOW_DOWN = "slow_down"              # 503 slow_down: lower the rate, ramp back, no attempt used
    FLEX_UNAVAILABLE = "resource_unavailable"  # 429 on a Flex request: standard tier (or later), no attempt used
    KEY_DEAD = "key_dead"                # retire the key for the job, try another
    TOO_LARGE = "request_too_large"      # larger than the key's whole TPM window: never passes
    TRANSIENT = "transient"              # back off and retry, up to max_retries
    UNREACHABLE = "unreachable"          # connection refused, DNS, TLS: no request left; its base may be wrong
    TOO_LONG = "context_length_exceeded" # fallback model once, else null
    JOB_CONFIG = "job_config"            # wrong model or parameter for every row: stop the job
    BAD_ROW = "bad_request"              # this row cannot succeed: null


REQUIRED_MAX_TOKENS = {"anthropic": 4096}
"""``max_tokens`` a provider requires, sent when neither the row nor the config gives one (its
output-token window holds that much until the answer says what was written)."""

FINAL_KINDS = frozenset({Kind.TOO_LARGE, Kind.TOO_LONG, Kind.BAD_ROW})
"""Failures that the same request meets again however often it is sent: a null of one of these is
not sent again by a re-run unless the request changed (or ``--retry-failed``)."""


@dataclass
class Failure:
    """A classified failure of one call."""

    kind: Kind
    message: str
    status: int | None = None
    code: str | None = None
    retry_after: float | None = None
    server_limits: dict[str, int] = field(default_factory=dict)
    """The key's limits the error response stated (``{"requests": n, "tokens": n}``)."""
    tokens: bool = False
    """A rate limit of the tokens' window (not the requests'): the server counts prompts as more
    than the limiter did, and the limiter learns it."""
    output: bool = False
    """A rate limit of the output tokens' window (Anthropic's third)."""

    @property
    def reason(self) -> str:
        """Short machine-readable reason: the API's code, else the kind."""
        return self.code or self.kind.value


class CallFailed(Exception):
    """A call failed; ``failure`` says what it means, ``usage`` what it was billed (a 200 without a
    usable answer, such as a refusal, is paid for)."""

    def __init__(self, failure: Failure, usage: dict[str, Any] | None = None) -> None:
        super().__init__(f"HTTP {failure.status}: {failure.message}" if failure.status else failure.message)
        self.failure = failure
        self.usage = usage


@dataclass
class Answer:
    """A successful call: what the endpoint answered, and what the response said about the key."""

    reply: answers.Reply
    body: dict[str, Any]
    request_id: str | None = None
    server_limits: dict[str, int] = field(default_factory=dict)
    """The key's limits the response stated (``{"requests": n, "tokens": n}``), learned by the limiter."""
    token_window: tuple[int, int] | None = None
    """``(limit, remaining)`` of the key's token window as the server had counted it when the request
    arrived, which calibrates the limiter's count of prompts (None: not stated)."""
    token_rounding: int = 0
    """How the server rounds the remaining tokens it states (Anthropic: to the nearest thousand)."""
    prompt_counted: int | None = None
    """The server's count of this request's prompt, where its token window counts what it bills
    and no header states the window (Gemini): an exact reading for calibration."""
    output_window: tuple[int, int] | None = None
    """``(limit, remaining)`` of the key's output-token window as the response stated it (rounded
    as ``token_rounding`` says): whether the server held the request's ``max_tokens`` on arrival."""


@dataclass
class Batch:
    """A provider's batch of requests, as the batch lane reads it (in OpenAI's Batch API words; each
    provider maps its own states to these)."""

    id: str
    status: str
    """``validating``, ``in_progress``, ``finalizing``, ``completed``, ``failed``, ``expired``,
    ``cancelling``, ``cancelled``."""
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)
    """What names the batch, as given to :meth:`BatchProvider.create_batch` (empty where a provider
    keeps nothing of the kind: Anthropic's Message Batches)."""
    errors: list[tuple[str | None, str | None]] = field(default_factory=list)
    """A failed batch's ``(code, message)`` pairs."""
    requests: int = 0
    """How many requests it holds (0: not stated)."""
    native: Any = None
    """What the provider answered for it, where its results come with it (Gemini's inline responses)."""


BatchEntry = dict[str, Any]
"""One request's result in a finished batch, in the shape of a line of OpenAI's batch output and
error files: ``{"custom_id", "response": {"status_code", "body", "request_id"} | None,
"error": {"code", "message"} | None}`` (a request that the batch never ran has no response)."""


class Provider(Protocol):
    """One API, as the engine uses it on one event loop: a client per key kept open."""

    def warm_up(self) -> None:
        """Open what the first call needs (its connection pool) before any admission waits on it."""

    async def call(self, key: ApiKey, url: str, body: dict[str, Any], timeout: float,
                   on_send: Callable[[], None] | None = None) -> Answer:
        """Send one request of endpoint ``url`` (a path of ``request.ENDPOINTS``) with ``key``.

        ``on_send`` is called once, synchronously, right before the request's bytes leave: the
        limiter reads the send time then. Nothing is retried here: the engine's policy decides.
        A failure raises anything :meth:`classify` knows."""

    def classify(self, exc: BaseException) -> Failure:
        """What an exception raised by :meth:`call` means."""

    async def close(self) -> None:
        """Close the clients and their connections."""


class BatchProvider(Provider, Protocol):
    """A provider with a batch API (the batch lane's): start a batch of requests, look at it,
    cancel it, read its results. Errors raise what :meth:`classify` knows.

    Where the provider's batches read their requests from an uploaded file (``files``: OpenAI), the
    lane uploads the chunk's file first (:meth:`upload`) and keeps its id, so that a second attempt
    of the same chunk uploads nothing again; elsewhere the requests go with the create call."""

    files: bool
    names_batches: bool
    """Whether :meth:`recent_batches` gives back the ``metadata`` a batch was created with (OpenAI's
    metadata, Gemini's display name); where not (Anthropic), the lane finds a batch it lost by its
    creation time and size."""

    async def upload(self, key: ApiKey, name: str, data: bytes, timeout: float) -> str:
        """Upload a batch's input file (OpenAI's JSONL lines); its id. Only where ``files``."""

    async def create_batch(self, key: ApiKey, endpoint: str, model: str, metadata: dict[str, str], timeout: float,
                           file_id: str | None = None,
                           requests: list[tuple[str, dict[str, Any]]] | None = None) -> Batch:
        """Start a batch of the uploaded file's requests (``file_id``) or of ``requests`` (custom
        id, row body), to finish within the provider's window."""

    async def batch(self, key: ApiKey, batch_id: str, timeout: float) -> Batch:
        """A batch as it stands."""

    async def cancel_batch(self, key: ApiKey, batch_id: str, timeout: float) -> None:
        """Ask the provider to cancel a batch (what it finished stays readable)."""

    def recent_batches(self, key: ApiKey, timeout: float) -> AsyncIterator[Batch]:
        """The key's batches, newest first."""

    def results(self, key: ApiKey, batch: Batch, timeout: float) -> AsyncIterator[BatchEntry]:
        """Every result of a batch that ended, in the shape of :data:`BatchEntry`, one at a time as
        the provider's file downloads (a worker's memory does not grow with the batch's size)."""

    def classify_response(self, status: int, body: Any) -> Failure:
        """What an error response inside a batch's results means (its status and body)."""


class NotMappable(ValueError):
    """A row's request has no equivalent in the provider's API (the same for every row of that
    kind: the job stops, naming the parameter)."""


def classify_first(exc: BaseException, unreachable: Callable[[BaseException], BaseException | None]) -> Failure | None:
    """What every provider's classification starts with: a request with no native equivalent, a
    failure already classified, a connection that could not be made (``unreachable`` finds it)."""
    if isinstance(exc, NotMappable):
        return Failure(Kind.JOB_CONFIG, str(exc), code="not_mappable")
    if isinstance(exc, CallFailed):
        return exc.failure
    refused = unreachable(exc)
    if refused is not None:
        return Failure(Kind.UNREACHABLE, f"cannot connect: {str(refused) or type(refused).__name__}",
                       code="unreachable")
    return None


def classify_sdk(exc: BaseException, sdk: Any, classify_status: Callable[[int, Any, Any, str], Failure]) -> Failure | None:
    """The errors of an SDK shaped like ``openai``'s and ``anthropic``'s (``APIStatusError`` with
    the HTTP response, ``APITimeoutError``, ``APIConnectionError``), else None."""
    if isinstance(exc, sdk.APIStatusError):
        try:
            body = exc.response.json()
        except ValueError:
            body = None
        return classify_status(exc.status_code, body, exc.response.headers, exc.response.text)
    if isinstance(exc, sdk.APITimeoutError):
        return Failure(Kind.TRANSIENT, "the request timed out", code="timeout")
    if isinstance(exc, sdk.APIConnectionError):
        return Failure(Kind.TRANSIENT, f"connection error: {type(exc.__cause__ or exc).__name__}",
                       code="connection_error")
    return None


def classify_other(exc: BaseException) -> Failure:
    """What an exception that is neither an HTTP error nor a connection failure means: a 200
    without a usable answer (``answers``' errors), a timeout, else something unexpected (retried)."""
    if isinstance(exc, CallFailed):
        return exc.failure
    if isinstance(exc, answers.ContentFiltered):
        return Failure(Kind.BAD_ROW, str(exc), code="content_filter")
    if isinstance(exc, answers.Refused):
        return Failure(Kind.BAD_ROW, str(exc), code="refusal")
    if isinstance(exc, answers.BadResponse):
        return Failure(Kind.TRANSIENT, str(exc), code="bad_response")
    if isinstance(exc, asyncio.TimeoutError):
        return Failure(Kind.TRANSIENT, "the request timed out", code="timeout")
    return Failure(Kind.TRANSIENT, f"unexpected {type(exc).__name__}: {exc}", code="unexpected_error")


def redact(text: str, secrets: list[str]) -> str:
    """Replace every secret in ``text`` by ``***`` (defence in depth for error messages)."""
    for s in secrets:
        if s and s in text:
            text = text.replace(s, "***")
    return text
